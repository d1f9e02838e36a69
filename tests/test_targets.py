"""Every registered target, and the jetson / edgetpu / android-tflite builds verified in their runtimes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec import registry
from edgec.cli import app

from .conftest import expected_choice, write_project

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(registry.entries("targets")))
def test_every_target_has_a_backend_and_valid_gates(name):
    from edgec.backends import get
    from edgec.verify.gates import parse_gate

    spec = registry.get("targets", name).spec
    backend = get(spec.backend)
    assert spec.runtime in backend.runtimes and set(spec.precisions) <= set(backend.precisions)
    gates = [parse_gate(g) for g in spec.gates]
    # every target is gated on agreement with the teacher, with a threshold a real model can meet
    assert any(g.metric == "agreement" and g.op == ">=" and 0.5 <= g.threshold <= 1.0 for g in gates), spec.gates
    assert all(g.holds(1.0) and not g.holds(0.0) for g in gates if g.metric in ("agreement", "cosine_mean")), spec.gates
    if spec.select == "fastest-passing":
        assert len(spec.precisions) > 1


@pytest.mark.parametrize("name", sorted(registry.entries("devices")))
def test_every_device_takes_a_registered_target(name):
    assert registry.get("devices", name).spec.target in registry.entries("targets")


@pytest.fixture(scope="module")
def project(tmp_path_factory, shapes_data):
    root = tmp_path_factory.mktemp("targets")
    config = write_project(root, shapes_data)
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    return config, root / "build"


def compile_target(config: Path, *args: str):
    result = runner.invoke(app, ["compile", "--config", str(config), "--no-distill", "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return result


def test_jetson_qdq_onnx_with_trtexec_recipe(project):
    config, build = project
    compile_target(config, "--device", "orin-nano")
    folder = build / "jetson"
    manifest = json.loads((folder / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["path"] == "model.int8.onnx" and art["runtime"] == "tensorrt" and manifest["device"] == "orin-nano"
    assert manifest["inputs"][0]["shape"] == [1, 3, 64, 64] and manifest["inputs"][0]["dynamic_batch"] is False
    cache = (folder / "calibration.cache").read_text().splitlines()
    assert cache[0] == "TRT-100300-EntropyCalibration2" and len(cache) > 10  # orin-nano ships TensorRT 10.3
    scale = struct.unpack(">f", bytes.fromhex(cache[1].split(": ")[1]))[0]
    assert 0 < scale < 1
    script = (folder / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.int8.onnx --int8 --fp16 --memPoolSize=workspace:1024 --saveEngine=model.engine" in script
    assert (folder / "build_engine.sh").stat().st_mode & 0o111
    assert "run build_engine.sh" in manifest["tensorrt"]["engine_not_built"]
    import onnx

    ops = [n.op_type for n in onnx.load(str(folder / "model.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert manifest["isa"]["int8_form"]["weight_bits"] == 8  # TensorRT accumulates in int32: full 8-bit weights
    verify = runner.invoke(app, ["verify", str(folder), "--json"])
    assert verify.exit_code == 0, verify.output
    report = json.loads(verify.stdout)
    result = report["results"][0]
    m = result["metrics"]
    assert m["agreement"] >= 0.97 and m["cosine_mean"] > 0.99
    # no TensorRT here: the gated figure is the Q/DQ graph as written (ISA-independent); the host's fused int8
    # kernels ran the same file beside it, labelled and not gated, with the ISA they ran on
    assert "as written" in result["executed_by"] and report["host_isa"]["arch"]
    host = result["host_kernels"]
    assert "as written" not in host["executed_by"] and 0 < host["metrics"]["cosine_mean"] <= 1


def test_jetson_fp16_is_one_toml_fp16_onnx_with_a_trtexec_fp16_recipe(project):
    """A target variant is one file: fp16 ONNX (float32 I/O) and build_engine.sh with --fp16, no calibration."""
    import onnx

    config, build = project
    compile_target(config, "--target", "jetson-fp16")
    folder = build / "jetson-fp16"
    manifest = json.loads((folder / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["path"] == "model.fp16.onnx" and art["precision"] == "fp16" and art["runtime"] == "tensorrt"
    assert manifest["quantization"] is None and not (folder / "calibration.cache").exists()
    model = onnx.load(str(folder / art["path"]))
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 10 and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    script = (folder / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.fp16.onnx --fp16 --memPoolSize" in script and "--int8" not in script
    verify = runner.invoke(app, ["verify", str(folder), "--json"])
    assert verify.exit_code == 0, verify.output
    m = json.loads(verify.stdout)["results"][0]["metrics"]
    assert m["cosine_mean"] > 0.99 and m["agreement"] >= 0.97


@pytest.mark.slow
def test_openvino_backend_builds_nncf_int8_and_verifies_in_the_openvino_runtime(project):
    """A backend added as one module: OpenVINO IR (.xml + .bin) with NNCF int8, timed and verified here."""
    pytest.importorskip("openvino")
    config, build = project
    compile_target(config, "--target", "openvino")
    folder = build / "openvino"
    manifest = json.loads((folder / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["path"].endswith(".xml") and art["runtime"] == "openvino"
    assert [c["path"] for c in art["companions"]] == [art["path"][:-4] + ".bin"] and (folder / art["companions"][0]["path"]).is_file()
    assert {c["precision"] for c in manifest["selection"]["candidates"]} == {"int8", "fp32"}
    assert manifest["quantization"]["method"] == "minmax" and "NNCF" in manifest["quantization"]["form"]
    assert manifest["versions"].get("openvino") and manifest["versions"].get("nncf")
    verify = runner.invoke(app, ["verify", str(folder), "--json"])
    assert verify.exit_code == 0, verify.output
    m = json.loads(verify.stdout)["results"][0]["metrics"]
    chosen = next(c for c in manifest["selection"]["candidates"] if c["precision"] == manifest["selection"]["chosen"])
    assert m["cosine_mean"] == pytest.approx(chosen["metrics"]["cosine_mean"], abs=1e-5) and m["agreement"] >= 0.97


def test_a_method_the_targets_quantizer_does_not_honour_is_refused_before_any_build(project, tmp_path):
    """[quantize] method = "entropy": the edgetpu target's quantizer (ai-edge-quantizer) takes min/max only, so
    compile refuses it (exit 2, one line) instead of silently shipping another method; a per-target method fixes it."""
    from edgec.config import load_config

    config, build = project
    cfg = tmp_path / "edgec.toml"
    cfg.write_text(config.read_text() + '[quantize]\nmethod = "entropy"\n')
    result = runner.invoke(app, ["compile", "--config", str(cfg), "--no-distill", "--no-progress", "--target", "edgetpu"])
    assert result.exit_code == 2, result.output
    assert "does not take calibration method 'entropy'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (build / "quantized" / "edgetpu").exists()
    cfg.write_text(cfg.read_text() + '[quantize.targets.edgetpu]\nmethod = "minmax"\n')
    q = load_config(cfg).quantize
    assert q.method_for("edgetpu") == "minmax" and q.method_for("jetson") == "entropy"


def test_device_of_another_target_is_refused(project):
    config, _ = project
    result = runner.invoke(app, ["compile", "--config", str(config), "--no-distill", "--target", "cpu",
                                 "--device", "coral-usb"])
    assert result.exit_code == 2 and "takes target 'edgetpu'" in result.stderr


@pytest.mark.slow
def test_edgetpu_fully_integer_tflite_and_compatibility_report(project):
    config, build = project
    compile_target(config, "--target", "edgetpu")
    folder = build / "edgetpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["path"] == "model.int8.tflite" and art["format"] == "tflite"
    (inp,) = manifest["inputs"]
    assert inp["dtype"] == "int8" and inp["shape"] == [1, 64, 64, 3] and inp["quantization"]["scale"] > 0
    assert inp["preprocess"]["layout"] == "NHWC"
    ops = manifest["ops"]
    assert ops["float_ops"] == [] and ops["total"] > 20  # fully integer, or the build would have failed
    # a ViT's attention is not Edge TPU material: the report names the first op that leaves the TPU
    first = ops["first_unsupported"]
    assert first is not None and first["reasons"] and ops["mapped_in_one_subgraph"] == first["index"]
    assert 0 < ops["mapped_share"] < 1
    assert ops["edgetpu_compiler"]["ran"] is False and "not on PATH" in ops["edgetpu_compiler"]["reason"]
    # ... and the mapped-share gate (>= 95 % of ops in the TPU's one subgraph) fails it, naming that op and layer
    verify = runner.invoke(app, ["verify", str(folder)])
    assert verify.exit_code == 1, verify.output
    (line,) = [ln for ln in verify.stderr.splitlines() if ln.strip()]
    assert "gate mapped_share>=0.95 failed" in line and f"#{first['index']} {first['op']}" in line
    assert first["layer"] and f"in layer {first['layer']}" in line and "Traceback" not in verify.output
    result = json.loads((folder / "verify.json").read_text())["results"][0]
    assert result["metrics"]["mapped_share"] == ops["mapped_share"] and result["metrics"]["agreement"] >= 0.95
    assert [g["passed"] for g in result["gates"]] == [True, True, False]


@pytest.mark.slow
def test_android_tflite_ships_the_fastest_passing_precision(project):
    config, build = project
    compile_target(config, "--target", "android-tflite")
    manifest = json.loads((build / "android-tflite" / "manifest.json").read_text())
    sel = manifest["selection"]
    assert [c["precision"] for c in sel["candidates"]] == ["int8", "fp32"]
    assert sel["chosen"] == expected_choice(sel)
    # android-tflite's int8 is litert-torch's PT2E form: int8 convs with float islands (the edgetpu target's
    # fully integer form has none, see the edgetpu test); it tracks the fp32 candidate
    assert manifest["ops"]["candidates_float_ops"]["int8"] > 0
    int8, fp32 = sel["candidates"]
    assert abs(int8["metrics"]["cosine_mean"] - fp32["metrics"]["cosine_mean"]) < 0.01
    assert runner.invoke(app, ["verify", str(build / "android-tflite")]).exit_code == 0


def _distil_and_compile(tmp_path, shapes_data, target: str) -> dict:
    """A project whose student is distilled (1 epoch) and compiled for ``target`` (its gates open); the manifest."""
    config = write_project(tmp_path, shapes_data, extra=f'[gates]\n{target} = ["cosine_mean>=0.0"]\n')
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["compile", "--config", str(config), "--target", target, "--no-progress"])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "build" / target / "manifest.json").read_text())


@pytest.mark.slow
def test_all_convolution_student_maps_entirely_onto_the_edge_tpu(tmp_path, shapes_data):
    """Constant 4-D conv filters are fine; activations decide. A conv student has no op off the TPU."""
    ops = _distil_and_compile(tmp_path, shapes_data, "edgetpu")["ops"]
    assert ops["float_ops"] == [] and ops["first_unsupported"] is None
    assert ops["mapped_share"] == 1.0 and ops["mapped_in_one_subgraph"] == ops["total"]


@pytest.mark.slow
def test_android_pte_with_the_xnnpack_delegate(tmp_path, shapes_data):
    manifest = _distil_and_compile(tmp_path, shapes_data, "android")
    folder = tmp_path / "build" / "android"
    (art,) = manifest["artifacts"]
    assert art["format"] == "pte" and art["runtime"] == "executorch" and art["path"].endswith(".pte")
    assert [c["precision"] for c in manifest["selection"]["candidates"]] == ["int8", "fp32"]
    for precision, d in manifest["delegation"]["candidates"].items():
        assert d["delegate"] == "xnnpack" and d["delegated_subgraphs"] >= 1 and 0.5 < d["delegated_share"] <= 1
    int8 = next(c for c in manifest["selection"]["candidates"] if c["precision"] == "int8")
    fp32 = next(c for c in manifest["selection"]["candidates"] if c["precision"] == "fp32")
    assert abs(int8["metrics"]["cosine_mean"] - fp32["metrics"]["cosine_mean"]) < 0.05  # int8 tracks fp32
    verify = runner.invoke(app, ["verify", str(folder), "--json"])
    assert verify.exit_code == 0, verify.output
    m = json.loads(verify.stdout)["results"][0]["metrics"]
    chosen = next(c for c in manifest["selection"]["candidates"] if c["precision"] == manifest["selection"]["chosen"])
    assert m["cosine_mean"] == pytest.approx(chosen["metrics"]["cosine_mean"], abs=1e-5)  # same runtime, same numbers


@pytest.fixture
def own_config(project):
    """The module's project with edgec.toml restored after the test (tests that edit it must not leak the edit:
    a [quantize] method another target's quantizer refuses broke the next test that compiled that target)."""
    config, build = project
    text = config.read_text()
    yield config, build
    config.write_text(text)


