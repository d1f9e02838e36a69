"""ONNX: export (onnxruntime on CPUs; TensorRT takes the same graph), fp16, int8 Q/DQ programs, the
zero-shot head folded into a built graph, and TensorRT's build recipe (build_engine.sh).

Importable without torch or onnx: the record below is what the rest of edgec reads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from . import Backend, Built, Quantizer, precision_candidates

OPSET = 17  # dynamo=False keeps the requested opset; the dynamo exporter silently gives 18
METHODS = ("minmax", "percentile", "entropy")


def __getattr__(name: str):  # the torch wrappers moved to .wrappers; old imports keep working
    if name in ("NormalizedEmbedding", "ZeroShotLogits"):
        from . import wrappers

        return getattr(wrappers, name)
    raise AttributeError(name)


def export(encoder, input_shape: tuple[int, ...], path: Path, *, dynamic_batch: bool = True,
           normalize: bool = True) -> dict:
    """Export ``encoder`` (pixels -> embedding) as ONNX; returns the input/output records for the manifest."""
    import onnx
    import torch

    from .wrappers import NormalizedEmbedding

    model = NormalizedEmbedding(encoder, normalize).eval()
    example = torch.zeros(*input_shape)
    axes = {"pixels": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():  # tracer warnings about Python scalars are expected and noisy
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["embedding"],
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; name the op and the layer
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, model, (example,), converter="the ONNX exporter", backend="onnx") from None
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        dim = int(model(example).shape[-1])
    return {
        "inputs": [{"name": "pixels", "shape": list(input_shape), "dtype": "float32", "quantization": None,
                    "dynamic_batch": dynamic_batch}],
        "outputs": [{"name": "embedding", "shape": [input_shape[0], dim], "dtype": "float32", "normalized": normalize}],
        "opset": OPSET,
    }


def to_fp16(fp32: Path, out: Path) -> Path:
    """fp16 weights and compute with float32 inputs and outputs (Cast at the edges): what TensorRT's --fp16
    builds from, and what onnxruntime runs to check it here."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    _topological_sort(model.graph)  # the converter appends its input casts after the nodes that read them
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the fp16 graph has a cycle or an input nothing produces")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


class QdqProgram:
    """int8 Q/DQ ONNX (per-channel symmetric weights; symmetric int8 activations, TensorRT's form, or asymmetric
    uint8 ones for onnxruntime) with ranges measured once; layers are its Conv/MatMul/Gemm nodes."""

    def __init__(self, fp32: Path, calib, *, method: str, percentile: float, activations: str,
                 trt_version: int = 100300, reduce_range: bool = False, runtime: str = "onnxruntime") -> None:
        import tempfile

        from ..quantize.onnx_qdq import QdqQuantizer

        # the asymmetric form is onnxruntime's: int8 chains through SiLU, residual adds and data movement, timm's
        # attention as one QAttention, normalisation and the stem conv in float (onnx_qdq.chain_plan,
        # fuse_attention); TensorRT's symmetric form fuses by itself: weighted ops only
        self.qdq = QdqQuantizer(fp32, calib, method=method, percentile=percentile, trt_version=trt_version,
                                activations=activations, reduce_range=reduce_range,
                                int8_chains=activations == "asymmetric")
        self.layers = self.qdq.layers
        self.calibration_sha256, self.calibration_images = calib.sha256, len(calib)
        self.description = (f"ONNX Q/DQ, per-channel int8 weights, {activations} "
                            f"{'int8' if activations == 'symmetric' else 'uint8'} activations ({method} ranges)"
                            + ("; 7-bit weights" if reduce_range else "")
                            + ("; int8 through SiLU, residual adds and data movement, attention as QAttention"
                               if activations == "asymmetric" else ""))
        self._tmp = tempfile.TemporaryDirectory(prefix="edgec-qdq-")
        self.runtime = runtime  # a TensorRT program is measured with Q/DQ as written, not this host's int8 kernels

    def write(self, out: Path, keep_float=frozenset(), only=None) -> dict[str, str]:
        q = self.qdq.quantize(out, exclude_nodes=tuple(sorted(keep_float)), only=only)
        return {"calibration.cache": q.trt_cache} if q.trt_cache is not None else {}

    def ranges_summary(self) -> dict:
        """How many activation tensors got a range, and how much the method clipped against min-max."""
        import numpy as np

        amax, top = self.qdq.amax, self.qdq.collector.max
        clipped = [n for n, a in amax.items() if a < top.get(n, a) * 0.999]
        vals = np.array(list(amax.values()) or [0.0])
        return {"tensors": len(amax), "clipped_below_minmax": len(clipped), "amax_min": float(vals.min()),
                "amax_median": float(np.median(vals)), "amax_max": float(vals.max())}

    def runner(self, keep_float=frozenset(), only=None):
        from ..runtime.runners import OnnxRunner

        path = Path(self._tmp.name) / "candidate.onnx"
        self.write(path, keep_float, only)
        return OnnxRunner(path, runtime=self.runtime)


