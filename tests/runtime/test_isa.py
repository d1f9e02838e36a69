"""The host ISA, the int8 form each CPU gets, and the Q/DQ reference that does not depend on the host's kernels."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.runtime.isa import host_isa, parse_cpuinfo, target_isa
from edgec.runtime.runners import OnnxRunner, session_options

ZEN3 = """processor : 0
model name : AMD EPYC 7B13 64-Core Processor
flags : fpu sse4_2 avx fma avx2 bmi2 sha_ni
"""
SAPPHIRE = """processor : 0
model name : Intel(R) Xeon(R) Platinum 8481C
flags : fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_int8
"""
CORTEX_A76 = """processor : 0
Features : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""


def test_cpuinfo_parsing_and_what_it_means_for_int8():
    zen3, spr, a76 = parse_cpuinfo(ZEN3, "x86_64"), parse_cpuinfo(SAPPHIRE, "x86_64"), parse_cpuinfo(CORTEX_A76, "aarch64")
    assert zen3.flags == ("sse4_2", "avx", "avx2", "fma") and zen3.model.startswith("AMD EPYC")
    assert not zen3.vnni and not zen3.u8s8_exact and "vpmaddubsw" in zen3.int8_kernels
    assert spr.vnni and spr.u8s8_exact and "avx512_vnni" in spr.flags
    assert a76.family == "arm" and a76.u8s8_exact and "dot product" in a76.int8_kernels
    record = zen3.record()
    assert record["u8s8_exact"] is False and record["flags"] == list(zen3.flags)


def test_peak_rates_follow_the_isa():
    zen3 = parse_cpuinfo(ZEN3 + "cpu MHz : 2450.000\n", "x86_64")
    assert zen3.ghz == 2.45
    int8, fp32 = zen3.peak_gmacs("int8"), zen3.peak_gmacs("fp32", threads=2)
    assert int8["macs_per_cycle"] == 64 and int8["gmacs"] == 156.8  # the ~150 GMAC/s per core of an AVX2 Zen 3
    assert fp32["macs_per_cycle"] == 16 and fp32["gmacs"] == 78.4
    spr = parse_cpuinfo(SAPPHIRE, "x86_64")
    assert spr.peak_macs_per_cycle("int8")[0] == 1024 and spr.peak_gmacs("int8")["gmacs"] is None  # no clock given
    a76 = parse_cpuinfo(CORTEX_A76, "aarch64")
    assert a76.peak_macs_per_cycle("int8")[0] == 32 and a76.peak_macs_per_cycle("fp32")[0] == 8
    with pytest.raises(ValueError):
        zen3.peak_macs_per_cycle("int4")


def test_this_host_is_detected():
    isa = host_isa()
    assert isa.arch and isa.record()["int8_kernels"] != ""
    if isa.family == "x86":  # every x86-64 CPU this project runs on has at least SSE4.2
        assert "sse4_2" in isa.flags


def test_device_profiles_name_their_isa():
    from edgec import registry

    for name in ("udoo-bolt-v8", "nuc-13-pro", "raspberry-pi-5", "orin-nano"):
        dev = registry.get("devices", name).spec
        isa = target_isa(dev.isa, dev.arch)
        assert isa is not None and isa.arch == dev.arch
    assert not target_isa(registry.get("devices", "udoo-bolt-v8").spec.isa, "x86_64").u8s8_exact
    assert target_isa(registry.get("devices", "nuc-13-pro").spec.isa, "x86_64").u8s8_exact
    assert target_isa(None, None) is None


def test_int8_form_per_runtime_and_cpu():
    pytest.importorskip("torch")
    from edgec import registry
    from edgec.backends.onnx import int8_form

    cpu, jetson = registry.get("targets", "cpu").spec, registry.get("targets", "jetson").spec
    avx2 = target_isa(["avx2", "fma"], "x86_64")
    vnni = target_isa(["avx2", "avx512_vnni"], "x86_64")
    arm = target_isa(["asimd", "asimddp"], "aarch64")
    assert int8_form(jetson, None)["weight_bits"] == 8  # TensorRT accumulates in int32
    assert int8_form(cpu, None)["weight_bits"] == 7  # unknown CPU: exact on any
    assert int8_form(cpu, avx2)["weight_bits"] == 7
    assert int8_form(cpu, vnni)["weight_bits"] == 8 and int8_form(cpu, arm)["weight_bits"] == 8


