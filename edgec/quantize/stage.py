"""The quantize stage that compile consumes: one target's int8 program, exactly as it ships.

A backend builds its quantizable *program* for the target's quantizer and the configured method
(:class:`Program`); this stage then, when a tolerance is set, ranks the program's layers and
searches the float fallback (:mod:`edgec.quantize.sensitivity`), or takes the float layers a lock
file decided earlier, writes the artifact with those layers in float, and records what it did:
method, calibration hash, float layers with their measured gain, and their size/latency cost.

The stage's output folder (``<build>/quantized/<target>/``: the artifact and ``quantize.json``)
is keyed by everything the program depends on, so an unchanged program is reused without
calibrating again; the key never includes where files are.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..manifest import atomic_write_json, atomic_write_text, read_json, sha256_file, sha256_json

SCHEMA = 1
STAGE_JSON = "quantize.json"
Runner = Callable[[np.ndarray], np.ndarray]


class Program(Protocol):
    """A backend's int8 program before it is written: calibrated once, written with any layers in float."""

    layers: list[dict]  # quantizable layers in execution order: {"name", "op", "params", optional "label"}
    calibration_sha256: str
    calibration_images: int
    description: str  # one line: the quantizer and its form

    def runner(self, keep_float: frozenset[str] = frozenset(), only: frozenset[str] | None = None) -> Runner:
        """NCHW float32 images -> embeddings of the program with ``keep_float`` layers in float."""

    def write(self, out: Path, keep_float: frozenset[str] = frozenset()) -> dict[str, str]:
        """Write the artifact to ``out``; returns text files that go beside it (name -> content)."""


@dataclass(frozen=True)
class Settings:
    method: str
    percentile: float = 99.999
    tolerance: float | None = None
    max_fallback: int = 16
    eval_images: int = 64  # images the fallback search measures on (the golden set's, spread evenly)
    float_layers: tuple[str, ...] | None = None  # decided before (the lock file): no search
    decision: dict | None = None  # the lock's record of that decision (gains, loss), copied into the record


@dataclass
class Result:
    path: Path
    files: dict[str, str]
    record: dict
    cached: bool = False


def stage_key(parts: dict) -> str:
    return sha256_json({"schema": SCHEMA, **parts})


def cached(folder: Path | None, key: str, name: str) -> Result | None:
    """The stage folder's program when it was made from the same inputs and is intact."""
    if folder is None:
        return None
    meta = read_json(folder / STAGE_JSON)
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    path = folder / name
    if not path.is_file() or sha256_file(path) != meta.get("sha256"):
        return None
    files = {f: (folder / f).read_text() for f in meta.get("files", []) if (folder / f).is_file()}
    if len(files) != len(meta.get("files", [])):
        return None
    return Result(path, files, dict(meta["record"], status="cached"), cached=True)


def save(folder: Path | None, key: str, result: Result, companions: list[Path] = ()) -> None:
    """Keep the program (and its companion files) in the stage folder for the next build."""
    if folder is None:
        return
    from ..manifest import staged_dir

    with staged_dir(folder) as tmp:
        shutil.copy2(result.path, tmp / result.path.name)
        for c in companions:
            shutil.copy2(c, tmp / c.name)
        for name, text in result.files.items():
            atomic_write_text(tmp / name, text)
        atomic_write_json(tmp / STAGE_JSON, {"schema": SCHEMA, "key": key, "artifact": result.path.name,
                                             "sha256": sha256_file(result.path), "files": sorted(result.files),
                                             "record": result.record})


