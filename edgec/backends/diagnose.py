"""Say which op in which layer a compiler could not take, and what to do instead.

Converters report the failing op by its ATen name (``aten::erfinv``, ``aten.erfinv.default``) and
rarely the layer. :func:`locate_op` runs the model once on the example input under a dispatch
mode that records, for each ATen op, the module path it ran in; :func:`unsupported_op_error`
turns a converter's exception into an :class:`InputError` naming the op, the layer (its path in
the exported model and its class) and the fallbacks. LiteRT models carry the module path in
their tensor names; :func:`tflite_layer` reads it back for ops found in a converted model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import InputError

_ATEN = re.compile(r"aten(?:::|\.)([A-Za-z0-9_]+)")
# wrappers edgec puts around the user's encoder: layer paths are shown relative to the encoder
_WRAPPERS = ("encoder.", "wrapped.encoder.", "tower.", "body.")
BACKEND_TARGETS = {"onnx": "cpu or jetson (ONNX)", "litert": "android-tflite or edgetpu (LiteRT)",
                   "executorch": "android or ios (ExecuTorch)"}


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[tuple[str, str]], wanted: str) -> None:
        super().__init__()
        self.stack = stack
        self.wanted = wanted
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] == self.wanted and self.stack:
            self.found.append(self.stack[-1])
        return func(*args, **(kwargs or {}))


def locate_op(module: nn.Module, example: tuple, op: str) -> list[tuple[str, str]]:
    """(module path, class name) of every module in which ATen op ``op`` runs (innermost), in call order."""
    names = {m: n for n, m in module.named_modules()}
    stack: list[tuple[str, str]] = []

    def enter(m, _inputs):  # hooks must return None: a value would replace the module's input/output
        if m in names:
            stack.append((names[m], type(m).__name__))

    def leave(m, _inputs, _output):
        if m in names and stack:
            stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    recorder = _Recorder(stack, op)
    try:
        with torch.no_grad(), recorder:
            module(*example)
    except Exception:  # noqa: BLE001 - the model ran eagerly before; a failure here only loses the location
        pass
    finally:
        pre.remove()
        post.remove()
    seen, out = set(), []
    for path, cls in recorder.found:
        if path not in seen:
            seen.add(path)
            out.append((_relative(path), cls))
    return out


def _relative(path: str) -> str:
    for prefix in _WRAPPERS:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path or "(the model's own forward)"


def fallbacks(backend: str) -> str:
    others = [t for b, t in BACKEND_TARGETS.items() if b != backend]
    return ("fallbacks: compile for another target (" + "; ".join(others) + "), give this target its own student "
            "([student] targets = { <target> = \"<timm name>\" } in edgec.toml), or, with --no-distill, distil a "
            "student instead; or replace the layer with supported ops")


def unsupported_op_error(exc: BaseException, module: nn.Module, example: tuple, *, converter: str,
                         backend: str) -> InputError:
    """An :class:`InputError` for a failed conversion: the op and the layer when the message names an ATen op."""
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen:  # the disk or the folder refused, not the converter
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            from ..errors import from_os_error

            return from_os_error(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    first = (text.splitlines() or [type(exc).__name__])[0][:300]
    m = _ATEN.search(text)
    if m is None:
        return InputError(f"{converter} failed: {first}", hint=fallbacks(backend))
    op = m.group(1)
    layers = locate_op(module, example, op)
    if layers:
        path, cls = layers[0]
        more = f" (and {len(layers) - 1} more layers)" if len(layers) > 1 else ""
        where = f"in layer {path} ({cls}){more}"
    else:
        where = "(layer not found by tracing the model)"
    return InputError(f"{converter} cannot convert op aten::{op} {where}: {first}", hint=fallbacks(backend))


def tflite_layer(tensor_name: str) -> str | None:
    """The module path litert-torch writes into a tensor name (``pkg.Class_attr/...``), relative to the encoder."""
    first = tensor_name.split(";")[0]
    parts = first.split("/")
    if len(parts) < 2:
        return None
    attrs = []
    for seg in parts[1:]:
        leaf = seg.rsplit(".", 1)[-1]
        if "_" not in leaf:
            return None
        attrs.append(leaf.split("_", 1)[1])
    path = ".".join(attrs)
    return _relative(path) if path else None


# ---------------------------------------------------------------------------------------- layer-by-layer taps
# ``edgec diagnose`` compares the float model's module outputs with the artifact's intermediate tensors. Each
# function below runs one artifact format with every intermediate tensor kept and returns, in execution order,
# (module-path tokens the tensor was produced in, the class of the innermost module when the format records it,
# its values for every input).


def onnx_scope_tokens(node) -> list[str] | None:
    """The module path a node of an exported ONNX graph was made in: the dynamo exporter's name-scope metadata, or
    the TorchScript exporter's scoped node name (``/encoder/blocks.0/attn/MatMul``, ``/patch/patch.2/Relu``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",") if s.strip(" '\"")]
            return scopes[-1].split(".") if scopes else []
    if not node.name.startswith("/"):
        return None
    tokens: list[str] = []
    prev = ""
    for seg in node.name.strip("/").split("/")[:-1]:
        tokens += (seg[len(prev) + 1:] if prev and seg.startswith(prev + ".") else seg).split(".")
        prev = seg
    return tokens


