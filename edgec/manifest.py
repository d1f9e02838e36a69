"""Atomic file writes and content hashes shared by every stage.

A stage's output folder is only ever seen complete: files are written next to their final
name and renamed into place, and folders are built under a temporary name and renamed when
every file is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """One hash over every file below ``root`` (relative paths and contents, sorted)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    path = Path(path)
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staged_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; rename it into place on success.

    On any exception (Ctrl-C included) the temporary folder is removed and ``final`` is left
    as it was, so no half-written output is ever visible under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_record(path: Path, root: Path, **extra: Any) -> dict[str, Any]:
    """The manifest entry of one file: relative path, sha256, size, plus ``extra`` fields."""
    return {
        "path": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        **extra,
    }


MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A target folder's manifest.json; :class:`InputError` when missing or corrupt."""
    from .errors import InputError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST} in {folder}", hint="point at a folder written by 'edgec compile'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})", hint="compile the target again") from None


def package_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of edgec and ``packages`` (None when missing), for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("edgec", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
