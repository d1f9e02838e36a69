"""examples/ci: the pipelines parse, and every edgec command and option they call exists."""

from __future__ import annotations

import re
import shlex
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


def test_github_workflow_uploads_what_release_writes():
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and all(p in uploads[0]["with"]["path"] for p in ("build/release.json", "build/release.junit.xml"))
    assert any(str(s.get("uses", "")).startswith("actions/cache") for s in steps)
