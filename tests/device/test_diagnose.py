"""edgec diagnose: a bad quantization planted in one layer is the first layer named, for ONNX, LiteRT and ExecuTorch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.device.diagnose import resolve
from edgec.manifest import sha256_file

runner = CliRunner()
PLANTED = "blocks.2.mlp.0"  # the first Linear of the third block's MLP in the example teacher


def test_resolve_matches_module_paths_by_suffix_and_class():
    paths = {p: p.split(".") for p in ("patch.0", "blocks.0", "blocks.0.ln1", "blocks.0.mlp.0", "blocks.1.mlp.0")}
    classes = {"patch.0": "Conv2d", "blocks.0": "Block", "blocks.0.ln1": "LayerNorm", "blocks.0.mlp.0": "Linear",
               "blocks.1.mlp.0": "Linear"}
    assert resolve(["encoder", "blocks", "0", "ln1"], paths) == "blocks.0.ln1"  # ONNX scope, wrapper prefix
    assert resolve(["wrapped", "encoder", "0", "ln1"], paths) == "blocks.0.ln1"  # LiteRT: ModuleList level missing
    assert resolve(["wrapped", "encoder", "0"], paths) is None  # patch.0 or blocks.0: ambiguous without a class
    assert resolve(["wrapped", "encoder", "0"], paths, "Block", classes) == "blocks.0"
    assert resolve(["encoder", "1", "mlp", "0"], paths) == "blocks.1.mlp.0" and resolve(["head"], paths) is None


def plant(artifact: Path, weights: np.ndarray) -> None:
    """Overwrite one layer's int8 weights in the artifact file with random values (a bad quantization), and
    record the new hash so verify and diagnose accept the file."""
    data = artifact.read_bytes()
    raw = np.ascontiguousarray(weights).tobytes()
    assert data.count(raw) == 1
    bad = np.random.default_rng(0).integers(-127, 128, size=weights.size).astype(weights.dtype).tobytes()
    at = data.find(raw)
    artifact.write_bytes(data[:at] + bad + data[at + len(raw):])
    manifest_path = artifact.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for a in manifest["artifacts"]:
        if a["path"] == artifact.name:
            a["sha256"] = sha256_file(artifact)
    manifest_path.write_text(json.dumps(manifest))


def onnx_weights(path: Path, scope: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name.startswith(scope)]
    dq = producer[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    return numpy_helper.to_array(inits[dq.input[0]])


def tflite_weights(path: Path, layer: str) -> np.ndarray:
    from ai_edge_litert import interpreter

    from edgec.backends.diagnose import tflite_scope_tokens

    interp = interpreter.Interpreter(model_path=str(path))
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    want = layer.split(".")[-2:]  # mlp, 0
    found = [op for op in interp._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"
             and [a for _, a in tflite_scope_tokens(names[op["outputs"][0]]) or []][-3:] == ["2", *want]]
    assert len(found) == 1
    return interp.get_tensor(found[0]["inputs"][1])


def diagnose(folder: Path) -> dict:
    result = runner.invoke(app, ["diagnose", str(folder), "--config", str(folder.parent.parent / "edgec.toml"),
                                 "--images", "6", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_planted_named_first(build: Path, target: str, tmp_path: Path, weights_of, planted: str = PLANTED,
                              cls: str = "Linear", min_layers: int = 40) -> tuple[dict, dict]:
    clean = diagnose(build / target)
    cos = {r["layer"]: r["cosine"] for r in clean["layers"]}
    assert cos[planted] > 0.99 and len(clean["layers"]) > min_layers  # int8 as compiled: the layer agrees
    work = tmp_path / "build"
    work.mkdir()
    shutil.copytree(build / target, work / target)
    (work / "golden").symlink_to(build / "golden")
    shutil.copy(build.parent / "edgec.toml", tmp_path / "edgec.toml")
    artifact = work / target / json.loads((work / target / "manifest.json").read_text())["artifacts"][0]["path"]
    plant(artifact, weights_of(artifact))
    report = diagnose(work / target)
    first = report["first_divergent"]
    assert first and first[0]["layer"] == planted and first[0]["cosine"] < 0.5, first
    assert first[0]["class"] == cls and planted in report["fix"] and f"quantize.targets.{target}" in report["fix"]
    rows = [r["layer"] for r in report["layers"]]
    assert all(r["cosine"] > 0.99 for r in report["layers"][:rows.index(planted)])  # everything before agrees
    text = runner.invoke(app, ["diagnose", str(work / target), "--config", str(tmp_path / "edgec.toml"), "--images", "4"])
    rows_shown = [line for line in text.stdout.splitlines() if line.startswith("│")]
    assert text.exit_code == 0 and planted in rows_shown[0] and f"fix: keep {planted}" in text.stdout
    return clean, report


@pytest.mark.slow
def test_onnx_planted_layer_is_named_first(device_build, tmp_path):
    check_planted_named_first(device_build, "cpu", tmp_path, lambda p: onnx_weights(p, "/encoder/blocks.2/mlp/mlp.0/"))


@pytest.mark.slow
def test_litert_planted_layer_is_named_first(tflite_build, tmp_path):
    check_planted_named_first(tflite_build, "android-tflite", tmp_path, lambda p: tflite_weights(p, PLANTED))


PTE_PLANTED = "blocks.1.mlp.0"  # the first Linear of the tiny CLIP's second block's MLP


def xnnpack_int8_weights(model_dir: Path, layer: str) -> np.ndarray:
    """The int8 weights XNNPACKQuantizer makes of a Linear's float weights (per output channel, symmetric, +-127),
    as XNNPACK keeps them in the .pte."""
    import torch

    from edgec.models.intake import load_model

    w = dict(load_model(model_dir).image_encoder.named_modules())[layer].weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8).numpy()


@pytest.mark.slow
def test_executorch_planted_layer_is_named_first(pte_build, tiny_edgec, tmp_path):
    """The per-layer run is the int8 program rebuilt with the artifact's weights, undelegated, in the ExecuTorch
    runtime; the shipped .pte runs whole beside it."""
    clean, report = check_planted_named_first(pte_build, "android", tmp_path,
                                              lambda p: xnnpack_int8_weights(tiny_edgec, PTE_PLANTED), PTE_PLANTED,
                                              min_layers=25)
    assert clean["weights"]["differ_from_rebuild"] == 0 and clean["weights"]["from_artifact"] >= 12
    assert clean["whole_output"]["artifact_vs_rebuilt"] > 0.999 and clean["whole_output"]["artifact_vs_float"] > 0.99
    assert report["weights"]["differ_from_rebuild"] == 1  # the planted bytes are what the per-layer run used
    assert report["whole_output"]["artifact_vs_rebuilt"] > 0.999  # ... and the shipped file agrees with it
    assert report["whole_output"]["artifact_vs_float"] < clean["whole_output"]["artifact_vs_float"]
    assert "undelegated" in report["per_layer_run"]


def test_diagnose_refuses_a_model_the_target_was_not_built_from(device_build, tmp_path, tiny_edgec):
    config = tmp_path / "edgec.toml"
    text = (device_build.parent / "edgec.toml").read_text()
    config.write_text("\n".join(f"path = {json.dumps(str(tiny_edgec))}" if line.startswith("path =") and i < 3 else line
                                for i, line in enumerate(text.splitlines())) + "\n")
    result = runner.invoke(app, ["diagnose", str(device_build / "cpu"), "--config", str(config)])
    assert result.exit_code == 2 and "is not the one cpu was compiled from" in result.stderr
