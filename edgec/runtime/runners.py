"""Run an artifact on a batch of preprocessed inputs with its own runtime (numpy only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, require_module
from .inspect import litert_interpreter_module


class OnnxRunner:
    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = require_module("onnxruntime", install="onnxruntime", purpose="running an .onnx artifact")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            raise InputError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}",
                             hint="the file is truncated or corrupt; compile the target again") from None
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
        try:
            self.interp = mod.Interpreter(model_path=str(path), num_threads=threads)
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


class ExecuTorchRunner:
    """ExecuTorch's Python runtime (it imports torch: .pte verification needs torch installed)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        require_module("executorch.runtime", install="executorch (its Python runtime also needs torch)",
                       purpose="running a .pte artifact")
        from executorch.runtime import Runtime

        try:
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"ExecuTorch cannot load {path}: {str(exc).splitlines()[0][:200]}",
                             hint="the file is truncated or corrupt; compile the target again") from None
        meta = str(getattr(self.method, "metadata", ""))  # MethodMeta(... input_tensor_meta=['TensorInfo(sizes=[1, ...
        self.batch = 1 if "sizes=[1," in meta else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        step = self.batch or len(x)
        outs = [self.method.execute([torch.from_numpy(np.ascontiguousarray(x[i : i + step]))])[0].numpy()
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32)


def open_runner(path: Path, runtime: str, threads: int | None = None):
    if runtime in ("onnxruntime", "tensorrt") and path.suffix == ".onnx":
        return OnnxRunner(path, threads)
    if runtime == "litert":
        return LiteRTRunner(path, threads)
    if runtime == "executorch":
        return ExecuTorchRunner(path, threads)
    raise InputError(f"{path}: runtime {runtime!r} cannot be run by this edgec on this machine")
