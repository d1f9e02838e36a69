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


class _Block(torch.nn.Module):
    """conv -> SiLU -> attention (softmax between two activation matmuls) -> GELU MLP, with residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.qkv = torch.nn.Linear(16, 48)
        self.norm = torch.nn.LayerNorm(16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

    def forward(self, x):
        x = torch.nn.functional.silu(self.conv(x))
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) * 0.25, dim=-1) @ v
        t = t + self.mlp(t)
        return t.mean(1)


def _executed(path, tmp_path):
    import onnxruntime as ort

    from edgec.runtime.runners import session_options

    opts = session_options(1, "host")
    opts.optimized_model_filepath = str(tmp_path / "executed.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "executed.onnx")).graph.node]


def test_int8_chains_keep_silu_in_int8_and_attention_in_float(tmp_path):
    from edgec.backends.onnx import export
    from edgec.quantize.onnx_qdq import chain_plan, quantize_onnx

    torch.manual_seed(0)
    path = tmp_path / "block.onnx"
    with torch.no_grad():
        export(_Block().eval(), (1, 3, 16, 16), path, dynamic_batch=False)
    model = onnx.load(str(path))
    nodes = {n.name: n for n in model.graph.node}
    _, always_float = chain_plan(model)
    kinds = [nodes[n].op_type for n in always_float]
    assert kinds.count("MatMul") == 2  # q @ k^T and attn @ v: both inputs are activations
    silu = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    assert silu and all(n.name not in always_float for n in silu)  # SiLU's sigmoid and its Mul are int8
    assert "Erf" not in kinds and any(nodes[n].op_type == "Mul" for n in always_float)  # GELU's Muls stay float
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    plain = quantize_onnx(path, tmp_path / "plain.onnx", _Calib(x), activations="asymmetric")
    chains = quantize_onnx(path, tmp_path / "chains.onnx", _Calib(x), activations="asymmetric", int8_chains=True)
    executed = _executed(chains.path, tmp_path)
    assert "QLinearSigmoid" in executed and "QLinearMul" in executed and "QLinearSoftmax" not in executed
    plain_executed = _executed(plain.path, tmp_path)
    assert "Softmax" in executed and "Sigmoid" in plain_executed  # plain: SiLU is a float island between Q/DQ pairs
    assert executed.count("DequantizeLinear") < plain_executed.count("DequantizeLinear")  # fewer float islands
    ref = np.concatenate([OnnxRunner(path)(x[i:i + 1]) for i in range(8)])
    got = np.concatenate([OnnxRunner(chains.path)(x[i:i + 1]) for i in range(8)])
    assert _cosine(got, ref) > 0.99


def test_token_linears_become_one_qgemm_each_in_int8_chains(tmp_path):
    """A Linear on tokens exported with a dynamic batch is MatMul + Add: the chains form makes it a Gemm (one QGemm
    with an int32 bias) instead of QLinearMatMul and a float bias Add between a DequantizeLinear/QuantizeLinear."""
    from edgec.backends.onnx import export
    from edgec.quantize.onnx_qdq import gemm_linears

    torch.manual_seed(0)
    path = tmp_path / "block.onnx"
    with torch.no_grad():
        export(_Block().eval(), (1, 3, 16, 16), path, dynamic_batch=True)
    model = onnx.load(str(path))
    before = [n.op_type for n in model.graph.node]
    assert before.count("Gemm") == 0 and before.count("MatMul") >= 4  # qkv, two MLP layers, two attention matmuls
    rewritten = onnx.load(str(path))
    assert gemm_linears(rewritten) == 3  # qkv and the MLP's two: the attention matmuls have no weight
    onnx.checker.check_model(rewritten)
    onnx.save(rewritten, tmp_path / "gemm.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(OnnxRunner(tmp_path / "gemm.onnx")(x), OnnxRunner(path)(x), atol=1e-5)
    chains = quantize_onnx(path, tmp_path / "chains.onnx", _Calib(np.concatenate([x] * 8)), activations="asymmetric",
                           int8_chains=True)
    executed = _executed(chains.path, tmp_path)
    assert executed.count("QGemm") == 3 and "QLinearMatMul" not in executed
    model = onnx.load(str(tmp_path / "executed.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(name):  # through a DequantizeLinear to the op that made the tensor
        n = producer.get(name)
        return source(n.input[0]) if n is not None and n.op_type == "DequantizeLinear" else n

    bias_adds = [n for n in model.graph.node if n.op_type == "Add"
                 and any(getattr(source(i), "op_type", "") in ("MatMul", "QLinearMatMul", "MatMulInteger") for i in n.input)]
    assert not bias_adds  # what Adds are left: shape arithmetic, GELU's 1 + erf, residuals
    ref = OnnxRunner(path)(x)
    assert _cosine(OnnxRunner(chains.path)(x), ref) > 0.99


@pytest.fixture(scope="module")
def mobilevit(tmp_path_factory):
    """The mobilevit_xxs student (random init) at 64 px, built and exported as compile does (dynamic batch)."""
    pytest.importorskip("timm")
    from edgec.backends.onnx import export
    from edgec.data.preprocess import Preprocess
    from edgec.models.student import StudentSpec, create_student, deploy_form

    net = deploy_form(create_student(StudentSpec("mobilevit_xxs", 64, Preprocess(size=(64, 64))), seed=0)).eval()
    path = tmp_path_factory.mktemp("mobilevit") / "mobilevit.onnx"
    with torch.no_grad():
        export(net, (1, 3, 64, 64), path)
    return path


def _perms(model):
    return [tuple(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def test_unfold_and_fold_become_transposes_of_whole_channel_vectors(mobilevit, tmp_path):
    """timm's unfold/fold transposes move runs of 2 elements (onnxruntime's slow generic path); the rewrite is NCHW
    <-> NHWC plus a 6-D transpose of channel vectors, with the same outputs at any batch."""
    from edgec.quantize.onnx_qdq import patch_transposes

    model = onnx.load(str(mobilevit))
    assert _perms(model).count((0, 3, 2, 1)) == 6  # three MobileViT blocks, an unfold and a fold each
    assert patch_transposes(model) == 6
    onnx.checker.check_model(model)
    perms = _perms(model)
    assert (0, 3, 2, 1) not in perms
    assert perms.count((0, 2, 4, 1, 3, 5)) == 3 and perms.count((0, 3, 1, 4, 2, 5)) == 3
    assert perms.count((0, 2, 3, 1)) == 3 and perms.count((0, 3, 1, 2)) == 3
    assert patch_transposes(model) == 0  # nothing left to rewrite
    onnx.save(model, tmp_path / "patched.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(OnnxRunner(tmp_path / "patched.onnx")(x), OnnxRunner(mobilevit)(x), atol=1e-6)
    # onnxruntime runs it as written: its transpose optimiser did not merge the two fast transposes back into one
    executed = onnx.load(_executed_model(tmp_path / "patched.onnx", tmp_path))
    assert not {(0, 3, 2, 1), (0, 3, 5, 2, 4, 1), (0, 2, 4, 5, 3, 1)} & set(_perms(executed))


def _executed_model(path, tmp_path):
    _executed(path, tmp_path)
    return str(tmp_path / "executed.onnx")


def test_int8_chains_keep_the_stem_conv_float_and_run_unfold_fold_in_uint8(mobilevit, tmp_path):
    """The stem (3 input channels) stays a float Conv: no QuantizeLinear on the pixels and no NHWC transpose of
    them, and its bias stays a float constant (the exporter shares equal zero biases between layers: onnxruntime's
    NCHWc conv needs a constant one); depthwise convs (1 input channel per group) stay int8; the unfold/fold run as
    fast uint8 transposes."""
    from edgec.quantize.onnx_qdq import chain_plan

    model = onnx.load(str(mobilevit))
    _, always_float = chain_plan(model)
    nodes = {n.name: n for n in model.graph.node}
    float_convs = [n for n in always_float if nodes[n].op_type == "Conv"]
    assert len(float_convs) == 1 and nodes[float_convs[0]].input[0] == "pixels"
    x = np.random.default_rng(1).standard_normal((32, 3, 64, 64)).astype(np.float32)
    q = quantize_onnx(mobilevit, tmp_path / "int8.onnx", _Calib(x), activations="asymmetric", int8_chains=True,
                      reduce_range=True)
    written = onnx.load(str(q.path))  # the float nodes read float constants, not a bias shared with an int8 layer
    made_by = {o: n.op_type for n in written.graph.node for o in n.output}
    float_readers = [n for n in written.graph.node
                     if n.op_type == "LayerNormalization" or (n.op_type == "Conv" and n.input[0] == "pixels")]
    assert float_readers and all(made_by.get(i) != "DequantizeLinear" for n in float_readers for i in n.input[1:])
    executed = onnx.load(_executed_model(q.path, tmp_path))
    ops = [n.op_type for n in executed.graph.node]
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == convs - 1
    producers = {o: n for n in executed.graph.node for o in n.output}
    users = [n for n in executed.graph.node if "pixels" in n.input]
    assert [n.op_type for n in users] == ["Conv"]
    slow = {(0, 3, 2, 1), (0, 3, 5, 2, 4, 1), (0, 2, 4, 5, 3, 1)}
    assert not slow & set(_perms(executed))
    six = [n for n in executed.graph.node if n.op_type == "Transpose" and len(next(a.ints for a in n.attribute)) == 6]
    assert len(six) == 6 and all(producers[n.input[0]].op_type == "Reshape" for n in six)
    ref = OnnxRunner(mobilevit)(x[:16])
    got = np.concatenate([OnnxRunner(q.path)(x[i:i + 1]) for i in range(16)])
    assert _cosine(got, ref) > 0.99


def test_timm_attention_becomes_one_node_and_qattention_in_int8_chains(mobilevit, tmp_path):
    """timm's written-out attention (qkv Linear, head transposes, Split/Squeeze, q*scale @ k^T, Softmax, @ v) becomes
    one com.microsoft Attention node (same outputs to 1e-6), and in the int8 chains one QAttention: no float
    softmax, attention matmuls or head transposes left around it, and still close to the float student."""
    from edgec.quantize.onnx_qdq import fuse_attention

    model = onnx.load(str(mobilevit))
    softmaxes = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    assert softmaxes == 9  # mobilevit_xxs: 2 + 4 + 3 transformer layers
    assert fuse_attention(model) == 9
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == 9 and "Softmax" not in ops and "Split" not in ops
    assert fuse_attention(model) == 0
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "fused.onnx")
    x = np.random.default_rng(2).standard_normal((32, 3, 64, 64)).astype(np.float32)
    ref = OnnxRunner(mobilevit)(x[:16])
    np.testing.assert_allclose(OnnxRunner(tmp_path / "fused.onnx")(x[:16]), ref, atol=1e-6)
    q = quantize_onnx(mobilevit, tmp_path / "int8.onnx", _Calib(x), activations="asymmetric", int8_chains=True,
                      reduce_range=True)
    executed = [n.op_type for n in onnx.load(_executed_model(q.path, tmp_path)).graph.node]
    assert executed.count("QAttention") == 9
    assert not {"Softmax", "FusedMatMul", "MatMul", "Attention"} & set(executed)
    assert executed.count("Transpose") <= 10  # unfold/fold and the NHWC edges, no per-head transposes
    plain = quantize_onnx(mobilevit, tmp_path / "plain.onnx", _Calib(x), activations="symmetric")
    assert "QAttention" not in [n.op_type for n in onnx.load(str(plain.path)).graph.node]  # TensorRT's form: no
    got = np.concatenate([OnnxRunner(q.path)(x[i:i + 1]) for i in range(16)])
    assert _cosine(got, ref) > 0.99
