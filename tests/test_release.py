"""edgec release: every stage keyed by its inputs, records for CI, the build lock, and runs killed mid-stage."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

from .conftest import EXAMPLE, REPO

runner = CliRunner()
STUDENT = "test_efficientnet"  # timm's 99k-parameter test network: distils in seconds


def write_config(root: Path, data: Path, build: Path, *, epochs: int = 2, distill: str = "", gates: str = '["cosine_mean>=0.1"]',
                 extra: str = "", data_keys: str = "") -> Path:
    path = root / "edgec.toml"
    path.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(EXAMPLE / 'teacher'))}",
        "[student]", f'name = "{STUDENT}"',
        "[data]", f"train = {json.dumps(str(data / 'train'))}", f"eval = {json.dumps(str(data / 'eval'))}", data_keys,
        "[distill]", f"epochs = {epochs}", "batch_size = 16", "lr = 0.01", distill,
        "[calibration]", f"path = {json.dumps(str(data / 'train'))}", "num_images = 32",
        "[targets]", 'build = ["cpu"]', f"out = {json.dumps(str(build))}",
        "[gates]", f"default = {gates}", extra,
    ]) + "\n")
    return path


def release(config: Path, *args: str):
    return runner.invoke(app, ["release", "--config", str(config), *args])


def stages(build: Path) -> dict[str, str]:
    rel = json.loads((build / "release.json").read_text())
    return {f"{s['stage']} {s['name']}": s["status"] for s in rel["stages"]}


def snapshot(build: Path) -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every stage output (not the release records, which every run rewrites)."""
    return {p.relative_to(build).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(build.rglob("*")) if p.is_file() and not p.name.startswith(("release.", ".edgec.lock"))}


def copy_project(built: tuple[Path, Path], tmp_path: Path, data: Path, **config) -> tuple[Path, Path]:
    _, build = built
    dst = tmp_path / "build"
    shutil.copytree(build, dst, copy_function=shutil.copy2)
    return write_config(tmp_path, data, dst, **config), dst


@pytest.fixture(scope="module")
def built(tmp_path_factory, shapes_data) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("release")
    config = write_config(root, shapes_data, root / "build")
    result = release(config)
    assert result.exit_code == 0, result.output
    return config, root / "build"


