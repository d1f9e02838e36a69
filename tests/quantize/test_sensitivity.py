"""Per-layer sensitivity and accuracy-aware fallback on tiny models with deliberately damaged layers.

A damaged layer gets one input channel 1000x larger than the others (its producer's weights for
that channel scaled up) and weights 1000x smaller for that channel: the float function is
unchanged, but a per-tensor int8 range on the layer's input crushes every other channel to zero.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgec.errors import InputError  # noqa: E402
from edgec.quantize.sensitivity import Evaluator, fallback_search, rank_layers  # noqa: E402

SIZE = 64


class Tiny(nn.Module):
    """pixels -> embedding; ``damaged`` names the layers whose input carries an outlier channel."""

    def __init__(self, damaged: tuple[str, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.proj = nn.Linear(16, 12)
        with torch.no_grad():
            for m in (self.c1, self.c2, self.c3, self.proj):  # no bias: the embedding depends on every channel
                m.bias.zero_()
            for layer, producer in (("c2", self.c1), ("c3", self.c2), ("proj", self.c3)):
                if layer in damaged:  # channel 0 leaves the producer 1000x larger, enters the layer 1000x smaller
                    producer.weight[0] *= 1000.0
                    getattr(self, layer).weight[:, 0] /= 1000.0

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.proj(x.mean(dim=(2, 3)))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


class Calib:
    """The part of CalibrationSet the quantizers use."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def batches(self, layout=None, batch_size=1):
        x = self.x.transpose(0, 2, 3, 1) if layout == "NHWC" else self.x
        for i in range(0, len(x), batch_size):
            yield np.ascontiguousarray(x[i : i + batch_size])

    def __len__(self):
        return len(self.x)


def evaluator(model, n: int = 24) -> Evaluator:
    from edgec.backends.onnx import NormalizedEmbedding

    x = images(n, 1)
    with torch.no_grad():
        ref = NormalizedEmbedding(model).eval()(torch.from_numpy(x)).numpy()
    return Evaluator(x, ref)


def onnx_program(model, tmp_path):
    from edgec.backends.onnx import export
    from edgec.quantize.sensitivity import OnnxProgram

    fp32 = tmp_path / "tiny.onnx"
    export(model.eval(), (1, 3, SIZE, SIZE), fp32)
    return OnnxProgram(fp32, Calib(images(16, 0)))


@pytest.fixture(scope="module")
def damaged_c2():
    return Tiny(damaged=("c2",)).eval()


def test_onnx_sensitivity_ranks_the_damaged_layer_first(damaged_c2, tmp_path):
    program = onnx_program(damaged_c2, tmp_path)
    assert [la["op"] for la in program.layers] == ["Conv", "Conv", "Conv", "Gemm"]
    ranking = rank_layers(program, evaluator(damaged_c2))
    assert "c2" in ranking[0]["name"]
    assert ranking[0]["error"] > 10 * ranking[1]["error"]  # not a close call
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]


def test_pt2e_sensitivity_ranks_the_damaged_layer_first(damaged_c2):
    pytest.importorskip("executorch")
    from edgec.backends.onnx import NormalizedEmbedding
    from edgec.quantize.pt2e import Pt2eProgram

    model = NormalizedEmbedding(damaged_c2).eval()
    program = Pt2eProgram(model, (1, 3, SIZE, SIZE), list(images(8, 0)), method="minmax")
    assert [la["name"] for la in program.layers] == ["encoder.c1", "encoder.c2", "encoder.c3", "encoder.proj"]
    ranking = rank_layers(program, evaluator(damaged_c2, 12))
    assert ranking[0]["name"] == "encoder.c2" and ranking[0]["error"] > 10 * ranking[1]["error"]


def test_fallback_keeps_exactly_the_damaged_layers_in_float(tmp_path):
    model = Tiny(damaged=("c2", "proj")).eval()
    program = onnx_program(model, tmp_path)
    ev = evaluator(model)
    ranking = rank_layers(program, ev)
    assert {ranking[0]["name"], ranking[1]["name"]} == {program.layers[1]["name"], program.layers[3]["name"]}
    # the loss with one damaged layer still quantized, and with both in float: put the tolerance between them
    both = ev.loss(ev(program.runner(keep_float=frozenset({program.layers[1]["name"], program.layers[3]["name"]}))))
    one = min(ev.loss(ev(program.runner(keep_float=frozenset({program.layers[i]["name"]})))) for i in (1, 3))
    assert both < one
    tolerance = float(np.sqrt(both * one)) if both > 0 else one / 10
    result = fallback_search(program, ev, ranking, tolerance)
    assert result["int8_loss"] > tolerance  # plain int8 does not reach it
    assert result["met"] and result["loss"] <= tolerance
    assert sorted(la["name"] for la in result["float_layers"]) == sorted([program.layers[1]["name"], program.layers[3]["name"]])
    assert all(la["loss_delta"] > 0 and la["size_bytes_estimate"] == 3 * la["params"] for la in result["float_layers"])


