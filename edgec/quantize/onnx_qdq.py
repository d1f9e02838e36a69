"""int8 Q/DQ ONNX in the form TensorRT's explicit quantization accepts (onnxruntime runs it too).

``quant_pre_process`` first; per-channel symmetric int8 weights; symmetric int8 activations
with ranges from :mod:`edgec.quantize.ranges`; only Conv / MatMul / Gemm quantized by default
(fewer Q/DQ pairs, and the best cosine in the exploratory runs). The same ranges give the
TensorRT calibration cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, require_module
from .calibration import CalibrationSet
from .ranges import collect_ranges, tensorrt_cache

DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass
class QuantizedOnnx:
    path: Path
    amax: dict[str, float]
    trt_cache: str
    quantized_nodes: int
    qdq_pairs: int


def _float_tensors(model) -> list[str]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    names = [vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
             if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    inits = {i.name for i in model.graph.initializer}
    return [n for n in dict.fromkeys(names) if n not in inits]


def quantize_onnx(fp32: Path, out: Path, calib: CalibrationSet, *, method: str = "minmax", percentile: float = 99.999,
                  op_types: tuple[str, ...] = DEFAULT_OP_TYPES, exclude_nodes: tuple[str, ...] = (),
                  batch_size: int = 16, trt_version: int = 100300) -> QuantizedOnnx:
    onnx = require_module("onnx", install="onnx", purpose="ONNX quantization")
    ort = require_module("onnxruntime", install="onnxruntime", purpose="ONNX quantization")
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgec-qdq-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        names = _float_tensors(model)
        augmented = onnx.load(str(pre))
        existing = {o.name for o in augmented.graph.output}
        for name in names:
            if name not in existing:
                augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        aug_path = Path(tmp) / "augmented.onnx"
        onnx.save(augmented, str(aug_path))
        sess = ort.InferenceSession(str(aug_path), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in sess.get_outputs()]
        input_name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int):  # a static batch dimension takes exactly that many images per run
            batch_size = fixed

        def run_all(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(outputs, sess.run(outputs, {input_name: batch})))

        collector = collect_ranges(run_all, lambda: calib.batches(batch_size=batch_size))
        amax = collector.amax(method, percentile)
        data = {n: TensorData(lowest=np.float32(-a), highest=np.float32(a)) for n, a in amax.items()}
        quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QInt8,
                                 TensorsData(CalibrationMethod.MinMax, data), None, list(exclude_nodes) or None,
                                 list(op_types), {"ActivationSymmetric": True, "WeightSymmetric": True})
        quantizer.quantize_model()
        quantizer.model.save_model_to_file(str(out), False)
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    n_quant = sum(1 for n in model.graph.node if n.op_type in op_types and n.name not in exclude_nodes)
    if "QuantizeLinear" not in ops:
        raise InputError(f"quantization of {fp32.name} produced no Q/DQ nodes", hint="the model has no Conv/MatMul/Gemm to quantize")
    return QuantizedOnnx(out, amax, tensorrt_cache(amax, trt_version=trt_version), n_quant, ops.count("QuantizeLinear"))
