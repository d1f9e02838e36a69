"""Distillation losses into the teacher's embedding space (selectable and weighted in edgec.toml).

* ``feature_cosine``: 1 - cos(student, teacher) per image;
* ``feature_mse``: MSE between the L2-normalised embeddings;
* ``contrastive_image``: InfoNCE of student image vs teacher image embeddings of the batch
  (CLIP-KD's interactive contrastive loss on the image side);
* ``contrastive_text``: InfoNCE of student image vs the teacher's caption embeddings of the
  batch; a caption that occurs twice in the batch is a positive for both images;
* ``logit``: KL between teacher and student zero-shot distributions over the label prompts,
  softened by ``temperature`` (and scaled by its square, as in Hinton et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..config import LossWeights


@dataclass
class Batch:
    student: torch.Tensor  # (N, D) student embeddings, not normalised
    teacher: torch.Tensor  # (N, D) teacher image embeddings, normalised
    caption: torch.Tensor | None = None  # (N, D) teacher caption embeddings, normalised
    caption_id: torch.Tensor | None = None  # (N,) equal ids = identical caption text


def _soft_targets(ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if ids is None:
        return torch.eye(n, device=device)
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class DistillLoss(torch.nn.Module):
    """``gather`` concatenates a tensor over all processes (autograd-aware) so that the contrastive
    terms see the whole global batch under DDP, as one process would."""

    def __init__(self, weights: LossWeights, *, temperature: float, logit_scale: float,
                 class_text: torch.Tensor | None = None, gather=_identity) -> None:
        super().__init__()
        self.weights = weights
        self.temperature = temperature
        self.logit_scale = logit_scale
        self.gather = gather
        self.register_buffer("class_text", class_text if class_text is not None else torch.empty(0), persistent=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        s = F.normalize(batch.student.float(), dim=-1)
        t = batch.teacher.float()
        parts: dict[str, torch.Tensor] = {}
        if w.feature_cosine:
            parts["feature_cosine"] = (1 - (s * t).sum(dim=-1)).mean()
        if w.feature_mse:
            parts["feature_mse"] = F.mse_loss(s, t) * s.shape[-1]
        if w.contrastive_image or w.contrastive_text:
            s_all = self.gather(s)
        if w.contrastive_image:
            logits = self.logit_scale * s_all @ self.gather(t).T
            target = torch.arange(len(s_all), device=s.device)
            parts["contrastive_image"] = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if w.contrastive_text:
            if batch.caption is None:
                raise ValueError("contrastive_text needs captions (captions.jsonl in the training folder)")
            logits = self.logit_scale * s_all @ self.gather(batch.caption.float()).T
            ids = self.gather(batch.caption_id) if batch.caption_id is not None else None
            target = _soft_targets(ids, len(s_all), s.device)
            parts["contrastive_text"] = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if w.logit:
            if not self.class_text.numel():
                raise ValueError("the logit loss needs labels (class sub-folders or 'label' in captions.jsonl)")
            tau = self.temperature
            student_logp = F.log_softmax(self.logit_scale * s @ self.class_text.T / tau, dim=-1)
            teacher_p = F.softmax(self.logit_scale * t @ self.class_text.T / tau, dim=-1)
            parts["logit"] = F.kl_div(student_logp, teacher_p, reduction="batchmean") * tau * tau
        total = sum(getattr(w, name) * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}
