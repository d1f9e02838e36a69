"""The golden set on the shared readers: WebDataset eval shards, images in a memory-mapped file, old sets."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from ..data.test_sources import make_shards


@pytest.fixture(scope="module")
def golden_from_shards(tmp_path_factory, tiny_edgec, torch):
    from edgec.config import ModelSection
    from edgec.verify.golden import GoldenConfig, build_golden

    root = tmp_path_factory.mktemp("golden")
    make_shards(root / "wds", n_shards=3, per_shard=4, bad={"000010001": b"broken"})
    cfg = GoldenConfig(teacher=ModelSection(path=str(tiny_edgec)), eval=root / "wds" / "train-{00000..00002}.tar",
                       out=root / "golden", max_bad_fraction=0.2)
    lines = []
    build_golden(cfg, log=lines.append, workers=2)
    return cfg, lines


def test_golden_set_from_shards_keeps_images_in_a_memory_mapped_file(golden_from_shards, tiny_edgec):
    from edgec.data.preprocess import Preprocess
    from edgec.data.sources import decode_rgb, open_source
    from edgec.models import load_model
    from edgec.verify.golden import GOLDEN_IMAGES, load_golden

    cfg, lines = golden_from_shards
    assert "11 images" in lines[0] and "1 undecodable skipped" in lines[0]
    golden = load_golden(cfg.out)
    assert isinstance(golden.images, np.memmap) and golden.images.shape == (11, 32, 32, 3)
    assert golden.meta["files"][0] == "train-00000.tar/000000000" and golden.meta["eval"]["kind"] == "shards"
    assert golden.meta["eval"]["skipped"] == ["train-00001.tar/000010001"]
    assert golden.labels == ["class0", "class1"] and golden.text_embeddings.shape == (2, 16)
    assert golden.caption_embeddings.shape == (11, 16) and golden.caption_owner.tolist() == list(range(11))
    # the stored images are the teacher's decode of the shards, in shard order
    src = open_source(cfg.eval)
    good = [s for s in src if s.key != "train-00001.tar/000010001"]
    pre: Preprocess = load_model(tiny_edgec).preprocess
    np.testing.assert_array_equal(golden.images[3], decode_rgb(good[3].data, good[3].key, pre))
    # a damaged images file is refused
    data = bytearray((cfg.out / GOLDEN_IMAGES).read_bytes())
    data[-1] ^= 0xFF
    (cfg.out / GOLDEN_IMAGES).write_bytes(bytes(data))
    from edgec.errors import InputError

    with pytest.raises(InputError, match="does not match the sha256"):
        load_golden(cfg.out)
    data[-1] ^= 0xFF
    (cfg.out / GOLDEN_IMAGES).write_bytes(bytes(data))


def test_a_golden_set_with_images_inside_the_npz_still_loads(golden_from_shards, tmp_path):
    """Sets written before images.npy existed."""
    import shutil

    from edgec.manifest import sha256_file
    from edgec.verify.golden import GOLDEN_IMAGES, GOLDEN_JSON, GOLDEN_NPZ, load_golden

    cfg, _ = golden_from_shards
    old = tmp_path / "old"
    shutil.copytree(cfg.out, old)
    images = np.load(old / GOLDEN_IMAGES)
    with np.load(old / GOLDEN_NPZ) as z:
        arrays = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, **arrays)
    (old / GOLDEN_NPZ).write_bytes(buf.getvalue())
    (old / GOLDEN_IMAGES).unlink()
    meta = json.loads((old / GOLDEN_JSON).read_text())
    for k in ("images_file", "images_sha256"):
        meta.pop(k)
    meta["npz_sha256"] = sha256_file(old / GOLDEN_NPZ)
    (old / GOLDEN_JSON).write_text(json.dumps(meta))
    golden = load_golden(old)
    np.testing.assert_array_equal(golden.images, images)
