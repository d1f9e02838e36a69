"""Training data for distillation: student pixels and the teacher's targets, cached on disk.

The teacher runs once per (teacher, image folder, preprocessing, prompts): its embeddings of
the un-augmented images, of every caption and of the label prompts are stored in one ``.npz``
under the cache folder, keyed by the hash of those inputs. Later epochs and later runs read it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.folder import ImageFolder, load_rgb
from ..data.preprocess import Preprocess
from ..manifest import atomic_write_bytes, sha256_file, sha256_path, sha256_tree

CACHE_VERSION = 1


@dataclass
class TeacherTargets:
    image: np.ndarray  # (N, D) normalised teacher embeddings of the kept images
    kept: list[int]  # folder item index of each row
    captions: np.ndarray | None  # (M, D) normalised embeddings of the distinct captions
    caption_index: list[list[int]]  # per kept row, indices into ``captions``
    class_text: np.ndarray | None  # (C, D) normalised label-prompt embeddings
    labels: list[str]
    label_ids: np.ndarray  # (N,) class index per kept row, -1 when unlabelled
    bad: int  # undecodable images skipped
    cached: bool  # read from the cache rather than computed


def source_identity(path: str | Path) -> str:
    """A hash that changes when the model at ``path`` changes (recorded weights sha256, else the files')."""
    src = Path(path)
    cfg = src / "edgec_model.json"
    if cfg.is_file():
        sha = json.loads(cfg.read_text()).get("weights_sha256")
        if sha:
            return sha
    return sha256_path(src)


def teacher_identity(model) -> str:
    """A hash that changes when the teacher's weights change."""
    return source_identity(model.source)


def folder_identity(folder: ImageFolder) -> str:
    return sha256_tree(folder.root)


def _cache_key(teacher_id: str, folder_id: str, preprocess: Preprocess, prompts: list[str]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "teacher": teacher_id, "folder": folder_id,
                       "preprocess": preprocess.to_json(), "prompts": prompts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def teacher_targets(model, folder: ImageFolder, *, prompts: list[str], cache_dir: Path | None,
                    max_bad_fraction: float = 0.05, batch_size: int = 256, folder_id: str | None = None) -> TeacherTargets:
    from ..models.zeroshot import class_text_embeddings

    key = _cache_key(teacher_identity(model), folder_id or folder_identity(folder), model.preprocess, prompts)
    path = cache_dir / f"teacher-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return TeacherTargets(
                image=z["image"], kept=meta["kept"],
                captions=z["captions"] if "captions" in z.files else None, caption_index=meta["caption_index"],
                class_text=z["class_text"] if "class_text" in z.files else None, labels=meta["labels"],
                label_ids=z["label_ids"], bad=meta["bad"], cached=True)

    loaded = load_rgb(folder, model.preprocess, max_bad_fraction=max_bad_fraction)
    image = model.encode_image(model.preprocess.normalize(loaded.pixels), batch_size=batch_size).numpy()
    items = [folder.items[i] for i in loaded.kept]
    distinct = list(dict.fromkeys(c for it in items for c in it.captions))
    captions, caption_index = None, [[] for _ in items]
    if distinct and model.text_encoder is not None and model.tokenizer is not None:
        captions = model.encode_text(distinct, batch_size=batch_size).numpy()
        pos = {c: i for i, c in enumerate(distinct)}
        caption_index = [[pos[c] for c in it.captions] for it in items]
    class_text = None
    if folder.labels and model.text_encoder is not None and model.tokenizer is not None:
        class_text = class_text_embeddings(model, folder.labels, prompts).numpy()
    label_ids = folder.label_ids()[loaded.kept]
    targets = TeacherTargets(image.astype(np.float32), loaded.kept, captions, caption_index, class_text,
                             list(folder.labels), label_ids, len(loaded.bad), cached=False)
    if path is not None:
        arrays = {"image": targets.image, "label_ids": label_ids}
        if captions is not None:
            arrays["captions"] = captions.astype(np.float32)
        if class_text is not None:
            arrays["class_text"] = class_text.astype(np.float32)
        meta = {"kept": targets.kept, "caption_index": caption_index, "labels": targets.labels, "bad": targets.bad}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write_bytes(path, buf.getvalue())
    return targets


__all__ = ["TeacherTargets", "teacher_targets", "teacher_identity", "folder_identity", "sha256_file"]
