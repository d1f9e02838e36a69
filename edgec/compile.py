"""edgec compile: one target folder (artifacts + head files + manifest.json), written atomically.

``run(CompileConfig) -> CompileOutputs``. The folder appears only when every file is written
(a failed compile leaves the previous folder, or none). What is missing upstream is made by
:func:`compile_from_config` (the distilled student), which the CLI calls.
"""

from __future__ import annotations

import contextlib
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
from .errors import EdgecError, InputError
from .lock import DECISIONS_FILE
from .manifest import (atomic_write_bytes, atomic_write_json, atomic_write_text, file_record, package_versions,
                       read_json, sha256_file, sha256_json, staged_dir)
from .progress import phase
from .quantize.calibration import CalibrationSpec

SCHEMA = 1
TIE_MARGIN = 0.10  # latencies closer than this are a tie (sub-ms timings on a busy CPU vary by ~20 %)
TOWERS = ("image", "text")
# metrics of the text tower and the zero-shot variant: verify checks them, image candidates cannot
TOWER_METRIC_PREFIXES = ("text_", "artifacts_", "logits_")
HEADS = (None, "zero-shot")


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
    # the CPU the artifact will run on (devices/*.toml arch + isa); empty: unknown, build what is exact on any CPU
    isa_arch: str | None = None
    isa: tuple[str, ...] = ()
    tolerance: float | None = None  # quantize: keep the most sensitive layers in float until this loss holds
    max_fallback: int = 16
    quantized: Path | None = None  # the quantize stage's folder (reused when its inputs are unchanged)
    lock: Path | None = None  # edgec.lock: decisions that depend on timing or search, reused while their inputs hold
    reselect: bool = False  # decide again (time candidates, search the fallback) and rewrite the lock
    locked: bool = False  # CI: a decision the lock does not hold already is an error (exit 2)
    towers: tuple[str, ...] = ("image",)  # "text" also compiles the teacher's text tower (fp32) + tokenizer files
    head: str | None = None  # "zero-shot": also a variant with the label text embeddings folded in (logits out)
    version: int = 1

    def __post_init__(self) -> None:
        if self.source == "student" and self.student is None:
            raise ValueError("source = 'student' needs the student folder")
        if "image" not in self.towers or not set(self.towers) <= set(TOWERS):
            raise ValueError(f"towers must include 'image' and be among {TOWERS}, got {list(self.towers)}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")


@dataclass
class CompileOutputs:
    out: Path
    manifest: dict
    cached: bool = False  # reused: built earlier from the same inputs


def cache_key(config: CompileConfig) -> str:
    """Hash of everything a target folder depends on; an unchanged key means the folder is up to date."""
    from .distill.data import source_identity
    from .manifest import sha256_tree
    from .schema import to_dict

    entry = registry.get("targets", config.target)
    parts = {
        "edgec": package_versions()["edgec"],
        "target": sha256_file(entry.path),
        "teacher": source_identity(config.teacher.path),
        "student": (read_json(config.student / "edgec_student.json") or {}).get("weights_sha256")
        if config.student else None,
        "head": sha256_tree(config.head_data) if config.head_data else None,
        "calibration": sha256_path_or_none(config.calibration.source) if config.calibration else None,
        "golden": sha256_path_or_none(config.golden / "golden.npz") if config.golden else None,
        "config": _settings(to_dict(config)),
    }
    return sha256_json(parts)


def _settings(config: dict) -> dict:
    """The config without where things are: the files' contents are hashed on their own, so a project
    (or a CI cache of its build folder) restored under another path still reuses its targets."""
    settings = {k: v for k, v in config.items() if k not in ("out", "config_sha256", "quantized", "lock", "reselect", "locked")}
    settings["teacher"] = {k: v for k, v in settings["teacher"].items() if k != "path"}
    for key in ("student", "head_data", "golden"):
        settings[key] = settings[key] is not None
    if settings.get("calibration"):
        settings["calibration"] = {k: v for k, v in settings["calibration"].items() if k != "source"}
    # the defaults (image tower, embedding head) leave the key as before these options existed
    if tuple(settings.get("towers") or ("image",)) == ("image",):
        settings.pop("towers", None)
    if settings.get("head") is None:
        settings.pop("head", None)
    return settings