# --- Q/DQ models: 7-bit weights, and the reference that executes Q/DQ as written ---------------------------------

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


from ..quantize.test_onnx_qdq import _Calib, relu_net  # noqa: F401 - a small conv net exported once per module


def _int8_weights(path) -> list[np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return [numpy_helper.to_array(i) for i in m.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]


def test_reduced_range_weights_fit_seven_bits(relu_net, tmp_path):
    from edgec.quantize.onnx_qdq import quantize_onnx

    path, x = relu_net
    full = quantize_onnx(path, tmp_path / "full.onnx", _Calib(x), activations="asymmetric")
    seven = quantize_onnx(path, tmp_path / "seven.onnx", _Calib(x), activations="asymmetric", reduce_range=True)
    full_w, seven_w = _int8_weights(full.path), _int8_weights(seven.path)
    assert full_w and len(full_w) == len(seven_w)
    assert max(int(np.abs(w).max()) for w in full_w) == 127
    top = max(int(np.abs(w).max()) for w in seven_w)
    assert 60 <= top <= 64  # 7 bits: u8 * s8 pairs stay below 2**15 in vpmaddubsw (255 * 64 * 2 = 32640)
    ref = OnnxRunner(path)(x)
    cos = float((OnnxRunner(seven.path)(x) * ref).sum(1).mean())  # outputs are L2-normalised
    assert cos > 0.99


def _executed_ops(path, kernels: str, out) -> list[str]:
    import onnxruntime as ort

    opts = session_options(1, kernels)
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def test_reference_runs_qdq_as_written_and_host_kernels_fuse_them(relu_net, tmp_path):
    from edgec.quantize.onnx_qdq import quantize_onnx

    path, x = relu_net
    q = quantize_onnx(path, tmp_path / "trt.onnx", _Calib(x))  # TensorRT's symmetric form
    written = [n.op_type for n in onnx.load(str(q.path)).graph.node]
    reference_ops = _executed_ops(q.path, "reference", tmp_path / "ref.opt.onnx")
    host_ops = _executed_ops(q.path, "host", tmp_path / "host.opt.onnx")
    integer_ops = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"}
    # the reference executes the written graph: float Conv/Gemm between Q/DQ, no integer kernel anywhere
    # (onnxruntime still gives each consumer its own copy of a shared DequantizeLinear: same arithmetic)
    from collections import Counter

    def non_dq(ops):
        return Counter(o for o in ops if o != "DequantizeLinear")

    assert non_dq(reference_ops) == non_dq(written) and not integer_ops & set(reference_ops)
    assert "Conv" in reference_ops and "DequantizeLinear" in reference_ops
    # as deployed on a CPU, onnxruntime fuses the Q/DQ convolutions into its int8 kernels (ISA-dependent)
    assert integer_ops & set(host_ops)

    runner = OnnxRunner(q.path, runtime="tensorrt")  # no TensorRT here: the reference, and it says so
    assert runner.kernels == "reference" and "as written" in runner.executed_by
    assert runner.ran == "onnxruntime"  # what ran here, for bench and report labels: not TensorRT
    ref = runner(x)
    # float arithmetic on the dequantized values: as close to the float model as int8 allows
    fp32 = OnnxRunner(path)(x)
    assert float((ref * fp32).sum(1).mean()) > 0.99
    host = OnnxRunner(q.path, runtime="tensorrt", kernels="host")
    assert host.kernels == "host" and "as written" not in host.executed_by
    if host_isa().u8s8_exact:  # with VNNI the host's int8 kernels are exact too: both give the same numbers
        np.testing.assert_allclose(host(x), ref, atol=2e-3)


def test_reference_does_not_depend_on_threads_or_run(relu_net, tmp_path):
    from edgec.quantize.onnx_qdq import quantize_onnx

    path, x = relu_net
    q = quantize_onnx(path, tmp_path / "trt.onnx", _Calib(x))
    a = OnnxRunner(q.path, threads=1, runtime="tensorrt")(x)
    b = OnnxRunner(q.path, threads=2, runtime="tensorrt")(x)
    np.testing.assert_allclose(a, b, atol=1e-6)
