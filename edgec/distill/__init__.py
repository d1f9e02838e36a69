"""edgec distill: a timm student trained into the teacher's embedding space.

``run(DistillConfig) -> DistillOutputs`` is the whole stage; the CLI only builds the config.
Output folder::

    <out>/student/          best student by the eval metric (edgec format)
    <out>/last/             last finished epoch + optimizer state (for --resume)
    <out>/metrics.csv       one row per epoch
    <out>/learning_curve.png
    <out>/manifest.json     sources, config, metrics, sizes
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import DistillSection, EdgecConfig, ModelSection
from ..errors import InputError
from ..manifest import atomic_write_json, file_record, package_versions
from ..schema import to_dict

SCHEMA = 1
MIN_TRAIN_IMAGES = 2


def resolve_data(cfg: EdgecConfig, spec: str | None) -> Path | None:
    """A [data] path relative to edgec.toml; each part of a ``::``-joined shard list on its own."""
    if spec is None:
        return None
    if "::" in spec:
        return Path("::".join(str(cfg.resolve(part)) for part in spec.split("::") if part))
    return cfg.resolve(spec)


@dataclass(frozen=True)
class DistillConfig:
    teacher: ModelSection
    train: Path
    out: Path
    student: str = "mobilevit_xxs"
    image_size: int | None = None
    eval: Path | None = None
    prompts: tuple[str, ...] = ("a photo of a {}.",)
    captions_file: str = "captions.jsonl"
    max_bad_fraction: float = 0.05
    params: DistillSection = dataclasses.field(default_factory=DistillSection)
    augment: Literal["none", "light", "standard"] = "none"
    cache: Path | None = None
    version: int = 1

    @classmethod
    def from_edgec(cls, cfg: EdgecConfig, *, target: str | None = None, student: str | None = None,
                   out: Path | None = None, **overrides) -> DistillConfig:
        if cfg.model is None:
            raise InputError("edgec.toml has no [model] section: distill needs the teacher", hint="add [model] path = ...")
        if cfg.data.train is None:
            raise InputError("edgec.toml has no [data] train folder", hint="set [data] train = \"path/to/images\"")
        name = student or (cfg.student.targets.get(target) if target else None) or cfg.student.name
        build = cfg.resolve(cfg.targets.out)
        teacher = dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path)))
        if teacher.arch and teacher.arch.endswith(".json"):
            teacher = dataclasses.replace(teacher, arch=str(cfg.resolve(teacher.arch)))
        params = dataclasses.replace(cfg.distill, **{k: v for k, v in overrides.items() if v is not None})
        return cls(teacher=teacher, train=resolve_data(cfg, cfg.data.train), out=out or build / "distill" / name,
                   student=name, image_size=cfg.student.image_size, eval=resolve_data(cfg, cfg.data.eval),
                   prompts=tuple(cfg.data.prompts),
                   captions_file=cfg.data.captions, max_bad_fraction=cfg.data.max_bad_fraction, params=params,
                   augment=params.augment, cache=build / "cache")


@dataclass
class DistillOutputs:
    out: Path
    student: Path
    manifest: dict


def prepare_split(teacher, source, *, role: str, prompts: list[str], cache_root: Path, preprocess, views: int = 1,
                  seed: int = 0, augment: str = "none", workers: int = 0, max_bad_fraction: float = 0.05,
                  device=None, dist=None, progress: bool = False, log=print, source_id: str | None = None):
    """The teacher's targets for ``source`` (computed into the chunked cache, or read from it) and the
    student's view of its images: a trainer :class:`~edgec.distill.trainer.Split`."""
    from ..data.loader import RowImages
    from ..data.sources import FOLDER_PART, FolderSource
    from .cache import CacheRows, build_teacher_cache, cache_key
    from .data import teacher_identity
    from .ddp import Dist
    from .trainer import Split

    dist = dist or Dist()
    sid = source_id or source.identity()
    key = cache_key(teacher_identity(teacher), sid, teacher.preprocess, prompts, views=views, seed=seed, augment=augment,
                    part_size=FOLDER_PART if isinstance(source, FolderSource) else None)
    res = build_teacher_cache(teacher, source, prompts=prompts, folder=cache_root / f"teacher-{key}", views=views,
                              seed=seed, augment=augment, workers=workers, device=device, rank=dist.rank,
                              world=dist.world, progress=progress and dist.main)
    rows = CacheRows(res.folder)
    final = rows.final
    if final["bad"] > max_bad_fraction * final["samples"]:
        raise InputError(f"{final['bad']} of {final['samples']} images in {source.name} could not be decoded "
                         f"(first: {final['first_bad']})", hint=f"fix or remove them; up to {max_bad_fraction:.0%} are skipped")
    if not len(rows):
        raise InputError(f"no decodable images in {source.name}")
    if dist.main:
        bad = ""
        if final["bad"]:
            per = final["bad_per_part"]
            shown = ", ".join(f"{k}: {v}" for k, v in list(per.items())[:5]) + (", ..." if len(per) > 5 else "")
            bad = f", {final['bad']} undecodable skipped ({shown})"
        how = ("teacher outputs from cache" if res.computed == 0 else "teacher outputs computed and cached"
               if res.cached == 0 else f"teacher outputs: {res.cached} chunks from cache, {res.computed} computed")
        log(f"{role}: {len(rows)} images from {source.name}{bad} ({how})")
    images = RowImages(source, rows.refs, rows.positions, preprocess, views=views, seed=seed, augment=augment)
    return Split(rows, images), sid


