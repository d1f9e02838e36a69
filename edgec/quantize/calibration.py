"""Calibration sets: the images a quantizer measures activation ranges on.

A calibration source is one of (see calibration/README.md):

* an image folder (class sub-folders, a ``captions.jsonl``, or plain images);
* a text file with one image path per line (relative to the file; ``#`` comments);
* a ``captions.jsonl`` (or Hugging Face ``metadata.jsonl``) file;
* WebDataset tar shards (a brace pattern such as ``calib-{0000..0003}.tar``, or a folder of ``.tar``).

Every source is read by :mod:`edgec.data.sources`, the readers distillation and the golden set use.

``num_images`` are sampled deterministically (seeded; stratified by label when labels exist; from
shards, a seeded reservoir sample of the stream, holding only the chosen images' bytes),
decoded and preprocessed by the same code path as verification, and identified by a content
hash that every quantized artifact's manifest records.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.preprocess import IMAGE_SUFFIXES, Preprocess
from ..data.sources import FolderSource, Sample, Source, decode_rgb, open_source
from ..errors import InputError
from ..manifest import sha256_file


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


def _read_source(source: Path) -> Source:
    from ..data.shards import is_shard_spec

    if not is_shard_spec(source) and not source.exists():
        raise InputError(f"calibration source not found: {source}",
                         hint="set [calibration] path to an image folder, a list of paths, a captions.jsonl or .tar shards")
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{source} is a single image", hint="calibration needs a folder or a list of images")
    return open_source(source)


def check_source(source: Path) -> None:
    """The calibration source's listing errors (missing, empty, an unreadable path list) before any stage
    runs: nothing is decoded, so a golden set or a student is not made for a build that cannot finish."""
    _read_source(Path(source))


def _reservoir(src: Source, n: int, seed: int) -> list[Sample]:
    """``n`` samples of a stream, each equally likely (seeded), in stream order."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, Sample]] = []
    for i, s in enumerate(src):
        if len(kept) < n:
            kept.append((i, s))
        else:
            j = int(rng.integers(0, i + 1))
            if j < n:
                kept[j] = (i, s)
    return [s for _, s in sorted(kept, key=lambda t: t[0])]


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
    src = _read_source(spec.source)
    if isinstance(src, FolderSource):
        items = src.folder.items
        chosen = [Sample(src.folder.key(i), (0, i, 0), items[i].label, items[i].captions, path=items[i].path)
                  for i in sample_indices([it.label for it in items], spec.num_images, spec.seed)]
    else:
        chosen = _reservoir(src, spec.num_images, spec.seed)
    if len(chosen) < spec.num_images:
        if len(chosen) < spec.min_images:
            raise InputError(f"calibration source {spec.source} has {len(chosen)} images; at least {spec.min_images} are needed",
                             hint="add images, or lower [calibration] min_images")
        warnings.warn(f"calibration: asked for {spec.num_images} images, {spec.source} has {len(chosen)}; using them all",
                      stacklevel=2)
    arrays, kept, bad = [], [], []
    for s in chosen:
        try:
            if s.error:
                raise InputError(s.error)
            arrays.append(decode_rgb(s.data if s.data is not None else s.path, s.key, preprocess))
            kept.append(s)
        except InputError as exc:
            bad.append((s.path or Path(s.key), exc.message))
    if chosen and len(bad) > spec.max_bad_fraction * len(chosen):
        raise InputError(f"{len(bad)} of {len(chosen)} images in {spec.source} could not be decoded (first: {bad[0][1]})",
                         hint=f"fix or remove them; up to {spec.max_bad_fraction:.0%} are skipped")
    if len(kept) < spec.min_images:
        raise InputError(f"only {len(kept)} calibration images could be decoded; at least {spec.min_images} are needed",
                         hint="fix the undecodable files or add images")
    h = hashlib.sha256(repr(preprocess.to_json()).encode())
    for s in kept:
        h.update((sha256_file(s.path) if s.data is None else hashlib.sha256(s.data).hexdigest()).encode())
    return CalibrationSet(np.stack(arrays), [s.path or Path(s.key) for s in kept], [s.label for s in kept], h.hexdigest(),
                          bad, preprocess)


__all__ = ["CalibrationSet", "CalibrationSpec", "load_calibration", "sample_indices"]
