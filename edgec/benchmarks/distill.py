"""make bench-distill: distillation's data path at dataset scale, measured.

Synthetic 224-px JPEG sets (default 2,000 and 20,000 images, as an image folder with a
captions.jsonl and as WebDataset shards of 1,000) go through the two phases of ``edgec distill``:

* the teacher cache (every image decoded at the teacher's size in DataLoader workers, embedded,
  written as fp16 chunks), with a 224-px random-weight CLIP teacher;
* training (``--max-steps`` steps of one epoch; the images decoded again at the student's size)
  of a timm student, next to the same student's forward+backward rate on in-memory tensors.

Each (size, form) runs in its own process; a thread samples resident memory every 50 ms (the
main process, and main + loader workers summed, which counts pages the workers share with the
main process once per process). The table goes into BENCHMARKS.md (section ``distill-scale``),
with the disk and time a 1M-image set needs for its teacher cache. Data lives under ``--data``
(default /tmp/edgec-bench-distill), never in the repository.

    python -m edgec.benchmarks.distill [--sizes 2000,20000] [--forms folder,shards] [--max-steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SECTION = "distill-scale"
SIDE = 224
PER_SHARD = 1000
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


# ------------------------------------------------------------------ data


def _image(i: int) -> tuple[bytes, str, str]:
    """A deterministic 224-px JPEG: a gradient background and one coloured shape."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    shape, colour = SHAPES[i % 4], list(COLOURS)[(i // 4) % 4]
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    base = rng.integers(0, 160, 3)
    bg = np.stack([(base[c] + (x * rng.uniform(0, 0.4) + y * rng.uniform(0, 0.4))) % 255 for c in range(3)], -1)
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy, r = (int(v) for v in (rng.integers(60, 164), rng.integers(60, 164), rng.integers(25, 55)))
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
        d.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), shape, f"a {colour} {shape}"


def _write_range(args: tuple[Path, int, int]) -> list[str]:
    folder, lo, hi = args
    rows = []
    for i in range(lo, hi):
        data, shape, caption = _image(i)
        name = f"img/{i // 1000:03d}/{i:07d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        rows.append(json.dumps({"image": name, "caption": caption, "label": shape}))
    return rows


