"""Model intake: one entry point that recognises and loads every supported model kind."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data.preprocess import Preprocess
from ..errors import InputError
from .base import MultimodalModel, check_vocabulary, count_mac_split, count_macs, plain_attention


class ModelKind(str, enum.Enum):
    auto = "auto"
    edgec = "edgec"
    hf = "hf"
    open_clip = "open_clip"


def detect_kind(path: Path, arch: str | None = None) -> ModelKind:
    from . import edgec_format, hf, openclip

    if not path.exists():
        raise InputError(f"model not found: {path}", hint="give an edgec checkpoint folder, a Hugging Face folder, "
                                                           "or an open_clip checkpoint file with --arch")
    if edgec_format.is_edgec_checkpoint(path):
        return ModelKind.edgec
    if hf.is_hf_folder(path):
        return ModelKind.hf
    if path.is_file() and path.suffix in openclip.CHECKPOINT_SUFFIXES:
        if not arch:
            raise InputError(f"{path} is a bare checkpoint: edgec cannot tell its architecture",
                             hint="pass --arch with the open_clip architecture name (e.g. ViT-B-32) or a model-config .json")
        return ModelKind.open_clip
    if path.is_dir():
        raise InputError(f"{path} is neither an edgec checkpoint ({edgec_format.CONFIG_FILE}) nor a Hugging Face folder (config.json)",
                         hint="point at the folder that holds the model's config")
    raise InputError(f"{path}: not a recognised model file (expected one of {', '.join(openclip.CHECKPOINT_SUFFIXES)})")


def load_model(path: str | Path, kind: ModelKind | str = ModelKind.auto, *, arch: str | None = None,
               trust_pickle: bool = False) -> MultimodalModel:
    """Load a trained multimodal model, its kind detected from ``path`` unless given."""
    from . import edgec_format, hf, openclip

    path = Path(path)
    kind = ModelKind(kind)
    if kind is ModelKind.auto:
        kind = detect_kind(path, arch)
    elif not path.exists():
        raise InputError(f"model not found: {path}", hint="check the path")
    if kind is ModelKind.edgec:
        model = edgec_format.load(path)
    elif kind is ModelKind.hf:
        model = hf.load(path)
    else:
        if not arch:
            raise InputError("an open_clip model needs --arch (architecture name or model-config .json)")
        model = openclip.load(path, arch, trust_pickle=trust_pickle)
    check_finite(model, path)
    check_vocabulary(model)
    for tower in model.towers().values():
        plain_attention(tower)  # export, MAC counts and golden outputs all see attention's math path
    return model.eval()


def check_finite(model: MultimodalModel, path: Path) -> None:
    """Refuse NaN or infinite weights at intake: they would give a golden set of NaN, not an error."""
    import math

    import torch

    for tower_name, tower in model.towers().items():
        # parameters must be finite; buffers only not NaN (attention masks hold -inf by design)
        tensors = [(n, t, torch.isfinite) for n, t in tower.named_parameters()]
        tensors += [(n, t, lambda x: ~torch.isnan(x)) for n, t in tower.named_buffers()]
        for name, tensor, ok in tensors:
            if tensor.is_floating_point() and not bool(ok(tensor).all()):
                bad = int((~ok(tensor)).sum())
                raise InputError(f"{path}: {bad} non-finite value(s) (NaN or inf) in the {tower_name} tower's "
                                 f"weight '{name}'", hint="the checkpoint is corrupt or training diverged; "
                                                          "use another checkpoint")
    if not math.isfinite(model.logit_scale):
        raise InputError(f"{path}: the logit scale is not finite ({model.logit_scale})",
                         hint="the checkpoint is corrupt or training diverged; use another checkpoint")


def describe(model: MultimodalModel, *, macs: bool = True) -> dict:
    """What ``edgec inspect`` shows of a model: towers, sizes, preprocessing."""
    params = model.params()
    examples = model.example_inputs(1)
    towers = {}
    for name, tower in model.towers().items():
        x = examples.get(name)
        split = count_mac_split(tower, x) if macs and x is not None else None
        towers[name] = {
            "params": params[name],
            "macs": split["total"] if split else None,
            # weights-only counts (fvcore's, most papers') leave out the matmuls of two activations
            "macs_split": {k: split[k] for k in ("weight_layers", "attention_matmuls")} if split else None,
            "input": {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} if x is not None else None,
            "output": {"shape": [1, model.embed_dim], "dtype": "float32"},
        }
    return {
        "name": model.name,
        "kind": model.kind,
        "source": str(model.source),
        "embedding_dim": model.embed_dim,
        "towers": towers,
        "preprocess": model.preprocess.to_json(),
        "context_length": model.context_length,
        "tokenizer": type(model.tokenizer).__name__ if model.tokenizer is not None else None,
        "logit_scale": round(model.logit_scale, 4),
        "logit_bias": model.logit_bias,
        "notes": model.notes,
    }


def describe_student(student: str | Path, teacher: MultimodalModel | None, *, image_size: int | None = None) -> dict:
    """A student (timm name or student checkpoint folder) with its size relative to the teacher's image tower."""
    import torch

    from .student import StudentSpec, create_student, is_student_checkpoint, load_student

    path = Path(student)
    if is_student_checkpoint(path):
        module, spec, _ = load_student(path)
    else:
        if teacher is None:
            raise InputError(f"{student!r} is not a student checkpoint folder; a timm name needs a teacher for its embedding dim")
        pre = teacher.preprocess.with_size(image_size) if image_size else teacher.preprocess
        spec = StudentSpec(str(student), teacher.embed_dim, pre)
        module = create_student(spec).eval()
    h, w = spec.preprocess.size
    params = sum(p.numel() for p in module.parameters())
    macs = count_macs(module, torch.zeros(1, 3, h, w))
    info = {"name": spec.name, "params": params, "macs": macs, "input": {"shape": [1, 3, h, w], "dtype": "float32"},
            "output": {"shape": [1, spec.embed_dim], "dtype": "float32"}}
    if teacher is not None:
        t_params = teacher.params()["image"]
        t_macs = count_macs(teacher.image_encoder, teacher.example_inputs(1)["image"])
        info["vs_teacher_image_tower"] = {"params_ratio": round(t_params / params, 2), "macs_ratio": round(t_macs / max(1, macs), 2)}
    return info


