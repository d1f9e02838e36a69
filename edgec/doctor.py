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
    ("openvino", "openvino", "OpenVINO IR and its runtime (Intel CPU/iGPU/NPU)", "openvino"),
    ("nncf", "nncf", "OpenVINO int8 (NNCF)", "nncf"),
    ("neural_compressor", "neural-compressor", "accuracy-aware tuning", "'neural-compressor[pt]'"),
    ("tensorrt", "tensorrt", "TensorRT engines (Jetson, NVIDIA GPUs)", "tensorrt (with a CUDA GPU)"),
    ("transformers", "transformers", "Hugging Face CLIP/SigLIP intake", "transformers"),
    ("open_clip", "open-clip-torch", "open_clip intake", "open-clip-torch"),
    ("matplotlib", "matplotlib", "plots in reports", "matplotlib"),
]
TOOLS = [("edgetpu_compiler", "maps .tflite onto the Edge TPU"), ("trtexec", "builds TensorRT engines")]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _extras() -> dict[str, str]:
    """Distribution name -> the pip command that brings it: edgec's base install or one of its extras
    (from the installed edgec's metadata; empty when edgec is not installed as a distribution)."""
    import re
    from importlib.metadata import requires

    try:
        reqs = requires("edgec") or []
    except PackageNotFoundError:
        return {}
    out: dict[str, str] = {}
    for req in reqs:
        name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", req)
        out.setdefault(name, f"pip install 'edgec[{extra.group(1)}]'" if extra else "pip install edgec")
    return out


def install_command(module: str) -> str:
    """What to run to get the Python module ``module``: edgec's pip extra when one carries it."""
    dist, hint = next(((d, h) for m, d, _, h in PACKAGES if m == module), (module, module))
    extras = _extras()
    return extras.get(dist.lower()) or (f"pip install {hint}" if " " not in hint or hint.startswith("'") else hint)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def diagnose() -> dict:
    from .backends import MODULES, get

    packages = [{"module": m, "package": d, "version": _version(d) if _installed(m) else None, "for": why,
                 "install": install_command(m)} for m, d, why, how in PACKAGES]
    tools = [{"tool": t, "path": shutil.which(t), "for": why} for t, why in TOOLS]
    targets = []
    for name, entry in registry.entries("targets").items():
        spec = entry.spec
        if spec.backend not in MODULES:
            targets.append({"target": name, "backend": spec.backend, "runtime": spec.runtime, "can_build": False,
                            "missing_for_build": [f"backend '{spec.backend}' (not in this edgec)"], "can_verify": False,
                            "missing_for_verify": [], "note": None})
            continue
        record = get(spec.backend)  # what the backend needs, from its record (no SDK imported)
        missing_build = sorted({m for m in list(record.build_modules) + list(spec.requires) if not _installed(m)})
        # each alternative runs the artifacts; "a+b" needs both modules
        options = list(record.runtime_modules.get(spec.runtime, ()))
        usable = [o for o in options if all(map(_installed, o.split("+")))]
        runtime_ok = bool(usable)
        verify_note = None
        if usable and usable[0] != options[0]:
            verify_note = (f"verified with {usable[0]} here, not {options[0]}"
                           + (f" ({record.notes[0]})" if record.notes else ""))
        targets.append({"target": name, "backend": spec.backend, "runtime": spec.runtime, "can_build": not missing_build,
                        "missing_for_build": missing_build, "can_verify": runtime_ok,
                        "missing_for_verify": [] if runtime_ok else options, "note": verify_note,
                        "install": sorted({install_command(m) for m in missing_build
                                           if not m.startswith("backend ")}
                                          | ({install_command(options[0].split("+")[0])} if not runtime_ok and options
                                             else set()))})
    cuda = None
    if _installed("torch"):
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    from .backends import backends

    notes = [n for b in backends().values() for n in b.notes]
    from .runtime.isa import host_isa

    return {"packages": packages, "tools": tools, "targets": targets, "cuda": cuda, "isa": host_isa().record(),
            "notes": notes}
