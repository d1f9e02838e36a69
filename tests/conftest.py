"""Shared fixtures: tiny random-weight models of every kind edgec reads, built once per session."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shapes-clip"


@pytest.fixture(scope="session")
def torch():
    import torch

    torch.manual_seed(0)
    return torch


def _tiny_edgec(folder: Path, torch) -> Path:
    from edgec.data.preprocess import Preprocess
    from edgec.models import edgec_format
    from edgec.models.edgec_clip import ClipSpec, EdgecClip, TextSpec, VisionSpec
    from edgec.models.tokenizers import WordTokenizer

    torch.manual_seed(1)
    tok = WordTokenizer.build(["a photo of a red circle", "a blue square"], context_length=8)
    spec = ClipSpec(
        embed_dim=16,
        vision=VisionSpec(image_size=32, patch_size=8, width=32, layers=2, heads=2, stem="conv"),
        text=TextSpec(vocab_size=len(tok.vocab), context_length=8, width=32, layers=1, heads=2, eot_id=tok.eot_id),
    )
    model = EdgecClip(spec).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    edgec_format.save(model, folder, preprocess=Preprocess(size=(32, 32)), tokenizer=tok, extra={"name": "tiny-edgec"})
    return folder


@pytest.fixture(scope="session")
def tiny_edgec(tmp_path_factory, torch) -> Path:
    return _tiny_edgec(tmp_path_factory.mktemp("edgec") / "tiny", torch)


def _clip_tokenizer_files(folder: Path) -> None:
    """A tiny but real CLIP BPE tokenizer: single characters only, no merges."""
    chars = list(string.ascii_lowercase + string.digits + ".,")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory, torch) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("hf") / "clip"
    folder.mkdir()
    _clip_tokenizer_files(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(2)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_siglip(tmp_path_factory, torch) -> Path:
    from transformers import SiglipConfig, SiglipModel

    folder = tmp_path_factory.mktemp("hf") / "siglip"
    torch.manual_seed(3)
    config = SiglipConfig(
        text_config={"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 12},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    SiglipModel(config).eval().save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory, torch) -> tuple[Path, Path]:
    """(checkpoint.pt, model-config.json) for a tiny open_clip CLIP."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    arch = folder / "edgec-tiny-clip.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(4)
    model = open_clip.create_model("edgec-tiny-clip", pretrained=None).eval()
    ckpt = folder / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return ckpt, arch


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """Small train (8 per class) / eval (5 per class) splits of the example data, plus odd-but-valid
    images (grayscale, RGBA, palette, CMYK, 16-bit) in train."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    for split, scale in (("train", "0.02"), ("eval", "0.2")):
        subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(root), "--splits", split,
                        "--scale", scale], check=True, capture_output=True)
    train = root / "train"
    rows = [json.loads(line) for line in (train / "captions.jsonl").read_text().splitlines()]
    odd = []
    for i, mode in enumerate(["L", "RGBA", "P", "CMYK", "I;16"]):
        src = Image.open(train / rows[i]["image"])
        img = src.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)
        name = f"odd_{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(train / name)
        odd.append({**rows[i], "image": name})
    with open(train / "captions.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in odd)
    return root


def expected_choice(selection: dict) -> str:
    """What 'fastest-passing' must ship: the first-listed passing precision, unless a later one is
    more than the tie margin faster (then the fastest of those)."""
    passing = [c for c in selection["candidates"] if c["passed"]]
    best = passing[0]
    for c in passing[1:]:
        if c["median_ms"] < best["median_ms"] * (1 - selection["tie_margin"]):
            best = c
    return best["precision"]


@pytest.fixture(scope="session")
def torch_free_venv(tmp_path_factory) -> Path:
    """A venv with the base install of this checkout (no extras, so no torch), built once per session;
    returns its bin/ folder. pip takes the base dependencies from its cache or the package index."""
    venv = tmp_path_factory.mktemp("torch-free") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True,
                             timeout=1200)
    assert install.returncode == 0, install.stderr[-2000:]
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0, "torch got installed"
    return venv / "bin"


def write_project(root: Path, data: Path, teacher: Path = EXAMPLE / "teacher", extra: str = "") -> Path:
    """An edgec.toml in ``root`` for the example teacher (or ``teacher``) on ``data`` (shapes_data), building into
    ``root/build`` with timm's tiny test student; ``extra`` is appended as TOML."""
    path = root / "edgec.toml"
    path.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(teacher))}",
        "[student]", 'name = "test_efficientnet"',
        "[data]", f"train = {json.dumps(str(data / 'train'))}", f"eval = {json.dumps(str(data / 'eval'))}",
        "[distill]", "epochs = 1", "batch_size = 16", "lr = 0.01",
        "[calibration]", f"path = {json.dumps(str(data / 'train'))}", "num_images = 32",
        "[targets]", f"out = {json.dumps(str(root / 'build'))}",
    ]) + "\n" + extra)
    return path
