"""Calibration sets: the images a quantizer measures activation ranges on.

A calibration source is one of (see calibration/README.md):

* an image folder (class sub-folders, a ``captions.jsonl``, or plain images);
* a text file with one image path per line (relative to the file; ``#`` comments);
* a ``captions.jsonl`` file.

``num_images`` are sampled deterministically (seeded; stratified by label when labels exist),
decoded and preprocessed by the same code path as verification, and identified by a content
hash that every quantized artifact's manifest records.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.folder import ImageFolder, Item, load_rgb, read_captions, read_folder
from ..data.preprocess import IMAGE_SUFFIXES, Preprocess
from ..errors import InputError
from ..manifest import inside, sha256_file


@dataclass(frozen=True)
class CalibrationSpec:
    source: Path
    num_images: int = 128
    min_images: int = 16
    seed: int = 0
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.min_images <= self.num_images:
            raise ValueError("need 1 <= min_images <= num_images")


@dataclass
class CalibrationSet:
    images: np.ndarray  # (N, H, W, 3) uint8, resized as the model expects
    paths: list[Path]
    labels: list[str | None]
    sha256: str  # identity of the chosen images' bytes, in order, and the preprocessing
    skipped: list[tuple[Path, str]]
    preprocess: Preprocess

    def batches(self, layout: str | None = None, batch_size: int = 1):
        """Normalised float32 batches in the model's layout."""
        pre = self.preprocess if layout is None else Preprocess(self.preprocess.size, self.preprocess.mean,
                                                                  self.preprocess.std, self.preprocess.resize,
                                                                  self.preprocess.crop, layout)
        for i in range(0, len(self.images), batch_size):
            yield pre.normalize(self.images[i : i + batch_size])

    def __len__(self) -> int:
        return len(self.images)


def _read_source(source: Path) -> ImageFolder:
    if not source.exists():
        raise InputError(f"calibration source not found: {source}",
                         hint="set [calibration] path to an image folder, a list of paths, or a captions.jsonl")
    if source.is_dir():
        return read_folder(source)
    if source.name.endswith(".jsonl"):
        items = read_captions(source.parent, source)
        return ImageFolder(source.parent, items, sorted({i.label for i in items if i.label}))
    if source.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{source} is a single image", hint="calibration needs a folder or a list of images")
    items = []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        items.append(Item(inside(source.parent, line, f"{source}:{n}").resolve()))
    if not items:
        raise InputError(f"{source} lists no images", hint="one image path per line")
    return ImageFolder(source.parent, items, [])


def sample_indices(labels: list[str | None], n: int, seed: int) -> list[int]:
    """``n`` indices, seeded; round-robin over labels (stratified) when there are labels."""
    rng = np.random.default_rng(seed)
    if n >= len(labels):
        return list(range(len(labels)))
    if not any(labels):
        return sorted(rng.choice(len(labels), size=n, replace=False).tolist())
    groups: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    queues = {k: list(rng.permutation(v)) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues.values():
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def load_calibration(spec: CalibrationSpec, preprocess: Preprocess) -> CalibrationSet:
    folder = _read_source(spec.source)
    labels = [it.label for it in folder.items]
    indices = sample_indices(labels, spec.num_images, spec.seed)
    if len(indices) < spec.num_images:
        if len(indices) < spec.min_images:
            raise InputError(f"calibration source {spec.source} has {len(indices)} images; at least {spec.min_images} are needed",
                             hint="add images, or lower [calibration] min_images")
        warnings.warn(f"calibration: asked for {spec.num_images} images, {spec.source} has {len(indices)}; using them all",
                      stacklevel=2)
    loaded = load_rgb(folder, preprocess, indices=indices, max_bad_fraction=spec.max_bad_fraction)
    if len(loaded.kept) < spec.min_images:
        raise InputError(f"only {len(loaded.kept)} calibration images could be decoded; at least {spec.min_images} are needed",
                         hint="fix the undecodable files or add images")
    paths = [folder.items[i].path for i in loaded.kept]
    h = hashlib.sha256(repr(preprocess.to_json()).encode())
    for p in paths:
        h.update(sha256_file(p).encode())
    return CalibrationSet(loaded.pixels, paths, [folder.items[i].label for i in loaded.kept], h.hexdigest(),
                          loaded.bad, preprocess)


__all__ = ["CalibrationSet", "CalibrationSpec", "load_calibration", "sample_indices"]
