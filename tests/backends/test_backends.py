"""Every backend in the registry, through the same pipeline: export -> quantize (the quantize stage, each
quantizer the record lists) -> lower -> run in its own runtime -> compare with the float model.

Parametrised over :func:`edgec.backends.backends`, so a newly registered backend is tested for free.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edgec import registry
from edgec.backends import backends

torch = pytest.importorskip("torch")

SIZE = 32
FORMS = [(b.name, q) for b in backends().values() for q in b.quantizers]


def _tiny_encoder():
    """Conv/BN/ReLU -> depthwise conv -> pool -> linear: every backend quantizes it, fully integer included."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 16)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _calibration(n: int = 24):
    from edgec.data.preprocess import Preprocess
    from edgec.quantize.calibration import CalibrationSet

    rng = np.random.default_rng(0)
    # smooth images with a few saturated pixels: the methods clip the outliers differently
    base = rng.integers(60, 190, size=(n, SIZE, SIZE, 3)).astype(np.uint8)
    base[:, :2, :2] = 255
    return CalibrationSet(base, [Path(f"img{i}.png") for i in range(n)], [None] * n, f"test-calibration-{n}", [],
                          Preprocess(size=(SIZE, SIZE)))


def _spec(backend: str, quantizer: str):
    record = backends()[backend]
    layout = "NHWC" if record.quantizers[quantizer].fully_integer else "NCHW"
    return registry.TargetSpec(description="test", backend=backend, runtime=record.runtimes[0],
                               precisions=["int8", "fp32"], quantizer=quantizer, layout=layout, normalize_output=False,
                               constraints=registry.Constraints(static_shapes=True,
                                                                fully_integer=record.quantizers[quantizer].fully_integer))


def _build(backend: str, quantizer: str, method: str, work: Path):
    from edgec.quantize import stage

    record = backends()[backend]
    missing = record.can_build()
    if missing:
        pytest.skip(f"{backend}: {', '.join(missing)} not installed")
    spec = _spec(backend, quantizer)
    calib = _calibration()
    records: list[dict] = []

    def quantize(make_program, out):
        program = make_program(calib, method, 99.9)
        result = stage.run(program, stage.Settings(method=method, percentile=99.9), out, log=lambda _: None)
        records.append(result.record)
        return result

    work.mkdir(parents=True)
    shape = (1, 3, SIZE, SIZE) if spec.layout == "NCHW" else (1, SIZE, SIZE, 3)
    built = record.build(_tiny_encoder(), shape, spec=spec, work=work, quantize=quantize, options={}, log=lambda _: None)
    return spec, built, records[0]


def _run(path: Path, spec, x_nchw: np.ndarray) -> np.ndarray:
    from edgec.runtime.runners import open_runner

    x = x_nchw.transpose(0, 2, 3, 1) if spec.layout == "NHWC" else x_nchw
    run = open_runner(path, spec.runtime)
    out = np.concatenate([run(np.ascontiguousarray(x[i:i + 1])) for i in range(len(x))])
    return out.astype(np.float32).reshape(len(x), -1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "quantizer"), FORMS)
def test_every_backend_exports_quantizes_lowers_and_runs_close_to_float(backend, quantizer, tmp_path):
    spec, built, rec = _build(backend, quantizer, backends()[backend].quantizers[quantizer].default_method, tmp_path / "w")
    x = np.concatenate(list(_calibration(8).batches(layout="NCHW", batch_size=8)))
    with torch.no_grad():
        ref = _tiny_encoder()(torch.from_numpy(x)).numpy()
    fp32 = _run(built.candidates["fp32"], spec, x)
    int8 = _run(built.candidates["int8"], spec, x)
    assert _cosine(fp32, ref) > 0.9999, backend
    assert 0.95 < _cosine(int8, ref) < 1.0, backend  # int8 is close, and it is not the float model
    assert _sha(built.candidates["int8"]) != _sha(built.candidates["fp32"])
    assert rec["method"] == backends()[backend].quantizers[quantizer].default_method
    assert rec["calibration_sha256"] == "test-calibration-24" and rec["quantizable_layers"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "quantizer"), [f for f in FORMS if len(backends()[f[0]].quantizers[f[1]].methods) > 1])
def test_each_calibration_method_reaches_the_backend(backend, quantizer, tmp_path):
    """Different activation ranges give different bytes: a method a backend lists is honoured, not dropped."""
    methods = backends()[backend].quantizers[quantizer].methods
    shas = {}
    for method in methods:
        _, built, rec = _build(backend, quantizer, method, tmp_path / method)
        assert rec["method"] == method
        path = built.candidates["int8"]
        companions = [p for p in path.parent.glob(path.stem + ".*") if p != path]
        shas[method] = _sha(path) + "".join(_sha(p) for p in sorted(companions))
    assert len(set(shas.values())) == len(methods), shas


def test_a_method_the_quantizer_does_not_list_is_refused():
    from edgec.errors import InputError

    full = next(b for b in backends().values() if any(q.fully_integer for q in b.quantizers.values()))
    q = next(q for q in full.quantizers.values() if q.fully_integer)
    assert full.method(q.name, "auto") == q.default_method
    with pytest.raises(InputError, match="does not take calibration method 'entropy'") as info:
        full.method(q.name, "entropy")
    assert info.value.exit_code == 2


def test_records_are_complete_and_need_no_sdk_to_read():
    import subprocess
    import sys

    for b in backends().values():
        assert b.suffix.startswith(".") and b.runtimes and b.packages and b.install and b.precisions
        assert set(b.runtime_modules) == set(b.runtimes), b.name
        for q in b.quantizers.values():
            assert q.default_method in q.methods
    code = ("import sys; from edgec.backends import backends; backends(); "
            "print(sorted(m for m in ('torch', 'onnx', 'openvino', 'executorch', 'litert_torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_fully_integer_fallback_can_keep_non_weighted_ops_float(tmp_path):
    """ai-edge-quantizer's program lists the ops where its error lives beside the weighted ones (here the
    global average pool's MEAN): keeping one float leaves exactly that op in float."""
    from edgec.backends.litert import FullInt8Program, export, op_report

    record = backends()["litert"]
    if record.can_build():
        pytest.skip("litert-torch / ai-edge-quantizer not installed")
    fp32 = tmp_path / "model.fp32.tflite"
    export(_tiny_encoder(), (1, SIZE, SIZE, 3), fp32, layout="NHWC", normalize=False)
    program = FullInt8Program(fp32, _calibration(), "NHWC")
    kinds = {la["op"] for la in program.layers}
    assert {"CONV_2D", "FULLY_CONNECTED"} <= kinds and "MEAN" in kinds
    mean = next(la["name"] for la in program.layers if la["op"] == "MEAN")
    program.write(tmp_path / "all.tflite")
    program.write(tmp_path / "mean.tflite", frozenset({mean}))
    assert op_report(tmp_path / "all.tflite")["float_ops"] == []
    assert op_report(tmp_path / "mean.tflite")["float_ops"] == ["MEAN"]
