"""The one interface every trained multimodal model is seen through."""

from __future__ import annotations

import contextlib
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
    token_table: int | None = None  # rows of the text tower's token embedding table (ids must stay below)

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


def check_one_space(source, widths: dict[str, int]) -> None:
    """The towers of a dual encoder must land in one embedding space: refuse a model whose towers give
    embeddings of different widths (``widths``: tower -> output width), naming both."""
    if len(set(widths.values())) > 1:
        from ..errors import InputError

        shown = " but ".join(f"the {t} tower gives {w}-d embeddings" for t, w in widths.items())
        raise InputError(f"{source}: {shown}: the towers do not share one embedding space, so image and text "
                         "embeddings cannot be compared", hint="give a dual encoder whose towers project to the same width")


def check_vocabulary(model: MultimodalModel) -> None:
    """Every id the tokenizer can emit must index the text tower's token embedding table: refuse a model
    whose tokenizer is larger than the table (it would fail with an index error on the first rare word)."""
    if model.tokenizer is None or model.token_table is None:
        return
    size = getattr(model.tokenizer, "vocab_size", None)
    if size is None:
        size = len(getattr(model.tokenizer, "vocab", ()) or ()) or None
    if size is not None and size > model.token_table:
        from ..errors import InputError

        raise InputError(f"{model.source}: the tokenizer has {size} tokens but the text tower's token embedding "
                         f"table has {model.token_table} rows, so ids {model.token_table}..{size - 1} would index "
                         "past it", hint="give the model the tokenizer it was trained with, or the vocab_size "
                                         "it was trained with in its model config")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# PyTorch modules with an inference "fast path" (a fused native kernel, taken under no_grad in eval
# mode): exporters cannot convert it (aten::_native_multi_head_attention) and FLOP counters do not see
# inside it. torch.backends.mha's flag turns it off; :func:`plain_attention` makes such modules take
# the plain math path on every call, whoever calls them.
FAST_PATH_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


@contextlib.contextmanager
def attention_math_path():
    """Within this block nn.MultiheadAttention and nn.TransformerEncoder(Layer) compute with plain ops."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _fast_path_off(module: nn.Module, args) -> None:
    module._edgec_fastpath_stack.append(torch.backends.mha.get_fastpath_enabled())
    torch.backends.mha.set_fastpath_enabled(False)


def _fast_path_restore(module: nn.Module, args, output) -> None:
    torch.backends.mha.set_fastpath_enabled(module._edgec_fastpath_stack.pop())


def plain_attention(module: nn.Module) -> nn.Module:
    """Make every fast-path module inside ``module`` compute with plain ops (same numbers to float
    rounding), so that export, MAC counting and the eager forward all see one graph. Idempotent."""
    for m in module.modules():
        if isinstance(m, FAST_PATH_MODULES) and not hasattr(m, "_edgec_fastpath_stack"):
            m._edgec_fastpath_stack = []
            m.register_forward_pre_hook(_fast_path_off)
            m.register_forward_hook(_fast_path_restore, always_call=True)
    return module


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q K^T) V: two batched matmuls (the CPU kernels have no formula in PyTorch's counter)."""
    *batch, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    b = 1
    for d in batch:
        b *= d
    return 2 * b * s_q * s_k * d_qk + 2 * b * s_q * s_k * d_v


def _sdpa_ops() -> dict:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(aten, n): _sdpa_flops for n in names if hasattr(aten, n)}


def _classified(registry: dict, weights: set[int], kinds: dict[str, int]) -> dict:
    """The FLOP formulas of ``registry``, each also adding its count to ``kinds["weight_layers"]`` when one of its
    operands (the first three positional arguments: input and weight of a convolution, bias and factors of an
    addmm, q/k/v of an attention kernel, not its mask) is a parameter or buffer of the module (same storage:
    views and transposes included), else to ``kinds["attention_matmuls"]`` (matmuls of two activations)."""
    def wrap(formula):
        def raw(*args, out_val=None, **kwargs):
            flops = formula(*args, out_val=out_val, **kwargs)
            operands = [t for t in args[:3] if isinstance(t, torch.Tensor)]
            on_weights = any(t.untyped_storage().data_ptr() in weights for t in operands)
            kinds["weight_layers" if on_weights else "attention_matmuls"] += int(flops)
            return flops

        raw._get_raw = True  # the counter passes tensors, not shapes
        return raw

    return {op: wrap(f) for op, f in registry.items()}


def count_mac_split(module: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of one forward pass (as :func:`count_macs`) split into ``weight_layers`` (convolutions and linears:
    one operand is a weight) and ``attention_matmuls`` (both operands are activations: Q K^T and A V, the
    part a weights-only count such as fvcore's leaves out), with their ``total``."""
    return count_macs(module, example, split=True)


def count_macs(module: nn.Module, example: torch.Tensor, *, by_op: bool = False, split: bool = False):
    """Multiply-accumulates of one forward pass (PyTorch's FLOP counter / 2), on the plain math path of
    attention (what an exported graph computes), attention's two matmuls included. ``by_op``: also the
    MACs per ATen op (convolution, addmm, mm, bmm, sdpa...). ``split``: a dict, see :func:`count_mac_split`."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper

    was_training = module.training
    module.eval()
    custom = _sdpa_ops()
    kinds = {"weight_layers": 0, "attention_matmuls": 0}
    if split:
        weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        registry = {**flop_registry, **{op: shape_wrapper(f) for op, f in custom.items()}}
        custom = _classified(registry, weights, kinds)
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with counter, torch.inference_mode(), attention_math_path():
        module(example)
    module.train(was_training)
    total = int(counter.get_total_flops() // 2)
    if split:
        return {"total": total, **{k: v // 2 for k, v in kinds.items()}}
    if not by_op:
        return total
    per_op = {str(op).replace("aten.", ""): int(v // 2) for op, v in counter.get_flop_counts().get("Global", {}).items()}
    return total, per_op
