"""edgec's own CLIP-style architecture: a ViT image tower and a transformer text tower.

Written for export: attention is plain matmul + softmax (no fused kernels that a converter
may not know), and the text tower pools the end-of-text position with a one-hot mask instead
of an int64 ArgMax + gather (the op that breaks LiteRT conversion of CLIP text towers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class VisionSpec:
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    stem: str = "patch"  # "patch": one strided conv; "conv": stride-2 3x3 convs (ViT-C), trains faster

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"a conv stem needs a power-of-two patch_size, got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int = 128
    context_length: int = 16
    width: int = 192
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    eot_id: int = 2

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


@dataclass(frozen=True)
class ClipSpec:
    embed_dim: int = 256
    vision: VisionSpec = field(default_factory=VisionSpec)
    text: TextSpec = field(default_factory=TextSpec)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ClipSpec:
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionSpec(**data["vision"]),
            text=TextSpec(**data["text"]),
        )


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        if mask is not None:
            attn = attn + mask
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Stride-2 3x3 conv + BN + ReLU layers down to the patch grid, then a 1x1 conv to ``width``."""
    steps = patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    cin = 3
    for i in range(steps):
        cout = max(16, width >> (steps - i))
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    layers.append(nn.Conv2d(cin, width, 1))
    return nn.Sequential(*layers)


class VisionTower(nn.Module):
    """pixels (N, 3, H, W), normalised -> image embedding (N, embed_dim), not normalised."""

    def __init__(self, spec: VisionSpec, embed_dim: int) -> None:
        super().__init__()
        self.spec = spec
        grid = spec.image_size // spec.patch_size
        self.patch = conv_stem(spec.width, spec.patch_size) if spec.stem == "conv" else nn.Conv2d(
            3, spec.width, spec.patch_size, stride=spec.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, spec.width) * 0.02)
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads, spec.mlp_ratio) for _ in range(spec.layers))
        self.ln = nn.LayerNorm(spec.width)
        self.proj = nn.Linear(spec.width, embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln(x[:, 0]))


class TextTower(nn.Module):
    """token ids (N, L), int32 or int64 -> text embedding (N, embed_dim), not normalised.

    Causal attention; the feature at the end-of-text token is pooled by a one-hot mask, so
    the tower exports without ArgMax or gather.
    """

    def __init__(self, spec: TextSpec, embed_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.token = nn.Embedding(spec.vocab_size, spec.width)
        self.pos = nn.Parameter(torch.randn(1, spec.context_length, spec.width) * 0.01)
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads, spec.mlp_ratio) for _ in range(spec.layers))
        self.ln = nn.LayerNorm(spec.width)
        self.proj = nn.Linear(spec.width, embed_dim, bias=False)
        causal = torch.full((spec.context_length, spec.context_length), float("-inf")).triu(1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.token(ids) + self.pos[:, :n]
        mask = self.causal[:n, :n]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        eot = (ids == self.spec.eot_id).to(x.dtype).unsqueeze(-1)
        return self.proj((x * eot).sum(dim=1))


class EdgecClip(nn.Module):
    def __init__(self, spec: ClipSpec, logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec.vision, spec.embed_dim)
        self.text = TextTower(spec.text, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.visual(pixels), dim=-1), F.normalize(self.text(ids), dim=-1)