ACTIVATIONS = {"qdq-symmetric": "symmetric", "qdq-asymmetric": "asymmetric"}


def int8_form(spec, isa) -> dict:
    """The weight width the int8 candidate needs to give the same integers on the CPU it will run on
    (:mod:`edgec.runtime.isa`): TensorRT accumulates in int32 (8 bits); onnxruntime on x86 without VNNI
    saturates int16 pairs of u8*s8 products, so 7-bit weights, also when the CPU is unknown."""
    if spec.runtime != BACKEND.runtimes[0]:
        return {"weight_bits": 8, "why": f"{spec.runtime} accumulates int8 products in int32"}
    if isa is None:
        return {"weight_bits": 7, "why": "the target CPU is unknown (no device profile with isa): 7-bit weights are "
                                         "exact in onnxruntime on every x86 CPU"}
    if isa.u8s8_exact:
        return {"weight_bits": 8, "why": f"{isa.arch}: {isa.int8_kernels}", "isa": list(isa.flags)}
    return {"weight_bits": 7, "why": f"{isa.arch}: {isa.int8_kernels}; 7-bit weights keep them exact",
            "isa": list(isa.flags)}


def program(encoder, shape: tuple[int, ...], spec, calib, method: str, percentile: float, work: Path,
            options: dict | None = None, fp32: Path | None = None) -> QdqProgram:
    """The target's int8 Q/DQ program (its activation form and weight width), from ``fp32`` or a fresh export."""
    import torch

    options = options or {}
    if fp32 is None:
        fp32 = work / "model.fp32.onnx"
        with torch.no_grad():
            export(encoder.eval(), shape, fp32, dynamic_batch=not spec.constraints.static_shapes,
                   normalize=spec.normalize_output)
    form = int8_form(spec, options.get("target_isa"))
    return QdqProgram(fp32, calib, method=method, percentile=percentile,
                      activations=ACTIVATIONS[BACKEND.quantizer(spec.quantizer).name],
                      trt_version=int(options.get("trt_version", 100300)), reduce_range=form["weight_bits"] == 7,
                      runtime=spec.runtime)


def _fast_transposes(fp32: Path, log) -> None:
    """MobileViT's unfold/fold as transposes onnxruntime runs fast (onnx_qdq.patch_transposes: same outputs, the
    fp32 candidate 4-7 % faster at 256 px); the int8 program is quantized from this same graph. The fp32 candidate
    keeps timm's written-out attention: onnxruntime's float Attention node (onnx_qdq.fuse_attention, which the int8
    program turns into QAttention) measured 2 % faster on mobilevit_xxs@256 but 4 % slower on mobilevit_xs@256."""
    import onnx

    from ..quantize.onnx_qdq import patch_transposes

    model = onnx.load(str(fp32))
    if patch_transposes(model):
        onnx.save(model, str(fp32))
        log("unfold/fold rewritten as fast transposes")


