"""examples/ci: the pipelines parse, and every edgec command and option they call exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from edgec.cli import app

CI = Path(__file__).resolve().parents[2] / "examples" / "ci"
FILES = {"github-actions.yml": "github", "gitlab-ci.yml": "gitlab"}


def _scripts(doc, kind: str) -> list[str]:
    """Every shell line the pipeline runs."""
    lines: list[str] = []
    if kind == "github":
        for job in doc["jobs"].values():
            for step in job["steps"]:
                if "run" in step:
                    lines += step["run"].splitlines()
    else:
        for name, job in doc.items():
            if isinstance(job, dict) and "script" in job:
                for key in ("before_script", "script", "after_script"):
                    lines += job.get(key, [])
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _edgec_calls(lines: list[str]) -> list[list[str]]:
    calls = []
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            if words and words[0] == "edgec":
                calls.append(words[1:])
    return calls


def _check(cli, argv: list[str]) -> None:
    """Resolve the (sub)command and parse the options the way the real CLI would (typer's click command objects)."""
    cmd = cli
    args = list(argv)
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in cmd.commands, f"'edgec {' '.join(argv)}': no command {name!r} (has {sorted(cmd.commands)})"
        cmd = cmd.commands[name]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for word in args:
        if word.startswith("-"):
            assert word.split("=")[0] in known, f"'edgec {' '.join(argv)}': {cmd.name} has no option {word}"
    cmd.make_context(cmd.name, list(args), resilient_parsing=True)


@pytest.mark.parametrize("name", FILES)
def test_pipeline_parses_and_calls_only_real_commands(name):
    doc = yaml.safe_load((CI / name).read_text())
    calls = _edgec_calls(_scripts(doc, FILES[name]))
    commands = {c[0] for c in calls if c and not c[0].startswith("-")}
    assert {"release", "verify", "report", "doctor"} <= commands, commands
    cli = typer.main.get_command(app)
    for argv in calls:
        _check(cli, argv)


def test_the_checker_catches_a_wrong_command_and_option():
    cli = typer.main.get_command(app)
    with pytest.raises(AssertionError, match="no command"):
        _check(cli, ["relase"])
    with pytest.raises(AssertionError, match="no option"):
        _check(cli, ["verify", "build/cpu", "--gates", "x"])


def test_github_workflow_saves_the_build_even_when_a_gate_fails():
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())
    steps = doc["jobs"]["release"]["steps"]
    save = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache/save")]
    restore = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache/restore")]
    assert save and restore and save[0].get("if") == "always()" and save[0]["with"]["path"] == "build"
    assert steps.index(save[0]) > next(i for i, s in enumerate(steps) if s.get("id") == "release")
    assert all("cache" not in (s.get("with") or {}) for s in steps if "setup-python" in str(s.get("uses", "")))


def test_gitlab_caches_the_build_even_when_a_gate_fails():
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    assert all(c.get("when") == "always" for c in doc["edgec-release"]["cache"])


# ---- the on-device job, simulated: its steps on exactly the files the release job uploads, torch-free

def _expand(root: Path, pattern: str) -> set[Path]:
    """Files under ``root`` a glob names (a folder: everything in it), as upload-artifact and GitLab read them."""
    found: set[Path] = set()
    for p in root.glob(pattern.rstrip("/")) if pattern.rstrip("/") else [root]:
        if p.is_dir():
            found |= {f for f in p.rglob("*") if f.is_file()}
        elif p.is_file():
            found.add(p)
    return found


def uploaded_files(workspace: Path, kind: str) -> set[Path]:
    """The files of ``workspace`` the release job's artifact upload keeps (GitHub: path lines, '!' excludes,
    hidden files left out as upload-artifact v4 does; GitLab: artifacts paths minus exclude)."""
    if kind == "github":
        doc = yaml.safe_load((CI / "github-actions.yml").read_text())
        step = next(s for s in doc["jobs"]["release"]["steps"] if "upload-artifact" in str(s.get("uses", "")))
        lines = [ln.strip() for ln in step["with"]["path"].splitlines() if ln.strip()]
        keep = set().union(*(_expand(workspace, ln) for ln in lines if not ln.startswith("!")))
        drop = set().union(*(_expand(workspace, ln[1:]) for ln in lines if ln.startswith("!")))
        hidden = {f for f in keep if any(part.startswith(".") for part in f.relative_to(workspace).parts)}
        return keep - drop - hidden
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    artifacts = doc["edgec-release"]["artifacts"]
    keep = set().union(*(_expand(workspace, p) for p in artifacts["paths"]))
    drop = set().union(set(), *(_expand(workspace, p) for p in artifacts.get("exclude", [])))
    return keep - drop


