"""compile --target all: targets in parallel, each in its own process; every result and error collected."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from edgec.cli import app

from .conftest import write_project

runner = CliRunner()


def test_target_all_compiles_in_parallel_and_collects_each_error(tmp_path, shapes_data, tiny_edgec):
    # cpu cannot pass agreement > 1 (GateFailed after building); jetson ships its int8 model
    config = write_project(tmp_path, shapes_data, teacher=tiny_edgec, extra='[gates]\ncpu = ["agreement>=1.01"]\n')
    config.write_text(config.read_text().replace("[targets]\n", '[targets]\nbuild = ["cpu", "jetson"]\n', 1))
    result = runner.invoke(app, ["compile", "--config", str(config), "--target", "all", "--no-distill", "--jobs", "2",
                                 "--no-progress"])
    assert result.exit_code == 1, result.output  # the gate failure's exit code
    out = result.stdout
    assert "compiling 2 targets, 2 at a time, each in its own process" in out
    assert "jetson: quantize: ONNX Q/DQ" in out and "cpu: candidate fp32" in out  # worker lines, prefixed by target
    assert "[2/2]" in out and "jetson: ran in" in out
    assert "1 of 2 targets failed (cpu)" in result.stderr and "no candidate precision passes" in result.stderr
    build = tmp_path / "build"
    manifest = json.loads((build / "jetson" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["path"] == "model.int8.onnx"
    assert not (build / "cpu").exists()
    # unchanged inputs: jetson reused; cpu left no folder, so it is built (and fails) again
    again = runner.invoke(app, ["compile", "--config", str(config), "--target", "all", "--no-distill", "--json"])
    rows = {r["target"]: r for r in json.loads(again.stdout)}
    assert rows["jetson"]["status"] == "cached" and rows["cpu"]["status"] == "failed" and again.exit_code == 1


def test_up_to_date_targets_are_settled_without_starting_workers(tmp_path, shapes_data, tiny_edgec):
    config = write_project(tmp_path, shapes_data, teacher=tiny_edgec)
    config.write_text(config.read_text().replace("[targets]\n", '[targets]\nbuild = ["jetson", "edgetpu"]\n', 1))
    args = ["compile", "--config", str(config), "--target", "all", "--no-distill", "--jobs", "2", "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 at a time, each in its own process" in first.stdout
    before = {t: (tmp_path / "build" / t / "manifest.json").read_bytes() for t in ("jetson", "edgetpu")}
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "each in its own process" not in again.stdout  # nothing left to build: no worker started
    assert "jetson: up to date" in again.stdout and "edgetpu: up to date" in again.stdout
    assert {t: (tmp_path / "build" / t / "manifest.json").read_bytes() for t in before} == before