def build(encoder, shape: tuple[int, ...], *, spec, work: Path, quantize, options: dict | None = None, log) -> Built:
    """fp32 ONNX always (every other precision is made from it); fp16 and int8 Q/DQ when the target lists them."""
    import torch

    options = options or {}
    fp32 = work / "model.fp32.onnx"
    with torch.no_grad():
        io = export(encoder.eval(), shape, fp32, dynamic_batch=not spec.constraints.static_shapes,
                    normalize=spec.normalize_output)
    log(f"exported fp32 ONNX ({fp32.stat().st_size / 1e6:.2f} MB)")
    if spec.runtime == BACKEND.runtimes[0]:
        _fast_transposes(fp32, log)
    built = Built(candidates={}, format="onnx", io=io)
    if "int8" in spec.precisions:
        built.int8_form = int8_form(spec, options.get("target_isa"))

    def fp16() -> Path:
        path = to_fp16(fp32, work / "model.fp16.onnx")
        log(f"fp16 ONNX ({path.stat().st_size / 1e6:.2f} MB, float32 inputs and outputs)")
        return path

    def int8() -> Path:
        def make(calib, method, percentile):
            return program(encoder, shape, spec, calib, method, percentile, work, options, fp32=fp32)

        res = quantize(make, work / "model.int8.onnx")
        for name, text in res.files.items():
            built.files[name] = text
            built.files_for[name] = "int8"  # the TensorRT cache means something only beside the int8 graph
        built.calibration_sha256, built.quantization = res.record["calibration_sha256"], res.record
        return res.path

    built.candidates = precision_candidates(spec, "onnx", {"fp32": lambda: fp32, "fp16": fp16, "int8": int8})
    return built


def export_text(module, context_length: int, path: Path, *, spec=None) -> dict:
    """Export a text tower (int32 token ids (N, L) -> normalised embedding) as ONNX; returns its I/O records."""
    import onnx
    import torch

    dynamic_batch = spec is None or not spec.constraints.static_shapes
    example = torch.zeros(1, context_length, dtype=torch.int32)
    axes = {"token_ids": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), str(path), input_names=["token_ids"], output_names=["embedding"],
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        from .diagnose import unsupported_op_error

        raise unsupported_op_error(exc, module, (example,), converter="the ONNX exporter (text tower)",
                                   backend="onnx") from None
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        dim = int(module(example).shape[-1])
    return {"inputs": [{"name": "token_ids", "shape": [1, context_length], "dtype": "int32", "quantization": None,
                        "dynamic_batch": dynamic_batch}],
            "outputs": [{"name": "embedding", "shape": [1, dim], "dtype": "float32", "normalized": True}],
            "opset": OPSET}


def fold_head(src: Path, dst: Path, text, scale: float, bias: float | None, *, normalize: bool) -> bool:
    """Append normalize (when the graph does not) -> MatMul(text.T) -> Mul(scale) [-> Add(bias)] to ``src``'s
    output: the same image part (int8 Q/DQ included) with logits out."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    out = g.output[0]
    x = out.name
    nodes = []
    if normalize:
        nodes.append(helper.make_node("LpNormalization", [x], ["zs_normalized"], axis=-1, p=2))
        x = "zs_normalized"
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(text.T, np.float32), "zs_text"),
                          numpy_helper.from_array(np.asarray(scale, np.float32), "zs_scale")])
    nodes += [helper.make_node("MatMul", [x, "zs_text"], ["zs_sims"]),
              helper.make_node("Mul", ["zs_sims", "zs_scale"], ["logits" if bias is None else "zs_scaled"])]
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(np.asarray(bias, np.float32), "zs_bias"))
        nodes.append(helper.make_node("Add", ["zs_scaled", "zs_bias"], ["logits"]))
    g.node.extend(nodes)
    batch = out.type.tensor_type.shape.dim[0]
    logits = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                           [batch.dim_param or batch.dim_value, int(text.shape[0])])
    del g.output[:]
    g.output.append(logits)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return True


def reference_int8(encoder, shape: tuple[int, ...], calib, work: Path) -> tuple[Path, str]:
    """onnxruntime's ``quantize_static`` with its defaults (QDQ, U8S8, per-tensor, MinMax, every op type)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"pixels": b} for b in calib.batches(layout="NCHW", batch_size=1)])

        def get_next(self):
            return next(self.it, None)

    fp32, pre, out = work / "reference.fp32.onnx", work / "reference.pre.onnx", work / "reference.int8.onnx"
    export(encoder, shape, fp32, dynamic_batch=True)
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader())
    return out, "onnxruntime quantize_static defaults: QDQ, U8S8, per-tensor, MinMax, all op types"


