"""WebDataset tar shards, read as a stream (torch-free).

A shard is a plain ``.tar`` whose members are grouped into samples by key: the member path up
to the first dot of its file name (``00000/000000042.jpg`` and ``00000/000000042.txt`` are one
sample, key ``00000/000000042``), as img2dataset and webdataset write them. Per sample:

* the image: the first member with an image extension (``jpg``, ``jpeg``, ``png``, ``webp``, ...);
* captions: ``txt``, else ``json``'s ``caption`` / ``text`` / ``captions``;
* the label: ``json``'s ``label`` (a string), else ``cls`` (its text).

Shards are named by a brace pattern (``train-{00000..00099}.tar``, ``{a,b}.tar``), several
patterns joined by ``::``, a list of paths, or a folder holding only ``.tar`` files. Each image
member's byte offset in its shard is recorded, so a later epoch can read one sample directly.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .preprocess import IMAGE_SUFFIXES

IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
TEXT_KEYS = ("caption", "text", "captions")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names (zero padding kept), ``{x,y}.tar`` -> two; nested, left to right."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise InputError(f"unbalanced braces in shard pattern {pattern!r}", hint="e.g. train-{00000..00099}.tar")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = _RANGE.fullmatch("{" + body + "}")
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise InputError(f"empty range {{{body}}} in shard pattern {pattern!r}", hint="write {low..high}")
        width = len(m.group(1)) if m.group(1).startswith("0") else 0
        choices = [str(v).zfill(width) for v in range(lo, hi + 1)]
    else:
        choices, depth, cur = [], 0, ""
        for ch in body:  # split on top-level commas
            if ch == "," and depth == 0:
                choices.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        choices.append(cur)
    return [head + a + b for c in choices for a in expand_braces(c) for b in expand_braces(tail)]


def is_shard_spec(spec: str | Path | list | tuple) -> bool:
    """Does ``spec`` name WebDataset shards (a pattern, a list, ``::``, a ``.tar``, or a folder of only ``.tar``)?"""
    if isinstance(spec, list | tuple):
        return True
    s = str(spec)
    if "::" in s or "{" in s or s.endswith(".tar"):
        return True
    p = Path(s)
    if p.is_dir():
        files = [q for q in p.iterdir() if q.is_file() and not q.name.startswith((".", "_"))]
        return any(q.suffix == ".tar" for q in files) and not any(q.suffix.lower() in IMAGE_SUFFIXES for q in files)
    return False


def shard_paths(spec: str | Path | list | tuple, base: Path | None = None) -> list[Path]:
    """The shard files ``spec`` names, in order; :class:`InputError` naming the first one missing."""
    if isinstance(spec, list | tuple):
        names = [str(s) for s in spec]
    elif Path(str(spec)).is_dir():
        names = [str(q) for q in sorted(Path(str(spec)).glob("*.tar")) if not q.name.startswith((".", "_"))]
    else:
        names = [n for part in str(spec).split("::") if part for n in expand_braces(part)]
    paths = [Path(n) if Path(n).is_absolute() or base is None else base / n for n in names]
    if not paths:
        raise InputError(f"no shards in {spec}", hint="name .tar shards, e.g. train-{00000..00099}.tar")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(paths)} shards not found (first: {missing[0]})",
                         hint="check the shard pattern in edgec.toml [data]")
    return paths


@dataclass
class TarSample:
    key: str
    image: bytes | None
    ext: str | None  # image extension
    offset: int  # byte offset of the image member's data in the shard (-1 without image)
    size: int
    captions: tuple[str, ...]
    label: str | None
    error: str | None = None  # why the sample cannot be used (its text is not UTF-8, ...)


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _finish(key: str, parts: dict[str, tuple[bytes, int, int]]) -> TarSample:
    image = next(((ext, parts[ext]) for ext in parts if ext in IMAGE_EXTS), None)
    captions: tuple[str, ...] = ()
    label, error = None, None
    try:
        if "txt" in parts:
            captions = (parts["txt"][0].decode("utf-8").strip(),)
        if "json" in parts:
            meta = json.loads(parts["json"][0].decode("utf-8"))
            if isinstance(meta, dict):
                if not captions:
                    caps = next((meta[k] for k in TEXT_KEYS if k in meta), ())
                    caps = [caps] if isinstance(caps, str) else caps
                    captions = tuple(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else ()
                if isinstance(meta.get("label"), str):
                    label = meta["label"]
        if label is None and "cls" in parts:
            label = parts["cls"][0].decode("utf-8").strip()
    except UnicodeDecodeError:
        error = "its text is not UTF-8"
    except json.JSONDecodeError as exc:
        error = f"its json is not valid ({exc.msg})"
    if image is None:
        return TarSample(key, None, None, -1, 0, captions, label, error or "no image in the sample")
    ext, (data, offset, size) = image
    return TarSample(key, data, ext, offset, size, captions, label, error)


def iter_tar(path: Path) -> Iterator[TarSample]:
    """The samples of one shard, streamed (one sample's members in memory at a time)."""
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:  # uncompressed: image offsets stay valid
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k.rpartition("/")[2].startswith((".", "_")) or not ext:
                    continue
                if k != key and key is not None:
                    yield _finish(key, parts)
                    parts = {}
                key = k
                f = tar.extractfile(member)
                parts[ext] = (f.read() if f else b"", member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"cannot read shard {path}: {exc}", hint="re-create the shard; it is damaged or not a tar") from None
    if key is not None:
        yield _finish(key, parts)


def write_shard(path: Path, samples) -> None:
    """Write ``(key, {ext: bytes})`` samples as one uncompressed tar shard (for tests and benchmarks)."""
    import io
    import os

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def read_member(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


__all__ = ["TarSample", "expand_braces", "is_shard_spec", "iter_tar", "read_member", "shard_paths", "write_shard"]
