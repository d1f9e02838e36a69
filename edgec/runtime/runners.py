"""Run an artifact on a batch of preprocessed inputs with its own runtime (numpy only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, require_module
from .inspect import litert_interpreter_module


def accelerator_providers(runtime: str) -> tuple:
    """The onnxruntime execution providers that run ``runtime`` on its accelerator (the backend record says
    which: TensorRT through onnxruntime-gpu's TensorRT provider); empty for onnxruntime itself."""
    from ..backends import backend_of  # the records import no SDK

    backend = backend_of(runtime)
    return tuple(backend.accelerators.get(runtime, ())) if backend is not None else ()


def onnx_providers(runtime: str, available: list[str]) -> list:
    """Execution providers for an ONNX artifact: an accelerator runtime's artifact (TensorRT: int8 from its Q/DQ
    nodes, fp16 elsewhere as build_engine.sh asks) runs on that accelerator where onnxruntime has its providers,
    else on the CPU; ``executed_by`` in verify.json says which it was."""
    providers = [p for p in accelerator_providers(runtime) if (p[0] if isinstance(p, tuple) else p) in available]
    return [*providers, "CPUExecutionProvider"]


QDQ_AS_WRITTEN = "Q/DQ executed as written (graph optimisations off: dequantize, float op, quantize)"


def has_qdq(path: Path) -> bool:
    """Whether an .onnx file holds QuantizeLinear nodes (read without the onnx package: the op name is in the bytes)."""
    with open(path, "rb") as f:
        return b"QuantizeLinear" in f.read()


def session_options(threads: int | None, kernels: str):
    """onnxruntime session options for ``kernels`` "host" (as deployed) or "reference" (Q/DQ as written)."""
    import onnxruntime as ort

    if kernels not in ("host", "reference"):
        raise InputError(f"unknown kernel choice {kernels!r}", hint="host or reference")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if kernels == "reference":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


class OnnxRunner:
    """onnxruntime on one .onnx artifact.

    ``kernels="host"`` runs it as onnxruntime on this CPU would (graph optimisations on: Q/DQ pairs fused into
    the host's int8 kernels, whose results depend on the ISA: see :mod:`edgec.runtime.isa`).
    ``kernels="reference"`` turns graph optimisations off, so each Q/DQ node runs as written; the only
    arithmetic left is float, and the result does not depend on the host's integer kernels. That is the
    stand-in for TensorRT, which executes the same Q/DQ graph with int32 accumulation, when no TensorRT is here.
    ``kernels="auto"``: the reference for a TensorRT artifact that no TensorRT provider can run, else host."""

    def __init__(self, path: Path, threads: int | None = None, runtime: str = "onnxruntime",
                 kernels: str = "auto") -> None:
        ort = require_module("onnxruntime", install="onnxruntime", purpose="running an .onnx artifact")
        providers = onnx_providers(runtime, ort.get_available_providers())
        if kernels == "auto":
            on_cpu = providers[0] == "CPUExecutionProvider"
            stand_in = bool(accelerator_providers(runtime)) and on_cpu  # an accelerator's artifact, on this CPU
            kernels = "reference" if stand_in and has_qdq(path) else "host"
        if kernels == "reference":
            providers = ["CPUExecutionProvider"]
        opts = session_options(threads, kernels)
        self.kernels = kernels
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            raise InputError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}",
                             hint="the file is truncated or corrupt; compile the target again") from None
        self.executed_by = f"onnxruntime {ort.__version__} {self.session.get_providers()[0]}" + (
            f", {QDQ_AS_WRITTEN}" if kernels == "reference" else "")
        # the runtime that ran it: the accelerator's own when its provider is here, else onnxruntime on this CPU
        on_accelerator = self.session.get_providers()[0] != "CPUExecutionProvider"
        self.ran = runtime if on_accelerator or not accelerator_providers(runtime) else "onnxruntime"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = None if not isinstance(inp.shape[0], int) else inp.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        step = self.batch or 64
        outs = [self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32)


