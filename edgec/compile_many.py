"""``compile --target all``: several targets, students distilled first (each once), then one process per
target (torch exports are not thread-safe), ``jobs`` at a time; every target runs to its end."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import registry
from .compile import CompileOutputs, compile_from_config, ensure_golden
from .config import EdgecConfig
from .errors import EdgecError, InputError


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
                 student_dirs: dict[str, Path] | None = None, reselect: bool = False, locked: bool = False,
                 log=print) -> dict[str, TargetResult]:
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
        ensure_golden(cfg, t, log, needed=cfg.quantize.tolerance_for(t) is not None)
    kwargs = {"no_distill": no_distill, "config_path": config_path, "device": device, "force": force,
              "towers": towers, "head": head, "reselect": reselect, "locked": locked}
    results: dict[str, TargetResult] = {}
    if not force and not reselect:  # up-to-date targets are settled here: a worker process costs seconds of start-up
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
