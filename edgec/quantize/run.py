"""edgec quantize: int8 programs per backend, per-layer sensitivity and accuracy-aware fallback.

``run(QuantizeConfig) -> QuantizeOutputs``. For each backend one folder ``<out>/<backend>/``
(written atomically) holds the quantized program, ``manifest.json`` (calibration sha256, method,
ranges summary, fallback layers and their cost, metrics of the artifact run in its runtime),
``sensitivity.json`` and ``sensitivity.png``.

Each backend is measured in the form a target ships (the first of ``[targets] build`` that uses it
and builds int8, else the first registered one): the program comes from the backend record's
``program`` function, exactly as compile's quantize stage builds it (:mod:`edgec.quantize.stage`),
and runs in that target's runtime. Nothing here names a backend.

Metrics (see :mod:`edgec.quantize.sensitivity` for the tolerance rule): cosine between the int8
artifact's and the float model's embeddings, zero-shot agreement with the teacher on the golden
set, and the same metrics against the teacher that ``edgec verify`` computes.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..config import EdgecConfig, ModelSection
from ..errors import GateFailed, InputError
from ..manifest import atomic_write_bytes, atomic_write_json, file_record, package_versions, staged_dir
from .calibration import CalibrationSpec
from ..backends import MODULES as BACKENDS
from ..backends import get as get_backend

SCHEMA = 1
EDGE_TPU_NOTE = ("on an Edge TPU a float op is not mapped: the compiler stops at the first op it cannot run, and that "
                 "op and every op after it run on the CPU; the edgetpu target refuses float ops and fails its build")


@dataclass(frozen=True)
class QuantizeConfig:
    out: Path  # <build>/quantize: one folder per backend below it
    teacher: ModelSection
    calibration: CalibrationSpec
    source: Literal["student", "teacher"] = "student"
    student: Path | None = None  # a distilled student folder (edgec_student.json)
    golden: Path | None = None  # agreement with the teacher needs it; without it only cosine vs float is measured
    backends: tuple[str, ...] = BACKENDS
    targets: tuple[str, ...] = ()  # targets whose int8 forms are preferred (edgec.toml's [targets] build)
    method: str | None = None  # None or 'auto': each form's quantizer default; else used where the quantizer takes it
    percentile: float = 99.999
    tolerance: float | None = None
    max_fallback: int = 16  # at most this many layers tried in float
    eval_images: int = 128  # golden images for ranking and the fallback search (final metrics use all of them)
    sensitivity_calibration: int = 32  # calibration images per isolated-layer program (PT2E calibrates each)
    sensitivity: bool = True
    strict_method: bool = True  # a method some backend does not take is an error (--method); else that backend's default
    version: int = 1

    def __post_init__(self) -> None:
        if self.source == "student" and self.student is None:
            raise ValueError("source = 'student' needs the student folder")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise InputError(f"unknown backend {unknown[0] if unknown else '(none)'!r} for quantize",
                             hint=f"one of {', '.join(BACKENDS)} or all")
        if self.method not in (None, "auto") and self.strict_method:
            for b in self.backends:
                name, spec = self.target_for(b)
                get_backend(b).method(spec.quantizer, self.method, where=f"{b} (the {name} target's form): ")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise InputError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.max_fallback < 1 or self.eval_images < 1 or self.sensitivity_calibration < 1:
            raise InputError("max_fallback, eval_images and sensitivity_calibration must be at least 1")

    def target_for(self, backend: str):
        """(name, spec) of the target whose int8 form ``backend`` is measured in."""
        return int8_targets(backend, self.targets)[0]

    def method_for(self, backend: str) -> str:
        """The configured method where the target's quantizer takes it, else its default (auto)."""
        quantizer = get_backend(backend).quantizer(self.target_for(backend)[1].quantizer)
        return self.method if self.method in quantizer.methods else quantizer.default_method


@dataclass
class QuantizeOutputs:
    out: Path
    folders: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)
    config: QuantizeConfig | None = None

    @property
    def tolerance_met(self) -> bool:
        return all((m.get("fallback") or {}).get("met", True) for m in self.manifests.values())


