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


def sha256_json(obj: Any) -> str:
    """One hash of a JSON-able record (keys sorted): the cache key of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or not valid JSON (a cache entry that does not count)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None


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
        if final.exists() and not overwrite:
            raise FileExistsError(final)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished folder ``new`` at ``final``; an old ``final`` survives (as ``.final.old``) until the new one is in."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def file_record(path: Path, root: Path, **extra: Any) -> dict[str, Any]:
    """The manifest entry of one file: relative path, sha256, size, plus ``extra`` fields."""
    return {
        "path": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        **extra,
    }


MANIFEST = "manifest.json"


def inside(root: str | Path, rel: Any, where: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (symlinks resolved);
    :class:`InputError` otherwise. Every path read from a manifest, captions or config file goes through this."""
    from .errors import InputError

    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise InputError(f"{where}: expected a relative file path, got {rel!r}")
    root = Path(root)
    path = root / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{where}: path {rel!r} points outside the folder {root}", hint="paths must be relative to the folder")
    return path


def _expect(ok: bool, where: str, what: str) -> None:
    from .errors import InputError

    if not ok:
        raise InputError(f"{where}: {what}", hint="the manifest is damaged or not written by edgec; compile the target again")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensor(rec: Any, where: str) -> None:
    _expect(isinstance(rec, dict), where, "each tensor record must be an object")
    _expect(isinstance(rec.get("name"), str), where, "'name' must be a string")
    shape = rec.get("shape")
    _expect(isinstance(shape, list) and len(shape) > 0 and all(_is_int(d) and d >= 0 or isinstance(d, str) for d in shape),
            where, f"'shape' must be a list of sizes, got {shape!r}")
    _expect(isinstance(rec.get("dtype"), str), where, "'dtype' must be a string")
    q = rec.get("quantization")
    if q is not None:
        _expect(isinstance(q, dict) and isinstance(q.get("scale"), int | float) and not isinstance(q.get("scale"), bool)
                and q["scale"] > 0 and _is_int(q.get("zero_point")), where,
                "'quantization' must be null or {\"scale\": > 0, \"zero_point\": int}")


def validate_manifest(manifest: Any, folder: str | Path, where: str = MANIFEST) -> dict[str, Any]:
    """Check the parts of a target manifest that verify, bench and inspect rely on; returns it unchanged.

    A manifest is input like any other (it may come from another machine or be edited by hand):
    wrong types, missing records and paths leaving the folder are :class:`InputError`, never a crash.
    """
    from .data.preprocess import Preprocess

    _expect(isinstance(manifest, dict), where, "must be a JSON object")
    _expect(manifest.get("schema") == 1, where, f"unsupported schema {manifest.get('schema')!r} (this edgec reads schema 1)")
    arts = manifest.get("artifacts")
    _expect(isinstance(arts, list) and len(arts) > 0, where, "'artifacts' must be a non-empty list")
    for i, art in enumerate(arts):
        w = f"{where}: artifacts[{i}]"
        _expect(isinstance(art, dict), w, "must be an object")
        inside(folder, art.get("path"), f"{w}.path")
        _expect(isinstance(art.get("sha256"), str) and len(art["sha256"]) == 64, w, "'sha256' must be a 64-hex string")
        _expect(_is_int(art.get("bytes")) and art["bytes"] >= 0, w, "'bytes' must be a non-negative integer")
        _expect(isinstance(art.get("runtime"), str), w, "'runtime' must be a string")
    for key in ("inputs", "outputs"):
        recs = manifest.get(key)
        _expect(isinstance(recs, list) and len(recs) > 0, where, f"'{key}' must be a non-empty list")
        for i, rec in enumerate(recs):
            _check_tensor(rec, f"{where}: {key}[{i}]")
    pre = manifest["inputs"][0].get("preprocess")
    _expect(isinstance(pre, dict), where, "inputs[0].preprocess must be an object")
    try:
        Preprocess.from_json(pre)
    except (KeyError, TypeError, ValueError) as exc:
        _expect(False, where, f"inputs[0].preprocess is invalid ({type(exc).__name__}: {exc})")
    gates = manifest.get("gates")
    _expect(gates is None or isinstance(gates, list) and all(isinstance(g, str) for g in gates), where,
            "'gates' must be a list of strings")
    variants = manifest.get("variants")
    if variants is not None:
        _expect(isinstance(variants, dict), where, "'variants' must be null or an object")
        for name, v in variants.items():
            _expect(isinstance(v, dict), where, f"variants.{name} must be an object")
            if v.get("built"):
                inside(folder, v.get("path"), f"{where}: variants.{name}.path")
    head = manifest.get("head")
    if head is not None:
        _expect(isinstance(head, dict), where, "'head' must be null or an object")
        for key in ("labels", "text_embeddings"):
            if head.get(key) is not None:
                inside(folder, head[key], f"{where}: head.{key}")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A target folder's manifest.json, validated; :class:`InputError` when missing, corrupt or unsafe."""
    from .errors import InputError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST} in {folder}", hint="point at a folder written by 'edgec compile'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)})", hint="compile the target again") from None
    return validate_manifest(data, folder, str(path))


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
