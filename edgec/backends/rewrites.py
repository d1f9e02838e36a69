"""Graph rewrites that keep a model's function and let a delegate take more of it.

XNNPACK (ExecuTorch 1.5) does not take ``native_layer_norm``, nor the ``select`` / ``expand`` /
``squeeze`` copies that a fused-qkv, 4-D ``q @ k.T`` attention exports to, so a MobileViT is cut
into ~49 delegate subgraphs with CPU-portable ops between them. Both rewrites below use only ops
XNNPACK delegates (linear, bmm, sub, mul, add, div, sqrt, softmax, reshape, transpose):

* :class:`LinearLayerNorm`: LayerNorm over the last dim, means computed as a linear layer with
  constant 1/C weights;
* :class:`BmmAttention`: timm's ``Attention`` with separate q/k/v linears (the scale folded into
  q) and 3-D ``bmm`` over (batch x heads).

They are exact up to float rounding (tested against the original module to 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LinearLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        (c,) = ln.normalized_shape
        self.eps = ln.eps
        self.register_buffer("avg", torch.full((1, c), 1.0 / c))
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - F.linear(x, self.avg)
        y = d / torch.sqrt(F.linear(d * d, self.avg) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class BmmAttention(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        dim = self.heads * self.head_dim
        w = attn.qkv.weight.detach()
        b = attn.qkv.bias.detach() if attn.qkv.bias is not None else None
        self.q, self.k, self.v = (nn.Linear(w.shape[1], dim, bias=b is not None) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                scale = attn.scale if i == 0 else 1.0
                lin.weight.copy_(w[i * dim:(i + 1) * dim] * scale)
                if b is not None:
                    lin.bias.copy_(b[i * dim:(i + 1) * dim] * scale)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def _split(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, n, self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("BmmAttention replaces unmasked self-attention only")
        b, n, _ = x.shape
        q, k, v = (self._split(f(x), b, n) for f in (self.q, self.k, self.v))
        attn = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        x = torch.bmm(attn, v).reshape(b, self.heads, n, self.head_dim).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


def _plain_timm_attention(module: nn.Module) -> bool:
    """timm's ViT ``Attention`` without the extras the rewrite does not carry (q/k norm, output norm, gate)."""
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:
        return False
    if type(module) is not Attention:
        return False
    extras = [getattr(module, name, None) for name in ("q_norm", "k_norm", "norm")]
    return all(e is None or isinstance(e, nn.Identity) for e in extras) and getattr(module, "gate", None) is None


def xnnpack_friendly(model: nn.Module) -> dict[str, int]:
    """Rewrite ``model`` in place (eval only); returns how many modules of each kind were replaced."""
    counts = {"layer_norm": 0, "attention": 0}

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(parent, name, LinearLayerNorm(child))
                counts["layer_norm"] += 1
            elif _plain_timm_attention(child):
                setattr(parent, name, BmmAttention(child))
                counts["attention"] += 1
            else:
                visit(child)

    visit(model)
    return counts
