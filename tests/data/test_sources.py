"""Readers: WebDataset shards, Hugging Face metadata.jsonl, the folder rules (symlinks, UTF-8,
decompression bombs), and the DataLoader split of parts across ranks and workers."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgec.data import preprocess as pre_mod
from edgec.data.folder import read_folder
from edgec.data.preprocess import Preprocess, load_image
from edgec.data.shards import expand_braces, is_shard_spec, shard_paths, write_shard
from edgec.data.sources import FolderSource, ShardSource, decode_rgb, open_source, view_box
from edgec.errors import InputError

PRE = Preprocess(size=(8, 8))


def _jpeg(i: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 7 % 255, 40, 200 - i % 100)).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header that claims 900 million pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def make_shards(root: Path, n_shards: int = 3, per_shard: int = 5, bad: dict | None = None) -> list[Path]:
    """img2dataset-style shards: ``{shard:05d}{i:04d}.jpg|txt|json`` with a label in the json."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            img = (bad or {}).get(key, _jpeg(s * per_shard + i))
            samples.append((key, {"jpg": img, "txt": f"caption {key}".encode(),
                                  "json": json.dumps({"key": key, "label": f"class{i % 2}"}).encode()}))
        paths.append(root / f"train-{s:05d}.tar")
        write_shard(paths[-1], samples)
    return paths


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("train-{00000..00002}.tar") == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("x-{9..10}") == ["x-9", "x-10"]
    with pytest.raises(InputError, match="unbalanced"):
        expand_braces("a-{0..2.tar")


def test_shards_are_read_by_pattern_list_and_folder(tmp_path):
    paths = make_shards(tmp_path / "wds")
    by_pattern = open_source(str(tmp_path / "wds" / "train-{00000..00002}.tar"))
    by_list = open_source([str(p) for p in paths])
    by_folder = open_source(tmp_path / "wds")
    joined = open_source(f"{paths[0]}::{tmp_path / 'wds' / 'train-{00001..00002}.tar'}")
    assert isinstance(by_folder, ShardSource) and is_shard_spec(tmp_path / "wds")
    keys = [s.key for s in by_pattern]
    assert len(keys) == 15 and len(set(keys)) == 15 and keys[0] == "train-00000.tar/000000000"
    assert keys == [s.key for s in by_list] == [s.key for s in by_folder] == [s.key for s in joined]
    first = next(iter(by_pattern))
    assert first.captions == ("caption 000000000",) and first.label == "class0" and first.error is None
    # the recorded offset reads the same image bytes back (random access for later epochs)
    assert by_pattern.read(first.ref) == first.data
    assert by_pattern.identity() == by_folder.identity()
    with pytest.raises(InputError, match="1 of 4 shards not found"):
        shard_paths(str(tmp_path / "wds" / "train-{00000..00003}.tar"))


def test_undecodable_and_bomb_images_in_shards_are_marked_with_the_reason(tmp_path, monkeypatch):
    make_shards(tmp_path / "wds", n_shards=1, per_shard=4, bad={"000000001": b"not a jpeg", "000000002": _bomb_png(),
                                                                "000000003": _bomb_png(10_000, 10_000)})
    src = open_source(tmp_path / "wds")
    reasons = {}
    for s in src:
        try:
            decode_rgb(s.data, s.key, PRE)
        except InputError as exc:
            reasons[s.key] = exc.message
    assert set(reasons) == {f"train-00000.tar/00000000{i}" for i in (1, 2, 3)}
    assert "cannot decode" in reasons["train-00000.tar/000000001"]
    for key in ("train-00000.tar/000000002", "train-00000.tar/000000003"):  # 900 and 100 million pixels claimed
        assert "refused image" in reasons[key] and "decompression bomb" in reasons[key]
    # the limit is what decides, not the file size: lower it and an ordinary image is refused too
    monkeypatch.setattr(pre_mod, "MAX_PIXELS", 100)
    with pytest.raises(InputError, match="over the 100-pixel limit"):
        load_image(_jpeg(0, size=12), name="small.jpg")