def device_steps(kind: str) -> list[str]:
    """The device job's shell lines after its install step (which fetches edgec from the network)."""
    if kind == "github":
        doc = yaml.safe_load((CI / "github-actions.yml").read_text())
        steps = doc["jobs"]["on-device"]["steps"]
        verify = next(s for s in steps if s.get("name") == "Verify on the device")
        return [ln for ln in verify["run"].splitlines() if ln.strip()]
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    return list(doc["jetson-on-device"]["script"])


@pytest.fixture(scope="module")
def release_workspace(tmp_path_factory, tiny_edgec, shapes_data):
    """A repository after the release job: the jetson target with its text tower (tokenizer/), and the golden
    set, which compile makes first for jetson as for every target with eval data."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("ci-release")
    (root / "edgec.toml").write_text("\n".join([
        "[model]", f"path = {json.dumps(str(tiny_edgec))}",
        "[data]", f"eval = {json.dumps(str(shapes_data / 'eval'))}",
        "[calibration]", f"path = {json.dumps(str(shapes_data / 'train'))}", "num_images = 16",
        "[targets]", f"out = {json.dumps(str(root / 'build'))}", 'towers = ["image", "text"]',
    ]) + "\n")
    runner = CliRunner()
    for argv in (["compile", "--target", "jetson", "--no-distill", "--no-progress"],):
        result = runner.invoke(app, [*argv, "--config", str(root / "edgec.toml")])
        assert result.exit_code == 0, result.output
    assert (root / "build" / "jetson" / "tokenizer").is_dir() and (root / "build" / "golden" / "golden.npz").is_file()
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())  # the release job's bundle step, as written
    step = next(s for s in doc["jobs"]["release"]["steps"] if s.get("name") == "Verification bundle for the device")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in _edgec_calls(step["run"].splitlines()):
            result = runner.invoke(app, argv)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


def _download(workspace: Path, files: set[Path], dest: Path) -> Path:
    for f in files:
        target = dest / f.relative_to(workspace)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["github", "gitlab"])
def test_on_device_job_passes_on_the_uploaded_files_without_torch(kind, release_workspace, torch_free_venv, tmp_path):
    from ..verify.test_junit import validate_junit

    files = uploaded_files(release_workspace, kind)
    rel = {str(f.relative_to(release_workspace)) for f in files}
    assert "build/golden/golden.npz" in rel and "build/jetson/tokenizer/vocab.json" in rel, sorted(rel)
    assert "build/jetson.bundle.tar.gz" in rel, sorted(rel)  # what the device job verifies
    assert not any(r.startswith(("build/cache/", "build/quantize")) for r in rel), sorted(rel)
    device = _download(release_workspace, files, tmp_path / "device")
    env = {**os.environ, "PATH": f"{torch_free_venv}{os.pathsep}{os.environ['PATH']}", "EDGEC_LOG": str(tmp_path / "log")}
    script = "set -eu\n" + "\n".join(device_steps(kind)) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=device, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jetson: passed" in proc.stdout
    validate_junit((device / "build" / "jetson-device.junit.xml").read_text())


@pytest.mark.slow
def test_the_simulation_fails_when_the_upload_misses_the_bundle(release_workspace, torch_free_venv, tmp_path):
    """The device job needs the bundle the release job writes: without it verify refuses (exit 2, one line)."""
    files = {f for f in uploaded_files(release_workspace, "github") if not f.name.endswith(".bundle.tar.gz")}
    device = _download(release_workspace, files, tmp_path / "device")
    env = {**os.environ, "PATH": f"{torch_free_venv}{os.pathsep}{os.environ['PATH']}", "EDGEC_LOG": str(tmp_path / "log")}
    proc = subprocess.run(["bash", "-c", "set -eu\n" + "\n".join(device_steps("github"))], cwd=device, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "jetson.bundle.tar.gz" in proc.stderr, proc.stderr