def run(config: DistillConfig, *, resume: bool = False, progress: bool = True, log=print,
        max_steps: int | None = None, inputs: dict | None = None) -> DistillOutputs:
    """Distil (``inputs``: the stage's inputs record, written into the manifest with its key so that
    ``edgec compile`` reuses this student; computed when not given)."""
    import torch

    from ..data.loader import default_workers
    from ..data.sources import open_source
    from ..models import load_model
    from ..models.base import count_macs, count_params
    from ..models.student import StudentSpec, check_student_name, create_student
    from .data import teacher_identity
    from .ddp import Dist
    from .stage import distill_inputs, inputs_key
    from .trainer import resolve_device, train

    t0 = time.time()
    check_student_name(config.student)
    inputs = inputs if inputs is not None else distill_inputs(config)
    teacher = load_model(config.teacher.path, config.teacher.kind, arch=config.teacher.arch,
                         trust_pickle=config.teacher.trust_pickle)
    spec = StudentSpec(config.student, teacher.embed_dim,
                       teacher.preprocess.with_size(config.image_size) if config.image_size else teacher.preprocess)
    dist = Dist.from_env()
    device = resolve_device(config.params.device, dist)
    teacher.to(device)
    workers = default_workers() if config.params.workers is None else config.params.workers
    cache_root = config.cache or config.out / ".teacher-cache"

    prompts = list(config.prompts)
    splits = {}
    for role, path in (("train", config.train), ("eval", config.eval)):
        if path is None:
            continue
        source = open_source(path, config.captions_file)
        if role == "train" and hasattr(source, "__len__") and len(source) < MIN_TRAIN_IMAGES:  # before any caching
            raise InputError(f"{path} has {len(source)} training image(s); distillation needs at least "
                             f"{MIN_TRAIN_IMAGES} (BatchNorm statistics need a batch of two)", hint="add images to [data] train")
        views = config.params.teacher_views if role == "train" else 1
        splits[role] = prepare_split(teacher, source, role=role, prompts=prompts, cache_root=cache_root,
                                     preprocess=spec.preprocess, views=views, seed=config.params.seed,
                                     augment=config.augment, workers=workers, max_bad_fraction=config.max_bad_fraction,
                                     device=device, dist=dist, progress=progress, log=log,
                                     source_id=inputs.get(role))
    train_split, train_id = splits["train"]
    eval_split = splits["eval"][0] if "eval" in splits else None
    class_text_np = (eval_split or train_split).rows.class_text
    class_text = torch.from_numpy(class_text_np).float() if class_text_np is not None else None
    params = config.params
    # captions count only when the teacher can embed them (a text tower and a tokenizer)
    no_text = teacher.text_encoder is None or teacher.tokenizer is None
    if params.losses.contrastive_text and (no_text or not train_split.rows.has_captions):
        # say why: no captions in the data, or a teacher that cannot embed text
        why = (f"the teacher {teacher.name} has no {'text tower' if teacher.text_encoder is None else 'tokenizer'} to "
               "embed captions with" if no_text else f"{config.train} has no captions")
        try:
            params = dataclasses.replace(params, losses=dataclasses.replace(params.losses, contrastive_text=0.0))
        except ValueError:
            raise InputError(f"distill.losses.contrastive_text is the only loss, and {why} ({config.captions_file})",
                             hint="set feature_cosine = 1.0" + ("" if no_text else ", or add captions")) from None
        log(f"note: {why}; the contrastive_text loss is off for this run")
    if config.params.losses.logit and class_text is None:
        raise InputError(f"distill.losses.logit needs labels, and {config.train} has none",
                         hint="set logit = 0, or use class sub-folders or 'label' in captions.jsonl")
    teacher_id = teacher_identity(teacher)
    extra = {"teacher": {"name": teacher.name, "kind": teacher.kind, "sha256": teacher_id}}
    teacher.to("cpu")

    result = train(spec, params, train_split, eval_split, class_text, logit_scale=teacher.logit_scale,
                   out=config.out, augment_mode=config.augment, resume=resume, progress=progress, extra=extra, log=log,
                   max_steps=max_steps)

    student_dir = config.out / "student"
    probe = create_student(spec)
    h, w = spec.preprocess.size
    manifest = {
        "schema": SCHEMA,
        "stage": "distill",
        "student": {**spec.to_json(), "params": count_params(probe), "macs": count_macs(probe, torch.zeros(1, 3, h, w)),
                    "path": "student"},
        "teacher": {**extra["teacher"], "image_params": teacher.params()["image"],
                    "image_macs": count_macs(teacher.image_encoder, torch.zeros(1, 3, *teacher.preprocess.size))},
        "data": {"train": str(config.train), "train_sha256": train_id, "train_images": len(train_split),
                 "train_undecodable": train_split.rows.final["bad"],
                 "eval": str(config.eval) if config.eval else None,
                 "eval_sha256": splits["eval"][1] if "eval" in splits else None},
        "config": {**to_dict(config.params), "augment": config.augment, "prompts": prompts},
        "losses_used": to_dict(params.losses),
        "metrics": {k: v for k, v in result.best.items()},
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "device": str(device),
        "world_size": int(__import__("os").environ.get("WORLD_SIZE", "1")),
        "ranks_max_abs_diff": result.ranks_max_abs_diff,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": package_versions("torch", "timm"),
    }
    manifest["cache"] = {"key": inputs_key(inputs), "inputs": inputs}
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        manifest["artifacts"] = [file_record(p, config.out) for p in sorted(student_dir.iterdir())]
        atomic_write_json(config.out / "manifest.json", manifest)
    return DistillOutputs(config.out, student_dir, manifest)
