"""LiteRT (TFLite): fp32 conversion with litert-torch, fully integer int8 with ai-edge-quantizer
(or, for CPU targets, litert-torch's PT2E int8 with per-channel weights), and the Edge TPU
compatibility report.

Known here (shared/DESIGN.md, re-checked by the tests): litert-torch's own PT2E int8 route
leaves float islands, while ai-edge-quantizer's ``static_wi8_ai8`` recipe applied to the fp32
model gives int8 I/O and no float op: that is the route the Edge TPU needs. On the example's
MobileViT the PT2E route with per-channel weights was closer to the float model (cosine 0.99895
vs 0.99819) and faster on this CPU, so ``android-tflite`` takes it (``quantizer =
"litert-pt2e-per-channel"``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError, require_module
from . import Backend, Built, Quantizer, precision_candidates

INTEGER_TYPES = ("int8", "uint8", "int32", "int16")


def export(encoder, input_shape: tuple[int, ...], path: Path, *, layout: str = "NHWC",
           normalize: bool = True) -> dict:
    """fp32 .tflite of ``encoder`` (L2 normalisation folded in when ``normalize``); NHWC input when ``layout`` says so."""
    import torch

    from .wrappers import NormalizedEmbedding

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # edgec reports its own progress
    litert_torch = require_module("litert_torch", install="litert-torch", purpose="LiteRT conversion")
    model = NormalizedEmbedding(encoder, normalize).eval()
    n, *rest = input_shape
    nchw = (n, rest[2], rest[0], rest[1]) if layout == "NHWC" else tuple(input_shape)
    if layout == "NHWC":
        model = litert_torch.to_channel_last_io(model, args=[0])
    example = torch.zeros(*input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            litert_torch.convert(model.eval(), (example,)).export(str(path))
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; name the op and the layer
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, model, (example,), converter="LiteRT conversion", backend="litert") from None
    with torch.no_grad():
        dim = int(NormalizedEmbedding(encoder).eval()(torch.zeros(*nchw)).shape[-1])
    return {"inputs": [{"name": "pixels", "shape": list(input_shape), "dtype": "float32", "quantization": None}],
            "outputs": [{"name": "embedding", "shape": [n, dim], "dtype": "float32", "normalized": normalize}]}


def quantize_full_int8(fp32: Path, out: Path, batches: list[np.ndarray]) -> None:
    """ai-edge-quantizer static int8 weights + activations, int8 input and output."""
    aq = require_module("ai_edge_quantizer", install="ai-edge-quantizer", purpose="fully integer TFLite")
    from ai_edge_quantizer import quantizer, recipe

    from ..runtime.inspect import litert_interpreter_module

    interp = litert_interpreter_module().Interpreter(model_path=str(fp32))
    sig = interp.get_signature_list()
    key = next(iter(sig))
    arg = sig[key]["inputs"][0]
    os.environ.setdefault("TQDM_DISABLE", "1")  # ai-edge-quantizer's progress bars; edgec reports its own
    q = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
    calib = {key: [{arg: b.astype(np.float32)} for b in batches]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize(q.calibrate(calib)).export_model(str(out), overwrite=True)
    del aq


PT2E_QUANTIZER = "litert-pt2e-per-channel"


def quantize_pt2e(model, input_shape: tuple[int, ...], out: Path, batches: list[np.ndarray], *,
                  layout: str = "NHWC", per_channel: bool = True) -> None:
    """litert-torch's PT2E route: int8 weights (per channel) and static int8 activations, float I/O and float
    islands where LiteRT has no int8 kernel (not for the Edge TPU). ``model`` maps NCHW pixels to the output."""
    import torch

    litert_torch = require_module("litert_torch", install="litert-torch", purpose="LiteRT conversion")
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    if layout == "NHWC":
        model = litert_torch.to_channel_last_io(model, args=[0])
    example = (torch.zeros(*input_shape),)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(torch.from_numpy(b))
        converted = convert_pt2e(prepared, fold_quantize=False)
        litert_torch.convert(converted, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(out))


def tensor_records(path: Path, *, normalized: bool) -> dict:
    """Input/output records with int8 quantization parameters, from the model itself."""
    from ..runtime.inspect import inspect_artifact

    info = inspect_artifact(path)
    return {"inputs": [dict(t, name="pixels") for t in info["inputs"]],
            "outputs": [dict(t, name="embedding", normalized=normalized) for t in info["outputs"]]}


def op_report(path: Path, *, supported: frozenset[str] | None = None, max_rank: int | None = None) -> dict:
    """Every op in execution order with its tensors' types and ranks, checked against ``supported``.

    An op is off the accelerator when its name is not supported, when any tensor it touches is
    not an integer type, or (``max_rank``) when a tensor has more than ``max_rank`` dimensions
    larger than 1 beyond the innermost ones. The accelerator runs ops until the first one that
    is off it; everything after that runs on the CPU (one partition, as the Edge TPU compiler does).
    """
    from ..runtime.inspect import litert_interpreter_module
    from .diagnose import tflite_layer

    mod = litert_interpreter_module()
    kwargs = {}
    if getattr(mod, "OpResolverType", None) is not None:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = mod.Interpreter(model_path=str(path), **kwargs)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    details = interp._get_ops_details()  # noqa: SLF001 - the only op listing LiteRT exposes
    # activations: what some op produces, and the graph inputs (constant weights, 4-D for convs, are exempt)
    activations = {t for op in details for t in op["outputs"]} | {d["index"] for d in interp.get_input_details()}
    ops, float_ops, first_off = [], [], None
    for i, op in enumerate(details):
        reasons = []
        touched = [tensors[t] for t in list(op["inputs"]) + list(op["outputs"]) if t >= 0 and t in tensors]
        dtypes = {np.dtype(t["dtype"]).name for t in touched}
        is_float = any(d.startswith("float") for d in dtypes)
        if is_float and op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
            float_ops.append(op["op_name"])
        if supported is not None and op["op_name"] not in supported:
            reasons.append("operation not supported")
        if supported is not None and is_float:
            reasons.append("float tensors (" + ", ".join(sorted(d for d in dtypes if d.startswith("float"))) + ")")
        if max_rank is not None:
            for t in (t for t in touched if t["index"] in activations):
                shape = [int(d) for d in t["shape"]]
                if len(shape) > max_rank and any(d > 1 for d in shape[:-max_rank]):
                    reasons.append(f"tensor {t['name']} has shape {shape}: more than {max_rank} dims larger than 1")
                    break
        if reasons and first_off is None:
            first_off = i
        out = tensors.get(op["outputs"][0]) if len(op["outputs"]) else None
        ops.append({"index": i, "op": op["op_name"], "off_accelerator": bool(reasons), "reasons": reasons,
                    "float": is_float and op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"),
                    "layer": tflite_layer(out["name"]) if out is not None else None})
    total = len(ops)
    mapped = first_off if first_off is not None else total
    return {"ops": ops, "total": total, "float_ops": float_ops, "first_unsupported": ops[first_off] if first_off is not None else None,
            "mapped_in_one_subgraph": mapped, "mapped_share": round(mapped / total, 4) if total else 0.0,
            "accelerator_ops_checked": supported is not None}


def run_edgetpu_compiler(path: Path, out_dir: Path) -> dict | None:
    """Run ``edgetpu_compiler -s`` when it is on PATH; parse its summary. None when it is not installed."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return None
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(path)], capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    m = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    total = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    compiled = out_dir / f"{path.stem}_edgetpu.tflite"
    return {"returncode": proc.returncode, "on_edgetpu": int(m.group(1)) if m else None,
            "on_cpu": int(total.group(1)) if total else None, "compiled": compiled.name if compiled.is_file() else None,
            "log": text[-4000:]}


