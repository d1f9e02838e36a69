"""Runners give the artifact's outputs through its own runtime (ExecuTorch here; ONNX/LiteRT in verify tests)."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.errors import InputError
from edgec.runtime.runners import open_runner


@pytest.fixture(scope="module")
def tiny_pte(tmp_path_factory, torch):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    x = torch.randn(1, 3, 16, 16)
    program = to_edge_transform_and_lower(torch.export.export(net, (x,)), partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path_factory.mktemp("pte") / "net.pte"
    path.write_bytes(program.buffer)
    return path, net


def test_executorch_runner_matches_eager(tiny_pte, torch):
    path, net = tiny_pte
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    out = open_runner(path, "executorch")(x)  # a static batch of 1: the runner loops
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert out.shape == (5, 5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_truncated_pte_is_an_input_error(tiny_pte, tmp_path):
    path, _ = tiny_pte
    bad = tmp_path / "bad.pte"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="ExecuTorch cannot load"):
        open_runner(bad, "executorch")
