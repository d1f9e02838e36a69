"""ONNX export (for ONNX Runtime; TensorRT takes the same graph with Q/DQ nodes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import Built, precision_candidates

OPSET = 17  # dynamo=False keeps the requested opset; the dynamo exporter silently gives 18


class NormalizedEmbedding(nn.Module):
    """The encoder with L2 normalisation folded in: the artifact's output is ready for zero-shot use."""

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(pixels)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def export(encoder: nn.Module, input_shape: tuple[int, ...], path: Path, *, dynamic_batch: bool = True,
           normalize: bool = True) -> dict:
    """Export ``encoder`` (pixels -> embedding) as ONNX; returns the input/output records for the manifest."""
    import onnx

    model = NormalizedEmbedding(encoder, normalize).eval()
    example = torch.zeros(*input_shape)
    axes = {"pixels": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():  # tracer warnings about Python scalars are expected and noisy
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["embedding"],
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; name the op and the layer
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, model, (example,), converter="the ONNX exporter", backend="onnx") from None
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        dim = int(model(example).shape[-1])
    return {
        "inputs": [{"name": "pixels", "shape": list(input_shape), "dtype": "float32", "quantization": None,
                    "dynamic_batch": dynamic_batch}],
        "outputs": [{"name": "embedding", "shape": [input_shape[0], dim], "dtype": "float32", "normalized": normalize}],
        "opset": OPSET,
    }


def build(encoder: nn.Module, shape: tuple[int, ...], *, spec, work: Path, calibration, method: str, percentile: float,
          trt_version: int, log) -> Built:
    """fp32 ONNX always (it is what int8 is made from); int8 Q/DQ when the target lists it."""
    fp32 = work / "model.fp32.onnx"
    with torch.no_grad():
        io = export(encoder.eval(), shape, fp32, dynamic_batch=not spec.constraints.static_shapes,
                    normalize=spec.normalize_output)
    log(f"exported fp32 ONNX ({fp32.stat().st_size / 1e6:.2f} MB)")
    built = Built(candidates={}, format="onnx", io=io)

    def int8() -> tuple[Path, str]:
        from ..quantize.onnx_qdq import quantize_onnx

        calib = calibration()
        activations = "asymmetric" if spec.quantizer == "qdq-asymmetric" else "symmetric"
        q = quantize_onnx(fp32, work / "model.int8.onnx", calib, method=method, percentile=percentile,
                          trt_version=trt_version, activations=activations)
        if q.trt_cache is not None:
            built.files["calibration.cache"] = q.trt_cache
        log(f"int8 Q/DQ ONNX ({activations} activations), {method} ranges from {len(calib)} calibration images, "
            f"{q.qdq_pairs} Q/DQ pairs ({q.path.stat().st_size / 1e6:.2f} MB)"
            + ("; TensorRT calibration cache written" if q.trt_cache is not None else ""))
        return q.path, calib.sha256

    built.candidates, built.calibration_sha256 = precision_candidates(spec, "onnx", fp32, int8)
    return built


def export_text(module: nn.Module, context_length: int, path: Path, *, dynamic_batch: bool = True) -> dict:
    """Export a text tower (int32 token ids (N, L) -> normalised embedding) as ONNX; returns its I/O records."""
    import onnx

    example = torch.zeros(1, context_length, dtype=torch.int32)
    axes = {"token_ids": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), str(path), input_names=["token_ids"], output_names=["embedding"],
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, module, (example,), converter="the ONNX exporter (text tower)",
                                   backend="onnx") from None
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        dim = int(module(example).shape[-1])
    return {"inputs": [{"name": "token_ids", "shape": [1, context_length], "dtype": "int32", "quantization": None,
                        "dynamic_batch": dynamic_batch}],
            "outputs": [{"name": "embedding", "shape": [1, dim], "dtype": "float32", "normalized": True}],
            "opset": OPSET}


class ZeroShotLogits(nn.Module):
    """The image encoder with a zero-shot head folded in: logit_scale * normalize(image) @ text.T (+ logit_bias)."""

    def __init__(self, encoder: nn.Module, text: torch.Tensor, logit_scale: float, logit_bias: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("text_t", text.detach().float().t().contiguous(), persistent=False)
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = (F.normalize(self.encoder(pixels), dim=-1) @ self.text_t) * self.logit_scale
        return logits + self.logit_bias if self.logit_bias is not None else logits
