"""edgec compile: one target folder (artifacts + head files + manifest.json), written atomically.

``run(CompileConfig) -> CompileOutputs``. The folder appears only when every file is written
(a failed compile leaves the previous folder, or none). What is missing upstream is made by
:func:`compile_from_config` (the distilled student), which the CLI calls.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import registry
from .config import EdgecConfig, ModelSection
from .errors import InputError
from .manifest import atomic_write_bytes, atomic_write_json, atomic_write_text, file_record, sha256_file, staged_dir
from .quantize.calibration import CalibrationSpec

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
    calibration: CalibrationSpec | None = None
    method: str = "minmax"
    percentile: float = 99.999
    golden: Path | None = None  # needed to pick the fastest passing precision
    trt_version: int = 100300
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
    with staged_dir(config.out) as tmp:
        work = tmp / ".candidates"
        work.mkdir()
        fp32 = work / "model.fp32.onnx"
        with torch.no_grad():
            io_records = backend.export(encoder.eval(), shape, fp32, dynamic_batch=not target.constraints.static_shapes)
        log(f"{config.target}: exported fp32 ONNX ({fp32.stat().st_size / 1e6:.2f} MB)")
        candidates: dict[str, Path] = {}
        for precision in target.precisions:
            if precision == "fp32":
                candidates["fp32"] = fp32
            elif precision == "int8":
                candidates["int8"], sources["calibration"] = _int8_onnx(config, entry, fp32, work, preprocess, tmp, log)
            else:
                raise InputError(f"target {config.target}: precision {precision!r} is not implemented by this edgec yet",
                                 hint=f"list fp32 or int8 in {entry.path}")
        gates = list(config.gates) or list(target.gates)
        selection = _select(candidates, target, gates, config, preprocess, log)
        chosen = candidates[selection["chosen"]]
        shipped = tmp / chosen.name
        chosen.replace(shipped)
        shutil.rmtree(work)
        if selection["chosen"] != "int8":
            (tmp / "calibration.cache").unlink(missing_ok=True)  # only meaningful beside an int8 artifact
        artifacts = [file_record(shipped, tmp, format="onnx", runtime=target.runtime, precision=selection["chosen"])]
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
            "gates": gates,
            "selection": selection,
            "metrics": None,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return CompileOutputs(config.out, manifest)


def _int8_onnx(config: CompileConfig, entry, fp32: Path, work: Path, preprocess, tmp: Path, log) -> tuple[Path, str]:
    from .quantize.calibration import load_calibration
    from .quantize.onnx_qdq import quantize_onnx

    if config.calibration is None:
        raise InputError(f"target {config.target} builds int8 and needs calibration images",
                         hint="set [calibration] path in edgec.toml (an image folder, a list of paths or a captions.jsonl)")
    calib = load_calibration(config.calibration, preprocess)
    q = quantize_onnx(fp32, work / "model.int8.onnx", calib, method=config.method, percentile=config.percentile,
                      trt_version=config.trt_version)
    atomic_write_text(tmp / "calibration.cache", q.trt_cache)
    log(f"{config.target}: int8 Q/DQ ONNX, {config.method} ranges from {len(calib)} calibration images, "
        f"{q.qdq_pairs} Q/DQ pairs ({q.path.stat().st_size / 1e6:.2f} MB); TensorRT calibration cache written")
    return q.path, calib.sha256


def _select(candidates: dict[str, Path], target, gates: list[str], config: CompileConfig, preprocess, log) -> dict:
    """'fastest-passing': time and verify every candidate here, ship the fastest that passes the gates.
    'first': ship the first precision listed (targets whose runtime cannot be measured on this machine)."""
    names = list(candidates)
    if target.select == "first" or len(names) == 1 and config.golden is None:
        return {"policy": "first", "chosen": names[0], "candidates": [{"precision": n} for n in names]}
    from .bench import measure_artifact
    from .verify.golden import load_golden
    from .verify.run import check_gates, compute_metrics, golden_inputs

    if config.golden is None:
        raise InputError(f"target {config.target} picks the fastest passing precision and needs the golden set",
                         hint="run 'edgec golden' first")
    golden = load_golden(config.golden)
    x = golden_inputs(golden, preprocess)
    from .runtime.runners import open_runner

    rows = []
    for name, path in candidates.items():
        metrics = compute_metrics(open_runner(path, target.runtime)(x), golden)
        timing = measure_artifact(path, target.runtime, [1, *x.shape[1:]], os.cpu_count() or 1, runs=30, warmup=5)
        results = check_gates(metrics, gates)
        rows.append({"precision": name, "bytes": path.stat().st_size, "median_ms": timing["median_ms"],
                     "metrics": {k: metrics[k] for k in ("agreement", "cosine_mean", "cosine_p1", "accuracy") if k in metrics},
                     "passed": all(r["passed"] for r in results)})
        log(f"{config.target}: candidate {name}: {timing['median_ms']:.2f} ms, "
            + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1]["metrics"].items()) + (" (passes)" if rows[-1]["passed"] else " (fails gates)"))
    passing = [r for r in rows if r["passed"]]
    if not passing:
        from .errors import GateFailed

        raise GateFailed(f"target {config.target}: no candidate precision passes the gates {gates}",
                         hint="see the candidate lines above; distil longer or relax the gates")
    chosen = min(passing, key=lambda r: r["median_ms"])["precision"]
    log(f"{config.target}: shipping {chosen} (fastest that passes)")
    return {"policy": "fastest-passing", "chosen": chosen, "candidates": rows}


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
    calibration = None
    if cfg.calibration.path:
        calibration = CalibrationSpec(cfg.resolve(cfg.calibration.path), cfg.calibration.num_images,
                                      cfg.calibration.min_images, cfg.calibration.seed, cfg.data.max_bad_fraction)
    golden = build / "golden"
    spec = registry.get("targets", target).spec
    if spec.select == "fastest-passing" and len(spec.precisions) > 1 and not (golden / "golden.json").is_file():
        if cfg.data.eval is None:
            raise InputError(f"target {target} measures its candidates against the golden set, which needs [data] eval")
        from .verify.golden import GoldenConfig, build_golden

        log(f"{target}: no golden set yet; computing it first")
        build_golden(GoldenConfig(teacher=teacher, eval=cfg.resolve(cfg.data.eval), out=golden,
                                  prompts=tuple(cfg.data.prompts), captions_file=cfg.data.captions,
                                  max_bad_fraction=cfg.data.max_bad_fraction), log=log)
    ccfg = CompileConfig(target=target, out=out or build / target, teacher=teacher,
                         source="teacher" if no_distill else "student", student=student_dir, head_data=head_data,
                         prompts=tuple(cfg.data.prompts), captions_file=cfg.data.captions, device=cfg.targets.device,
                         config_sha256=config_sha, gates=tuple(cfg.gates_for(target)), calibration=calibration,
                         method=cfg.quantize.method, percentile=cfg.quantize.percentile,
                         golden=golden if (golden / "golden.json").is_file() else None)
    return run(ccfg, log=log)
