"""XNNPACK-friendly rewrites: same function, and the delegate takes the whole transformer block."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from edgec.backends.rewrites import BmmAttention, LinearLayerNorm, xnnpack_friendly


def _blocks(seed: int = 0):
    from timm.models.vision_transformer import Block

    torch.manual_seed(seed)
    model = torch.nn.Sequential(Block(dim=32, num_heads=4), Block(dim=32, num_heads=4), torch.nn.LayerNorm(32)).eval()
    for block in model[:2]:
        block.attn.fused_attn = False
    return model


def test_rewrites_keep_the_function_of_a_mobilevit():
    model = timm.create_model("mobilevit_xxs", num_classes=0).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    rewritten = copy.deepcopy(model)
    counts = xnnpack_friendly(rewritten)
    assert counts["layer_norm"] >= 10 and counts["attention"] >= 5
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rewritten.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), model(x), atol=1e-5)


def test_layer_norm_without_affine_and_attention_with_a_mask_are_handled():
    ln = torch.nn.LayerNorm(16, elementwise_affine=False)
    x = torch.randn(3, 5, 16) * 4 + 2
    assert torch.allclose(LinearLayerNorm(ln)(x), ln(x), atol=1e-5)
    attn = BmmAttention(_blocks()[0].attn)
    with pytest.raises(ValueError, match="unmasked"):
        attn(torch.randn(1, 4, 32), attn_mask=torch.zeros(4, 4))


def _lower(model, path: Path):
    from edgec.backends.executorch import _lower as lower

    x = torch.randn(1, 16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lower(torch.export.export(model, (x,)), path)
    return report, x


def test_the_xnnpack_delegate_takes_the_rewritten_block_whole(tmp_path):
    pytest.importorskip("executorch")
    from edgec.runtime.runners import ExecuTorchRunner

    model = _blocks()
    before, x = _lower(model, tmp_path / "before.pte")
    rewritten = copy.deepcopy(model)
    xnnpack_friendly(rewritten)
    after, _ = _lower(rewritten, tmp_path / "after.pte")
    assert before["delegated_subgraphs"] > 2 and "aten_native_layer_norm_default" in before["not_delegated_ops"]
    assert after["delegated_subgraphs"] == 1 and after["delegated_share"] > 0.95
    assert not any("layer_norm" in op or "select" in op or "expand" in op for op in after["not_delegated_ops"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = ExecuTorchRunner(tmp_path / "after.pte")(x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4)