def test_first_release_runs_every_stage_and_records_it(built):
    _, build = built
    assert stages(build) == {"golden golden": "ran", f"distill {STUDENT}": "ran", "quantize cpu": "ran", "compile cpu": "ran",
                             "verify cpu": "ran"}
    rel = json.loads((build / "release.json").read_text())
    assert rel["passed"] is True and list(rel["targets"]) == ["cpu"]
    cpu = rel["targets"]["cpu"]
    (art,) = cpu["artifacts"]
    path = build / "cpu" / art["path"]
    assert art["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and art["bytes"] == path.stat().st_size
    assert {f["path"] for f in cpu["files"]} >= {art["path"], "manifest.json", "labels.json", "text_embeddings.npy", "verify.json"}
    assert [g["gate"] for g in cpu["gates"]] == ["cosine_mean>=0.1"] and cpu["gates"][0]["passed"]
    assert 0.1 < cpu["metrics"][art["path"]]["cosine_mean"] <= 1
    assert all(len(rel["sources"][k]) == 64 for k in ("config", "teacher", "train", "eval", "calibration"))
    assert rel["versions"]["edgec"] and rel["versions"]["torch"] and rel["versions"]["onnxruntime"]
    assert rel["students"][STUDENT]["weights_sha256"] == json.loads(
        (build / "distill" / STUDENT / "student" / "edgec_student.json").read_text())["weights_sha256"]
    suite = ET.parse(build / "release.junit.xml").getroot()
    assert suite.tag == "testsuites" and [(t.get("tests"), t.get("failures")) for t in suite] == [("1", "0")]
    assert "| cpu | ✅ | model." in (build / "release.md").read_text()
    # the verify key is recorded beside the report it caches
    assert len(json.loads((build / "cpu" / "verify.json").read_text())["cache_key"]) == 64


def test_second_release_reuses_every_stage(built, tmp_path, monkeypatch):
    config, build = built
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    before = snapshot(build)
    result = release(config)
    assert result.exit_code == 0, result.output
    for line in ("golden: from cache", f"distill {STUDENT}: from cache", "cpu: up to date", "verify cpu: passed"):
        assert line in result.stdout
    assert "(from cache)" in result.stdout and "5 of 5 stages from cache" in result.stdout
    assert set(stages(build).values()) == {"cached"}
    assert snapshot(build) == before  # nothing rewritten
    assert "### edgec release: passed" in summary.read_text()
    result = release(config, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["passed"] is True


def test_changed_distill_key_reruns_distill_compile_verify_not_golden(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data, distill="warmup_epochs = 0.5")
    golden = snapshot(build / "golden")
    result = release(config)
    assert result.exit_code == 0, result.output
    assert stages(build) == {"golden golden": "cached", f"distill {STUDENT}": "ran", "quantize cpu": "ran",
                             "compile cpu": "ran", "verify cpu": "ran"}
    assert "inputs changed" in result.stdout and snapshot(build / "golden") == golden
    assert json.loads((build / "distill" / STUDENT / "manifest.json").read_text())["config"]["warmup_epochs"] == 0.5
    assert not (build / "distill" / f".{STUDENT}.work").exists()


def test_a_student_distilled_before_keys_were_recorded_is_adopted_when_its_recorded_inputs_match(built, tmp_path,
                                                                                                  shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data)
    path = build / "distill" / STUDENT / "manifest.json"
    legacy = json.loads(path.read_text())
    key = legacy.pop("cache")["key"]
    path.write_text(json.dumps(legacy))
    result = release(config)
    assert result.exit_code == 0, result.output
    assert f"distill {STUDENT}: from cache (recorded inputs match; key written)" in result.stdout
    assert set(stages(build).values()) == {"cached"} and json.loads(path.read_text())["cache"]["key"] == key

    legacy["config"]["lr"] = 0.5  # recorded with other settings: not adopted
    path.write_text(json.dumps(legacy))
    from edgec.config import load_config
    from edgec.distill import DistillConfig
    from edgec.distill.stage import cached_student, distill_inputs, inputs_key

    dcfg = DistillConfig.from_edgec(load_config(config), target="cpu")
    inputs = distill_inputs(dcfg)
    assert inputs_key(inputs) == key and cached_student(dcfg, inputs, key) is None


def test_changed_gate_reruns_only_verify_and_a_failing_gate_exits_1(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data, gates='["cosine_mean>=0.05", "agreement>=0.0"]')
    model = snapshot(build / "cpu")
    result = release(config)
    assert result.exit_code == 0, result.output
    assert stages(build) == {"golden golden": "cached", f"distill {STUDENT}": "cached", "quantize cpu": "cached",
                             "compile cpu": "cached", "verify cpu": "ran"}
    assert "only the gates changed" in result.stdout
    manifest = json.loads((build / "cpu" / "manifest.json").read_text())
    assert manifest["gates"] == ["cosine_mean>=0.05", "agreement>=0.0"]
    art = manifest["artifacts"][0]["path"]
    assert snapshot(build / "cpu")[art] == model[art]

    write_config(tmp_path, shapes_data, build, gates='["cosine_mean>=0.999"]')
    result = release(config)
    assert result.exit_code == 1, result.output
    assert "release failed: cpu:" in result.stderr and "cosine_mean>=0.999" in result.stderr
    rel = json.loads((build / "release.json").read_text())  # written also when a gate fails
    assert rel["passed"] is False and rel["targets"]["cpu"]["failures"]
    assert stages(build)["compile cpu"] == "failed"
    assert sum(int(t.get("failures")) for t in ET.parse(build / "release.junit.xml").getroot()) == 1
    assert "FAILED" in (build / "release.md").read_text()
    assert snapshot(build / "cpu")[art] == model[art]  # the last good artifact stays


def test_a_target_stopped_by_a_missing_toolchain_is_recorded_and_sets_the_exit_code(built, monkeypatch):
    import edgec.compile
    from edgec.errors import MissingToolchain

    config, build = built
    real = edgec.compile.compile_from_config

    def without_tensorrt(cfg, target, **kwargs):
        if target == "jetson":
            raise MissingToolchain("jetson needs a tool that is not installed", hint="install it")
        return real(cfg, target, **kwargs)

    monkeypatch.setattr(edgec.compile, "compile_from_config", without_tensorrt)
    result = release(config, "--targets", "cpu,jetson")
    assert result.exit_code == 3, result.output  # the other target still ran and the records are written
    rel = json.loads((build / "release.json").read_text())
    assert rel["exit_code"] == 3 and rel["targets"]["cpu"]["passed"] and not rel["targets"]["jetson"]["passed"]
    assert rel["targets"]["jetson"]["failures"] == ["compile: jetson needs a tool that is not installed (install it)"]
    assert "jetson: compile FAILED" in result.stdout and "release failed: jetson:" in result.stderr
    junit = ET.parse(build / "release.junit.xml").getroot()
    assert junit.find("testsuite[@name='edgec release jetson']/testcase/error") is not None
    assert release(config).exit_code == 0  # back to [targets] build


HOLD = "import sys, time\nfrom edgec.lock import build_lock\nwith build_lock(sys.argv[1], 'test holder'):\n" \
       "    print('locked', flush=True)\n    time.sleep(float(sys.argv[2]))\n"


def hold_lock(build: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(build), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_build_folder_is_refused_or_waited_for(built):
    config, build = built
    holder = hold_lock(build, 60)
    try:
        for args in (["release", "--config", str(config)], ["compile", "--target", "cpu", "--config", str(config)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            assert f"in use by pid {holder.pid}" in result.stderr and "'test holder'" in result.stderr
            assert "--wait" in result.stderr
    finally:
        holder.kill()  # a killed holder's lock file stays behind but does not block: the kernel dropped the flock
        holder.wait()
    assert json.loads((build / ".edgec.lock").read_text())["pid"] == holder.pid
    assert release(config).exit_code == 0

    holder = hold_lock(build, 1.5)
    result = release(config, "--wait")
    holder.wait()
    assert result.exit_code == 0, result.output
    assert "waiting for the lock" in result.stdout


def test_recover_restores_an_interrupted_replace_and_removes_partial_output(tmp_path):
    from edgec.release import recover

    build = tmp_path / "build"
    (build / ".cpu.old").mkdir(parents=True)  # killed between 'cpu -> .cpu.old' and '.cpu.x.partial -> cpu'
    (build / ".cpu.old" / "manifest.json").write_text("{}")
    (build / ".cpu.x1y2z3_4.partial").mkdir()
    (build / "jetson").mkdir()
    (build / ".jetson.old").mkdir()  # killed after the new folder landed
    (build / "jetson" / ".verify.json.abc12345.tmp").write_text("half")
    (build / "jetson" / ".keep.tmp").write_text("not ours")
    done = recover(build, log=lambda *_: None)
    assert (build / "cpu" / "manifest.json").is_file() and not (build / ".cpu.old").exists()
    assert sorted(p.name for p in build.iterdir()) == ["cpu", "jetson"]
    assert [p.name for p in (build / "jetson").iterdir()] == [".keep.tmp"] and len(done) == 3  # only edgec's temporaries


# ---------------------------------------------------------------- real runs killed mid-stage


class Proc:
    """`edgec release` in a subprocess, its output lines read as they come."""

    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        env.pop("GITHUB_STEP_SUMMARY", None)
        self.p = subprocess.Popen([sys.executable, "-m", "edgec.cli", "release", "--config", str(config)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(line) for line in self.p.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.q.get(timeout=1)
            except queue.Empty:
                assert self.p.poll() is None, "".join(self.lines)
                continue
            self.lines.append(line)
            if re.search(pattern, line):
                return
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n" + "".join(self.lines))

    def stop(self, sig: int) -> int:
        self.p.send_signal(sig)
        return self.p.wait(timeout=60)


def intact(folder: Path) -> dict:
    """The target folder's manifest, after checking every artifact against its sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        assert hashlib.sha256((folder / a["path"]).read_bytes()).hexdigest() == a["sha256"]
    return manifest


def visible_partials(build: Path) -> list[str]:
    return [str(p) for p in build.rglob("*") if p.name.endswith((".partial", ".tmp"))]


@pytest.mark.slow
def test_killed_distill_keeps_the_previous_student_and_the_next_run_resumes(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data, epochs=4)
    student = snapshot(build / "distill" / STUDENT)
    cpu = snapshot(build / "cpu")
    proc = Proc(config)
    proc.wait_for(r"epoch 2/4")
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    assert snapshot(build / "distill" / STUDENT) == student and snapshot(build / "cpu") == cpu  # previous outputs intact
    work = build / "distill" / f".{STUDENT}.work"
    assert json.loads((work / "last" / "trainer_state.json").read_text())["epoch"] >= 2

    result = release(config)
    assert result.exit_code == 0, result.output
    assert re.search(r"resuming the interrupted run from epoch [23]", result.stdout), result.stdout
    assert "resumed from" in result.stdout and "epoch 1/4" not in result.stdout
    assert stages(build) == {"golden golden": "cached", f"distill {STUDENT}": "resumed", "quantize cpu": "ran",
                             "compile cpu": "ran", "verify cpu": "ran"}
    manifest = json.loads((build / "distill" / STUDENT / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == 4 and len((build / "distill" / STUDENT / "metrics.csv").read_text().splitlines()) == 5
    assert not work.exists() and not visible_partials(build)
    intact(build / "cpu")


@pytest.mark.slow
def test_interrupted_compile_leaves_the_previous_target_and_the_next_run_completes(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data, extra='[quantize]\nmethod = "percentile"')
    before = snapshot(build / "cpu")
    old_key = json.loads((build / "cpu" / "manifest.json").read_text())["build"]["cache_key"]
    proc = Proc(config)  # Ctrl-C while the candidates are built
    proc.wait_for(r"cpu: exported fp32 ONNX")
    assert proc.stop(signal.SIGINT) != 0
    assert snapshot(build / "cpu") == before and not visible_partials(build)  # staged output removed on Ctrl-C

    proc = Proc(config)  # kill -9 at the same point: the half-written folder stays under its temporary name
    proc.wait_for(r"cpu: exported fp32 ONNX")
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    assert snapshot(build / "cpu") == before and visible_partials(build)

    result = release(config)
    assert result.exit_code == 0, result.output
    assert "half-written by an interrupted run" in result.stdout and not visible_partials(build)
    assert stages(build) == {"golden golden": "cached", f"distill {STUDENT}": "cached", "quantize cpu": "ran",
                             "compile cpu": "ran", "verify cpu": "ran"}
    assert intact(build / "cpu")["build"]["cache_key"] != old_key


def test_a_changed_golden_setting_rebuilds_the_golden_set(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data, data_keys="max_bad_fraction = 0.2")
    result = release(config)
    assert result.exit_code == 0, result.output
    assert stages(build)["golden golden"] == "ran"
    assert "golden: computing the teacher's outputs on the eval set (inputs changed: max_bad_fraction)" in result.stdout
    assert json.loads((build / "golden" / "golden.json").read_text())["max_bad_fraction"] == 0.2


def test_a_golden_set_missing_its_images_file_is_rebuilt(built, tmp_path, shapes_data):
    config, build = copy_project(built, tmp_path, shapes_data)
    (build / "golden" / "images.npy").unlink()
    result = release(config)
    assert result.exit_code == 0, result.output
    assert stages(build)["golden golden"] == "ran" and "(its files are missing or changed)" in result.stdout
    assert (build / "golden" / "images.npy").is_file()


def _jetson(build: Path) -> dict:
    return json.loads((build / "jetson" / "manifest.json").read_text())


@pytest.mark.slow
def test_a_tolerance_in_edgec_toml_changes_what_release_ships_and_the_lock_keeps_it(built, tmp_path, shapes_data):
    """jetson ships int8 whatever the timings: a tolerance below the all-int8 loss keeps layers in float, and that
    program is what the target folder holds; edgec.lock then rebuilds it without searching, and --locked refuses
    a release that would change it."""
    config, build = copy_project(built, tmp_path, shapes_data, extra="[quantize]\ntolerance = 0.5\nmax_fallback = 32")
    result = release(config, "--targets", "jetson")
    assert result.exit_code == 0, result.output
    loose = _jetson(build)
    q = loose["quantization"]
    assert q["shipped"] and q["float_layers"] == [] and q["search"]["met"] and q["method"] == "minmax"
    int8_loss = q["search"]["int8_loss"]
    assert int8_loss > 0

    write_config(tmp_path, shapes_data, build, extra=f"[quantize]\ntolerance = {int8_loss / 3!r}\nmax_fallback = 32")
    result = release(config, "--targets", "jetson")
    assert result.exit_code == 0, result.output
    assert stages(build)["quantize jetson"] == "ran" and stages(build)["compile jetson"] == "ran"
    tight = _jetson(build)
    q = tight["quantization"]
    assert q["float_layers"] and all(la["gain"] is not None for la in q["float_layers"])
    assert q["search"]["loss"] <= int8_loss / 3 < q["search"]["int8_loss"]
    assert q["search"]["cosine_mean"] > q["search"]["int8_cosine_mean"]  # closer to the float model
    assert q["cost"]["bytes"] > 0  # float weights cost size; recorded with the latency cost
    assert tight["artifacts"][0]["sha256"] != loose["artifacts"][0]["sha256"]
    rel = json.loads((build / "release.json").read_text())
    assert rel["targets"]["jetson"]["quantization"]["float_layers"] == [la["name"] for la in q["float_layers"]]
    lock = (tmp_path / "edgec.lock").read_text()
    assert "[targets.jetson.float_layers]" in lock and q["float_layers"][0]["name"] in lock

    # clean build: the lock's float layers are reused (no search), the same bytes ship
    shutil.rmtree(build / "jetson")
    shutil.rmtree(build / "quantized")
    result = release(config, "--targets", "jetson", "--locked")
    assert result.exit_code == 0, result.output
    assert "from the lock file (no search)" in result.stdout and "sensitivity" not in result.stdout
    assert _jetson(build)["artifacts"][0]["sha256"] == tight["artifacts"][0]["sha256"]
    assert _jetson(build)["quantization"]["search"]["decided_by"] == "lock"

    # a changed tolerance would change the lock: --locked refuses, --reselect decides again
    write_config(tmp_path, shapes_data, build, extra=f"[quantize]\ntolerance = {int8_loss / 2!r}\nmax_fallback = 32")
    result = release(config, "--targets", "jetson", "--locked")
    assert result.exit_code == 2 and "--reselect" in result.stderr
    assert (tmp_path / "edgec.lock").read_text() == lock
