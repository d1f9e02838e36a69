"""``edgec verify ... --on ssh://user@host[:port]``: verify a bundle on a Linux device over SSH.

The system ``ssh`` client does the work, in batch mode with strict host-key checking against
the user's known_hosts or ``--known-hosts`` (an unknown or changed host key is refused, never
added). Steps: reach the device and make its work folder; with ``install``, put the wheel the
bundle carries into a venv there; check that the device's edgec reads this bundle; push the
bundle (content-addressed: a bundle already there is not sent again; a transfer lands under a
temporary name and is renamed); run ``edgec verify BUNDLE`` there with the device's runtime;
pull its report. The report is written on this machine only once it is complete.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import __version__
from ..errors import EXIT_MISSING_TOOLCHAIN, EdgecError, GateFailed, InputError, MissingToolchain
from ..manifest import atomic_write_json

DEFAULT_REMOTE_DIR = "~/.cache/edgec"
CONNECT_TIMEOUT_S = 10


class DeviceUnavailable(EdgecError):
    """The device cannot be reached, or the connection to it dropped: exit code 3 (like a missing runtime)."""

    exit_code = EXIT_MISSING_TOOLCHAIN


@dataclass(frozen=True)
class SshUrl:
    user: str | None
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SshUrl:
        parts = urlsplit(url)
        try:
            port = parts.port or 22
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or port < 1 or parts.path not in ("", "/") or parts.password:
            raise InputError(f"--on {url!r} is not an ssh://[user@]host[:port] address",
                             hint="for example --on ssh://nvidia@192.168.1.20 or ssh://pi@raspberrypi.local:2222")
        return cls(parts.username, parts.hostname, port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}"


class Ssh:
    """Commands on the device through the system ssh client (batch mode, strict host-key checking)."""

    def __init__(self, url: SshUrl, *, known_hosts: Path | None = None, identity: Path | None = None) -> None:
        if shutil.which("ssh") is None:
            raise MissingToolchain("verifying on a device needs the OpenSSH client ('ssh'), which is not on PATH",
                                   hint="install it (Debian/Ubuntu: apt-get install openssh-client)")
        if known_hosts is not None and not Path(known_hosts).exists():
            raise InputError(f"--known-hosts {known_hosts} does not exist",
                             hint=f"write it after checking the device's key: ssh-keyscan -p {url.port} {url.host} > {known_hosts}")
        if identity is not None and not Path(identity).is_file():
            raise InputError(f"--identity {identity} does not exist", hint="pass the private key that the device accepts")
        self.url = url
        self.known_hosts = Path(known_hosts) if known_hosts else None
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR", "-p", str(url.port)]
        if known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={Path(known_hosts).resolve()}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if identity is not None:
            opts += ["-i", str(Path(identity).resolve()), "-o", "IdentitiesOnly=yes"]
        self.argv = ["ssh", *opts, url.destination]

    def run(self, command: str, *, step: str, stdin=None, connecting: bool = False,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``command`` in the device's shell; an ssh failure (exit 255) becomes a user-facing error."""
        try:
            proc = subprocess.run([*self.argv, command], stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceUnavailable(f"{self.url} did not finish {step} within {timeout:.0f} s",
                                    hint="check the device; nothing was written on this machine") from None
        if proc.returncode == 255:
            raise self._failure(proc.stderr.decode(errors="replace"), step, connecting)
        return proc

    def _failure(self, stderr: str, step: str, connecting: bool) -> EdgecError:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        line = lines[-1] if lines else "ssh exited 255 without a message"
        known = self.known_hosts or "~/.ssh/known_hosts"
        if any(s in stderr for s in ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
                                     "No ED25519 host key is known", "host key is known")):
            return InputError(f"the host key of {self.url.host}:{self.url.port} is not in {known} or does not match it "
                              f"({line}); edgec does not trust unknown hosts",
                              hint=f"check the device's key fingerprint, then add it: ssh-keyscan -p {self.url.port} "
                                   f"{self.url.host} >> {known}, or pass --known-hosts FILE")
        if "Permission denied" in stderr:
            return InputError(f"{self.url} refused the login ({line})",
                              hint="pass --identity KEY for a key in the device's authorized_keys (ssh-copy-id), or "
                                   "the right user in ssh://user@host")
        if connecting:
            return DeviceUnavailable(f"cannot reach {self.url}: {line}",
                                     hint="check that the device is on, the address and port, and that sshd runs there")
        return DeviceUnavailable(f"the connection to {self.url} dropped while {step} ({line}); nothing was written on "
                                 "this machine", hint="check the device and its network, then run the command again")

    def push(self, local: Path, remote: str, *, step: str) -> None:
        """Copy ``local`` to the absolute ``remote`` path: written under a temporary name, then renamed."""
        tmp = f"{remote}.part-{uuid.uuid4().hex[:12]}"
        q_tmp, q_remote = shlex.quote(tmp), shlex.quote(remote)
        with open(local, "rb") as f:
            proc = self.run(f"cat > {q_tmp} && mv -f {q_tmp} {q_remote}", step=step, stdin=f)
        if proc.returncode != 0:
            raise DeviceUnavailable(f"{self.url}: could not write {remote} ({_last(proc.stderr)})",
                                    hint="check the free space and permissions of --remote-dir on the device")

    def read(self, remote: str, *, step: str) -> bytes | None:
        proc = self.run(f"cat {shlex.quote(remote)}", step=step)
        return proc.stdout if proc.returncode == 0 else None


