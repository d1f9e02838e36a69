"""A run no longer than its warm-up says so (the learning rate would only ramp up)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgec.cli import app


@pytest.mark.slow
def test_a_run_that_is_all_warm_up_says_so(tmp_path, tiny_edgec, shapes_data):
    config = tmp_path / "edgec.toml"
    config.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(tiny_edgec))}",
        "[student]", 'name = "test_efficientnet"',
        "[data]", f"train = {json.dumps(str(shapes_data / 'train'))}",
        "[distill]", "epochs = 1", "batch_size = 32", "warmup_epochs = 1.0",
        "[targets]", f"out = {json.dumps(str(tmp_path / 'build'))}",
    ]) + "\n")
    result = CliRunner().invoke(app, ["distill", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "note: distill.warmup_epochs = 1 covers the whole 1-epoch run" in result.stdout
    again = CliRunner().invoke(app, ["distill", "--config", str(config), "--no-progress", "--epochs", "2",
                                     "--out", str(tmp_path / "two")])
    assert again.exit_code == 0, again.output
    assert "covers the whole" not in again.stdout
