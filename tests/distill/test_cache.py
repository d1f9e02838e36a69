"""The teacher-target cache: chunked fp16 on disk, the same for any world size, resumable after a kill."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgec.data.sources import open_source

from ..data.test_sources import make_shards


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if not p.name.endswith(".tmp")}


@pytest.fixture(scope="module")
def teacher(tiny_edgec):
    from edgec.models import load_model

    return load_model(tiny_edgec)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    make_shards(root, n_shards=5, per_shard=6, bad={"000010002": b"broken"})
    return open_source(root)


def build(teacher, source, folder, **kw):
    from edgec.distill.cache import build_teacher_cache

    return build_teacher_cache(teacher, source, prompts=["a photo of a {}."], folder=folder, batch_size=4, **kw)


def test_the_cache_is_the_same_for_any_world_size_and_holds_the_teachers_outputs(teacher, shards, tmp_path, torch):
    from edgec.data.preprocess import Preprocess
    from edgec.data.sources import decode_rgb
    from edgec.distill.cache import CacheRows

    one = build(teacher, shards, tmp_path / "one", workers=2)
    assert (one.computed, one.cached) == (5, 0)
    for rank in (1, 0):  # two processes: rank 0 finishes the cache once every chunk is written
        build(teacher, shards, tmp_path / "two", rank=rank, world=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")

    rows = CacheRows(tmp_path / "one")
    assert len(rows) == 29 and rows.final["bad"] == 1 and rows.final["bad_per_part"] == {"train-00001.tar": 1}
    assert rows.labels == ["class0", "class1"] and rows.class_text.shape == (2, 16)
    samples = [s for s in shards if s.key != "train-00001.tar/000010002"]
    pre: Preprocess = teacher.preprocess
    x = np.stack([decode_rgb(s.data, s.key, pre) for s in samples])
    expected = teacher.encode_image(pre.normalize(x)).numpy()
    got = rows.teacher(np.arange(len(rows)))
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 2e-3  # stored as fp16
    assert rows.label_ids.tolist() == [int(s.label[-1]) for s in samples]
    cap, ids = rows.caption(np.array([0, 1]), np.array([7, 7]))
    assert np.abs(cap - teacher.encode_text([samples[0].captions[0], samples[1].captions[0]]).numpy()).max() < 2e-3
    assert ids[0] != ids[1]
    # a finished cache is read, not recomputed
    assert build(teacher, shards, tmp_path / "one").computed == 0


def test_a_killed_cache_resumes_at_the_first_missing_chunk(teacher, shards, tmp_path, monkeypatch, torch):
    from edgec.distill import cache

    real, calls = cache._write_part, []

    def killed(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(cache, "_write_part", killed)
    with pytest.raises(KeyboardInterrupt):
        build(teacher, shards, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("part-*.json"))) == 2 and not (tmp_path / "c" / cache.FINAL).exists()
    monkeypatch.setattr(cache, "_write_part", real)
    again = build(teacher, shards, tmp_path / "c")
    assert (again.computed, again.cached) == (3, 2)
    build(teacher, shards, tmp_path / "ref")
    assert _digest(tmp_path / "c") == _digest(tmp_path / "ref")


def test_views_store_one_embedding_per_augmented_view(teacher, tmp_path, torch):
    import io

    from PIL import Image

    from edgec.data.shards import write_shard
    from edgec.distill.cache import CacheRows

    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append((f"{i:04d}", {"png": buf.getvalue()}))
    write_shard(tmp_path / "noise.tar", samples)
    source = open_source(tmp_path / "noise.tar")
    build(teacher, source, tmp_path / "v", views=3, seed=1, augment="standard")
    rows = CacheRows(tmp_path / "v")
    assert rows.views == 3
    t = np.stack([rows.teacher(np.arange(5), np.full(5, v)) for v in range(3)])
    assert np.all((t[0] * t[1]).sum(-1) < 0.9999) and np.all((t[1] * t[2]).sum(-1) < 0.9999)  # views differ
    build(teacher, source, tmp_path / "p")
    np.testing.assert_allclose(t[0], CacheRows(tmp_path / "p").teacher(np.arange(5)), atol=1e-6)  # view 0: the image as it is
