"""The support matrix, generated from the registries: every teacher family (edgec.models.teachers) at a tiny
random-init config through intake, golden, compile --no-distill --target cpu and verify; every student family
(edgec.models.students) created at 64 and 224 px and exported by every backend it claims. Adding a family to
a registry adds its row here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec import registry
from edgec.cli import app
from edgec.models.students import FAMILIES as STUDENTS
from edgec.models.teachers import FAMILIES as TEACHERS

runner = CliRunner()
_BUILT: dict[str, object] = {}


@pytest.fixture(scope="session")
def matrix_root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


def _teacher(name: str, root):
    """Each family's tiny model, built once per session."""
    if name not in _BUILT:
        _BUILT[name] = TEACHERS[name].build(root / name, "tiny")
    return _BUILT[name]


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_teacher_intake_matches_the_source_forward(family, matrix_root, torch):
    from edgec.models import load_model

    built = _teacher(family, matrix_root)
    model = load_model(built.path, arch=built.arch)
    image_fn, text_fn = built.reference()
    h, w = model.preprocess.size
    x = torch.randn(3, 3, h, w)
    ids = model.tokenize(["a photo of a red circle", "a small blue square", "a yellow star"])
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(image_fn(x), dim=-1)
        ref_text = torch.nn.functional.normalize(text_fn(ids), dim=-1)
    assert model.encode_image(x).shape == ref_image.shape == (3, model.embed_dim)
    np.testing.assert_allclose(model.encode_image(x).numpy(), ref_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(model.encode_text(ids).numpy(), ref_text.numpy(), atol=1e-4)


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_teacher_image_macs_match_an_independent_count(family, matrix_root, tmp_path, torch):
    """What edgec inspect counts (FLOP counter on the math path) against the exported ONNX graph's own
    Conv/MatMul/Gemm multiply-accumulates (bench-breadth's independent count): within 2 %."""
    from edgec.backends.onnx import export
    from edgec.benchmarks.breadth import onnx_mac_split
    from edgec.models import load_model
    from edgec.models.base import count_mac_split

    built = _teacher(family, matrix_root)
    model = load_model(built.path, arch=built.arch)
    h, w = model.preprocess.size
    ours = count_mac_split(model.image_encoder, torch.zeros(1, 3, h, w))
    with torch.no_grad():
        export(model.image_encoder, (1, 3, h, w), tmp_path / "image.onnx", dynamic_batch=False)
    theirs = onnx_mac_split(tmp_path / "image.onnx")
    assert abs(ours["total"] - theirs["total"]) <= 0.02 * theirs["total"], (ours, theirs)
    # the matmuls of two activations (attention) are counted apart by both; convolutional towers have none
    assert abs(ours["attention_matmuls"] - theirs["attention_matmuls"]) <= 0.02 * theirs["total"], (ours, theirs)
    assert (ours["attention_matmuls"] > 0) == (family not in ("open_clip-convnext",)), ours


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_teacher_golden_compile_cpu_verify(family, matrix_root, shapes_data, tmp_path):
    from tests.verify.test_verify import write_project

    built = _teacher(family, matrix_root)
    extra = f'arch = {json.dumps(built.arch)}\n' if built.arch else ""
    config = write_project(tmp_path, shapes_data, teacher=built.path)
    config.write_text(config.read_text().replace("[student]", extra + "[student]", 1))
    for args in (["golden"], ["compile", "--target", "cpu", "--no-distill", "--no-progress"]):
        result = runner.invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(tmp_path / "build" / "cpu"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["results"][0]["metrics"]
    assert metrics["agreement"] >= 0.97 and metrics["cosine_mean"] > 0.99


# ---------------------------------------------------------------- students

def _student(family: str, size: int, torch):
    from edgec.data.preprocess import Preprocess
    from edgec.models.student import StudentSpec, create_student

    name = STUDENTS[family].models[0]
    return create_student(StudentSpec(name, 32, Preprocess(size=(size, size))), seed=0).eval()


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("family", sorted(STUDENTS))
def test_student_family_runs_at_64_and_224(family, size, torch):
    student = _student(family, size, torch)
    with torch.no_grad():
        out = student(torch.randn(2, 3, size, size))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


_BACKEND_TARGET = {"onnx": "cpu", "litert": "android-tflite", "executorch": "android"}
_CELLS = [pytest.param(f, b, id=f"{f}-{b}", marks=[pytest.mark.slow] if b != "onnx" else [])
          for f in sorted(STUDENTS) for b in STUDENTS[f].backends]


@pytest.mark.parametrize(("family", "backend"), _CELLS)
def test_student_family_exports_with_every_backend_it_claims(family, backend, tmp_path, torch):
    """fp32 export at 64 px through the backend's own build; the artifact runs in its runtime and matches eager."""
    from edgec.backends import get_backend
    from edgec.runtime.runners import open_runner

    student = _student(family, 64, torch)
    spec = dataclasses.replace(registry.get("targets", _BACKEND_TARGET[backend]).spec, precisions=["fp32"])
    shape = (1, 3, 64, 64) if spec.layout == "NCHW" else (1, 64, 64, 3)
    built = get_backend(backend).build(student, shape, spec=spec, work=tmp_path, quantize=None, options={},
                                       log=lambda _: None)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(student(x), dim=-1).numpy()
    feed = x.numpy() if spec.layout == "NCHW" else x.permute(0, 2, 3, 1).numpy()
    got = open_runner(built.candidates["fp32"], spec.runtime)(np.ascontiguousarray(feed))
    cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert cos > 0.9999, cos


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(f for f in STUDENTS if STUDENTS[f].edgetpu))
def test_edgetpu_family_maps_onto_the_tpu(family, tmp_path, torch):
    """A family that claims the Edge TPU: fully integer at 64 px, and the mapped-share gate holds."""
    from edgec.backends import litert

    student = _student(family, 64, torch)
    spec = registry.get("targets", "edgetpu").spec
    fp32, int8 = tmp_path / "m.tflite", tmp_path / "m.int8.tflite"
    litert.export(student, (1, 64, 64, 3), fp32, layout="NHWC", normalize=spec.normalize_output)
    rng = np.random.default_rng(0)
    litert.quantize_full_int8(fp32, int8, [rng.standard_normal((1, 64, 64, 3)).astype(np.float32) for _ in range(8)])
    report = litert.report_for(int8, spec)
    assert report["float_ops"] == [] and report["first_unsupported"] is None
    assert report["mapped_share"] >= 0.95


def test_students_command_lists_the_registry(torch):
    result = runner.invoke(app, ["students", "--size", "64", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["family"]: r for r in json.loads(result.stdout)}
    assert set(rows) == set(STUDENTS)
    assert rows["mobilevit"]["targets"]["edgetpu"] is False and "attention" in rows["mobilevit"]["not_on"]["edgetpu"]
    assert rows["mobilenetv4_conv"]["targets"]["edgetpu"] is True
    assert all(r["params"] > 0 and r["macs"] > 0 for r in rows.values())
    only = runner.invoke(app, ["students", "--size", "64", "--target", "edgetpu", "--json"])
    assert only.exit_code == 0, only.output
    assert [r["family"] for r in json.loads(only.stdout)] == [f for f in STUDENTS if STUDENTS[f].edgetpu]
    assert runner.invoke(app, ["students", "--target", "edgetpuu"]).exit_code == 2
