"""Identities of what distillation reads: the teacher's weights and the image folders.

The teacher's targets themselves live in the chunked cache of :mod:`edgec.distill.cache`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.folder import ImageFolder
from ..manifest import sha256_file, sha256_path, sha256_tree


def source_identity(path: str | Path) -> str:
    """A hash that changes when the model at ``path`` changes (recorded weights sha256, else the files')."""
    src = Path(path)
    cfg = src / "edgec_model.json"
    if cfg.is_file():
        sha = json.loads(cfg.read_text()).get("weights_sha256")
        if sha:
            return sha
    return sha256_path(src)


def teacher_identity(model) -> str:
    """A hash that changes when the teacher's weights change."""
    return source_identity(model.source)


def folder_identity(folder: ImageFolder) -> str:
    return sha256_tree(folder.root)


__all__ = ["folder_identity", "sha256_file", "source_identity", "teacher_identity"]