def int8_targets(backend: str, preferred: tuple[str, ...] = ()) -> list[tuple[str, object]]:
    """Every registered target that builds int8 with ``backend``, as (name, spec): ``preferred`` ones first."""
    from .. import registry

    entries = registry.entries("targets")
    names = list(dict.fromkeys([t for t in preferred if t in entries] + sorted(entries)))
    found = [(n, entries[n].spec) for n in names if entries[n].spec.backend == backend and "int8" in entries[n].spec.precisions]
    if not found:
        raise InputError(f"no target builds int8 with the {backend} backend", hint="add one to targets/")
    return found


def load_source(config: QuantizeConfig):
    """(float model pixels -> L2-normalised embedding, NCHW preprocessing, model name, source hashes)."""
    from ..backends.onnx import NormalizedEmbedding
    from ..models.intake import load_image_source
    from ..models.student import disable_fused_attention

    src = load_image_source(config.teacher, config.source, config.student)
    model = NormalizedEmbedding(src.encoder.eval()).eval()
    disable_fused_attention(model)
    return model, dataclasses.replace(src.preprocess, layout="NCHW"), src.name, src.sources


def check_finite(model, batches: list[np.ndarray]) -> None:
    """Float activations on the calibration images must be finite: a NaN/inf range cannot be quantized.
    Names the first module whose output is not finite."""
    import torch

    bad: list[str] = []

    def hook(name):
        def fn(_m, _i, out):
            if not bad and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                bad.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            for b in batches:
                out = model(torch.from_numpy(b))
                if bad or not torch.isfinite(out).all():
                    where = f"module {bad[0]!r}" if bad else "the model output"
                    raise InputError(f"calibration produced non-finite (NaN/inf) activations in {where}: its int8 ranges "
                                     "would be NaN/inf", hint="check the model weights (NaN/inf?) and the calibration images")
    finally:
        for h in handles:
            h.remove()


