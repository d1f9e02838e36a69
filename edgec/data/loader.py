"""Sources streamed through a torch ``DataLoader`` with worker processes.

* :class:`PartStream` (a pass over a source: golden set, teacher cache): process ``rank`` of
  ``world`` takes parts ``rank, rank + world, ...``, and DataLoader worker ``j`` of ``n`` takes
  every n-th of those, so every part is read by exactly one worker of one process. A worker
  decodes a part's samples at the consumer's size and yields them in batches; undecodable
  samples come back marked (with the reason) instead of pixels, so they are counted per part.
* :class:`RowImages` (training): random access by row through each sample's ``ref``, decoded at
  the student's size once per epoch, in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..errors import InputError
from .preprocess import Preprocess, load_image
from .sources import Source, decode_rgb, view_box


def default_workers() -> int:
    """Loader worker processes when not configured: the cores left after the main process, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@dataclass
class PartBatch:
    """Up to ``batch_size`` consecutive samples of one part (``pixels`` rows only for the decodable ones)."""

    part: int
    start: int  # position of the first sample in its part
    keys: list[str]
    ok: np.ndarray  # (n,) bool
    pixels: np.ndarray  # (ok.sum(), views, H, W, 3) uint8
    labels: list[str | None]
    captions: list[tuple[str, ...]]
    refs: list[tuple[int, int, int]]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of the undecodable ones
    last: bool = False  # the part's final batch (it may hold no sample)


def _stream_worker_init(_: int) -> None:
    torch.set_num_threads(1)


class PartStream(IterableDataset):
    def __init__(self, source: Source, preprocess: Preprocess, parts: list[int], *, batch_size: int = 64,
                 views: int = 1, seed: int = 0, augment: str = "none") -> None:
        self.source, self.preprocess, self.parts = source, preprocess, parts
        self.batch_size, self.views, self.seed, self.augment = batch_size, views, seed, augment

    def my_parts(self) -> list[int]:
        info = get_worker_info()
        return self.parts if info is None else self.parts[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[PartBatch]:
        for part in self.my_parts():
            yield from self.part_batches(part)

    def part_batches(self, part: int) -> Iterator[PartBatch]:
        rows: list = []
        start = 0
        pos = 0
        for s in self.source.samples(part):
            rows.append((pos, s, self._decode(part, pos, s)))
            pos += 1
            if len(rows) == self.batch_size:
                yield self._batch(part, start, rows, last=False)
                start, rows = pos, []
        yield self._batch(part, start, rows, last=True)

    def _decode(self, part: int, pos: int, s) -> np.ndarray | str:
        if s.error:
            return s.error
        try:
            img = load_image(s.data if s.data is not None else s.path, name=s.key)
            return np.stack([decode_rgb(None, s.key, self.preprocess, view_box(self.seed, part, pos, v, self.augment), image=img)
                             for v in range(self.views)])
        except InputError as exc:
            return exc.message

    def _batch(self, part: int, start: int, rows: list, *, last: bool) -> PartBatch:
        ok = np.array([not isinstance(r[2], str) for r in rows], bool)
        h, w = self.preprocess.size
        pixels = np.stack([r[2] for r in rows if not isinstance(r[2], str)]) if ok.any() else \
            np.zeros((0, self.views, h, w, 3), np.uint8)
        return PartBatch(part, start, [r[1].key for r in rows], ok, pixels, [r[1].label for r in rows],
                         [r[1].captions for r in rows], [r[1].ref for r in rows],
                         [(r[1].key, r[2]) for r in rows if isinstance(r[2], str)], last)


def stream_loader(stream: PartStream, workers: int) -> DataLoader:
    """A DataLoader over a :class:`PartStream` (batches are made by the workers)."""
    workers = min(workers, len(stream.parts))
    return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_stream_worker_init,
                      prefetch_factor=2 if workers else None)


def ordered_parts(batches, order: list[int]) -> Iterator[tuple[int, list[PartBatch]]]:
    """(part, its batches) for each part of ``order``, in that order, from interleaved :class:`PartBatch` es;
    only parts that finished ahead of their turn are held."""
    pending: dict[int, list[PartBatch]] = {}
    done: dict[int, list[PartBatch]] = {}
    i = 0
    for b in batches:
        pending.setdefault(b.part, []).append(b)
        if b.last:
            done[b.part] = pending.pop(b.part)
        while i < len(order) and order[i] in done:
            yield order[i], done.pop(order[i])
            i += 1


class RowImages(Dataset):
    """Training images by code ``row * views + view``: decoded at ``preprocess.size`` (uint8 CHW)."""

    def __init__(self, source: Source, refs: np.ndarray, positions: np.ndarray, preprocess: Preprocess, *,
                 views: int = 1, seed: int = 0, augment: str = "none") -> None:
        self.source, self.refs, self.positions, self.preprocess = source, refs, positions, preprocess
        self.views, self.seed, self.augment = views, seed, augment

    def __len__(self) -> int:
        return len(self.refs) * self.views

    def __getitem__(self, code: int):
        row, view = divmod(int(code), self.views)
        ref = tuple(int(v) for v in self.refs[row])
        part, pos = int(self.positions[row, 0]), int(self.positions[row, 1])
        box = view_box(self.seed, part, pos, view, self.augment)
        try:
            rgb = decode_rgb(self.source.read(ref), f"{self.source.part_name(part)} #{pos}", self.preprocess, box)
        except InputError as exc:  # the file changed since the teacher pass read it
            raise InputError(f"{exc.message}; it decoded when the teacher's outputs were cached",
                             hint="the data changed during the run; run again") from None
        return int(code), torch.from_numpy(rgb).permute(2, 0, 1)


def _row_worker_init(_: int) -> None:
    torch.set_num_threads(1)


def row_loader(dataset: RowImages, batch_sampler, workers: int, *, pin: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, worker_init_fn=_row_worker_init,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None, pin_memory=pin)


__all__ = ["PartBatch", "PartStream", "RowImages", "default_workers", "ordered_parts", "row_loader", "stream_loader"]
