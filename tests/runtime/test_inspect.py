"""Artifact inspection runs the real runtimes on real files, and needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, torch):
    """(fp32 .onnx, fp32 .tflite, int8 .tflite) of one small conv net."""
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    folder = tmp_path_factory.mktemp("artifacts")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    x = torch.randn(1, 3, 16, 16)
    onnx_path = folder / "net.onnx"
    torch.onnx.export(net, (x,), onnx_path, input_names=["pixels"], output_names=["embedding"], dynamo=False)
    tfl = folder / "net.tflite"
    litert_torch.convert(net, (x,)).export(str(tfl))
    q = quantizer.Quantizer(str(tfl), recipe.static_wi8_ai8())
    rng = np.random.default_rng(0)
    calib = {"serving_default": [{"args_0": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]}
    int8 = folder / "net.int8.tflite"
    q.quantize(q.calibrate(calib)).export_model(str(int8), overwrite=True)
    return onnx_path, tfl, int8


def test_onnx_artifact(tiny_artifacts):
    onnx_path, _, _ = tiny_artifacts
    result = runner.invoke(app, ["inspect", str(onnx_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "onnx" and info["runtime"] == "onnxruntime"
    assert info["inputs"] == [{"name": "pixels", "shape": [1, 3, 16, 16], "dtype": "float", "quantization": None}]
    assert info["outputs"][0]["shape"] == [1, 5]
    assert info["ops"]["Conv"] == 1 and info["ops"]["Gemm"] == 1
    assert info["bytes"] == onnx_path.stat().st_size and len(info["sha256"]) == 64


def test_int8_tflite_artifact_shows_quantization_and_ops(tiny_artifacts):
    _, tfl, int8 = tiny_artifacts
    info = json.loads(runner.invoke(app, ["inspect", str(int8), "--json"]).stdout)
    (inp,) = info["inputs"]
    assert inp["dtype"] == "int8" and inp["quantization"]["scale"] > 0
    assert -128 <= inp["quantization"]["zero_point"] <= 127
    assert info["ops"].get("CONV_2D") == 1 and "DEQUANTIZE" not in info["ops"]
    fp32 = json.loads(runner.invoke(app, ["inspect", str(tfl), "--json"]).stdout)
    assert fp32["inputs"][0]["dtype"] == "float32" and fp32["inputs"][0]["quantization"] is None
    text = runner.invoke(app, ["inspect", str(int8)])
    assert text.exit_code == 0 and "CONV_2D x1" in text.stdout


def test_artifact_inspection_imports_no_torch(tiny_artifacts):
    onnx_path, _, int8 = tiny_artifacts
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from edgec.cli import run\n"
        "sys.argv = ['edgec', 'inspect', sys.argv[1], '--json']\n"
        "run()\n"
    )
    for path in (onnx_path, int8):
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["path"] == str(path)


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_truncated_artifact_is_a_clear_error(tiny_artifacts, tmp_path, suffix):
    source = tiny_artifacts[0] if suffix == ".onnx" else tiny_artifacts[2]
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "compile it again" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_artifact(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "artifact not found" in result.stderr
