"""Calibration methods per quantization backend (no heavy imports: edgec.config reads this).

``auto`` (the default of ``[quantize] method``) takes, per backend, the method that kept the int8
program closest to the float model on the example (``edgec quantize --compare``, BENCHMARKS.md).
"""

from __future__ import annotations

BACKEND_METHODS = {"onnx": ("minmax", "percentile", "entropy"), "litert": ("minmax",),
                   "executorch": ("minmax", "percentile", "entropy", "histogram")}
DEFAULT_METHODS = {"onnx": "minmax", "litert": "minmax", "executorch": "histogram"}
METHODS = ("auto", "minmax", "percentile", "entropy", "histogram")


def method_for(backend: str, method: str | None) -> str:
    """``method`` where ``backend`` takes it; ``auto``/None, or a method the backend does not take: its default."""
    if method in (None, "auto") or method not in BACKEND_METHODS[backend]:
        return DEFAULT_METHODS[backend]
    return method
