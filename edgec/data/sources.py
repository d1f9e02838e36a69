"""Every image set edgec reads, behind one interface (torch-free).

``open_source(spec)`` reads what a ``[data]`` or ``[calibration]`` path names:

* an image folder (``captions.jsonl``, Hugging Face ``metadata.jsonl``, class sub-folders or plain
  images; see :mod:`edgec.data.folder`);
* a ``captions.jsonl`` / ``metadata.jsonl`` file, or a text file with one image path per line;
* WebDataset tar shards: a brace pattern, ``::``-joined patterns, a list, or a folder of ``.tar``
  files (see :mod:`edgec.data.shards`).

A source is a sequence of *parts* (a shard, or a fixed-size run of a folder's files) whose
samples are streamed: only paths, labels and captions are held, never pixels. Every consumer
(golden set, calibration, teacher cache, training) decodes through :func:`decode_rgb` at the
size it needs. A sample's ``ref`` is enough to read its image again (a folder item index, or a
shard's byte offset), so a training epoch can visit samples in any order.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..manifest import sha256_file, sha256_tree
from .folder import HF_METADATA, ImageFolder, read_captions, read_folder, read_path_list
from .preprocess import IMAGE_SUFFIXES, Preprocess, load_image
from .shards import is_shard_spec, iter_tar, read_member, shard_paths

FOLDER_PART = 1024  # files per part of a folder: the unit of the teacher cache's chunks


@dataclass
class Sample:
    key: str  # unique in the source: a path relative to the folder, or "<shard>/<key>"
    ref: tuple[int, int, int]  # (part, item index or byte offset, byte size): read it again with Source.read
    label: str | None
    captions: tuple[str, ...]
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None  # why it cannot be used, when known before decoding


class Source(abc.ABC):
    kind = "source"
    name: str  # for messages
    labels: list[str] | None = None  # known before reading (folders); None: found while streaming (shards)

    @abc.abstractmethod
    def num_parts(self) -> int:
        ...

    @abc.abstractmethod
    def part_name(self, i: int) -> str:
        ...

    @abc.abstractmethod
    def samples(self, i: int) -> Iterator[Sample]:
        ...

    @abc.abstractmethod
    def read(self, ref: tuple[int, int, int]) -> Path | bytes:
        ...

    @abc.abstractmethod
    def identity(self) -> str:
        ...

    def describe(self) -> str:
        return f"{self.kind} {self.name}"

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.num_parts()):
            yield from self.samples(i)


class FolderSource(Source):
    kind = "folder"

    def __init__(self, folder: ImageFolder, *, listing: Path | None = None, part_size: int = FOLDER_PART) -> None:
        self.folder, self.listing, self.part_size = folder, listing, part_size
        self.name = str(listing or folder.root)
        self.labels = list(folder.labels)

    def __len__(self) -> int:
        return len(self.folder)

    def num_parts(self) -> int:
        return max(1, -(-len(self.folder) // self.part_size))

    def part_name(self, i: int) -> str:
        lo = i * self.part_size
        return f"files {lo}-{min(len(self.folder), lo + self.part_size) - 1}"

    def samples(self, i: int) -> Iterator[Sample]:
        for j in range(i * self.part_size, min(len(self.folder), (i + 1) * self.part_size)):
            it = self.folder.items[j]
            yield Sample(self.folder.key(j), (i, j, 0), it.label, it.captions, path=it.path)

    def read(self, ref: tuple[int, int, int]) -> Path:
        return self.folder.items[ref[1]].path

    def identity(self) -> str:
        if self.listing is None:
            return sha256_tree(self.folder.root)  # the whole folder, as the distill stage key always had it
        h = hashlib.sha256(sha256_file(self.listing).encode())
        for it in self.folder.items:
            h.update(it.path.as_posix().encode() + b"\0" + sha256_file(it.path).encode())
        return h.hexdigest()


class ShardSource(Source):
    kind = "shards"

    def __init__(self, paths: list[Path], spec: str | None = None) -> None:
        self.paths = paths
        self.name = spec or (str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)")
        self.labels = None

    def num_parts(self) -> int:
        return len(self.paths)

    def part_name(self, i: int) -> str:
        return self.paths[i].name

    def samples(self, i: int) -> Iterator[Sample]:
        name = self.paths[i].name
        for s in iter_tar(self.paths[i]):
            yield Sample(f"{name}/{s.key}", (i, s.offset, s.size), s.label, s.captions, data=s.image, error=s.error)

    def read(self, ref: tuple[int, int, int]) -> bytes:
        return read_member(self.paths[ref[0]], ref[1], ref[2])

    def identity(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
        return h.hexdigest()


def open_source(spec: str | Path | list, captions_file: str = "captions.jsonl", *,
                part_size: int = FOLDER_PART) -> Source:
    """The image set ``spec`` names (see the module docstring); :class:`InputError` when there is none."""
    if is_shard_spec(spec):
        return ShardSource(shard_paths(spec), None if isinstance(spec, list | tuple) else str(spec))
    path = Path(spec)
    if not path.exists():
        raise InputError(f"image folder not found: {path}",
                         hint="give a folder of images, a captions.jsonl, a list of paths or .tar shards")
    if path.is_dir():
        return FolderSource(read_folder(path, captions_file), part_size=part_size)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{path} is a single image", hint="give a folder or a list of images")
    if path.name.endswith(".jsonl"):
        items = read_captions(path.parent, path, image_key="file_name" if path.name == HF_METADATA else "image")
        if not items:
            raise InputError(f"{path} lists no images", hint="one JSON object per line")
    else:
        items = read_path_list(path)
    labels = sorted({it.label for it in items if it.label is not None})
    return FolderSource(ImageFolder(path.parent, items, labels), listing=path, part_size=part_size)


# ------------------------------------------------------------------ decoding


def view_box(seed: int, part: int, pos: int, view: int, mode: str) -> tuple[float, float, float, float, bool] | None:
    """The crop (fractions of width and height) and flip of augmented view ``view`` of a sample; None
    for view 0 (the image as it is). Seeded by the sample's place in its source, so the teacher's
    cached view and the student's view of it are the same crop at their own resolutions."""
    if view == 0 or mode == "none":
        return None
    rng = np.random.default_rng([seed, part, pos, view])
    scale = float(rng.uniform(0.8, 1.0))
    side = scale ** 0.5
    x0, y0 = float(rng.uniform(0, 1 - side)), float(rng.uniform(0, 1 - side))
    flip = mode == "standard" and bool(rng.random() < 0.5)
    return x0, y0, x0 + side, y0 + side, flip


def decode_rgb(src: Path | bytes, name: str, preprocess: Preprocess,
               box: tuple[float, float, float, float, bool] | None = None, image=None) -> np.ndarray:
    """One image as uint8 RGB (H, W, 3) at ``preprocess.size`` (after the view's crop and flip)."""
    img = image if image is not None else load_image(src, name=name)
    if box is not None:
        x0, y0, x1, y1, flip = box
        w, h = img.size
        img = img.crop((round(x0 * w), round(y0 * h), max(round(x0 * w) + 1, round(x1 * w)),
                        max(round(y0 * h) + 1, round(y1 * h))))
    out = np.array(preprocess.resize_image(img), np.uint8)  # a writable copy (torch.from_numpy needs one)
    if box is not None and box[4]:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def caption_id(text: str) -> int:
    """A 63-bit id of a caption's text: equal ids mean the same text (for contrastive targets)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


__all__ = ["FolderSource", "Sample", "ShardSource", "Source", "caption_id", "decode_rgb", "open_source", "view_box"]
