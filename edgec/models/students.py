"""The student families edgec supports: which timm models, at which image sizes, through which backends.

This table is what ``edgec students`` lists and what ``tests/models/test_support_matrix.py`` walks:
every family is created at 64 and 224 px and exported by every backend it claims, so adding a
family here adds its tests. A claim is what those tests run; a target a family cannot reach says
why (``not_on``). Any other timm name still works as a student; it is simply not in this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError

BACKENDS = ("onnx", "litert", "executorch")
_ATTENTION_OFF_TPU = ("its attention (batch matmul, softmax over tokens, LayerNorm, 4-D and 5-D reshapes) is not on "
                      "the Edge TPU's op list: the compiler leaves the TPU at the first attention block")
_GELU_OFF_TPU = "GELU is not on the Edge TPU's op list: the compiler leaves the TPU at the first GELU"


@dataclass(frozen=True)
class StudentFamily:
    name: str
    models: tuple[str, ...]  # timm names, smallest first; the first is the one the tests build
    description: str
    backends: tuple[str, ...]  # backends whose export the tests run for this family
    size_multiple: int = 1  # image sides must be a multiple of this
    min_size: int = 32
    edgetpu: bool = False  # every op on the Edge TPU's list once fully integer (the tests check the mapped share)
    not_on: dict[str, str] = field(default_factory=dict)  # backend or accelerator -> why not

    def supports_size(self, size: tuple[int, int]) -> bool:
        return all(s >= self.min_size and s % self.size_multiple == 0 for s in size)

    def sizes_text(self) -> str:
        if self.size_multiple == 1:
            return f"any side from {self.min_size} px"
        first = max(self.min_size, self.size_multiple)
        return (f"sides that are multiples of {self.size_multiple} from {first} px "
                f"({', '.join(str(first + i * self.size_multiple) for i in range(4))}, ..., 224, 256, ...)")


FAMILIES: dict[str, StudentFamily] = {f.name: f for f in (
    StudentFamily("mobilevit", ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"),
                  "MobileViT: convolutions + transformer blocks on unfolded patches", BACKENDS,
                  not_on={"edgetpu": _ATTENTION_OFF_TPU}),
    StudentFamily("mobilevitv2", ("mobilevitv2_050", "mobilevitv2_075", "mobilevitv2_100"),
                  "MobileViTv2: separable (linear) self-attention", ("onnx", "executorch"),
                  not_on={"litert": "the LiteRT converter rejects its separable self-attention (timm "
                                    "LinearSelfAttention: 'tfl.mul' op operands don't have broadcast-compatible "
                                    "shapes; seen at 64 px)",
                          "edgetpu": _ATTENTION_OFF_TPU}),
    StudentFamily("fastvit", ("fastvit_t8", "fastvit_t12", "fastvit_s12"),
                  "FastViT: reparameterisable RepMixer convolutions", BACKENDS, not_on={"edgetpu": _GELU_OFF_TPU}),
    StudentFamily("efficientvit", ("efficientvit_b0", "efficientvit_b1"),
                  "EfficientViT (MIT): multi-scale ReLU linear attention", BACKENDS,
                  not_on={"edgetpu": "its ReLU linear attention (batch matmul) and Hardswish are not on the Edge TPU's "
                                     "op list"}),
    StudentFamily("efficientvit_msra", ("efficientvit_m0", "efficientvit_m1", "efficientvit_m2"),
                  "EfficientViT (MSRA): cascaded group attention, built for one resolution (img_size)", BACKENDS,
                  not_on={"edgetpu": _ATTENTION_OFF_TPU}),
    StudentFamily("mobilenetv4_conv", ("mobilenetv4_conv_small", "mobilenetv4_conv_medium"),
                  "MobileNetV4 convolutional: inverted bottlenecks, ReLU", BACKENDS, edgetpu=True),
    StudentFamily("mobilenetv4_hybrid", ("mobilenetv4_hybrid_medium_075", "mobilenetv4_hybrid_medium"),
                  "MobileNetV4 hybrid: convolutions + multi-query attention", BACKENDS,
                  not_on={"edgetpu": _ATTENTION_OFF_TPU}),
    StudentFamily("efficientformerv2", ("efficientformerv2_s0", "efficientformerv2_s1"),
                  "EfficientFormerV2: attention with resolution-specific biases, built for one resolution (img_size)",
                  BACKENDS, size_multiple=32, not_on={"edgetpu": _ATTENTION_OFF_TPU}),
    StudentFamily("repvit", ("repvit_m0_9", "repvit_m1_0", "repvit_m1_1"),
                  "RepViT: reparameterisable depthwise convolutions with ViT-style token/channel mixers", BACKENDS,
                  not_on={"edgetpu": _GELU_OFF_TPU}),
)}


def family_of(name: str) -> StudentFamily | None:
    """The family a timm model name belongs to (None: not a registered family)."""
    return next((f for f in FAMILIES.values() if name in f.models), None)


def reachable(family: StudentFamily, target_spec) -> tuple[bool, str | None]:
    """Whether ``family`` can be compiled for a target (its backend, and for accelerators with an op list, whether
    every op maps), and why not."""
    if target_spec.constraints.supported_ops and not family.edgetpu:
        return False, family.not_on.get("edgetpu", "not every op is on the accelerator's op list")
    if target_spec.backend not in family.backends:
        return False, family.not_on.get(target_spec.backend, f"no {target_spec.backend} export is tested for it")
    return True, None


def check_size(name: str, size: Iterable[int]) -> None:
    """Refuse, before building it, a registered student at a size its family cannot run."""
    size = tuple(size)
    family = family_of(name)
    if family is not None and not family.supports_size(size):
        raise InputError(f"student {name} cannot run at {size[0]}x{size[1]} px: {family.name} supports "
                         f"{family.sizes_text()}", hint="set [student] image_size to a supported size")


def _runs(module: nn.Module, size: tuple[int, int]) -> bool:
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *size))
        return True
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False


def check_runs(student: nn.Module, name: str, size: tuple[int, int]) -> None:
    """One forward pass at ``size``; a student that cannot run there is refused with the sizes that do run
    (for unregistered timm names: tried at multiples of 32 up to 256)."""
    was_training = student.training
    student.eval()
    ok = _runs(student, size)
    student.train(was_training)
    if ok:
        return
    family = family_of(name)
    if family is not None:
        supported = family.sizes_text()
    else:
        from .student import build_backbone

        good = []
        for side in range(32, 257, 32):
            try:
                backbone = build_backbone(name, (side, side)).eval()
            except (RuntimeError, ValueError, AssertionError):  # some fail already in the constructor
                continue
            if _runs(backbone, (side, side)):
                good.append(side)
        supported = f"square sides {', '.join(map(str, good))} px (tried multiples of 32 up to 256)" if good else \
            "none of the multiples of 32 up to 256 either"
    raise InputError(f"student {name} cannot run at {size[0]}x{size[1]} px; it runs at {supported}",
                     hint="set [student] image_size to a size it runs at")


def describe_families(size: int = 224, *, target: str | None = None, log=None) -> list[dict]:
    """Each family's first model at ``size`` px: params, MACs, and every registered target with whether the family
    reaches it (and why not). ``target``: only the families that reach it."""
    from .. import registry
    from ..data.preprocess import Preprocess
    from ..progress import phase
    from .base import count_macs
    from .student import StudentSpec, create_student

    targets = {name: e.spec for name, e in registry.entries("targets").items()}
    if target is not None and target not in targets:
        registry.get("targets", target)  # the registry's own unknown-name error, with close names
    rows = []
    for family in FAMILIES.values():
        reach = {t: reachable(family, spec) for t, spec in targets.items()}
        if target is not None and not reach[target][0]:
            continue
        name = family.models[0]
        if log:
            log(f"{name} at {size} px")
        row = {"family": family.name, "model": name, "models": list(family.models), "description": family.description,
               "size": size, "sizes": family.sizes_text(), "backends": list(family.backends),
               "targets": {t: ok for t, (ok, _) in reach.items()},
               "not_on": {t: why for t, (ok, why) in reach.items() if not ok},
               "untested": sorted(t for t, spec in targets.items() if spec.backend not in family.backends
                                  and spec.backend not in family.not_on),
               "sizes_short": f"any >= {family.min_size}" if family.size_multiple == 1 else
               f"x{family.size_multiple}, >= {max(family.min_size, family.size_multiple)}"}
        if family.supports_size((size, size)):
            with phase(f"students: {name} at {size} px (params and MACs)"):
                student = create_student(StudentSpec(name, 512, Preprocess(size=(size, size))), seed=0).eval()
                row["params"] = sum(p.numel() for p in student.backbone.parameters())
                row["macs"] = count_macs(student.backbone, torch.zeros(1, 3, size, size))
        else:
            row["params"] = row["macs"] = None
        rows.append(row)
    return rows
