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
from .manifest import (atomic_write_bytes, atomic_write_json, atomic_write_text, file_record, package_versions,
                       read_json, sha256_file, sha256_json, staged_dir)
from .quantize.calibration import CalibrationSpec
from .quantize.methods import method_for

SCHEMA = 1
TIE_MARGIN = 0.10  # latencies closer than this are a tie (sub-ms timings on a busy CPU vary by ~20 %)
TOWERS = ("image", "text")
# metrics of the text tower and the zero-shot variant: verify checks them, image candidates cannot
TOWER_METRIC_PREFIXES = ("text_", "artifacts_", "logits_")
HEADS = (None, "zero-shot")
VERSION_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "tflite": ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
                    "pte": ("executorch", "torchao")}


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
    settings = {k: v for k, v in config.items() if k not in ("out", "config_sha256")}
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
    if not force and (cached := up_to_date(config, key)) is not None:
        log(f"{config.target}: up to date in {config.out} (inputs unchanged; --force rebuilds)")
        return CompileOutputs(config.out, cached, cached=True)
    if not force and (cached := _regated(config, key, log)) is not None:
        return CompileOutputs(config.out, cached, cached=True)
    if cached_only:
        return None
    from .backends import get_backend
    from .data.folder import read_folder
    from .models.intake import load_image_source
    from .models.zeroshot import class_text_embeddings

    t0 = time.time()
    entry = registry.get("targets", config.target)
    target = entry.spec
    backend = get_backend(target.backend)
    src = load_image_source(config.teacher, config.source, config.student)
    teacher, encoder, preprocess, model_name = src.teacher, src.encoder, src.preprocess, src.name
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
    calib_cache: dict = {}

    def calibration():
        from .quantize.calibration import load_calibration

        if config.calibration is None:
            raise InputError(f"target {config.target} builds int8 and needs calibration images",
                             hint="set [calibration] path in edgec.toml (an image folder, a list of paths or a captions.jsonl)")
        if "set" not in calib_cache:
            calib_cache["set"] = load_calibration(config.calibration, preprocess)
        return calib_cache["set"]

    def blog(text: str) -> None:
        log(f"{config.target}: {text}")

    with staged_dir(config.out) as tmp:
        work = tmp / ".candidates"
        work.mkdir()
        built = backend.build(encoder.eval(), shape, spec=target, work=work, calibration=calibration, method=config.method,
                              percentile=config.percentile, trt_version=config.trt_version, log=blog)
        sources["calibration"] = built.calibration_sha256
        gates = list(config.gates) or list(target.gates)
        selection = _select(built.candidates, target, gates, config, preprocess, log)
        chosen = built.candidates[selection["chosen"]]
        shipped = tmp / chosen.name
        chosen.replace(shipped)
        variants = _place_variants(built.variants, tmp, blog)
        shutil.rmtree(work)
        for name, content in built.files.items():
            if name == "calibration.cache" and selection["chosen"] != "int8":
                continue  # only meaningful beside an int8 artifact
            atomic_write_text(tmp / name, content)
        artifacts = [file_record(shipped, tmp, format=built.format, runtime=target.runtime, precision=selection["chosen"],
                                 tower="image")]
        io_records = built.io
        if built.format == "tflite":
            io_records = backend.tensor_records(shipped, normalized=target.normalize_output)
        engine = None
        if target.runtime == "tensorrt":
            engine = _tensorrt_recipe(tmp, shipped, selection["chosen"], config)
        accelerator = _accelerator_report(target, built, selection["chosen"], shipped, tmp, blog)
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
            towers["text"] = _text_tower(config.target, teacher, target, backend, tmp, _check_texts(labels, config.prompts, head_folder), blog)
            if towers["text"]["built"]:
                artifacts.append(towers["text"].pop("record"))
        if config.head == "zero-shot":
            zs = _zero_shot_variant(config, target, backend, encoder, shape, shipped, selection["chosen"], text, teacher,
                                    calibration, tmp, blog)
            if zs["built"]:
                artifacts.append(zs.pop("record"))
            if head is not None:
                head["logits"] = zs.get("artifact")
                if not zs["built"]:
                    head["logits_not_built"] = zs["reason"]
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
            "towers": towers,
            "sources": sources,
            "versions": package_versions("torch", *VERSION_PACKAGES[built.format]),
            "build": {"backend": target.backend, "opset": io_records.get("opset"), "seconds": round(time.time() - t0, 1),
                      "cache_key": key, "inputs_key": cache_key(dataclasses.replace(config, gates=()))},
            "gates": gates,
            "selection": selection,
            "tensorrt": engine,
            "ops": accelerator,
            "delegation": {"shipped": built.delegation[selection["chosen"]], "candidates": built.delegation}
            if built.delegation else None,
            "variants": variants or None,
            "metrics": None,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return CompileOutputs(config.out, manifest)


