"""Gate expressions: ``metric OP number``, e.g. ``agreement>=0.97`` or ``accuracy_delta>=-0.02``."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

METRICS = (
    "cosine_mean",
    "cosine_p1",
    "agreement",
    "accuracy",
    "teacher_accuracy",
    "accuracy_delta",
    "recall@1",
    "recall@5",
    "recall@10",
    "text_cosine_mean",
    "text_cosine_p1",  # the compiled text tower vs the teacher's text embeddings (label prompts, captions)
    "artifacts_agreement",  # zero-shot top-1 with image and text embeddings both from the artifacts, vs the teacher
    "logits_agreement",  # the zero-shot (logits) artifact's top-1 vs the image artifact's embeddings + head files
    "logits_teacher_agreement",
    "mapped_share",  # share of the shipped model's ops in one accelerator subgraph (targets with an op list: edgetpu)
)
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([a-z][a-z0-9_]*(?:@\d+)?)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_gate(expr: str) -> Gate:
    """Parse one gate; ``ValueError`` saying what is wrong with it."""
    m = _GATE.match(expr)
    if not m:
        raise ValueError(f"gate {expr!r} is not of the form metric>=number (operators: {', '.join(_OPS)})")
    metric, op, number = m.groups()
    if metric not in METRICS:
        import difflib

        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known metrics: {', '.join(METRICS)}"
        raise ValueError(f"gate {expr!r}: unknown metric {metric!r} ({hint})")
    return Gate(metric, op, float(number))
