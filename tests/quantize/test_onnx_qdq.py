"""Q/DQ ONNX: TensorRT's symmetric form, and the asymmetric uint8 activations onnxruntime-only targets take."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.quantize.onnx_qdq import quantize_onnx
from edgec.runtime.runners import OnnxRunner

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class _Calib:
    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def batches(self, batch_size: int = 16, layout: str | None = None):
        return [self.x[i:i + batch_size] for i in range(0, len(self.x), batch_size)]


@pytest.fixture(scope="module")
def relu_net(tmp_path_factory):
    from edgec.backends.onnx import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 8)).eval()
    path = tmp_path_factory.mktemp("qdq") / "net.onnx"
    with torch.no_grad():
        export(net, (1, 3, 16, 16), path)
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    return path, x


def _cosine(a, b):
    return float((a * b).sum(1).mean())  # the export folds in L2 normalisation


def test_asymmetric_activations_are_uint8_closer_to_float_and_have_no_tensorrt_cache(relu_net, tmp_path):
    path, x = relu_net
    ref = OnnxRunner(path)(x)
    sym = quantize_onnx(path, tmp_path / "sym.onnx", _Calib(x))
    asym = quantize_onnx(path, tmp_path / "asym.onnx", _Calib(x), activations="asymmetric")
    assert sym.trt_cache.startswith("TRT-") and asym.trt_cache is None

    def zero_point_types(p):
        m = onnx.load(str(p))
        inits = {i.name: i for i in m.graph.initializer}
        return {inits[n.input[2]].data_type for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits}

    assert zero_point_types(sym.path) == {onnx.TensorProto.INT8}
    assert onnx.TensorProto.UINT8 in zero_point_types(asym.path)
    c_sym, c_asym = _cosine(OnnxRunner(sym.path)(x), ref), _cosine(OnnxRunner(asym.path)(x), ref)
    assert c_asym > 0.99 and c_asym >= c_sym


def test_unknown_activation_form_is_refused(relu_net, tmp_path):
    from edgec.errors import InputError

    path, x = relu_net
    with pytest.raises(InputError, match="activation form"):
        quantize_onnx(path, tmp_path / "q.onnx", _Calib(x), activations="nibble")
