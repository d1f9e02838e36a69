"""edgec verify --on ssh://: against a real OpenSSH server on 127.0.0.1, with torch-free venvs as the device."""

from __future__ import annotations

import json
import subprocess
import tempfile

import pytest
from typer.testing import CliRunner

from edgec.cli import app

from .conftest import base_python, free_port

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture
def scratch_tmp(tmp_path, monkeypatch):
    """edgec's temporary files go here, so a test can see that nothing is left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def verify_on(sshd, target, remote, *args):
    return runner.invoke(app, ["verify", str(target), *sshd.options(remote), "--images", "12", *args])


def test_bad_address_and_unreachable_host(device_build, tmp_path):
    result = runner.invoke(app, ["verify", str(device_build / "cpu"), "--on", "http://somewhere"])
    assert result.exit_code == 2 and "ssh://[user@]host[:port]" in result.stderr
    known = tmp_path / "known_hosts"
    known.write_text("")
    port = free_port()  # nothing listens there
    result = runner.invoke(app, ["verify", str(device_build / "cpu"), "--on", f"ssh://me@127.0.0.1:{port}",
                                 "--known-hosts", str(known)])
    assert result.exit_code == 3, result.output
    assert f"cannot reach ssh://me@127.0.0.1:{port}" in result.stderr and "Connection refused" in result.stderr
    assert not (device_build / "cpu" / "verify.device.json").exists()


def test_unknown_host_key_is_refused(device_build, sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = runner.invoke(app, ["verify", str(device_build / "cpu"), "--on", sshd.url, "--known-hosts", str(empty),
                                 "--identity", str(sshd.identity)])
    assert result.exit_code == 2 and "host key of 127.0.0.1" in result.stderr and "ssh-keyscan" in result.stderr
    assert "\n" not in result.stderr.strip() and "Traceback" not in result.output


def test_device_without_the_runtime(device_build, sshd, device_venv, tmp_path, scratch_tmp):
    assert subprocess.run([device_venv / "bin" / "python", "-c", "import torch"], capture_output=True).returncode != 0
    result = verify_on(sshd, device_build / "cpu", tmp_path / "remote", "--edgec", str(device_venv / "bin" / "edgec"))
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert line.startswith("error: on 127.0.0.1:") and "'onnxruntime'" in line and "pip install onnxruntime" in line
    assert not (device_build / "cpu" / "verify.device.json").exists() and not list(scratch_tmp.iterdir())
    # no edgec at all on the device
    result = verify_on(sshd, device_build / "cpu", tmp_path / "remote", "--edgec", str(tmp_path / "nowhere" / "edgec"))
    assert result.exit_code == 3 and "edgec is not installed on 127.0.0.1" in result.stderr and "--install" in result.stderr


def test_install_then_verify_on_the_device(device_build, sshd, tmp_path, scratch_tmp):
    remote = tmp_path / "remote"
    junit = tmp_path / "device.xml"
    result = verify_on(sshd, device_build / "cpu", remote, "--install", "--python", base_python(), "--json",
                       "--junit", str(junit))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = json.loads((device_build / "cpu" / "verify.device.json").read_text())
    assert saved == report and report["executed_on"] == "device" and report["reached_by"] == sshd.url
    machine = report["machine"]
    assert machine["hostname"] and machine["os"] and machine["python"] and machine["runtimes"]["onnxruntime"]
    assert report["device_edgec"].endswith("/venv/bin/edgec") and str(remote) in report["remote_report"]
    m = report["results"][0]["metrics"]
    assert m["images"] == 12 and m["agreement"] >= 0.97
    assert report["host_comparison"]["same"] is True  # same onnxruntime, same CPU: the host's metrics exactly
    assert 'tests="2" failures="0"' in junit.read_text()
    venv_python = remote / "venv" / "bin" / "python"
    assert subprocess.run([venv_python, "-c", "import torch"], capture_output=True).returncode != 0  # torch-free
    assert not list(scratch_tmp.iterdir())
    # a gate the device fails: exit 1, its report still comes back
    (device_build / "cpu" / "verify.device.json").unlink()
    result = verify_on(sshd, device_build / "cpu", remote, "--edgec", str(remote / "venv" / "bin" / "edgec"),
                       "--gate", "cosine_mean>=1.5")
    assert result.exit_code == 1 and "on 127.0.0.1: " in result.stderr and "cosine_mean>=1.5" in result.stderr
    report = json.loads((device_build / "cpu" / "verify.device.json").read_text())
    assert report["passed"] is False and report["executed_on"] == "device"
    (device_build / "cpu" / "verify.device.json").unlink()


DROPPING_EDGEC = """#!/bin/sh
# the device's edgec, except that 'verify' loses the ssh connection once it has started
if [ "$1" = verify ]; then
  pid=$$
  while [ "$pid" -gt 1 ]; do
    pid=$(cut -d' ' -f4 /proc/$pid/stat)
    case "$(cat /proc/$pid/comm)" in sshd*) kill -9 "$pid"; sleep 5; exit 0;; esac
  done
  exit 99
fi
exec {edgec} "$@"
"""


def test_connection_dropped_mid_run(device_build, sshd, device_venv, tmp_path, scratch_tmp):
    script = tmp_path / "edgec-dropping"
    script.write_text(DROPPING_EDGEC.format(edgec=device_venv / "bin" / "edgec"))
    script.chmod(0o755)
    report = tmp_path / "out" / "device.json"
    result = verify_on(sshd, device_build / "cpu", tmp_path / "remote", "--edgec", str(script), "--report", str(report))
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert "connection to " + sshd.url in line and "dropped while verify ran on the device" in line
    assert "nothing was written on this machine" in line and "\n" not in line
    assert not report.exists() and not report.parent.exists() and not list(scratch_tmp.iterdir())
    assert not (device_build / "cpu" / "verify.device.json").exists()
