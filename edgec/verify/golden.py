"""The golden set: the full-precision teacher's outputs on the eval images (build/golden/).

``golden.npz`` holds the eval images decoded and resized exactly as the teacher saw them
(uint8 RGB: compact, and every artifact applies its own normalisation and layout from its
manifest), the teacher's normalised image embeddings, the normalised text embeddings of the
label prompts, and label ids; ``golden.json`` holds labels, captions, prompts, preprocessing,
the device it was computed on and hashes. Reading it needs numpy only.
"""

from __future__ import annotations

import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..manifest import atomic_write_bytes, atomic_write_json, sha256_file, staged_dir

GOLDEN_NPZ = "golden.npz"
GOLDEN_JSON = "golden.json"
SCHEMA = 1


@dataclass(frozen=True)
class GoldenConfig:
    teacher: object  # config.ModelSection
    eval: Path
    out: Path
    prompts: tuple[str, ...] = ("a photo of a {}.",)
    captions_file: str = "captions.jsonl"
    max_bad_fraction: float = 0.05
    device: str = "auto"

    @classmethod
    def from_edgec(cls, cfg, *, out: Path | None = None, device: str = "auto") -> GoldenConfig:
        """The golden set edgec.toml describes (teacher, [data] eval, prompts, captions), in ``<build>/golden``."""
        import dataclasses

        from ..errors import InputError

        if cfg.model is None or cfg.data.eval is None:
            raise InputError("the golden set needs [model] path and [data] eval in edgec.toml", hint="add them, see 'edgec init'")
        return cls(teacher=dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path))), eval=cfg.resolve(cfg.data.eval),
                   out=out or cfg.resolve(cfg.targets.out) / "golden", prompts=tuple(cfg.data.prompts),
                   captions_file=cfg.data.captions, max_bad_fraction=cfg.data.max_bad_fraction, device=device)


@dataclass
class Golden:
    """A loaded golden set (numpy only)."""

    root: Path
    images: np.ndarray  # (N, H, W, 3) uint8
    image_embeddings: np.ndarray  # (N, D) float32, normalised
    text_embeddings: np.ndarray | None  # (C, D) float32, normalised
    label_ids: np.ndarray  # (N,) int, -1 unlabelled
    meta: dict
    caption_embeddings: np.ndarray | None = None  # (M, D) teacher embeddings of every caption
    caption_owner: np.ndarray | None = None  # (M,) index of the image each caption describes

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]


def build_golden(config: GoldenConfig, *, log=print) -> Path:
    import torch

    from ..data.folder import load_rgb, read_folder
    from ..distill.data import folder_identity, teacher_identity
    from ..models import load_model
    from ..models.zeroshot import class_text_embeddings

    t0 = time.time()
    teacher = load_model(config.teacher.path, config.teacher.kind, arch=config.teacher.arch,
                         trust_pickle=config.teacher.trust_pickle)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device)
    teacher.to(device)
    device_name = f"cuda:{torch.cuda.get_device_name(torch.device(device))}" if device.startswith("cuda") else "cpu"
    folder = read_folder(config.eval, config.captions_file)
    loaded = load_rgb(folder, teacher.preprocess, max_bad_fraction=config.max_bad_fraction)
    with torch.inference_mode():
        image = teacher.encode_image(teacher.preprocess.normalize(loaded.pixels)).numpy().astype(np.float32)
        text = None
        if folder.labels and teacher.text_encoder is not None and teacher.tokenizer is not None:
            text = class_text_embeddings(teacher, folder.labels, list(config.prompts)).numpy().astype(np.float32)
    items = [folder.items[i] for i in loaded.kept]
    arrays = {"images": loaded.pixels, "image_embeddings": image, "label_ids": folder.label_ids()[loaded.kept]}
    if text is not None:
        arrays["text_embeddings"] = text
    if folder.has_captions and teacher.text_encoder is not None and teacher.tokenizer is not None:
        owners = [i for i, it in enumerate(items) for _ in it.captions]
        captions = [c for it in items for c in it.captions]
        with torch.inference_mode():
            arrays["caption_embeddings"] = teacher.encode_text(captions).numpy().astype(np.float16)
        arrays["caption_owner"] = np.asarray(owners, np.int32)
    with staged_dir(config.out) as tmp:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(tmp / GOLDEN_NPZ, buf.getvalue())
        meta = {
            "schema": SCHEMA,
            "teacher": {"name": teacher.name, "kind": teacher.kind, "sha256": teacher_identity(teacher)},
            "eval": {"path": str(config.eval), "sha256": folder_identity(folder), "images": len(items),
                     "skipped": [str(p) for p, _ in loaded.bad]},
            "files": [str(it.path.relative_to(folder.root)) for it in items],
            "labels": folder.labels,
            "captions": [list(it.captions) for it in items] if folder.has_captions else None,
            "prompts": list(config.prompts),
            "captions_file": config.captions_file,
            "max_bad_fraction": config.max_bad_fraction,
            "preprocess": teacher.preprocess.to_json(),
            "embedding_dim": int(image.shape[1]),
            "logit_scale": teacher.logit_scale,
            "device": device_name,
            "host": platform.node(),
            "seconds": round(time.time() - t0, 1),
            "npz_sha256": sha256_file(tmp / GOLDEN_NPZ),
        }
        atomic_write_json(tmp / GOLDEN_JSON, meta)
    log(f"golden: {len(items)} images, teacher {teacher.name} on {device_name}" + (f", {len(loaded.bad)} undecodable skipped" if loaded.bad else ""))
    return config.out


def load_golden(path: str | Path) -> Golden:
    path = Path(path)
    meta_path = path / GOLDEN_JSON
    if not meta_path.is_file():
        raise InputError(f"no golden set in {path} ({GOLDEN_JSON} missing)", hint="create it with 'edgec golden'")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path} is not valid JSON ({exc.msg})", hint="run 'edgec golden' again") from None
    npz = path / GOLDEN_NPZ
    if not npz.is_file() or sha256_file(npz) != meta.get("npz_sha256"):
        raise InputError(f"{npz} is missing or does not match the sha256 in {GOLDEN_JSON}", hint="run 'edgec golden' again")
    with np.load(npz, allow_pickle=False) as z:
        return Golden(path, z["images"], z["image_embeddings"], z["text_embeddings"] if "text_embeddings" in z.files else None,
                      z["label_ids"], meta,
                      z["caption_embeddings"].astype(np.float32) if "caption_embeddings" in z.files else None,
                      z["caption_owner"] if "caption_owner" in z.files else None)
