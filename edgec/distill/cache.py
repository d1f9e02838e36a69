"""The teacher's targets as a chunked, memory-mapped cache on disk.

The teacher runs once per (teacher weights, image set, preprocessing, prompts, views): its
embeddings of every image (``views`` of them per image), of every caption and of the label
prompts are stored under ``<cache>/teacher-<key>/``, one chunk per part of the source (a shard,
or 1,024 files of a folder)::

    part-00007.image.npy   (n, views, D) float16, zeros for undecodable samples
    part-00007.text.npy    (captions, D) float16, each sample's captions in order
    part-00007.json        keys, ok flags, labels, caption offsets and ids, refs, the bad samples and why
    class_text.npy         (C, D) float32 label-prompt embeddings
    final.json             totals, labels, undecodable counts per part: the cache is complete

A chunk counts once its ``.json`` is written (last, atomically), so a run killed at any point
resumes at the first missing chunk. Under torch.distributed rank ``r`` of ``w`` computes chunks
``r, r + w, ...``; a chunk's contents depend only on its part, never on the world size. Training
reads the chunks memory-mapped: memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.loader import PartBatch, PartStream, stream_loader
from ..data.preprocess import Preprocess
from ..data.sources import Source, caption_id
from ..errors import InputError
from ..manifest import atomic_write_json, read_json

CACHE_VERSION = 2
FINAL = "final.json"


def cache_key(teacher_id: str, source_id: str, preprocess: Preprocess, prompts: list[str], *, views: int = 1,
              seed: int = 0, augment: str = "none", part_size: int | None = None) -> str:
    record = {"v": CACHE_VERSION, "teacher": teacher_id, "source": source_id, "preprocess": preprocess.to_json(),
              "prompts": list(prompts), "views": views, "part_size": part_size}
    if views > 1:  # the augmented views are drawn from the seed
        record.update(seed=seed, augment=augment)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _part_stem(folder: Path, part: int) -> Path:
    return folder / f"part-{part:05d}"


class _Embedder:
    """The teacher's image and text towers on its device (bf16 autocast and channels-last on CUDA)."""

    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device = model, device
        pre = model.preprocess
        self.mean = torch.tensor(pre.mean, device=device).view(1, 1, 1, 3) * 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, 1, 1, 3) * 255.0
        self.nchw = pre.layout == "NCHW"
        self.cuda = device.type == "cuda"
        if self.cuda:
            model.image_encoder.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def images(self, rgb: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, D) normalised float32."""
        x = (torch.from_numpy(rgb).to(self.device).float() - self.mean) / self.std
        if self.nchw:
            x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False):
            emb = self.model.image_encoder(x)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(texts).float().numpy()


@dataclass
class _Embedded:
    """One loader batch after the teacher: embeddings only (the pixels are dropped at once)."""

    batch: PartBatch  # with ``pixels`` emptied
    image: np.ndarray  # (ok rows, views, D) float16
    texts: list[np.ndarray]  # per row, (its captions, D) float16


def _embed(b: PartBatch, emb: _Embedder, views: int, dim: int, with_text: bool) -> _Embedded:
    image = np.zeros((0, views, dim), np.float16)
    if b.ok.any():
        flat = emb.images(b.pixels.reshape(-1, *b.pixels.shape[2:]))
        image = flat.reshape(int(b.ok.sum()), views, dim).astype(np.float16)
    texts = [np.zeros((0, dim), np.float16)] * len(b.keys)
    if with_text:
        rows_caps = [caps if good else () for caps, good in zip(b.captions, b.ok)]
        distinct = list(dict.fromkeys(c for caps in rows_caps for c in caps))
        if distinct:
            enc = emb.texts(distinct).astype(np.float16)
            pos = {c: i for i, c in enumerate(distinct)}
            texts = [enc[[pos[c] for c in caps]] if caps else np.zeros((0, dim), np.float16) for caps in rows_caps]
    b.captions = [caps if good else () for caps, good in zip(b.captions, b.ok)]
    b.pixels = b.pixels[:0]
    return _Embedded(b, image, texts)


def _write_part(folder: Path, part: int, name: str, done: list[_Embedded], views: int, dim: int) -> None:
    done.sort(key=lambda e: e.batch.start)
    keys = [k for e in done for k in e.batch.keys]
    image = np.zeros((len(keys), views, dim), np.float16)
    texts, cap_start, cap_ids = [], [0], []
    row = 0
    for e in done:
        image[row + np.flatnonzero(e.batch.ok)] = e.image
        for caps, t in zip(e.batch.captions, e.texts):
            texts.append(t)
            cap_ids.extend(caption_id(c) for c in caps)
            cap_start.append(cap_start[-1] + len(caps))
        row += len(e.batch.keys)
    stem = _part_stem(folder, part)
    _save_npy(stem.with_suffix(".image.npy"), image)
    _save_npy(stem.with_suffix(".text.npy"), np.concatenate(texts) if texts else np.zeros((0, dim), np.float16))
    atomic_write_json(stem.with_suffix(".json"), {
        "part": part, "name": name, "n": len(keys), "keys": keys,
        "ok": np.concatenate([e.batch.ok for e in done]).astype(int).tolist() if done else [],
        "labels": [lab for e in done for lab in e.batch.labels], "cap_start": cap_start, "cap_ids": cap_ids,
        "refs": [list(r) for e in done for r in e.batch.refs], "bad": [list(x) for e in done for x in e.batch.errors]})


@dataclass
class CacheResult:
    folder: Path
    computed: int  # chunks computed by this process in this run
    cached: int  # chunks found complete
    seconds: float


def build_teacher_cache(model, source: Source, *, prompts: list[str], folder: Path, views: int = 1, seed: int = 0,
                        augment: str = "none", workers: int = 0, batch_size: int = 64, device: torch.device | None = None,
                        rank: int = 0, world: int = 1, progress: bool = False) -> CacheResult:
    """Compute the chunks of ``source`` this rank owns that are not on disk yet, then (rank 0) finish the cache."""
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    if (folder / FINAL).is_file():
        return CacheResult(folder, 0, source.num_parts(), time.time() - t0)
    mine = [p for p in range(source.num_parts()) if p % world == rank]
    todo = [p for p in mine if not _part_stem(folder, p).with_suffix(".json").is_file()]
    with_text = model.text_encoder is not None and model.tokenizer is not None
    emb = _Embedder(model, device)
    dim = int(model.embed_dim)
    if todo:
        stream = PartStream(source, model.preprocess, todo, batch_size=batch_size, views=views, seed=seed, augment=augment)
        bar = _bar(progress, f"teacher outputs ({source.kind}, {len(todo)} chunks)", len(todo))
        pending: dict[int, list[_Embedded]] = {}
        try:
            for batch in stream_loader(stream, workers):
                pending.setdefault(batch.part, []).append(_embed(batch, emb, views, dim, with_text))
                if batch.last:
                    _write_part(folder, batch.part, source.part_name(batch.part), pending.pop(batch.part), views, dim)
                    if bar is not None:
                        bar.advance()
        finally:
            if bar is not None:
                bar.close()
    _barrier(world)
    if rank == 0 and not (folder / FINAL).is_file():
        _finish(model, source, folder, prompts, with_text)
    _barrier(world)
    return CacheResult(folder, len(todo), len(mine) - len(todo), time.time() - t0)


def _finish(model, source: Source, folder: Path, prompts: list[str], with_text: bool) -> None:
    from ..models.zeroshot import class_text_embeddings

    total, bad, per_part, found, first = 0, 0, {}, set(), None
    for p in range(source.num_parts()):
        meta = read_json(_part_stem(folder, p).with_suffix(".json"))
        if meta is None:
            raise InputError(f"the teacher cache in {folder} misses chunk {p}", hint="run again; it resumes")
        total += meta["n"]
        bad += len(meta["bad"])
        if meta["bad"]:
            per_part[meta["name"]] = len(meta["bad"])
            first = first or meta["bad"][0][1]
        found.update(lab for lab, good in zip(meta["labels"], meta["ok"]) if lab is not None and good)
    labels = list(source.labels) if source.labels is not None else sorted(found)
    if labels and with_text:
        ct = class_text_embeddings(model, labels, prompts).float().numpy()
        _save_npy(folder / "class_text.npy", ct)
    atomic_write_json(folder / FINAL, {"version": CACHE_VERSION, "parts": source.num_parts(), "samples": total,
                                       "bad": bad, "bad_per_part": per_part, "first_bad": first, "labels": labels,
                                       "class_text": bool(labels and with_text)})


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


class _Bar:
    def __init__(self, text: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.progress.add_task(text, total=total)
        self.progress.start()

    def advance(self) -> None:
        self.progress.advance(self.task)

    def close(self) -> None:
        self.progress.stop()


def _bar(enabled: bool, text: str, total: int) -> _Bar | None:
    return _Bar(text, total) if enabled else None


class CacheRows:
    """The usable (decodable) rows of a finished cache, memory-mapped: per row its place in the source,
    label id and captions; :meth:`teacher` and :meth:`caption` read embeddings for a batch of rows."""

    def __init__(self, folder: Path, max_open: int = 256) -> None:
        self.folder, self.max_open = folder, max_open
        final = read_json(folder / FINAL)
        if final is None:
            raise InputError(f"the teacher cache in {folder} is not finished", hint="run again; it resumes")
        self.final = final
        self.labels: list[str] = final["labels"]
        index = {name: i for i, name in enumerate(self.labels)}
        pos, refs, label_ids, cap_lo, cap_n = [], [], [], [], []
        self.cap_ids: list[np.ndarray] = []
        self.part_names: list[str] = []
        for p in range(final["parts"]):
            meta = read_json(_part_stem(folder, p).with_suffix(".json"))
            ok = np.asarray(meta["ok"], bool)
            keep = np.flatnonzero(ok)
            starts = np.asarray(meta["cap_start"], np.int64)
            pos.append(np.stack([np.full(len(keep), p), keep], 1))
            refs.append(np.asarray(meta["refs"], np.int64).reshape(-1, 3)[keep])
            label_ids.append(np.array([index.get(meta["labels"][i], -1) if meta["labels"][i] is not None else -1
                                       for i in keep], np.int64))
            cap_lo.append(starts[keep])
            cap_n.append(starts[keep + 1] - starts[keep])
            self.cap_ids.append(np.asarray(meta["cap_ids"], np.int64))
            self.part_names.append(meta["name"])
        self.positions = np.concatenate(pos).astype(np.int64) if pos else np.zeros((0, 2), np.int64)
        self.refs = np.concatenate(refs) if refs else np.zeros((0, 3), np.int64)
        self.label_ids = np.concatenate(label_ids) if label_ids else np.zeros(0, np.int64)
        self.cap_lo = np.concatenate(cap_lo) if cap_lo else np.zeros(0, np.int64)
        self.cap_n = np.concatenate(cap_n) if cap_n else np.zeros(0, np.int64)
        ct = folder / "class_text.npy"
        self.class_text = np.load(ct) if final.get("class_text") and ct.is_file() else None
        self._open: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def has_captions(self) -> bool:
        return bool(len(self.cap_n)) and bool((self.cap_n > 0).any())

    @property
    def views(self) -> int:
        return int(self._array(0, "image").shape[1]) if len(self.part_names) else 1

    def _array(self, part: int, kind: str) -> np.ndarray:
        key = (part, kind)
        arr = self._open.get(key)
        if arr is None:
            if len(self._open) >= self.max_open:
                self._open.clear()
            arr = self._open[key] = np.load(_part_stem(self.folder, part).with_suffix(f".{kind}.npy"), mmap_mode="r")
        return arr

    def teacher(self, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), D) float32 teacher image embeddings (view ``views[i]`` of row ``rows[i]``)."""
        out = []
        for i, r in enumerate(rows):
            part, pos = self.positions[r]
            out.append(self._array(int(part), "image")[pos, 0 if views is None else int(views[i])])
        return np.asarray(out, np.float32)

    def caption(self, rows: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A caption per row (the ``draws[i] % count``-th): its teacher embedding and text id. A row without
        captions gets its own image embedding and an id of its own."""
        embs, ids = [], []
        for r, d in zip(rows, draws):
            part, _ = self.positions[r]
            n = int(self.cap_n[r])
            if n == 0:
                embs.append(self.teacher(np.array([r]))[0])
                ids.append(-1 - int(r))
                continue
            j = int(self.cap_lo[r]) + int(d) % n
            embs.append(np.asarray(self._array(int(part), "text")[j], np.float32))
            ids.append(int(self.cap_ids[int(part)][j]))
        return np.asarray(embs, np.float32), np.asarray(ids, np.int64)


__all__ = ["CacheResult", "CacheRows", "build_teacher_cache", "cache_key"]
