"""PT2E int8: SiLU split into an int8 sigmoid and multiply, run in the ExecuTorch runtime (XNNPACK's own
per-operator events say what ran in which precision)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgec.quantize.pt2e import Pt2eProgram, split_silu

SIZE = 32


class ConvSiLU(nn.Module):
    """A MobileNetV2-style block (expand, depthwise, project) with SiLU as a module and as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Conv2d(16, 64, 1)
        self.dw = nn.Conv2d(64, 64, 3, 1, 1, groups=64)
        self.project = nn.Conv2d(64, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 24)

    def forward(self, x):
        x = self.stem(x)
        x = self.project(F.silu(self.dw(F.silu(self.expand(x)))))
        return self.head(self.pool(x).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = ConvSiLU().eval()
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


@pytest.mark.slow
def test_int8_silu_stays_in_int8_in_xnnpack(tmp_path):
    pytest.importorskip("executorch")
    from edgec.backends.executorch import runner

    model = _model()
    calib = _images(16, 2)
    paths, events = {}, {}
    for int8_sigmoid in (True, False):
        path = tmp_path / f"int8_sigmoid_{int8_sigmoid}.pte"
        report = Pt2eProgram(model, (1, 3, SIZE, SIZE), calib, method="minmax", int8_sigmoid=int8_sigmoid).lower(path)
        assert report["delegated_subgraphs"] == 1, report
        paths[int8_sigmoid], events[int8_sigmoid] = path, _xnnpack_events(path)
    converts = {k: sum(n for name, n in ev.items() if name.startswith("Convert")) for k, ev in events.items()}
    # int8 SiLU: the input's quantize and the output's dequantize only; float SiLU: a convert each side of each
    assert converts[True] == 2, events[True]
    assert converts[False] == 2 + 2 * 3, events[False]
    assert events[False].get("Sigmoid (NC)") == 3 and "Sigmoid (NC)" not in events[True], events
    x = np.stack(_images(4, 3))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for int8_sigmoid, path in paths.items():
        run = runner(path, threads=1)
        out = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99, (int8_sigmoid, cos)
