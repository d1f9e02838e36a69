"""Device fixtures: a compiled cpu target, a torch-free "device" venv, and a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

from ..verify.test_verify import write_project

runner = CliRunner()
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="session")
def device_build(tmp_path_factory, shapes_data) -> Path:
    """build/ with the golden set and the example teacher compiled for the cpu target (the smallest artifact)."""
    root = tmp_path_factory.mktemp("device-proj")
    config = write_project(root, shapes_data)
    with int8_ships():
        for args in (["golden"], ["compile", "--target", "cpu", "--no-distill", "--no-progress"]):
            result = runner.invoke(app, [*args, "--config", str(config)])
            assert result.exit_code == 0, result.output
    return root / "build"


@contextlib.contextmanager
def int8_ships():
    """compile ships the first listed precision (int8) unless another is faster by more than TIE_MARGIN, which a
    quiet machine can give fp32 on these small models; the diagnose tests plant weights in the int8 program, so
    the margin is made total here and timing cannot pick fp32."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("edgec.compile.TIE_MARGIN", 1.0)
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    port: int
    known_hosts: Path
    identity: Path
    user: str

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def options(self, remote_dir: Path) -> list[str]:
        return ["--on", self.url, "--known-hosts", str(self.known_hosts), "--identity", str(self.identity),
                "--remote-dir", str(remote_dir)]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """OpenSSH's sshd on 127.0.0.1 with its own host key, config and authorized key (key login only)."""
    if not (Path(SSHD).is_file() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("OpenSSH server/client not installed (.ci/run installs openssh-server and openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password", "LogLevel ERROR",
    ]) + "\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"), start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.1)
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    yield Sshd(port, d / "known_hosts", d / "client_key", getpass.getuser())
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def edgec_wheel(tmp_path_factory) -> Path:
    from edgec.device.bundle import build_wheel

    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    assert wheel is not None, "tests run from a source checkout"
    return wheel


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory, edgec_wheel) -> Path:
    """A torch-free venv with edgec but none of its runtimes (no onnxruntime, no ai-edge-litert): a bare device."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "numpy", "typer", "rich", "pillow"], check=True, capture_output=True)
    subprocess.run([*pip, "--no-deps", str(edgec_wheel)], check=True, capture_output=True)
    return venv


def base_python() -> str:
    """The interpreter this test venv was made from (what a device's python3 is: no packages of ours)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_edgec, shapes_data) -> Path:
    """build/ of a project around the tiny random-weight CLIP (32 px, 2 blocks): its golden set. The .pte is
    compiled from it, minutes faster than from the example teacher."""
    import json

    root = tmp_path_factory.mktemp("device-tiny")
    (root / "edgec.toml").write_text("\n".join([
        "[model]", f"path = {json.dumps(str(tiny_edgec))}",
        "[data]", f"eval = {json.dumps(str(shapes_data / 'eval'))}",
        "[calibration]", f"path = {json.dumps(str(shapes_data / 'train'))}", "num_images = 16",
        "[targets]", f"out = {json.dumps(str(root / 'build'))}",
    ]) + "\n")
    result = runner.invoke(app, ["golden", "--config", str(root / "edgec.toml")])
    assert result.exit_code == 0, result.output
    return root / "build"


def _compile(build: Path, target: str) -> Path:
    with int8_ships():
        result = runner.invoke(app, ["compile", "--target", target, "--no-distill", "--no-progress",
                                     "--config", str(build.parent / "edgec.toml")])
    assert result.exit_code == 0, result.output
    return build


@pytest.fixture(scope="session")
def tflite_build(device_build) -> Path:
    """The example teacher compiled for android-tflite (LiteRT: its int8 ships, which diagnose's planted layer needs)."""
    return _compile(device_build, "android-tflite")


@pytest.fixture(scope="session")
def pte_build(tiny_project) -> Path:
    """The tiny project compiled for android (ExecuTorch .pte, XNNPACK)."""
    return _compile(tiny_project, "android")