def run(program: Program, settings: Settings, out: Path, *, evaluator: Callable[[], object] | None = None,
        measure: Callable[[Path], dict] | None = None, log=print) -> Result:
    """Write ``program`` to ``out`` as it ships: all int8, or with the float layers the tolerance needs.

    ``evaluator`` gives the :class:`edgec.quantize.sensitivity.Evaluator` (float model's embeddings, the
    teacher's zero-shot) the search measures against; ``measure`` times an artifact in its runtime for
    the cost record (bytes and median latency of the program with and without its float layers)."""
    from .sensitivity import fallback_search, rank_layers

    t0 = time.time()
    record = {"method": settings.method, "percentile": settings.percentile if settings.method == "percentile" else None,
              "calibration_sha256": program.calibration_sha256, "calibration_images": program.calibration_images,
              "form": program.description, "quantizable_layers": len(program.layers), "tolerance": settings.tolerance,
              "float_layers": [], "search": None, "cost": None, "status": "ran"}
    names = {la["name"] for la in program.layers}
    keep: frozenset[str] = frozenset()
    if settings.float_layers is not None:
        unknown = [n for n in settings.float_layers if n not in names]
        if unknown:  # the lock names layers this program does not have: its inputs changed without its key
            from ..errors import InputError

            raise InputError(f"the lock file keeps layer {unknown[0]!r} in float, which this program does not have",
                             hint="run again with --reselect to search the fallback anew")
        keep = frozenset(settings.float_layers)
        decision = settings.decision or {}
        record["float_layers"] = list(decision.get("layers") or [{"name": n} for n in settings.float_layers])
        record["search"] = dict(decision.get("search") or {}, decided_by="lock")
        if keep:
            log(f"{len(keep)} float layer(s) from the lock file (no search)")
    elif settings.tolerance is not None:
        if evaluator is None:
            from ..errors import InputError

            raise InputError("a quantize tolerance needs the golden set to measure against",
                             hint="set [data] eval in edgec.toml (compile computes the golden set from it)")
        ev = evaluator()
        ranking = rank_layers(program, ev, log=log)
        found = fallback_search(program, ev, ranking, settings.tolerance, max_layers=settings.max_fallback, log=log)
        keep = frozenset(la["name"] for la in found["float_layers"])
        record["float_layers"] = [{"name": la["name"], "label": la.get("label", la["name"]), "params": la.get("params", 0),
                                   # measured gain: how much the loss grows when this layer alone goes back to int8
                                   "gain": la.get("loss_delta")} for la in found["float_layers"]]
        record["search"] = {"decided_by": "search", "tolerance": settings.tolerance, "met": found["met"],
                            "loss": found["loss"], "int8_loss": found["int8_loss"],
                            "cosine_mean": found["metrics"]["cosine_mean"],
                            "int8_cosine_mean": found["int8_metrics"]["cosine_mean"],
                            "agreement": found["metrics"].get("agreement"),
                            "int8_agreement": found["int8_metrics"].get("agreement"),
                            "eval_images": len(ev.x), "worst_layers": [r["name"] for r in ranking[:5]]}
        log(f"tolerance {settings.tolerance:g} " + ("met" if found["met"] else "NOT met") + f" with {len(keep)} float "
            f"layer(s); loss {found['int8_loss']:.5f} -> {found['loss']:.5f}")
        if not found["met"]:
            from ..errors import GateFailed

            raise GateFailed(f"quantize tolerance {settings.tolerance:g} not met with up to {settings.max_fallback} "
                             f"float layers (loss {found['loss']:.5f})",
                             hint="raise [quantize] tolerance, or list fp32 among the target's precisions")
    files = program.write(out, keep)
    if keep:
        all_int8 = out.with_name("all-int8" + out.suffix)
        program.write(all_int8, frozenset())
        cost = {"bytes": out.stat().st_size - all_int8.stat().st_size}
        if measure is not None:
            a, b = measure(out), measure(all_int8)
            cost["median_ms"] = round(a["median_ms"] - b["median_ms"], 4)
            cost["median_ms_all_int8"] = b["median_ms"]
            cost["median_ms_shipped"] = a["median_ms"]
        record["cost"] = cost
        for f in all_int8.parent.glob(all_int8.stem + ".*"):
            f.unlink()
    record["seconds"] = round(time.time() - t0, 1)
    return Result(out, files, record)


def float_reference(encoder, normalize: bool, golden_dir: Path | None, preprocess, calibration, eval_images: int):
    """An :class:`Evaluator` over the golden images (spread evenly, at most ``eval_images``) or, without a golden
    set, the calibration images: the float model's embeddings and the teacher's zero-shot predictions."""
    import dataclasses

    import torch

    from ..backends.wrappers import NormalizedEmbedding
    from ..models.student import disable_fused_attention
    from .sensitivity import Evaluator

    model = NormalizedEmbedding(encoder, normalize).eval()
    disable_fused_attention(model)
    nchw = dataclasses.replace(preprocess, layout="NCHW")
    text = pred = None
    if golden_dir is not None:
        from ..verify.golden import load_golden
        from ..verify.metrics import zero_shot_predictions
        from ..verify.run import golden_inputs

        golden = load_golden(golden_dir)
        x = golden_inputs(golden, nchw)
        if golden.text_embeddings is not None:
            text = golden.text_embeddings
            pred = zero_shot_predictions(golden.image_embeddings, text)
    else:
        x = np.concatenate(list(calibration().batches(batch_size=64)))
    idx = np.arange(len(x)) if len(x) <= eval_images else np.linspace(0, len(x) - 1, eval_images).astype(int)
    x = np.ascontiguousarray(x[idx], dtype=np.float32)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x[i:i + 32])).numpy() for i in range(0, len(x), 32)])
    return Evaluator(x, ref, text, None if pred is None else pred[idx])
