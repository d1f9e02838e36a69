"""PT2E int8: SiLU split into an int8 sigmoid and multiply (the other table activations, hardswish and GELU,
are int8 without help), run in the ExecuTorch runtime (XNNPACK's own per-operator events say what ran in which
precision) and in LiteRT (the .tflite's own op list says which ops are float)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgec.quantize.pt2e import Pt2eProgram, split_silu

SIZE = 32


ACTIVATIONS = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}


class ConvSiLU(nn.Module):
    """A MobileNetV2-style block (expand, depthwise, project) with an activation after each of the first three
    convs: SiLU as a module and as a function, or another activation module."""

    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        self.act = act
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), ACTIVATIONS[act]())
        self.act1, self.act2 = ACTIVATIONS[act](), ACTIVATIONS[act]()
        self.expand = nn.Conv2d(16, 64, 1)
        self.dw = nn.Conv2d(64, 64, 3, 1, 1, groups=64)
        self.project = nn.Conv2d(64, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 24)

    def forward(self, x):
        x = self.stem(x)
        if self.act == "silu":
            x = self.project(F.silu(self.dw(F.silu(self.expand(x)))))
        else:
            x = self.project(self.act2(self.dw(self.act1(self.expand(x)))))
        return self.head(self.pool(x).flatten(1))


def _model(act: str = "silu") -> nn.Module:
    torch.manual_seed(0)
    m = ConvSiLU(act).eval()
    with torch.no_grad():
        m.stem[1].running_mean.normal_(0, 0.5)
        m.stem[1].bias.normal_(0, 0.5)
    return m


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, SIZE, SIZE)).astype(np.float32) for _ in range(n)]


def test_split_silu_keeps_the_function():
    model = _model()
    x = torch.from_numpy(_images(1, 1)[0][None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(model, (x,)).module()
    assert split_silu(gm) == 3
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("silu" in t for t in targets)
    assert targets.count("aten.sigmoid.default") == 3
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), atol=1e-5)


def _xnnpack_events(path) -> dict[str, int]:
    """How many times each XNNPACK operator ran in one inference (ETDump events)."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    module = portable_lib._load_for_executorch(str(path), enable_etdump=True)
    module.forward([torch.zeros(1, 3, SIZE, SIZE)])
    dump = str(path) + ".etdump"
    module.write_etdump_result_to_file(dump)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inspector = Inspector(etdump_path=dump)
    counts: dict[str, int] = {}
    for block in inspector.event_blocks:
        for e in block.events:
            if e.perf_data is not None:
                name = e.name.split(" #")[0]
                counts[name] = counts.get(name, 0) + 1
    return counts


def _cosines(run, model) -> np.ndarray:
    x = np.stack(_images(4, 3))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    return (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activations_run_in_int8_in_xnnpack(tmp_path, act):
    pytest.importorskip("executorch")
    from edgec.backends.executorch import runner

    model = _model(act)
    calib = _images(16, 2)
    events, cos = {}, {}
    for int8 in (True, False) if act == "silu" else (True,):  # int8_silu changes nothing for the others
        path = tmp_path / f"int8_{int8}.pte"
        report = Pt2eProgram(model, (1, 3, SIZE, SIZE), calib, method="minmax", int8_silu=int8).lower(path)
        assert report["delegated_subgraphs"] == 1, report
        events[int8], cos[int8] = _xnnpack_events(path), _cosines(runner(path, threads=1), model)
    converts = {k: sum(n for name, n in ev.items() if name.startswith("Convert")) for k, ev in events.items()}
    # the input's quantize and the output's dequantize only: each activation runs as an int8 table (hardswish and
    # GELU fold without help); a SiLU left whole is a float sigmoid and multiply with a convert on each side
    assert converts[True] == 2, events[True]
    assert cos[True].min() > 0.99, cos
    if act == "silu":
        assert converts[False] == 2 + 2 * 3, events[False]
        assert cos[True].mean() > cos[False].mean() - 0.005, cos


@pytest.mark.slow
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activations_run_in_int8_in_litert(tmp_path, act):
    litert_torch = pytest.importorskip("litert_torch")
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig

    from edgec.backends.litert import op_report
    from edgec.runtime.runners import LiteRTRunner

    model = _model(act)
    floats, cos = {}, {}
    for int8 in (True, False) if act == "silu" else (True,):
        prog = Pt2eProgram(model, (1, 3, SIZE, SIZE), _images(16, 2), method="minmax", int8_silu=int8,
                           quantizer=lambda config: pt2e_quantizer.PT2EQuantizer().set_global(config),
                           base_config=pt2e_quantizer.get_symmetric_quantization_config)
        path = tmp_path / f"int8_{int8}.tflite"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            litert_torch.convert(prog.convert(), prog.example,
                                 quant_config=QuantConfig(pt2e_quantizer=prog.inner())).export(str(path))
        floats[int8], cos[int8] = op_report(path)["float_ops"], _cosines(LiteRTRunner(path, threads=1), model)
    assert floats[True] == [], floats[True]
    assert cos[True].min() > 0.99, cos
    if act == "silu":
        assert floats[False].count("LOGISTIC") == 3 and floats[False].count("MUL") == 3, floats[False]
        assert cos[True].mean() > cos[False].mean() - 0.005, cos
