"""edgec.toml: one typed section per stage, validated with the file and key in every message.

Relative paths in the file are relative to the file's folder. Unknown keys are errors (with a
did-you-mean), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError, InputError
from .schema import check_ranges, doc, from_dict, to_dict
from .verify.gates import parse_gate

CONFIG_VERSION = 1
DEFAULT_CONFIG = "edgec.toml"


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def check_device(value: str, key: str = "device") -> str:
    """auto, cpu, mps, cuda or cuda:N; anything else is refused here rather than deep inside torch."""
    if not _DEVICE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a device", hint="use auto, cpu, cuda or cuda:N (or mps)")
    return value


@dataclass(frozen=True)
class ModelSection:
    path: str = doc(help="the trained multimodal model: edgec checkpoint folder, Hugging Face folder, or open_clip checkpoint")
    kind: Literal["auto", "edgec", "hf", "open_clip"] = doc("auto", help="how to read it; auto detects from the path")
    arch: str | None = doc(None, help="open_clip architecture name or model-config .json (open_clip only)")

    @property
    def trust_pickle(self) -> bool:
        """Never from a file: a config arrives in pull requests. Unpickling is allowed only by
        --trust-pickle or $EDGEC_TRUST_PICKLE, pinned to the checkpoint's sha256 (see edgec.trust)."""
        return False


