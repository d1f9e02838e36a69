"""The CLI contract: --version, -h, exit codes, one-line errors, --traceback, startup without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_traceback_flag_shows_the_exception_and_keeps_the_exit_code(tmp_path):
    result = runner.invoke(app, ["--traceback", "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2, result.output
    assert "Traceback (most recent call last)" in result.stderr and "InputError: model not found" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: model not found")


@pytest.mark.parametrize(("argv", "needle"), [
    (["compyle"], "No such command 'compyle'. Did you mean 'compile'? (see 'edgec -h')"),
    (["verify"], "Missing argument 'folder'. (see 'edgec verify -h')"),
    (["verify", "x", "--gates", "a"], "No such option: --gates"),
    (["bench", "x", "--runs", "0"], "Invalid value for '--runs'"),
    (["verify", "x", "--threads", "0"], "Invalid value for '--threads'"),
    (["devices", "show"], "Missing argument 'name'. (see 'edgec devices show -h')"),
])
def test_usage_errors_are_one_line_exit_2(argv, needle):
    result = runner.invoke(app, argv, prog_name="edgec")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_bare_edgec_prints_the_help():
    result = runner.invoke(app, [], prog_name="edgec")
    assert result.exit_code == 0 and "Commands" in result.stdout and not result.stderr


def test_help_keeps_toml_section_names():
    result = runner.invoke(app, ["distill", "-h"], prog_name="edgec")
    assert "[distill]" in result.stdout


def test_unexpected_errors_are_one_line_and_logged(tmp_path, monkeypatch):
    """An exception edgec does not anticipate: one line naming it, exit 2, its traceback in the log."""
    import edgec.registry

    def boom(*_a, **_k):
        raise ZeroDivisionError("division by zero in a place nobody expected")

    monkeypatch.setenv("EDGEC_LOG", str(tmp_path / "edgec.log"))
    monkeypatch.setattr(edgec.registry, "entries", boom)
    result = runner.invoke(app, ["targets"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected ZeroDivisionError: division by zero"), lines
    assert str(tmp_path / "edgec.log") in lines[0]
    assert "Traceback" in (tmp_path / "edgec.log").read_text()


def test_os_errors_are_one_line_exit_2(tmp_path, monkeypatch):
    import errno

    import edgec.registry

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "build" / "x.onnx"))

    monkeypatch.setattr(edgec.registry, "entries", full)
    result = runner.invoke(app, ["targets"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: cannot use {tmp_path / 'build' / 'x.onnx'}: No space left on device "
                                     "(free some space on that disk, or pass --out to a folder on another one)")


def test_library_warnings_go_to_the_log_unless_verbose(tmp_path):
    """Warnings and log records from libraries never come before edgec's own line; --verbose shows them."""
    code = (
        "import sys, warnings, logging\n"
        "import edgec.registry as r\n"
        "def noisy(*a, **k):\n"
        "    warnings.warn('a library UserWarning', UserWarning)\n"
        "    logging.warning('a root WARNING record')\n"
        "    print('W1201 raw stderr chatter', file=sys.stderr)\n"
        "    import os; os.write(2, b'[W:native] C++ chatter on fd 2\\n')\n"
        "    from edgec.errors import InputError\n"
        "    raise InputError('the real problem')\n"
        "r.entries = noisy\n"
        "from edgec.cli import run\n"
        "sys.argv = ['edgec'] + sys.argv[1:]\n"
        "run()\n"
    )
    env = {**os.environ, "EDGEC_LOG": str(tmp_path / "edgec.log")}
    quiet = subprocess.run([sys.executable, "-c", code, "targets"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr == "error: the real problem\n", quiet.stderr
    log = (tmp_path / "edgec.log").read_text()
    for text in ("a library UserWarning", "a root WARNING record", "W1201 raw stderr chatter", "C++ chatter on fd 2"):
        assert text in log
    loud = subprocess.run([sys.executable, "-c", code, "--verbose", "targets"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert loud.returncode == 2 and loud.stderr.rstrip().splitlines()[-1] == "error: the real problem"
    for text in ("a library UserWarning", "a root WARNING record", "W1201 raw stderr chatter"):
        assert text in loud.stderr


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


def test_doctor_names_the_pip_extra_to_install(monkeypatch):
    import json

    import edgec.doctor as doctor

    monkeypatch.setattr(doctor, "_installed", lambda m: m not in ("torch", "onnxruntime"))
    info = doctor.diagnose()
    cpu = next(t for t in info["targets"] if t["target"] == "cpu")
    assert not cpu["can_build"] and "pip install 'edgec[compile]'" in cpu["install"]
    assert not cpu["can_verify"] and "pip install edgec" in cpu["install"]  # onnxruntime is in the base install
    torch_row = next(p for p in info["packages"] if p["module"] == "torch")
    assert torch_row["install"] == "pip install 'edgec[compile]'"
    result = runner.invoke(app, ["doctor"])
    assert "pip install 'edgec[compile]'" in result.stdout and "torch" in result.stdout
    json.dumps(info)
