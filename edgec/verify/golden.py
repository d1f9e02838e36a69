"""The golden set: the full-precision teacher's outputs on the eval images (build/golden/).

``images.npy`` holds the eval images decoded and resized exactly as the teacher saw them
(uint8 RGB (N, H, W, 3): compact, and every artifact applies its own normalisation and layout
from its manifest); it is memory-mapped when read, so verify streams it instead of loading it.
``golden.npz`` holds the teacher's normalised image embeddings, the normalised text embeddings
of the label prompts, and label ids; ``golden.json`` holds labels, captions, prompts,
preprocessing, the device it was computed on and hashes. Reading it needs numpy only. (Sets
written before ``images.npy`` existed keep their images inside ``golden.npz`` and still load.)

The eval set is read by the readers distillation uses (folders, captions.jsonl, metadata.jsonl,
WebDataset shards), through a DataLoader; images are written to disk as they are decoded.
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
GOLDEN_IMAGES = "images.npy"
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
        from ..distill import resolve_data

        return cls(teacher=dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path))), eval=resolve_data(cfg, cfg.data.eval),
                   out=out or cfg.resolve(cfg.targets.out) / "golden", prompts=tuple(cfg.data.prompts),
                   captions_file=cfg.data.captions, max_bad_fraction=cfg.data.max_bad_fraction, device=device)


@dataclass
class Golden:
    """A loaded golden set (numpy only)."""

    root: Path
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    image_embeddings: np.ndarray  # (N, D) float32, normalised
    text_embeddings: np.ndarray | None  # (C, D) float32, normalised
    label_ids: np.ndarray  # (N,) int, -1 unlabelled
    meta: dict
    caption_embeddings: np.ndarray | None = None  # (M, D) teacher embeddings of every caption
    caption_owner: np.ndarray | None = None  # (M,) index of the image each caption describes

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]


def _write_npy(path: Path, raw: Path, shape: tuple[int, ...]) -> None:
    """``raw`` (C-order uint8 bytes) as a .npy file of ``shape``, copied in blocks."""
    import shutil

    with open(path, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
        shutil.copyfileobj(src, out, 1 << 22)


def build_golden(config: GoldenConfig, *, log=print, workers: int | None = None) -> Path:
    import torch

    from ..data.loader import PartStream, default_workers, ordered_parts, stream_loader
    from ..data.sources import open_source
    from ..distill.data import teacher_identity
    from ..models import load_model
    from ..models.zeroshot import class_text_embeddings

    t0 = time.time()
    teacher = load_model(config.teacher.path, config.teacher.kind, arch=config.teacher.arch,
                         trust_pickle=config.teacher.trust_pickle)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device)
    teacher.to(device)
    device_name = f"cuda:{torch.cuda.get_device_name(torch.device(device))}" if device.startswith("cuda") else "cpu"
    source = open_source(config.eval, config.captions_file)
    pre = teacher.preprocess
    h, w = pre.size
    stream = PartStream(source, pre, list(range(source.num_parts())))
    loader = stream_loader(stream, default_workers() if workers is None else workers)
    keys, labels, captions, embs, bad, total = [], [], [], [], [], 0
    with_text = teacher.text_encoder is not None and teacher.tokenizer is not None
    with staged_dir(config.out) as tmp:
        raw = tmp / "images.u8"
        with open(raw, "wb") as f, torch.inference_mode():
            for _, batches in ordered_parts(loader, stream.parts):
                for b in sorted(batches, key=lambda b: b.start):
                    total += len(b.keys)
                    bad += b.errors
                    good = np.flatnonzero(b.ok)
                    if not len(good):
                        continue
                    rgb = b.pixels[:, 0]
                    f.write(np.ascontiguousarray(rgb).tobytes())
                    embs.append(teacher.encode_image(pre.normalize(rgb)).numpy().astype(np.float32))
                    keys += [b.keys[i] for i in good]
                    labels += [b.labels[i] for i in good]
                    captions += [list(b.captions[i]) for i in good]
        if total and len(bad) > config.max_bad_fraction * total:
            raise InputError(f"{len(bad)} of {total} images in {source.name} could not be decoded (first: {bad[0][1]})",
                             hint=f"fix or remove them; up to {config.max_bad_fraction:.0%} are skipped")
        if not keys:
            raise InputError(f"no decodable images in {source.name}")
        _write_npy(tmp / GOLDEN_IMAGES, raw, (len(keys), h, w, 3))
        raw.unlink()
        names = list(source.labels) if source.labels is not None else sorted({x for x in labels if x is not None})
        index = {n: i for i, n in enumerate(names)}
        image = np.concatenate(embs)
        arrays = {"image_embeddings": image,
                  "label_ids": np.array([index[x] if x is not None else -1 for x in labels], np.int64)}
        has_captions = any(captions)
        with torch.inference_mode():
            if names and with_text:
                arrays["text_embeddings"] = class_text_embeddings(teacher, names, list(config.prompts)).numpy().astype(np.float32)
            if has_captions and with_text:
                arrays["caption_embeddings"] = teacher.encode_text([c for cs in captions for c in cs]).numpy().astype(np.float16)
                arrays["caption_owner"] = np.asarray([i for i, cs in enumerate(captions) for _ in cs], np.int32)
        for name, arr in arrays.items():  # a golden set of NaN would make every gate meaningless
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InputError(f"the teacher's {name.replace('_', ' ')} on {source.name} hold NaN or inf "
                                 f"({int((~np.isfinite(arr)).sum())} values)",
                                 hint="the model overflows on these inputs (float16 weights?) or is corrupt; check it "
                                      "with 'edgec inspect'")
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(tmp / GOLDEN_NPZ, buf.getvalue())
        meta = {
            "schema": SCHEMA,
            "teacher": {"name": teacher.name, "kind": teacher.kind, "sha256": teacher_identity(teacher)},
            "eval": {"path": str(config.eval), "kind": source.kind, "sha256": source.identity(), "images": len(keys),
                     "skipped": [k for k, _ in bad]},
            "files": keys,
            "labels": names,
            "captions": captions if has_captions else None,
            "prompts": list(config.prompts),
            "captions_file": config.captions_file,
            "max_bad_fraction": config.max_bad_fraction,
            "preprocess": pre.to_json(),
            "embedding_dim": int(image.shape[1]),
            "logit_scale": teacher.logit_scale,
            "device": device_name,
            "host": platform.node(),
            "seconds": round(time.time() - t0, 1),
            "npz_sha256": sha256_file(tmp / GOLDEN_NPZ),
            "images_file": GOLDEN_IMAGES,
            "images_sha256": sha256_file(tmp / GOLDEN_IMAGES),
        }
        atomic_write_json(tmp / GOLDEN_JSON, meta)
    log(f"golden: {len(keys)} images, teacher {teacher.name} on {device_name}" + (f", {len(bad)} undecodable skipped" if bad else ""))
    return config.out


def load_golden(path: str | Path) -> Golden:
    path = Path(path)
    meta_path = path / GOLDEN_JSON
    if not meta_path.is_file():
        raise InputError(f"no golden set in {path} ({GOLDEN_JSON} missing)", hint="create it with 'edgec golden'")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path} is not valid JSON ({exc.msg})", hint="run 'edgec golden' again") from None
    except UnicodeDecodeError:
        raise InputError(f"{meta_path} is not UTF-8 text", hint="run 'edgec golden' again") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path} is a JSON {type(meta).__name__}, not the golden set's record",
                         hint="run 'edgec golden' again")
    npz = path / GOLDEN_NPZ
    if not npz.is_file() or sha256_file(npz) != meta.get("npz_sha256"):
        raise InputError(f"{npz} is missing or does not match the sha256 in {GOLDEN_JSON}", hint="run 'edgec golden' again")
    images = None
    if meta.get("images_file"):
        ipath = path / meta["images_file"]
        if Path(meta["images_file"]).name != meta["images_file"] or not ipath.is_file() \
                or sha256_file(ipath) != meta.get("images_sha256"):
            raise InputError(f"{ipath} is missing or does not match the sha256 in {GOLDEN_JSON}",
                             hint="run 'edgec golden' again")
        images = np.load(ipath, mmap_mode="r", allow_pickle=False)
    with np.load(npz, allow_pickle=False) as z:
        missing = [k for k in ("image_embeddings", "label_ids", *(() if images is not None else ("images",)))
                   if k not in z.files]
        if missing:
            raise InputError(f"{npz} lacks {', '.join(missing)}", hint="run 'edgec golden' again")
        if images is None:
            images = z["images"]
        return Golden(path, images, z["image_embeddings"], z["text_embeddings"] if "text_embeddings" in z.files else None,
                      z["label_ids"], meta,
                      z["caption_embeddings"].astype(np.float32) if "caption_embeddings" in z.files else None,
                      z["caption_owner"] if "caption_owner" in z.files else None)
