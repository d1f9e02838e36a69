"""Graph rewrites that keep a model's function and let a delegate take more of it.

XNNPACK (ExecuTorch 1.5) does not take ``native_layer_norm``, nor the ``select`` / ``expand`` /
``squeeze`` copies that a fused-qkv, 4-D ``q @ k.T`` attention exports to, so a MobileViT is cut
into ~49 delegate subgraphs with CPU-portable ops between them. Both rewrites below use only ops
XNNPACK delegates (linear, bmm, sub, mul, add, div, sqrt, softmax, reshape, transpose):

* :class:`LinearLayerNorm`: LayerNorm over the last dim, means computed as a linear layer with
  constant 1/C weights;
* :class:`BmmAttention`: timm's ``Attention`` with separate q/k/v linears (the scale folded into
  q) and 3-D ``bmm`` over (batch x heads);
* :class:`BmmMultiheadAttention`: the same for ``nn.MultiheadAttention`` (open_clip's ViT towers and
  attentional pooler) and open_clip's own plain ``Attention``. ``nn.MultiheadAttention`` exports (math
  path) to ``unflatten``/``select``/``squeeze`` copies around its packed projection and to the math
  attention's ``safe softmax`` (``eq``/``logical_not``/``any``/``where``/``full_like``), none of which
  XNNPACK takes: an open_clip ViT was cut into ~5 delegate subgraphs per block;
* :class:`BmmHFAttention`: the same for Hugging Face ``CLIPAttention`` and ``SiglipAttention`` (their
  default SDPA attention exports to that same safe softmax).

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


class BmmMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (either layout, packed or separate projections, masks, key padding,
    attention weights) as q/k/v linears with the scale folded into q, ``bmm`` over (batch x heads) and a
    plain softmax. Keeps the module's call signature and its ``(output, weights)`` result."""

    def __init__(self, mha: nn.MultiheadAttention | None = None, *, heads: int = 0, in_proj: tuple = (),
                 in_bias: torch.Tensor | None = None, out_proj: nn.Module | None = None, batch_first: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if mha is not None:
            e = mha.embed_dim
            heads, batch_first, out_proj, in_bias = mha.num_heads, mha.batch_first, mha.out_proj, mha.in_proj_bias
            if mha._qkv_same_embed_dim:
                in_proj = tuple(mha.in_proj_weight.detach()[i * e:(i + 1) * e] for i in range(3))
            else:
                in_proj = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        e = in_proj[0].shape[0]
        self.heads, self.head_dim, self.batch_first = heads, e // heads, batch_first
        scale = self.head_dim ** -0.5 if scale is None else scale
        self.q, self.k, self.v = (nn.Linear(w.shape[1], e, bias=in_bias is not None) for w in in_proj)
        with torch.no_grad():
            for i, (lin, w) in enumerate(zip((self.q, self.k, self.v), in_proj, strict=True)):
                s = scale if i == 0 else 1.0
                lin.weight.copy_(w * s)
                if in_bias is not None:
                    lin.bias.copy_(in_bias.detach()[i * e:(i + 1) * e] * s)
        self.out_proj = out_proj

    def _split(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, n, self.head_dim)

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if mask.dtype == torch.bool:  # True: not attended
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def attend(self, query, key, value, attn_mask=None, key_padding_mask=None, is_causal=False):
        """(B, L, E) inputs -> (B, L, E) output and (B, heads, L, S) attention weights."""
        b, n, _ = query.shape
        s = key.shape[1]
        q, k, v = self._split(self.q(query), b, n), self._split(self.k(key), b, s), self._split(self.v(value), b, s)
        scores = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = self._additive(attn_mask, scores.dtype)
            scores = scores + (mask if mask.dim() == 2 else mask.reshape(b * self.heads, n, s))
        if key_padding_mask is not None:
            pad = self._additive(key_padding_mask, scores.dtype).reshape(b, 1, 1, s).expand(b, self.heads, 1, s)
            scores = scores + pad.reshape(b * self.heads, 1, s)
        weights = scores.softmax(dim=-1)
        x = torch.bmm(weights, v).reshape(b, self.heads, n, self.head_dim).transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(x), weights.reshape(b, self.heads, n, s)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self.attend(query, key, value, attn_mask, key_padding_mask, is_causal)
        if unbatched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights


class BmmOpenClipAttention(BmmMultiheadAttention):
    """open_clip's own ``Attention`` (batch first, packed ``in_proj_weight``, ``forward(x, attn_mask)``)
    without scaled-cosine logits, q/k norms, head scales or the inner norm."""

    def __init__(self, attn: nn.Module) -> None:
        e = attn.out_proj.in_features
        w = attn.in_proj_weight.detach()
        super().__init__(heads=attn.num_heads, in_proj=tuple(w[i * e:(i + 1) * e] for i in range(3)),
                         in_bias=attn.in_proj_bias, out_proj=attn.out_proj, batch_first=True)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        if attn_mask is not None and attn_mask.dim() == 3:  # (B * heads, L, L) as open_clip's Attention reads it
            attn_mask = attn_mask.reshape(b * self.heads, n, n)
        return self.attend(x, x, x, attn_mask)[0]


class BmmHFAttention(BmmMultiheadAttention):
    """Hugging Face ``CLIPAttention`` / ``SiglipAttention`` (q/k/v/out projections, bidirectional; the attention
    function chosen by ``config._attn_implementation``, SDPA by default, whose math decomposition XNNPACK
    does not take). ``forward(hidden_states, attention_mask)`` -> ``(output, None)``; an additive
    (B, 1, L, S) mask as HF builds it."""

    def __init__(self, attn: nn.Module) -> None:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biased = all(p.bias is not None for p in projections)
        super().__init__(heads=attn.num_heads, in_proj=tuple(p.weight.detach() for p in projections),
                         in_bias=torch.cat([p.bias.detach() for p in projections]) if biased else None,
                         out_proj=attn.out_proj, batch_first=True, scale=attn.scale)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                **kwargs) -> tuple[torch.Tensor, None]:
        b, n, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attention_mask.expand(b, self.heads, n, n).reshape(b * self.heads, n, n)
        return self.attend(hidden_states, hidden_states, hidden_states, attention_mask)[0], None