def embed(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


@dataclass
class EvalSet:
    """Eval images with the float model's embeddings and, when a golden set exists, the teacher's."""

    x: np.ndarray
    reference: np.ndarray
    golden: object | None
    text: np.ndarray | None
    teacher_pred: np.ndarray | None

    def evaluator(self, n: int | None = None):
        from .sensitivity import Evaluator

        idx = np.arange(len(self.x)) if n is None or n >= len(self.x) else np.linspace(0, len(self.x) - 1, n).astype(int)
        return Evaluator(self.x[idx], self.reference[idx], self.text,
                         None if self.teacher_pred is None else self.teacher_pred[idx])


def eval_set(config: QuantizeConfig, model, preprocess, calib) -> EvalSet:
    if config.golden is None:
        x = np.concatenate(list(calib.batches(batch_size=64)))
        return EvalSet(x, embed(model, x), None, None, None)
    from ..verify.golden import load_golden
    from ..verify.metrics import zero_shot_predictions
    from ..verify.run import golden_inputs

    golden = load_golden(config.golden)
    x = golden_inputs(golden, preprocess)
    ref = embed(model, x)
    if ref.shape[1] != golden.image_embeddings.shape[1]:
        raise InputError(f"the model gives {ref.shape[1]}-d embeddings, the golden set in {config.golden} "
                         f"{golden.image_embeddings.shape[1]}-d ones", hint="run 'edgec golden' for this teacher")
    text = golden.text_embeddings
    pred = zero_shot_predictions(golden.image_embeddings, text) if text is not None else None
    return EvalSet(x, ref, golden, text, pred)


def make_program(backend: str, model, spec, calib, work: Path, *, method: str, percentile: float):
    """The backend's quantizable program in ``spec``'s form (the record's ``program``, as compile builds it)."""
    h, w = calib.preprocess.size if hasattr(calib, "preprocess") else (None, None)
    shape = (1, 3, h, w) if spec.layout == "NCHW" else (1, h, w, 3)
    return get_backend(backend).program(model.encoder, shape, spec, calib, method, percentile, work, {})


def write_artifact(program, out: Path, keep_float=frozenset()) -> dict | None:
    """The shipped program; returns the delegation report where the backend makes one (else None)."""
    program.write(out, keep_float)
    return getattr(program, "report", None)


def measure(path: Path, spec, evalset: EvalSet, *, timing: bool = True) -> dict:
    """The artifact in its target's runtime: metrics vs the float model and vs the teacher, size, latency."""
    from ..bench import measure_artifact
    from ..runtime.runners import open_runner
    from .sensitivity import Evaluator

    runtime = spec.runtime
    x = evalset.x.transpose(0, 2, 3, 1) if spec.layout == "NHWC" else evalset.x
    # the runner decides the kernels: a TensorRT program on this CPU runs with Q/DQ as written (ISA-independent)
    emb = open_runner(path, runtime)(np.ascontiguousarray(x))
    m = Evaluator(evalset.x, evalset.reference, evalset.text, evalset.teacher_pred).metrics(emb)
    result = {"runtime": runtime, "bytes": path.stat().st_size, "vs_float": m}
    if evalset.golden is not None:
        from ..verify.run import compute_metrics

        result["vs_teacher"] = {k: v for k, v in compute_metrics(emb, evalset.golden).items() if k != "images"}
    if timing:
        t = measure_artifact(path, runtime, [1, *x.shape[1:]], 1, runs=30, warmup=5)
        result["median_ms"] = t["median_ms"]
    return result


def ranges_summary(program) -> dict:
    """How many activation tensors got a range and how much the method clipped, as the program reports it."""
    return program.ranges_summary() if hasattr(program, "ranges_summary") else {}


def plot_sensitivity(path: Path, ranking: list[dict], layers: list[dict], fallback: set[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    err = {r["name"]: r["error"] for r in ranking}
    names = [la["name"] for la in layers]
    labels = [la.get("label", la["name"]) for la in layers]
    values = [max(err.get(n, 0.0), 1e-9) for n in names]
    colors = ["tab:red" if n in fallback else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names)), 3.6))
    ax.bar(range(len(names)), values, color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("1 - cosine vs float (only this layer int8)")
    ax.set_title(title + (f"; red: kept in float ({len(fallback)})" if fallback else ""), fontsize=9)
    worst = sorted(range(len(names)), key=lambda i: -values[i])[:3]
    for i in worst:
        ax.annotate(labels[i][-48:], (i, values[i]), fontsize=6, rotation=20, ha="left", va="bottom")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def quantize_backend(backend: str, config: QuantizeConfig, model, preprocess, calib, evalset: EvalSet, *,
                     model_name: str, sources: dict, log) -> tuple[Path, dict]:
    from .calibration import CalibrationSet  # noqa: F401 - documents the type of calib
    from .sensitivity import fallback_search, rank_layers

    t0 = time.time()
    record = get_backend(backend)
    target, spec = config.target_for(backend)
    quantizer = record.quantizer(spec.quantizer)
    method = config.method_for(backend)
    h, w = preprocess.size
    shape = (1, 3, h, w) if spec.layout == "NCHW" else (1, h, w, 3)
    folder = config.out / backend
    with staged_dir(folder) as tmp, tempfile.TemporaryDirectory(prefix="edgec-quantize-") as work_dir:
        work = Path(work_dir)
        program = make_program(backend, model, spec, calib, work, method=method, percentile=config.percentile)
        log(f"{backend}: {target}'s form ({program.description}), {len(program.layers)} quantizable layers, "
            f"{len(calib)} calibration images")
        small = evalset.evaluator(config.eval_images)
        # programs calibrated again for every isolated layer (PT2E) rank on a subset of the images
        kwargs = program.sensitivity_kwargs(config.sensitivity_calibration) \
            if hasattr(program, "sensitivity_kwargs") else {}
        ranking = rank_layers(program, small, log=lambda s: log(f"{backend}: {s}"), **kwargs) \
            if config.sensitivity or config.tolerance is not None else []
        fallback = None
        keep: frozenset[str] = frozenset()
        if config.tolerance is not None:
            fallback = fallback_search(program, small, ranking, config.tolerance, max_layers=config.max_fallback,
                                       log=lambda s: log(f"{backend}: {s}"))
            keep = frozenset(la["name"] for la in fallback["float_layers"])
        artifact = tmp / f"model.int8{record.suffix}"
        delegation = write_artifact(program, artifact, keep)
        measured = measure(artifact, spec, evalset)
        log(f"{backend}: {artifact.name} ({measured['bytes'] / 1e6:.2f} MB, {measured['median_ms']:.2f} ms): cosine vs float "
            f"{measured['vs_float']['cosine_mean']:.5f}" + (f", agreement {measured['vs_float']['agreement']:.4f}"
                                                          if "agreement" in measured["vs_float"] else ""))
        if fallback is not None:
            fallback["measures"] = ("loss = max(1 - mean cosine vs the float model, float model's zero-shot agreement "
                                    "with the teacher - this program's); the tolerance holds when loss <= tolerance; "
                                    f"searched on {len(small.x)} golden images, final metrics on all")
            if keep:
                all_int8 = work / ("all-int8" + artifact.suffix)
                write_artifact(program, all_int8)
                base = measure(all_int8, spec, evalset)
                fallback["cost"] = {"bytes": measured["bytes"] - base["bytes"],
                                    "median_ms": round(measured["median_ms"] - base["median_ms"], 4),
                                    "cosine_mean": measured["vs_float"]["cosine_mean"] - base["vs_float"]["cosine_mean"],
                                    "agreement": (measured["vs_float"].get("agreement", np.nan)
                                                  - base["vs_float"].get("agreement", np.nan)),
                                    "all_int8": base}
            if quantizer.fully_integer and keep:
                fallback["edge_tpu"] = EDGE_TPU_NOTE
            log(f"{backend}: tolerance {config.tolerance:g} " + ("met" if fallback["met"] else "NOT met")
                + f" with {len(keep)} float layer(s)" + (f": {', '.join(la['label'] for la in fallback['float_layers'])}"
                                                         if keep else ""))
        sens = {"schema": SCHEMA, "backend": backend, "method": method,
                "measure": "1 - mean cosine between the float model's embeddings and those of the model with only this "
                           "layer quantized (int8), on the eval images",
                "eval_images": len(small.x), "layers": ranking}
        atomic_write_json(tmp / "sensitivity.json", sens)
        if ranking:
            plot_sensitivity(tmp / "sensitivity.png", ranking, program.layers, set(keep),
                             f"{model_name} {backend} ({method})")
        io = {"inputs": [{"name": "pixels", "shape": list(shape), "dtype": "float32", "quantization": None}],
              "outputs": []}
        io_records = record.io_records(artifact, io, spec) if record.io_records else io
        manifest = {
            "schema": SCHEMA,
            "stage": "quantize",
            "backend": backend,
            "target": target,
            "quantizer": quantizer.name,
            "form": program.description,
            "model": model_name,
            "artifacts": [file_record(artifact, tmp, format=record.format, runtime=spec.runtime, precision="int8")],
            "inputs": [dict(r, preprocess=dataclasses.replace(preprocess, layout=spec.layout).to_json())
                       for r in io_records["inputs"]],
            "calibration": {"sha256": calib.sha256, "images": len(calib), "source": str(config.calibration.source),
                            "method": method, "percentile": config.percentile if method == "percentile" else None,
                            "skipped": [str(p) for p, _ in calib.skipped]},
            "ranges": ranges_summary(program),
            "layers": {"quantizable": len(program.layers), "float": sorted(keep)},
            "fallback": fallback,
            "metrics": measured,
            "delegation": delegation,
            "sources": {**sources, "calibration": calib.sha256,
                        "golden": (evalset.golden.meta.get("npz_sha256") if evalset.golden is not None else None)},
            "versions": package_versions("torch", *record.packages),
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return folder, manifest


def run(config: QuantizeConfig, *, log=print) -> QuantizeOutputs:
    from .calibration import load_calibration

    model, preprocess, name, sources = load_source(config)
    calib = load_calibration(config.calibration, preprocess)
    check_finite(model, list(calib.batches(batch_size=16)))
    evalset = eval_set(config, model, preprocess, calib)
    outputs = QuantizeOutputs(config.out)
    for backend in config.backends:
        folder, manifest = quantize_backend(backend, config, model, preprocess, calib, evalset, model_name=name,
                                            sources=sources, log=log)
        outputs.folders[backend], outputs.manifests[backend] = folder, manifest
    return outputs


def config_from_edgec(cfg: EdgecConfig, *, backends: tuple[str, ...] = BACKENDS, method: str | None = None,
                      tolerance: float | None = None, out: Path | None = None, no_distill: bool = False,
                      progress: bool = True, log=print, **overrides) -> QuantizeConfig:
    """The QuantizeConfig for edgec.toml; distils the student first when it is missing and computes the golden
    set when [data] eval exists and it is missing."""
    from ..distill import DistillConfig
    from ..distill import run as distill

    if cfg.model is None:
        raise InputError("edgec.toml has no [model] section", hint="add [model] path = ...")
    if not cfg.calibration.path:
        raise InputError("quantize needs calibration images", hint="set [calibration] path in edgec.toml")
    from .calibration import check_source

    check_source(cfg.resolve(cfg.calibration.path))  # before the student or the golden set is made
    teacher = dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path)))
    build = cfg.resolve(cfg.targets.out)
    student_dir = None
    if not no_distill:
        dcfg = DistillConfig.from_edgec(cfg)
        student_dir = dcfg.out / "student"
        if not ((dcfg.out / "manifest.json").is_file() and student_dir.is_dir()):
            log(f"quantize: no distilled {dcfg.student} yet; distilling it first")
            student_dir = distill(dcfg, progress=progress, log=log).student
    golden = build / "golden"
    if not (golden / "golden.json").is_file() and cfg.data.eval is not None:
        from ..verify.golden import GoldenConfig, build_golden

        log("quantize: no golden set yet; computing it first")
        build_golden(GoldenConfig.from_edgec(cfg, out=golden), log=log)
    calibration = CalibrationSpec(cfg.resolve(cfg.calibration.path), cfg.calibration.num_images, cfg.calibration.min_images,
                                  cfg.calibration.seed, cfg.data.max_bad_fraction)
    qcfg = QuantizeConfig(out=out or build / "quantize", teacher=teacher, calibration=calibration,
                          source="teacher" if no_distill else "student", student=student_dir,
                          golden=golden if (golden / "golden.json").is_file() else None, backends=tuple(backends),
                          targets=tuple(cfg.targets.build),
                          method=method or cfg.quantize.method, strict_method=method is not None,
                          percentile=cfg.quantize.percentile,
                          tolerance=tolerance if tolerance is not None else cfg.quantize.tolerance, **overrides)
    return qcfg


def quantize_from_config(cfg: EdgecConfig, *, log=print, check_tolerance: bool = True, **kwargs) -> QuantizeOutputs:
    """``edgec quantize`` from edgec.toml (see :func:`config_from_edgec`); raises GateFailed when the tolerance
    is not met (after writing the folders; call :func:`check_tolerance_met` yourself when ``check_tolerance`` is False)."""
    qcfg = config_from_edgec(cfg, log=log, **kwargs)
    result = run(qcfg, log=log)
    result.config = qcfg
    if check_tolerance:
        check_tolerance_met(result)
    return result


def check_tolerance_met(result: QuantizeOutputs) -> None:
    qcfg = result.config
    if not result.tolerance_met:
        missed = [b for b, m in result.manifests.items() if not (m.get("fallback") or {}).get("met", True)]
        raise GateFailed(f"tolerance {qcfg.tolerance:g} not met on {', '.join(missed)} with up to {qcfg.max_fallback} "
                         f"float layers (folders written)", hint="raise --tolerance or --max-fallback; see manifest.json 'fallback'")
