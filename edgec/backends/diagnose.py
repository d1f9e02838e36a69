"""Say which op in which layer a compiler could not take, and what to do instead.

Converters report the failing op by its ATen name (``aten::erfinv``, ``aten.erfinv.default``) and
rarely the layer. :func:`locate_op` runs the model once on the example input under a dispatch
mode that records, for each ATen op, the module path it ran in; :func:`unsupported_op_error`
turns a converter's exception into an :class:`InputError` naming the op, the layer (its path in
the exported model and its class) and the fallbacks. LiteRT models carry the module path in
their tensor names; :func:`tflite_layer` reads it back for ops found in a converted model.
"""

from __future__ import annotations

import re

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
