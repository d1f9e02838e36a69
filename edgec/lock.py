"""One writer per build folder: an advisory ``fcntl.flock`` on ``<build>/.edgec.lock``.

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
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the next reader sees no stale holder
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch (rank 0 takes the lock for all of them)."""
    return os.environ.get("RANK", "0") == "0"


__all__ = ["LOCK_FILE", "BuildLocked", "build_lock", "holder", "main_process"]
