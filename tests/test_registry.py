"""targets/*.toml and devices/*.toml: loaded, validated, listed, looked up by name."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgec import registry
from edgec.cli import app
from edgec.errors import ConfigError, UnknownNameError

runner = CliRunner()

TARGET = """
description = "ONNX Runtime on a CPU"
backend = "onnx"
runtime = "onnxruntime"
precisions = ["int8", "fp32"]
quantizer = "qdq-symmetric"
[constraints]
static_shapes = true
"""

DEVICE = """
description = "a board"
vendor = "ACME"
target = "testcpu"
accelerator = "CPU"
memory_gb = 8
int8_tops = 2.5
runtimes = { onnxruntime = "1.20" }
"""


@pytest.fixture()
def extra_dirs(tmp_path, monkeypatch):
    targets, devices = tmp_path / "targets", tmp_path / "devices"
    targets.mkdir()
    devices.mkdir()
    monkeypatch.setenv("EDGEC_TARGETS_PATH", str(targets))
    monkeypatch.setenv("EDGEC_DEVICES_PATH", str(devices))
    registry.clear_cache()
    yield targets, devices
    registry.clear_cache()


def test_targets_and_devices_are_listed_by_file_name(extra_dirs):
    targets, devices = extra_dirs
    (targets / "testcpu.toml").write_text(TARGET)
    (devices / "acme-board.toml").write_text(DEVICE)

    result = runner.invoke(app, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["testcpu"]["backend"] == "onnx" and rows["testcpu"]["precisions"] == ["int8", "fp32"]
    assert rows["testcpu"]["constraints"]["fully_integer"] is False

    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["acme-board"]["int8_tops"] == 2.5 and rows["acme-board"]["runtimes"] == {"onnxruntime": "1.20"}

    result = runner.invoke(app, ["devices", "show", "acme-board"])
    assert result.exit_code == 0 and "vendor: ACME" in result.stdout

    table = runner.invoke(app, ["targets"])
    assert table.exit_code == 0 and "testcpu" in table.stdout and "onnxruntime" in table.stdout


def test_earlier_search_path_shadows_builtin(extra_dirs):
    targets, _ = extra_dirs
    (targets / "testcpu.toml").write_text(TARGET.replace("ONNX Runtime on a CPU", "mine"))
    assert registry.get("targets", "testcpu").spec.description == "mine"
    assert registry.get("targets", "testcpu").path.parent == targets


def test_unknown_device_suggests_close_names(extra_dirs):
    _, devices = extra_dirs
    (devices / "acme-board.toml").write_text(DEVICE)
    with pytest.raises(UnknownNameError, match="did you mean 'acme-board'"):
        registry.get("devices", "acme-bord")
    result = runner.invoke(app, ["devices", "show", "acme-bord"])
    assert result.exit_code == 2 and "unknown device 'acme-bord'" in result.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (TARGET.replace('backend = "onnx"', 'backend = "tensorflow"'), "backend 'tensorflow' is not one of onnx, litert, executorch, openvino"),
        (TARGET.replace('precisions = ["int8", "fp32"]', 'precisions = ["int4"]'), "precisions[0]"),
        (TARGET.replace("[constraints]", "colour = 1\n[constraints]"), "unknown key 'colour'"),
        (TARGET.replace("static_shapes = true", "static_shape = true"), "did you mean 'static_shapes'"),
        (TARGET.replace("[constraints]", 'gates = ["agreement>>0.9"]\n[constraints]'), "not of the form"),
        ("description = 'x'\n", "missing required key 'backend'"),
        ("backend = [\n", "not valid TOML"),
    ],
)
def test_invalid_target_file_is_named(extra_dirs, text, needle):
    targets, _ = extra_dirs
    bad = targets / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        registry.entries("targets")
    assert str(info.value).startswith(str(bad)) and needle in str(info.value)
    result = runner.invoke(app, ["targets"])
    assert result.exit_code == 2 and str(bad) in result.stderr


def test_invalid_device_figures(extra_dirs):
    _, devices = extra_dirs
    (devices / "bad.toml").write_text(DEVICE.replace("memory_gb = 8", "memory_gb = -1"))
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 2 and "memory_gb" in result.stderr


def test_builtin_files_are_valid():
    """Every TOML file shipped with edgec loads (parametrised over the registry as it grows)."""
    from edgec.backends import get

    registry.clear_cache()
    for kind in ("targets", "devices"):
        files = sorted(p.stem for p in registry.builtin_dir(kind).glob("*.toml"))
        assert files and sorted(registry.entries(kind)) == files  # no file skipped, none invented
    for name, entry in registry.entries("targets").items():
        record = get(entry.spec.backend)
        assert entry.spec.runtime in record.runtimes and set(entry.spec.precisions) <= set(record.precisions), name
        if "int8" in entry.spec.precisions:
            assert record.quantizer(entry.spec.quantizer).methods, name


@pytest.mark.parametrize("line, needle", [
    ('quantizer = "qdq-symmetric"', "quantizer 'qdq-typo': the onnx backend has qdq-symmetric, qdq-asymmetric"),
    ('runtime = "onnxruntime"', "runtime 'litert': the onnx backend's artifacts run in onnxruntime, tensorrt"),
    ('backend = "onnx"', "backend 'tvm' is not one of"),
    ('precisions = ["int8", "fp32"]', "precision 'fp16': the executorch backend builds fp32, int8"),
])
def test_a_target_the_backend_cannot_build_is_refused_naming_the_file(extra_dirs, line, needle):
    targets, _ = extra_dirs
    text = {"quantizer": TARGET.replace(line, 'quantizer = "qdq-typo"'),
            "runtime": TARGET.replace(line, 'runtime = "litert"'),
            "backend": TARGET.replace(line, 'backend = "tvm"'),
            "precisions": TARGET.replace('backend = "onnx"', 'backend = "executorch"').replace(
                'runtime = "onnxruntime"', 'runtime = "executorch"').replace('quantizer = "qdq-symmetric"', "").replace(
                line, 'precisions = ["fp16", "fp32"]')}[line.split(" ")[0]]
    bad = targets / "bad.toml"
    bad.write_text(text)
    result = runner.invoke(app, ["targets"])
    assert result.exit_code == 2 and str(bad) in result.stderr and needle in result.stderr, result.output
