"""Per-layer sensitivity and accuracy-aware fallback, for any backend's quantized program.

A *program* (:class:`OnnxProgram`, :class:`edgec.quantize.pt2e.Pt2eProgram`, ...) lists its
quantizable layers and gives a runner (numpy NCHW images -> embeddings) for the model quantized
with some layers kept in float (``keep_float``) or with only some layers quantized (``only``).

* **Sensitivity** of a layer: quantize *only that layer* (everything else float, ranges from the
  calibration images) and measure ``1 - mean cosine`` between its embeddings and the float
  model's on the eval images. Isolating the layer keeps the error of earlier layers out of it.
* **Fallback** for a tolerance ``T``: starting from the fully quantized model, keep the most
  sensitive layers in float, one at a time in ranking order, until the tolerance holds; then try
  to quantize each fallback layer again (last added first) and keep it quantized when the
  tolerance still holds, so no layer in the result can be quantized alone without breaking it.

The tolerance holds when **both** (a) the mean cosine between int8 and float embeddings is at
least ``1 - T`` and (b) zero-shot top-1 agreement with the teacher (golden set) is at most ``T``
below the float model's own agreement; :meth:`Evaluator.loss` is the larger of the two shortfalls.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Evaluator:
    """Metrics of a program's embeddings against the float model's (``reference``) and the teacher's zero-shot."""

    x: np.ndarray  # eval images, NCHW float32
    reference: np.ndarray  # float model embeddings on x
    text: np.ndarray | None = None  # teacher text embeddings of the label prompts (normalised)
    teacher_pred: np.ndarray | None = None  # the teacher's zero-shot predictions on x

    def __post_init__(self) -> None:
        self.float_metrics = self.metrics(self.reference)

    def metrics(self, emb: np.ndarray) -> dict[str, float]:
        emb = emb.reshape(len(emb), -1).astype(np.float64)  # float64: 1 - cosine of a small error is ~1e-8
        cos = np.sum(_normalize(emb) * _normalize(self.reference.astype(np.float64)), axis=1)
        m = {"cosine_mean": float(cos.mean()), "cosine_p1": float(np.percentile(cos, 1)), "images": len(emb)}
        if self.text is not None:
            pred = np.argmax(_normalize(emb) @ self.text.T, axis=1)
            ref = np.argmax(_normalize(self.reference) @ self.text.T, axis=1)
            m["agreement_float"] = float(np.mean(pred == ref))
            if self.teacher_pred is not None:
                m["agreement"] = float(np.mean(pred == self.teacher_pred))
        return m

    def __call__(self, run: Runner) -> dict[str, float]:
        return self.metrics(run(self.x))

    def loss(self, m: dict[str, float]) -> float:
        """The larger shortfall: ``1 - cosine`` vs float, or the agreement lost against the float model's."""
        loss = 1.0 - m["cosine_mean"]
        if "agreement" in m:
            loss = max(loss, self.float_metrics["agreement"] - m["agreement"])
        return float(loss)