def _last(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def _remote_path(path: str) -> str:
    """A path for the device's shell: ``~/x`` expands there, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _compatible(remote_version: str) -> bool:
    return remote_version.split(".")[:2] == __version__.split(".")[:2]


@dataclass
class Device:
    """A reached device: its ssh client and the absolute path of its work folder."""

    ssh: Ssh
    work: str


def connect(url: str, *, known_hosts: Path | None = None, identity: Path | None = None,
            remote_dir: str = DEFAULT_REMOTE_DIR, log=print) -> Device:
    """Reach the device (host key checked) and make its work folder."""
    target = SshUrl.parse(url)
    ssh = Ssh(target, known_hosts=known_hosts, identity=identity)
    log(f"device: connecting to {target}")
    proc = ssh.run(f"mkdir -p {_remote_path(remote_dir)}/bundles && cd {_remote_path(remote_dir)} && pwd",
                   step="connecting", connecting=True)
    if proc.returncode != 0:
        raise DeviceUnavailable(f"{target}: cannot make the work folder {remote_dir} ({_last(proc.stderr)})",
                                hint="pass --remote-dir to a writable folder on the device")
    return Device(ssh, proc.stdout.decode().strip().splitlines()[-1])


def verify_on(device: Device, bundle: Path, *, install: bool = False, edgec: str = "edgec", python: str = "python3",
              gates: list[str] | None = None, threads: int | None = None, log=print) -> tuple[dict, GateFailed | None]:
    """Verify ``bundle`` (a .tar.gz from :func:`make_bundle`) on a reached device; returns its report (and the
    GateFailed the device raised, if any)."""
    from .bundle import read_record

    ssh, work, target = device.ssh, device.work, device.ssh.url
    with tempfile.TemporaryDirectory(prefix="edgec-remote-") as tmp:
        from .bundle import opened

        with opened(bundle) as root:  # read what the bundle needs on the device (wheel, requirements)
            record = read_record(root, bundle)
            wheel = None
            if install:
                if not record.get("wheel"):
                    raise InputError(f"{bundle} carries no edgec wheel, so --install has nothing to install",
                                     hint="bundle again from an edgec source checkout, or install edgec on the device")
                wheel = Path(tmp) / Path(record["wheel"]).name
                shutil.copy2(root / record["wheel"], wheel)
        if install:
            edgec = _install(ssh, work, wheel, record, python, log)
    log(f"device: checking {edgec} on {target.host}")
    proc = ssh.run(f"{edgec} --version", step="checking edgec on the device")
    if proc.returncode != 0:
        raise MissingToolchain(f"edgec is not installed on {target.host} ('{edgec} --version': {_last(proc.stderr)})",
                               hint=f"pip install 'edgec=={record['edgec']}' there (torch is not needed), pass --edgec "
                                    "PATH to it, or add --install")
    found = proc.stdout.decode().strip().split()[-1] if proc.stdout.strip() else "?"
    if not _compatible(found) or found.split(".")[:2] != str(record["edgec"]).split(".")[:2]:
        raise MissingToolchain(f"{target.host} has edgec {found}; this bundle was written by edgec {record['edgec']}",
                               hint=f"pip install 'edgec=={record['edgec']}' there, or add --install")
    name = bundle.name
    remote_bundle = f"{work}/bundles/{name}"
    if ssh.run(f"test -f {shlex.quote(remote_bundle)}", step="looking for the bundle").returncode != 0:
        log(f"device: pushing {name} ({bundle.stat().st_size / 1e6:.1f} MB)")
        ssh.push(bundle, remote_bundle, step="pushing the bundle")
    else:
        log(f"device: {name} is already there")
    remote_report = f"{work}/bundles/{name.removesuffix('.tar.gz').removesuffix('.tgz')}.verify.json"
    ssh.run(f"rm -f {shlex.quote(remote_report)}", step="clearing the previous report")
    args = [edgec, "verify", shlex.quote(remote_bundle), "--json"]
    for g in gates or ():
        args += ["--gate", shlex.quote(g)]
    if threads:
        args += ["--threads", str(int(threads))]
    log(f"device: running edgec verify on {target.host}")
    proc = ssh.run(" ".join(args), step="verify ran on the device")
    failed = None
    if proc.returncode in (2, 3) or proc.returncode not in (0, 1):
        try:
            error = json.loads(proc.stdout.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            error = {"error": f"edgec verify exited {proc.returncode}: {_last(proc.stderr or proc.stdout)}", "hint": None}
        cls = MissingToolchain if proc.returncode == 3 else InputError
        raise cls(f"on {target.host}: {error.get('error')}", hint=error.get("hint"))
    if proc.returncode == 1:
        try:
            error = json.loads(proc.stdout.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            error = {"error": _last(proc.stderr)}
        failed = GateFailed(f"on {target.host}: {error.get('error')}")
    data = ssh.read(remote_report, step="pulling the report")
    try:
        report = json.loads(data) if data is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        report = None
    if not isinstance(report, dict) or report.get("bundle", {}).get("id") != record["id"]:
        raise DeviceUnavailable(f"{target.host}: the device's report {remote_report} is missing or not for this bundle",
                                hint="run the command again")
    report.update({"executed_on": "device", "reached_by": str(target), "remote_report": remote_report,
                   "device_edgec": edgec})
    return report, failed


def _install(ssh: Ssh, work: str, wheel: Path, record: dict, python: str, log) -> str:
    """The bundle's wheel (and the runtime's requirements) in ``<work>/venv`` on the device; returns its edgec."""
    venv = f"{work}/venv"
    remote_wheel = f"{work}/{wheel.name}"
    log(f"device: installing {wheel.name} into {venv}")
    ssh.push(wheel, remote_wheel, step="pushing the edgec wheel")
    extra = [r for r in record.get("requirements", [])[1:] if r and not r.startswith("#")]
    pip = f"{shlex.quote(venv)}/bin/python -m pip"
    command = (f"{shlex.quote(python)} -m venv {shlex.quote(venv)} && {pip} install -q --disable-pip-version-check "
               f"{shlex.quote(remote_wheel)} {' '.join(shlex.quote(r) for r in extra)} && {pip} install -q --no-deps "
               f"--force-reinstall --disable-pip-version-check {shlex.quote(remote_wheel)}")
    proc = ssh.run(command, step="installing edgec on the device")
    if proc.returncode != 0:
        raise MissingToolchain(f"installing edgec on {ssh.url.host} failed: {_last(proc.stderr)}",
                               hint=f"the device needs {python} with venv and pip and a package index; or install "
                                    f"'edgec=={record['edgec']}' there yourself and pass --edgec")
    return f"{shlex.quote(venv)}/bin/edgec"


__all__ = ["connect", "verify_on", "Device", "SshUrl", "Ssh", "DeviceUnavailable"]
