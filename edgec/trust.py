"""Who may allow unpickling a checkpoint (which runs code from it): never a config file.

edgec.toml arrives in pull requests and CI runs it, so nothing in it may enable code execution.
Trust comes from the person or CI owner running edgec, and is pinned to the checkpoint's sha256:

- ``--trust-pickle`` on the command line trusts the checkpoint the command names, as it is now
  (the CLI records its sha256 with :func:`trust_file`);
- ``EDGEC_TRUST_PICKLE=<sha256>[,<sha256>...]`` in the environment (set by the CI owner, not by the
  repository) trusts exactly the checkpoints with those digests.

A swapped file has another digest and is refused again. Child processes (compile workers)
inherit the trust through the environment variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

ENV = "EDGEC_TRUST_PICKLE"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def trusted_digests() -> set[str]:
    """The sha256 digests in $EDGEC_TRUST_PICKLE; anything else there is an error, not a wildcard."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return set()
    digests = {d.strip().lower() for d in raw.split(",") if d.strip()}
    bad = sorted(d for d in digests if not _DIGEST.match(d))
    if bad:
        raise ConfigError(f"{ENV} must list sha256 digests of trusted checkpoints (64 hex digits, comma-separated), "
                          f"not {bad[0][:40]!r}", hint="sha256sum the checkpoint, or pass --trust-pickle instead")
    return digests


def checkpoint_digest(path: str | Path) -> str:
    from .manifest import sha256_file

    return sha256_file(Path(path))


def pickle_trusted(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` may be unpickled: its sha256 is trusted by the environment."""
    digests = trusted_digests()
    return bool(digests) and Path(path).is_file() and checkpoint_digest(path) in digests


def trust_file(path: str | Path) -> str | None:
    """``--trust-pickle``: trust the checkpoint file(s) at ``path`` (a file, or the weight files of a
    folder) for this process and its children, pinned to their current sha256. Returns the digests."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    else:
        files = []
    if not files:
        return None
    digests = trusted_digests() | {checkpoint_digest(f) for f in files}
    os.environ[ENV] = ",".join(sorted(digests))
    return ",".join(checkpoint_digest(f) for f in files)


def refusal_hint(path: str | Path) -> str:
    """What to do about a refused pickle, with the digest to pin."""
    try:
        digest = checkpoint_digest(path)
    except OSError:
        digest = "<sha256 of the file>"
    return (f"re-save it as a plain state_dict or safetensors; if you trust its source, pass --trust-pickle "
            f"(or set {ENV}={digest})")


__all__ = ["ENV", "trusted_digests", "pickle_trusted", "trust_file", "refusal_hint", "checkpoint_digest"]
