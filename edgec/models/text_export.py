"""The teacher's text tower in a form every converter takes: int32 token ids in, no ArgMax.

CLIP-style text towers pool the feature at the end-of-text (EOT) token. Their PyTorch code
finds that position with an int64 ``argmax`` + gather, which breaks LiteRT conversion and is
slow or unsupported on several runtimes. Here the position is found with float arithmetic
only: a 0/1 mask of the candidate positions, reduced to its first 1 with a constant
upper-triangular matmul (a prefix count), then a mask multiply-and-sum. Same result as the
gather, bit for bit, for every input the tokenizer produces.

Pooling rules, per model kind (checked against each library's code):

- edgec: the tower already pools with a one-hot mask of ``eot_id``; exported as it is.
- Hugging Face CLIP: first position of ``eos_token_id`` (or, for configs with the legacy
  ``eos_token_id == 2``, of the largest id); SigLIP: the last position (no argmax at all).
- open_clip: ``text_pool_type`` ``argmax`` (first position of the largest id, the EOT in
  CLIP's vocabulary), ``eos`` (first position of ``text_eos_id``), ``first`` or ``last``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .base import MultimodalModel

POOLS = ("eot", "max", "first", "last")


def first_one(mask: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """(N, L) 0/1 float -> the same with only the first 1 of each row kept (prefix count by matmul)."""
    prefix = mask @ upper  # prefix[:, j] = number of ones at positions <= j
    return mask * (2.0 - prefix).clamp(0.0, 1.0)


class PooledText(nn.Module):
    """``body`` (int32 ids -> hidden states (N, L, W)), EOT pooling by mask, then ``projection``."""

    def __init__(self, body: nn.Module, pool: str, context_length: int, *, eot_id: int | None = None,
                 projection: nn.Module | torch.Tensor | None = None) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "eot" and eot_id is None:
            raise ValueError("pool 'eot' needs eot_id")
        self.body = body
        self.pool = pool
        self.eot_id = eot_id
        if isinstance(projection, torch.Tensor):
            self.register_buffer("proj_matrix", projection.detach().clone(), persistent=False)
            self.projection = None
        else:
            self.proj_matrix = None
            self.projection = projection
        self.register_buffer("upper", torch.ones(context_length, context_length).triu(), persistent=False)

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) float pooling weights: one 1 per row."""
        n, length = ids.shape
        if self.pool in ("first", "last"):
            w = torch.zeros(length)
            w[0 if self.pool == "first" else length - 1] = 1.0
            return w.expand(n, length)
        f = ids.to(torch.float32)  # vocabulary ids are < 2**24: exact in float32
        if self.pool == "eot":
            mask = (f == float(self.eot_id)).to(torch.float32)
        else:
            mask = (f == f.amax(dim=-1, keepdim=True)).to(torch.float32)
        return first_one(mask, self.upper[:length, :length])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.body(ids)
        pooled = (x * self.weights(ids).unsqueeze(-1).to(x.dtype)).sum(dim=1)
        if self.proj_matrix is not None:
            return pooled @ self.proj_matrix
        return self.projection(pooled) if self.projection is not None else pooled


class _HFClipBody(nn.Module):
    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=ids).last_hidden_state