def test_second_compile_with_unchanged_inputs_reuses_the_folder(own_config):
    config, build = own_config
    compile_target(config, "--target", "jetson")
    before = (build / "jetson" / "manifest.json").read_bytes()
    again = compile_target(config, "--target", "jetson")
    assert "jetson: up to date" in again.stdout and "exported" not in again.stdout  # nothing built again
    assert (build / "jetson" / "manifest.json").read_bytes() == before
    forced = compile_target(config, "--target", "jetson", "--force")  # --force rebuilds the quantize stage too
    assert "up to date" not in forced.stdout and "quantize: ONNX Q/DQ" in forced.stdout and "reused" not in forced.stdout
    config.write_text(config.read_text() + '[gates]\njetson = ["agreement>=0.9"]\n')  # only the gates changed:
    regated = compile_target(config, "--target", "jetson")  # jetson ships int8 whatever they are, so the folder stands
    assert "only the gates changed" in regated.stdout
    assert json.loads((build / "jetson" / "manifest.json").read_text())["gates"] == ["agreement>=0.9"]
    config.write_text(config.read_text() + '[quantize]\nmethod = "percentile"\n')  # an input changed
    changed = compile_target(config, "--target", "jetson")
    assert "up to date" not in changed.stdout and "percentile ranges" in changed.stdout


