"""Two locks: one writer per build folder, and the decisions file ``edgec.lock`` beside edgec.toml.

**Build folder**: an advisory ``fcntl.flock`` on ``<build>/.edgec.lock``.

The lock file holds who took it (pid, host, command, time) so a refusal can say so. The kernel
drops a flock when its process ends, however it ends (Ctrl-C, kill -9, a crash), so a lock file
left by a dead process never blocks. The lock is re-entrant within one process: ``release``
takes it and the stages it calls may take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

LOCK_FILE = ".edgec.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth) for this process


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the lock's descriptor: a flock lives while
    any descriptor of it is open, so an orphaned worker would otherwise hold the build folder after
    its parent was killed. Closing a copy does not unlock the parent."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class BuildLocked(InputError):
    """Another edgec process writes to this build folder: exit code 2."""


def holder(build: str | Path) -> dict | None:
    """What the lock file says about its last holder (it may have finished since)."""
    try:
        return json.loads((Path(build) / LOCK_FILE).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ('{info.get('command')}', since {since})"


@contextlib.contextmanager
def build_lock(build: str | Path, command: str, *, wait: bool = False, timeout: float | None = None,
               log=None) -> Iterator[Path]:
    """Hold the build folder's lock for the ``with`` block.

    Held elsewhere: raise :class:`BuildLocked` naming the holder, or with ``wait`` block until it is
    free (``timeout`` seconds at most, then raise).
    """
    build = Path(build)
    created = [p for p in (build, *build.parents) if not p.exists()]  # removed again when the block fails early
    build.mkdir(parents=True, exist_ok=True)
    path = build / LOCK_FILE
    key = str(path.resolve())
    if key in _held:  # re-entrant: this process holds it already
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    finished = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(holder(build))
            if not wait:
                raise BuildLocked(f"build folder {build} is in use by {who}",
                                  hint="wait for that run to finish or pass --wait; a lock of a process that has "
                                       "ended frees itself") from None
            if log:
                log(f"waiting for the lock on {build}, held by {who}")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise BuildLocked(f"build folder {build} is still in use by {_describe(holder(build))} "
                                          f"after {timeout:g} s", hint="try again later") from None
                    time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time(),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[key] = (fd, 1)
        try:
            yield path
            finished = True
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the next reader sees no stale holder
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        if created and not finished:
            _remove_created(build, created)


def _remove_created(build: Path, created: list[Path]) -> None:
    """A command that failed before writing anything leaves no build folder behind (just its lock file was in it)."""
    with contextlib.suppress(OSError):
        if {p.name for p in build.iterdir()} <= {LOCK_FILE}:
            (build / LOCK_FILE).unlink(missing_ok=True)
            for folder in created:  # deepest first
                folder.rmdir()


def main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch (rank 0 takes the lock for all of them)."""
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------- decisions: edgec.lock beside edgec.toml

DECISIONS_FILE = "edgec.lock"
DECISIONS_VERSION = 1
_HEADER = """\
# edgec.lock: build decisions that depend on timing or search, written by 'edgec compile' and 'edgec release'.
# Commit it. Each decision is reused while the inputs it was made from (the 'inputs' hash: model, student,
# calibration, target file, settings) are unchanged, so two clean builds ship the same bytes.
# 'edgec release --reselect' decides again; 'edgec release --locked' (CI) fails instead of changing this file.
"""


class LockOutOfDate(InputError):
    """--locked, and edgec.lock lacks a decision for these inputs: exit code 2."""


def _toml_key(k) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", str(k)) else json.dumps(str(k))


def _toml_value(v) -> str:
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (same escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} into edgec.lock")


def dumps_decisions(data: dict) -> str:
    """edgec.lock's text: the header, ``version``, then one table per target and decision kind, sorted."""
    lines = [_HEADER, f"version = {DECISIONS_VERSION}"]
    for target in sorted(data.get("targets", {})):
        for kind in sorted(data["targets"][target]):
            entry = data["targets"][target][kind]
            lines += ["", f"[targets.{_toml_key(target)}.{_toml_key(kind)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items() if v is not None]
    return "\n".join(lines) + "\n"


def read_decisions(path: Path) -> dict:
    """The decisions file as data ({} when there is none); a file edgec cannot read is a bad input (exit 2)."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid edgec.lock ({exc})",
                         hint="delete it (or take it from version control) and build with --reselect") from None
    if not isinstance(data.get("targets", {}), dict) or data.get("version", DECISIONS_VERSION) > DECISIONS_VERSION:
        raise InputError(f"{path}: not an edgec.lock this edgec understands",
                         hint="delete it and build with --reselect")
    return data


class DecisionLock:
    """The decisions one build reads from and adds to ``edgec.lock`` (``path`` None: no lock file, decide each time).

    ``get`` returns a decision made from the same inputs (None: decide); ``put`` records a new one and
    ``save`` merges it into the file (read again under a flock, since parallel targets write the same file).
    ``reselect``: ignore what is there; ``locked``: a missing or stale decision raises :class:`LockOutOfDate`."""

    def __init__(self, path: Path | None, *, reselect: bool = False, locked: bool = False) -> None:
        self.path, self.reselect, self.locked = path, reselect, locked and not reselect
        self.pending: dict[tuple[str, str], dict] = {}

    def get(self, target: str, kind: str, inputs: str) -> dict | None:
        if self.path is None or self.reselect:
            return None
        entry = (read_decisions(self.path).get("targets", {}).get(target) or {}).get(kind)
        if isinstance(entry, dict) and entry.get("inputs") == inputs:
            return entry
        if self.locked:
            why = "has none" if entry is None else "holds one made from other inputs"
            raise LockOutOfDate(f"{self.path} {why} for target {target}'s {kind.replace('_', ' ')}, and --locked "
                                "forbids changing it", hint="run 'edgec release --reselect' and commit edgec.lock")
        return None

    def put(self, target: str, kind: str, inputs: str, decision: dict) -> None:
        if self.path is not None:
            self.pending[(target, kind)] = {"inputs": inputs, **decision}

    def save(self, log=None) -> None:
        if self.path is None or not self.pending:
            return
        from .manifest import atomic_write_text

        folder = self.path.parent
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # parallel targets (compile --target all) write the same file
            data = read_decisions(self.path)
            data.setdefault("targets", {})
            for (target, kind), entry in self.pending.items():
                data["targets"].setdefault(target, {})[kind] = entry
            atomic_write_text(self.path, dumps_decisions(data))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if log:
            log(f"recorded {len(self.pending)} decision(s) in {self.path} ("
                + ", ".join(f"{t}: {k.replace('_', ' ')}" for t, k in self.pending) + ")")
        self.pending.clear()


__all__ = ["DECISIONS_FILE", "LOCK_FILE", "BuildLocked", "DecisionLock", "LockOutOfDate", "build_lock",
           "dumps_decisions", "holder", "main_process", "read_decisions"]
