"""edgec.toml: one typed section per stage, validated with the file and key in every message.

Relative paths in the file are relative to the file's folder. Unknown keys are errors (with a
did-you-mean), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError, InputError
from .schema import doc, from_dict, to_dict
from .verify.gates import parse_gate

CONFIG_VERSION = 1
DEFAULT_CONFIG = "edgec.toml"


@dataclass(frozen=True)
class ModelSection:
    path: str = doc(help="the trained multimodal model: edgec checkpoint folder, Hugging Face folder, or open_clip checkpoint")
    kind: Literal["auto", "edgec", "hf", "open_clip"] = doc("auto", help="how to read it; auto detects from the path")
    arch: str | None = doc(None, help="open_clip architecture name or model-config .json (open_clip only)")
    trust_pickle: bool = doc(False, help="allow pickled checkpoints (runs code from the file: only for sources you trust)")


@dataclass(frozen=True)
class StudentSection:
    name: str = doc("mobilevit_xxs", help="timm model name of the on-device image encoder")
    image_size: int | None = doc(None, help="student input side in pixels; default: the teacher's")
    targets: dict[str, str] = doc(help="a different student per target, e.g. { edgetpu = \"mobilenetv4_conv_small\" }",
                                  factory=dict)

    def __post_init__(self) -> None:
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 16 and 1024, got {self.image_size}")


@dataclass(frozen=True)
class DataSection:
    train: str | None = doc(None, help="image folder for distillation (class sub-folders and/or captions.jsonl)")
    eval: str | None = doc(None, help="image folder for golden outputs and verification")
    captions: str = doc("captions.jsonl", help="captions file name inside each folder")
    prompts: list[str] = doc(help="zero-shot prompt templates; {} is replaced by the class name",
                             factory=lambda: ["a photo of a {}."])
    max_bad_fraction: float = doc(0.05, help="share of undecodable images skipped before failing")

    def __post_init__(self) -> None:
        if not self.prompts or any("{}" not in p for p in self.prompts):
            raise ValueError("every prompt template must contain {} for the class name")
        if not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")


@dataclass(frozen=True)
class LossWeights:
    feature_cosine: float = doc(1.0, help="1 - cosine between student and teacher image embeddings")
    feature_mse: float = doc(0.0, help="MSE between normalised embeddings")
    contrastive_image: float = doc(0.0, help="CLIP-KD: student image vs teacher image embeddings of the batch")
    contrastive_text: float = doc(0.5, help="CLIP-KD: student image vs teacher caption embeddings of the batch "
                                            "(used only when the training folder has captions)")
    logit: float = doc(0.0, help="KL on zero-shot logits over the label prompts")

    def __post_init__(self) -> None:
        values = [self.feature_cosine, self.feature_mse, self.contrastive_image, self.contrastive_text, self.logit]
        if any(v < 0 for v in values) or sum(values) == 0:
            raise ValueError("loss weights must be >= 0 and not all 0")


@dataclass(frozen=True)
class DistillSection:
    epochs: int = doc(30, help="passes over the training images")
    batch_size: int = doc(64, help="images per step (global, across processes)")
    lr: float = doc(2e-3, help="peak AdamW learning rate")
    weight_decay: float = doc(0.05, help="AdamW weight decay")
    warmup_epochs: float = doc(1.0, help="linear warm-up before the cosine schedule")
    grad_clip: float = doc(1.0, help="gradient-norm clip; 0 turns it off")
    temperature: float = doc(2.0, help="softmax temperature of the logit loss")
    patience: int | None = doc(None, help="stop after this many epochs without eval improvement")
    seed: int = doc(0, help="seed for weights, sampling and augmentation")
    device: str = doc("auto", help="auto, cpu, cuda or cuda:N")
    augment: Literal["none", "light", "standard"] = doc(
        "none", help="student-side augmentation: light = random resized crop, standard = + horizontal flip")
    losses: LossWeights = doc(help="loss weights", factory=LossWeights)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class CalibrationSection:
    path: str | None = doc(None, help="calibration images: a folder, a text file of paths, or a captions.jsonl")
    num_images: int = doc(128, help="images sampled for calibration (seeded, stratified by label)")
    min_images: int = doc(16, help="fail when fewer decodable images than this are found")
    seed: int = doc(0, help="sampling seed")

    def __post_init__(self) -> None:
        if not 1 <= self.min_images <= self.num_images:
            raise ValueError("need 1 <= min_images <= num_images")


@dataclass(frozen=True)
class QuantizeSection:
    method: Literal["minmax", "percentile", "entropy", "auto", "histogram"] = doc(
        "auto", help="activation range calibration; auto: per backend the method measured best (onnx, litert: "
                     "minmax; executorch: histogram, torch's HistogramObserver); histogram: executorch only")
    percentile: float = doc(99.999, help="percentile for method = percentile")
    tolerance: float | None = doc(None, help="max zero-shot agreement loss vs float; sensitive layers fall back to float until it holds")

    def __post_init__(self) -> None:
        if not 90 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [90, 100], got {self.percentile}")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")


@dataclass(frozen=True)
class TargetsSection:
    build: list[str] = doc(help="targets that 'compile --target all' and 'release' build", factory=lambda: ["cpu"])
    out: str = doc("build", help="output folder")
    device: str | None = doc(None, help="device profile (devices/*.toml) to check constraints against")
    towers: list[Literal["image", "text"]] = doc(
        help="towers to compile: image, or image and text (the teacher's text tower, fp32, with its tokenizer files)",
        factory=lambda: ["image"])
    head: Literal["embedding", "zero-shot"] = doc(
        "embedding", help="zero-shot: also a variant with the label text embeddings folded in (logits out)")

    def __post_init__(self) -> None:
        if "image" not in self.towers or len(set(self.towers)) != len(self.towers):
            raise ValueError(f"towers must include 'image' once (and may add 'text'), got {self.towers}")


@dataclass(frozen=True)
class EdgecConfig:
    version: int = doc(CONFIG_VERSION, help="config schema version")
    model: ModelSection | None = doc(None, help="the trained model")
    student: StudentSection = doc(help="the on-device student", factory=StudentSection)
    data: DataSection = doc(help="image data", factory=DataSection)
    distill: DistillSection = doc(help="distillation", factory=DistillSection)
    calibration: CalibrationSection = doc(help="calibration set", factory=CalibrationSection)
    quantize: QuantizeSection = doc(help="quantization", factory=QuantizeSection)
    targets: TargetsSection = doc(help="targets", factory=TargetsSection)
    gates: dict[str, list[str]] = doc(help="verification gates per target ('default': targets without their own list; "
                                           "otherwise each target file's gates apply)", factory=dict)
    root: Path = field(default=Path("."), compare=False, metadata={"help": ""})

    def __post_init__(self) -> None:
        if self.version > CONFIG_VERSION:
            raise ValueError(f"version {self.version} is newer than this edgec understands ({CONFIG_VERSION})")
        for target, exprs in self.gates.items():
            for expr in exprs:
                parse_gate(expr)  # ValueError names the expression

    def resolve(self, path: str | None) -> Path | None:
        """A path from the file, relative to the file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def gates_for(self, target: str, target_defaults: list[str] | None = None) -> list[str]:
        """The target's own list, else 'default', else the target file's gates."""
        return list(self.gates.get(target) or self.gates.get("default") or target_defaults or [])

    def to_dict(self) -> dict:
        data = to_dict(self)
        data.pop("root", None)
        return data


def load_config(path: str | Path | None = None) -> EdgecConfig:
    """Read and validate ``path`` (default ``./edgec.toml``)."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise InputError(f"config file not found: {path}", hint="create one with 'edgec init' or pass --config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if "root" in data:
        raise ConfigError(f"{path}: root: unknown key 'root'")
    config = from_dict(EdgecConfig, data, source=str(path))
    return _with_root(config, path.resolve().parent)


def config_from_dict(data: dict, *, root: Path = Path("."), source: str = "<dict>") -> EdgecConfig:
    return _with_root(from_dict(EdgecConfig, data, source=source), root)


def _with_root(config: EdgecConfig, root: Path) -> EdgecConfig:
    object.__setattr__(config, "root", root)
    return config