@dataclass
class ImageSource:
    """What a stage compiles or quantizes: the teacher, the image encoder (student or teacher tower) and its records."""

    teacher: MultimodalModel
    encoder: nn.Module
    preprocess: Preprocess
    name: str
    sources: dict  # {"teacher": sha256, "student": sha256 | None}


def load_image_source(teacher_section, source: str, student: Path | None) -> ImageSource:
    """Load the teacher and the encoder to ship: the distilled student in ``student`` (refused when it was
    distilled from another teacher), or with ``source = "teacher"`` the teacher's own image tower."""
    from ..distill.data import teacher_identity
    from .student import deploy_form, load_student

    teacher = load_model(teacher_section.path, teacher_section.kind, arch=teacher_section.arch,
                         trust_pickle=teacher_section.trust_pickle)
    sources = {"teacher": teacher_identity(teacher), "student": None}
    if source == "teacher":
        return ImageSource(teacher, teacher.image_encoder, teacher.preprocess, f"{teacher.name} (image tower)", sources)
    encoder, spec, cfg = load_student(student)
    teacher_sha = cfg.get("teacher", {}).get("sha256")
    if teacher_sha and teacher_sha != sources["teacher"]:
        raise InputError(f"the student in {student} was distilled from another teacher (sha256 {teacher_sha[:12]}...)",
                         hint="distil it again from this teacher, or point [model] at the teacher it came from")
    sources["student"] = cfg["weights_sha256"]
    return ImageSource(teacher, deploy_form(encoder), spec.preprocess, spec.name, sources)
