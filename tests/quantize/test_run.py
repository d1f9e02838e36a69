"""edgec quantize: folder layout, manifest, tolerance, NaN calibration, the BENCHMARKS.md section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.quantize.compare import keep_sections, write_section

from ..verify.test_verify import write_project

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory, shapes_data):
    root = tmp_path_factory.mktemp("quantize")
    return write_project(root, shapes_data), root / "build"


def test_quantize_writes_one_folder_per_backend(project):
    config, build = project
    result = runner.invoke(app, ["quantize", "--config", str(config), "--no-distill", "--backend", "onnx",
                                 "--tolerance", "0.5", "--no-progress"])
    assert result.exit_code == 0, result.output
    folder = build / "quantize" / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.int8.onnx", "sensitivity.json",
                                                        "sensitivity.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["backend"] == "onnx"
    # measured in the form the cpu target ([targets] build) ships: asymmetric uint8 activations, as compile builds it
    assert manifest["target"] == "cpu" and manifest["quantizer"] == "qdq-asymmetric" and "asymmetric" in manifest["form"]
    (art,) = manifest["artifacts"]
    assert art["path"] == "model.int8.onnx" and art["precision"] == "int8" and art["bytes"] == (folder / art["path"]).stat().st_size
    cal = manifest["calibration"]
    assert len(cal["sha256"]) == 64 and cal["images"] == 32 and cal["method"] == "minmax"
    assert manifest["sources"]["calibration"] == cal["sha256"] and manifest["ranges"]["tensors"] > 0
    m = manifest["metrics"]
    assert m["runtime"] == "onnxruntime" and 0.9 < m["vs_float"]["cosine_mean"] <= 1.0 + 1e-6
    assert m["vs_float"]["images"] == 120 and "agreement" in m["vs_float"] and "agreement" in m["vs_teacher"]
    fb = manifest["fallback"]  # a loose tolerance: met by plain int8, nothing in float
    assert fb["tolerance"] == 0.5 and fb["met"] and fb["float_layers"] == [] and manifest["layers"]["float"] == []
    sens = json.loads((folder / "sensitivity.json").read_text())
    assert len(sens["layers"]) == manifest["layers"]["quantizable"] > 0
    errors = [r["error"] for r in sens["layers"]]
    assert errors == sorted(errors, reverse=True)
    assert (folder / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tight_tolerance_keeps_layers_in_float_and_reports_their_cost(project, tmp_path):
    config, build = project
    int8 = json.loads((build / "quantize" / "onnx" / "manifest.json").read_text())["fallback"]["int8_loss"]
    tolerance = int8 / 3  # tighter than plain int8 reaches
    out, bench = tmp_path / "q", tmp_path / "BENCHMARKS.md"
    result = runner.invoke(app, ["quantize", "--config", str(config), "--no-distill", "--backend", "onnx", "--out", str(out),
                                 "--tolerance", f"{tolerance:.8f}", "--max-fallback", "40", "--benchmarks", str(bench),
                                 "--eval-images", "48"])
    assert result.exit_code == 0, result.output
    assert "layer(s) in float for tolerance" in result.output
    section = bench.read_text()
    assert "<!-- edgec-section: quantize-fallback -->" in section and "| onnx | minmax | yes |" in section
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    fb = manifest["fallback"]
    assert fb["met"] and fb["loss"] <= tolerance < fb["int8_loss"] and fb["float_layers"]
    # the cost is measured, not assumed: float weights add bytes, dropped Q/DQ nodes remove some (it can be < 0)
    (art,) = manifest["artifacts"]
    all_int8 = fb["cost"]["all_int8"]
    assert all_int8["bytes"] > 0 and fb["cost"]["bytes"] == art["bytes"] - all_int8["bytes"]
    assert "median_ms" in fb["cost"] and fb["cost"]["cosine_mean"] == pytest.approx(
        manifest["metrics"]["vs_float"]["cosine_mean"] - all_int8["vs_float"]["cosine_mean"])
    assert manifest["layers"]["float"] == sorted(la["name"] for la in fb["float_layers"])
    ranked = [r["name"] for r in json.loads((out / "onnx" / "sensitivity.json").read_text())["layers"]]
    # every fallback layer comes from the top of the ranking that greedy walked
    assert all(ranked.index(la["name"]) < len(fb["greedy_steps"]) for la in fb["float_layers"])


def test_unreachable_tolerance_is_exit_1_with_the_folder_written(project, tmp_path):
    config, _ = project
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "--config", str(config), "--no-distill", "--backend", "onnx", "--out", str(out),
                                 "--tolerance", "0", "--max-fallback", "1", "--eval-images", "16"])
    assert result.exit_code == 1, result.output
    assert "tolerance 0 not met on onnx" in result.output
    fb = json.loads((out / "onnx" / "manifest.json").read_text())["fallback"]
    assert not fb["met"] and len(fb["float_layers"]) == 1


def test_nan_calibration_is_exit_2_and_writes_nothing(project, tmp_path):
    import torch

    from edgec.data.preprocess import Preprocess
    from edgec.models.student import StudentSpec, create_student, save_student

    config, _ = project
    text = config.read_text()
    build = tmp_path / "build"
    cfg = tmp_path / "edgec.toml"
    cfg.write_text(text.replace(f'out = {json.dumps(str(config.parent / "build"))}', f"out = {json.dumps(str(build))}"))
    # a distilled student whose weights hold a NaN
    student_dir = build / "distill" / "test_efficientnet"
    spec = StudentSpec("test_efficientnet", 256, Preprocess(size=(64, 64)))
    student = create_student(spec, seed=0)
    with torch.no_grad():
        next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d)).weight[0, 0, 0, 0] = float("nan")
    save_student(student, spec, student_dir / "student")
    (student_dir / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["quantize", "--config", str(cfg), "--backend", "onnx", "--no-sensitivity"])
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.output and "NaN" in result.output
    assert not (build / "quantize").exists() or not any((build / "quantize").iterdir())


def test_unknown_backend_and_method_are_exit_2(project):
    config, _ = project
    result = runner.invoke(app, ["quantize", "--config", str(config), "--no-distill", "--backend", "tensorrt"])
    assert result.exit_code == 2 and "unknown backend" in result.output
    # the litert backend measured in edgetpu's fully integer form (ai-edge-quantizer: min/max ranges only)
    edgetpu = config.parent / "edgetpu.toml"
    edgetpu.write_text(config.read_text().replace("[targets]\n", '[targets]\nbuild = ["edgetpu"]\n', 1))
    result = runner.invoke(app, ["quantize", "--config", str(edgetpu), "--no-distill", "--backend", "litert",
                                 "--method", "entropy"])
    assert result.exit_code == 2 and "does not take calibration method 'entropy'" in result.output
    assert "edgetpu target's form" in result.output and "it takes minmax" in result.output


def test_benchmarks_section_survives_a_rewrite(tmp_path: Path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nold tables\n")
    write_section(path, "quantize-compare", "## Quantization\n\n| a |\n")
    write_section(path, "quantize-compare", "## Quantization\n\n| b |\n")  # replaced, not appended twice
    text = path.read_text()
    assert text.count("## Quantization") == 1 and "| b |" in text and "old tables" in text
    rewritten = keep_sections(text, "# Benchmarks\n\nnew tables\n")
    assert "new tables" in rewritten and "old tables" not in rewritten and "| b |" in rewritten
    assert keep_sections(text, rewritten) == rewritten  # idempotent
