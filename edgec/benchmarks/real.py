"""make bench-real: students at real resolution against a ViT-B/16 tower, every precision in its runtime.

The workload is configuration (``real.toml`` beside this module): an open_clip ViT-B/16 image tower at
224 px (random init) is the reference; each student (random init, at each size) is built for each target by
the target's own backend and quantize stage, exactly as ``edgec compile`` builds its candidates (fp32 and the
target's int8 form with the quantizer's default method, calibrated on synthetic images). Then, per student,
size and thread count, one loop runs every artifact whose runtime runs on this CPU as on the device, once per
round, alternated, with the ViT-B/16 tower in eager PyTorch fp32 and in ONNX Runtime fp32 every
``teacher_every``-th round of the same loop: ratios hold on a busy machine even when absolute times swing.

Per artifact: median latency at each thread count, size, peak RSS (a fresh process running it alone), MACs,
achieved GMAC/s and its share of this CPU's peak for that precision (:mod:`edgec.runtime.isa`), its speed over
the same target's fp32, over ViT-B/16 eager and over ViT-B/16 in ONNX Runtime, and its cosine to the eager
student (a sanity check of the artifact, not an accuracy figure). Results accumulate in
``<work>/results.json`` (a re-run replaces its own rows) and become the ``bench-real`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np

SECTION = "bench-real"
WORKLOAD = Path(__file__).with_name("real.toml")
REPO = Path(__file__).resolve().parents[2]


def log(text: str) -> None:
    print(f"[bench-real {time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_workload(path: Path = WORKLOAD) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def synthetic_calibration(size: int, n: int, seed: int = 0):
    """``n`` smooth random images (upsampled low-resolution noise, like natural images' spectra, not white noise)."""
    import torch
    import torch.nn.functional as F

    from ..data.preprocess import Preprocess
    from ..manifest import sha256_json
    from ..quantize.calibration import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    fine = torch.rand(n, 3, size // 4, size // 4, generator=g)
    img = 0.8 * F.interpolate(low, size=(size, size), mode="bicubic") + 0.2 * F.interpolate(fine, size=(size, size))
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return CalibrationSet(images=images, paths=[], labels=[None] * n,
                          sha256=sha256_json({"synthetic": [size, n, seed]}), skipped=[],
                          preprocess=Preprocess(size=(size, size)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def build_teacher(work: Path, arch: str, size: int) -> dict:
    """ViT-B/16's image tower as open_clip runs it in eager PyTorch (its attention fast path included), its MACs
    and its fp32 ONNX (exported on the plain attention math path, as edgec's intake does)."""
    import copy

    import torch

    from ..backends.onnx import export
    from ..models.base import count_macs, plain_attention
    from ..models.openclip import load
    from ..models.teachers import build_open_clip_vit

    built = build_open_clip_vit(work / "teacher", "real", real_arch=arch)
    model = load(built.path, built.arch or arch)
    tower = model.image_encoder.eval()
    plain = copy.deepcopy(tower)
    plain_attention(plain)
    x = torch.zeros(1, 3, size, size)
    onnx_path = work / "teacher" / "image.fp32.onnx"
    if not onnx_path.is_file():
        with torch.no_grad():
            export(plain, (1, 3, size, size), onnx_path, dynamic_batch=False, normalize=False)
    return {"module": tower, "onnx": onnx_path, "macs": int(count_macs(plain, x)), "size": size, "name": f"open_clip {arch}"}


def build_student(name: str, size: int, embed_dim: int, targets: list[str], work: Path, calibration_images: int,
                  rebuild: bool = False) -> dict:
    """The student and, per target, its candidates (fp32 and the target's int8) as compile builds them."""
    import torch

    from .. import registry
    from ..backends import get_backend
    from ..data.preprocess import Preprocess
    from ..errors import EdgecError
    from ..models.base import count_macs
    from ..models.student import StudentSpec, create_student, deploy_form
    from ..models.students import family_of, reachable
    from ..quantize import stage

    spec = StudentSpec(name, embed_dim, Preprocess(size=(size, size)))
    student = deploy_form(create_student(spec, seed=0))  # as compile ships it
    macs = int(count_macs(student, torch.zeros(1, 3, size, size)))
    calib = synthetic_calibration(size, calibration_images)
    family = family_of(name)
    cells = []
    for t in targets:
        target = registry.get("targets", t).spec
        cell = {"student": name, "size": size, "target": t, "runtime": target.runtime, "layout": target.layout,
                "macs": macs}
        if family is not None:
            ok, why = reachable(family, target)
            if not ok:
                cells.append(dict(cell, refused=why))
                log(f"{name}@{size} {t}: not built ({why})")
                continue
        folder = work / f"{name}_{size}" / t
        folder.mkdir(parents=True, exist_ok=True)
        done = folder / "built.json"  # a re-run (another thread count, a stopped run) reuses what was built
        if done.is_file() and not rebuild:
            kept = json.loads(done.read_text())
            if all(Path(c["path"]).is_file() for c in kept):
                cells += kept
                log(f"{name}@{size} {t}: reusing {', '.join(c['precision'] for c in kept)} ({folder})")
                continue
        t0 = time.time()
        try:
            backend = get_backend(target.backend)
            quantizer = backend.quantizers.get(target.quantizer) if target.quantizer else None
            method = quantizer.default_method if quantizer is not None else "minmax"

            def quantize(make_program, out: Path, _t=t, _method=method):
                program = make_program(calib, _method, 99.999)
                return stage.run(program, stage.Settings(method=_method), out, log=lambda s: None)

            shape = (1, 3, size, size) if target.layout == "NCHW" else (1, size, size, 3)
            built = backend.build(student, shape, spec=target, work=folder, quantize=quantize,
                                  options={"target_isa": None}, log=lambda s: None)
        except EdgecError as exc:  # a toolchain missing here, or a model the backend refuses: one line
            cells.append(dict(cell, refused=str(exc).splitlines()[0][:200]))
            log(f"{name}@{size} {t}: not built ({cells[-1]['refused']})")
            continue
        seconds = round(time.time() - t0, 1)
        new = [dict(cell, precision=precision, path=str(path), bytes=path.stat().st_size, build_seconds=seconds)
               for precision, path in built.candidates.items()]
        done.write_text(json.dumps(new))
        cells += new
        log(f"{name}@{size} {t}: built {', '.join(built.candidates)} in {seconds:.0f} s")
    return {"module": student, "macs": macs, "cells": cells}


def _runner(cell: dict, threads: int):
    from ..runtime.runners import open_runner

    return open_runner(Path(cell["path"]), cell["runtime"], threads, kernels="host")


def _input(cell_layout: str, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if cell_layout == "NHWC" else x


def time_group(cells: list[dict], student, teacher: dict, threads: int, runs: int, every: int, warmup: int) -> None:
    """One alternated loop over the group's artifacts (+ the teacher references every ``every`` rounds); medians
    go into each cell as ``ms[threads]`` and the teacher's as ``teacher_ms[threads]``."""
    import onnxruntime as ort
    import torch

    from ..runtime.runners import session_options

    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    size = cells[0]["size"]
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    probe = np.random.default_rng(2).standard_normal((4, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = student(torch.from_numpy(probe)).numpy()
    runners = []
    for c in cells:
        run = _runner(c, threads)
        xi = _input(c["layout"], x)
        c["ran"] = getattr(run, "ran", c["runtime"])
        c.setdefault("cosine_to_eager", round(cosine(run(_input(c["layout"], probe)), ref), 5))
        runners.append((c, run, xi))
    tx = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, teacher["size"], teacher["size"])).astype(np.float32))
    tsess = ort.InferenceSession(str(teacher["onnx"]), session_options(threads, "host"), providers=["CPUExecutionProvider"])
    tname = tsess.get_inputs()[0].name

    def eager():
        with torch.inference_mode():
            teacher["module"](tx)

    def onnx():
        tsess.run(None, {tname: tx.numpy()})

    refs = {"eager": eager, "onnxruntime": onnx}
    for _ in range(warmup):
        for _c, run, xi in runners:
            run(xi)
    for f in refs.values():
        f()
    times: dict[int, list[float]] = {i: [] for i in range(len(runners))}
    ttimes: dict[str, list[float]] = {k: [] for k in refs}
    for r in range(runs):
        for i, (_c, run, xi) in enumerate(runners):
            t0 = time.perf_counter()
            run(xi)
            times[i].append((time.perf_counter() - t0) * 1e3)
        if r % every == 0:
            for k, f in refs.items():
                t0 = time.perf_counter()
                f()
                ttimes[k].append((time.perf_counter() - t0) * 1e3)
    for i, (c, _run, _xi) in enumerate(runners):
        c.setdefault("ms", {})[str(threads)] = round(float(np.median(times[i])), 3)
        c.setdefault("runs", {})[str(threads)] = len(times[i])
        c.setdefault("teacher_ms", {})[str(threads)] = {k: round(float(np.median(v)), 2) for k, v in ttimes.items()}
        c.setdefault("teacher_runs", {})[str(threads)] = len(ttimes["eager"])
        # 1-minute load average before and after the loop: other processes on the cores (a 2-thread run on a
        # 2-core machine with load above ~1 shares its cores, and its ratios say more than its times)
        c.setdefault("load", {})[str(threads)] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    del runners, tsess
    gc.collect()


def _ort_profile(path: str, x: np.ndarray, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    from ..runtime.runners import session_options

    opts = session_options(1, "host")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix("")) + ".profile"
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by[op] = by.get(op, 0.0) + e["dur"] / 1e3 / runs
    return by


def _executorch_profile(path: str, x: np.ndarray, runs: int) -> dict[str, float]:
    """XNNPACK's own per-operator events from an ETDump (the delegate logs them when profiling is built in)."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from ..runtime.runners import set_executorch_threads

    set_executorch_threads(1)
    module = portable_lib._load_for_executorch(path, enable_etdump=True)
    for _ in range(runs):
        module.forward([torch.from_numpy(x)])
    dump = str(Path(path).with_suffix(".etdump"))
    module.write_etdump_result_to_file(dump)
    by: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inspector = Inspector(etdump_path=dump)
    skip = {"Method::execute", "DELEGATE_CALL", "Program::load_method", "Method::init", "OPERATOR_CALL"}
    for block in inspector.event_blocks:
        for e in block.events:
            if e.perf_data is None or e.name in skip:
                continue
            op = e.name.split(" #")[0]
            by[op] = by.get(op, 0.0) + float(np.median(e.perf_data.raw))
    return by


PROFILERS = {"onnxruntime": _ort_profile, "executorch": _executorch_profile}


def profile(cell: dict, runs: int = 10) -> dict | None:
    """Where one thread's time goes, per operator type (ms per inference), for runtimes with a profiler here."""
    fn = PROFILERS.get(cell["runtime"])
    if fn is None:
        return None
    x = np.random.default_rng(1).standard_normal((1, 3, cell["size"], cell["size"])).astype(np.float32)
    by = fn(cell["path"], _input(cell["layout"], x), runs)
    total = sum(by.values())
    return {"total_ms": round(total, 3), "ops": {k: round(v, 3) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}


def profile_markdown(cells: list[dict], top: int = 10) -> list[str]:
    lines = []
    groups: dict[tuple, dict] = {}
    for c in cells:
        if c.get("profile"):
            groups.setdefault((c["student"], c["size"], c["target"], c["runtime"]), {})[c["precision"]] = c["profile"]
    for (student, size, target, runtime), by in groups.items():
        if {"fp32", "int8"} - set(by):
            continue
        f, q = by["fp32"], by["int8"]
        ops = sorted(set(f["ops"]) | set(q["ops"]), key=lambda o: -max(f["ops"].get(o, 0), q["ops"].get(o, 0)))[:top]
        lines += ["", f"Profile, {student} at {size} px, {target} ({runtime}), 1 thread: ms per inference by operator "
                      f"type (the runtime's own profiler; sums {f['total_ms']:.2f} fp32, {q['total_ms']:.2f} int8)", "",
                  "| operator | fp32 ms | int8 ms |", "|---|---|---|"]
        lines += [f"| {o} | {f['ops'].get(o, 0):.2f} | {q['ops'].get(o, 0):.2f} |" for o in ops]
    return lines


def peak_rss(cell: dict, threads: int) -> float | None:
    """Peak resident memory of a fresh process that loads and runs only this artifact (edgec bench's runner)."""
    from ..bench import _subprocess
    from ..errors import InputError

    shape = [1, 3, cell["size"], cell["size"]] if cell["layout"] == "NCHW" else [1, cell["size"], cell["size"], 3]
    try:
        r = _subprocess(["artifact", cell["path"], cell["runtime"], json.dumps(shape), str(threads), "5", "1"], threads)
    except InputError:
        return None
    return r["peak_rss_mb"]


def derive(cells: list[dict], isa) -> None:
    """GMAC/s, share of peak, and the ratios each row is read by."""
    fp32 = {(c["student"], c["size"], c["target"]): c for c in cells if c.get("precision") == "fp32"}
    for c in cells:
        if "ms" not in c:
            continue
        c["gmacs"], c["peak_share"], c["x_teacher_eager"], c["x_teacher_ort"], c["x_fp32"] = {}, {}, {}, {}, {}
        base = fp32.get((c["student"], c["size"], c["target"]))
        for th, ms in c["ms"].items():
            g = c["macs"] / (ms / 1e3) / 1e9
            peak = isa.peak_gmacs("int8" if c["precision"] == "int8" else "fp32", int(th), matrix=False)["gmacs"]
            c["gmacs"][th] = round(g, 1)
            c["peak_share"][th] = round(g / peak, 4) if peak else None
            tm = c["teacher_ms"][th]
            c["x_teacher_eager"][th] = round(tm["eager"] / ms, 1)
            c["x_teacher_ort"][th] = round(tm["onnxruntime"] / ms, 1)
            if base is not None and "ms" in base and th in base["ms"]:
                c["x_fp32"][th] = round(base["ms"][th] / ms, 2)
    mark_shipped(cells)


def mark_shipped(cells: list[dict]) -> None:
    """Which precision compile's ``fastest-passing`` rule would ship from these timings (the first thread count;
    every candidate taken as passing: the example measures accuracy): ``ships`` is "faster" when it beat the others
    by more than the tie margin, "tie" when it ships only because it is listed first."""
    from .. import registry
    from ..compile import TIE_MARGIN, _choose

    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        if "ms" in c:
            groups.setdefault((c["student"], c["size"], c["target"]), []).append(c)
    for (_, _, target), group in groups.items():
        spec = registry.get("targets", target).spec
        if spec.select != "fastest-passing":
            continue
        order = list(spec.precisions)  # compile's preference order
        group.sort(key=lambda c: order.index(c["precision"]) if c["precision"] in order else len(order))
        th = next(iter(group[0]["ms"]))
        if len(group) < 2 or any(th not in c["ms"] for c in group):
            continue
        rows = [{"precision": c["precision"], "median_ms": c["ms"][th]} for c in group]
        chosen = _choose(rows)
        for c in group:
            c.pop("ships", None)
            if c["precision"] == chosen:
                clear = all(c["ms"][th] < o["ms"][th] * (1 - TIE_MARGIN) for o in group if o is not c)
                c["ships"] = "faster" if clear else "tie"


def sort_cells(cells: list[dict], students: list[str]) -> list[dict]:
    """The workload's student order (cells of an earlier run included), then size, target, precision."""
    def key(c):
        order = students.index(c["student"]) if c["student"] in students else len(students)
        return order, c["student"], c["size"], c["target"], c.get("precision", "")

    return sorted(cells, key=key)


def markdown(result: dict) -> str:
    m, teacher = result["machine"], result["teacher"]
    threads = result["threads"]
    lines = [f"`make bench-real` ({result['date']}): students (random init) built for each target by edgec's own "
             f"backends and quantize stage, timed in their runtime on this host's CPU against an {teacher['name']} image "
             f"tower at {teacher['size']} px ({teacher['macs'] / 1e9:.2f} G MACs). Machine: {m['cpu']}, {m['cores']} "
             f"cores, {m['isa']['int8_kernels']}; peak per core at {m['ghz']} GHz: fp32 "
             f"{m['peak']['fp32']} GMAC/s, int8 {m['peak']['int8']} GMAC/s ({m['peak_basis']}). Latency: median of "
             f"{result['runs']} runs per thread count, every artifact once per round (alternated), the ViT-B/16 "
             "references every "
             f"{result['teacher_every']}th round of the same loop; ratios are read within one loop. x ViT = ViT-B/16's "
             "median / this one's (eager PyTorch fp32; ONNX Runtime fp32); x fp32 = the same target's fp32 / this one. "
             "cos = cosine to the eager student on 4 random inputs (artifact sanity, not accuracy: the example "
             "measures that). RSS: a fresh process running only this artifact. ships: the precision compile's "
             "fastest-passing rule picks from these timings (int8 is listed first; another precision must be more than "
             "10 % faster to replace it).", ""]
    cols = ["student", "px", "target", "precision", "runtime", "MB", "G MACs"]
    for th in threads:
        cols += [f"ms {th}t", f"x fp32 {th}t", f"x ViT eager {th}t", f"x ViT ORT {th}t", f"GMAC/s {th}t", f"% peak {th}t"]
    cols += ["RSS MB", "cos", f"ships ({threads[0]}t)"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in result["cells"]:
        row = [c["student"], str(c["size"]), c["target"]]
        if "refused" in c:
            lines.append("| " + " | ".join(row + [f"not built: {c['refused']}"] + [""] * (len(cols) - 4)) + " |")
            continue
        row += [c["precision"], c.get("ran", c["runtime"]) if "ms" in c else f"{c['runtime']} (not timed here)",
                f"{c['bytes'] / 1e6:.2f}", f"{c['macs'] / 1e9:.3f}"]
        for th in map(str, threads):
            if "ms" in c and th in c["ms"]:
                share = c["peak_share"].get(th)
                row += [f"{c['ms'][th]:.2f}", f"{c['x_fp32'].get(th, ''):}" if c["x_fp32"].get(th) else "",
                        f"{c['x_teacher_eager'][th]}", f"{c['x_teacher_ort'][th]}", f"{c['gmacs'][th]}",
                        f"{share:.1%}" if share is not None else ""]
            else:
                row += [""] * 6
        row += [f"{c['rss_mb']:.0f}" if c.get("rss_mb") else "", f"{c['cosine_to_eager']:.4f}" if "cosine_to_eager" in c else "",
                {"faster": "yes: > 10 % faster", "tie": "yes: listed first, a tie"}.get(c.get("ships"), "")]
        lines.append("| " + " | ".join(row) + " |")
    lines += profile_markdown(result["cells"])
    loads = [v for c in result["cells"] for v in c.get("load", {}).values()]
    if loads:
        lo, hi = min(min(v) for v in loads), max(max(v) for v in loads)
        lines += ["", f"1-minute load average around the timing loops: {lo:.1f} to {hi:.1f} on {m['cores']} cores "
                      "(above ~1, other processes shared the cores: the 2-thread columns then measure contention)."]
    tms = [(c["teacher_ms"], c["student"], c["size"]) for c in result["cells"] if "teacher_ms" in c]
    if tms:
        lines += ["", "ViT-B/16 reference medians per loop (ms, eager / ONNX Runtime): " + "; ".join(
            f"{s}@{px}: " + ", ".join(f"{th}t {v['eager']:.0f}/{v['onnxruntime']:.0f}" for th, v in t.items())
            for t, s, px in {(json.dumps(t), s, px): (t, s, px) for t, s, px in tms}.values())]
    return "\n".join(lines) + "\n"


def machine(threads: list[int]) -> dict:
    from ..bench import _cpu_name
    from ..runtime.isa import host_isa

    isa = host_isa()
    p32, p8, amx = isa.peak_gmacs("fp32", 1), isa.peak_gmacs("int8", 1, matrix=False), isa.peak_gmacs("int8", 1)
    basis = f"fp32: {p32['basis']}; int8: {p8['basis']}"
    if amx["gmacs"] != p8["gmacs"]:
        basis += f"; the matrix engine adds {amx['gmacs']} GMAC/s int8 per core ({amx['basis']}), not counted in % peak"
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "isa": isa.record(),
            "ghz": isa.ghz, "peak": {"fp32": p32["gmacs"], "int8": p8["gmacs"]}, "peak_basis": basis}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgec.benchmarks.real", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", type=Path, default=WORKLOAD)
    ap.add_argument("--students", help="comma-separated subset of the workload's students")
    ap.add_argument("--sizes", help="comma-separated subset of the workload's sizes")
    ap.add_argument("--targets", help="comma-separated subset of the workload's targets")
    ap.add_argument("--threads", help="comma-separated thread counts")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--rebuild", action="store_true", help="build the artifacts again (default: reuse <work>'s)")
    ap.add_argument("--table-only", action="store_true", help="write the section from <work>/results.json, run nothing")
    ap.add_argument("--build-only", action="store_true",
                    help="build the missing artifacts (all with --rebuild), time nothing, write no results")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench-real")
    ap.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    a = ap.parse_args(argv)
    w = load_workload(a.workload)

    def pick(arg, default):
        return [type(default[0])(v) for v in arg.split(",")] if arg else list(default)

    students, sizes = pick(a.students, w["students"]["names"]), pick(a.sizes, w["students"]["sizes"])
    targets, threads = pick(a.targets, w["build"]["targets"]), pick(a.threads, w["timing"]["threads"])
    runs = a.runs or w["timing"]["runs"]
    timed = set(w["timing"]["runtimes"])
    a.work.mkdir(parents=True, exist_ok=True)
    results_path = a.work / "results.json"
    earlier = json.loads(results_path.read_text()) if results_path.is_file() else {"cells": []}

    from ..quantize.compare import write_section
    from ..runtime.isa import host_isa

    if a.table_only:
        if not earlier.get("cells"):
            raise SystemExit(f"{results_path} has no results")
        earlier["cells"] = sort_cells(earlier["cells"], w["students"]["names"])
        write_section(a.benchmarks, SECTION, markdown(earlier))
        log(f"wrote {a.benchmarks} (section {SECTION}) from {results_path}")
        return 0
    log(f"teacher: open_clip {w['teacher']['open_clip']} image tower at {w['teacher']['size']} px")
    teacher = build_teacher(a.work, w["teacher"]["open_clip"], w["teacher"]["size"])
    result = {"schema": 1, "date": time.strftime("%Y-%m-%d"), "machine": machine(threads), "threads": threads,
              "runs": runs, "teacher_every": w["timing"]["teacher_every"],
              "teacher": {k: teacher[k] for k in ("name", "size", "macs")}}
    mine = {(s, z, t) for s in students for z in sizes for t in targets}  # a re-run replaces its own cells only
    cells = [c for c in earlier.get("cells", []) if (c["student"], c["size"], c["target"]) not in mine]
    for name in students:
        for size in sizes:
            log(f"{name} at {size} px: building {', '.join(targets)}")
            st = build_student(name, size, w["students"]["embed_dim"], targets, a.work, w["build"]["calibration_images"],
                               a.rebuild)
            if a.build_only:
                continue
            group = [c for c in st["cells"] if "path" in c and c["runtime"] in timed]
            for th in threads:
                log(f"{name} at {size} px: timing {len(group)} artifacts + ViT-B/16, {th} thread(s), {runs} rounds")
                time_group(group, st["module"], teacher, th, runs, w["timing"]["teacher_every"], w["timing"]["warmup"])
            for c in group:
                c["rss_mb"] = peak_rss(c, 1)
                if size == max(sizes):
                    c["profile"] = profile(c)
            derive(st["cells"], host_isa())
            cells += st["cells"]
            for c in st["cells"]:
                if "ms" in c:
                    log(f"  {c['target']:15s} {c['precision']:5s} " + "  ".join(
                        f"{th}t {c['ms'][th]:.2f} ms (x fp32 {c['x_fp32'].get(th, '-')}, x ViT eager "
                        f"{c['x_teacher_eager'][th]}, {c['peak_share'][th]:.1%} of peak)" for th in c["ms"])
                        + f"  cos {c['cosine_to_eager']:.4f}")
            result["cells"] = sort_cells(cells, w["students"]["names"])
            results_path.write_text(json.dumps(result, indent=1))  # after every student: a stopped run keeps its rows
            write_section(a.benchmarks, SECTION, markdown(result))
    if not a.build_only:
        log(f"wrote {a.benchmarks} (section {SECTION}) and {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