def sha256_path_or_none(path: Path) -> str | None:
    from .manifest import sha256_path

    return sha256_path(path) if path.exists() else None


def up_to_date(config: CompileConfig, key: str) -> dict | None:
    """The existing manifest when ``config.out`` was built from the same inputs and its files are intact."""
    manifest = read_json(config.out / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("build", {}).get("cache_key") != key:
        return None
    for art in manifest.get("artifacts", []):
        f = config.out / art["path"]
        if not f.is_file() or sha256_file(f) != art["sha256"]:
            return None
    return manifest


def run(config: CompileConfig, *, log=print, force: bool = False, cached_only: bool = False) -> CompileOutputs | None:
    """Build the target folder, or reuse it when its inputs are unchanged; ``cached_only``: return None instead of building."""
    key = cache_key(config)
    if not force and not config.reselect and (cached := up_to_date(config, key)) is not None:
        log(f"{config.target}: up to date in {config.out} (inputs unchanged; --force rebuilds)")
        return CompileOutputs(config.out, cached, cached=True)
    if not force and not config.reselect and (cached := _regated(config, key, log)) is not None:
        return CompileOutputs(config.out, cached, cached=True)
    if cached_only:
        return None
    from . import lock as decisions
    from .backends import get_backend
    from .data.folder import read_folder
    from .models.intake import load_image_source
    from .models.zeroshot import class_text_embeddings
    from .runtime.isa import host_isa, target_isa

    t0 = time.time()
    entry = registry.get("targets", config.target)
    target = entry.spec
    backend = get_backend(target.backend)
    src = load_image_source(config.teacher, config.source, config.student)
    teacher, encoder, preprocess, model_name = src.teacher, src.encoder, src.preprocess, src.name
    if "text" in config.towers:  # asked for: a model that cannot give it is refused before anything is built
        from .models.text_export import check_text_tower

        check_text_tower(teacher)
    sources = {**src.sources, "calibration": None, "config": config.config_sha256}
    if preprocess.layout != target.layout:
        preprocess = dataclasses.replace(preprocess, layout=target.layout)

    labels, text, head_folder = [], None, None
    if config.head_data is not None:
        head_folder = read_folder(config.head_data, config.captions_file)
        labels = head_folder.labels
        if labels and teacher.text_encoder is not None and teacher.tokenizer is not None:
            text = class_text_embeddings(teacher, labels, list(config.prompts)).numpy()

    h, w = preprocess.size
    shape = (1, 3, h, w) if target.layout == "NCHW" else (1, h, w, 3)
    isa = target_isa(config.isa, config.isa_arch)
    options = {"trt_version": config.trt_version, "target_isa": isa}
    lockfile = decisions.DecisionLock(config.lock, reselect=config.reselect, locked=config.locked)
    blog = _prefixed(config.target, log)
    quantize = _quantize_stage(config, target, backend, encoder, preprocess, options, lockfile, blog, force=force)

    with staged_dir(config.out) as tmp:
        work = tmp / ".candidates"
        work.mkdir()
        with phase(f"{config.target}: export, calibrate, quantize, lower ({target.backend})"):
            built = backend.build(encoder.eval(), shape, spec=target, work=work, quantize=quantize, options=options,
                                  log=blog)
        sources["calibration"] = built.calibration_sha256
        gates = list(config.gates) or list(target.gates)
        with phase(f"{config.target}: measure and verify the candidates ({', '.join(built.candidates)})"):
            selection = _select(built.candidates, target, gates, config, preprocess, log, lockfile)
        chosen = built.candidates[selection["chosen"]]
        shipped = tmp / chosen.name
        for f in backend.artifact_files(chosen):
            f.replace(tmp / f.name)
        variants = _place_variants(built.variants, tmp, blog)
        shutil.rmtree(work)
        for name, content in built.files.items():
            if built.files_for.get(name, selection["chosen"]) != selection["chosen"]:
                continue  # e.g. TensorRT's calibration cache: only meaningful beside an int8 artifact
            atomic_write_text(tmp / name, content)
        artifacts = [file_record(shipped, tmp, format=built.format, runtime=target.runtime, precision=selection["chosen"],
                                 tower="image")]
        for companion in backend.artifact_files(shipped)[1:]:
            artifacts[0].setdefault("companions", []).append(file_record(companion, tmp))
        io_records = backend.io_records(shipped, built.io, target) if backend.io_records else built.io
        engine = backend.recipe(tmp, shipped, selection["chosen"], target, options) if backend.recipe else None
        accelerator = _accelerator_report(target, backend, built, selection["chosen"], shipped, tmp, blog)
        head = None
        if text is not None:
            atomic_write_json(tmp / "labels.json", labels)
            buf = io.BytesIO()
            np.save(buf, text.astype(np.float16))
            atomic_write_bytes(tmp / "text_embeddings.npy", buf.getvalue())
            head = {"kind": "zero-shot", "labels": "labels.json", "text_embeddings": "text_embeddings.npy",
                    "prompts": list(config.prompts), "logit_scale": teacher.logit_scale}
        towers = {"image": {"built": True, "artifact": shipped.name}}
        if "text" in config.towers:
            from .towers import text_tower

            with phase(f"{config.target}: export and check the text tower"):
                towers["text"] = text_tower(config.target, teacher, target, backend, tmp,
                                            _check_texts(labels, config.prompts, head_folder), blog)
            if towers["text"]["built"]:
                artifacts.append(towers["text"].pop("record"))
        if config.head == "zero-shot":
            from .towers import zero_shot_variant

            zs = zero_shot_variant(config.target, target, backend, encoder, shape, shipped, selection["chosen"], text,
                                   teacher, _quantize_stage(config, target, backend, None, preprocess, options, None,
                                                            lambda _: None, variant=True),
                                   options, tmp, blog)
            if zs["built"]:
                artifacts.append(zs.pop("record"))
            if head is not None:
                head["logits"] = zs.get("artifact")
                if not zs["built"]:
                    head["logits_not_built"] = zs["reason"]
        inputs = [dict(r, preprocess=preprocess.to_json()) for r in io_records["inputs"]]
        quantization = None
        if built.quantization is not None:
            quantization = dict(built.quantization, shipped=selection["chosen"] == "int8", quantizer=target.quantizer)
            quantization.pop("delegation", None)
        manifest = {
            "schema": SCHEMA,
            "target": config.target,
            "device": config.device,
            "model": model_name,
            "artifacts": artifacts,
            "inputs": inputs,
            "outputs": io_records["outputs"],
            "head": head,
            "towers": towers,
            "sources": sources,
            "versions": package_versions("torch", *backend.packages),
            "isa": {"build_host": host_isa().record(),  # where the selection's figures were measured
                    "target": None if isa is None else isa.record(), "int8_form": built.int8_form},
            "build": {"backend": target.backend, "opset": io_records.get("opset"), "seconds": round(time.time() - t0, 1),
                      "cache_key": key, "inputs_key": cache_key(dataclasses.replace(config, gates=()))},
            "gates": gates,
            "selection": selection,
            "quantization": quantization,
            "tensorrt": engine,
            "ops": accelerator,
            "delegation": {"shipped": built.delegation[selection["chosen"]], "candidates": built.delegation}
            if built.delegation else None,
            "variants": variants or None,
            "metrics": None,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    lockfile.save(log)
    return CompileOutputs(config.out, manifest)


def _prefixed(target: str, log):
    def blog(text: str) -> None:
        log(f"{target}: {text}")

    return blog


def _quantize_stage(config: CompileConfig, target, backend, encoder, preprocess, options: dict, lockfile, log, *,
                    variant: bool = False, force: bool = False):
    """The quantize stage as the backend calls it: ``quantize(make_program, out) -> stage.Result``.

    Calibration is loaded once, when a program needs it; the stage folder (``config.quantized``) is reused
    when the program's inputs are unchanged; a tolerance runs the fallback search (or takes the lock's
    decision). ``variant``: the zero-shot variant's program (all int8, not cached: its layers differ);
    ``force``: quantize again even when the stage folder is up to date."""
    from .quantize import stage

    calib_cache: dict = {}

    def calibration():
        from .quantize.calibration import load_calibration

        if config.calibration is None:
            raise InputError(f"target {config.target} builds int8 and needs calibration images",
                             hint="set [calibration] path in edgec.toml (an image folder, a list of paths or a captions.jsonl)")
        if "set" not in calib_cache:
            calib_cache["set"] = load_calibration(config.calibration, preprocess)
        return calib_cache["set"]

    def evaluator():
        return stage.float_reference(encoder, target.normalize_output, config.golden, preprocess, calibration, 64)

    def measure(path: Path) -> dict:
        from .bench import measure_artifact

        x_shape = [1, 3, *preprocess.size] if target.layout == "NCHW" else [1, *preprocess.size, 3]
        return measure_artifact(path, target.runtime, x_shape, os.cpu_count() or 1, runs=20, warmup=3)

    def quantize(make_program, out: Path) -> stage.Result:
        settings = stage.Settings(method=config.method, percentile=config.percentile,
                                  tolerance=None if variant else config.tolerance, max_fallback=config.max_fallback)
        if variant:
            program = make_program(calibration(), config.method, config.percentile)
            return stage.run(program, settings, out, log=log)
        key = stage.stage_key({"inputs": cache_key(dataclasses.replace(config, gates=(), head=None, towers=("image",))),
                               "artifact": out.name})
        if config.tolerance is not None:
            decided = lockfile.get(config.target, "float_layers", key)
            if decided is not None:
                settings = dataclasses.replace(settings, float_layers=tuple(decided["float_layers"]), decision=decided)
        hit = None if force else stage.cached(config.quantized, key, out.name)
        if hit is not None and (settings.float_layers is None and config.tolerance is None
                                or [la["name"] for la in hit.record.get("float_layers", [])] == list(settings.float_layers or [])):
            shutil.copy2(hit.path, out)
            log(f"quantize: reused {config.quantized} (inputs unchanged)")
            return stage.Result(out, hit.files, hit.record, cached=True)
        program = make_program(calibration(), config.method, config.percentile)
        log(f"quantize: {program.description}, {len(program.layers)} quantizable layers, "
            f"{program.calibration_images} calibration images")
        result = stage.run(program, settings, out, evaluator=evaluator, measure=measure,
                           log=lambda s: log(f"quantize: {s}"))
        if getattr(program, "report", None) is not None:
            result.record["delegation"] = program.report
        result.record["key"] = key
        if config.tolerance is not None and settings.float_layers is None:
            lockfile.put(config.target, "float_layers", key,
                         {"float_layers": [la["name"] for la in result.record["float_layers"]],
                          "layers": result.record["float_layers"], "search": result.record["search"]})
        stage.save(config.quantized, key, result)
        return result

    return quantize


def _check_texts(labels: list[str], prompts: tuple[str, ...], folder) -> list[str]:
    """The texts a shipped tokenizer must tokenise exactly as the teacher does: label prompts and captions."""
    texts = [p.format(label) for label in labels for p in prompts]
    if folder is not None and folder.has_captions:
        texts += [c for it in folder.items for c in it.captions]
    return texts or ["a photo of a thing."]


def _place_variants(variants: dict[str, dict], folder: Path, log) -> dict:
    """Programs for delegates whose runtime is not on this machine (Core ML): moved into the folder and
    recorded with sha256 and 'verified': false, or the reason they were not built."""
    out = {}
    for name, v in variants.items():
        if "path" not in v:
            log(f"{name} variant not built: {v['reason']}")
            out[name] = {"built": False, "reason": v["reason"]}
            continue
        dest = folder / v["path"].name
        v["path"].replace(dest)
        out[name] = {"built": True, **file_record(dest, folder), **{k: x for k, x in v.items() if k != "path"}}
    return out


def _accelerator_report(target, backend, built, chosen: str, shipped: Path, folder: Path, log) -> dict | None:
    """The shipped artifact's op report (float ops; for accelerators the share that maps and the first
    op that does not) and a vendor compiler's own verdict when the backend has one."""
    if built.report is None:
        return None
    report = dict(built.report[chosen])
    report["candidates_float_ops"] = {p: len(r["float_ops"]) for p, r in built.report.items()}
    if target.constraints.supported_ops:
        first = report["first_unsupported"]
        if first is not None:
            where = f" in layer {first['layer']}" if first.get("layer") else ""
            log(f"first op off the accelerator: #{first['index']} {first['op']}{where} ({'; '.join(first['reasons'])}); "
                f"it and every op after it run on the CPU")
    if backend.accelerator_compile is not None:
        verdict = backend.accelerator_compile(shipped, folder, target)
        if verdict is not None:
            report[target.accelerator_compiler or "accelerator_compiler"] = verdict
    return report


def _select(candidates: dict[str, Path], target, gates: list[str], config: CompileConfig, preprocess, log,
            lockfile=None) -> dict:
    """'fastest-passing': verify every candidate here, ship the fastest that passes the gates; the choice is
    recorded in the lock file and reused while its inputs (and the gates) are unchanged, without timing again.
    'first': ship the first precision listed (targets whose runtime cannot be measured on this machine)."""
    names = list(candidates)
    if target.select == "first" or len(names) == 1 and config.golden is None:
        return {"policy": "first", "chosen": names[0], "candidates": [{"precision": n} for n in names]}
    from .verify.golden import load_golden
    from .verify.run import check_gates, compute_metrics, golden_inputs

    if config.golden is None:
        raise InputError(f"target {config.target} picks the fastest passing precision and needs the golden set",
                         hint="run 'edgec golden' first")
    inputs = sha256_json({"inputs": cache_key(dataclasses.replace(config, gates=())), "gates": gates})
    decided = lockfile.get(config.target, "precision", inputs) if lockfile is not None else None
    golden = load_golden(config.golden)
    x = golden_inputs(golden, preprocess)
    from .runtime.runners import open_runner

    rows = []
    for name, path in candidates.items():
        metrics = compute_metrics(open_runner(path, target.runtime)(x), golden)
        results = [r for r in check_gates(metrics, gates) if not r["metric"].startswith(TOWER_METRIC_PREFIXES)]
        rows.append({"precision": name, "bytes": path.stat().st_size,
                     "metrics": {k: metrics[k] for k in ("agreement", "cosine_mean", "cosine_p1", "accuracy") if k in metrics},
                     "passed": all(r["passed"] for r in results)})
    if decided is not None and any(r["precision"] == decided.get("chosen") and r["passed"] for r in rows):
        timed = {c.get("precision"): c.get("median_ms") for c in decided.get("candidates", [])}
        for r in rows:
            r["median_ms"] = timed.get(r["precision"])
        log(f"{config.target}: shipping {decided['chosen']} (decided earlier, from {config.lock.name}; "
            "--reselect times the candidates again)")
        return {"policy": "fastest-passing", "tie_margin": TIE_MARGIN, "chosen": decided["chosen"], "decided_by": "lock",
                "candidates": rows}
    from .bench import measure_artifact

    for r in rows:
        path = candidates[r["precision"]]
        r["median_ms"] = measure_artifact(path, target.runtime, [1, *x.shape[1:]], os.cpu_count() or 1, runs=30,
                                          warmup=5)["median_ms"]
        log(f"{config.target}: candidate {r['precision']}: {r['median_ms']:.2f} ms, "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()) + (" (passes)" if r["passed"] else " (fails gates)"))
    passing = [r for r in rows if r["passed"]]
    if not passing:
        from .errors import GateFailed

        raise GateFailed(f"target {config.target}: no candidate precision passes the gates {gates}",
                         hint="see the candidate lines above; distil longer or relax the gates")
    chosen = _choose(passing)
    log(f"{config.target}: shipping {chosen} (fastest that passes; within {TIE_MARGIN:.0%} the earlier-listed precision wins)")
    if lockfile is not None:
        lockfile.put(config.target, "precision", inputs, {
            "chosen": chosen, "gates": gates,
            "candidates": [{"precision": r["precision"], "median_ms": round(r["median_ms"], 4), "passed": r["passed"]}
                           for r in rows]})
    return {"policy": "fastest-passing", "tie_margin": TIE_MARGIN, "chosen": chosen, "decided_by": "timing",
            "candidates": rows}


def _choose(passing: list[dict]) -> str:
    """Precisions are listed preferred-first; another one must be clearly faster (beyond timing noise) to ship."""
    best = passing[0]
    for r in passing[1:]:
        if r["median_ms"] < best["median_ms"] * (1 - TIE_MARGIN):
            best = r
    return best["precision"]


def _regated(config: CompileConfig, key: str, log) -> dict | None:
    """Only the gates changed since the folder was built: when the candidates' recorded metrics pick the
    same precision under the new gates, the folder stands (its manifest takes the new gates); when no
    candidate passes them, fail without rebuilding; otherwise None (rebuild)."""
    from .verify.run import check_gates

    path = config.out / "manifest.json"
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        return None
    build = manifest.get("build") or {}
    if not build.get("inputs_key") or build["inputs_key"] != cache_key(dataclasses.replace(config, gates=())):
        return None
    if up_to_date(config, build.get("cache_key")) is None:  # artifacts missing or altered
        return None
    gates = list(config.gates) or list(registry.get("targets", config.target).spec.gates)
    selection = manifest.get("selection") or {}
    if selection.get("policy") == "fastest-passing":
        rows = [dict(r) for r in selection.get("candidates", [])]
        for r in rows:
            results = [g for g in check_gates(r.get("metrics", {}), gates) if not g["metric"].startswith(TOWER_METRIC_PREFIXES)]
            if any(g["value"] is None for g in results):
                return None  # a gate on a metric the candidates did not record: measure again
            r["passed"] = all(g["passed"] for g in results)
        passing = [r for r in rows if r["passed"]]
        if not passing:
            from .errors import GateFailed

            raise GateFailed(f"target {config.target}: no candidate precision passes the gates {gates} "
                             f"(recorded candidate metrics; the inputs are unchanged)",
                             hint=f"see 'selection' in {path}; distil longer or relax the gates")
        if any(r.get("median_ms") is None for r in passing) or _choose(passing) != selection.get("chosen"):
            return None
        manifest["selection"] = dict(selection, candidates=rows)
        # the lock's decision is keyed by the gates too: the same choice, recorded under the new ones
        from .lock import DecisionLock

        lockfile = DecisionLock(config.lock, locked=config.locked)
        inputs = sha256_json({"inputs": build["inputs_key"], "gates": gates})
        if lockfile.get(config.target, "precision", inputs) is None:  # --locked raises here: the lock would change
            lockfile.put(config.target, "precision", inputs, {
                "chosen": selection["chosen"], "gates": gates,
                "candidates": [{"precision": r["precision"], "median_ms": r.get("median_ms"), "passed": r["passed"]}
                               for r in rows]})
            lockfile.save(log)
    manifest["gates"] = gates
    manifest["build"] = dict(build, cache_key=key)
    atomic_write_json(path, manifest)
    log(f"{config.target}: up to date in {config.out} (only the gates changed; the recorded candidates ship the same precision)")
    return manifest


def trt_version_code(version: str) -> int:
    """TensorRT's version number as its calibration caches spell it: 8.6.1 -> 8601, 10.3 -> 100300."""
    parts = [int(p) for p in (version.split(".") + ["0", "0"])[:3]]
    return parts[0] * 10000 + parts[1] * 100 + parts[2] if parts[0] >= 10 else parts[0] * 1000 + parts[1] * 100 + parts[2]


def check_device(manifest: dict, folder: Path, device_name: str) -> list[str]:
    """Constraints of a device profile against a built target folder; returns notes (raises on a hard miss)."""
    dev = registry.get("devices", device_name).spec
    notes = []
    size = sum(a["bytes"] for a in manifest["artifacts"])
    if dev.memory_gb is not None and size > dev.memory_gb * 1e9 * 0.5:
        raise InputError(f"the artifact ({size / 1e6:.1f} MB) exceeds half of {device_name}'s {dev.memory_gb:g} GB memory",
                         hint="use a smaller student")
    if dev.accelerator_memory_mb is not None and size > dev.accelerator_memory_mb * 1e6:
        notes.append(f"{size / 1e6:.1f} MB of parameters exceed the {dev.accelerator_memory_mb:g} MB on-chip memory of "
                     f"{device_name}: the rest streams from host memory, which is slower")
    return notes


def ensure_golden(cfg: EdgecConfig, target: str, log=print, *, needed: bool = False) -> Path:
    """``<build>/golden``, computed first when it is missing and [data] eval is set, for every target ('edgec
    verify' needs it next); without eval data, refused when ``target`` picks its precision against it (or
    ``needed``: a quantize tolerance measures against it)."""
    golden = cfg.resolve(cfg.targets.out) / "golden"
    spec = registry.get("targets", target).spec
    picks = spec.select == "fastest-passing" and len(spec.precisions) > 1
    if not (golden / "golden.json").is_file():  # every target: 'edgec verify' needs it next
        if cfg.data.eval is None:
            if not (picks or needed):
                return golden
            raise InputError(f"target {target} measures its candidates against the golden set, which needs [data] eval")
        from .verify.golden import GoldenConfig, build_golden

        log(f"{target}: no golden set yet; computing it first")
        with phase("golden: the teacher's outputs on the eval set"):
            build_golden(GoldenConfig.from_edgec(cfg, out=golden), log=log)
    return golden


def compile_from_config(cfg: EdgecConfig, target: str, *, no_distill: bool = False, out: Path | None = None,
                        config_path: Path | None = None, progress: bool = True, device: str | None = None,
                        force: bool = False, log=print, student_dir: Path | None = None,
                        towers: tuple[str, ...] | None = None, head: str | None = None,
                        cached_only: bool = False, reselect: bool = False, locked: bool = False) -> CompileOutputs | None:
    """Compile ``target`` from edgec.toml, distilling the student first when it is missing or its inputs
    changed (``student_dir``: a student folder already made for this target). ``towers`` and ``head``
    ("embedding" or "zero-shot") override ``[targets] towers`` and ``head``. ``cached_only``: None unless
    the target folder is up to date (nothing is built). Decisions that depend on timing or search are
    read from and written to ``edgec.lock`` beside the config (``reselect``: decide again; ``locked``:
    fail instead of changing it)."""
    from .backends import get as get_backend_record
    from .distill import DistillConfig
    from .distill.stage import ensure_student

    registry.get("targets", target)  # fail on an unknown target before any work
    device = device or cfg.targets.device
    dev = registry.get("devices", device).spec if device else None
    if dev is not None and dev.target != target:
        raise InputError(f"device {device} takes target {dev.target!r}, not {target!r}", hint=f"use --target {dev.target}")
    if cfg.model is None:
        raise InputError("edgec.toml has no [model] section", hint="add [model] path = ...")
    teacher = dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path)))
    build = cfg.resolve(cfg.targets.out)
    for key, value in (("[calibration] path", cfg.calibration.path), ("[data] eval", cfg.data.eval),
                       ("[data] train", None if no_distill or student_dir is not None else cfg.data.train)):
        if value is not None and not cfg.resolve(value).exists():  # before the golden set or a student is made
            raise InputError(f"{key} not found: {cfg.resolve(value)}", hint=f"fix {key} in edgec.toml")
    if "int8" in registry.get("targets", target).spec.precisions:  # before any stage runs
        if not cfg.calibration.path:
            raise InputError(f"target {target} builds int8 and needs calibration images",
                             hint="set [calibration] path in edgec.toml (an image folder, a list of paths or a captions.jsonl)")
        from .quantize.calibration import check_source

        check_source(cfg.resolve(cfg.calibration.path))
    if not no_distill and student_dir is None:  # distilled unless a student made from the same inputs is there
        dcfg = DistillConfig.from_edgec(cfg, target=target)
        student_dir = ensure_student(dcfg, progress=progress, log=log, label=f"{target}: distill {dcfg.student}").student
    head_data = cfg.resolve(cfg.data.eval or cfg.data.train)
    config_sha = sha256_file(config_path) if config_path and config_path.is_file() else None
    calibration = None
    if cfg.calibration.path:
        calibration = CalibrationSpec(cfg.resolve(cfg.calibration.path), cfg.calibration.num_images,
                                      cfg.calibration.min_images, cfg.calibration.seed, cfg.data.max_bad_fraction)
    spec = registry.get("targets", target).spec
    tolerance = cfg.quantize.tolerance_for(target) if "int8" in spec.precisions else None
    golden = ensure_golden(cfg, target, log, needed=tolerance is not None)
    method = cfg.quantize.method_for(target)
    if "int8" in spec.precisions:  # a method the target's quantizer does not honour is refused, never replaced
        method = get_backend_record(spec.backend).method(spec.quantizer, method, where=f"target {target}: ")
    root = config_path.resolve().parent if config_path else cfg.root
    ccfg = CompileConfig(target=target, out=out or build / target, teacher=teacher,
                         source="teacher" if no_distill else "student", student=student_dir, head_data=head_data,
                         prompts=tuple(cfg.data.prompts), captions_file=cfg.data.captions, device=device,
                         config_sha256=config_sha, gates=tuple(cfg.gates_for(target)), calibration=calibration,
                         trt_version=trt_version_code(dev.runtimes["tensorrt"]) if dev and "tensorrt" in dev.runtimes else 100300,
                         isa_arch=getattr(dev, "arch", None), isa=tuple(getattr(dev, "isa", None) or ()),
                         method=method, percentile=cfg.quantize.percentile, tolerance=tolerance,
                         max_fallback=cfg.quantize.max_fallback, quantized=build / "quantized" / target,
                         lock=Path(root) / DECISIONS_FILE, reselect=reselect, locked=locked,
                         golden=golden if (golden / "golden.json").is_file() else None,
                         towers=tuple(towers or cfg.targets.towers),
                         head=None if (head or cfg.targets.head) == "embedding" else (head or cfg.targets.head))
    result = run(ccfg, log=log, force=force, cached_only=cached_only)
    if result is None:
        return None
    if device:
        for note in check_device(result.manifest, result.out, device):
            log(f"{target}: note: {note}")
    return result


def __getattr__(name: str):  # the process pool has its own module; these names stay importable from here
    if name in ("compile_many", "TargetResult"):
        from . import compile_many as pool

        return getattr(pool, name)
    raise AttributeError(name)

