"""Class embeddings from prompt templates, as CLIP zero-shot classification uses them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .base import MultimodalModel

DEFAULT_PROMPTS = ("a photo of a {}.",)


def class_text_embeddings(model: MultimodalModel, labels: Sequence[str],
                          prompts: Sequence[str] = DEFAULT_PROMPTS) -> torch.Tensor:
    """(C, D) normalised: each class's prompt embeddings averaged, then renormalised."""
    texts = [p.format(label) for label in labels for p in prompts]
    emb = model.encode_text(texts).reshape(len(labels), len(prompts), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
