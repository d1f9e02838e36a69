"""edgec compile: one target folder (artifacts + head files + manifest.json), written atomically.

``run(CompileConfig) -> CompileOutputs``. The folder appears only when every file is written
(a failed compile leaves the previous folder, or none). What is missing upstream is made by
:func:`compile_from_config` (the distilled student), which the CLI calls.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import registry
from .config import EdgecConfig, ModelSection
from .errors import InputError
from .manifest import atomic_write_bytes, atomic_write_json, file_record, sha256_file, staged_dir

SCHEMA = 1


@dataclass(frozen=True)
class CompileConfig:
    target: str
    out: Path
    teacher: ModelSection
    source: Literal["student", "teacher"] = "student"
    student: Path | None = None  # a distilled student folder (edgec_student.json)
    head_data: Path | None = None  # image folder whose labels define the zero-shot head
    prompts: tuple[str, ...] = ("a photo of a {}.",)
    captions_file: str = "captions.jsonl"
    device: str | None = None
    config_sha256: str | None = None
    gates: tuple[str, ...] = ()  # empty: the target file's gates
    version: int = 1

    def __post_init__(self) -> None:
        if self.source == "student" and self.student is None:
            raise ValueError("source = 'student' needs the student folder")


@dataclass
class CompileOutputs:
    out: Path
    manifest: dict


def _versions(*packages: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgec", "torch", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(config: CompileConfig, *, log=print) -> CompileOutputs:
    import torch

    from .backends import get_backend
    from .data.folder import read_folder
    from .distill.data import teacher_identity
    from .models import load_model
    from .models.student import load_student
    from .models.zeroshot import class_text_embeddings

    t0 = time.time()
    entry = registry.get("targets", config.target)
    target = entry.spec
    backend = get_backend(target.backend)
    teacher = load_model(config.teacher.path, config.teacher.kind, arch=config.teacher.arch,
                         trust_pickle=config.teacher.trust_pickle)
    sources = {"teacher": teacher_identity(teacher), "student": None, "calibration": None, "config": config.config_sha256}
    if config.source == "student":
        encoder, spec, student_cfg = load_student(config.student)
        teacher_sha = student_cfg.get("teacher", {}).get("sha256")
        if teacher_sha and teacher_sha != sources["teacher"]:
            raise InputError(f"the student in {config.student} was distilled from another teacher (sha256 {teacher_sha[:12]}...)",
                             hint="distil it again from this teacher, or point [model] at the teacher it came from")
        preprocess, sources["student"] = spec.preprocess, student_cfg["weights_sha256"]
        model_name = spec.name
    else:
        encoder, preprocess, model_name = teacher.image_encoder, teacher.preprocess, f"{teacher.name} (image tower)"
    if preprocess.layout != target.layout:
        preprocess = dataclasses.replace(preprocess, layout=target.layout)

    labels, text = [], None
    if config.head_data is not None:
        labels = read_folder(config.head_data, config.captions_file).labels
        if labels and teacher.text_encoder is not None and teacher.tokenizer is not None:
            text = class_text_embeddings(teacher, labels, list(config.prompts)).numpy()

    h, w = preprocess.size
    shape = (1, 3, h, w) if target.layout == "NCHW" else (1, h, w, 3)
    artifacts, io_records = [], None
    with staged_dir(config.out) as tmp:
        for precision in target.precisions:
            if precision != "fp32":
                raise InputError(f"target {config.target}: precision {precision!r} is not implemented by this edgec yet",
                                 hint=f"edit {entry.path} to list fp32 only")
            path = tmp / f"model.{precision}.onnx"
            with torch.no_grad():
                io_records = backend.export(encoder.eval(), shape, path, dynamic_batch=not target.constraints.static_shapes)
            artifacts.append(file_record(path, tmp, format="onnx", runtime=target.runtime, precision=precision))
            log(f"{config.target}: exported {path.name} ({path.stat().st_size / 1e6:.2f} MB)")
        head = None
        if text is not None:
            atomic_write_json(tmp / "labels.json", labels)
            buf = io.BytesIO()
            np.save(buf, text.astype(np.float16))
            atomic_write_bytes(tmp / "text_embeddings.npy", buf.getvalue())
            head = {"kind": "zero-shot", "labels": "labels.json", "text_embeddings": "text_embeddings.npy",
                    "prompts": list(config.prompts), "logit_scale": teacher.logit_scale}
        inputs = [dict(r, preprocess=preprocess.to_json()) for r in io_records["inputs"]]
        manifest = {
            "schema": SCHEMA,
            "target": config.target,
            "device": config.device,
            "model": model_name,
            "artifacts": artifacts,
            "inputs": inputs,
            "outputs": io_records["outputs"],
            "head": head,
            "sources": sources,
            "versions": _versions("onnx"),
            "build": {"backend": target.backend, "opset": io_records.get("opset"), "seconds": round(time.time() - t0, 1)},
            "gates": list(config.gates) or list(target.gates),
            "metrics": None,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return CompileOutputs(config.out, manifest)


def compile_from_config(cfg: EdgecConfig, target: str, *, no_distill: bool = False, out: Path | None = None,
                        config_path: Path | None = None, progress: bool = True, log=print) -> CompileOutputs:
    """Compile ``target`` from edgec.toml, distilling the student first when it is missing."""
    from .distill import DistillConfig
    from .distill import run as distill

    registry.get("targets", target)  # fail on an unknown target before any work
    if cfg.model is None:
        raise InputError("edgec.toml has no [model] section", hint="add [model] path = ...")
    teacher = dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path)))
    build = cfg.resolve(cfg.targets.out)
    student_dir = None
    if not no_distill:
        dcfg = DistillConfig.from_edgec(cfg, target=target)
        student_dir = dcfg.out / "student"
        if (dcfg.out / "manifest.json").is_file() and student_dir.is_dir():
            log(f"{target}: using the distilled student in {student_dir}")
        else:
            log(f"{target}: no distilled {dcfg.student} yet; distilling it first")
            student_dir = distill(dcfg, progress=progress, log=log).student
    head_data = cfg.resolve(cfg.data.eval or cfg.data.train)
    config_sha = sha256_file(config_path) if config_path and config_path.is_file() else None
    ccfg = CompileConfig(target=target, out=out or build / target, teacher=teacher,
                         source="teacher" if no_distill else "student", student=student_dir, head_data=head_data,
                         prompts=tuple(cfg.data.prompts), captions_file=cfg.data.captions, device=cfg.targets.device,
                         config_sha256=config_sha, gates=tuple(cfg.gates_for(target)))
    return run(ccfg, log=log)
