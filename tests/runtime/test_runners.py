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


def test_executorch_runner_sizes_the_thread_pool(tiny_pte):
    from executorch.extension.pybindings import portable_lib

    path, _ = tiny_pte
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    one = open_runner(path, "executorch", threads=1)
    assert one.threads == 1 and portable_lib._threadpool_get_thread_count() == 1 and "1 thread(s)" in one.executed_by
    two = open_runner(path, "executorch", threads=2)
    assert two.threads == 2 and portable_lib._threadpool_get_thread_count() == 2
    np.testing.assert_allclose(one(x), two(x), atol=1e-5)


def test_truncated_pte_is_an_input_error(tiny_pte, tmp_path):
    path, _ = tiny_pte
    bad = tmp_path / "bad.pte"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="ExecuTorch cannot load"):
        open_runner(bad, "executorch")


def test_tensorrt_artifacts_ask_for_tensorrt_then_cuda_then_cpu():
    from edgec.runtime.runners import onnx_providers

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = onnx_providers("tensorrt", gpu)
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[0][1]["trt_int8_enable"] is True
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("tensorrt", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_providers("onnxruntime", gpu) == ["CPUExecutionProvider"]  # the cpu target is verified on the CPU


def test_onnx_runner_says_what_executed_it(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    runner = open_runner(path, "tensorrt")
    x = np.array([[-1, 2, -3, 4]], np.float32)
    np.testing.assert_array_equal(runner(x), [[0, 2, 0, 4]])
    assert runner.executed_by.startswith("onnxruntime ") and runner.executed_by.endswith("ExecutionProvider")


def test_edge_tpu_program_without_libedgetpu_is_a_missing_toolchain(tmp_path):
    import ctypes

    from edgec.errors import MissingToolchain

    try:
        ctypes.CDLL("libedgetpu.so.1")
        pytest.skip("libedgetpu is installed here")
    except OSError:
        pass
    path = tmp_path / "model.int8_edgetpu.tflite"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(MissingToolchain, match="libedgetpu") as exc:
        open_runner(path, "litert")
    assert exc.value.exit_code == 3 and "libedgetpu1-std" in exc.value.hint


POOL_SCRIPT = r"""
import json, sys
import numpy as np, torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from edgec.runtime.runners import open_runner

x = torch.randn(1, 3, 96, 96)
paths, nets = [], []
for seed in (0, 1):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, groups=32),
                              torch.nn.Conv2d(64, 64, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval()
    ep = torch.export.export(net, (x,))
    path = sys.argv[1] + f"/net{seed}.pte"
    open(path, "wb").write(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    paths.append(path); nets.append(net)
runners = [open_runner(p, "executorch", threads=t) for p, t in zip(paths, (1, 2))]
errors = []
for _ in range(3):  # alternate: each call finds the pool the other runner left
    for net, run in zip(nets, runners):
        with torch.no_grad():
            errors.append(float(np.abs(run(x.numpy()) - net(x).numpy()).max()))
print(json.dumps(errors))
"""


def test_executorch_runners_with_different_pools_stay_correct(tmp_path):
    """Replacing ExecuTorch's thread pool leaves delegates loaded before with a dangling pool (crash, hang or
    garbage): runners load after sizing the pool and reload when another runner replaced it."""
    import json
    import subprocess
    import sys

    pytest.importorskip("executorch")
    proc = subprocess.run([sys.executable, "-c", POOL_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 6 and max(errors) < 1e-4