def test_hugging_face_metadata_jsonl(tmp_path):
    for i in range(3):
        Image.new("RGB", (6, 6)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "zero"}, {"file_name": "1.png", "caption": "one", "label": "odd"},
            {"file_name": "2.png", "text": "two"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = read_folder(tmp_path)
    assert [it.captions for it in folder.items] == [("zero",), ("one",), ("two",)]
    assert folder.labels == ["odd"]
    assert isinstance(open_source(tmp_path / "metadata.jsonl"), FolderSource)


def test_non_utf8_listing_files_are_refused_with_the_line(tmp_path):
    Image.new("RGB", (6, 6)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"captions.jsonl:2: not UTF-8") as info:
        read_folder(tmp_path)
    assert "save the file as UTF-8" in str(info.value)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\n\xff\xfe.png\n")
    with pytest.raises(InputError, match=r"list.txt:2: not UTF-8"):
        open_source(listing)


def test_symlinks_out_of_an_image_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (6, 6)).save(outside / "secret.png")
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(root / "cat" / "ok.png")
    os.symlink(outside / "secret.png", root / "cat" / "link.png")
    with pytest.raises(InputError, match="points outside the folder"):
        read_folder(root)
    (root / "cat" / "link.png").unlink()
    os.symlink(outside, root / "dog")  # a symlinked class folder
    with pytest.raises(InputError, match="points outside the folder"):
        read_folder(root)
    (root / "dog").unlink()
    os.symlink(root / "cat" / "ok.png", root / "cat" / "inner.png")  # inside: fine
    assert len(read_folder(root)) == 2


def test_parts_are_split_across_ranks_and_workers_without_duplicates_or_gaps(tmp_path, torch):
    from edgec.data.loader import PartStream, stream_loader

    make_shards(tmp_path / "wds", n_shards=7, per_shard=3)
    src = open_source(tmp_path / "wds")
    everything = [s.key for s in src]
    seen = []
    for rank in range(2):
        parts = [p for p in range(src.num_parts()) if p % 2 == rank]
        for batch in stream_loader(PartStream(src, PRE, parts, batch_size=2), workers=2):
            seen += batch.keys
            assert batch.part % 2 == rank
    assert sorted(seen) == sorted(everything) and len(seen) == len(everything) == 21


def test_views_are_the_same_crop_at_every_resolution(tmp_path):
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3) % 251)
    assert view_box(0, 1, 2, 0, "standard") is None
    box = view_box(0, 1, 2, 3, "standard")
    assert box == view_box(0, 1, 2, 3, "standard") != view_box(0, 1, 2, 4, "standard")
    small = decode_rgb(None, "x", Preprocess(size=(16, 16), resize="bilinear"), box, image=img)
    big = decode_rgb(None, "x", Preprocess(size=(32, 32), resize="bilinear"), box, image=img)
    down = np.asarray(Image.fromarray(big).resize((16, 16), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(down - small.astype(np.float32)).mean() < 6  # same region (and flip) at both sizes


def test_calibration_reads_shards_with_a_seeded_reservoir(tmp_path):
    from edgec.quantize.calibration import CalibrationSpec, load_calibration

    make_shards(tmp_path / "wds", n_shards=4, per_shard=5, bad={"000020003": b"broken"})
    spec = CalibrationSpec(tmp_path / "wds", num_images=8, min_images=4, max_bad_fraction=0.2)
    a, b = load_calibration(spec, PRE), load_calibration(spec, PRE)
    assert a.images.shape[1:] == (8, 8, 3) and len(a) + len(a.skipped) == 8
    assert a.sha256 == b.sha256 and [str(p) for p in a.paths] == [str(p) for p in b.paths]
    other = load_calibration(CalibrationSpec(tmp_path / "wds", num_images=8, min_images=4, seed=3, max_bad_fraction=0.2), PRE)
    assert other.sha256 != a.sha256
    assert all(str(p).startswith("train-0000") for p in a.paths) and a.labels[0] in ("class0", "class1")
