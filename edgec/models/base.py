"""The one interface every trained multimodal model is seen through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.preprocess import Preprocess

Tokenizer = Callable[[Sequence[str]], np.ndarray]
"""texts -> int64 token ids of shape (N, context_length)."""


@dataclass
class MultimodalModel:
    """A trained CLIP-style model: two towers in one embedding space, plus how to feed them.

    ``image_encoder`` maps preprocessed pixels (N, 3, H, W) to image embeddings (N, D);
    ``text_encoder`` maps token ids (N, L) to text embeddings (N, D). Neither normalises:
    :meth:`encode_image` and :meth:`encode_text` do, as zero-shot use expects.
    """

    kind: str
    source: Path
    name: str
    image_encoder: nn.Module
    text_encoder: nn.Module | None
    tokenizer: Tokenizer | None
    preprocess: Preprocess
    embed_dim: int
    context_length: int | None
    logit_scale: float
    logit_bias: float | None = None
    notes: list[str] = field(default_factory=list)
    param_counts: dict[str, int] | None = None  # when towers share modules with the whole model

    def params(self) -> dict[str, int]:
        """Parameter count per tower."""
        if self.param_counts is not None:
            return dict(self.param_counts)
        return {name: count_params(tower) for name, tower in self.towers().items()}

    def eval(self) -> MultimodalModel:
        self.image_encoder.eval()
        if self.text_encoder is not None:
            self.text_encoder.eval()
        return self

    def to(self, device: str | torch.device) -> MultimodalModel:
        self.image_encoder.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.image_encoder.parameters()).device

    def towers(self) -> dict[str, nn.Module]:
        out = {"image": self.image_encoder}
        if self.text_encoder is not None:
            out["text"] = self.text_encoder
        return out

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        x = torch.as_tensor(pixels)
        outs = [self.image_encoder(x[i : i + batch_size].to(self.device)).float() for i in range(0, len(x), batch_size)]
        return F.normalize(torch.cat(outs), dim=-1).cpu()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name} has no tokenizer: " + "; ".join(self.notes))
        return torch.as_tensor(self.tokenizer(list(texts)))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError(f"{self.name} has no text tower")
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        outs = [self.text_encoder(ids[i : i + batch_size].to(self.device)).float() for i in range(0, len(ids), batch_size)]
        return F.normalize(torch.cat(outs), dim=-1).cpu()

    def example_inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        h, w = self.preprocess.size
        out = {"image": torch.zeros(batch, 3, h, w)}
        if self.text_encoder is not None and self.context_length:
            out["text"] = torch.zeros(batch, self.context_length, dtype=torch.long)
        return out


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (PyTorch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(example)
    module.train(was_training)
    return int(counter.get_total_flops() // 2)
