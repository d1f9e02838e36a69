"""edgec doctor: what is installed, what each target needs, and what to install for the rest."""

from __future__ import annotations

import importlib.util
import shutil
from importlib.metadata import PackageNotFoundError, version

from . import registry

# (import name, distribution name, what it is for, pip install)
PACKAGES = [
    ("torch", "torch", "intake, distill, export (compile side)", "'edgec[compile]'"),
    ("timm", "timm", "students", "'edgec[compile]'"),
    ("onnx", "onnx", "ONNX export and checks", "onnx"),
    ("onnxscript", "onnxscript", "ONNX export (dynamo)", "onnxscript"),
    ("onnxruntime", "onnxruntime", "runs .onnx (cpu, jetson verification)", "onnxruntime"),
    ("ai_edge_litert", "ai-edge-litert", "runs .tflite", "ai-edge-litert"),
    ("tflite_runtime", "tflite-runtime", "runs .tflite (Coral boards)", "tflite-runtime"),
    ("litert_torch", "litert-torch", "PyTorch -> .tflite", "litert-torch"),
    ("ai_edge_quantizer", "ai-edge-quantizer", "fully integer .tflite (Edge TPU)", "ai-edge-quantizer"),
    ("executorch", "executorch", "PyTorch -> .pte and its runtime", "executorch"),
    ("torchao", "torchao", "PT2E quantization", "torchao"),
    ("neural_compressor", "neural-compressor", "accuracy-aware tuning", "'neural-compressor[pt]'"),
    ("tensorrt", "tensorrt", "TensorRT engines (Jetson, NVIDIA GPUs)", "tensorrt (with a CUDA GPU)"),
    ("transformers", "transformers", "Hugging Face CLIP/SigLIP intake", "transformers"),
    ("open_clip", "open-clip-torch", "open_clip intake", "open-clip-torch"),
    ("matplotlib", "matplotlib", "plots in reports", "matplotlib"),
]
TOOLS = [("edgetpu_compiler", "maps .tflite onto the Edge TPU"), ("trtexec", "builds TensorRT engines")]
RUNTIME_MODULES = {"onnxruntime": ["onnxruntime"], "litert": ["ai_edge_litert", "tflite_runtime"],
                   "executorch": ["executorch", "torch"], "tensorrt": ["tensorrt"]}
BACKEND_MODULES = {"onnx": ["torch", "onnx"], "litert": ["torch", "litert_torch"], "executorch": ["torch", "executorch"]}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def diagnose() -> dict:
    from .backends import BACKENDS

    packages = [{"module": m, "package": d, "version": _version(d) if _installed(m) else None, "for": why, "install": how}
                for m, d, why, how in PACKAGES]
    tools = [{"tool": t, "path": shutil.which(t), "for": why} for t, why in TOOLS]
    targets = []
    for name, entry in registry.entries("targets").items():
        spec = entry.spec
        build_needs = BACKEND_MODULES.get(spec.backend, []) + list(spec.requires)
        missing_build = sorted({m for m in build_needs if not _installed(m)})
        if spec.backend not in BACKENDS:
            missing_build.append(f"backend '{spec.backend}' (not in this edgec)")
        verify_options = RUNTIME_MODULES.get(spec.runtime, [])
        runtime_ok = any(map(_installed, verify_options)) if spec.runtime != "executorch" else all(
            map(_installed, verify_options))
        if spec.runtime == "tensorrt" and not runtime_ok and _installed("onnxruntime"):
            verify_note = "verified with onnxruntime here (Q/DQ ONNX); TensorRT engine needs tensorrt + a GPU"
            runtime_ok = True
        else:
            verify_note = None
        targets.append({"target": name, "backend": spec.backend, "runtime": spec.runtime, "can_build": not missing_build,
                        "missing_for_build": missing_build, "can_verify": runtime_ok,
                        "missing_for_verify": [] if runtime_ok else verify_options, "note": verify_note})
    cuda = None
    if _installed("torch"):
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    notes = ["ExecuTorch's Python runtime imports torch: verifying .pte artifacts needs torch installed."]
    from .runtime.isa import host_isa

    return {"packages": packages, "tools": tools, "targets": targets, "cuda": cuda, "isa": host_isa().record(),
            "notes": notes}
