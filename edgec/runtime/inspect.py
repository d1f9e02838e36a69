"""Inspect a compiled artifact with its runtime alone (numpy + onnxruntime / LiteRT, no torch)."""

from __future__ import annotations

import collections
from pathlib import Path

from ..errors import InputError, require_module
from ..manifest import sha256_file

ARTIFACT_SUFFIXES = (".onnx", ".tflite")


def litert_interpreter_module():
    """``ai_edge_litert.interpreter``, or ``tflite_runtime.interpreter`` where that is installed (Coral)."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            return require_module("ai_edge_litert.interpreter", install="ai-edge-litert (or tflite-runtime on a Coral board)",
                                  purpose="running a .tflite artifact")
    return interpreter


def _onnx(path: Path) -> dict:
    ort = require_module("onnxruntime", install="onnxruntime", purpose="inspecting an .onnx artifact")
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise InputError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}",
                         hint="the file is truncated or not an ONNX model; compile it again") from None

    def tensors(items):
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.type.removeprefix("tensor(").rstrip(")"),
                 "quantization": None} for t in items]

    info = {"format": "onnx", "runtime": "onnxruntime", "inputs": tensors(sess.get_inputs()),
            "outputs": tensors(sess.get_outputs()), "ops": None, "notes": []}
    try:
        import onnx
    except ImportError:
        info["notes"].append("install 'onnx' to count operators")
    else:
        graph = onnx.load(str(path), load_external_data=False).graph
        info["ops"] = dict(collections.Counter(n.op_type for n in graph.node))
        meta = onnx.load(str(path), load_external_data=False)
        info["opset"] = max((o.version for o in meta.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return info


def _tflite(path: Path) -> dict:
    interp_mod = litert_interpreter_module()
    kwargs = {}
    resolver = getattr(interp_mod, "OpResolverType", None)
    if resolver is not None:  # count ops as written, not as a default delegate rewrote them
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = interp_mod.Interpreter(model_path=str(path), **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"LiteRT cannot load {path}: {str(exc).splitlines()[0][:200]}",
                         hint="the file is truncated or not a TFLite model; compile it again") from None

    def tensors(details):
        rows = []
        for d in details:
            scale, zero = d.get("quantization", (0.0, 0))
            rows.append({"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": d["dtype"].__name__,
                         "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None})
        return rows

    ops = collections.Counter(op["op_name"] for op in interp._get_ops_details())  # noqa: SLF001 - only public op listing
    return {"format": "tflite", "runtime": "litert", "inputs": tensors(interp.get_input_details()),
            "outputs": tensors(interp.get_output_details()), "ops": dict(ops), "notes": []}


def inspect_artifact(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact not found: {path}", hint="check the path, or build it with 'edgec compile'")
    if path.suffix == ".onnx":
        info = _onnx(path)
    elif path.suffix == ".tflite":
        info = _tflite(path)
    else:
        raise InputError(f"{path}: unknown artifact type", hint=f"expected one of {', '.join(ARTIFACT_SUFFIXES)}")
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), **info}
