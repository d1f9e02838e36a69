"""Atomic writes and staged folders (readers never see half an output); manifests validated as untrusted input."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgec.errors import InputError
from edgec.manifest import (
    atomic_write_json,
    file_record,
    inside,
    read_manifest,
    sha256_file,
    sha256_tree,
    staged_dir,
    validate_manifest,
)


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


# ---- manifests are input too: validated, never a crash, never a path outside the folder ----

VALID = {
    "schema": 1, "target": "cpu", "device": None,
    "artifacts": [{"path": "model.onnx", "sha256": "0" * 64, "bytes": 10, "format": "onnx", "runtime": "onnxruntime",
                   "precision": "fp32"}],
    "inputs": [{"name": "pixels", "shape": [1, 3, 64, 64], "dtype": "float32", "quantization": None,
                "preprocess": {"size": [64, 64], "resize": "bicubic", "crop": "center", "mean": [0.5, 0.5, 0.5],
                               "std": [0.5, 0.5, 0.5], "layout": "NCHW"}}],
    "outputs": [{"name": "embedding", "shape": [1, 32], "dtype": "float32", "normalized": True}],
    "head": {"kind": "zero-shot", "labels": "labels.json", "text_embeddings": "text_embeddings.npy"},
    "gates": ["agreement>=0.97"], "metrics": None,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def _paths(obj):
    """Every (container, key) position in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield obj, k
            yield from _paths(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield obj, i
            yield from _paths(v)


def test_a_valid_manifest_passes(tmp_path):
    assert validate_manifest(copy.deepcopy(VALID), tmp_path) == VALID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_fail_only_with_the_documented_error(tmp_path, data):
    manifest = copy.deepcopy(VALID)
    positions = list(_paths(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(positions))
        if data.draw(st.booleans()) and isinstance(container, dict):
            container.pop(key, None)
        else:
            container[key] = data.draw(json_values)
        positions = list(_paths(manifest))
        if not positions:
            break
    try:
        checked = validate_manifest(manifest, tmp_path)
    except InputError as exc:
        assert exc.exit_code == 2 and "\n" not in exc.message
        return
    # what passes is safe to use the way verify and bench use it
    for art in checked["artifacts"]:
        assert (tmp_path / art["path"]).resolve().is_relative_to(tmp_path.resolve())
    assert checked["outputs"][0]["shape"][-1] is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_manifest_file_is_read_or_refused(tmp_path, raw):
    (tmp_path / "manifest.json").write_bytes(raw)
    try:
        manifest = read_manifest(tmp_path)
    except InputError as exc:  # refused: one line that names the file, exit 2
        assert exc.exit_code == 2 and "\n" not in exc.message and "manifest.json" in exc.message
        return
    # read: what verify and bench rely on is there, inside the folder
    assert isinstance(manifest, dict) and manifest["artifacts"] and manifest["outputs"]
    for art in manifest["artifacts"]:
        assert (tmp_path / art["path"]).resolve().is_relative_to(tmp_path.resolve())


def test_a_valid_manifest_file_is_read_back(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(VALID))
    assert read_manifest(tmp_path)["artifacts"][0]["path"] == "model.onnx"


@pytest.mark.parametrize("rel", ["../model.onnx", "/etc/passwd", "a/../../b", "", "sub/../../x.onnx"])
def test_artifact_paths_cannot_leave_the_folder(tmp_path, rel):
    bad = copy.deepcopy(VALID)
    bad["artifacts"][0]["path"] = rel
    with pytest.raises(InputError, match="artifacts\\[0\\].path"):
        validate_manifest(bad, tmp_path)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"x")
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    with pytest.raises(InputError, match="outside"):
        inside(folder, "model.onnx", "manifest.json")
    assert inside(folder, "sub/ok.onnx", "manifest.json") == folder / "sub/ok.onnx"


def test_head_file_paths_are_checked(tmp_path):
    bad = copy.deepcopy(VALID)
    bad["head"]["text_embeddings"] = "../../secret.npy"
    with pytest.raises(InputError, match="head.text_embeddings"):
        validate_manifest(bad, tmp_path)
