"""PT2E int8 for ExecuTorch (XNNPACK): one exported graph, quantized as often as sensitivity and
fallback need, with any set of modules kept in float.

``torch.export`` once; each program is ``prepare_pt2e`` with an ``XNNPACKQuantizer`` (per-channel
symmetric weights, static int8 activations; a module kept in float gets the config ``None``),
calibration, ``convert_pt2e``. Ranking runs the converted GraphModule in torch; the shipped
program is lowered to a ``.pte`` and measured in the ExecuTorch runtime.

Activation ranges: ``histogram`` is torch's ``HistogramObserver`` (XNNPACK's default, it minimises
the L2 quantization error); ``minmax`` / ``percentile`` / ``entropy`` are edgec's own
(:mod:`edgec.quantize.ranges`) through :class:`RangeObserver`, so every backend offers the same methods.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from torchao.quantization.pt2e.observer import MinMaxObserver

from ..errors import InputError, require_module
from .ranges import entropy_amax, percentile_amax

METHODS = ("minmax", "percentile", "entropy", "histogram")


class RangeObserver(MinMaxObserver):
    """Two calibration passes like :func:`edgec.quantize.ranges.collect_ranges`: the min/max of
    every activation, then a histogram of |x| over [0, max|x|]; the range comes from the histogram."""

    def __init__(self, *args, method: str = "minmax", percentile: float = 99.999, bins: int = 2048, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.percentile, self.bins, self.phase = method, percentile, bins, "max"
        self.hist: torch.Tensor | None = None

    def forward(self, x_orig):
        if self.phase == "max" or x_orig.numel() == 0:
            return super().forward(x_orig)
        top = float(torch.maximum(self.min_val.abs(), self.max_val.abs()))
        if top > 0:
            h = torch.histc(x_orig.detach().abs().float(), bins=self.bins, min=0.0, max=top)
            self.hist = h if self.hist is None else self.hist + h
        return x_orig

    def calculate_qparams(self):
        top = float(torch.maximum(self.min_val.abs(), self.max_val.abs()))
        if self.method == "minmax" or self.hist is None or top <= 0:
            return super().calculate_qparams()
        hist = self.hist.numpy().astype(np.float64)
        amax = percentile_amax(hist, top, self.percentile) if self.method == "percentile" else entropy_amax(hist, top)
        return self._calculate_qparams(torch.clamp(self.min_val, min=-amax), torch.clamp(self.max_val, max=amax))


def quantization_config(method: str = "histogram", percentile: float = 99.999, *, per_channel: bool = True,
                        base=None):
    """A PT2E quantizer's symmetric config (XNNPACK's unless ``base(is_per_channel=...)`` gives another, e.g.
    litert-torch's) with the activation observer for ``method``: ``histogram`` keeps the config's own
    HistogramObserver, the others use edgec's :class:`RangeObserver`."""
    if base is None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config as base

    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r} for PT2E", hint=f"one of {', '.join(METHODS)}")
    config = base(is_per_channel=per_channel)
    if method == "histogram":
        return config
    ctr = RangeObserver.with_args(eps=2**-12, method=method, percentile=percentile)
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def check_observers(prepared: torch.nn.Module) -> None:
    """A non-finite activation range is a user-facing error naming the observer."""
    for name, m in prepared.named_modules():
        lo, hi = getattr(m, "min_val", None), getattr(m, "max_val", None)
        if isinstance(lo, torch.Tensor) and lo.numel() and not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            if torch.isinf(lo).all() and torch.isinf(hi).all() and (lo > 0).all():
                continue  # never observed (an unused branch): min=+inf, max=-inf
            raise InputError(f"calibration produced a non-finite activation range at {name} (min {lo.min().item()}, "
                             f"max {hi.max().item()})",
                             hint="check the calibration images and the model (NaN/inf weights?)")


