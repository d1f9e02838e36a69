"""golden -> compile --target cpu -> verify, on the example teacher; broken artifacts fail the gates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.manifest import sha256_file

from ..conftest import EXAMPLE, expected_choice, write_project  # noqa: F401 - write_project: shared, others import it here

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory, shapes_data):
    """A project with its golden set and the teacher compiled for the cpu target."""
    root = tmp_path_factory.mktemp("proj")
    config = write_project(root, shapes_data)
    result = runner.invoke(app, ["golden", "--config", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compile", "--target", "cpu", "--no-distill", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    return config, root / "build"


def copy_target(build: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "build"
    shutil.copytree(build, dst)
    return dst / "cpu"


def test_golden_set_records_teacher_outputs(built):
    from edgec.verify.golden import load_golden

    _, build = built
    golden = load_golden(build / "golden")
    assert golden.images.dtype == np.uint8 and golden.images.shape == (120, 64, 64, 3)
    assert golden.image_embeddings.shape == (120, 256) and golden.text_embeddings.shape == (24, 256)
    np.testing.assert_allclose(np.linalg.norm(golden.image_embeddings, axis=1), 1, atol=1e-5)
    assert golden.meta["device"] == "cpu" and len(golden.meta["captions"]) == 120
    assert golden.caption_embeddings.shape == (120 * 6, 256) and golden.caption_owner.max() == 119
    assert (golden.label_ids >= 0).all()


def test_compile_writes_the_manifest_contract(built):
    _, build = built
    folder = build / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema"] == 1 and manifest["target"] == "cpu"
    (art,) = manifest["artifacts"]
    selection = manifest["selection"]
    assert selection["policy"] == "fastest-passing" and [c["precision"] for c in selection["candidates"]] == ["int8", "fp32"]
    for c in selection["candidates"]:  # both measured here: the int8 Q/DQ model keeps the teacher's decisions
        assert c["passed"] and c["median_ms"] > 0 and c["metrics"]["agreement"] >= 0.97 and c["metrics"]["cosine_mean"] > 0.99
    assert art["precision"] == selection["chosen"] == expected_choice(selection)
    assert art["path"] == f"model.{art['precision']}.onnx" and art["format"] == "onnx" and art["runtime"] == "onnxruntime"
    assert not (folder / "calibration.cache").exists()  # cpu's int8 has uint8 activations: no TensorRT cache
    assert manifest["sources"]["calibration"]
    assert art["sha256"] == sha256_file(folder / art["path"]) and art["bytes"] == (folder / art["path"]).stat().st_size
    assert manifest["inputs"][0]["preprocess"]["size"] == [64, 64] and manifest["outputs"][0]["normalized"] is True
    assert manifest["head"]["kind"] == "zero-shot"
    assert json.loads((folder / "labels.json").read_text())[0] == "blue circle"
    text = np.load(folder / "text_embeddings.npy")
    assert text.dtype == np.float16 and text.shape == (24, 256)
    assert manifest["sources"]["teacher"] and manifest["gates"] == ["agreement>=0.97", "cosine_mean>=0.95"]
    assert not list(build.glob(".*partial"))
    isa = manifest["isa"]  # where the selection's figures were measured, and the int8 form: no device, exact on any CPU
    assert isa["build_host"]["arch"] and isa["target"] is None and isa["int8_form"]["weight_bits"] == 7


def test_verify_passes_and_writes_reports(built, tmp_path, monkeypatch):
    _, build = built
    folder = copy_target(build, tmp_path)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "verify.xml"
    result = runner.invoke(app, ["verify", str(folder), "--junit", str(junit), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    m = report["results"][0]["metrics"]
    assert m["images"] == 120 and m["agreement"] >= 0.97 and m["cosine_p1"] > 0.99
    assert abs(m["accuracy_delta"]) <= 0.03
    assert 0 < m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1  # captions present: image->text retrieval
    assert json.loads((folder / "verify.json").read_text())["passed"] is True
    assert json.loads((folder / "manifest.json").read_text())["metrics"][_artifact(folder).name]["agreement"] >= 0.97
    assert 'tests="2" failures="0"' in junit.read_text()
    assert "edgec verify: cpu (passed)" in summary.read_text()


def _artifact(folder: Path) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["artifacts"][0]["path"]


def _perturb_onnx(path: Path, scale: float) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:  # the weights of an fp32 model, or the int8 weights of a Q/DQ one
        w = numpy_helper.to_array(init)
        if w.size > 1000 and w.dtype in (np.float32, np.int8):
            noisy = w + rng.normal(0, scale * w.astype(np.float32).std(), w.shape)
            noisy = np.clip(np.round(noisy), -127, 127) if w.dtype == np.int8 else noisy
            init.CopyFrom(numpy_helper.from_array(noisy.astype(w.dtype), init.name))
    onnx.save(model, str(path))


def _rehash(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        art["sha256"] = sha256_file(folder / art["path"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_perturbed_weights_fail_the_gate(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    _perturb_onnx(_artifact(folder), 2.0)
    _rehash(folder)
    junit = tmp_path / "j.xml"
    result = runner.invoke(app, ["verify", str(folder), "--junit", str(junit)])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line.startswith(f"error: cpu/{_artifact(folder).name}: gate agreement>=0.97 failed: agreement = 0.")
    assert "threshold 0.97 (+1 more)" in line and len(line.splitlines()) == 1
    assert junit.read_text().count("<failure") == 2
    report = json.loads((folder / "verify.json").read_text())
    assert report["passed"] is False and report["results"][0]["metrics"]["agreement"] < 0.97


def test_wrong_input_scale_fails_the_gate(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0]["preprocess"]["std"] = [1.0, 1.0, 1.0]  # pixels fed ~4x too small
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and "gate agreement>=0.97 failed" in result.stderr


def test_gate_override_on_the_command_line(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    assert runner.invoke(app, ["verify", str(folder), "--gate", "cosine_p1>=0.99"]).exit_code == 0
    result = runner.invoke(app, ["verify", str(folder), "--gate", "cosine_mean>1.5"])
    assert result.exit_code == 1 and "gate cosine_mean>1.5 failed" in result.stderr
    result = runner.invoke(app, ["verify", str(folder), "--gate", "cosine>1"])
    assert result.exit_code == 2 and "unknown metric" in result.stderr


def test_truncated_artifact_and_manifest_mismatch(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    data = _artifact(folder).read_bytes()
    _artifact(folder).write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 2 and "does not match the sha256 in manifest.json" in result.stderr
    _rehash(folder)  # a truncated file with a matching manifest: the runtime refuses it
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 2 and "onnxruntime cannot load" in result.stderr


def test_golden_from_another_model_is_refused(built, tmp_path, tiny_edgec, shapes_data):
    _, build = built
    other = tmp_path / "other"
    other.mkdir()
    config = write_project(other, shapes_data, teacher=tiny_edgec)
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["verify", str(build / "cpu"), "--golden", str(other / "build" / "golden")])
    assert result.exit_code == 2 and "was made by another teacher" in result.stderr  # checked before the shapes


def test_verify_needs_no_torch_and_exit_3_without_the_runtime(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n{block}"
            "from edgec.cli import run\nsys.argv = ['edgec', 'verify', sys.argv[1]]\nrun()\n")
    ok = subprocess.run([sys.executable, "-c", code.format(block=""), str(folder)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "cpu: passed" in ok.stdout
    missing = subprocess.run([sys.executable, "-c", code.format(block="sys.modules['onnxruntime'] = None\n"), str(folder)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3, missing.stderr
    assert "pip install onnxruntime" in missing.stderr


def test_unknown_target_lists_known_ones(built):
    config, _ = built
    result = runner.invoke(app, ["compile", "--target", "cpuu", "--config", str(config)])
    assert result.exit_code == 2 and "unknown target 'cpuu'" in result.stderr and "did you mean 'cpu'" in result.stderr


def test_compile_distils_the_missing_student_first(tmp_path, shapes_data):
    config = write_project(tmp_path, shapes_data, extra='[gates]\ncpu = ["cosine_mean>=0.0"]\n')
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["compile", "--target", "cpu", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cpu: distill test_efficientnet: no student yet; distilling" in result.stdout
    manifest = json.loads((tmp_path / "build" / "cpu" / "manifest.json").read_text())
    assert manifest["model"] == "test_efficientnet" and manifest["sources"]["student"]
    again = runner.invoke(app, ["compile", "--target", "cpu", "--config", str(config), "--no-progress"])
    assert again.exit_code == 0 and "cpu: distill test_efficientnet: from cache" in again.stdout
    verify = runner.invoke(app, ["verify", str(tmp_path / "build" / "cpu"), "--gate", "cosine_mean>=0.0", "--json"])
    assert verify.exit_code == 0, verify.output
    assert 0.0 < json.loads(verify.stdout)["results"][0]["metrics"]["cosine_mean"] < 1.0


def test_bench_measures_each_artifact_and_the_teacher(built, tmp_path):
    config, build = built
    folder = copy_target(build, tmp_path)
    result = runner.invoke(app, ["bench", str(folder), "--runs", "5", "--warmup", "1", "--threads", "1",
                                 "--teacher", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (r,) = report["results"]
    assert r["runs"] == 5 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert r["throughput_ips"] == pytest.approx(1000 / r["median_ms"], rel=0.01)
    assert r["bytes"] == _artifact(folder).stat().st_size and r["peak_rss_mb"] > 10
    assert report["teacher"]["median_ms"] > 0 and report["teacher"]["name"] == "shapes-clip-teacher"
    assert json.loads((folder / "bench.json").read_text())["results"][0]["median_ms"] == r["median_ms"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_html_report_renders_in_chromium(built, tmp_path):
    import os

    from PIL import Image

    config, build = built
    folder = copy_target(build, tmp_path)
    assert runner.invoke(app, ["verify", str(folder)]).exit_code == 0
    assert runner.invoke(app, ["bench", str(folder), "--runs", "3", "--warmup", "1"]).exit_code == 0
    html = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(folder), "--html", str(html)])
    assert result.exit_code == 0, result.output
    text = html.read_text()
    assert "src='http" not in text and text.count("data:image/png;base64,") >= 2 + 8  # self-contained
    assert "artifact: " in text and "teacher: " in text and "pass" in text

    chromium = _chromium()
    if chromium is None:
        assert not os.environ.get("CI"), "CI must install Chromium (.ci/run does)"
        pytest.skip("Chromium is not installed")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400",
                           f"--screenshot={shot}", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.shape == (1400, 1200)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # text, plots and thumbnails, not a blank page


def test_report_needs_verified_folders(built, tmp_path):
    _, build = built
    folder = copy_target(build, tmp_path)
    (folder / "verify.json").unlink(missing_ok=True)
    result = runner.invoke(app, ["report", str(folder), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "has not been verified" in result.stderr


@pytest.mark.slow
def test_base_install_without_torch_verifies_onnx(built, tmp_path):
    """pip install edgec (no extras) into a fresh venv: no torch, and verify/inspect/bench still work."""
    from ..conftest import REPO

    _, build = built
    folder = copy_target(build, tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    edgec = str(venv / "bin" / "edgec")
    verify = subprocess.run([edgec, "verify", str(folder)], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr
    assert "cpu: passed" in verify.stdout and "agreement " in verify.stdout
    inspect = subprocess.run([edgec, "inspect", str(_artifact(folder)), "--json"], capture_output=True, text=True)
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["inputs"][0]["name"] == "pixels"
    bench = subprocess.run([edgec, "bench", str(folder), "--runs", "3", "--warmup", "1"], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    targets = subprocess.run([edgec, "targets", "--json"], capture_output=True, text=True)
    assert "cpu" in {t["name"] for t in json.loads(targets.stdout)}  # target files ship inside the wheel
    doctor = json.loads(subprocess.run([edgec, "doctor", "--json"], capture_output=True, text=True).stdout)
    cpu = next(t for t in doctor["targets"] if t["target"] == "cpu")
    assert cpu["can_verify"] is True and cpu["can_build"] is False and "torch" in cpu["missing_for_build"]


def test_no_passing_candidate_fails_compile_and_writes_nothing(tmp_path, shapes_data):
    config = write_project(tmp_path, shapes_data, extra='[gates]\ncpu = ["agreement>1"]\n')
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["compile", "--target", "cpu", "--no-distill", "--config", str(config), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "no candidate precision passes the gates" in result.stderr
    assert not (tmp_path / "build" / "cpu").exists() and not list((tmp_path / "build").glob(".cpu*"))


def test_int8_needs_calibration_images(tmp_path, shapes_data):
    config = write_project(tmp_path, shapes_data)
    config.write_text(config.read_text().replace("[calibration]", "[calibration.off]").replace(
        f"path = {json.dumps(str(shapes_data / 'train'))}\nnum_images = 32\n", ""))
    config.write_text("\n".join(ln for ln in config.read_text().splitlines() if "calibration.off" not in ln) + "\n")
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["compile", "--target", "cpu", "--no-distill", "--config", str(config), "--no-progress"])
    assert result.exit_code == 2 and "needs calibration images" in result.stderr and "[calibration] path" in result.stderr


def test_benchmarks_markdown_lists_teacher_and_every_candidate(built, tmp_path):
    config, build = built
    folder = copy_target(build, tmp_path)
    assert runner.invoke(app, ["verify", str(folder)]).exit_code == 0
    assert runner.invoke(app, ["bench", str(folder), "--runs", "3", "--warmup", "1", "--teacher", str(config)]).exit_code == 0
    md = tmp_path / "BENCHMARKS.md"
    result = runner.invoke(app, ["report", str(folder), "--html", str(tmp_path / "r.html"), "--benchmarks", str(md)])
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "## cpu" in text and "| teacher shapes-clip-teacher | fp32 | eager PyTorch |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| shapes-clip-teacher")]
    assert len(rows) == 2 and sum("(shipped)" in r for r in rows) == 1
    assert {r.split(" | ")[1] for r in rows} == {"int8", "fp32"}
