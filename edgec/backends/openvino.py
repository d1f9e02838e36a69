"""OpenVINO: IR (``.xml`` + ``.bin``) for Intel CPUs, iGPUs and NPUs, fp32 and int8 by NNCF.

``openvino.convert_model`` traces the encoder (L2 normalisation folded in) into an ``ov.Model``;
fp32 is saved as is (``compress_to_fp16=False``: the file holds what was verified). int8 is
``nncf.quantize`` over the calibration images: NNCF inserts FakeQuantize nodes (8-bit weights per
channel, 8-bit activations) and corrects biases; the calibration method sets NNCF's activation range
estimator. A layer kept in float is an NNCF ignored-scope name (a Convolution/MatMul node). Verified
in the OpenVINO runtime on this CPU (the CPU plugin runs the FakeQuantize ops as int8 kernels).

Importable without openvino or torch: the record below is what the rest of edgec reads.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import Backend, Built, Quantizer, precision_candidates

METHODS = ("minmax", "percentile", "histogram")
LAYER_TYPES = ("Convolution", "GroupConvolution", "MatMul")


def _ov():
    from ..errors import require_module

    return require_module("openvino", install="openvino nncf", purpose="OpenVINO targets")


def convert(encoder, input_shape: tuple[int, ...], *, normalize: bool = True):
    """The encoder as an ``ov.Model`` (static shape), and its I/O records."""
    import torch

    from .wrappers import NormalizedEmbedding

    ov = _ov()
    model = NormalizedEmbedding(encoder, normalize).eval()
    example = torch.zeros(*input_shape)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(model, example_input=example, input=[tuple(input_shape)])
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; name the op and the layer
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, model, (example,), converter="OpenVINO conversion", backend="openvino") from None
    with torch.no_grad():
        dim = int(model(example).shape[-1])
    io = {"inputs": [{"name": "pixels", "shape": list(input_shape), "dtype": "float32", "quantization": None}],
          "outputs": [{"name": "embedding", "shape": [input_shape[0], dim], "dtype": "float32", "normalized": normalize}]}
    return ov_model, io


def save(ov_model, path: Path) -> Path:
    """The IR, with the names OpenVINO generates from a process-wide counter (``Model36``, ``Constant_26691``)
    replaced by ones from the graph's order: the same model gives the same bytes in every build."""
    import re

    ov = _ov()
    model = ov_model.clone()
    model.set_friendly_name("edgec")
    auto = re.compile(r"(?<![A-Za-z0-9_.])([A-Z][A-Za-z0-9]*)_(\d+)")  # an op type and the counter: Multiply_3054
    renamed: dict[str, str] = {}

    def stable(m: re.Match) -> str:
        return renamed.setdefault(m.group(0), f"{m.group(1)}_n{len(renamed)}")

    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        new = auto.sub(stable, name)
        if new != name:
            op.set_friendly_name(new)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def range_estimator(method: str, percentile: float):
    """NNCF's activation range estimator for an edgec calibration method."""
    from nncf.quantization.range_estimator import (AggregatorType, RangeEstimatorParameters,
                                                   RangeEstimatorParametersSet, StatisticsCollectorParameters,
                                                   StatisticsType)

    if method == "minmax":
        return RangeEstimatorParametersSet.MINMAX
    if method == "histogram":
        return RangeEstimatorParametersSet.HISTOGRAM
    prob = max(1e-9, 1.0 - percentile / 100.0)  # percentile: per-image quantiles, the extreme one over images
    return RangeEstimatorParameters(
        min=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MIN, quantile_outlier_prob=prob),
        max=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MAX, quantile_outlier_prob=prob))


class NncfProgram:
    """``nncf.quantize`` of one ``ov.Model`` with the configured range estimator; layers are its
    Convolution/MatMul nodes, a layer kept in float is an ignored-scope name. NNCF calibrates again for
    every program written (statistics depend on which quantizers exist)."""

    def __init__(self, ov_model, calib, *, method: str, percentile: float) -> None:
        _ov()
        self.ov_model, self.method, self.percentile = ov_model, method, percentile
        self.batches = [np.ascontiguousarray(b) for b in calib.batches(layout="NCHW", batch_size=1)]
        self.calibration_sha256, self.calibration_images = calib.sha256, len(calib)
        self.description = f"NNCF int8 (FakeQuantize: per-channel 8-bit weights, 8-bit activations; {method} ranges)"
        self.layers = []
        for op in ov_model.get_ordered_ops():
            if op.get_type_name() in LAYER_TYPES:
                params = sum(int(np.prod(list(i.get_shape()))) for i in op.inputs()
                             if i.get_source_output().get_node().get_type_name() == "Constant"
                             or i.get_source_output().get_node().get_type_name() == "Convert")
                self.layers.append({"name": op.get_friendly_name(), "op": op.get_type_name(), "params": params})
        self._tmp = tempfile.TemporaryDirectory(prefix="edgec-ov-")

    def quantized(self, keep_float=frozenset(), only=None):
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        names = [la["name"] for la in self.layers]
        ignored = sorted(keep_float) if only is None else [n for n in names if n not in set(only)]
        params = AdvancedQuantizationParameters(activations_range_estimator_params=range_estimator(self.method,
                                                                                                   self.percentile))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nncf.quantize(self.ov_model.clone(), nncf.Dataset(self.batches), subset_size=len(self.batches),
                                 ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
                                 advanced_parameters=params)

    def write(self, out: Path, keep_float=frozenset()) -> dict[str, str]:
        save(self.quantized(keep_float), out)
        return {}

    def ranges_summary(self) -> dict:
        return {"estimator": f"NNCF {self.method} activation ranges", "per_channel_weights": True}

    def runner(self, keep_float=frozenset(), only=None):
        path = Path(self._tmp.name) / "candidate.xml"
        save(self.quantized(keep_float, only), path)
        return OpenVinoRunner(path)


