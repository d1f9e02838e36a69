"""Phone checks in a bundle: the .pte as an ExecuTorch BundledProgram checked in ExecuTorch's runtime, the .tflite as
raw tensors checked in LiteRT; a wrong expected output fails verify."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.manifest import sha256_file

runner = CliRunner()
pytestmark = pytest.mark.slow


def make(build, target, out):
    result = runner.invoke(app, ["bundle", str(build / target), "-o", str(out), "--images", "12", "--no-wheel", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def verify(path):
    return runner.invoke(app, ["verify", str(path), "--json"])


def rehash(folder, rel):
    record = json.loads((folder / "bundle.json").read_text())
    record["files"][rel] = sha256_file(folder / rel)
    (folder / "bundle.json").write_text(json.dumps(record))


def test_pte_ships_as_an_executorch_bundled_program(pte_build, tmp_path):
    rec = make(pte_build, "android", tmp_path / "b")
    (entry,) = rec["phone"]
    assert entry["kind"] == "executorch-bundled-program" and entry["written"] and entry["cases"] == 8
    bpte = tmp_path / "b" / entry["file"]
    assert bpte.name == "model.int8.bpte" and bpte.stat().st_size > (tmp_path / "b" / "android" / "model.int8.pte").stat().st_size
    assert "executorch" in rec["requirements"]
    result = verify(tmp_path / "b")
    assert result.exit_code == 0, result.output
    (check,) = json.loads(result.stdout)["phone"]
    assert check["passed"] and check["failed_cases"] == [] and check["max_abs_diff"] < 1e-6  # same runtime, same CPU
    # a BundledProgram whose expected outputs are not what the program computes fails in ExecuTorch's own check
    import torch
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.core import BundledProgram
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    expected = np.load(tmp_path / "b" / entry["expected"])
    shape = json.loads((tmp_path / "b" / "android" / "manifest.json").read_text())["inputs"][0]["shape"]
    cases = [MethodTestCase(inputs=[torch.zeros(*shape)], expected_outputs=[torch.from_numpy(expected[i:i + 1])])
             for i in range(entry["cases"])]
    bad = BundledProgram(None, [MethodTestSuite("forward", cases)], pte_file_path=str(tmp_path / "b" / "android" / "model.int8.pte"))
    bpte.write_bytes(serialize_from_bundled_program_to_flatbuffer(bad))
    rehash(tmp_path / "b", entry["file"])
    result = verify(tmp_path / "b")
    assert result.exit_code == 1 and "bundled executorch-bundled-program check failed on 8 of 8" in result.stderr


def test_tflite_ships_raw_tensors_with_an_adb_recipe(tflite_build, torch_free_venv, tmp_path):
    rec = make(tflite_build, "android-tflite", tmp_path / "b")
    (entry,) = rec["phone"]
    folder = tmp_path / "b" / entry["folder"]
    tensors = json.loads((folder / "tensors.json").read_text())
    assert tensors["input"]["dtype"] == "int8" and tensors["input"]["shape"] == [1, 64, 64, 3]
    raw = np.fromfile(folder / "input_0.raw", dtype=np.int8)
    assert raw.size == 64 * 64 * 3 and len(list(folder.glob("expected_*.raw"))) == 8
    readme = (folder / "README.md").read_text()
    assert "adb push ../../android-tflite/model.int8.tflite" in readme and "--input_layer_value_files=" in readme
    result = verify(tmp_path / "b")
    assert result.exit_code == 0, result.output
    (check,) = json.loads(result.stdout)["phone"]
    assert check["passed"] and check["max_abs_diff"] == 0.0
    # the same bundle in edgec's base install (no torch), as on a device
    proc = subprocess.run([torch_free_venv / "edgec", "verify", str(tmp_path / "b"), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    device = json.loads(proc.stdout)
    assert device["host_comparison"]["same"] and device["phone"][0]["passed"] and "torch" not in device["machine"]["runtimes"]
    wrong = np.fromfile(folder / "expected_3.raw", dtype=tensors["output"]["dtype"])
    (wrong // 2).astype(wrong.dtype).tofile(folder / "expected_3.raw")
    rehash(tmp_path / "b", f"{entry['folder']}/expected_3.raw")
    result = verify(tmp_path / "b")
    assert result.exit_code == 1 and "tflite-raw-tensors check failed on 1 of 8" in result.stderr
