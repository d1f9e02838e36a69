"""Hugging Face ``CLIPModel`` / ``SiglipModel`` folders written by ``save_pretrained``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from ..errors import InputError, require_module
from .base import MultimodalModel, check_one_space
from .tokenizers import HFTokenizer

SUPPORTED = {"clip": "CLIPModel", "siglip": "SiglipModel"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class HFTower(nn.Module):
    """One tower of a HF dual encoder: encoder's pooled output, then its projection if any."""

    def __init__(self, encoder: nn.Module, projection: nn.Module | None, arg: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.arg = arg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder(**{self.arg: x}).pooler_output
        return self.projection(pooled) if self.projection is not None else pooled


def _preprocess(folder: Path, model_type: str, image_size: int) -> Preprocess:
    siglip = model_type == "siglip"
    default = Preprocess(
        size=(image_size, image_size),
        mean=(0.5, 0.5, 0.5) if siglip else OPENAI_MEAN,
        std=(0.5, 0.5, 0.5) if siglip else OPENAI_STD,
        resize="bicubic",
        crop="none" if siglip else "center",
    )
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})") from None
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", False) else None
    size = crop or cfg.get("size") or {}
    if "height" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    else:
        hw = default.size
    return Preprocess(
        size=hw,
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        resize=_PIL_RESAMPLE.get(cfg.get("resample"), default.resize),
        crop="center" if crop else "none",
    )


def load(folder: str | Path) -> MultimodalModel:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{folder / 'config.json'} is not valid JSON ({exc.msg})", hint="the model folder is corrupt") from None
    except UnicodeDecodeError:
        raise InputError(f"{folder / 'config.json'} is not UTF-8 text", hint="the model folder is corrupt") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'} is a JSON {type(config).__name__}, not an object",
                         hint="point at a folder written by save_pretrained") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise InputError(f"{folder}: Hugging Face model_type {model_type!r} is not a supported dual encoder",
                         hint=f"edgec reads {', '.join(SUPPORTED)} folders")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise InputError(f"{folder}: Hugging Face folder has config.json but no weights ({WEIGHT_FILES[0]})",
                         hint="save the model with model.save_pretrained(folder)")
    transformers = require_module("transformers", install="'edgec[compile]'", purpose="reading a Hugging Face model")
    cls = getattr(transformers, SUPPORTED[model_type])
    try:
        model = cls.from_pretrained(folder, local_files_only=True).eval()
    except pickle.UnpicklingError as exc:  # transformers reads pytorch_model.bin with weights_only=True
        weights = folder / "pytorch_model.bin"
        raise InputError(f"{weights} holds pickled Python objects, not only tensors ({str(exc).splitlines()[0][:100]})",
                         hint="save the model with save_pretrained(folder, safe_serialization=True)") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot load {folder} as {cls.__name__}: {str(exc).splitlines()[0]}",
                         hint="the weights are corrupt or do not match config.json") from None

    if model_type == "clip":
        image = HFTower(model.vision_model, model.visual_projection, "pixel_values")
        text = HFTower(model.text_model, model.text_projection, "input_ids")
        widths = {"image": int(model.visual_projection.out_features), "text": int(model.text_projection.out_features)}
    else:
        # SigLIP has no projection: the image embedding is the vision tower's pooled (attention-pooling
        # head) output, vision_config.hidden_size wide; the text embedding is the text tower's head
        # output, text_config.projection_size wide (hidden_size when unset)
        if not getattr(model.config.vision_config, "vision_use_head", True):
            raise InputError(f"{folder}: SiglipModel with vision_use_head = false has no pooled image embedding",
                             hint="edgec reads SigLIP models whose vision tower has its attention-pooling head")
        image = HFTower(model.vision_model, None, "pixel_values")
        text = HFTower(model.text_model, None, "input_ids")
        tc = model.config.text_config
        widths = {"image": int(model.config.vision_config.hidden_size),
                  "text": int(getattr(tc, "projection_size", None) or tc.hidden_size)}
    check_one_space(folder / "config.json", widths)
    embed_dim = widths["image"]
    context = int(model.config.text_config.max_position_embeddings)

    notes, tokenizer = [], None
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), context)
        except (OSError, ValueError, ImportError) as exc:
            notes.append(f"tokenizer files present but not loadable: {str(exc).splitlines()[0]}")
    else:
        notes.append("no tokenizer files in the folder: save the processor with save_pretrained too")

    bias = getattr(model, "logit_bias", None)
    return MultimodalModel(
        kind=f"hf-{model_type}",
        source=folder,
        name=config.get("_name_or_path") or folder.name,
        image_encoder=image,
        text_encoder=text,
        tokenizer=tokenizer,
        preprocess=_preprocess(folder, model_type, int(model.config.vision_config.image_size)),
        embed_dim=int(embed_dim),
        context_length=context,
        logit_scale=float(model.logit_scale.detach().exp()),
        logit_bias=float(bias.detach()) if bias is not None else None,
        notes=notes,
        token_table=int(model.text_model.embeddings.token_embedding.num_embeddings),
    )
