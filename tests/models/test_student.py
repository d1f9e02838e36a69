"""Students: any timm backbone lands in the teacher's embedding dim; checkpoints round-trip."""

from __future__ import annotations

import pytest

from edgec.data.preprocess import Preprocess
from edgec.errors import UnknownNameError
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
