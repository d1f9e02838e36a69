"""Progress for the steps a user waits on: the phase that runs now and how long it has run.

Stages name their phases with :func:`phase` (``with phase("android: lower int8 (XNNPACK)"):``);
the CLI turns on a :class:`Heartbeat` for the command: when nothing has been printed for a few
seconds it prints, through rich, which phase runs and for how long, and repeats that now and
then. Plain lines, so they read the same in a terminal and in a CI log, and they never fight
another live display: while one is active (the distillation's progress bar) the heartbeat is
silent. Without an active heartbeat (Python API, --json) :func:`phase` costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

_active: Heartbeat | None = None


def _fmt(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _other_live_display() -> bool:
    """Whether a rich live display (a progress bar) is on screen; then the heartbeat keeps quiet."""
    import rich

    console = rich.get_console()
    return bool(getattr(console, "_live_stack", None) or getattr(console, "_live", None))


class Heartbeat:
    """Prints ``"  ... <phase>: running for 1:20"`` after ``quiet`` seconds without output, then every
    ``every`` seconds while that phase runs. ``emit`` prints one line; :meth:`saw_output` is called for each
    line the command itself printed."""

    def __init__(self, emit: Callable[[str], None], *, quiet: float = 8.0, every: float = 30.0) -> None:
        self.emit, self.quiet, self.every = emit, quiet, every
        self.phases: list[tuple[str, float]] = []
        self.last_output = time.monotonic()
        self.last_beat = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgec-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def saw_output(self) -> None:
        self.last_output = time.monotonic()

    def line(self, now: float | None = None) -> str | None:
        """The heartbeat line due at ``now``, or None."""
        now = time.monotonic() if now is None else now
        if not self.phases:
            return None
        name, started = self.phases[-1]
        since = max(self.last_output, self.last_beat)
        due = self.quiet if self.last_beat < self.last_output else self.every
        if now - since < due:
            return None
        return f"  ... {name}: running for {_fmt(now - started)}"

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            text = self.line()
            if text is None or _other_live_display():
                continue
            self.last_beat = time.monotonic()
            with contextlib.suppress(Exception):  # a closed stream at exit must not raise in a thread
                self.emit(text)


@contextlib.contextmanager
def heartbeat(emit: Callable[[str], None], *, enabled: bool = True, **kw) -> Iterator[Heartbeat | None]:
    """Run a :class:`Heartbeat` for the block (the CLI wraps each long command in this)."""
    global _active
    if not enabled or _active is not None:
        yield _active
        return
    beat = Heartbeat(emit, **kw).start()
    _active = beat
    try:
        yield beat
    finally:
        _active = None
        beat.stop()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Name what runs in the block, for the heartbeat (nested phases: the innermost is shown)."""
    beat = _active
    if beat is None:
        yield
        return
    beat.phases.append((name, time.monotonic()))
    try:
        yield
    finally:
        beat.phases.pop()


def saw_output() -> None:
    """The command printed a line: the heartbeat waits again before it speaks."""
    if _active is not None:
        _active.saw_output()


__all__ = ["Heartbeat", "heartbeat", "phase", "saw_output"]