@dataclass(frozen=True)
class StudentSection:
    name: str = doc("mobilevit_xxs", help="timm model name of the on-device image encoder")
    image_size: int | None = doc(None, help="student input side in pixels; default: the teacher's", min=16, max=1024)
    targets: dict[str, str] = doc(help="a different student per target, e.g. { edgetpu = \"mobilenetv4_conv_small\" }",
                                  factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class DataSection:
    train: str | None = doc(None, help="image folder for distillation (class sub-folders and/or captions.jsonl)")
    eval: str | None = doc(None, help="image folder for golden outputs and verification")
    captions: str = doc("captions.jsonl", help="captions file name inside each folder")
    prompts: list[str] = doc(help="zero-shot prompt templates; {} is replaced by the class name",
                             factory=lambda: ["a photo of a {}."])
    max_bad_fraction: float = doc(0.05, help="share of undecodable images skipped before failing", min=0, max=0.99)

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.prompts or any("{}" not in p for p in self.prompts):
            raise ValueError("every prompt template must contain {} for the class name")
        if not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")


@dataclass(frozen=True)
class LossWeights:
    feature_cosine: float = doc(1.0, help="1 - cosine between student and teacher image embeddings", min=0, max=100)
    feature_mse: float = doc(0.0, help="MSE between normalised embeddings", min=0, max=100)
    contrastive_image: float = doc(0.0, help="CLIP-KD: student image vs teacher image embeddings of the batch",
                                   min=0, max=100)
    contrastive_text: float = doc(0.5, help="CLIP-KD: student image vs teacher caption embeddings of the batch "
                                            "(used only when the training folder has captions)", min=0, max=100)
    logit: float = doc(0.0, help="KL on zero-shot logits over the label prompts", min=0, max=100)

    def __post_init__(self) -> None:
        check_ranges(self)
        values = [self.feature_cosine, self.feature_mse, self.contrastive_image, self.contrastive_text, self.logit]
        if any(v < 0 for v in values) or sum(values) == 0:
            raise ValueError("loss weights must be >= 0 and not all 0")


@dataclass(frozen=True)
class DistillSection:
    epochs: int = doc(30, help="passes over the training images", min=1, max=10_000)
    batch_size: int = doc(64, help="images per step (global, across processes)", min=1, max=65_536)
    lr: float = doc(2e-3, help="peak AdamW learning rate", above=0, max=10)
    weight_decay: float = doc(0.05, help="AdamW weight decay", min=0, max=1)
    warmup_epochs: float = doc(1.0, help="linear warm-up before the cosine schedule (in epochs; a run no longer "
                                         "than this is all warm-up)", min=0, max=10_000)
    grad_clip: float = doc(1.0, help="gradient-norm clip; 0 turns it off", min=0, max=10_000)
    temperature: float = doc(2.0, help="softmax temperature of the logit loss", above=0, max=100)
    patience: int | None = doc(None, help="stop after this many epochs without eval improvement", min=1, max=10_000)
    seed: int = doc(0, help="seed for weights, sampling and augmentation", min=0, max=2**32 - 1)
    device: str = doc("auto", help="auto, cpu, cuda or cuda:N")
    augment: Literal["none", "light", "standard"] = doc(
        "none", help="student-side augmentation: light = random resized crop, standard = + horizontal flip")
    teacher_views: int = doc(1, help="teacher embeddings cached per training image: view 0 as it is, the others "
                                     "augmented as 'augment' says; the student trains on the same views (1: the "
                                     "teacher sees un-augmented images only)", min=1, max=64)
    workers: int | None = doc(None, help="data loader worker processes (default: the free cores, at most 8); "
                                         "does not change the result", min=0, max=256)
    losses: LossWeights = doc(help="loss weights", factory=LossWeights)

    def __post_init__(self) -> None:
        check_ranges(self)
        if not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (or mps), got {self.device!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if not 1 <= self.teacher_views <= 64:
            raise ValueError(f"teacher_views must be in [1, 64], got {self.teacher_views}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class CalibrationSection:
    path: str | None = doc(None, help="calibration images: a folder, a text file of paths, or a captions.jsonl")
    num_images: int = doc(128, help="images sampled for calibration (seeded, stratified by label)", min=1, max=100_000)
    min_images: int = doc(16, help="fail when fewer decodable images than this are found", min=1, max=100_000)
    seed: int = doc(0, help="sampling seed", min=0, max=2**32 - 1)

    def __post_init__(self) -> None:
        check_ranges(self)
        if not 1 <= self.min_images <= self.num_images:
            raise ValueError("need 1 <= min_images <= num_images")


@dataclass(frozen=True)
class QuantizeTarget:
    method: Literal["minmax", "percentile", "entropy", "auto", "histogram"] | None = doc(
        None, help="this target's calibration method (default: [quantize] method)")
    tolerance: float | None = doc(None, help="this target's tolerance (default: [quantize] tolerance)", min=0, max=0.99)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")


@dataclass(frozen=True)
class QuantizeSection:
    method: Literal["minmax", "percentile", "entropy", "auto", "histogram"] = doc(
        "auto", help="activation range calibration; auto: each target's quantizer's default (the method measured "
                     "best: onnx minmax, executorch and litert PT2E histogram); a method a target's quantizer does "
                     "not take fails that target (set it per target below)")
    percentile: float = doc(99.999, help="percentile for method = percentile", min=90, max=100)
    tolerance: float | None = doc(None, help="max loss vs float (1 - cosine, or zero-shot agreement lost); the most "
                                             "sensitive layers stay float until it holds, and compile ships that",
                                  min=0, max=0.99)
    max_fallback: int = doc(16, help="at most this many layers kept in float by the tolerance search", min=1, max=10_000)
    targets: dict[str, QuantizeTarget] = doc(help="per target: method and tolerance ([quantize.targets.cpu] "
                                                  "tolerance = 0.002)", factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self)
        if not 90 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [90, 100], got {self.percentile}")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.max_fallback < 1:
            raise ValueError(f"max_fallback must be at least 1, got {self.max_fallback}")

    def method_for(self, target: str) -> str:
        own = self.targets.get(target)
        return own.method if own is not None and own.method is not None else self.method

    def tolerance_for(self, target: str) -> float | None:
        own = self.targets.get(target)
        return own.tolerance if own is not None and own.tolerance is not None else self.tolerance


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
        check_ranges(self)
        if not self.build:
            raise ValueError("build must list at least one target (see 'edgec targets')")
        object.__setattr__(self, "build", list(dict.fromkeys(self.build)))  # a target listed twice is built once
        if "image" not in self.towers or len(set(self.towers)) != len(self.towers):
            raise ValueError(f"towers must include 'image' once (and may add 'text'), got {self.towers}")


@dataclass(frozen=True)
class EdgecConfig:
    version: int = doc(CONFIG_VERSION, help="config schema version", min=1)
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
        check_ranges(self)
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
    _refuse_code_execution(data, str(path))
    config = from_dict(EdgecConfig, data, source=str(path))
    return _with_root(config, path.resolve().parent)


def config_from_dict(data: dict, *, root: Path = Path("."), source: str = "<dict>") -> EdgecConfig:
    _refuse_code_execution(data, source)
    return _with_root(from_dict(EdgecConfig, data, source=source), root)


def _refuse_code_execution(data: dict, source: str) -> None:
    """A config file arrives in pull requests and CI runs it: nothing in it may let code run."""
    model = data.get("model")
    if isinstance(model, dict) and "trust_pickle" in model:
        raise ConfigError(f"{source}: model.trust_pickle: a config file cannot allow unpickling the checkpoint "
                          f"(it would let the file's author run code here); remove the key",
                          hint="pass --trust-pickle on the command line, or set EDGEC_TRUST_PICKLE to the "
                               "checkpoint's sha256")


def _with_root(config: EdgecConfig, root: Path) -> EdgecConfig:
    object.__setattr__(config, "root", root)
    return config
