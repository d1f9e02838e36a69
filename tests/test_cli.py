"""The CLI contract: --version, -h, exit codes, one-line errors, --traceback, startup without torch."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from edgec import __version__
from edgec.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"edgec {__version__}"


def test_help_alias_lists_the_commands():
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0
    for command in ("init", "inspect", "targets", "devices"):
        assert command in result.stdout


def test_unknown_command_is_usage_error_exit_2():
    result = runner.invoke(app, ["compyle"])
    assert result.exit_code == 2


def test_traceback_flag_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--traceback", "inspect", str(tmp_path / "missing")])
    assert result.exit_code != 0 and result.exception is not None
    assert "model not found" in str(result.exception)


def test_json_error_goes_to_stdout_too(tmp_path):
    import json

    result = runner.invoke(app, ["inspect", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["exit_code"] == 2 and "model not found" in data["error"]


def test_cli_imports_no_torch_for_light_commands():
    code = "import sys; import edgec.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_doctor_reports_the_toolchain():
    import json

    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    versions = {p["package"]: p["version"] for p in info["packages"]}
    assert versions["torch"] and versions["onnxruntime"] and versions["timm"]
    cpu = next(t for t in info["targets"] if t["target"] == "cpu")
    assert cpu["can_build"] and cpu["can_verify"] and not cpu["missing_for_build"]
    table = runner.invoke(app, ["doctor"])
    assert table.exit_code == 0 and "onnxruntime" in table.stdout and "cpu" in table.stdout
