"""torch modules edgec wraps around an encoder before any backend exports it (imports torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class NormalizedEmbedding(nn.Module):
    """The encoder with L2 normalisation folded in: the artifact's output is ready for zero-shot use."""

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(pixels)
        return F.normalize(emb, dim=-1) if self.normalize else emb


class ZeroShotLogits(nn.Module):
    """The image encoder with a zero-shot head folded in: logit_scale * normalize(image) @ text.T (+ logit_bias)."""

    def __init__(self, encoder: nn.Module, text: torch.Tensor, logit_scale: float, logit_bias: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("text_t", text.detach().float().t().contiguous(), persistent=False)
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = (F.normalize(self.encoder(pixels), dim=-1) @ self.text_t) * self.logit_scale
        return logits + self.logit_bias if self.logit_bias is not None else logits
