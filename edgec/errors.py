"""User-facing errors: one family, each type with its exit code.

Library code raises these with a message that says what went wrong *and what to do*; the CLI
catches :class:`EdgecError` in one place, prints one line and exits with ``exit_code``.
Anything else that escapes is a bug in edgec and is shown as such.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING_TOOLCHAIN = 3


class EdgecError(Exception):
    """Base of every error a user can cause. ``hint`` says what to do about it."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(EdgecError):
    """Bad path, unreadable or corrupt file, wrong shape: exit code 2."""


class ConfigError(InputError):
    """edgec.toml or a targets/devices TOML file is invalid: exit code 2."""


class UnknownNameError(InputError):
    """A name (target, device, architecture, student) that is not known: exit code 2."""


class GateFailed(EdgecError):
    """A verification gate did not hold: exit code 1."""

    exit_code = EXIT_GATE_FAILED


class MissingToolchain(EdgecError):
    """A compiler or runtime is not installed: exit code 3."""

    exit_code = EXIT_MISSING_TOOLCHAIN


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """A short suggestion for ``name`` among ``choices``, or the list of choices."""
    import difflib

    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    known = sorted(choices)
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    return f"known: {shown}" if known else "none are known"


def require_module(module: str, *, install: str, purpose: str):
    """Import ``module`` or raise :class:`MissingToolchain` saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingToolchain(
            f"{purpose} needs the Python package '{module}', which is not installed ({exc})",
            hint=f"install it with: pip install {install}",
        ) from exc


_OS_HINTS = {
    errno.ENOSPC: "free some space on that disk, or pass --out to a folder on another one",
    errno.EDQUOT: "free some space within your quota, or pass --out to a folder on another disk",
    errno.EFBIG: "the file is larger than this system allows: free space or raise the file-size limit",
    errno.EROFS: "that file system is read-only: pass --out to a writable folder",
    errno.EACCES: "check the permissions, or pass --out to a writable folder",
    errno.EPERM: "check the permissions, or pass --out to a writable folder",
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file is in the way of a folder edgec needs: move it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is where a file is expected",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENAMETOOLONG: "use a shorter path",
}


def from_os_error(exc: OSError) -> InputError:
    """What the system refused (no space, read-only, permission, missing path) as one user-facing error."""
    where = exc.filename if exc.filename is not None else None
    if getattr(exc, "filename2", None):
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or exc.__class__.__name__
    text = f"{where}: {reason}" if where else f"{reason}: {exc}"
    return InputError(f"cannot use {text}", hint=_OS_HINTS.get(exc.errno or -1))
