"""Image folders as users bring them (torch-free).

A folder is read in one of four ways, in this order:

* ``captions.jsonl`` beside the images: one JSON object per line with ``image`` (a path
  relative to the folder), optional ``label``, and ``caption`` or ``captions``;
* ``metadata.jsonl`` (the Hugging Face imagefolder convention): ``file_name`` and a text column
  (``text``, ``caption`` or ``captions``), optional ``label``;
* class sub-folders (``root/<label>/*.png``): the folder name is the label, ``_`` read as space;
* images directly in the folder: unlabelled.

Paths in a captions file may not leave the folder, and neither may an image that is a symlink
(or sits in a symlinked sub-folder): both are refused with the file named. Listing files must be
UTF-8. Only the list of paths, labels and captions is held; pixels are decoded when read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..manifest import inside
from .preprocess import IMAGE_SUFFIXES, Preprocess, load_image

CAPTIONS_FILE = "captions.jsonl"
HF_METADATA = "metadata.jsonl"
TEXT_COLUMNS = ("text", "caption", "captions")


@dataclass(frozen=True)
class Item:
    path: Path
    label: str | None = None
    captions: tuple[str, ...] = ()


@dataclass
class ImageFolder:
    root: Path
    items: list[Item]
    labels: list[str] = field(default_factory=list)  # sorted class names, empty when unlabelled

    @property
    def has_captions(self) -> bool:
        return any(it.captions for it in self.items)

    def label_ids(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.labels)}
        return np.array([index.get(it.label, -1) if it.label is not None else -1 for it in self.items], np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def key(self, i: int) -> str:
        """Item ``i``'s path relative to the folder (its key in caches and golden sets)."""
        return self.items[i].path.relative_to(self.root.resolve()).as_posix()


def read_text_lines(file: Path) -> list[str]:
    """The lines of a UTF-8 listing file; :class:`InputError` naming the file when it is not UTF-8."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}", hint="check the path and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{file}:{line}: not UTF-8 text (byte {exc.start})", hint="save the file as UTF-8") from None
    return text.splitlines()


def read_captions(root: Path, file: Path, *, image_key: str = "image") -> list[Item]:
    """Rows of a captions.jsonl (``image``) or Hugging Face metadata.jsonl (``image_key='file_name'``)."""
    items: list[Item] = []
    for n, line in enumerate(read_text_lines(file), 1):
        line = line.strip()
        if not line:
            continue
        where = f"{file}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})", hint="one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get(image_key), str):
            example = f'{{"{image_key}": "a.png", "caption": "..."}}'
            raise InputError(f"{where}: each line needs an '{image_key}' path (string)", hint=f"e.g. {example}")
        caps = next((row[c] for c in TEXT_COLUMNS if c in row), [])
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise InputError(f"{where}: 'captions' must be a string or a list of strings")
        label = row.get("label")
        if label is not None and not isinstance(label, str):
            raise InputError(f"{where}: 'label' must be a string")
        items.append(Item(inside(root, row[image_key], where).resolve(), label, tuple(caps)))
    return items


def read_path_list(file: Path) -> list[Item]:
    """A text file with one image path per line, relative to the file (``#`` comments)."""
    items = []
    for n, line in enumerate(read_text_lines(file), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        items.append(Item(inside(file.parent, line, f"{file}:{n}").resolve()))
    if not items:
        raise InputError(f"{file} lists no images", hint="one image path per line")
    return items


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _inside(root: Path, p: Path) -> Path:
    """``p`` (found in ``root``) when it does not resolve outside ``root``; the captions-file rule for symlinks."""
    return inside(root, p.relative_to(root).as_posix(), str(p)).resolve()


def read_folder(root: str | Path, captions_file: str = CAPTIONS_FILE) -> ImageFolder:
    root = Path(root)
    if not root.exists():
        raise InputError(f"image folder not found: {root}", hint="check the path in edgec.toml [data] or on the command line")
    if not root.is_dir():
        raise InputError(f"not a folder: {root}", hint="give a folder of images")
    cap, meta = root / captions_file, root / HF_METADATA
    if cap.is_file():
        items = read_captions(root, cap)
    elif meta.is_file():
        items = read_captions(root, meta, image_key="file_name")
    else:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        items = [Item(_inside(root, p), d.name.replace("_", " ")) for d in subdirs for p in sorted(d.iterdir()) if _is_image(p)]
        items += [Item(_inside(root, p)) for p in sorted(root.iterdir()) if _is_image(p)]
    if not items:
        raise InputError(f"no images in {root}", hint=f"put images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in it, or class sub-folders")
    labels = sorted({it.label for it in items if it.label is not None})
    return ImageFolder(root, items, labels)


@dataclass
class LoadedImages:
    pixels: np.ndarray  # float32 preprocessed, or uint8 resized RGB (NHWC) from load_rgb
    kept: list[int]  # indices into the folder's items
    bad: list[tuple[Path, str]]  # undecodable files and why


def load_rgb(folder: ImageFolder, preprocess: Preprocess, *, indices: list[int] | None = None,
             max_bad_fraction: float = 0.05) -> LoadedImages:
    """Decode and resize images to uint8 RGB (N, H, W, 3); skip undecodable ones, fail when too many are bad."""
    indices = list(range(len(folder))) if indices is None else indices
    arrays, kept, bad = [], [], []
    for i in indices:
        try:
            arrays.append(np.asarray(preprocess.resize_image(load_image(folder.items[i].path)), np.uint8))
            kept.append(i)
        except InputError as exc:
            bad.append((folder.items[i].path, exc.message))
    if indices and len(bad) > max_bad_fraction * len(indices):
        first = bad[0][1]
        raise InputError(
            f"{len(bad)} of {len(indices)} images in {folder.root} could not be decoded (first: {first})",
            hint=f"fix or remove them; up to {max_bad_fraction:.0%} are skipped",
        )
    if not arrays:
        raise InputError(f"no decodable images in {folder.root}")
    return LoadedImages(np.stack(arrays), kept, bad)


def load_pixels(folder: ImageFolder, preprocess: Preprocess, *, indices: list[int] | None = None,
                max_bad_fraction: float = 0.05) -> LoadedImages:
    """Decode and preprocess images (float32, the model's layout); same skipping rules as :func:`load_rgb`."""
    loaded = load_rgb(folder, preprocess, indices=indices, max_bad_fraction=max_bad_fraction)
    loaded.pixels = preprocess.normalize(loaded.pixels)
    return loaded
