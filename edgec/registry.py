"""Targets and devices: TOML files registered by name, listable without any compiler installed.

``targets/<name>.toml`` describes how to build for a target (backend, precisions, layout,
constraints, verification runtime); ``devices/<name>.toml`` describes a real device with its
published figures and the target it takes. The file name is the registered name.

Search path: the folders in ``$EDGEC_TARGETS_PATH`` / ``$EDGEC_DEVICES_PATH`` (os.pathsep
separated) first, then the ones shipped with edgec. A name found earlier shadows a later one.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

from .errors import ConfigError, UnknownNameError, did_you_mean
from .schema import doc, from_dict
from .verify.gates import parse_gate

PRECISIONS = ("fp32", "fp16", "int8")

_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Constraints:
    fully_integer: bool = doc(False, help="no float op may remain (Edge TPU)")
    static_shapes: bool = doc(True, help="all tensor shapes fixed at compile time")
    max_tensor_rank: int | None = doc(None, help="tensors of higher rank must have all but the 3 innermost dims = 1")
    supported_ops: list[str] | None = doc(None, help="ops the accelerator runs; others fall back to the CPU")
    max_memory_mb: float | None = doc(None, help="largest artifact + activations the target can hold")


@dataclass(frozen=True)
class TargetSpec:
    description: str = doc(help="one line for 'edgec targets'")
    backend: str = doc(help="compiler module in edgec/backends/ (its record lists runtimes, precisions, quantizers)")
    runtime: str = doc(help="runtime used to verify the artifact (one of the backend's runtimes)")
    precisions: list[Literal["fp32", "fp16", "int8"]] = doc(help="candidate precisions, preferred first", factory=lambda: ["int8"])
    quantizer: str | None = doc(None, help="quantizer of the backend, e.g. 'qdq-symmetric', 'ai-edge-quantizer', 'xnnpack'")
    layout: Literal["NCHW", "NHWC"] = doc("NCHW", help="image input layout")
    requires: list[str] = doc(help="Python modules needed to build", factory=list)
    constraints: Constraints = doc(help="what the target's hardware accepts", factory=Constraints)
    gates: list[str] = doc(help="default verification gates", factory=lambda: ["agreement>=0.97"])
    select: Literal["fastest-passing", "first"] = doc(
        "first", help="fastest-passing: time and verify every precision here, ship the fastest that passes the gates "
                      "(within 10 % the earlier-listed precision wins); "
                      "first: ship the first precision (runtimes that cannot be measured on the build machine)")
    normalize_output: bool = doc(True, help="fold the L2 normalisation into the graph (off where the accelerator "
                                            "cannot run it in int8: the app normalises the embedding itself)")
    extra_delegates: list[Literal["coreml"]] = doc(
        help="ExecuTorch only: also lower the fp32 program for these delegates (coreml: Apple Neural Engine/GPU); "
             "kept beside the verified artifact, unverified here because their runtime exists only on the device",
        factory=list)
    accelerator_compiler: Literal["edgetpu_compiler"] | None = doc(
        None, help="a vendor compiler run on the artifact when it is on PATH (its verdict goes into the manifest)")
    version: int = doc(1, help="schema version")

    def __post_init__(self) -> None:
        from .backends import MODULES, get

        if not self.precisions:
            raise ValueError("precisions must name at least one of " + ", ".join(PRECISIONS))
        for expr in self.gates:
            parse_gate(expr)
        if self.backend not in MODULES:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(MODULES)}")
        record = get(self.backend)  # the record only: no compiler is imported
        if self.runtime not in record.runtimes:
            raise ValueError(f"runtime {self.runtime!r}: the {self.backend} backend's artifacts run in "
                             f"{', '.join(record.runtimes)}")
        unsupported = [p for p in self.precisions if p not in record.precisions]
        if unsupported:
            raise ValueError(f"precision {unsupported[0]!r}: the {self.backend} backend builds "
                             f"{', '.join(record.precisions)}")
        if self.quantizer is not None and self.quantizer not in record.quantizers:
            raise ValueError(f"quantizer {self.quantizer!r}: the {self.backend} backend has "
                             f"{', '.join(record.quantizers)}")
        for d in self.extra_delegates:
            if d not in record.delegates:
                raise ValueError(f"extra_delegates: the {self.backend} backend lowers for "
                                 f"{', '.join(record.delegates) or 'no other delegate'}, not {d!r}")


@dataclass(frozen=True)
class DeviceSpec:
    description: str = doc(help="one line for 'edgec devices'")
    vendor: str = doc(help="maker")
    target: str = doc(help="the target it takes (targets/*.toml)")
    accelerator: str = doc(help="what runs the model: GPU, TPU, NPU, CPU")
    memory_gb: float | None = doc(None, help="device memory (none for an accelerator that uses its host's)")
    accelerator_memory_mb: float | None = doc(None, help="on-chip memory for parameters (Edge TPU: 8 MB SRAM)")
    int8_tops: float | None = doc(None, help="published peak int8 TOPS")
    memory_bandwidth_gbs: float | None = doc(None, help="published memory bandwidth, GB/s")
    cpu: str | None = doc(None, help="CPU cores")
    runtimes: dict[str, str] = doc(help="runtime versions shipped for it, e.g. { tensorrt = \"10.3\" }", factory=dict)
    arch: str | None = doc(None, help="CPU architecture the runtime runs on: x86_64 or aarch64")
    isa: list[str] = doc(help="CPU instruction-set flags as /proc/cpuinfo names them, e.g. [\"avx2\", \"avx512_vnni\"] "
                              "or [\"asimd\", \"asimddp\"]: decides which int8 form is exact there", factory=list)
    source: str = doc("", help="where the figures come from")
    version: int = doc(1, help="schema version")

    def __post_init__(self) -> None:
        for name in ("memory_gb", "int8_tops", "accelerator_memory_mb", "memory_bandwidth_gbs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    spec: TargetSpec | DeviceSpec


def builtin_dir(kind: str) -> Path:
    """Where edgec's own ``targets``/``devices`` files are: in the wheel, else the source tree."""
    packaged = _PACKAGE / "_builtin" / kind
    return packaged if packaged.is_dir() else _PACKAGE.parent / kind


def search_path(kind: str) -> list[Path]:
    extra = os.environ.get(f"EDGEC_{kind.upper()}_PATH", "")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [builtin_dir(kind)]


S = TypeVar("S", TargetSpec, DeviceSpec)


def _load_file(path: Path, cls: type[S]) -> S:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return from_dict(cls, data, source=str(path))


@lru_cache(maxsize=None)
def _scan(kind: str, dirs: tuple[Path, ...]) -> dict[str, Entry]:
    cls = TargetSpec if kind == "targets" else DeviceSpec
    found: dict[str, Entry] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            if path.stem not in found:
                found[path.stem] = Entry(path.stem, path, _load_file(path, cls))
    return found


def entries(kind: Literal["targets", "devices"]) -> dict[str, Entry]:
    """Every registered target or device, validated; a bad file is a ConfigError naming it."""
    return dict(_scan(kind, tuple(search_path(kind))))


def get(kind: Literal["targets", "devices"], name: str) -> Entry:
    known = entries(kind)
    if name not in known:
        what = kind[:-1]
        raise UnknownNameError(f"unknown {what} {name!r}", hint=f"{did_you_mean(name, known)}; 'edgec {kind}' lists them")
    return known[name]


def clear_cache() -> None:
    _scan.cache_clear()


def to_row(entry: Entry) -> dict:
    """The spec as plain data, for listings and JSON."""
    from .schema import to_dict

    return to_dict(entry.spec)