class _OpenClipBody(nn.Module):
    """open_clip's ``encode_text`` up to ``ln_final`` (CLIP class: the text tower lives on the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[: ids.shape[1]].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[: ids.shape[1], : ids.shape[1]])
        return m.ln_final(x)


class Normalized(nn.Module):
    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(ids), dim=-1)


def _unsupported(model: MultimodalModel, why: str) -> InputError:
    return InputError(f"the text tower of {model.name} ({model.kind}) cannot be exported: {why}",
                      hint="compile the image tower only (--towers image) and keep text embeddings from the head files")


def check_text_tower(model: MultimodalModel) -> None:
    """Refuse, before anything is built, a text tower the user asked for (``--towers image,text``) that this
    model cannot give: no text tower, no tokenizer, or no export rule for its pooling."""
    text_export_module(model)
    if model.tokenizer is None:
        raise _unsupported(model, "it has no tokenizer (" + "; ".join(model.notes) + ")")


def text_export_module(model: MultimodalModel, *, normalize: bool = True) -> tuple[nn.Module, dict]:
    """The teacher's text tower as an export-ready module taking int32 ids (N, context_length), and a
    record of how it pools (for the manifest). Output: the text embedding, L2-normalised when ``normalize``."""
    if model.text_encoder is None or not model.context_length:
        raise _unsupported(model, "it has no text tower")
    L = int(model.context_length)
    enc = model.text_encoder
    if model.kind == "edgec":
        tower, info = enc, {"pool": "eot", "eot_id": int(enc.spec.eot_id), "how": "one-hot mask of eot_id (edgec tower)"}
    elif model.kind == "hf-clip":
        text_model = enc.encoder
        eos = int(text_model.eos_token_id)
        pool = "max" if eos == 2 else "eot"
        tower = PooledText(_HFClipBody(text_model), pool, L, eot_id=eos if pool == "eot" else None, projection=enc.projection)
        info = {"pool": pool, "eot_id": eos if pool == "eot" else None,
                "how": "first position of eos_token_id" if pool == "eot" else "first position of the largest id (legacy eos_token_id 2)"}
    elif model.kind == "hf-siglip":
        tower, info = enc, {"pool": "last", "eot_id": None, "how": "last position (SigLIP)"}
    elif model.kind == "open_clip":
        m = getattr(enc, "model", None)
        if m is None or not all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise _unsupported(model, "only open_clip's CLIP class (text tower on the model) is supported, "
                                      f"not {type(m).__name__}")
        pool_type = getattr(m, "text_pool_type", "argmax")
        pools = {"argmax": "max", "eos": "eot", "first": "first", "last": "last"}
        if pool_type not in pools:
            raise _unsupported(model, f"text_pool_type {pool_type!r} is not one of {sorted(pools)}")
        pool = pools[pool_type]
        eot = getattr(m, "text_eos_id", None) if pool == "eot" else None
        proj = m.text_projection
        tower = PooledText(_OpenClipBody(m), pool, L, eot_id=eot, projection=proj)
        info = {"pool": pool, "eot_id": eot, "how": f"open_clip text_pool_type {pool_type!r} as a mask"}
    else:
        raise _unsupported(model, f"no export rule for model kind {model.kind!r}")
    module = Normalized(tower) if normalize else tower
    info.update({"context_length": L, "normalized": normalize})
    return module.eval(), info


def ship_tokenizer(model: MultimodalModel, folder: Path, *, check: list[str]) -> dict:
    """Write what ``model``'s tokenizer needs on the device into ``folder`` (the target's ``tokenizer/``)
    and return the manifest's tokenisation contract. The shipped files are re-read with the torch-free
    runtime tokenizer and must give the teacher's ids for every text in ``check`` (the label prompts and
    captions), else :class:`InputError`."""
    import json

    from ..runtime.tokenize import WORD_PATTERN, WordTokenizer, load_tokenizer
    from .tokenizers import HFTokenizer, OpenClipTokenizer

    if model.tokenizer is None:
        raise _unsupported(model, "it has no tokenizer (" + "; ".join(model.notes) + ")")
    folder.mkdir(parents=True, exist_ok=True)
    tok, L = model.tokenizer, int(model.context_length)
    if isinstance(tok, WordTokenizer):
        (folder / "vocab.json").write_text(json.dumps(tok.vocab), encoding="utf-8")
        record = {"kind": "word", "vocab": "vocab.json", "lowercase": True, "word_pattern": WORD_PATTERN,
                  "sot_id": tok.index["<sot>"], "eot_id": tok.eot_id, "pad_id": tok.index["<pad>"], "unk_id": tok.index["<unk>"],
                  "layout": "<sot> words... <eot> <pad>...; words beyond context_length - 2 are dropped"}
    elif isinstance(tok, HFTokenizer | OpenClipTokenizer):
        hf = getattr(tok.tokenizer, "tokenizer", None) if isinstance(tok, OpenClipTokenizer) else tok.tokenizer
        if hf is None and isinstance(tok, OpenClipTokenizer):
            hf = _open_clip_as_hf(tok.tokenizer)
        hf.save_pretrained(str(folder))
        if not (folder / "tokenizer.json").is_file():
            raise _unsupported(model, f"its tokenizer ({type(hf).__name__}) cannot be written as tokenizer.json")
        pad_id = 0 if isinstance(tok, OpenClipTokenizer) else hf.pad_token_id
        if pad_id is None:
            raise _unsupported(model, "its tokenizer has no pad token, and the text tower takes fixed-length ids")
        record = {"kind": "tokenizers", "file": "tokenizer.json", "pad_id": int(pad_id),
                  "pad_token": hf.convert_ids_to_tokens(int(pad_id)),
                  "bos_id": getattr(hf, "bos_token_id", None), "eos_id": getattr(hf, "eos_token_id", None),
                  "layout": "normalizer, pre-tokenizer and special tokens as tokenizer.json says; truncated to "
                            "context_length, padded to it with pad_id"}
    else:
        raise _unsupported(model, f"no device tokenizer for {type(tok).__name__}")
    record.update({"folder": folder.name, "context_length": L, "dtype": "int32",
                   "files": sorted(p.name for p in folder.iterdir() if p.is_file())})
    host = load_tokenizer(folder.parent, record)
    ours, ref = host(check), tok(check)
    bad = [t for t, a, b in zip(check, ours, ref, strict=True) if not (a == b).all()]
    if bad:
        raise _unsupported(model, f"the shipped tokenizer files give other ids than the teacher's tokenizer for "
                                  f"{len(bad)} of {len(check)} texts (first: {bad[0]!r})")
    record["checked_texts"] = len(check)
    return record


def _open_clip_as_hf(simple):
    """open_clip's SimpleTokenizer (CLIP byte-level BPE) as a Hugging Face CLIP tokenizer with the same
    vocabulary, merges and special tokens; checked against it by the caller."""
    from transformers import CLIPTokenizer

    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    sot, eot = simple.decoder[simple.sot_token_id], simple.decoder[simple.eot_token_id]
    # pad_token must not be id 0 ('!'): an added token would capture every '!' in the text; the host pads
    # with id 0 as open_clip does (the manifest's pad_id), whatever the HF object calls its pad token
    return CLIPTokenizer(vocab=dict(simple.encoder), merges=merges, bos_token=sot, eos_token=eot, unk_token=eot,
                         pad_token=eot)