def test_fallback_prunes_a_layer_the_greedy_order_added_needlessly(damaged_c2, tmp_path):
    program = onnx_program(damaged_c2, tmp_path)
    ev = evaluator(damaged_c2)
    ranking = rank_layers(program, ev)
    # a ranking that puts a harmless layer first: greedy adds it, pruning must remove it again
    reordered = [ranking[2], ranking[0], ranking[1], ranking[3]]
    tolerance = 2 * ev.loss(ev(program.runner(keep_float=frozenset({ranking[0]["name"]}))))
    result = fallback_search(program, ev, reordered, tolerance)
    assert result["met"] and [la["name"] for la in result["float_layers"]] == [ranking[0]["name"]]
    assert len(result["greedy_steps"]) == 3  # int8, +harmless, +damaged


def test_unreachable_tolerance_is_reported_not_met(damaged_c2, tmp_path):
    program = onnx_program(damaged_c2, tmp_path)
    ev = evaluator(damaged_c2)
    result = fallback_search(program, ev, rank_layers(program, ev), 0.0, max_layers=1)
    assert not result["met"] and len(result["float_layers"]) == 1


def test_pt2e_observer_with_non_finite_range_is_an_input_error():
    pytest.importorskip("executorch")
    from edgec.quantize.pt2e import Pt2eProgram

    model = Tiny().eval()
    with torch.no_grad():
        model.c2.bias[0] = float("nan")
    program = Pt2eProgram(model, (1, 3, SIZE, SIZE), list(images(2, 0)), method="minmax")
    with pytest.raises(InputError, match="non-finite activation range"):
        program.convert()


def test_range_observer_methods_clip_an_outlier_that_minmax_keeps():
    from edgec.quantize.pt2e import RangeObserver

    rng = np.random.default_rng(0)
    data = [torch.from_numpy(np.concatenate([rng.normal(0, 1, 20000), [200.0]]).astype(np.float32)) for _ in range(2)]
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        obs = RangeObserver(dtype=torch.int8, quant_min=-128, quant_max=127, method=method, percentile=99.99)
        for phase in ("max", "hist"):
            obs.phase = phase
            for d in data:
                obs(d)
        scales[method] = float(obs.calculate_qparams()[0])
    lo, hi = min(float(d.min()) for d in data), 200.0  # minmax keeps the affine range [min, max]
    assert scales["minmax"] == pytest.approx((hi - lo) / 255, rel=0.02)
    assert scales["percentile"] < scales["minmax"] / 20 and scales["entropy"] < scales["minmax"] / 5


def test_pt2e_program_lowers_to_a_pte_measured_in_the_executorch_runtime(damaged_c2, tmp_path):
    pytest.importorskip("executorch")
    from edgec.backends.onnx import NormalizedEmbedding
    from edgec.quantize.pt2e import Pt2eProgram
    from edgec.quantize.run import EvalSet, measure, ranges_summary, write_artifact

    model = NormalizedEmbedding(damaged_c2).eval()
    program = Pt2eProgram(model, (1, 3, SIZE, SIZE), list(images(4, 0)), method="histogram")
    ev = evaluator(damaged_c2, 8)
    pte = tmp_path / "model.int8.pte"
    from edgec import registry

    delegation = write_artifact(program, pte, frozenset({"encoder.c2"}))
    assert delegation["delegated_subgraphs"] >= 1
    android = registry.get("targets", "android").spec  # an ExecuTorch target: its runtime and layout
    measured = measure(pte, android, EvalSet(ev.x, ev.reference, None, None, None), timing=False)
    # c2 kept in float; its input is c1's int8 conv output, which XNNPACK keeps int8 (crushed channels stay crushed)
    assert measured["runtime"] == "executorch" and measured["bytes"] == pte.stat().st_size
    in_torch = ev(program.runner(keep_float=frozenset({"encoder.c2"})))["cosine_mean"]
    assert measured["vs_float"]["cosine_mean"] == pytest.approx(in_torch, abs=0.02)  # ranking in torch == the .pte
    assert ranges_summary(program)["observer"].startswith("torch HistogramObserver")