class OpenVinoRunner:
    """The OpenVINO runtime (CPU plugin) on one IR: NCHW float32 images -> outputs, one image at a time."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ov = _ov()
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        config["INFERENCE_PRECISION_HINT"] = "f32"  # no silent bf16/fp16 on CPUs that have it: verify what ships
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.path = Path(path)
        self.executed_by = f"openvino {ov.__version__} CPU plugin"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        shape = list(self.compiled.inputs[0].get_partial_shape().to_shape()) \
            if self.compiled.inputs[0].get_partial_shape().is_static else None
        step = shape[0] if shape else len(x)
        outs = []
        for i in range(0, len(x), step):
            res = self.request.infer({0: x[i:i + step].astype(self.compiled.inputs[0].get_element_type().to_dtype())})
            outs.append(np.asarray(res[self.compiled.outputs[0]]))
        return np.concatenate(outs).astype(np.float32)


def runner(path: Path, threads: int | None = None, runtime: str | None = None, kernels: str = "auto"):
    return OpenVinoRunner(path, threads)


def program(encoder, shape: tuple[int, ...], spec, calib, method: str, percentile: float, work: Path,
            options: dict | None = None) -> NncfProgram:
    """The target's NNCF int8 program, from a fresh conversion of the encoder."""
    ov_model, _ = convert(encoder.eval(), shape, normalize=spec.normalize_output)
    return NncfProgram(ov_model, calib, method=method, percentile=percentile)


def reference_int8(encoder, shape: tuple[int, ...], calib, work: Path) -> tuple[Path, str]:
    """``nncf.quantize`` with every parameter at its default (NNCF's own range estimators)."""
    import nncf

    ov_model, _ = convert(encoder.eval(), shape)
    batches = [np.ascontiguousarray(b) for b in calib.batches(layout="NCHW", batch_size=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(batches))
    out = save(q, work / "reference.int8.xml")
    return out, "nncf.quantize defaults (performance preset, NNCF's default range estimators, fast bias correction)"


def build(encoder, shape: tuple[int, ...], *, spec, work: Path, quantize, options: dict | None = None, log) -> Built:
    """fp32 IR always (it is what int8 is made from); int8 through the quantize stage with NNCF."""
    ov_model, io = convert(encoder.eval(), shape, normalize=spec.normalize_output)
    fp32 = save(ov_model, work / "model.fp32.xml")
    log(f"converted fp32 OpenVINO IR ({(fp32.stat().st_size + fp32.with_suffix('.bin').stat().st_size) / 1e6:.2f} MB)")
    built = Built(candidates={}, format="openvino", io=io)

    def int8() -> Path:
        def make(calib, method, percentile):
            return NncfProgram(ov_model, calib, method=method, percentile=percentile)

        res = quantize(make, work / "model.int8.xml")
        built.calibration_sha256, built.quantization = res.record["calibration_sha256"], res.record
        return res.path

    built.candidates = precision_candidates(spec, "openvino", {"fp32": lambda: fp32, "int8": int8})
    return built


def export_text(module, context_length: int, path: Path, *, spec=None) -> dict:
    """fp32 IR of a text tower (int32 token ids (1, L) -> normalised embedding)."""
    import torch

    ov = _ov()
    example = torch.zeros(1, context_length, dtype=torch.int32)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(module.eval(), example_input=example, input=[((1, context_length), ov.Type.i32)])
    except Exception as exc:  # noqa: BLE001
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, module, (example,), converter="OpenVINO conversion of the text tower",
                                   backend="openvino") from None
    save(ov_model, path)
    with torch.no_grad():
        dim = int(module(example).shape[-1])
    return {"inputs": [{"name": "token_ids", "shape": [1, context_length], "dtype": "int32", "quantization": None}],
            "outputs": [{"name": "embedding", "shape": [1, dim], "dtype": "float32", "normalized": True}]}


BACKEND = Backend(
    name="openvino", format="openvino", suffix=".xml", companions=(".bin",), runtimes=("openvino",),
    packages=("openvino", "nncf"), build_modules=("torch", "openvino", "nncf"), install="openvino nncf",
    runtime_modules={"openvino": ("openvino",)}, precisions=("fp32", "int8"),
    quantizers={"nncf": Quantizer("nncf", "NNCF post-training int8 (FakeQuantize, per-channel weights, bias "
                                          "correction)", METHODS, "minmax")},
    build=build, program=program, reference_int8=reference_int8, export_text=export_text, runner=runner,
    notes=("OpenVINO IR is two files: the .xml graph and the .bin weights beside it (both are listed in the manifest).",),
)
