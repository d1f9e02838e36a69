"""bench-real: the figures each row is read by, the table, the profiles, and the measurements behind them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgec.benchmarks.real import derive, load_workload, markdown, profile, profile_markdown, synthetic_calibration
from edgec.runtime.isa import parse_cpuinfo

SPR = parse_cpuinfo("model name : Xeon\ncpu MHz : 2000.0\nflags : avx2 fma avx512f avx512bw avx512_vnni amx_int8\n",
                    "x86_64")


def _cells():
    teacher = {"1": {"eager": 300.0, "onnxruntime": 250.0}}
    base = {"student": "mobilevit_xxs", "size": 256, "target": "cpu", "runtime": "onnxruntime", "layout": "NCHW",
            "macs": 400_000_000, "bytes": 2_000_000, "teacher_ms": teacher, "cosine_to_eager": 0.998}
    return [dict(base, precision="int8", ms={"1": 5.0}), dict(base, precision="fp32", ms={"1": 10.0}),
            {"student": "mobilevit_xxs", "size": 256, "target": "edgetpu", "runtime": "edgetpu", "layout": "NHWC",
             "macs": 400_000_000, "refused": "attention is not on the Edge TPU's op list"}]


def test_derived_figures_are_read_from_one_loop():
    cells = _cells()
    derive(cells, SPR)
    int8, fp32 = cells[0], cells[1]
    assert int8["gmacs"]["1"] == 80.0 and fp32["gmacs"]["1"] == 40.0  # 0.4 G MACs in 5 ms / 10 ms
    assert int8["x_fp32"]["1"] == 2.0 and fp32["x_fp32"]["1"] == 1.0
    assert int8["x_teacher_eager"]["1"] == 60.0 and int8["x_teacher_ort"]["1"] == 50.0
    # share of the vector units' peak at the reported clock: VNNI 128 int8 MACs/cycle, AVX-512 32 fp32 MACs/cycle
    assert int8["peak_share"]["1"] == pytest.approx(80 / (128 * 2.0), abs=1e-4)
    assert fp32["peak_share"]["1"] == pytest.approx(40 / (32 * 2.0), abs=1e-4)
    assert SPR.peak_gmacs("int8", 1)["gmacs"] == 2048.0 and SPR.peak_gmacs("int8", 1, matrix=False)["gmacs"] == 256.0


@pytest.mark.parametrize("int8_ms, ships", [(5.0, ("faster", None)), (10.5, ("tie", None)), (11.5, (None, "faster"))])
def test_the_shipped_precision_follows_compile_rule(int8_ms, ships):
    """int8 is listed first: it ships when faster by more than the tie margin ("faster") or within it ("tie");
    fp32 ships only when more than 10 % faster. The cells' order in the table plays no part."""
    int8, fp32, refused = _cells()
    int8["ms"] = {"1": int8_ms}
    cells = [fp32, int8, refused]
    derive(cells, SPR)
    by = {c.get("precision"): c for c in cells}
    assert (by["int8"].get("ships"), by["fp32"].get("ships")) == ships


def test_the_table_has_every_cell_and_says_why_one_was_not_built():
    cells = _cells()
    derive(cells, SPR)
    result = {"date": "2026-12-01", "threads": [1], "runs": 50, "teacher_every": 5, "cells": cells,
              "teacher": {"name": "open_clip ViT-B-16", "size": 224, "macs": 17_563_000_000},
              "machine": {"cpu": "Xeon", "cores": 2, "isa": SPR.record(), "ghz": 2.0,
                          "peak": {"fp32": 64.0, "int8": 256.0}, "peak_basis": "test"}}
    table = markdown(result)
    assert "| mobilevit_xxs | 256 | cpu | int8 | onnxruntime | 2.00 | 0.400 | 5.00 | 2.0 | 60.0 | 50.0 | 80.0 | 31.2% |" in table
    assert "| mobilevit_xxs | 256 | edgetpu | not built: attention is not on the Edge TPU's op list |" in table
    assert "17.56 G MACs" in table


def test_profile_table_pairs_fp32_and_int8_by_operator():
    cells = _cells()[:2]
    cells[0]["profile"] = {"total_ms": 4.0, "ops": {"QLinearConv": 3.0, "QLinearMul": 1.0}}
    cells[1]["profile"] = {"total_ms": 9.0, "ops": {"Conv": 8.0, "QuickGelu": 1.0}}
    lines = profile_markdown(cells)
    assert "| Conv | 8.00 | 0.00 |" in lines and "| QLinearConv | 0.00 | 3.00 |" in lines
    assert lines.index("| Conv | 8.00 | 0.00 |") < lines.index("| QLinearConv | 0.00 | 3.00 |")  # biggest first


def test_synthetic_calibration_is_deterministic_natural_looking_images():
    a, b = synthetic_calibration(64, 4), synthetic_calibration(64, 4)
    assert a.images.shape == (4, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.sha256 == b.sha256 and np.array_equal(a.images, b.images)
    assert a.images.std() > 20  # not a constant image
    # smooth: neighbouring pixels differ far less than random pairs do
    img = a.images.astype(np.float32)
    assert np.abs(np.diff(img, axis=1)).mean() < 0.5 * np.abs(img - img[::-1]).mean()
    batch = next(a.batches(batch_size=2))
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32


def test_workload_covers_the_issue_reference_case():
    w = load_workload()
    assert w["teacher"] == {"open_clip": "ViT-B-16", "size": 224}
    assert {"mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "fastvit_t8"} <= set(w["students"]["names"])
    assert w["students"]["sizes"] == [224, 256] and w["timing"]["threads"] == [1, 2] and w["timing"]["runs"] >= 50
    from edgec import registry

    for t in w["build"]["targets"]:
        registry.get("targets", t)  # every target the workload names exists


def test_onnxruntime_profile_counts_the_operators_that_ran(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Softmax", ["c"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cell = {"runtime": "onnxruntime", "path": str(path), "size": 32, "layout": "NCHW"}
    p = profile(cell, runs=3)
    assert {"Conv", "Softmax"} <= set(p["ops"])
    assert p["total_ms"] > 0 and all(v >= 0 for v in p["ops"].values())
    assert profile(dict(cell, runtime="tensorrt")) is None  # no profiler for a runtime that does not run here


def test_bench_peak_memory_is_the_child_process_own():
    """getrusage's ru_maxrss survives exec and starts at the forking parent's size: a 1 GB parent made every
    artifact report at least 1 GB."""
    big = bytearray(1024 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # touch every page
    out = subprocess.run([sys.executable, "-c", "from edgec.bench import _peak_rss_mb; print(_peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    assert float(out) < 500, out
    del big
