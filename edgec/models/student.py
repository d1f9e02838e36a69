"""Students: a timm image backbone plus a linear projection into the teacher's embedding space.

Saved in edgec's format (``edgec_student.json`` + ``model.safetensors``, no pickle), with the
teacher's identity, so a student is never paired with the wrong text embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import InputError, UnknownNameError, did_you_mean, require_module
from ..manifest import atomic_write_json, inside, sha256_file, staged_dir

CONFIG_FILE = "edgec_student.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "edgec-student"
FORMAT_VERSION = 1


class Student(nn.Module):
    """pixels (N, 3, H, W) -> embedding (N, embed_dim) in the teacher's space, not normalised."""

    def __init__(self, backbone: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        # with num_classes=0 timm returns pooled features; models with a head conv after pooling
        # (MobileNetV3/V4) give head_hidden_size of them, not num_features
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(pixels))


@dataclass(frozen=True)
class StudentSpec:
    name: str
    embed_dim: int
    preprocess: Preprocess

    def to_json(self) -> dict:
        return {"name": self.name, "embed_dim": self.embed_dim, "preprocess": self.preprocess.to_json()}


def _timm():
    return require_module("timm", install="'edgec[compile]'", purpose="building a student")


def check_student_name(name: str) -> None:
    timm = _timm()
    if name not in timm.list_models():
        close = did_you_mean(name, timm.list_models(f"*{name.split('_')[0][:6]}*") or timm.list_models())
        raise UnknownNameError(f"unknown student {name!r}: timm has no model of that name", hint=close)


def disable_fused_attention(module: nn.Module) -> None:
    """timm's fused attention (scaled_dot_product_attention) exports badly to mobile runtimes."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def _timm_kwargs(name: str, size: tuple[int, int]) -> dict:
    """``img_size`` for the models timm marks ``fixed_input_size`` (their position tables or attention biases
    are built for one resolution: EfficientFormerV2, EfficientViT-M...); others get nothing."""
    cfg = _timm().get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return {}
    return {"img_size": size[0] if size[0] == size[1] else list(size)}


def build_backbone(name: str, size: tuple[int, int], timm_kwargs: dict | None = None) -> nn.Module:
    """The timm backbone (pooled features, no head) for ``size``; ``timm_kwargs`` default: :func:`_timm_kwargs`.
    The kwargs it was built with are in ``edgec_timm_kwargs``."""
    kwargs = dict(_timm_kwargs(name, size) if timm_kwargs is None else timm_kwargs)
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    try:
        backbone = _timm().create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:  # a fixed-size model whose constructor has no img_size: build it at its own size
        if "img_size" not in str(exc):
            raise
        kwargs = {}
        backbone = _timm().create_model(name, pretrained=False, num_classes=0)
    backbone.edgec_timm_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return backbone


def create_student(spec: StudentSpec, *, seed: int | None = None, timm_kwargs: dict | None = None) -> Student:
    """A student at ``spec.preprocess.size``: models that are built for one resolution get it (``img_size``);
    a model that cannot run at that size is refused with the sizes it supports. ``timm_kwargs`` (from a
    checkpoint) replaces that choice."""
    check_student_name(spec.name)
    size = tuple(spec.preprocess.size)
    if timm_kwargs is None:
        from .students import check_size

        check_size(spec.name, size)
    if seed is not None:
        torch.manual_seed(seed)
    backbone = build_backbone(spec.name, size, timm_kwargs)
    student = Student(backbone, spec.embed_dim)
    student.timm_kwargs = dict(backbone.edgec_timm_kwargs)
    disable_fused_attention(student)
    from .students import check_runs

    check_runs(student, spec.name, size)
    return student


def deploy_form(student: nn.Module) -> nn.Module:
    """The student as it ships: timm's re-parameterisable blocks (FastViT's RepMixer and MobileOne branches,
    RepViT, EfficientViT-M's ConvNorm) fused into single convolutions, as timm does for inference. The same
    outputs to float rounding; a new module (training keeps the multi-branch form). Families without such
    blocks (MobileViT, MobileNetV4, ...) come back unchanged."""
    from timm.utils.model import reparameterize_model

    fused = reparameterize_model(student.eval())  # a copy
    if hasattr(student, "timm_kwargs"):
        fused.timm_kwargs = student.timm_kwargs
    return fused


def save_student(student: Student, spec: StudentSpec, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    with staged_dir(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic_write_json(tmp / CONFIG_FILE, {
            "format": FORMAT, "version": FORMAT_VERSION, **spec.to_json(),
            "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "timm_kwargs": getattr(student, "timm_kwargs", {}), **(extra or {}),
        })
    return folder


def is_student_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_student_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise InputError(f"no student checkpoint in {folder} ({CONFIG_FILE} missing)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{folder / CONFIG_FILE} is not valid JSON ({exc.msg})", hint="the checkpoint is corrupt") from None
    if cfg.get("format") != FORMAT:
        raise InputError(f"{folder / CONFIG_FILE}: not an edgec student checkpoint")
    return cfg


def load_student(folder: str | Path) -> tuple[Student, StudentSpec, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_student_config(folder)
    spec = StudentSpec(cfg["name"], int(cfg["embed_dim"]), Preprocess.from_json(cfg["preprocess"]))
    weights = inside(folder, cfg.get("weights", WEIGHTS_FILE), str(folder / CONFIG_FILE))
    if not weights.is_file():
        raise InputError(f"weights file missing: {weights}")
    if cfg.get("weights_sha256") and sha256_file(weights) != cfg["weights_sha256"]:
        raise InputError(f"{weights} does not match the sha256 recorded in {CONFIG_FILE} (truncated or altered)",
                         hint="train or copy the student again")
    student = create_student(spec, timm_kwargs=cfg.get("timm_kwargs", {}))  # as it was built (older: none)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"cannot read {weights}: {exc}") from None
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{weights} does not match student {spec.name!r}: {str(exc).splitlines()[1].strip()[:160]}") from None
    return student.eval(), spec, cfg
