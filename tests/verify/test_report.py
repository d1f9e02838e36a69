"""The HTML report: fixed plot axes with the teacher, FAIL cells that name the gate, host-labelled
latencies, and the learning curve and sensitivity plots when the build folder has them."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.verify.report import _failed, _where, plot_limits

runner = CliRunner()


def test_plot_limits_keep_a_single_target_in_a_readable_range():
    assert plot_limits([0.12], [0.9983]) == (0.0, pytest.approx(0.15), 0.9)  # not 0.9982..0.9984
    lo, hi, y_lo = plot_limits([0.5, 2.0, 8.0], [0.71, 0.99])
    assert (lo, hi) == (0.0, 10.0) and y_lo == pytest.approx(0.69)
    assert plot_limits([], []) == (0.0, 1.0, 0.9)


def test_fail_cell_and_latency_label():
    row = {"gates": [{"gate": "agreement>=0.97", "metric": "agreement", "value": 0.95, "passed": False},
                     {"gate": "cosine_mean>=0.9", "metric": "cosine_mean", "value": 0.99, "passed": True}]}
    assert _failed(row) == "agreement>=0.97 (agreement = 0.9500)"
    assert "host, onnxruntime, not tensorrt" in _where({"runtime": "onnxruntime", "target_runtime": "tensorrt",
                                                         "measured_with": "onnxruntime"})
    assert "host, eager PyTorch" in _where(None)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_edgec, shapes_data):
    root = tmp_path_factory.mktemp("report")
    config = root / "edgec.toml"
    config.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(tiny_edgec))}",
        "[data]", f"eval = {json.dumps(str(shapes_data / 'eval'))}",
        "[calibration]", f"path = {json.dumps(str(shapes_data / 'train'))}", "num_images = 16",
        "[targets]", f"out = {json.dumps(str(root / 'build'))}",
    ]) + "\n")
    result = runner.invoke(app, ["compile", "--target", "cpu", "--no-distill", "--no-progress", "--config", str(config)])
    assert result.exit_code == 0, result.output
    return root / "build"


def test_report_names_the_failing_gate_and_shows_stage_plots(project, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(project, build)
    folder = build / "cpu"
    failed = runner.invoke(app, ["verify", str(folder), "--gate", "agreement>1.5"])
    assert failed.exit_code == 1, failed.output
    bench = runner.invoke(app, ["bench", str(folder), "--runs", "3", "--warmup", "1", "--threads", "1"])
    assert bench.exit_code == 0, bench.output
    record = json.loads((folder / "bench.json").read_text())["results"][0]
    assert record["measured_on"] == "host" and record["runtime"] == "onnxruntime"
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    (build / "quantize" / "onnx").mkdir(parents=True)
    (build / "quantize" / "onnx" / "sensitivity.png").write_bytes(png)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sources"]["student"] = "ab" * 32
    (folder / "manifest.json").write_text(json.dumps(manifest))
    student = build / "distill" / "tiny_student"
    (student / "student").mkdir(parents=True)
    (student / "student" / "edgec_student.json").write_text(json.dumps({"weights_sha256": "ab" * 32}))
    (student / "learning_curve.png").write_bytes(png)
    (build / "distill" / "other" / "student").mkdir(parents=True)  # another student's curve stays out
    (build / "distill" / "other" / "student" / "edgec_student.json").write_text(json.dumps({"weights_sha256": "cd" * 32}))
    (build / "distill" / "other" / "learning_curve.png").write_bytes(png)
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(folder), "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "FAIL: agreement&gt;1.5 (agreement = " in page
    assert "(host, onnxruntime)" in page and "latency ms (median; where measured)" in page
    assert "Learning curve: tiny_student (student of cpu)" in page and "Learning curve: other" not in page
    assert "Layer sensitivity: onnx (edgec quantize)" in page
