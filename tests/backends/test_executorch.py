"""ExecuTorch backend: the Core ML program is lowered here and recorded as unverified."""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgec import registry
from edgec.backends.executorch import _variant
from edgec.compile import _place_variants
from edgec.errors import InputError
from edgec.manifest import sha256_file, validate_manifest


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 16)).eval()


def test_core_ml_variant_is_lowered_and_marked_unverified(tmp_path):
    pytest.importorskip("coremltools")
    spec = registry.get("targets", "ios").spec
    assert spec.extra_delegates == ["coreml"]
    work = tmp_path / "work"
    work.mkdir()
    lines = []
    v = _variant("coreml", _encoder(), spec, (torch.zeros(1, 3, 32, 32),), work, lines.append)
    assert "path" in v, v.get("reason")
    assert v["delegate"] == "coreml" and v["verified"] is False and v["precision"] == "fp16"
    assert v["delegation"]["delegated_subgraphs"] >= 1 and v["delegation"]["delegated_share"] > 0.5
    folder = tmp_path / "ios"
    folder.mkdir()
    placed = _place_variants({"coreml": v, "other": {"reason": "not here"}}, folder, lines.append)
    rec = placed["coreml"]
    assert rec["built"] and rec["path"] == "model.coreml.pte" and rec["sha256"] == sha256_file(folder / rec["path"])
    assert placed["other"] == {"built": False, "reason": "not here"} and any("other variant not built" in x for x in lines)
    assert "not verified here" in lines[0]
    manifest = json.loads(json.dumps({**_minimal(), "variants": placed}))
    validate_manifest(manifest, folder)
    bad = copy.deepcopy(manifest)
    bad["variants"]["coreml"]["path"] = "../elsewhere.pte"
    with pytest.raises(InputError, match="variants.coreml.path"):
        validate_manifest(bad, folder)


def test_extra_delegates_belong_to_executorch_targets():
    with pytest.raises(ValueError, match="the onnx backend lowers for no other delegate, not 'coreml'"):
        registry.TargetSpec(description="x", backend="onnx", runtime="onnxruntime", extra_delegates=["coreml"])


def _minimal() -> dict:
    return {"schema": 1, "artifacts": [{"path": "model.int8.pte", "sha256": "0" * 64, "bytes": 1, "runtime": "executorch"}],
            "inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "dtype": "float32",
                        "preprocess": {"size": [32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]}}],
            "outputs": [{"name": "embedding", "shape": [1, 16], "dtype": "float32"}]}
