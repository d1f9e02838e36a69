"""Atomic writes and staged folders: readers never see half an output."""

from __future__ import annotations

import hashlib

import pytest

from edgec.manifest import atomic_write_json, file_record, sha256_file, sha256_tree, staged_dir


def test_staged_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_stage_keeps_the_previous_output(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "good.txt").write_text("v1")
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "good.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "good.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged_dir(tmp_path / "new") as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_hashes_and_records(tmp_path):
    path = atomic_write_json(tmp_path / "d" / "m.json", {"a": 1})
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    record = file_record(path, tmp_path, format="json")
    assert record == {"path": "d/m.json", "sha256": sha256_file(path), "bytes": path.stat().st_size, "format": "json"}
    before = sha256_tree(tmp_path)
    (tmp_path / "d" / "other").write_text("x")
    assert sha256_tree(tmp_path) != before


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "m.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "m.json").stat().st_mode) == 0o644