def _strip_volatile(manifest: dict) -> dict:
    """A manifest without what legitimately differs between two builds: wall times, measured latencies and
    whether a decision was timed or taken from edgec.lock."""
    manifest = json.loads(json.dumps(manifest))
    manifest["build"].pop("seconds")
    manifest.get("selection", {}).pop("decided_by", None)
    for cand in (manifest.get("selection") or {}).get("candidates", []):
        cand.pop("median_ms", None)
    if manifest.get("quantization"):
        manifest["quantization"].pop("seconds", None)
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("target", ["jetson", "edgetpu", "cpu", "jetson-fp16", "openvino"])
def test_two_clean_builds_are_byte_identical(project, tmp_path, target):
    """Same inputs, same bytes in every file: ONNX Q/DQ (jetson), fully integer TFLite (edgetpu), fp16 ONNX
    (jetson-fp16), and the targets that time their candidates (cpu, openvino), whose choice the first build
    records in edgec.lock and the second reuses."""
    config, _ = project
    lock = config.parent / "edgec.lock"
    lock.unlink(missing_ok=True)
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        compile_target(config, "--target", target, "--force", "--out", str(folder))
    selection = json.loads((folders[1] / "manifest.json").read_text())["selection"]
    if selection["policy"] == "fastest-passing":
        assert selection["decided_by"] == "lock" and f"[targets.{target}.precision]" in lock.read_text()
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == sorted(p.name for p in folders[1].iterdir())
    for name in files:
        a, b = (f / name for f in folders)
        if name == "manifest.json":
            assert _strip_volatile(json.loads(a.read_text())) == _strip_volatile(json.loads(b.read_text()))
        else:
            assert a.read_bytes() == b.read_bytes(), f"{target}: {name} differs between two builds"
