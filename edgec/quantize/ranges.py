"""Activation ranges for symmetric int8, computed by edgec itself (numpy).

Two streaming passes over the calibration batches: the largest |x| of every tensor, then a
histogram of |x| with ``bins`` bins over [0, that max]. From the histogram:

* ``minmax``: the largest |x|;
* ``percentile``: the |x| below which ``percentile`` % of the values lie;
* ``entropy``: TensorRT's KL-divergence threshold search (fold the tail into the last bin,
  quantize to 128 levels, pick the threshold with the least KL divergence), vectorised.

onnxruntime's own entropy calibrator with its default bins picks the min-max range, and its
bin count cannot be passed through ``quantize_static``; doing it here makes each method do what
its name says (tests check that the three give different ranges on a skewed distribution).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

METHODS = ("minmax", "percentile", "entropy")


@dataclass
class RangeCollector:
    """Streams activations tensor by tensor; call :meth:`observe_max` on every batch, then
    :meth:`observe_hist` on every batch again, then :meth:`amax`."""

    bins: int = 2048

    def __post_init__(self) -> None:
        self.max: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.lo: dict[str, float] = {}  # signed extremes, for asymmetric (uint8) activations
        self.hi: dict[str, float] = {}

    def observe_max(self, name: str, x: np.ndarray) -> None:
        a = float(np.max(np.abs(x))) if x.size else 0.0
        if not np.isfinite(a):
            raise InputError(f"calibration produced a non-finite activation in tensor {name!r}",
                             hint="check the calibration images and the model (NaN/inf weights?)")
        self.max[name] = max(self.max.get(name, 0.0), a)
        if x.size:
            self.lo[name] = min(self.lo.get(name, 0.0), float(np.min(x)))
            self.hi[name] = max(self.hi.get(name, 0.0), float(np.max(x)))

    def observe_hist(self, name: str, x: np.ndarray) -> None:
        top = self.max.get(name, 0.0)
        if top <= 0:
            return
        h, _ = np.histogram(np.abs(x), bins=self.bins, range=(0.0, top))
        self.hist[name] = self.hist.get(name, 0) + h

    def amax(self, method: str, percentile: float = 99.999) -> dict[str, float]:
        if method not in METHODS:
            raise InputError(f"unknown calibration method {method!r}", hint=f"one of {', '.join(METHODS)}")
        out = {}
        for name, top in self.max.items():
            hist = self.hist.get(name)
            if method == "minmax" or hist is None or top <= 0:
                out[name] = top
            elif method == "percentile":
                out[name] = percentile_amax(hist, top, percentile)
            else:
                out[name] = entropy_amax(hist, top)
        return out


    def bounds(self, method: str, percentile: float = 99.999) -> dict[str, tuple[float, float]]:
        """Asymmetric ranges: each tensor's signed [min, max] (always spanning 0), clipped to the method's |x| limit."""
        return {name: (max(self.lo.get(name, 0.0), -a), min(self.hi.get(name, 0.0), a))
                for name, a in self.amax(method, percentile).items()}


def percentile_amax(hist: np.ndarray, top: float, percentile: float) -> float:
    cdf = np.cumsum(hist) / max(1, hist.sum())
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(min(idx + 1, len(hist)) * top / len(hist))


def entropy_amax(hist: np.ndarray, top: float, levels: int = 128, stride: int = 1) -> float:
    """TensorRT-style KL calibration: the threshold (in bins) whose 128-level quantization of the
    clipped distribution diverges least from it."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return top
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # outliers fold into the last kept bin
        # merge the i bins into `levels` groups, spread each group's mass over its non-empty bins
        edges = (np.arange(levels) * i) // levels
        sums = np.add.reduceat(hist[:i], edges)
        nonzero = np.add.reduceat((hist[:i] > 0).astype(np.float64), edges)
        group = np.repeat(np.arange(levels), np.diff(np.append(edges, i)))
        q = np.where(hist[:i] > 0, (sums / np.maximum(nonzero, 1))[group], 0.0)
        mask = p > 0
        if not mask.any():
            continue
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-12)
        qm = np.maximum(qs[mask], 1e-12)  # a non-empty p bin with an empty q bin: heavy penalty, not inf
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / qm)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i * top / n)


def collect_ranges(run_all: Callable[[np.ndarray], dict[str, np.ndarray]], batches: Iterable[np.ndarray] | Callable,
                   *, bins: int = 2048) -> RangeCollector:
    """Two passes of ``run_all`` (batch -> {tensor name: activation}) over the batches."""
    get = batches if callable(batches) else (lambda: batches)
    collector = RangeCollector(bins)
    for batch in get():
        for name, x in run_all(batch).items():
            collector.observe_max(name, x)
    for batch in get():
        for name, x in run_all(batch).items():
            collector.observe_hist(name, x)
    return collector


def tensorrt_cache(amax: dict[str, float], *, trt_version: int = 100300) -> str:
    """A TensorRT calibration cache: header, then 'tensor: <float32 scale as 8 hex digits>' per line,
    scale = amax / 127 (version-specific; TensorRT 10.3 is 100300)."""
    lines = [f"TRT-{trt_version}-EntropyCalibration2"]
    for name, a in amax.items():
        scale = max(a, 1e-12) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"