def runner(path: Path, threads: int | None = None, runtime: str | None = None, kernels: str = "auto"):
    from ..runtime.runners import OnnxRunner

    return OnnxRunner(path, threads, runtime or BACKEND.runtimes[0], kernels)


TRTEXEC_FLAGS = {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"], "fp32": []}


def recipe(folder: Path, artifact: Path, precision: str, spec, options: dict) -> dict | None:
    """TensorRT targets: build_engine.sh with the trtexec command for the shipped precision (engines are tied to
    the TensorRT version and GPU, so they are built on the device). Returns the manifest's 'tensorrt' record."""
    if spec.runtime != BACKEND.runtimes[1]:  # onnxruntime targets need no recipe
        return None
    from ..manifest import atomic_write_text

    cmd = " ".join(["trtexec", f"--onnx={artifact.name}", *TRTEXEC_FLAGS[precision], "--memPoolSize=workspace:1024",
                    "--saveEngine=model.engine", "--skipInference"])
    what = {"int8": f"{artifact.name} carries explicit Q/DQ int8 nodes (TensorRT's explicit quantization); --fp16 lets "
                    "layers without Q/DQ run in fp16 instead of fp32.\n# calibration.cache holds the same activation "
                    "ranges in TensorRT's cache format (version-specific).",
            "fp16": f"{artifact.name} holds fp16 weights and compute (float32 inputs/outputs); --fp16 builds fp16 "
                    "kernels.",
            "fp32": f"{artifact.name} is the fp32 graph."}[precision]
    script = f"""#!/usr/bin/env bash
# Build the TensorRT engine on the Jetson itself: an engine is tied to the TensorRT version and
# the GPU it was built on. {what}
set -euo pipefail
cd "$(dirname "$0")"
command -v trtexec >/dev/null || {{ echo "trtexec not found: it ships with TensorRT (JetPack: /usr/src/tensorrt/bin)" >&2; exit 3; }}
{cmd}
echo "wrote $(pwd)/model.engine"
"""
    path = folder / "build_engine.sh"
    atomic_write_text(path, script)
    path.chmod(0o755)
    return {"build_script": "build_engine.sh", "command": cmd, "engine": None,
            "trt_version_for_cache": options.get("trt_version", 100300),
            "engine_not_built": "TensorRT engines are built on the device: run build_engine.sh there "
                                "(this machine has no TensorRT GPU build)"}


def text_recipe_note(artifact: Path, spec) -> str | None:
    if spec.runtime != BACKEND.runtimes[1]:
        return None
    return (f"build its engine on the device like the image model's: trtexec --onnx={artifact.name} "
            "--saveEngine=text.engine (fp32 ONNX; add --fp16 only after checking the cosine)")


BACKEND = Backend(
    name="onnx", format="onnx", suffix=".onnx", runtimes=("onnxruntime", "tensorrt"),
    packages=("onnx", "onnxruntime"), build_modules=("torch", "onnx", "onnxruntime"),
    install="'edgec[compile]' (onnx onnxscript onnxruntime)",
    runtime_modules={"onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt", "onnxruntime")},
    precisions=("fp32", "fp16", "int8"),
    quantizers={
        "qdq-symmetric": Quantizer("qdq-symmetric", "int8 Q/DQ, symmetric int8 activations (TensorRT's explicit form, "
                                   "with its calibration cache)", METHODS, "minmax"),
        "qdq-asymmetric": Quantizer("qdq-asymmetric", "int8 Q/DQ, asymmetric uint8 activations (onnxruntime)",
                                    METHODS, "minmax"),
    },
    build=build, program=program, reference_int8=reference_int8, export_text=export_text, fold_head=fold_head,
    recipe=recipe, text_note=text_recipe_note, runner=runner,
    # TensorRT through onnxruntime-gpu's providers: int8 from the Q/DQ nodes, fp16 elsewhere (as build_engine.sh)
    accelerators={"tensorrt": (("TensorrtExecutionProvider", {"trt_int8_enable": True, "trt_fp16_enable": True}),
                               "CUDAExecutionProvider")},
    notes=("tensorrt artifacts are checked with onnxruntime here (Q/DQ ONNX); the engine needs tensorrt and a GPU",),
)