class LiteRTRunner:
    """LiteRT (``ai_edge_litert``) or ``tflite_runtime``; quantizes int8 inputs, dequantizes outputs."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        mod = litert_interpreter_module()
        delegates = [edgetpu_delegate(mod, path)] if path.name.endswith("_edgetpu.tflite") else []
        self.executed_by = f"{mod.__name__.split('.')[0]}{' + Edge TPU delegate' if delegates else ''}"
        try:
            self.interp = mod.Interpreter(model_path=str(path), num_threads=threads, experimental_delegates=delegates or None)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"LiteRT cannot load {path}: {str(exc).splitlines()[0][:200]}",
                             hint="the file is truncated or corrupt; compile the target again") from None
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        dtype = self.inp["dtype"]
        rows = []
        for i in range(len(x)):
            xi = x[i : i + 1]
            if scale:
                info = np.iinfo(dtype)
                xi = np.clip(np.round(xi / scale + zero), info.min, info.max)
            self.interp.set_tensor(self.inp["index"], xi.astype(dtype))
            self.interp.invoke()
            y = self.interp.get_tensor(self.out["index"]).astype(np.float32)
            o_scale, o_zero = self.out["quantization"]
            rows.append((y - o_zero) * o_scale if o_scale else y)
        return np.concatenate(rows)


EDGETPU_LIBRARY = "libedgetpu.so.1"


def edgetpu_delegate(mod, path: Path):
    """The Edge TPU delegate an ``*_edgetpu.tflite`` program needs (its custom op runs nowhere else)."""
    import ctypes

    try:
        ctypes.CDLL(EDGETPU_LIBRARY)  # first: a failed load_delegate leaves a half-made Delegate that errors when collected
        return mod.load_delegate(EDGETPU_LIBRARY)
    except (ValueError, OSError, RuntimeError, AttributeError) as exc:
        from ..errors import MissingToolchain

        raise MissingToolchain(
            f"{path.name} is compiled for the Edge TPU and needs {EDGETPU_LIBRARY} and a Coral device ({exc})",
            hint="install libedgetpu1-std from Coral's Debian repository and plug in the device, or verify the "
                 "model.int8.tflite beside it on the CPU") from None


_POOL = {"epoch": 0}  # bumped whenever ExecuTorch's process-wide thread pool is replaced


def set_executorch_threads(threads: int | None) -> int | None:
    """Size ExecuTorch's (process-wide) thread pool, as onnxruntime's and LiteRT's are sized per session; returns
    the pool's size (None where this ExecuTorch has no pool API).

    Resetting the pool destroys the old one, and an XNNPACK delegate loaded before keeps a pointer to it
    (running it then crashes, hangs or returns garbage): every :class:`ExecuTorchRunner` loads its program
    after the reset and reloads it when the pool was replaced since (``_POOL["epoch"]``)."""
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return None
    get = getattr(portable_lib, "_threadpool_get_thread_count", None)
    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if threads and reset is not None and get is not None and get() != threads:
        reset(int(threads))
        _POOL["epoch"] += 1
    return get() if get is not None else None


class ExecuTorchRunner:
    """ExecuTorch's Python runtime (it imports torch: .pte verification needs torch installed)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        require_module("executorch.runtime", install="executorch (its Python runtime also needs torch)",
                       purpose="running a .pte artifact")
        self.path, self.requested = Path(path), threads
        self._load()
        self.executed_by = f"executorch (XNNPACK, portable kernels), {self.threads} thread(s)"
        meta = str(getattr(self.method, "metadata", ""))  # MethodMeta(... input_tensor_meta=['TensorInfo(sizes=[1, ...
        self.batch = 1 if "sizes=[1," in meta else None

    def _load(self) -> None:
        from executorch.runtime import Runtime

        self.threads = set_executorch_threads(self.requested)  # before loading: the delegate binds the pool it finds
        try:
            # the Program owns the loaded file the Method executes from: keep it alive as long as the Method
            self.program = Runtime.get().load_program(str(self.path))
            self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"ExecuTorch cannot load {self.path}: {str(exc).splitlines()[0][:200]}",
                             hint="the file is truncated or corrupt; compile the target again") from None
        self.epoch = _POOL["epoch"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.requested:
            set_executorch_threads(self.requested)  # another runner may have resized the pool since
        if self.epoch != _POOL["epoch"]:  # the pool this program was bound to is gone: bind the current one
            self.method = self.program = None
            self._load()
        step = self.batch or len(x)
        outs = [self.method.execute([torch.from_numpy(np.ascontiguousarray(x[i : i + step]))])[0].numpy()
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32)


def open_runner(path: Path, runtime: str, threads: int | None = None, *, kernels: str = "auto"):
    """The runner of ``runtime`` for ``path``, from the backend record whose artifacts run in it."""
    from ..backends import backend_of  # the records import no SDK: verify stays torch-free

    backend = backend_of(runtime)
    if backend is None or backend.runner is None or Path(path).suffix != backend.suffix:
        raise InputError(f"{path}: runtime {runtime!r} cannot be run by this edgec on this machine")
    return backend.runner(Path(path), threads, runtime, kernels)
