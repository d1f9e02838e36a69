"""Compilers, one module per backend, each exporting one :class:`Backend` record named ``BACKEND``.

A backend module is importable without its SDK (and without torch): the record says what the
backend is (runtimes, artifact suffix, the packages whose versions a manifest records, the install
hint, precisions, quantizers with their calibration methods) and holds its functions, which import
the SDK when called. Everything outside ``edgec/backends/`` reads the record; nothing there names a
backend. A new backend is one module listed in :data:`MODULES`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import InputError, MissingToolchain, UnknownNameError, did_you_mean

MODULES = ("onnx", "litert", "executorch", "openvino")  # edgec.backends.<name>, each with a BACKEND record


@dataclass(frozen=True)
class Quantizer:
    """One int8 form a backend builds (a target picks it with ``quantizer = "<name>"``)."""

    name: str
    description: str
    methods: tuple[str, ...]  # calibration methods it honours; any other is refused (exit 2)
    default_method: str  # what ``[quantize] method = "auto"`` gives
    fully_integer: bool = False  # no float op left (int8 I/O)

    def __post_init__(self) -> None:
        if self.default_method not in self.methods:
            raise ValueError(f"quantizer {self.name}: default method {self.default_method!r} not in {self.methods}")


@dataclass(frozen=True)
class Backend:
    """What a compiler is and what it can do; its functions import the SDK only when called.

    Functions (``None`` where the backend has none):

    * ``build(encoder, shape, *, spec, work, quantize, log) -> Built``: export the float program and,
      for each precision the target lists, the candidate artifacts; int8 goes through ``quantize``
      (the quantize stage) with the backend's quantizable program (:class:`edgec.quantize.stage.Program`);
    * ``program(...)``: the quantizable program of one quantizer (calibration, method, float layers);
    * ``export_text(module, context_length, path, *, spec) -> io records``: the fp32 text tower;
    * ``op_report(path, spec) -> dict``: every op, and why it is not on the accelerator / not delegated;
    * ``io_records(path, io, spec) -> io``: the shipped file's input/output records (quantization params);
    * ``fold_head(src, dst, text, scale, bias, normalize) -> bool``: append a zero-shot head to a built
      artifact (False: the backend builds the wrapped model again instead);
    * ``recipe(folder, artifact, precision, spec, options) -> dict | None``: files and the record for
      building on the device (TensorRT's build_engine.sh);
    * ``accelerator_compile(artifact, folder) -> dict | None``: a vendor compiler's verdict (edgetpu_compiler).
    """

    name: str
    format: str  # manifest artifact "format"
    suffix: str  # artifact file suffix, with the dot
    runtimes: tuple[str, ...]  # runtimes that verify its artifacts (targets pick one)
    packages: tuple[str, ...]  # distributions whose versions the manifest records
    build_modules: tuple[str, ...]  # import names needed to build
    install: str  # pip install hint for building
    runtime_modules: dict[str, tuple[str, ...]]  # runtime -> import names that run its artifacts (any one suffices)
    precisions: tuple[str, ...]
    quantizers: dict[str, Quantizer]  # the first is the default
    build: Callable
    program: Callable | None = None  # (encoder, shape, spec, calib, method, percentile, work, options) -> Program
    # (encoder, nchw shape, calib, work) -> (artifact, description): the vendor's own default int8 flow, which
    # 'edgec quantize --compare' measures edgec's forms against
    reference_int8: Callable | None = None
    export_text: Callable | None = None
    op_report: Callable | None = None
    io_records: Callable | None = None
    fold_head: Callable | None = None
    recipe: Callable | None = None
    accelerator_compile: Callable | None = None
    text_note: Callable | None = None  # (text artifact, spec) -> what to do on the device with it, or None
    # (path, threads=None, runtime=None, kernels="auto") -> callable on numpy inputs (torch-free for all but .pte)
    runner: Callable | None = None
    # runtime -> onnxruntime execution providers that run it on its accelerator (TensorRT); on a CPU-only
    # machine such an artifact runs on the CPU with Q/DQ as written (edgec.runtime.runners)
    accelerators: dict[str, tuple] = field(default_factory=dict)
    delegates: tuple[str, ...] = ()  # other delegates it can also lower the fp32 program for (extra_delegates)
    companions: tuple[str, ...] = ()  # suffixes of files that travel with the artifact (OpenVINO's .bin)
    notes: tuple[str, ...] = ()
    version: int = 1

    def quantizer(self, name: str | None) -> Quantizer:
        """The named quantizer (None: the default); an unknown name is a bad target file (exit 2)."""
        if name is None:
            return next(iter(self.quantizers.values()))
        if name not in self.quantizers:
            raise InputError(f"the {self.name} backend has no quantizer {name!r}",
                             hint=f"{did_you_mean(name, self.quantizers)}; it has {', '.join(self.quantizers)}")
        return self.quantizers[name]

    def method(self, quantizer: str | None, method: str | None, *, where: str = "") -> str:
        """The calibration method a quantizer uses for ``[quantize] method``: auto/None gives its default;
        a method it does not honour is refused (exit 2), never silently replaced."""
        q = self.quantizer(quantizer)
        if method in (None, "auto"):
            return q.default_method
        if method not in q.methods:
            raise InputError(f"{where}the {self.name} backend's quantizer {q.name!r} does not take calibration method "
                             f"{method!r}", hint=f"it takes {', '.join(q.methods)} (or 'auto'); set [quantize] method "
                                                 "for this target in edgec.toml ([quantize.targets.<target>] method)")
        return method

    def can_build(self) -> list[str]:
        """Import names missing to build with this backend (empty: it can)."""
        return [m for m in self.build_modules if not _installed(m)]

    def artifact_files(self, path: Path) -> list[Path]:
        """The artifact and the files that travel with it."""
        return [path] + [path.with_suffix(s) for s in self.companions]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=None)
def _load(name: str) -> Backend:
    module = importlib.import_module(f"{__name__}.{name}")
    record = getattr(module, "BACKEND", None)
    if not isinstance(record, Backend) or record.name != name:
        raise RuntimeError(f"edgec.backends.{name} must define BACKEND = Backend(name={name!r}, ...)")
    return record


def backends() -> dict[str, Backend]:
    """Every backend record, by name (cheap: no SDK is imported)."""
    return {name: _load(name) for name in MODULES}


def get(name: str) -> Backend:
    if name not in MODULES:
        raise UnknownNameError(f"backend {name!r} is not implemented in this edgec", hint=did_you_mean(name, MODULES))
    return _load(name)


def get_backend(name: str) -> Backend:
    """The record, checked that its build modules are installed (exit 3 with the install hint otherwise)."""
    record = get(name)
    missing = record.can_build()
    if missing:
        raise MissingToolchain(f"the {name} backend needs {', '.join(missing)}, which is not installed",
                               hint=f"pip install {record.install}")
    return record


def runtimes() -> dict[str, tuple[str, ...]]:
    """Every runtime a backend's artifacts run in -> the import names that run it."""
    out: dict[str, tuple[str, ...]] = {}
    for b in backends().values():
        for rt, mods in b.runtime_modules.items():
            out.setdefault(rt, mods)
    return out


def backend_of(runtime: str, fmt: str | None = None) -> Backend | None:
    """The backend whose artifacts (of ``fmt`` when given) run in ``runtime``."""
    for b in backends().values():
        if runtime in b.runtimes and (fmt is None or fmt == b.format):
            return b
    return None


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
    int8_form: dict | None = None  # what the int8 candidate is exact on (weight bits and why), for the manifest
    quantization: dict | None = None  # the quantize stage's record of the int8 candidate
    files_for: dict[str, str] = field(default_factory=dict)  # extra file name -> the precision it belongs to


def precision_candidates(spec, backend: str, makers: dict[str, Callable[[], Path]]) -> dict[str, Path]:
    """The target's precisions, in its order, each from its maker; one the backend cannot build is refused."""
    candidates: dict[str, Path] = {}
    for precision in spec.precisions:
        if precision not in makers:
            raise InputError(f"the {backend} backend does not build {precision!r}",
                             hint=f"list {' or '.join(makers)} in the target file")
        candidates[precision] = makers[precision]()
    return candidates
