"""Compilers, one module per backend, registered by name and imported only when a target needs it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MissingToolchain, UnknownNameError, did_you_mean

BACKENDS = {
    "onnx": ("edgec.backends.onnx", "onnx onnxscript"),
    "litert": ("edgec.backends.litert", "litert-torch ai-edge-quantizer"),
    "executorch": ("edgec.backends.executorch", "executorch torchao"),
}


def get_backend(name: str):
    if name not in BACKENDS:
        raise UnknownNameError(f"backend {name!r} is not implemented in this edgec", hint=did_you_mean(name, BACKENDS))
    module, install = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingToolchain(f"the {name} backend cannot be imported ({exc})", hint=f"pip install {install}") from exc


@dataclass
class Built:
    """What a backend built for one target: candidate artifacts per precision, and what goes beside them."""

    candidates: dict[str, Path]
    format: str
    io: dict  # {"inputs": [...], "outputs": [...]} of the fp32 graph; int8 records come from the chosen file
    files: dict[str, str] = field(default_factory=dict)  # extra text files for the target folder
    report: dict | None = None
    calibration_sha256: str | None = None
    delegation: dict | None = None  # per precision: delegated subgraphs, share, ops left outside (ExecuTorch)
    notes: list[str] = field(default_factory=list)
    # programs for another delegate that cannot run here (Core ML): name -> {"path": Path, ...record} or {"reason": ...}
    variants: dict[str, dict] = field(default_factory=dict)


def precision_candidates(spec, backend: str, fp32: Path, make_int8: Callable[[], tuple[Path, str]]) -> tuple[dict[str, Path], str | None]:
    """The target's precisions, in its order: fp32 as built, int8 from ``make_int8`` (-> path, calibration sha256)."""
    candidates: dict[str, Path] = {}
    calibration_sha = None
    for precision in spec.precisions:
        if precision == "fp32":
            candidates["fp32"] = fp32
        elif precision == "int8":
            candidates["int8"], calibration_sha = make_int8()
        else:
            raise InputError(f"the {backend} backend does not build {precision!r}", hint="list fp32 or int8 in the target file")
    return candidates, calibration_sha
