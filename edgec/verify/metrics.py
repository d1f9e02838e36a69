"""Agreement metrics between embeddings (numpy only: runs on the device)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def zero_shot_predictions(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Index of the best-matching class prompt for each image."""
    return np.argmax(l2_normalize(image_emb) @ l2_normalize(text_emb).T, axis=-1)


def top1_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``pred == labels`` over the labelled rows (label >= 0)."""
    mask = labels >= 0
    if not mask.any():
        return float("nan")
    return float(np.mean(pred[mask] == labels[mask]))


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    return float(np.mean(pred_a == pred_b))


def recall_at_k(image_emb: np.ndarray, caption_emb: np.ndarray, owner: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """Image -> text retrieval: share of images with one of their own captions among the top k."""
    sims = l2_normalize(image_emb) @ l2_normalize(caption_emb).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    hits = owner[order] == np.arange(len(image_emb))[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def accelerator_metrics(ops: dict | None) -> dict[str, float]:
    """``mapped_share``: the share of the shipped model's ops that run on the accelerator in one subgraph
    (edgetpu_compiler's own count when it ran, else edgec's check against the documented op list). Only
    for targets whose op report was checked against an accelerator's op list."""
    if not ops or not ops.get("accelerator_ops_checked"):
        return {}
    compiled = ops.get("edgetpu_compiler") or {}
    on_tpu, on_cpu = compiled.get("on_edgetpu"), compiled.get("on_cpu")
    if isinstance(on_tpu, int) and isinstance(on_cpu, int) and on_tpu + on_cpu:
        return {"mapped_share": on_tpu / (on_tpu + on_cpu)}
    return {"mapped_share": float(ops["mapped_share"])}


def first_unmapped(ops: dict | None) -> str:
    """The first op that leaves the accelerator and the PyTorch layer it comes from, for a failed mapped_share gate."""
    first = (ops or {}).get("first_unsupported")
    if not first:
        return ""
    layer = f" in layer {first['layer']}" if first.get("layer") else " (layer not recorded in the model)"
    why = f" ({'; '.join(first['reasons'])})" if first.get("reasons") else ""
    return (f"; first op off the accelerator: #{first['index']} {first['op']}{layer}{why}, it and every op after it "
            f"run on the CPU")
