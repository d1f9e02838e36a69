"""Compilers, one module per backend, registered by name and imported only when a target needs it."""

from __future__ import annotations

import importlib

from ..errors import MissingToolchain, UnknownNameError, did_you_mean

BACKENDS = {
    "onnx": ("edgec.backends.onnx", "onnx onnxscript"),
}


def get_backend(name: str):
    if name not in BACKENDS:
        raise UnknownNameError(f"backend {name!r} is not implemented in this edgec", hint=did_you_mean(name, BACKENDS))
    module, install = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingToolchain(f"the {name} backend cannot be imported ({exc})", hint=f"pip install {install}") from exc
