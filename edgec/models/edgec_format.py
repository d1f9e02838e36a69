"""edgec's own checkpoint: a folder with JSON architecture, safetensors weights, vocabulary.

    teacher/
      edgec_model.json   format, architecture, preprocessing, tokenizer, weights' sha256
      model.safetensors  every tensor, no pickle
      vocab.json         the tokenizer's vocabulary

Loading checks the weights' sha256 before reading them, so a truncated or altered file is
refused with a clear message rather than loaded half-way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data.preprocess import Preprocess
from ..errors import InputError
from ..manifest import atomic_write_json, inside, sha256_file, staged_dir
from .base import MultimodalModel
from .edgec_clip import ClipSpec, EdgecClip
from .tokenizers import WordTokenizer

CONFIG_FILE = "edgec_model.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
FORMAT = "edgec-clip"
FORMAT_VERSION = 1


def is_edgec_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def save(model: EdgecClip, folder: str | Path, *, preprocess: Preprocess, tokenizer: WordTokenizer,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an edgec checkpoint folder, atomically (all files or none)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with staged_dir(folder) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic_write_json(tmp / VOCAB_FILE, tokenizer.vocab)
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "architecture": model.spec.to_json(),
            "logit_scale": float(model.logit_scale.detach()),
            "preprocess": preprocess.to_json(),
            "tokenizer": {"kind": "word", "vocab": VOCAB_FILE, "context_length": tokenizer.context_length},
            "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            **(extra or {}),
        }
        atomic_write_json(tmp / CONFIG_FILE, config)
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} is missing: {path}", hint="the checkpoint folder is incomplete; copy it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", hint="the checkpoint is corrupt; copy it again") from None


def load(folder: str | Path) -> MultimodalModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_json(folder / CONFIG_FILE, "edgec model config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise InputError(f"{folder / CONFIG_FILE}: not an edgec checkpoint (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if cfg.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{folder}: checkpoint format version {cfg['version']} is newer than this edgec reads ({FORMAT_VERSION})",
                         hint="upgrade edgec")
    try:
        spec = ClipSpec.from_json(cfg["architecture"])
        preprocess = Preprocess.from_json(cfg["preprocess"])
        tok_cfg = cfg["tokenizer"]
        weights = inside(folder, cfg.get("weights", WEIGHTS_FILE), str(folder / CONFIG_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder / CONFIG_FILE}: invalid or missing entry ({exc})", hint="the checkpoint is corrupt") from None
    if not weights.is_file():
        raise InputError(f"weights file missing: {weights}", hint="the checkpoint folder is incomplete; copy it again")
    expected = cfg.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise InputError(f"{weights} does not match the sha256 recorded in {CONFIG_FILE} (truncated or altered)",
                         hint="copy the checkpoint again")
    vocab = _read_json(inside(folder, tok_cfg.get("vocab", VOCAB_FILE), str(folder / CONFIG_FILE)), "tokenizer vocabulary")
    tokenizer = WordTokenizer(vocab, int(tok_cfg["context_length"]))
    if spec.text.vocab_size != len(vocab) or spec.text.eot_id != tokenizer.eot_id:
        raise InputError(f"{folder}: vocabulary ({len(vocab)} words) does not match the text tower ({spec.text.vocab_size})")

    model = EdgecClip(spec, float(cfg.get("logit_scale", math.log(100))))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"cannot read {weights}: {exc}", hint="the file is corrupt; copy the checkpoint again") from None
    missing, unexpected = _check_state(model, state)
    if missing or unexpected:
        raise InputError(f"{weights} does not match the architecture in {CONFIG_FILE}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state)
    model.eval()
    return MultimodalModel(
        kind="edgec",
        source=folder,
        name=cfg.get("name", folder.name),
        image_encoder=model.visual,
        text_encoder=model.text,
        tokenizer=tokenizer,
        preprocess=preprocess,
        embed_dim=spec.embed_dim,
        context_length=tokenizer.context_length,
        logit_scale=float(model.logit_scale.detach().exp()),
    )


def _check_state(model, state) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    return missing + wrong, unexpected
