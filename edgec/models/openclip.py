"""open_clip models: an architecture (registered name or model-config JSON) + a local checkpoint."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from ..errors import InputError, UnknownNameError, did_you_mean, require_module
from .base import MultimodalModel, check_one_space, count_params
from .tokenizers import OpenClipTokenizer

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class _Method(nn.Module):
    """A tower given by a method of the whole model (``encode_text``), e.g. for open_clip's CLIP."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x, normalize=False)


def read_checkpoint(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch checkpoint; pickles only with ``trust_pickle``."""
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}", hint="check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"cannot read {path}: {exc}", hint="the checkpoint is corrupt or truncated") from None
    else:
        from ..trust import pickle_trusted, refusal_hint

        try:
            # full unpickling (code execution) only when the person running edgec trusts this file's
            # sha256 (--trust-pickle or $EDGEC_TRUST_PICKLE; never a config file: edgec.trust)
            trusted = trust_pickle or pickle_trusted(path)
            state = torch.load(path, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as exc:
            raise InputError(f"{path} holds pickled Python objects, not only tensors ({str(exc).splitlines()[0][:120]})",
                             hint=refusal_hint(path)) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InputError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:160]}",
                             hint="the file is corrupt or truncated; copy it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} is not a state dict of tensors", hint="save model.state_dict() with torch.save or safetensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _resolve_arch(open_clip, arch: str) -> str:
    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    known = open_clip.list_models()
    if arch not in known:
        raise UnknownNameError(f"unknown open_clip architecture {arch!r}",
                               hint=f"{did_you_mean(arch, known)}; or give a model-config .json file")
    return arch


def load(checkpoint: str | Path, arch: str, *, trust_pickle: bool = False) -> MultimodalModel:
    open_clip = require_module("open_clip", install="'edgec[compile]'", purpose="reading an open_clip model")
    checkpoint = Path(checkpoint)
    name = _resolve_arch(open_clip, arch)
    state = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    model = open_clip.create_model(name, pretrained=None, load_weights=False).eval()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{checkpoint} does not match open_clip architecture {name!r}: {str(exc).splitlines()[1].strip()[:200]}",
                         hint="pass the --arch the checkpoint was trained with") from None

    check_one_space(f"open_clip architecture {name!r}", _tower_widths(model))
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    preprocess = Preprocess(
        size=hw,
        mean=tuple(cfg.get("mean", OPENAI_MEAN)),
        std=tuple(cfg.get("std", OPENAI_STD)),
        resize=cfg.get("interpolation", "bicubic"),
        crop="none" if cfg.get("resize_mode", "shortest") == "squash" else "center",
    )
    context = int(getattr(model, "context_length", 77))
    notes, tokenizer = [], None
    try:
        tokenizer = OpenClipTokenizer(open_clip.get_tokenizer(name), context)
    except Exception as exc:  # noqa: BLE001 - HF-hub tokenizers fail offline in many ways
        notes.append(f"tokenizer not available offline: {str(exc).splitlines()[0][:120]}")

    image = model.visual
    text = _Method(model, "encode_text")
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    embed_dim = int(model.encode_image(torch.zeros(1, 3, *hw)).shape[-1]) if not hasattr(model, "embed_dim") else int(model.embed_dim)
    extra = (scale.numel() if scale is not None else 0) + (bias.numel() if bias is not None else 0)
    return MultimodalModel(
        kind="open_clip",
        source=checkpoint,
        name=name,
        image_encoder=image,
        text_encoder=text,
        tokenizer=tokenizer,
        preprocess=preprocess,
        embed_dim=embed_dim,
        context_length=context,
        logit_scale=float(scale.detach().exp()) if scale is not None else 100.0,
        logit_bias=float(bias.detach()) if bias is not None else None,
        notes=notes,
        param_counts={"image": count_params(image), "text": count_params(model) - count_params(image) - extra},
        token_table=_token_table(model),
    )


def _tower_widths(model: nn.Module) -> dict[str, int]:
    """Output width of each tower, where the architecture states it (image: ``output_dim``; text: the
    projection's output width)."""
    widths = {}
    out = getattr(model.visual, "output_dim", None)
    if isinstance(out, int):
        widths["image"] = out
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor) and proj.dim() == 2:
        widths["text"] = int(proj.shape[1])
    elif isinstance(proj, nn.Linear):
        widths["text"] = int(proj.out_features)
    return widths


def _token_table(model: nn.Module) -> int | None:
    """Rows of the text tower's token embedding (open_clip's CLIP: ``token_embedding``; custom text towers:
    their first nn.Embedding)."""
    table = getattr(model, "token_embedding", None)
    if isinstance(table, nn.Embedding):
        return int(table.num_embeddings)
    text = getattr(model, "text", None)
    first = next((m for m in text.modules() if isinstance(m, nn.Embedding)), None) if text is not None else None
    return int(first.num_embeddings) if first is not None else None
