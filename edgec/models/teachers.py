"""The teacher families edgec reads, each with a builder that writes a random-init model to disk in the
form a user brings it (a ``save_pretrained`` folder, or an open_clip checkpoint + architecture), locally,
with no hub and no network.

``tiny`` configurations feed the support-matrix tests (``tests/models/test_support_matrix.py``: every
family through intake, golden, ``compile --no-distill --target cpu`` and verify); ``real`` ones
(the published architectures' sizes) feed ``make bench-breadth``. Adding a family here adds both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# words the tiny word-level tokenizer of the SigLIP builds knows (prompts and the example's labels); others are <unk>
_WORDS = ("a photo of the an small large red green blue yellow purple orange white black circle square triangle "
          "star cross ring heart diamond hexagon shape picture thing").split()


@dataclass(frozen=True)
class Built:
    """What a builder wrote: the path to give edgec, the ``--arch`` it needs (open_clip), and how to call the
    source library's own forward on it (for the intake check)."""

    path: Path
    arch: str | None
    reference: Callable[[], tuple[Callable, Callable]]  # () -> (image fn (pixels), text fn (ids)), unnormalised


@dataclass(frozen=True)
class TeacherFamily:
    name: str
    description: str
    build: Callable[[Path, str], Built]  # (folder, "tiny" | "real") -> Built
    real: bool = True  # has a real-size build (bench-breadth)


def _clip_tokenizer(folder: Path) -> None:
    """CLIP's own BPE vocabulary (open_clip ships it) written as a Hugging Face tokenizer: offline."""
    import open_clip

    from .text_export import _open_clip_as_hf

    _open_clip_as_hf(open_clip.get_tokenizer("ViT-B-32")).save_pretrained(str(folder))


def _word_tokenizer(folder: Path, context: int) -> int:
    """A word-level fast tokenizer (tokenizer.json) with pad and eos tokens, padding to the right; returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *dict.fromkeys(_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=context)
    fast.save_pretrained(str(folder))
    return len(vocab)


def _hf_reference(folder: Path, cls_name: str):
    def reference():
        import transformers

        model = getattr(transformers, cls_name).from_pretrained(folder).eval()

        def pooled(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        return (lambda x: pooled(model.get_image_features(pixel_values=x)),
                lambda ids: pooled(model.get_text_features(input_ids=ids)))

    return reference


def build_hf_clip(folder: Path, size: str) -> Built:
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    if size == "real":
        config = CLIPConfig()  # ViT-B/32 image tower, 512-d text tower, 49408-token vocabulary
    else:
        config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "max_position_embeddings": 16},
                            vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                           "num_hidden_layers": 2, "num_attention_heads": 2}, projection_dim=24)
    torch.manual_seed(11)
    CLIPModel(config).eval().save_pretrained(folder)
    _clip_tokenizer(folder)
    return Built(folder, None, _hf_reference(folder, "CLIPModel"))


def build_hf_siglip(folder: Path, size: str) -> Built:
    from transformers import SiglipConfig, SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    if size == "real":
        config = SiglipConfig()  # ViT-B/16 towers, 768-d, 32000-token vocabulary, 64 tokens
    else:
        config = SiglipConfig(text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                           "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 12},
                              vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 2, "num_attention_heads": 2})
    torch.manual_seed(12)
    SiglipModel(config).eval().save_pretrained(folder)
    _word_tokenizer(folder, int(config.text_config.max_position_embeddings))
    return Built(folder, None, _hf_reference(folder, "SiglipModel"))


def _open_clip(folder: Path, name: str, arch_cfg: dict | None, seed: int) -> Built:
    """A random-init open_clip model saved as a plain state dict (safetensors); ``arch_cfg``: a model-config JSON."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    arch = name
    if arch_cfg is not None:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(arch_cfg))
        open_clip.add_model_config(path)
        arch = str(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    ckpt = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))

    def reference():
        ref = open_clip.create_model(name, pretrained=None).eval()
        from safetensors.torch import load_file

        ref.load_state_dict(load_file(str(ckpt)))
        return (lambda x: ref.encode_image(x), lambda ids: ref.encode_text(ids))

    return Built(ckpt, arch, reference)


_TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def build_open_clip_vit(folder: Path, size: str, *, real_arch: str = "ViT-B-32") -> Built:
    if size == "real":
        return _open_clip(folder, real_arch, None, 13)
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": _TINY_TEXT}
    return _open_clip(folder, "edgec-matrix-vit", cfg, 13)


def build_open_clip_convnext(folder: Path, size: str) -> Built:
    if size == "real":
        return _open_clip(folder, "convnext_tiny", None, 14)
    cfg = {"embed_dim": 24, "vision_cfg": {"timm_model_name": "test_convnext", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 32},
           "text_cfg": _TINY_TEXT}
    return _open_clip(folder, "edgec-matrix-convnext", cfg, 14)


def build_open_clip_resnet(folder: Path, size: str) -> Built:
    if size == "real":
        return _open_clip(folder, "RN50", None, 15)
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
           "text_cfg": _TINY_TEXT}
    return _open_clip(folder, "edgec-matrix-resnet", cfg, 15)


def build_edgec(folder: Path, size: str) -> Built:
    from ..data.preprocess import Preprocess
    from . import edgec_format
    from .edgec_clip import ClipSpec, EdgecClip, TextSpec, VisionSpec
    from .tokenizers import WordTokenizer

    if size == "real":
        raise ValueError("edgec checkpoints have no published real size (the example's teacher is one)")
    tok = WordTokenizer.build([" ".join(_WORDS)], context_length=8)
    spec = ClipSpec(embed_dim=16, vision=VisionSpec(image_size=32, patch_size=8, width=32, layers=2, heads=2, stem="conv"),
                    text=TextSpec(vocab_size=len(tok.vocab), context_length=8, width=32, layers=1, heads=2, eot_id=tok.eot_id))
    torch.manual_seed(16)
    model = EdgecClip(spec).eval()
    edgec_format.save(model, folder, preprocess=Preprocess(size=(32, 32)), tokenizer=tok, extra={"name": "matrix-edgec"})

    def reference():
        return (lambda x: model.visual(x), lambda ids: model.text(ids))

    return Built(folder, None, reference)


FAMILIES: dict[str, TeacherFamily] = {f.name: f for f in (
    TeacherFamily("hf-clip", "Hugging Face CLIPModel (save_pretrained folder; real: CLIPConfig() defaults)", build_hf_clip),
    TeacherFamily("hf-siglip", "Hugging Face SiglipModel (save_pretrained folder; real: SiglipConfig() defaults)",
                  build_hf_siglip),
    TeacherFamily("open_clip-vit", "open_clip ViT (checkpoint + --arch; real: ViT-B-32)", build_open_clip_vit),
    TeacherFamily("open_clip-convnext", "open_clip timm-tower ConvNeXt (real: convnext_tiny)", build_open_clip_convnext),
    TeacherFamily("open_clip-resnet", "open_clip ModifiedResNet (real: RN50)", build_open_clip_resnet),
    TeacherFamily("edgec", "edgec checkpoint folder (edgec_model.json + model.safetensors + vocab.json)", build_edgec,
                  real=False),
)}
