"""edgec bench: latency, throughput, peak memory and size of each artifact of a target folder.

Each measurement runs in a fresh Python process (``python -m edgec.bench``), so the peak
resident memory reported is that runner's alone. Timing: warm-up runs, then ``runs`` timed
single-image inferences; median, p90 and mean in ms. The teacher's image tower in eager
PyTorch can be measured the same way for reference (needs torch).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import atomic_write_json, read_manifest
from .runtime.isa import host_isa


def _stats(times_ms: list[float]) -> dict:
    arr = np.asarray(times_ms)
    median = float(np.median(arr))
    return {"median_ms": round(median, 3), "p90_ms": round(float(np.percentile(arr, 90)), 3),
            "mean_ms": round(float(arr.mean()), 3), "min_ms": round(float(arr.min()), 3),
            "throughput_ips": round(1000.0 / median, 1) if median > 0 else None, "runs": len(times_ms)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space exec made; getrusage's
    ru_maxrss survives exec and starts at the forking parent's size (a large parent inflates every child)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _time(fn, x, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure_artifact(path: Path, runtime: str, shape: list[int], threads: int, runs: int, warmup: int) -> dict:
    """In this process: one artifact's timings (numpy + runtime only)."""
    from .runtime.runners import open_runner

    runner = open_runner(path, runtime, threads, kernels="host")  # timed as this CPU runs it, fused int8 kernels included
    x = np.random.default_rng(0).standard_normal([1, *shape[1:]]).astype(np.float32)
    result = _stats(_time(runner, x, runs, warmup))
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["ran"] = getattr(runner, "ran", runtime)
    return result


def measure_teacher(config_path: Path, threads: int, runs: int, warmup: int) -> dict:
    """In this process: the teacher's image tower in eager PyTorch (fp32), batch 1."""
    import torch

    from .config import load_config
    from .models import load_model

    torch.set_num_threads(threads)
    cfg = load_config(config_path)
    model = load_model(cfg.resolve(cfg.model.path), cfg.model.kind, arch=cfg.model.arch, trust_pickle=cfg.model.trust_pickle)
    x = torch.randn(1, 3, *model.preprocess.size)
    with torch.inference_mode():
        result = _stats(_time(model.image_encoder, x, runs, warmup))
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["name"] = model.name
    return result


def _subprocess(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "edgec.bench", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"benchmark process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(folder: str | Path, *, runs: int = 50, warmup: int = 10, threads: int | None = None,
          teacher_config: Path | None = None, log=print) -> dict:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if teacher_config is not None:  # checked before anything is timed
        from .config import load_config

        if load_config(teacher_config).model is None:
            raise InputError(f"--teacher {teacher_config} has no [model] section", hint="add [model] path = ...")
    threads = threads or os.cpu_count() or 1
    shape = manifest["inputs"][0]["shape"]
    results = []
    for art in manifest["artifacts"]:
        if art.get("tower", "image") != "image":  # the text tower and the zero-shot variant take other inputs
            log(f"{manifest.get('target')}/{art['path']}: not timed ({art['tower']} artifact; bench times the image model)")
            continue
        path = folder / art["path"]
        if not path.is_file():
            raise InputError(f"artifact missing: {path}", hint="compile the target again")
        r = _subprocess(["artifact", str(path), art["runtime"], json.dumps(shape), str(threads), str(runs), str(warmup)], threads)
        ran = r.pop("ran", art["runtime"])
        r.update({"artifact": art["path"], "precision": art.get("precision"), "bytes": path.stat().st_size,
                  # where the figure comes from: this host's CPU and the runtime that ran here, which for a
                  # TensorRT or Edge TPU target is not the device's (its engine/delegate runs there)
                  "runtime": ran, "target_runtime": art["runtime"], "measured_on": "host",
                  "measured_with": f"{ran} on this host's CPU"})
        results.append(r)
        log(f"{manifest.get('target')}/{art['path']}: median {r['median_ms']} ms, p90 {r['p90_ms']} ms, "
            f"{r['throughput_ips']} img/s, peak {r['peak_rss_mb']} MB, {r['bytes'] / 1e6:.2f} MB on disk")
    teacher = None
    if teacher_config is not None:
        teacher = _subprocess(["teacher", str(teacher_config), str(threads), str(runs), str(warmup)], threads)
        log(f"teacher {teacher['name']} (eager PyTorch fp32): median {teacher['median_ms']} ms, peak {teacher['peak_rss_mb']} MB")
    report = {"schema": 1, "target": manifest.get("target"), "folder": str(folder), "input_shape": shape,
              "threads": threads, "runs": runs, "warmup": warmup, "results": results, "teacher": teacher,
              "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "isa": host_isa().record()}}
    atomic_write_json(folder / "bench.json", report)
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _main(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "artifact":
        path, runtime, shape, threads, runs, warmup = argv[1:]
        result = measure_artifact(Path(path), runtime, json.loads(shape), int(threads), int(runs), int(warmup))
    else:
        config, threads, runs, warmup = argv[1:]
        result = measure_teacher(Path(config), int(threads), int(runs), int(warmup))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