def calibrate(prepared: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Observe every batch (twice when edgec's range observers need their histogram pass)."""
    observers = [m for m in prepared.modules() if isinstance(m, RangeObserver)]
    for m in observers:
        m.phase = "max"
    with torch.no_grad():
        for b in batches:
            prepared(b)
    check_observers(prepared)
    if any(m.method != "minmax" for m in observers):
        for m in observers:
            m.phase = "hist"
        with torch.no_grad():
            for b in batches:
                prepared(b)


LAYER_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.linear.default")


def layer_name(node) -> str | None:
    """The module path of a conv/linear node (its innermost ``nn_module_stack`` entry), else None."""
    if node.op != "call_function" or str(node.target) not in LAYER_OPS:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L__self__."):
        path = path.removeprefix(prefix)
    return path


def _weighted_partition(node) -> bool:
    """A conv/linear node, or an op fused onto one (relu, batch norm, hardtanh: XNNPACK's conv/linear patterns)."""
    for _ in range(3):
        if node.op != "call_function":
            return False
        if str(node.target) in LAYER_OPS:
            return True
        if not node.args or not hasattr(node.args[0], "op"):
            return False
        node = node.args[0]
    return False


def _base_quantizer():
    from torchao.quantization.pt2e.quantizer import Quantizer

    return Quantizer


# an int8 sigmoid's output range is fixed, [0, 1) in 256 steps (TFLite's int8 LOGISTIC requires it)
SIGMOID_QPARAMS = {"scale": 1.0 / 256, "zero_point": -128, "quant_min": -128, "quant_max": 127}
SILU_OPS = ("aten.silu.default", "aten.silu_.default")


def split_silu(gm: torch.fx.GraphModule) -> int:
    """Write every SiLU in the graph as ``x * sigmoid(x)`` (returns how many): the quantizers annotate that mul,
    and :func:`annotate_sigmoid` the sigmoid, so a conv -> SiLU -> conv chain stays int8 (a table-lookup
    sigmoid and an int8 multiply) instead of leaving a float SiLU with a convert on each side."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in SILU_OPS:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            sig = gm.graph.call_function(torch.ops.aten.sigmoid.default, (x,))
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, sig))
        sig.meta, mul.meta = dict(node.meta), dict(node.meta)
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def annotate_sigmoid(gm: torch.fx.GraphModule, act_qspec) -> int:
    """Annotate every float sigmoid not annotated yet: int8 input (shared with its producer's output), int8 output
    with :data:`SIGMOID_QPARAMS`. Returns how many. (Other table activations, hardswish or GELU, sit between two
    annotated layers already: both runtimes fold their quantize/dequantize pair into an int8 lookup table.)"""
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec, QuantizationAnnotation

    output = FixedQParamsQuantizationSpec(dtype=torch.int8, **SIGMOID_QPARAMS)
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.sigmoid.default or \
                "quantization_annotation" in node.meta:
            continue
        x = node.args[0]
        val = x.meta.get("val") if hasattr(x, "meta") else None
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            continue
        node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={x: act_qspec},
                                                                      output_qspec=output, _annotated=True)
        count += 1
    return count


class LayerSelectiveQuantizer(_base_quantizer()):
    """XNNPACK's annotations, then per layer (a conv/linear node): ``keep_float`` layers lose their input
    annotations and their activation producer its output one unless that producer is an int8 conv/linear
    (then the activation arrives with that int8 rounding; weights and the layer's compute are float), and
    with ``only`` every
    annotation is dropped except the inputs of those layers (just that layer computes in int8). With
    ``int8_silu`` (the activation spec) SiLUs are split and sigmoids annotated (:func:`split_silu`), for
    runtimes with an int8 sigmoid (XNNPACK, LiteRT).

    Module-name configs cannot do this: XNNPACK annotates fused partitions (conv + bn + relu) only when
    every node lies in the named module, and timm puts the norm and activation in sibling modules."""

    def __init__(self, inner, *, keep_float: frozenset[str] = frozenset(), only: frozenset[str] | None = None,
                 int8_silu=None) -> None:
        super().__init__()
        self.inner, self.keep_float, self.only, self.int8_silu = inner, keep_float, only, int8_silu

    def transform_for_annotation(self, model):
        model = self.inner.transform_for_annotation(model) or model
        if self.int8_silu is not None:
            split_silu(model)
        return model

    def annotate(self, model):
        model = self.inner.annotate(model) or model
        if self.int8_silu is not None:
            annotate_sigmoid(model, self.int8_silu)
        key = "quantization_annotation"
        for node in list(model.graph.nodes):
            ann = node.meta.get(key)
            if ann is None:
                continue
            layer = layer_name(node)
            if self.only is not None:
                if layer in self.only:
                    ann.output_qspec = None
                else:
                    del node.meta[key]
            elif layer in self.keep_float:
                # the layer's own input specs go (float weights, no observer of its own on the activation); the
                # producer's output spec goes too (PT2E shares one quantized tensor between a producer's output
                # and its consumers' inputs; other int8 consumers keep their own input observers), unless the
                # producer is an int8 conv/linear partition: XNNPACK runs those only with an int8 output
                activation = node.args[0] if node.args else None
                ann.input_qspec_map = {}
                producer = activation.meta.get(key) if hasattr(activation, "meta") else None
                if producer is not None and not _weighted_partition(activation):
                    producer.output_qspec = None
        return model

    def validate(self, model) -> None:
        self.inner.validate(model)


class Pt2eProgram:
    """The float model exported once; :meth:`convert` gives a PT2E int8 GraphModule with chosen
    modules kept in float, :meth:`lower` writes it as an XNNPACK ``.pte``.

    ``quantizer`` (default XNNPACK's) makes the inner quantizer from a config and ``base_config`` its
    symmetric config; ``layout`` is the input layout ``model`` takes (calibration arrays come in it, the
    runner takes NCHW and transposes)."""

    def __init__(self, model: torch.nn.Module, shape: tuple[int, ...], calibration: list[np.ndarray], *,
                 method: str = "histogram", percentile: float = 99.999, per_channel: bool = True,
                 quantizer=None, base_config=None, layout: str = "NCHW", calibration_sha256: str | None = None,
                 int8_silu: bool = True) -> None:
        if quantizer is None:
            require_module("executorch", install="executorch", purpose="ExecuTorch int8")
        self.model, self.method, self.layout = model.eval(), method, layout
        self.int8_silu = int8_silu
        self.example = (torch.zeros(*shape),)
        self.config = quantization_config(method, percentile, per_channel=per_channel, base=base_config)
        self._make_inner = quantizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.graph = torch.export.export(self.model, self.example).module()
        self.batches = [torch.from_numpy(np.ascontiguousarray(b[None])) for b in calibration]
        self.calibration_sha256, self.calibration_images = calibration_sha256, len(calibration)
        self.description = f"PT2E int8, {'per-channel' if per_channel else 'per-tensor'} symmetric weights ({method} ranges)"
        self.report: dict | None = None
        modules = dict(self.model.named_modules())
        self.layers = []
        for node in self.graph.graph.nodes:
            name = layer_name(node)
            if name is not None and name in modules and name not in {la["name"] for la in self.layers}:
                m = modules[name]
                self.layers.append({"name": name, "op": type(m).__name__,
                                    "params": sum(p.numel() for p in m.parameters(recurse=False))})

    def inner(self):
        if self._make_inner is not None:
            return self._make_inner(self.config)
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

        return XNNPACKQuantizer().set_global(self.config)

    def quantizer(self, keep_float=frozenset(), only=None):
        return LayerSelectiveQuantizer(self.inner(), keep_float=frozenset(keep_float),
                                       only=None if only is None else frozenset(only),
                                       int8_silu=self.config.input_activation if self.int8_silu
                                       else None)

    def convert(self, keep_float=frozenset(), only=None, batches: list[torch.Tensor] | None = None):
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_pt2e(copy.deepcopy(self.graph), self.quantizer(keep_float, only))
            calibrate(prepared, self.batches if batches is None else batches)
            return convert_pt2e(prepared, fold_quantize=self._make_inner is None)

    def runner(self, keep_float=frozenset(), only=None, batches=None):
        gm = self.convert(keep_float, only, batches)
        nhwc = self.layout == "NHWC"

        def run(x: np.ndarray) -> np.ndarray:
            if nhwc:
                x = x.transpose(0, 2, 3, 1)
            with torch.no_grad():
                return np.concatenate([gm(torch.from_numpy(np.ascontiguousarray(x[i : i + 1]))).numpy()
                                       for i in range(len(x))]).astype(np.float32)

        return run

    def ranges_summary(self) -> dict:
        return {"observer": "torch HistogramObserver (the quantizer's default)" if self.method == "histogram"
                else f"edgec RangeObserver ({self.method})", "per_channel_weights": True}

    def sensitivity_kwargs(self, images: int) -> dict:
        """Every isolated-layer program is calibrated again: a subset of the images keeps ranking affordable."""
        return {"batches": self.batches[:images]}

    def lower(self, out: Path, keep_float=frozenset()) -> dict:
        """Write the int8 ``.pte`` (XNNPACK delegate); returns the delegation report."""
        from ..backends.executorch import lower

        converted = self.convert(keep_float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(converted, self.example)
        return lower(ep, Path(out))

    def write(self, out: Path, keep_float=frozenset()) -> dict[str, str]:
        """The quantize stage's writer: the ``.pte``; the delegation report is kept in ``self.report``."""
        self.report = self.lower(out, keep_float)
        return {}

    def lower_float(self, out: Path) -> dict:
        from ..backends.executorch import lower

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(self.model, self.example)
        return lower(ep, Path(out))