TEXT_SUFFIX = {"onnx": "onnx", "litert": "tflite", "executorch": "pte"}


def _check_texts(labels: list[str], prompts: tuple[str, ...], folder) -> list[str]:
    """The texts a shipped tokenizer must tokenise exactly as the teacher does: label prompts and captions."""
    texts = [p.format(label) for label in labels for p in prompts]
    if folder is not None and folder.has_captions:
        texts += [c for it in folder.items for c in it.captions]
    return texts or ["a photo of a thing."]


def _text_tower(name: str, teacher, target, backend, folder: Path, texts: list[str], log) -> dict:
    """The teacher's text tower (fp32, int32 token ids, no ArgMax) and its tokenizer files in ``folder/tokenizer``.

    fp32 because it runs once per label set (or per query), not per image: its latency matters little and
    int8 would only cost agreement. Returns {"built": True, "record": artifact record} or {"built": False,
    "reason": ...} (the image artifact ships either way; the reason goes into the manifest)."""
    import numpy as np

    from .models.text_export import ship_tokenizer, text_export_module
    from .runtime.tokenize import tokenize

    if target.constraints.fully_integer or target.constraints.supported_ops:
        reason = (f"target {name} runs fully integer image models on an accelerator; a text tower (token "
                  "embedding gather, LayerNorm, attention) does not map onto it. Compile the text tower for cpu, "
                  "android or ios; for zero-shot use ship text_embeddings.npy (written here)")
        log(f"text tower not built: {reason}")
        return {"built": False, "reason": reason}
    if not hasattr(backend, "export_text") or target.backend not in TEXT_SUFFIX:
        reason = f"the {target.backend} backend has no text-tower export"
        log(f"text tower not built: {reason}")
        return {"built": False, "reason": reason}
    tok_dir = folder / "tokenizer"
    try:
        module, pooling = text_export_module(teacher)
        tokenizer = ship_tokenizer(teacher, tok_dir, check=texts)
        path = folder / f"text.fp32.{TEXT_SUFFIX[target.backend]}"
        length = pooling["context_length"]
        if target.backend == "onnx":
            io_records = backend.export_text(module, length, path, dynamic_batch=not target.constraints.static_shapes)
        else:
            io_records = backend.export_text(module, length, path)
    except InputError as exc:
        shutil.rmtree(tok_dir, ignore_errors=True)
        for f in folder.glob("text.fp32.*"):
            f.unlink()
        log(f"text tower not built: {exc}")
        return {"built": False, "reason": str(exc)}
    # the artifact in its own runtime against the eager teacher, on every text the tokenizer was checked on
    from .runtime.runners import open_runner

    ids = tokenize(teacher.tokenizer, texts)
    got = open_runner(path, target.runtime)(ids)
    ref = teacher.encode_text(torch_ids(ids)).numpy()
    cos = np.sum(got * ref, axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    check = {"texts": len(texts), "max_abs_diff": float(np.abs(got - ref).max()), "cosine_min": float(cos.min())}
    log(f"text tower: fp32 {path.name} ({path.stat().st_size / 1e6:.2f} MB), int32 ids of length {length}, "
        f"pooling: {pooling['how']}; vs eager teacher on {len(texts)} texts: max |diff| {check['max_abs_diff']:.2e}")
    record = file_record(path, folder, format=TEXT_SUFFIX[target.backend], runtime=target.runtime, precision="fp32",
                         tower="text", inputs=io_records["inputs"], outputs=io_records["outputs"], tokenizer=tokenizer,
                         pooling=pooling, check=check)
    if io_records.get("delegation"):
        record["delegation"] = io_records["delegation"]
    if target.runtime == "tensorrt":
        record["engine_not_built"] = (f"build its engine on the device like the image model's: trtexec --onnx={path.name} "
                                      "--saveEngine=text.engine (fp32 ONNX; add --fp16 only after checking the cosine)")
    return {"built": True, "record": record, "artifact": path.name}


ZERO_SHOT_NAME = "model.zeroshot"


def _zero_shot_variant(config: CompileConfig, target, backend, encoder, shape, shipped: Path, precision: str, text,
                       teacher, calibration, folder: Path, log) -> dict:
    """The image model with the head folded in: logits = logit_scale * normalize(image) @ text.T (+ logit_bias).

    ``text`` are the label embeddings as shipped in text_embeddings.npy (fp16, widened), so the logits
    artifact decides exactly as an app using the embedding artifact and the head files. ONNX: the nodes
    are appended to the shipped graph (same image part, int8 Q/DQ included); other backends build the
    wrapped model again at the shipped precision (re-quantized: top-1 may differ on near-ties)."""
    import numpy as np

    if text is None:
        reason = "no label text embeddings (the eval/train folder has no class sub-folders, or the teacher no text tower)"
    elif target.constraints.fully_integer:
        reason = (f"target {config.target} must stay fully integer, and the folded head normalises in float; "
                  "apply text_embeddings.npy in the app")
    else:
        reason = None
    if reason:
        log(f"zero-shot variant not built: {reason}")
        return {"built": False, "reason": reason}
    matrix = np.asarray(text, np.float16).astype(np.float32)  # (C, D), exactly text_embeddings.npy
    bias = teacher.logit_bias
    if target.backend == "onnx":
        path = folder / f"{ZERO_SHOT_NAME}.onnx"
        _fold_head_onnx(shipped, path, matrix, teacher.logit_scale, bias, normalize=not target.normalize_output)
        expected = 1.0
        inputs = None
    else:
        import torch

        from .backends.onnx import ZeroShotLogits

        spec = dataclasses.replace(target, precisions=[precision], normalize_output=False)
        work = folder / ".zeroshot"
        work.mkdir()
        module = ZeroShotLogits(encoder, torch.from_numpy(matrix), teacher.logit_scale, bias).eval()
        built = backend.build(module, shape, spec=spec, work=work, calibration=calibration, method=config.method,
                              percentile=config.percentile, trt_version=config.trt_version, log=lambda _: None)
        src = built.candidates[precision]
        path = folder / f"{ZERO_SHOT_NAME}{src.suffix}"
        src.replace(path)
        shutil.rmtree(work)
        expected = 0.97 if precision == "int8" else 1.0
        inputs = backend.tensor_records(path, normalized=False)["inputs"] if built.format == "tflite" else None
    log(f"zero-shot variant: {path.name} ({precision}, {len(matrix)} labels folded in, logits out)")
    record = file_record(path, folder, format=TEXT_SUFFIX[target.backend], runtime=target.runtime, precision=precision,
                         tower="zero-shot", labels="labels.json",
                         outputs=[{"name": "logits", "shape": [1, len(matrix)], "dtype": "float32"}],
                         expected_logits_agreement=expected)
    if inputs is not None:
        record["inputs"] = inputs
    return {"built": True, "record": record, "artifact": path.name}


def _fold_head_onnx(src: Path, dst: Path, text, scale: float, bias: float | None, *, normalize: bool) -> None:
    """Append normalize (when the graph does not) -> MatMul(text.T) -> Mul(scale) [-> Add(bias)] to ``src``'s output."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    out = g.output[0]
    x = out.name
    nodes = []
    if normalize:
        nodes.append(helper.make_node("LpNormalization", [x], ["zs_normalized"], axis=-1, p=2))
        x = "zs_normalized"
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(text.T, np.float32), "zs_text"),
                          numpy_helper.from_array(np.asarray(scale, np.float32), "zs_scale")])
    nodes += [helper.make_node("MatMul", [x, "zs_text"], ["zs_sims"]),
              helper.make_node("Mul", ["zs_sims", "zs_scale"], ["logits" if bias is None else "zs_scaled"])]
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(np.asarray(bias, np.float32), "zs_bias"))
        nodes.append(helper.make_node("Add", ["zs_scaled", "zs_bias"], ["logits"]))
    g.node.extend(nodes)
    batch = out.type.tensor_type.shape.dim[0]
    logits = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                           [batch.dim_param or batch.dim_value, int(text.shape[0])])
    del g.output[:]
    g.output.append(logits)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def torch_ids(ids):
    import torch

    return torch.from_numpy(ids.astype("int64"))


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


def _tensorrt_recipe(folder: Path, onnx_file: Path, precision: str, config: CompileConfig) -> dict:
    """build_engine.sh with the trtexec command; engines are specific to the TensorRT version and GPU,
    so they are built on the device. Returns the manifest's 'tensorrt' record."""
    flags = ["--int8", "--fp16"] if precision == "int8" else ["--fp16"] if precision == "fp16" else []
    cmd = " ".join(["trtexec", f"--onnx={onnx_file.name}", *flags, "--memPoolSize=workspace:1024",
                    "--saveEngine=model.engine", "--skipInference"])
    script = f"""#!/usr/bin/env bash
# Build the TensorRT engine on the Jetson itself: an engine is tied to the TensorRT version and
# the GPU it was built on. {onnx_file.name} carries explicit Q/DQ int8 nodes (TensorRT's
# explicit quantization); --fp16 lets layers without Q/DQ run in fp16 instead of fp32.
# calibration.cache holds the same activation ranges in TensorRT's cache format (version-specific).
set -euo pipefail
cd "$(dirname "$0")"
command -v trtexec >/dev/null || {{ echo "trtexec not found: it ships with TensorRT (JetPack: /usr/src/tensorrt/bin)" >&2; exit 3; }}
{cmd}
echo "wrote $(pwd)/model.engine"
"""
    path = folder / "build_engine.sh"
    atomic_write_text(path, script)
    path.chmod(0o755)
    return {"build_script": "build_engine.sh", "command": cmd, "engine": None, "trt_version_for_cache": config.trt_version,
            "engine_not_built": "TensorRT engines are built on the device: run build_engine.sh there "
                                "(this machine has no TensorRT GPU build)"}


def _accelerator_report(target, built, chosen: str, shipped: Path, folder: Path, log) -> dict | None:
    """The shipped artifact's op report (float ops; for accelerators the share that maps and the first
    op that does not) and, for the Edge TPU, edgetpu_compiler's own verdict when it is installed."""
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
    if target.accelerator_compiler == "edgetpu_compiler":
        from .backends.litert import run_edgetpu_compiler

        compiled = run_edgetpu_compiler(shipped, folder)
        report["edgetpu_compiler"] = compiled if compiled is not None else {
            "ran": False, "reason": "edgetpu_compiler is not on PATH: the mapping above is edgec's check against the "
                                    "Edge TPU's documented op list and constraints; install the compiler for its own verdict"}
    return report


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
        results = [r for r in check_gates(metrics, gates) if not r["metric"].startswith(TOWER_METRIC_PREFIXES)]
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
    chosen = _choose(passing)
    log(f"{config.target}: shipping {chosen} (fastest that passes; within {TIE_MARGIN:.0%} the earlier-listed precision wins)")
    return {"policy": "fastest-passing", "tie_margin": TIE_MARGIN, "chosen": chosen, "candidates": rows}


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
        if _choose(passing) != selection.get("chosen"):
            return None
        manifest["selection"] = dict(selection, candidates=rows)
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


def ensure_golden(cfg: EdgecConfig, target: str, log=print) -> Path:
    """``<build>/golden``, computed first when ``target`` picks its precision against it and it is missing."""
    golden = cfg.resolve(cfg.targets.out) / "golden"
    spec = registry.get("targets", target).spec
    if spec.select == "fastest-passing" and len(spec.precisions) > 1 and not (golden / "golden.json").is_file():
        if cfg.data.eval is None:
            raise InputError(f"target {target} measures its candidates against the golden set, which needs [data] eval")
        from .verify.golden import GoldenConfig, build_golden

        log(f"{target}: no golden set yet; computing it first")
        build_golden(GoldenConfig.from_edgec(cfg, out=golden), log=log)
    return golden


def compile_from_config(cfg: EdgecConfig, target: str, *, no_distill: bool = False, out: Path | None = None,
                        config_path: Path | None = None, progress: bool = True, device: str | None = None,
                        force: bool = False, log=print, student_dir: Path | None = None,
                        towers: tuple[str, ...] | None = None, head: str | None = None,
                        cached_only: bool = False) -> CompileOutputs | None:
    """Compile ``target`` from edgec.toml, distilling the student first when it is missing or its inputs
    changed (``student_dir``: a student folder already made for this target). ``towers`` and ``head``
    ("embedding" or "zero-shot") override ``[targets] towers`` and ``head``. ``cached_only``: None unless
    the target folder is up to date (nothing is built)."""
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
    if not no_distill and student_dir is None:  # distilled unless a student made from the same inputs is there
        dcfg = DistillConfig.from_edgec(cfg, target=target)
        student_dir = ensure_student(dcfg, progress=progress, log=log, label=f"{target}: distill {dcfg.student}").student
    head_data = cfg.resolve(cfg.data.eval or cfg.data.train)
    config_sha = sha256_file(config_path) if config_path and config_path.is_file() else None
    calibration = None
    if cfg.calibration.path:
        calibration = CalibrationSpec(cfg.resolve(cfg.calibration.path), cfg.calibration.num_images,
                                      cfg.calibration.min_images, cfg.calibration.seed, cfg.data.max_bad_fraction)
    golden = ensure_golden(cfg, target, log)
    spec = registry.get("targets", target).spec
    ccfg = CompileConfig(target=target, out=out or build / target, teacher=teacher,
                         source="teacher" if no_distill else "student", student=student_dir, head_data=head_data,
                         prompts=tuple(cfg.data.prompts), captions_file=cfg.data.captions, device=device,
                         config_sha256=config_sha, gates=tuple(cfg.gates_for(target)), calibration=calibration,
                         trt_version=trt_version_code(dev.runtimes["tensorrt"]) if dev and "tensorrt" in dev.runtimes else 100300,
                         method=method_for(spec.backend, cfg.quantize.method), percentile=cfg.quantize.percentile,
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


@dataclass
class TargetResult:
    """One target of :func:`compile_many`: its outputs, or the error that stopped it."""

    target: str
    status: Literal["ran", "cached", "failed"]
    seconds: float
    output: CompileOutputs | None = None
    error: str | None = None
    hint: str | None = None
    exit_code: int | None = None  # the EdgecError's exit code; None for an unexpected exception (a bug)


def compile_many(cfg: EdgecConfig, targets: list[str], *, jobs: int | None = None, no_distill: bool = False,
                 config_path: Path | None = None, progress: bool = True, device: str | None = None, force: bool = False,
                 towers: tuple[str, ...] | None = None, head: str | None = None,
                 student_dirs: dict[str, Path] | None = None, log=print) -> dict[str, TargetResult]:
    """Compile several targets: the distinct students distilled first (serially, each once) and the golden
    set made, then the targets in parallel, each in its own process (torch exports are not thread-safe),
    ``jobs`` at a time (default: min(targets, cores)). Every target runs to its end: the results hold each
    one's outputs or error. Log lines of the workers come prefixed with their target.

    ``student_dirs`` (target -> student folder) skips the distillation step for those targets (``edgec
    release`` distils on its own). The caller holds the build lock; the workers do not take it."""
    from .distill import DistillConfig
    from .distill.stage import ensure_student

    for t in targets:
        registry.get("targets", t)  # unknown names fail before any work
    if cfg.model is None:
        raise InputError("edgec.toml has no [model] section", hint="add [model] path = ...")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(targets)))
    students = dict(student_dirs or {})
    if not no_distill:
        made: dict[Path, Path] = {}
        for t in targets:
            if t in students:
                continue
            dcfg = DistillConfig.from_edgec(cfg, target=t)
            if dcfg.out not in made:
                made[dcfg.out] = ensure_student(dcfg, progress=progress, log=log, label=f"distill {dcfg.student}").student
            students[t] = made[dcfg.out]
    for t in targets:  # before the workers start, so that no two of them compute it at once
        ensure_golden(cfg, t, log)
    kwargs = {"no_distill": no_distill, "config_path": config_path, "device": device, "force": force,
              "towers": towers, "head": head}
    results: dict[str, TargetResult] = {}
    if not force:  # up-to-date targets are settled here: a worker process costs seconds of start-up
        for t in targets:
            with contextlib.suppress(EdgecError):  # its own run reports the error
                if (res := compile_from_config(cfg, t, progress=False, log=log, student_dir=students.get(t),
                                               cached_only=True, **kwargs)) is not None:
                    results[t] = TargetResult(t, "cached", 0.0, output=res)
    todo = [t for t in targets if t not in results]
    if len(todo) <= 1 or jobs == 1:
        results.update({t: _compile_one(cfg, t, students.get(t), kwargs, log, threads=None) for t in todo})
    else:
        results.update(_compile_parallel(cfg, todo, students, kwargs, min(jobs, len(todo)), log))
    return {t: results[t] for t in targets}


