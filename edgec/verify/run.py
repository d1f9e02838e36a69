"""edgec verify: run a target folder's artifacts in their runtime on the golden inputs, compute the
metrics and check the gates. numpy + the artifact's runtime only (no torch).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.preprocess import Preprocess
from ..errors import GateFailed, InputError
from ..manifest import atomic_write_json, atomic_write_text, read_manifest, sha256_file
from ..runtime.isa import host_isa
from ..runtime.runners import open_runner
from .gates import parse_gate
from .golden import Golden, load_golden
from .metrics import (accelerator_metrics, agreement, cosine, first_unmapped, recall_at_k, top1_accuracy,
                      zero_shot_predictions)

DEFAULT_GATES = ("agreement>=0.97",)


def golden_inputs(golden: Golden, preprocess: Preprocess) -> np.ndarray:
    """The golden images as the artifact expects them: its size, normalisation and layout."""
    images = golden.images
    if tuple(images.shape[1:3]) != tuple(preprocess.size):
        images = np.stack([np.asarray(preprocess.resize_image(Image.fromarray(im))) for im in images])
    return preprocess.normalize(images)


def per_image(emb: np.ndarray, golden: Golden) -> dict[str, list]:
    """Per eval image: cosine to the teacher, and both zero-shot predictions (for reports)."""
    out = {"cosine": [round(float(c), 5) for c in cosine(emb, golden.image_embeddings)]}
    if golden.text_embeddings is not None:
        out["pred"] = zero_shot_predictions(emb, golden.text_embeddings).tolist()
        out["teacher_pred"] = zero_shot_predictions(golden.image_embeddings, golden.text_embeddings).tolist()
    return out


def compute_metrics(emb: np.ndarray, golden: Golden) -> dict[str, float]:
    cos = cosine(emb, golden.image_embeddings)
    m: dict[str, float] = {"images": float(len(emb)), "cosine_mean": float(cos.mean()),
                           "cosine_p1": float(np.percentile(cos, 1))}
    if golden.text_embeddings is not None:
        pred = zero_shot_predictions(emb, golden.text_embeddings)
        ref = zero_shot_predictions(golden.image_embeddings, golden.text_embeddings)
        m["agreement"] = agreement(pred, ref)
        if (golden.label_ids >= 0).any():
            m["accuracy"] = top1_accuracy(pred, golden.label_ids)
            m["teacher_accuracy"] = top1_accuracy(ref, golden.label_ids)
            m["accuracy_delta"] = m["accuracy"] - m["teacher_accuracy"]
    if golden.caption_embeddings is not None:
        for k, v in recall_at_k(emb, golden.caption_embeddings, golden.caption_owner).items():
            m[f"recall@{k}"] = v
    return m


def check_gates(metrics: dict[str, float], exprs: list[str]) -> list[dict]:
    results = []
    for expr in exprs:
        try:
            gate = parse_gate(expr)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        value = metrics.get(gate.metric)
        results.append({"gate": str(gate), "metric": gate.metric, "value": value, "threshold": gate.threshold,
                        "passed": value is not None and gate.holds(value),
                        "reason": None if value is not None else f"metric {gate.metric} not available for this artifact"})
    return results


def check_same_teacher(folder: Path, manifest: dict, golden_dir: Path, meta: dict) -> None:
    """The golden set must come from the teacher the artifacts were built from (same architecture is not
    enough: another teacher's outputs would only be caught, if at all, by a gate)."""
    built_from = (manifest.get("sources") or {}).get("teacher")
    golden_from = (meta.get("teacher") or {}).get("sha256")
    if built_from and golden_from and built_from != golden_from:
        raise InputError(f"the golden set in {golden_dir} was made by another teacher (sha256 {golden_from[:12]}...) "
                         f"than {folder} was built from ({built_from[:12]}...)",
                         hint="run 'edgec golden' with this model's teacher, or pass the right --golden")


def verify(folder: str | Path, golden_dir: str | Path | None = None, gates: list[str] | None = None, *,
           threads: int | None = None, junit: Path | None = None, markdown: Path | None = None) -> dict:
    """Verify every artifact in ``folder``; writes verify.json there. Raises GateFailed when a gate fails."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    golden_dir = Path(golden_dir) if golden_dir else folder.parent / "golden"
    golden = load_golden(golden_dir)
    check_same_teacher(folder, manifest, golden_dir, golden.meta)
    out_dim = manifest["outputs"][0]["shape"][-1]
    if out_dim != golden.image_embeddings.shape[1]:
        raise InputError(f"{folder} outputs {out_dim}-d embeddings but the golden set in {golden_dir} has "
                         f"{golden.image_embeddings.shape[1]}-d ones: they come from different models",
                         hint="run 'edgec golden' for this model's teacher, or pass the right --golden")
    preprocess = Preprocess.from_json(manifest["inputs"][0]["preprocess"])
    x = golden_inputs(golden, preprocess)
    exprs = list(gates) if gates else list(manifest.get("gates") or DEFAULT_GATES)
    by_tower: dict[str, list[dict]] = {}
    for art in manifest["artifacts"]:
        by_tower.setdefault(art.get("tower", "image"), []).append(art)
    text = verify_text(folder, by_tower["text"][0], golden, threads) if by_tower.get("text") else None
    results, image_embeddings = [], None
    for art in by_tower.get("image", []):
        runner = open_runner(_checked(folder, art), art["runtime"], threads)
        t0 = time.time()
        emb = runner(x)
        seconds = time.time() - t0
        metrics = compute_metrics(emb, golden)
        metrics.update(accelerator_metrics(manifest.get("ops")))
        image_embeddings = emb if image_embeddings is None else image_embeddings
        if text is not None:
            metrics.update(text["metrics"])
            if text["class_embeddings"] is not None:  # both towers from artifacts vs the teacher's two towers
                metrics["artifacts_agreement"] = agreement(
                    zero_shot_predictions(emb, text["class_embeddings"]),
                    zero_shot_predictions(golden.image_embeddings, golden.text_embeddings))
        gate_results = check_gates(metrics, exprs)
        host = None
        if getattr(runner, "kernels", None) == "reference":  # a TensorRT Q/DQ model on a CPU: the host's int8 kernels too
            host_runner = open_runner(_checked(folder, art), art["runtime"], threads, kernels="host")
            host = {"executed_by": host_runner.executed_by, "metrics": compute_metrics(host_runner(x), golden),
                    "note": "the same file in this host's fused int8 kernels (their results depend on the ISA: see "
                            "host_isa); reported, not gated"}
        results.append({"artifact": art["path"], "precision": art.get("precision"), "runtime": art["runtime"],
                        "executed_by": getattr(runner, "executed_by", art["runtime"]), "host_kernels": host,
                        "metrics": metrics, "gates": gate_results, "passed": all(g["passed"] for g in gate_results),
                        "seconds": round(seconds, 2), "per_image": per_image(emb, golden)})
    logits = None
    if by_tower.get("zero-shot") and image_embeddings is not None:
        art = by_tower["zero-shot"][0]
        logits = verify_logits(folder, art, manifest, x, image_embeddings, golden, threads)
        expected = art.get("expected_logits_agreement")
        if expected is not None and not any("logits_agreement" in e for e in exprs):
            exprs = [*exprs, f"logits_agreement>={expected:g}"]  # recorded by compile: 1 when the image part is the same graph
        for r in results:  # the logits artifact must decide as the shipped embeddings + head files do
            r["metrics"].update(logits["metrics"])
            r["gates"] = check_gates(r["metrics"], exprs)
            r["passed"] = all(g["passed"] for g in r["gates"])
    report = {"schema": 1, "target": manifest.get("target"), "folder": str(folder), "golden": str(golden_dir),
              "golden_device": golden.meta.get("device"), "host_isa": host_isa().record(), "results": results,
              "text": None if text is None else {k: v for k, v in text.items() if k != "class_embeddings"},
              "zero_shot": logits, "passed": all(r["passed"] for r in results)}
    atomic_write_json(folder / "verify.json", report)
    manifest["metrics"] = {r["artifact"]: r["metrics"] for r in results}
    if text is not None:
        manifest["metrics"][text["artifact"]] = text["metrics"]
    if logits is not None:
        manifest["metrics"][logits["artifact"]] = logits["metrics"]
    atomic_write_json(folder / "manifest.json", manifest)
    if junit:
        atomic_write_text(junit, to_junit(report))
    md = to_markdown(report)
    if markdown:
        atomic_write_text(markdown, md)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # a convenience of the CI: a broken path there is logged, and the verdict still stands
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(md + "\n")
        except OSError as exc:
            import logging

            logging.getLogger("edgec.verify").warning("GITHUB_STEP_SUMMARY=%s: not written (%s)", summary, exc)
    failed = [(r, g) for r in results for g in r["gates"] if not g["passed"]]
    # a model that mostly runs off the accelerator is the failure to name first (it explains the others)
    failed.sort(key=lambda rg: rg[1]["metric"] != "mapped_share")
    if failed:
        r, g = failed[0]
        value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        raise GateFailed(f"{manifest.get('target')}/{r['artifact']}: gate {g['gate']} failed: {g['metric']} = {value}, "
                         f"threshold {g['threshold']:g}{more}"
                         + (first_unmapped(manifest.get("ops")) if g["metric"] == "mapped_share" else ""),
                         hint=f"details in {folder / 'verify.json'}")
    return report


def _checked(folder: Path, art: dict) -> Path:
    """The artifact's path, present and matching its recorded sha256."""
    path = folder / art["path"]
    if not path.is_file():
        raise InputError(f"artifact missing: {path}", hint="compile the target again")
    if sha256_file(path) != art["sha256"]:
        raise InputError(f"{path} does not match the sha256 in manifest.json (truncated or altered)",
                         hint="compile the target again, or copy the whole folder")
    return path


def verify_text(folder: Path, art: dict, golden: Golden, threads: int | None = None) -> dict:
    """The text artifact against the teacher's text embeddings in the golden set: label prompts (averaged
    per class as zero-shot does) and captions, tokenised with the shipped tokenizer files (no torch)."""
    from ..runtime.tokenize import load_tokenizer, tokenize
    from .metrics import l2_normalize

    runner = open_runner(_checked(folder, art), art["runtime"], threads)
    tokenizer = load_tokenizer(folder, art.get("tokenizer") or {})
    t0 = time.time()
    ours, ref, classes = [], [], None
    labels, prompts = golden.meta.get("labels") or [], golden.meta.get("prompts") or []
    if golden.text_embeddings is not None and labels and prompts:
        emb = runner(tokenize(tokenizer, [p.format(label) for label in labels for p in prompts]))
        classes = l2_normalize(l2_normalize(emb).reshape(len(labels), len(prompts), -1).mean(axis=1)).astype(np.float32)
        ours.append(classes)
        ref.append(golden.text_embeddings)
    captions = [c for cs in (golden.meta.get("captions") or []) for c in cs]
    if golden.caption_embeddings is not None and captions:
        ours.append(runner(tokenize(tokenizer, captions)))
        ref.append(golden.caption_embeddings)
    if not ours:
        raise InputError(f"{folder}: the golden set has no teacher text embeddings to compare the text tower with",
                         hint="the eval folder needs class sub-folders or captions; run 'edgec golden' again")
    cos = cosine(np.concatenate(ours), np.concatenate(ref))
    metrics = {"texts": float(len(cos)), "text_cosine_mean": float(cos.mean()), "text_cosine_p1": float(np.percentile(cos, 1))}
    return {"artifact": art["path"], "runtime": art["runtime"], "metrics": metrics, "seconds": round(time.time() - t0, 2),
            "class_embeddings": classes}


def verify_logits(folder: Path, art: dict, manifest: dict, x: np.ndarray, image_embeddings: np.ndarray, golden: Golden,
                  threads: int | None = None) -> dict:
    """The zero-shot artifact (logits out): its top-1 against the top-1 of the image artifact's embeddings with
    the head's text embeddings (what an app without the folded head computes), and against the teacher."""
    from ..manifest import inside

    head = manifest.get("head") or {}
    runner = open_runner(_checked(folder, art), art["runtime"], threads)
    t0 = time.time()
    logits = runner(x)
    text = np.load(inside(folder, head.get("text_embeddings"), "manifest.json: head.text_embeddings"),
                   allow_pickle=False).astype(np.float32)
    if logits.shape != (len(x), len(text)):
        raise InputError(f"{art['path']} gives logits of shape {list(logits.shape)}, expected {[len(x), len(text)]}",
                         hint="compile the target again")
    pred = np.argmax(logits, axis=1)
    metrics = {"logits_agreement": agreement(pred, zero_shot_predictions(image_embeddings, text))}
    if golden.text_embeddings is not None:
        metrics["logits_teacher_agreement"] = agreement(pred, zero_shot_predictions(golden.image_embeddings, golden.text_embeddings))
    return {"artifact": art["path"], "runtime": art["runtime"], "metrics": metrics, "seconds": round(time.time() - t0, 2)}


def to_junit(report: dict) -> str:
    """One <testsuite> with a case per gate of each artifact (edgec.verify.junit)."""
    from .junit import Suite, gate_case, testsuite_xml

    cases = [gate_case("edgec.verify", report["target"], r["artifact"], g, r["seconds"])
             for r in report["results"] for g in r["gates"]]
    props = {"target": str(report["target"]), "golden_device": str(report.get("golden_device", ""))}
    return testsuite_xml(Suite(f"edgec verify {report['target']}", cases, properties=props))


def to_markdown(report: dict) -> str:
    lines = [f"### edgec verify: {report['target']} ({'passed' if report['passed'] else 'FAILED'})", "",
             "| artifact | cosine mean | cosine p1 | agreement | accuracy (teacher) | gates |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        m = r["metrics"]
        acc = f"{m['accuracy']:.4f} ({m['teacher_accuracy']:.4f})" if "accuracy" in m else "-"
        gates = ", ".join(("✅ " if g["passed"] else "❌ ") + g["gate"] for g in r["gates"])
        lines.append(f"| {r['artifact']} | {m['cosine_mean']:.4f} | {m['cosine_p1']:.4f} | "
                     f"{m.get('agreement', float('nan')):.4f} | {acc} | {gates} |")
    lines.append(f"\nGolden outputs computed on {report['golden_device']}; {int(report['results'][0]['metrics']['images'])} images.")
    return "\n".join(lines)


def summary_line(report: dict) -> str:
    parts = []
    for r in report["results"]:
        m = r["metrics"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("agreement", "accuracy", "cosine_mean", "cosine_p1", "text_cosine_mean",
                                                      "text_cosine_p1", "artifacts_agreement", "logits_agreement") if k in m)
        parts.append(f"{r['artifact']}: {shown} ({r['seconds']}s)")
    return "; ".join(parts)


__all__ = ["verify", "compute_metrics", "check_gates", "golden_inputs", "to_junit", "to_markdown"]
