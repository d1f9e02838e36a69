"""Students: any timm backbone lands in the teacher's embedding dim; checkpoints round-trip."""

from __future__ import annotations

import pytest

from edgec.data.preprocess import Preprocess
from edgec.errors import InputError, UnknownNameError
from edgec.models.student import StudentSpec, create_student, load_student, save_student


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevitv2_050", "mobilenetv4_conv_small",
                                  "efficientnet_lite0", "test_efficientnet"])
def test_student_projects_into_the_embedding_dim(name, torch):
    student = create_student(StudentSpec(name, 96, Preprocess(size=(64, 64))), seed=0).eval()
    with torch.no_grad():
        assert student(torch.zeros(2, 3, 64, 64)).shape == (2, 96)
    assert not any(getattr(m, "fused_attn", False) for m in student.modules())  # exports without SDPA


def test_student_checkpoint_round_trip(tmp_path, torch):
    spec = StudentSpec("test_efficientnet", 32, Preprocess(size=(48, 48)))
    student = create_student(spec, seed=3).eval()
    save_student(student, spec, tmp_path / "s", extra={"teacher": {"sha256": "abc"}})
    loaded, spec2, cfg = load_student(tmp_path / "s")
    assert spec2 == spec and cfg["teacher"]["sha256"] == "abc"
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x))


def test_unknown_student_names_close_ones():
    with pytest.raises(UnknownNameError, match="mobilevit_xs"):
        create_student(StudentSpec("mobilevit_xss", 8, Preprocess()))


def test_fixed_size_student_gets_the_image_size(tmp_path, torch):
    """EfficientFormerV2's attention biases are built for one resolution: at 64 px it needs img_size=64."""
    spec = StudentSpec("efficientformerv2_s0", 32, Preprocess(size=(64, 64)))
    student = create_student(spec, seed=0).eval()
    assert student.timm_kwargs == {"img_size": 64}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert student(x).shape == (2, 32)
    save_student(student, spec, tmp_path / "s")
    loaded, _, cfg = load_student(tmp_path / "s")
    assert cfg["timm_kwargs"] == {"img_size": 64}
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x))


def test_student_at_a_size_it_cannot_run_is_refused():
    with pytest.raises(InputError, match=r"cannot run at 72x72 px: efficientformerv2 supports sides that are multiples of 32"):
        create_student(StudentSpec("efficientformerv2_s0", 8, Preprocess(size=(72, 72))))


def test_unregistered_student_at_a_size_it_cannot_run_names_the_sizes_that_run(monkeypatch):
    """Any timm name: one forward at the size; when it fails, the sizes that run are named."""
    from edgec.models import students

    monkeypatch.setattr(students, "FAMILIES", {})  # efficientformerv2 as an unregistered name
    with pytest.raises(InputError, match=r"cannot run at 72x72 px; it runs at square sides 32, 64, 96, 128, 160, 192, 224, 256"):
        create_student(StudentSpec("efficientformerv2_s0", 8, Preprocess(size=(72, 72))))


@pytest.mark.parametrize("name", ["fastvit_t8", "repvit_m0_9"])
def test_a_reparameterisable_student_ships_fused(tmp_path, name, torch):
    """FastViT / RepViT train with parallel branches that timm fuses for inference: compile's source is the
    fused form (fewer parameters, fewer graph nodes, the same outputs), a MobileViT is left as it is."""
    from edgec.models.student import deploy_form

    student = create_student(StudentSpec(name, 32, Preprocess(size=(64, 64))), seed=0).eval()
    fused = deploy_form(student)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), student(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in student.parameters())
    assert sum(1 for _ in fused.modules()) < sum(1 for _ in student.modules())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in create_student(
        StudentSpec(name, 32, Preprocess(size=(64, 64))), seed=0).parameters())  # the training form is untouched
    plain = create_student(StudentSpec("mobilevit_xxs", 32, Preprocess(size=(64, 64))), seed=0).eval()
    assert sum(p.numel() for p in deploy_form(plain).parameters()) == sum(p.numel() for p in plain.parameters())