def make_folder(folder: Path, n: int, procs: int) -> Path:
    """``n`` images with a captions.jsonl; reused when already complete."""
    from multiprocessing import Pool

    done = folder / "captions.jsonl"
    if done.is_file() and sum(1 for _ in open(done)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    step = 500
    with Pool(procs) as pool:
        rows = [r for chunk in pool.map(_write_range, [(folder, lo, min(n, lo + step)) for lo in range(0, n, step)])
                for r in chunk]
    (folder / "captions.jsonl.tmp").write_text("\n".join(rows) + "\n")
    os.replace(folder / "captions.jsonl.tmp", done)
    return folder


def make_shards(folder: Path, out: Path) -> str:
    """The folder's images as WebDataset shards of ``PER_SHARD`` (jpg, txt, json per key); the brace pattern."""
    from ..data.folder import read_folder
    from ..data.shards import write_shard

    items = read_folder(folder).items
    n_shards = -(-len(items) // PER_SHARD)
    pattern = str(out / f"train-{{00000..{n_shards - 1:05d}}}.tar")
    if out.is_dir() and len(list(out.glob("train-*.tar"))) == n_shards:
        return pattern
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for s in range(n_shards):
        chunk = items[s * PER_SHARD : (s + 1) * PER_SHARD]
        write_shard(out / f"train-{s:05d}.tar", [
            (f"{s:05d}{j:04d}", {"jpg": it.path.read_bytes(), "txt": it.captions[0].encode(),
                                 "json": json.dumps({"label": it.label}).encode()}) for j, it in enumerate(chunk)])
    return pattern


def make_teacher(folder: Path, *, width: int = 256, layers: int = 4, patch: int = 32) -> Path:
    """A random-weight 224-px CLIP in edgec's format (its tokenizer knows the captions' words)."""
    if (folder / "edgec_model.json").is_file():
        return folder
    import torch

    from ..data.preprocess import Preprocess
    from ..models import edgec_format
    from ..models.edgec_clip import ClipSpec, EdgecClip, TextSpec, VisionSpec
    from ..models.tokenizers import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer.build([f"a photo of a {c} {s}" for c in COLOURS for s in SHAPES], context_length=16)
    spec = ClipSpec(embed_dim=256, vision=VisionSpec(image_size=SIDE, patch_size=patch, width=width, layers=layers,
                                                     heads=max(4, width // 64)),
                    text=TextSpec(vocab_size=len(tok.vocab), context_length=16, width=128, layers=2, heads=4,
                                  eot_id=tok.eot_id))
    edgec_format.save(EdgecClip(spec).eval(), folder, preprocess=Preprocess(size=(SIDE, SIDE)), tokenizer=tok,
                      extra={"name": f"bench-clip-w{width}-l{layers}-p{patch}"})
    return folder


# ------------------------------------------------------------------ measuring


class PeakRSS:
    """Peak resident memory while active: the main process, and the main process plus its children."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.main = self.tree = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                kids = 0
                for c in self.proc.children(recursive=True):
                    try:
                        kids += c.memory_info().rss
                    except psutil.Error:
                        pass
                self.main, self.tree = max(self.main, main), max(self.tree, main + kids)
            except Exception:  # noqa: BLE001  (a process that just ended)
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class PooledImages:
    """The in-memory reference: ``pool`` student-size images decoded once and held as tensors; row ``r``
    gets image ``r % pool``. Same shapes and the same trainer as the DataLoader run, no decoding."""

    def __init__(self, images, pool: int) -> None:
        self.pool = [images[i * images.views][1] for i in range(pool)]
        self.views = images.views

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, code: int):
        return int(code), self.pool[(int(code) // self.views) % len(self.pool)]


def run_one(source_spec: str, work: Path, teacher_dir: Path, *, student: str, student_size: int, batch_size: int,
            max_steps: int, workers: int) -> dict:
    """Both phases on one data set in this process; returns the measured figures."""
    import torch

    from ..config import DistillSection, LossWeights
    from ..data.loader import RowImages
    from ..data.sources import open_source
    from ..distill.cache import CacheRows, build_teacher_cache
    from ..distill.trainer import Split, train
    from ..models import load_model
    from ..models.student import StudentSpec

    threads = torch.get_num_threads()
    teacher = load_model(teacher_dir)
    source = open_source(source_spec)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    with PeakRSS() as mem_cache:
        t = time.perf_counter()
        res = build_teacher_cache(teacher, source, prompts=["a photo of a {}."], folder=cache, workers=workers)
        cache_s = time.perf_counter() - t
    rows = CacheRows(res.folder)
    n = rows.final["samples"]
    cache_bytes = sum(p.stat().st_size for p in cache.iterdir())

    spec = StudentSpec(student, teacher.embed_dim, teacher.preprocess.with_size(student_size))
    params = DistillSection(epochs=1, batch_size=batch_size, lr=1e-3, warmup_epochs=0.0, seed=0, device="cpu",
                            workers=workers, losses=LossWeights(feature_cosine=1.0, contrastive_text=0.5))
    images = RowImages(source, rows.refs, rows.positions, spec.preprocess)
    class_text = torch.from_numpy(rows.class_text) if rows.class_text is not None else None

    def step_seconds(split, p, out: Path) -> dict:
        result = train(spec, p, split, None, class_text, logit_scale=teacher.logit_scale, out=out, augment_mode="none",
                       progress=False, log=lambda *_: None, max_steps=max_steps)
        return result.history[-1]

    # the same trainer on tensors already in memory (no loader workers), before and after the DataLoader run
    pooled = Split(rows, PooledImages(images, min(len(rows), 4 * batch_size)))
    in_memory = [step_seconds(pooled, dataclasses.replace(params, workers=0), work / "mem-a")]
    with PeakRSS() as mem_train:
        t = time.perf_counter()
        row = step_seconds(Split(rows, images), params, work / "train")
        train_s = time.perf_counter() - t
    in_memory.append(step_seconds(pooled, dataclasses.replace(params, workers=0), work / "mem-b"))
    ref = statistics.median(r["step_seconds_median"] for r in in_memory)
    return {"images": n, "cache_seconds": cache_s, "cache_images_per_s": n / cache_s, "cache_bytes": cache_bytes,
            "cache_rss_main": mem_cache.main, "cache_rss_tree": mem_cache.tree,
            "train_steps": max_steps, "train_seconds": train_s,
            "train_images_per_s": batch_size / row["step_seconds_median"],
            "train_epoch_images_per_s": row["images_per_s"],
            "loader_wait_share": row["loader_wait_share"], "train_rss_main": mem_train.main,
            "train_rss_tree": mem_train.tree, "in_memory_images_per_s": batch_size / ref,
            "in_memory_runs": [batch_size / r["step_seconds_median"] for r in in_memory], "threads": threads,
            "workers": workers, "batch_size": batch_size, "student": student}


def teacher_cpu_rate(work: Path, batches: int = 3, batch_size: int = 16) -> dict:
    """A ViT-B/16-sized teacher (random weights, 224 px) on this CPU: images/s and MACs per image."""
    import torch

    from ..models import load_model
    from ..models.base import count_macs

    folder = make_teacher(work / "teacher-vitb16", width=768, layers=12, patch=16)
    model = load_model(folder)
    x = torch.randn(batch_size, 3, SIDE, SIDE)
    macs = count_macs(model.image_encoder, x[:1])
    times = []
    with torch.inference_mode():
        model.image_encoder(x[:2])
        for _ in range(batches):
            t = time.perf_counter()
            model.image_encoder(x)
            times.append(time.perf_counter() - t)
    return {"images_per_s": batch_size / statistics.median(times), "macs": macs, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------ report


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def table(results: list[dict], teacher_rate: dict | None, meta: dict) -> str:
    lines = [
        "## Distillation at dataset scale (make bench-distill)",
        "",
        f"Synthetic {SIDE}-px JPEG sets, as an image folder (captions.jsonl) and as WebDataset shards of "
        f"{PER_SHARD}; teacher: a random-weight {SIDE}-px CLIP ({meta['teacher']}); student: `{meta['student']}` at "
        f"{meta['student_size']} px, batch {meta['batch_size']}, {meta['max_steps']} training steps of the epoch "
        f"(train img/s: batch / median step time, loader wait included; in-memory: the same trainer and "
        f"student on {4}x{meta['batch_size']} images decoded once and held as tensors, no loader workers, run before "
        f"and after the DataLoader run (median); loader wait share: time blocked on the next batch after the "
        f"first, over step time); "
        f"loader workers: {meta['workers']}, torch threads: {meta['threads']}, CPU cores: {meta['cpus']} "
        f"(shared with other work while measured). Peak RSS: main process / main + loader workers summed "
        f"(shared pages counted once per process).",
        "",
        "| set | images | teacher cache: img/s | peak RSS MB | train: img/s | same trainer, images in memory: img/s | train / in-memory | loader wait share | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['form']} | {r['images']:,} | {r['cache_images_per_s']:.0f} | {_mb(r['cache_rss_main'])} / "
            f"{_mb(r['cache_rss_tree'])} | {r['train_images_per_s']:.1f} | {r['in_memory_images_per_s']:.1f} | "
            f"{r['train_images_per_s'] / r['in_memory_images_per_s']:.2f} | {r['loader_wait_share']:.1%} | "
            f"{_mb(r['train_rss_main'])} / {_mb(r['train_rss_tree'])} |")
    by_form: dict[str, list[dict]] = {}
    for r in results:
        by_form.setdefault(r["form"], []).append(r)
    notes = []
    for form, rs in by_form.items():
        rs = sorted(rs, key=lambda r: r["images"])
        if len(rs) > 1:
            small, big = rs[0], rs[-1]
            notes.append(f"{form}: {big['images'] // small['images']}x the images, peak RSS x"
                         f"{big['cache_rss_main'] / small['cache_rss_main']:.2f} (teacher cache) and "
                         f"x{big['train_rss_main'] / small['train_rss_main']:.2f} (training), main process")
    if notes:
        lines += ["", "Memory against data size: " + "; ".join(notes) + "."]
    big = max(results, key=lambda r: r["images"])
    per_image = big["cache_bytes"] / big["images"]
    lines += ["", "### A 1M-image set",
              "",
              f"- Teacher cache on disk: {per_image:,.0f} bytes per image here (one 256-d fp16 image embedding, one "
              f"caption embedding, keys and offsets in the chunk JSON), so about {per_image * 1e6 / 2**30:.1f} GiB for "
              f"1M images; a 768-d teacher with 5 captions per image needs about "
              f"{(768 * 2 * 6 + per_image - 256 * 2 * 2) * 1e6 / 2**30:.1f} GiB, and each extra teacher view adds "
              f"{768 * 2 * 1e6 / 2**30:.1f} GiB."]
    if teacher_rate:
        gmacs = teacher_rate["macs"] / 1e9
        cpu = teacher_rate["images_per_s"]
        lines += [
            f"- Teacher pass, measured on this CPU: a ViT-B/16-sized image tower ({gmacs:.1f} GMACs per image) runs "
            f"{cpu:.1f} images/s with {teacher_rate['threads']} torch thread(s): {1e6 / cpu / 3600:,.0f} CPU-hours "
            f"for 1M images.",
            "- No GPU was available to this run, so the GPU figures are arithmetic, not measurements: at 40 % of the "
            "dense bf16 peak, images/s = 0.4 x peak FLOP/s / (2 x MACs). "
            + ", ".join(f"{name} ({peak} TFLOP/s): ~{0.4 * peak * 1e12 / (2 * teacher_rate['macs']):,.0f} images/s, "
                        f"{1e6 / (0.4 * peak * 1e12 / (2 * teacher_rate['macs'])) / 60:.0f} min per 1M"
                        for name, peak in (("T4", 65), ("L4", 121), ("A100", 312), ("H100 SXM", 989)))
            + ". Decoding must keep up: one loader worker here decodes 224-px JPEGs for the teacher cache at the "
              "rates in the table (teacher included), so a GPU at thousands of images/s needs tens of decoding "
              "cores (`[distill] workers`), or shards of images stored near the teacher's size.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--forms", default="folder,shards")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--student", default="mobilevit_xxs")
    ap.add_argument("--student-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (1: stable on a busy machine)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/edgec-bench-distill"))
    ap.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to write the section into")
    ap.add_argument("--no-teacher-rate", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one data set in this process
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    from ..data.loader import default_workers

    torch.set_num_threads(args.threads)
    workers = default_workers() if args.workers is None else args.workers
    workers = max(1, workers)
    teacher = make_teacher(args.data / "teacher")
    if args.one:
        form, size = args.one.split(":")
        spec = str(args.data / f"folder-{size}") if form == "folder" else make_shards(
            args.data / f"folder-{size}", args.data / f"shards-{size}")
        r = run_one(spec, args.data / f"work-{form}-{size}", teacher, student=args.student,
                    student_size=args.student_size, batch_size=args.batch_size,
                    max_steps=args.max_steps, workers=workers)
        args.result.write_text(json.dumps({**r, "form": form}))
        return 0
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        t = time.time()
        make_folder(args.data / f"folder-{size}", size, procs=max(1, (os.cpu_count() or 2)))
        print(f"data: {size} images ready ({time.time() - t:.0f} s)", flush=True)
        for form in args.forms.split(","):
            res = args.data / f"result-{form}-{size}.json"
            cmd = [sys.executable, "-m", "edgec.benchmarks.distill", "--one", f"{form}:{size}", "--result", str(res),
                   "--data", str(args.data), "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
                   "--student", args.student, "--student-size", str(args.student_size), "--workers", str(workers),
                   "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)
            r = json.loads(res.read_text())
            results.append(r)
            print(f"{form} {size}: cache {r['cache_images_per_s']:.0f} img/s (peak RSS {_mb(r['cache_rss_main'])} MB), "
                  f"train {r['train_images_per_s']:.1f} img/s vs in-memory {r['in_memory_images_per_s']:.1f}, "
                  f"loader wait {r['loader_wait_share']:.1%} (peak RSS {_mb(r['train_rss_main'])} MB)", flush=True)
    rate = None if args.no_teacher_rate else teacher_cpu_rate(args.data)
    meta = {"teacher": "ViT width 256, 4 layers, patch 32", "student": args.student,
            "student_size": args.student_size, "batch_size": args.batch_size,
            "max_steps": args.max_steps, "workers": workers, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}
    text = table(results, rate, meta)
    print(text)
    (args.data / "bench-distill.json").write_text(json.dumps({"results": results, "teacher_rate": rate, "meta": meta}))
    if args.out:
        from ..quantize.compare import write_section

        write_section(args.out, SECTION, text)
        print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