def rank_layers(program, evaluator: Evaluator, *, log=lambda _: None, **runner_kwargs) -> list[dict]:
    """Every quantizable layer with its isolated error, worst first."""
    rows = []
    for i, layer in enumerate(program.layers):
        m = evaluator(program.runner(only=frozenset({layer["name"]}), **runner_kwargs))
        rows.append({**layer, "error": round(1.0 - m["cosine_mean"], 8), "cosine_mean": m["cosine_mean"],
                     "cosine_p1": m["cosine_p1"], "agreement": m.get("agreement")})
        if (i + 1) % 10 == 0 or i + 1 == len(program.layers):
            log(f"sensitivity: {i + 1}/{len(program.layers)} layers measured")
    rows.sort(key=lambda r: -r["error"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def fallback_search(program, evaluator: Evaluator, ranking: list[dict], tolerance: float, *, max_layers: int = 16,
                    log=lambda _: None) -> dict:
    """The fewest float layers it finds (greedy by ``ranking``, then pruned) that meet ``tolerance``."""
    def measure(keep: list[str]) -> dict:
        m = evaluator(program.runner(keep_float=frozenset(keep)))
        return {"float_layers": list(keep), "metrics": m, "loss": evaluator.loss(m)}

    def label(name: str) -> str:
        return next((r.get("label", name) for r in ranking if r["name"] == name), name)

    steps = [measure([])]
    keep: list[str] = []
    for row in ranking[:max_layers]:
        if steps[-1]["loss"] <= tolerance:
            break
        keep.append(row["name"])
        steps.append(measure(keep))
        log(f"fallback: {len(keep)} float layer(s), loss {steps[-1]['loss']:.5f} (tolerance {tolerance:g})")
    best = steps[-1]
    met = best["loss"] <= tolerance
    marginal: dict[str, dict] = {}
    if met and keep:
        for name in list(reversed(keep)):
            trial = measure([k for k in keep if k != name])
            marginal[name] = {"loss_if_quantized": trial["loss"], "metrics_if_quantized": trial["metrics"]}
            if trial["loss"] <= tolerance:
                keep = trial["float_layers"]
                best = trial
                log(f"fallback: {label(name)} can be quantized after all (loss {trial['loss']:.5f})")
    params = {r["name"]: r.get("params", 0) for r in ranking}
    labels = {r["name"]: r.get("label", r["name"]) for r in ranking}
    layers = []
    for name in keep:
        row = {"name": name, "label": labels.get(name, name), "params": params.get(name, 0),
               "size_bytes_estimate": 3 * params.get(name, 0)}  # fp32 instead of int8 weights: 3 more bytes each
        if name in marginal:
            row["loss_delta"] = marginal[name]["loss_if_quantized"] - best["loss"]
        layers.append(row)
    return {"tolerance": tolerance, "met": met, "float_layers": layers, "loss": best["loss"], "metrics": best["metrics"],
            "int8_loss": steps[0]["loss"], "int8_metrics": steps[0]["metrics"], "greedy_steps": steps,
            "float_model": evaluator.float_metrics}


class OnnxProgram:
    """Symmetric int8 Q/DQ ONNX (TensorRT's form) run in onnxruntime; layers are Conv/MatMul/Gemm nodes."""

    def __init__(self, fp32: Path, calib, *, method: str = "minmax", percentile: float = 99.999,
                 trt_version: int = 100300) -> None:
        from .onnx_qdq import QdqQuantizer

        self.qdq = QdqQuantizer(fp32, calib, method=method, percentile=percentile, trt_version=trt_version)
        self.layers = self.qdq.layers
        self._tmp = tempfile.TemporaryDirectory(prefix="edgec-sens-")

    def write(self, out: Path, keep_float=frozenset(), only=None):
        return self.qdq.quantize(out, exclude_nodes=tuple(keep_float), only=only)

    def runner(self, keep_float=frozenset(), only=None) -> Runner:
        from ..runtime.runners import OnnxRunner

        path = Path(self._tmp.name) / "candidate.onnx"
        self.write(path, keep_float, only)
        return OnnxRunner(path, runtime="tensorrt")  # TensorRT's form: Q/DQ as written, not this host's int8 kernels


LITERT_LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
# where a fully integer program's error also lives: LayerNorm's pieces, softmax, activations, residual adds
LITERT_ACTIVATION_OPS = ("SOFTMAX", "LOGISTIC", "TANH", "HARD_SWISH", "GELU", "MUL", "ADD", "SUB", "DIV", "MEAN",
                         "RSQRT", "SQRT", "SQUARED_DIFFERENCE", "POW", "SUM")


def _quiet():
    """Silence a library's prints and progress bars (ai-edge-quantizer writes both unasked)."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def scope_label(scope: str) -> str:
    """A readable layer name from a litert-torch tensor scope: the module names of the op's last output
    ('.../timm.layers.conv_bn_act.ConvNormAct_conv1_1x1/torch.nn.modules.conv.Conv2d_conv;2;' -> '...conv1_1x1.conv')."""
    last = [t for t in scope.split(";") if "/" in t][-1:] or [scope]
    parts = [p.rsplit(".", 1)[-1].partition("_")[2] or p for p in last[0].split("/")]
    parts = [p for p in parts if p not in ("", "wrapped", "encoder") or p == parts[-1]]
    return ".".join(parts[1:] if len(parts) > 1 else parts)


class LiteRTProgram:
    """Fully integer TFLite by ai-edge-quantizer (``static_wi8_ai8``) run in LiteRT; calibrated once,
    layers are its weighted ops and the activation / normalisation / residual ops around them (named by
    their output tensors, the quantizer's scope). A layer kept
    in float gets the ``no_quantize`` algorithm by an anchored regex on its scope; it runs in float
    between DEQUANTIZE and QUANTIZE (on an Edge TPU, on the CPU)."""

    def __init__(self, fp32: Path, batches_nhwc: list[np.ndarray]) -> None:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")  # ai-edge-quantizer's progress bars; edgec reports its own
        from ai_edge_quantizer import quantizer, recipe
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

        from ..errors import InputError
        from ..runtime.inspect import litert_interpreter_module

        self.fp32 = Path(fp32)
        self._quantizer, self._recipe = quantizer, recipe
        interp = litert_interpreter_module().Interpreter(model_path=str(fp32))
        sig = interp.get_signature_list()
        key = next(iter(sig))
        arg = sig[key]["inputs"][0]
        q = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
        import warnings

        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            self.qsv = q.calibrate({key: [{arg: b.astype(np.float32)} for b in batches_nhwc]})
        for name, v in self.qsv.items():
            for k in ("min", "max"):
                if k in v and not np.all(np.isfinite(np.asarray(v[k]))):
                    raise InputError(f"calibration produced a non-finite activation range for tensor {name!r}",
                                     hint="check the calibration images and the model (NaN/inf weights?)")
        model = tfl.read_model(str(fp32))
        sub = model.subgraphs[0]
        self.layers = []
        produced = {int(t) for op in sub.operators for t in op.outputs} | {int(t) for t in sub.inputs}
        for i, op in enumerate(sub.operators):
            try:
                kind = tfl.get_op_name_by_index(model, 0, i)
            except KeyError:  # an op code the quantizer has no name for: not one it quantizes
                continue
            if kind in LITERT_LAYER_OPS or kind in LITERT_ACTIVATION_OPS:
                # a layer is an op scope (the module it came from): keeping it float keeps every op of that scope
                scope = tfl.get_op_scope(op, sub.tensors)
                if not scope or any(la["name"] == scope for la in self.layers):
                    continue
                params = sum(int(np.prod(sub.tensors[t].shape)) for t in op.inputs[1:] if t >= 0 and int(t) not in produced) \
                    if kind in LITERT_LAYER_OPS else 0  # weights: inputs no op produces
                self.layers.append({"name": scope, "label": scope_label(scope), "op": kind, "params": params})
        self._tmp = tempfile.TemporaryDirectory(prefix="edgec-sens-")

    def write(self, out: Path, keep_float=frozenset(), only=None) -> Path:
        import re
        import warnings

        q = self._quantizer.Quantizer(str(self.fp32), self._recipe.static_wi8_ai8())
        if only is not None:  # everything float, then int8 for the named ops
            q.update_quantization_recipe(regex=".*", operation_name="*", algorithm_key="no_quantize")
            for name in only:
                q.add_static_config("^" + re.escape(name) + "$", "*", 8, 8)
        for name in keep_float:
            q.update_quantization_recipe(regex="^" + re.escape(name) + "$", operation_name="*",
                                         algorithm_key="no_quantize")
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            q.quantize(self.qsv).export_model(str(out), overwrite=True)
        return Path(out)

    def runner(self, keep_float=frozenset(), only=None) -> Runner:
        from ..runtime.runners import LiteRTRunner

        path = Path(self._tmp.name) / "candidate.tflite"
        self.write(path, keep_float, only)
        run = LiteRTRunner(path)
        return lambda x: run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
