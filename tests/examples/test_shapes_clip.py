"""The shapes-clip example: deterministic data, a committed teacher that reproduces its README."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.config import load_config
from edgec.manifest import sha256_file

from ..conftest import EXAMPLE

runner = CliRunner()
TEACHER = EXAMPLE / "teacher"


def readme_figure(label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| `?([^|`]+?)`? \|", (EXAMPLE / "README.md").read_text(), re.M)
    assert match, f"README has no row '{label}'"
    return match.group(1).strip()


def test_generator_is_deterministic(tmp_path):
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path / out),
                        "--splits", "calibration", "--scale", "0.25"], check=True, capture_output=True)
    a, b = tmp_path / "a" / "calibration", tmp_path / "b" / "calibration"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 24 * 2 + 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    rows = [json.loads(line) for line in (a / "captions.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == {f"{c} {s}" for c in ("red", "green", "blue", "yellow")
                                          for s in ("circle", "square", "triangle", "diamond", "star", "cross")}
    assert all(len(r["captions"]) == 6 and r["label"] in r["captions"][0] for r in rows)


def test_committed_teacher_matches_its_recorded_hash():
    cfg = json.loads((TEACHER / "edgec_model.json").read_text())
    assert sha256_file(TEACHER / "model.safetensors") == cfg["weights_sha256"] == readme_figure("weights sha256")
    assert (TEACHER / "model.safetensors").stat().st_size <= 25 * 1024 * 1024


def test_teacher_inspect_shows_a_vit_of_at_least_4m_params():
    result = runner.invoke(app, ["inspect", "--config", str(EXAMPLE / "edgec.toml"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["towers"]["image"]["params"] >= 4_000_000
    assert info["towers"]["text"]["params"] > 0 and info["towers"]["image"]["macs"] > 0
    assert info["preprocess"]["size"] == [64, 64]
    student = info["student"]  # the configured student, beside the teacher
    assert student["name"] == "mobilevit_xxs" and student["output"]["shape"] == [1, 256]
    assert student["vs_teacher_image_tower"]["params_ratio"] == round(info["towers"]["image"]["params"] / student["params"], 2)
    assert student["vs_teacher_image_tower"]["macs_ratio"] > 1


def test_example_config_loads():
    config = load_config(EXAMPLE / "edgec.toml")
    assert config.resolve(config.model.path) == TEACHER
    assert config.student.targets["edgetpu"] == "mobilenetv4_conv_small"


@pytest.mark.slow
def test_eval_accuracy_reproduces_the_readme(tmp_path):
    """The README's command on a freshly generated eval split gives the README's figure (within 1 point)."""
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path), "--splits", "eval"],
                   check=True, capture_output=True)
    proc = subprocess.run([sys.executable, str(EXAMPLE / "evaluate.py"), "--data", str(tmp_path / "eval"), "--json"],
                          check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout)
    assert result["images"] == 600 and result["classes"] == 24
    assert result["zero_shot_top1"] >= 0.85
    assert abs(result["zero_shot_top1"] - float(readme_figure("eval zero-shot top-1"))) <= 0.01