def _compile_one(cfg: EdgecConfig, target: str, student_dir: Path | None, kwargs: dict, log, threads: int | None) -> TargetResult:
    from .errors import EdgecError

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        res = compile_from_config(cfg, target, progress=False, log=log, student_dir=student_dir, **kwargs)
    except EdgecError as exc:
        log(f"{target}: FAILED: {exc}")
        return TargetResult(target, "failed", round(time.time() - t0, 1), error=exc.message, hint=exc.hint,
                            exit_code=exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one target's bug must not lose the others' results
        import traceback

        log(f"{target}: FAILED with an unexpected error: {type(exc).__name__}: {exc}")
        return TargetResult(target, "failed", round(time.time() - t0, 1), error=f"{type(exc).__name__}: {exc}",
                            hint="this is a bug in edgec; the traceback: " + traceback.format_exc(limit=-3)[-1500:])
    return TargetResult(target, "cached" if res.cached else "ran", round(time.time() - t0, 1), output=res)


def _worker(cfg: EdgecConfig, target: str, student_dir: Path | None, kwargs: dict, queue, threads: int) -> TargetResult:
    """One target in a fresh process; log lines go back through ``queue``."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return _compile_one(cfg, target, student_dir, kwargs, queue.put, threads)


def _compile_parallel(cfg: EdgecConfig, targets: list[str], students: dict, kwargs: dict, jobs: int, log) -> dict:
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"compiling {len(targets)} targets, {jobs} at a time, each in its own process ({threads} thread(s) each): "
        + ", ".join(targets))
    log("note: the fastest-passing choice times candidates while other targets compile; timings are noisier than alone")
    ctx = mp.get_context("spawn")  # a fresh interpreter per target: no torch/exporter state shared or forked
    results: dict[str, TargetResult] = {}
    with ctx.Manager() as manager:
        queue = manager.Queue()
        drain = threading.Thread(target=_drain, args=(queue, log), daemon=True)
        drain.start()
        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
                futures = {pool.submit(_worker, cfg, t, students.get(t), kwargs, queue, threads): t for t in targets}
                for t in targets[:jobs]:
                    log(f"{t}: started")
                pending = targets[jobs:]
                for fut in as_completed(futures):
                    t = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process died (killed, out of memory)
                        res = TargetResult(t, "failed", 0.0, error=f"worker process failed: {type(exc).__name__}: {exc}")
                    results[t] = res
                    done = f"[{len(results)}/{len(targets)}]"
                    log(f"{done} {t}: {res.status}" + (f" in {res.seconds:.0f} s" if res.status != "failed" else f": {res.error}"))
                    if pending:
                        log(f"{pending.pop(0)}: started")
        finally:
            queue.put(None)
            drain.join(timeout=5)
    return {t: results[t] for t in targets}


def _drain(queue, log) -> None:
    while (line := queue.get()) is not None:
        log(line)