def onnx_taps(path, x: np.ndarray) -> list[tuple[list[str], str | None, np.ndarray]]:
    """Every float tensor a scoped node of the ONNX graph produces (QuantizeLinear outputs are integer: skipped)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - shape inference is best effort; unknown types are taken as float
        types = {}
    existing = {o.name for o in model.graph.output}
    taps: list[tuple[list[str], str]] = []
    for node in model.graph.node:
        tokens = onnx_scope_tokens(node)
        if tokens is None or node.op_type == "QuantizeLinear" or not node.output or not node.output[0]:
            continue
        name = node.output[0]
        if types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue
        taps.append((tokens, name))
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    names = [name for _, name in taps]
    step = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    runs = [sess.run(names, {inp.name: x[i:i + step]}) for i in range(0, len(x), step)]
    return [(tokens, None, np.concatenate([r[j] for r in runs]).astype(np.float32)) for j, (tokens, _) in enumerate(taps)]


def tflite_scope_tokens(tensor_name: str) -> list[tuple[str, str]] | None:
    """(class, attribute) of each module around a litert-torch tensor (name ``pkg.Class_attr/pkg.Class_attr/...;n``)."""
    parts = tensor_name.split(";")[0].split("/")
    tokens = []
    for seg in parts[1:]:
        leaf = seg.rsplit(".", 1)[-1]
        if "_" not in leaf:
            return None
        cls, attr = leaf.split("_", 1)
        tokens.append((cls, attr))
    return tokens if len(parts) > 1 else None


def tflite_taps(path, x: np.ndarray) -> list[tuple[list[str], str | None, np.ndarray]]:
    """Every op output of the .tflite (reference kernels, all tensors kept), dequantized, in execution order."""
    import warnings

    from ..runtime.inspect import litert_interpreter_module

    mod = litert_interpreter_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": that is what this is
        interp = mod.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                                 experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    details = {t["index"]: t for t in interp.get_tensor_details()}
    ops = [o for o in interp._get_ops_details() if o["outputs"].size and o["outputs"][0] >= 0]
    outs = [o["outputs"][0] for o in ops]
    inp, rows = interp.get_input_details()[0], []
    for i in range(len(x)):
        xi = x[i:i + 1]
        scale, zero = inp["quantization"]
        if scale:
            info = np.iinfo(inp["dtype"])
            xi = np.clip(np.round(xi / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], xi.astype(inp["dtype"]))
        interp.invoke()
        row = []
        for t in outs:
            v = interp.get_tensor(t).astype(np.float32)
            s, z = details[t]["quantization"]
            row.append((v - z) * s if s else v)
        rows.append(row)
    taps = []
    for j, t in enumerate(outs):
        scope = tflite_scope_tokens(details[t]["name"])
        if scope and all(r[j].shape == rows[0][j].shape for r in rows):
            taps.append(([attr for _, attr in scope], scope[-1][0], np.stack([r[j] for r in rows])))
    return taps


def pte_taps(path, x: np.ndarray, rebuild) -> tuple[list, dict]:
    """ExecuTorch: the target's program rebuilt with the artifact's weights, run undelegated, module outputs tapped
    (:func:`edgec.backends.executorch.diagnosis_taps`)."""
    from .executorch import diagnosis_taps

    return diagnosis_taps(path, x, rebuild)


@dataclasses.dataclass
class Rebuild:
    """What a format whose runtime cannot show intermediate tensors needs to rebuild the target's program: the float
    encoder it was compiled from, the manifest and its artifact record, the calibration set (loaded on demand)."""

    encoder: object
    manifest: dict
    artifact: dict
    calibration: Callable[[], object]
    log: Callable[[str], None] = print


TAPS = {"onnx": lambda path, x, rebuild: (onnx_taps(path, x), {}),
        "tflite": lambda path, x, rebuild: (tflite_taps(path, x), {}),
        "pte": pte_taps}


def artifact_taps(path, fmt: str, x: np.ndarray, rebuild: Rebuild | None = None) -> tuple[list, dict]:
    """The intermediate tensors of an artifact, by format, in execution order ((module-path tokens, class or None,
    values)), and notes on how they were obtained; InputError for a format without layer taps here."""
    if fmt not in TAPS:
        raise InputError(f"edgec diagnose cannot read the intermediate tensors of a .{fmt} artifact",
                         hint=f"layer-by-layer diagnosis covers {', '.join('.' + f for f in TAPS)} artifacts; compile "
                              "the model for cpu, android-tflite or android and diagnose that")
    return TAPS[fmt](path, x, rebuild)
