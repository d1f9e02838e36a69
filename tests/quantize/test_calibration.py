"""Calibration sets and activation ranges: each method does what its name says."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from PIL import Image

from edgec.data.preprocess import Preprocess
from edgec.errors import InputError
from edgec.quantize.calibration import CalibrationSpec, load_calibration, sample_indices
from edgec.quantize.ranges import RangeCollector, collect_ranges, entropy_amax, tensorrt_cache

PRE = Preprocess(size=(16, 16))


def skewed_batches():
    rng = np.random.default_rng(0)  # a Gaussian body with a heavy tail, as activations with outliers look
    return [np.concatenate([rng.normal(0, 1, 20000), rng.standard_cauchy(100) * 5]).astype(np.float32) for _ in range(4)]


def test_methods_give_different_ranges_on_a_skewed_distribution():
    collector = collect_ranges(lambda b: {"x": b}, skewed_batches())
    minmax = collector.amax("minmax")["x"]
    pct = collector.amax("percentile", 99.9)["x"]
    ent = collector.amax("entropy")["x"]
    data = np.concatenate(skewed_batches())
    assert minmax == pytest.approx(np.abs(data).max())
    bin_width = minmax / 2048
    assert abs(pct - np.percentile(np.abs(data), 99.9)) <= bin_width * 1.01  # within one histogram bin
    assert pct < ent < minmax and minmax / ent > 5 and ent / pct > 2


def test_entropy_keeps_the_range_of_a_uniform_distribution():
    hist = np.full(2048, 100.0)  # no outliers: clipping would only lose information
    assert entropy_amax(hist, 1.0) == pytest.approx(1.0)


def test_non_finite_activations_are_an_input_error():
    with pytest.raises(InputError, match="non-finite activation in tensor 'bad'"):
        RangeCollector().observe_max("bad", np.array([1.0, np.inf]))


def test_tensorrt_cache_format():
    text = tensorrt_cache({"input": 127.0, "conv1": 2.54}, trt_version=100300)
    lines = text.strip().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    name, hexbits = lines[1].split(": ")
    assert name == "input" and struct.unpack(">f", bytes.fromhex(hexbits))[0] == pytest.approx(1.0)
    assert struct.unpack(">f", bytes.fromhex(lines[2].split(": ")[1]))[0] == pytest.approx(0.02)


def test_stratified_seeded_sampling():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    picked = sample_indices(labels, 30, seed=1)
    assert picked == sample_indices(labels, 30, seed=1) != sample_indices(labels, 30, seed=2)
    counts = {k: sum(labels[i] == k for i in picked) for k in "abc"}
    assert counts == {"a": 10, "b": 10, "c": 10}
    assert len(set(sample_indices([None] * 10, 4, seed=0))) == 4


def _images(folder, n, label=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 20), (i * 9 % 255, 40, 90)).save(folder / f"{label or 'img'}_{i}.png")


def test_three_source_formats_give_the_same_images(tmp_path):
    _images(tmp_path / "imgs", 20)
    folder = load_calibration(CalibrationSpec(tmp_path / "imgs", num_images=8, min_images=4), PRE)
    listing = tmp_path / "list.txt"
    listing.write_text("# calibration images\n" + "\n".join(f"imgs/{p.name}" for p in sorted((tmp_path / "imgs").iterdir())))
    from_list = load_calibration(CalibrationSpec(listing, num_images=8, min_images=4), PRE)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"imgs/{p.name}"}) for p in sorted((tmp_path / "imgs").iterdir())))
    from_jsonl = load_calibration(CalibrationSpec(jsonl, num_images=8, min_images=4), PRE)
    assert folder.images.shape == (8, 16, 16, 3)
    assert folder.sha256 == from_list.sha256 == from_jsonl.sha256
    again = load_calibration(CalibrationSpec(tmp_path / "imgs", num_images=8, min_images=4, seed=5), PRE)
    assert again.sha256 != folder.sha256  # other images, other hash
    (batch,) = list(folder.batches(batch_size=8))
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == np.float32


def test_fewer_images_than_asked_warns_then_fails_below_minimum(tmp_path):
    _images(tmp_path / "few", 6)
    with pytest.warns(UserWarning, match="asked for 10 images"):
        assert len(load_calibration(CalibrationSpec(tmp_path / "few", num_images=10, min_images=4), PRE)) == 6
    with pytest.raises(InputError, match="has 6 images; at least 8 are needed"):
        load_calibration(CalibrationSpec(tmp_path / "few", num_images=10, min_images=8), PRE)


def test_missing_empty_and_undecodable_sources(tmp_path):
    with pytest.raises(InputError, match="calibration source not found"):
        load_calibration(CalibrationSpec(tmp_path / "none"), PRE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_calibration(CalibrationSpec(tmp_path / "empty"), PRE)
    _images(tmp_path / "bad", 4)
    for i in range(4):
        (tmp_path / "bad" / f"broken_{i}.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="4 of 8 images"):
        load_calibration(CalibrationSpec(tmp_path / "bad", num_images=8, min_images=2), PRE)
    listing = tmp_path / "escape.txt"
    listing.write_text("../outside.png\n")
    with pytest.raises(InputError, match="points outside"):
        load_calibration(CalibrationSpec(listing, num_images=2, min_images=1), PRE)


def test_asymmetric_bounds_follow_the_signed_extremes_clipped_by_the_method():
    rng = np.random.default_rng(0)
    batches = [np.maximum(rng.standard_normal((64, 32)), 0) * 3 - 0.1 for _ in range(4)]  # post-activation: mostly >= 0
    batches[0][0, 0] = 40.0  # one outlier
    collector = collect_ranges(lambda b: {"x": b}, batches)
    lo, hi = collector.bounds("minmax")["x"]
    assert lo == pytest.approx(-0.1) and hi == pytest.approx(40.0)
    plo, phi = collector.bounds("percentile", 99.9)["x"]
    assert plo == pytest.approx(-0.1) and phi < 20 and phi == pytest.approx(collector.amax("percentile", 99.9)["x"])
