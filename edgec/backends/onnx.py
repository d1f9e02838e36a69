"""ONNX export (for ONNX Runtime; TensorRT takes the same graph with Q/DQ nodes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError

OPSET = 17  # dynamo=False keeps the requested opset; the dynamo exporter silently gives 18


class NormalizedEmbedding(nn.Module):
    """The encoder with L2 normalisation folded in: the artifact's output is ready for zero-shot use."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(pixels), dim=-1)


def export(encoder: nn.Module, input_shape: tuple[int, ...], path: Path, *, dynamic_batch: bool = True) -> dict:
    """Export ``encoder`` (pixels -> embedding) as ONNX; returns the input/output records for the manifest."""
    import onnx

    model = NormalizedEmbedding(encoder).eval()
    example = torch.zeros(*input_shape)
    axes = {"pixels": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():  # tracer warnings about Python scalars are expected and noisy
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["embedding"],
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; name the op when it says one
        raise InputError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}",
                         hint="the model uses an op the ONNX exporter cannot express; try another student") from None
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        dim = int(model(example).shape[-1])
    return {
        "inputs": [{"name": "pixels", "shape": list(input_shape), "dtype": "float32", "quantization": None,
                    "dynamic_batch": dynamic_batch}],
        "outputs": [{"name": "embedding", "shape": [input_shape[0], dim], "dtype": "float32", "normalized": True}],
        "opset": OPSET,
    }