class Pt2eTfliteProgram:
    """litert-torch's PT2E int8 (per-channel symmetric weights, static int8 activations with the configured
    method's observer, float islands where LiteRT has no int8 kernel), any layers kept in float."""

    def __init__(self, encoder, shape: tuple[int, ...], calib, *, method: str, percentile: float, layout: str,
                 normalize: bool) -> None:
        litert_torch = require_module("litert_torch", install="litert-torch", purpose="LiteRT conversion")
        from litert_torch.quantize import pt2e_quantizer

        from ..quantize.pt2e import Pt2eProgram
        from .wrappers import NormalizedEmbedding

        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        model = NormalizedEmbedding(encoder, normalize).eval()
        if layout == "NHWC":
            model = litert_torch.to_channel_last_io(model, args=[0])
        batches = [b[0] for b in calib.batches(layout=layout, batch_size=1)]
        self.inner = Pt2eProgram(model, shape, batches, method=method, percentile=percentile, layout=layout,
                                 quantizer=lambda config: pt2e_quantizer.PT2EQuantizer().set_global(config),
                                 base_config=pt2e_quantizer.get_symmetric_quantization_config,
                                 calibration_sha256=calib.sha256)
        self.layers, self.calibration_sha256 = self.inner.layers, calib.sha256
        self.calibration_images = len(calib)
        self.description = f"litert-torch PT2E, per-channel int8 weights, float I/O ({method} ranges)"

    def runner(self, keep_float=frozenset(), only=None, batches=None):
        return self.inner.runner(keep_float, only, batches)

    def ranges_summary(self) -> dict:
        return self.inner.ranges_summary()

    def sensitivity_kwargs(self, images: int) -> dict:
        return self.inner.sensitivity_kwargs(images)

    def write(self, out: Path, keep_float=frozenset()) -> dict[str, str]:
        litert_torch = require_module("litert_torch", install="litert-torch", purpose="LiteRT conversion")
        from litert_torch.quantize.quant_config import QuantConfig

        converted = self.inner.convert(keep_float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            litert_torch.convert(converted, self.inner.example,
                                 quant_config=QuantConfig(pt2e_quantizer=self.inner.inner())).export(str(out))
        return {}


class FullInt8Program:
    """ai-edge-quantizer's ``static_wi8_ai8`` on the fp32 TFLite: fully integer (int8 I/O, no float op), the
    Edge TPU's route; min/max ranges only (the quantizer takes no other calibration)."""

    def __init__(self, fp32: Path, calib, layout: str) -> None:
        from ..quantize.sensitivity import LiteRTProgram

        self.inner = LiteRTProgram(fp32, list(calib.batches(layout=layout, batch_size=1)))
        self.layers, self.calibration_sha256 = self.inner.layers, calib.sha256
        self.calibration_images = len(calib)
        self.description = "ai-edge-quantizer static_wi8_ai8, fully integer (minmax ranges)"

    def runner(self, keep_float=frozenset(), only=None):
        return self.inner.runner(keep_float, only)

    def ranges_summary(self) -> dict:
        vals = [float(np.max(np.abs(np.concatenate([np.ravel(v["min"]), np.ravel(v["max"])]))))
                for v in self.inner.qsv.values() if "min" in v and "max" in v]
        vals = np.array(vals or [0.0])
        return {"tensors": len(self.inner.qsv), "amax_min": float(vals.min()), "amax_median": float(np.median(vals)),
                "amax_max": float(vals.max()), "note": "ai-edge-quantizer min/max calibration"}

    def write(self, out: Path, keep_float=frozenset()) -> dict[str, str]:
        self.inner.write(out, keep_float)
        return {}


PT2E_QUANTIZER = "litert-pt2e-per-channel"
FULL_INT8_QUANTIZER = "ai-edge-quantizer static_wi8_ai8"


def program(encoder, shape: tuple[int, ...], spec, calib, method: str, percentile: float, work: Path,
            options: dict | None = None, fp32: Path | None = None):
    """The target's int8 program: litert-torch PT2E (CPU targets: closer to float and faster, float islands) or
    ai-edge-quantizer's fully integer one on the fp32 .tflite (``fp32``, or a fresh conversion)."""
    if BACKEND.quantizer(spec.quantizer).name == PT2E_QUANTIZER:
        return Pt2eTfliteProgram(encoder, shape, calib, method=method, percentile=percentile, layout=spec.layout,
                                 normalize=spec.normalize_output)
    if fp32 is None:
        fp32 = work / "model.fp32.tflite"
        export(encoder, shape, fp32, layout=spec.layout, normalize=spec.normalize_output)
    return FullInt8Program(fp32, calib, spec.layout)


def build(encoder, shape: tuple[int, ...], *, spec, work: Path, quantize, options: dict | None = None, log) -> Built:
    """fp32 .tflite, and int8 through the quantize stage (fully integer by ai-edge-quantizer, or litert-torch's
    PT2E for CPU targets) when the target lists it; the op report of every candidate, checked against the
    target's constraints."""
    # the target ISA plays no part: XNNPACK's and LiteRT's int8 kernels widen to 16/32 bits on every ISA (no saturation)
    fp32 = work / "model.fp32.tflite"
    io = export(encoder, shape, fp32, layout=spec.layout, normalize=spec.normalize_output)
    log(f"converted fp32 TFLite ({fp32.stat().st_size / 1e6:.2f} MB)")
    built = Built(candidates={}, format="tflite", io=io)

    def int8() -> Path:
        def make(calib, method, percentile):
            return program(encoder, shape, spec, calib, method, percentile, work, options, fp32=fp32)

        res = quantize(make, work / "model.int8.tflite")
        built.calibration_sha256, built.quantization = res.record["calibration_sha256"], res.record
        log(f"int8 TFLite ({res.record['form']}, {res.record['calibration_images']} calibration images, "
            f"{res.path.stat().st_size / 1e6:.2f} MB)")
        return res.path

    built.candidates = precision_candidates(spec, "litert", {"fp32": lambda: fp32, "int8": int8})
    c = spec.constraints
    supported = frozenset(c.supported_ops) if c.supported_ops else None
    built.report = {p: op_report(path, supported=supported, max_rank=c.max_tensor_rank)
                    for p, path in built.candidates.items()}
    for p, rep in built.report.items():
        log(f"{p}: {rep['total']} ops, {len(rep['float_ops'])} float"
            + (f"; {rep['mapped_in_one_subgraph']} of {rep['total']} ({rep['mapped_share']:.0%}) map to the accelerator in one "
               f"subgraph" if supported else ""))
    if c.fully_integer:
        for p, rep in built.report.items():
            if p == "int8" and rep["float_ops"]:
                first = next(o for o in rep["ops"] if o.get("float"))
                raise InputError(f"{len(rep['float_ops'])} float ops remain in the int8 model "
                                 f"({', '.join(sorted(set(rep['float_ops'])))}); the first, #{first['index']} {first['op']}, "
                                 f"is in layer {first['layer'] or '(unnamed)'}: the target needs a fully integer model",
                                 hint="give this target an all-convolution student ([student] targets = { <target> = "
                                      "\"mobilenetv4_conv_small\" } in edgec.toml), or compile for cpu, android or "
                                      "android-tflite, which run float ops")
    return built


def export_text(module, context_length: int, path: Path, *, spec=None) -> dict:
    """fp32 .tflite of a text tower (int32 token ids (1, L) -> normalised embedding); returns its I/O records."""
    import torch

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    litert_torch = require_module("litert_torch", install="litert-torch", purpose="LiteRT conversion")
    example = torch.zeros(1, context_length, dtype=torch.int32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            litert_torch.convert(module.eval(), (example,)).export(str(path))
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, module, (example,), converter="LiteRT conversion of the text tower",
                                   backend="litert") from None
    with torch.no_grad():
        dim = int(module(example).shape[-1])
    return {"inputs": [{"name": "token_ids", "shape": [1, context_length], "dtype": "int32", "quantization": None}],
            "outputs": [{"name": "embedding", "shape": [1, dim], "dtype": "float32", "normalized": True}]}


def reference_int8(encoder, shape: tuple[int, ...], calib, work: Path) -> tuple[Path, str]:
    """litert-torch's PT2E route with its default config (per-tensor weights, histogram observer), NHWC input."""
    from .wrappers import NormalizedEmbedding

    n, c, h, w = shape
    out = work / "reference.int8.tflite"
    quantize_pt2e(NormalizedEmbedding(encoder).eval(), (n, h, w, c), out,
                  list(calib.batches(layout="NHWC", batch_size=1)), per_channel=False)
    return out, "litert-torch PT2E, get_symmetric_quantization_config() defaults (per-tensor, histogram)"


def runner(path: Path, threads: int | None = None, runtime: str | None = None, kernels: str = "auto"):
    from ..runtime.runners import LiteRTRunner

    return LiteRTRunner(path, threads)


def io_records(path: Path, io: dict, spec) -> dict:
    """The shipped file's records: int8 I/O and its quantization parameters come from the model itself."""
    return tensor_records(path, normalized=spec.normalize_output)


def accelerator_compile(artifact: Path, folder: Path, spec) -> dict | None:
    """edgetpu_compiler's own verdict when the target names it (and the reason when it is not installed)."""
    if spec.accelerator_compiler != "edgetpu_compiler":
        return None
    compiled = run_edgetpu_compiler(artifact, folder)
    return compiled if compiled is not None else {
        "ran": False, "reason": "edgetpu_compiler is not on PATH: the mapping above is edgec's check against the "
                                "Edge TPU's documented op list and constraints; install the compiler for its own verdict"}


def report_for(path: Path, spec) -> dict:
    c = spec.constraints
    return op_report(path, supported=frozenset(c.supported_ops) if c.supported_ops else None, max_rank=c.max_tensor_rank)


BACKEND = Backend(
    name="litert", format="tflite", suffix=".tflite", runtimes=("litert",),
    packages=("litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    build_modules=("torch", "litert_torch", "ai_edge_quantizer"), install="litert-torch ai-edge-quantizer ai-edge-litert",
    runtime_modules={"litert": ("ai_edge_litert", "tflite_runtime")}, precisions=("fp32", "int8"),
    quantizers={
        FULL_INT8_QUANTIZER: Quantizer(FULL_INT8_QUANTIZER, "ai-edge-quantizer static int8, fully integer (Edge TPU)",
                                       ("minmax",), "minmax", fully_integer=True),
        PT2E_QUANTIZER: Quantizer(PT2E_QUANTIZER, "litert-torch PT2E, per-channel int8 weights, float islands",
                                  ("minmax", "percentile", "entropy", "histogram"), "histogram"),
    },
    build=build, program=program, reference_int8=reference_int8, export_text=export_text, op_report=report_for, io_records=io_records,
    accelerator_compile=accelerator_compile, runner=runner,
)