class BmmAttentionPool2d(BmmMultiheadAttention):
    """open_clip ModifiedResNet's ``AttentionPool2d`` (functional ``multi_head_attention_forward`` over the
    mean token and the HxW tokens, output: the mean token's row) with the mean as a global average pool and
    only the one query row it returns computed. Its functional attention left per-channel dequantize ops
    outside XNNPACK in the int8 program, which ExecuTorch then could not lower (no out variant)."""

    def __init__(self, pool: nn.Module) -> None:
        projections = (pool.q_proj, pool.k_proj, pool.v_proj)
        super().__init__(heads=pool.num_heads, in_proj=tuple(p.weight.detach() for p in projections),
                         in_bias=torch.cat([p.bias.detach() for p in projections]), out_proj=pool.c_proj,
                         batch_first=True)
        self.positional_embedding = pool.positional_embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        mean = x.mean(dim=(2, 3), keepdim=True).reshape(b, 1, c)
        tokens = torch.cat([mean, x.reshape(b, c, h * w).transpose(1, 2)], dim=1) + self.positional_embedding
        query = mean + self.positional_embedding[:1]
        return self.attend(query, tokens, tokens)[0].reshape(b, -1)


def _open_clip_attention_pool(module: nn.Module) -> bool:
    return type(module).__name__ == "AttentionPool2d" and type(module).__module__ == "open_clip.modified_resnet"


_HF_ATTENTION = ("CLIPAttention", "SiglipAttention")


def _plain_hf_attention(module: nn.Module) -> bool:
    """HF CLIP/SigLIP attention without a causal flag, with all four projections as plain linears (bias all or none)."""
    if type(module).__name__ not in _HF_ATTENTION or not type(module).__module__.startswith("transformers."):
        return False
    projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if not all(type(p) is nn.Linear for p in projections) or getattr(module, "is_causal", True):
        return False
    return len({p.bias is None for p in projections[:3]}) == 1


def _plain_multihead_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention`` without the rarely used learned extra key/value (``add_bias_kv``) or zero
    attention row (``add_zero_attn``), which the rewrite does not carry."""
    return (isinstance(module, nn.MultiheadAttention) and module.bias_k is None and module.bias_v is None
            and not module.add_zero_attn)


def _plain_open_clip_attention(module: nn.Module) -> bool:
    try:
        from open_clip.transformer import Attention
    except ImportError:
        return False
    return (type(module) is Attention and module.logit_scale is None and module.head_scale is None
            and all(isinstance(getattr(module, n), nn.Identity) for n in ("ln_q", "ln_k", "ln_inner")))


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


def _plain_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


# (which modules, what replaces them, the count it adds to), tried in order; the first match wins
REWRITES = (
    (_plain_layer_norm, LinearLayerNorm, "layer_norm"),
    (_plain_timm_attention, BmmAttention, "attention"),
    (_plain_multihead_attention, BmmMultiheadAttention, "attention"),
    (_plain_open_clip_attention, BmmOpenClipAttention, "attention"),
    (_plain_hf_attention, BmmHFAttention, "attention"),
    (_open_clip_attention_pool, BmmAttentionPool2d, "attention"),
)


def xnnpack_friendly(model: nn.Module) -> dict[str, int]:
    """Rewrite ``model`` in place (eval only); returns how many modules of each kind were replaced."""
    counts = {"layer_norm": 0, "attention": 0}

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            rule = next(((make, kind) for matches, make, kind in REWRITES if matches(child)), None)
            if rule is None:
                visit(child)
                continue
            setattr(parent, name, rule[0](child))
            counts[rule[1]] += 1

    visit(model)
    return counts
