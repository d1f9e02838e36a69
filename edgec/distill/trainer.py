"""The distillation loop: single process or torch.distributed (DDP, launched with torchrun).

Every epoch ends with a checkpoint in edgec's format (``last/``: student + optimizer state,
safetensors and JSON, no pickle), so ``--resume`` continues from the last finished epoch; the
best student by the eval metric is kept in ``student/``. A non-finite loss stops the run with
the last good checkpoint intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import DistillSection
from ..errors import EdgecError, InputError
from ..manifest import atomic_write_bytes, atomic_write_json, staged_dir
from ..data.loader import RowImages, default_workers, row_loader
from ..models.student import Student, StudentSpec, create_student, read_student_config, save_student
from .cache import CacheRows
from .ddp import Dist, all_gather_cat, global_batch_norm, max_abs_diff_to_rank0
from .losses import Batch, DistillLoss

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "optimizer.safetensors"


class TrainingDiverged(EdgecError):
    """The loss became NaN or infinite: exit code 2, last good checkpoint kept."""


@dataclass
class Split:
    """Training or eval rows: the teacher's cached targets (memory-mapped) and the images, read by row."""

    rows: CacheRows
    images: RowImages  # decoded at the student's size, in DataLoader workers

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def views(self) -> int:
        return self.images.views


class EpochBatches:
    """The batches of one epoch for this process, as one process with the whole batch draws them.

    The order, caption choices and views depend only on (seed, epoch): a resumed run and N DDP
    processes (each taking its slice of every global batch) see what one process would. Iterated
    as a DataLoader batch sampler it yields dataset codes ``row * views + view``.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, views: int, dist: Dist) -> None:
        self.n, self.batch_size, self.n_steps, self.seed, self.views, self.dist = n, batch_size, steps, seed, views, dist
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def set_epoch(self, epoch: int) -> None:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        pick_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        view_gen = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        per_rank = self.batch_size // self.dist.world
        lo, hi = self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank
        self.steps = []
        for step in range(self.n_steps):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            draws = torch.randint(0, 1 << 30, (len(idx),), generator=pick_gen)
            views = (torch.randint(0, self.views, (len(idx),), generator=view_gen) if self.views > 1
                     else torch.zeros(len(idx), dtype=torch.int64))
            self.steps.append((idx[lo:hi].numpy(), draws[lo:hi].numpy(), views[lo:hi].numpy()))

    def __iter__(self):
        for idx, _, views in self.steps:
            yield (idx * self.views + views).tolist()

    def __len__(self) -> int:
        return len(self.steps)


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.world > 1:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"distill.device = {name!r} but CUDA is not available", hint="use device = 'auto' or 'cpu'")
    return torch.device(name)


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch (N, 3, H, W): 'light' = random resized crop (scale 0.8-1), 'standard' + h-flip."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    scales = torch.empty(n).uniform_(0.8, 1.0, generator=gen)
    for i in range(n):
        ch, cw = max(1, round(h * scales[i].sqrt().item())), max(1, round(w * scales[i].sqrt().item()))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    if mode == "standard":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


class Normalize(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def eval_loader(split: Split, workers: int, batch_size: int = 256):
    n = len(split)
    batches = [[i * split.views for i in range(lo, min(n, lo + batch_size))] for lo in range(0, n, batch_size)]
    return row_loader(split.images, batches, workers)


@torch.inference_mode()
def evaluate(student: nn.Module, norm: Normalize, split: Split, class_text: torch.Tensor | None,
             device: torch.device, loader=None) -> dict[str, float]:
    was = student.training
    student.eval()
    loader = loader if loader is not None else eval_loader(split, 0)
    embs, teachers = [], []
    for codes, pixels in loader:
        rows = codes.numpy() // split.views
        embs.append(student(norm(pixels.to(device))).float().cpu())
        teachers.append(F.normalize(torch.from_numpy(split.rows.teacher(rows)), dim=-1))
    student.train(was)
    s, t = F.normalize(torch.cat(embs), dim=-1), torch.cat(teachers)
    label_ids = torch.from_numpy(split.rows.label_ids)
    cos = (s * t).sum(-1)
    metrics = {"cosine_mean": float(cos.mean()), "cosine_p1": float(torch.quantile(cos, 0.01))}
    if class_text is not None and len(class_text):
        sp, tp = (s @ class_text.T).argmax(-1), (t @ class_text.T).argmax(-1)
        metrics["agreement"] = float((sp == tp).float().mean())
        mask = label_ids >= 0
        if mask.any():
            metrics["accuracy"] = float((sp[mask] == label_ids[mask]).float().mean())
            metrics["teacher_accuracy"] = float((tp[mask] == label_ids[mask]).float().mean())
            metrics["accuracy_delta"] = metrics["accuracy"] - metrics["teacher_accuracy"]
    return metrics


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> dict:
    from safetensors.torch import save_file

    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(folder / STATE_TENSORS))
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path, meta: dict) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_TENSORS))
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    for key, colour in (("agreement", "tab:green"), ("cosine_mean", "tab:orange"), ("accuracy", "tab:red")):
        if rows and rows[0].get(key) not in (None, ""):
            ax2.plot(epochs, [r[key] for r in rows], "s-", color=colour, label=f"eval {key}")
    ax2.set_ylabel("eval")
    fig.legend(loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class TrainResult:
    best: dict[str, float]
    history: list[dict]
    epochs_run: int
    stopped_early: bool
    seconds: float
    ranks_max_abs_diff: float | None = None


def train(spec: StudentSpec, params: DistillSection, train_split: Split, eval_split: Split | None,
          class_text: torch.Tensor | None, *, logit_scale: float, out: Path, augment_mode: str,
          resume: bool = False, progress: bool = True, extra: dict | None = None, log=print,
          max_steps: int | None = None) -> TrainResult:
    """Train the student; ``max_steps`` stops each epoch early (smoke runs and benchmarks)."""
    dist = Dist.from_env()
    device = resolve_device(params.device, dist)
    torch.manual_seed(params.seed)
    student: nn.Module = create_student(spec, seed=params.seed).to(device)
    if dist.world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if device.type == "cuda" else student
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    core: Student = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    norm = Normalize(spec.preprocess.mean, spec.preprocess.std).to(device)

    decay = [p for n, p in core.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in core.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=params.lr)
    n = len(train_split)
    if params.batch_size % dist.world:
        raise InputError(f"distill.batch_size {params.batch_size} is not divisible by {dist.world} processes")
    steps_per_epoch = max(1, n // params.batch_size)
    if max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    total_steps = steps_per_epoch * params.epochs
    warmup = min(total_steps - 1, round(params.warmup_epochs * steps_per_epoch))
    if params.warmup_epochs >= params.epochs and dist.main:
        log(f"note: distill.warmup_epochs = {params.warmup_epochs:g} covers the whole {params.epochs}-epoch run: the "
            f"learning rate only ramps up to {params.lr:g} and never settles; train more epochs or lower warmup_epochs")

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = DistillLoss(params.losses, temperature=params.temperature, logit_scale=logit_scale,
                          class_text=class_text.to(device) if class_text is not None else None,
                          gather=all_gather_cat if dist.world > 1 else (lambda x: x))

    last = out / "last"
    start_epoch, history, best, best_key, bad_epochs = 0, [], {}, None, 0
    if resume and (last / STATE_JSON).is_file():
        cfg = read_student_config(last)
        if cfg["name"] != spec.name or int(cfg["embed_dim"]) != spec.embed_dim:
            raise InputError(f"cannot resume from {last}: it holds {cfg['name']} with embedding dim {cfg['embed_dim']}, "
                             f"this run trains {spec.name} with dim {spec.embed_dim}",
                             hint="use a new --out folder, or drop --resume to start over")
        from safetensors.torch import load_file

        core.load_state_dict(load_file(str(last / "model.safetensors")))
        meta = json.loads((last / STATE_JSON).read_text())
        _load_optimizer(opt, last, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start_epoch, history, best, bad_epochs = meta["epoch"], meta["history"], meta["best"], meta["bad_epochs"]
        if dist.main:
            log(f"resumed from {last} at epoch {start_epoch}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    gen = torch.Generator()
    workers = default_workers() if params.workers is None else params.workers
    views = train_split.views
    sampler = EpochBatches(n, params.batch_size, steps_per_epoch, params.seed, views, dist)
    loader = row_loader(train_split.images, sampler, workers, pin=device.type == "cuda")
    evals = eval_loader(eval_split, workers) if eval_split is not None else None
    rows = train_split.rows
    use_captions = bool(params.losses.contrastive_text) and rows.has_captions
    t_start, stopped_early = time.time(), False
    bar = _progress(progress and dist.main, total_steps, start_epoch * steps_per_epoch)
    try:
        for epoch in range(start_epoch, params.epochs):
            sampler.set_epoch(epoch)
            # randomness depends only on (seed, epoch[, rank]): a resumed run repeats it.
            gen.manual_seed((params.seed * 1_000_003 + epoch) * 1009 + dist.rank)
            t_epoch, seen, running, parts_sum, waited, step_times = time.time(), 0, 0.0, {}, 0.0, []
            batches = iter(loader)
            for step in range(steps_per_epoch):
                t_step = time.perf_counter()
                codes, pixels = next(batches)
                if step:  # the first batch also waits for the workers to start
                    waited += time.perf_counter() - t_step
                idx, draws, view = sampler.steps[step]
                if not np.array_equal(codes.numpy(), idx * views + view):
                    raise RuntimeError("the data loader returned a batch out of order")
                x = norm(pixels.to(device, non_blocking=True))
                if views == 1:
                    x = augment(x, augment_mode, gen)
                with autocast, global_batch_norm(dist.world > 1 and device.type == "cpu"):
                    emb = student(x)
                target = F.normalize(torch.from_numpy(rows.teacher(idx, view)), dim=-1)
                batch = Batch(emb.float(), target.to(device))
                if use_captions:
                    cap, cap_id = rows.caption(idx, draws)
                    batch.caption = F.normalize(torch.from_numpy(cap), dim=-1).to(device)
                    batch.caption_id = torch.from_numpy(cap_id).to(device)
                loss, parts = loss_fn(batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; "
                        f"the last good checkpoint is {last if last.exists() else 'none (first epoch)'}",
                        hint="lower distill.lr or check the data; --resume continues from the last good epoch")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if params.grad_clip:
                    nn.utils.clip_grad_norm_(core.parameters(), params.grad_clip)
                opt.step()
                sched.step()
                running += float(loss.detach())
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                seen += len(idx) * dist.world
                step_times.append(time.perf_counter() - t_step)
                if bar is not None:
                    bar.update(1, loss=running / (step + 1), ips=seen / max(1e-9, time.time() - t_epoch), epoch=epoch + 1)
            del batches
            row = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch,
                   **{f"loss_{k}": v / steps_per_epoch for k, v in parts_sum.items()},
                   "lr": opt.param_groups[0]["lr"], "images_per_s": seen / (time.time() - t_epoch),
                   "loader_wait_share": waited / max(1e-9, sum(step_times[1:])),
                   "step_seconds_median": float(np.median(step_times)), "seconds": time.time() - t_start}
            metrics = evaluate(core, norm, eval_split, class_text, device, evals) if eval_split is not None else {}
            row.update(metrics)
            history.append(row)
            best_key = "agreement" if "agreement" in metrics else "cosine_mean" if metrics else None
            improved = best_key is None or not best or _rank(metrics) > _rank(best)
            if improved:
                best, bad_epochs = dict(row), 0
            else:
                bad_epochs += 1
            if dist.main:
                _checkpoint(core, spec, opt, sched, out, epoch + 1, history, best, bad_epochs, improved, extra)
                if bar is None:
                    log(_epoch_line(row, params.epochs))
                else:
                    bar.log(_epoch_line(row, params.epochs))
            if params.patience is not None and bad_epochs >= params.patience:
                stopped_early = True
                if dist.main:
                    log(f"early stop: no {best_key} improvement for {params.patience} epochs")
                break
    finally:
        if bar is not None:
            bar.close()
    diff = max_abs_diff_to_rank0(core.parameters(), dist)
    return TrainResult(best, history, len(history), stopped_early, time.time() - t_start, diff)


def _rank(metrics: dict) -> tuple[float, float]:
    """Eval ordering: zero-shot agreement when labels exist, cosine to break ties (or alone)."""
    return (metrics.get("agreement", 0.0), metrics.get("cosine_mean", 0.0))


def _epoch_line(row: dict, epochs: int) -> str:
    extra = "".join(f" {k} {row[k]:.4f}" for k in ("agreement", "accuracy", "cosine_mean") if k in row)
    return (f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f}{extra} "
            f"({row['images_per_s']:.0f} img/s, {row['seconds']:.0f}s)")


def _checkpoint(core: Student, spec: StudentSpec, opt, sched, out: Path, epoch: int, history: list[dict],
                best: dict, bad_epochs: int, improved: bool, extra: dict | None) -> None:
    with staged_dir(out / "last") as tmp:
        save_student(core, spec, tmp / "s", extra={"epoch": epoch, **(extra or {})})
        for f in (tmp / "s").iterdir():
            shutil.move(str(f), tmp / f.name)
        (tmp / "s").rmdir()
        meta = {"epoch": epoch, "history": history, "best": best, "bad_epochs": bad_epochs,
                "scheduler": sched.state_dict(), "optimizer": _save_optimizer(opt, tmp)}
        atomic_write_json(tmp / STATE_JSON, meta)
    if improved:
        save_student(core, spec, out / "student", extra={"epoch": epoch, "eval": {k: v for k, v in best.items()
                                                                                   if isinstance(v, float)}, **(extra or {})})
    with io.StringIO() as buf:
        keys = list(dict.fromkeys(k for r in history for k in r))
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    _plot(history, out / "learning_curve.png")


class _Bar:
    def __init__(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("distill epoch {task.fields[epoch]}"), BarColumn(),
            TextColumn("{task.fields[loss_text]}"), TextColumn("{task.fields[ips_text]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        # before the first step there is no loss or speed yet: say so instead of "loss nan 0 img/s"
        self.task = self.progress.add_task("distill", total=total, completed=done, loss_text="loss -",
                                           ips_text="first step...", epoch=1)
        self.progress.start()

    def update(self, n: int, *, loss: float | None = None, ips: float | None = None, **fields) -> None:
        if loss is not None:
            fields["loss_text"] = f"loss {loss:.4f}"
        if ips is not None:
            fields["ips_text"] = f"{ips:.0f} img/s"
        self.progress.update(self.task, advance=n, **fields)

    def log(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def _progress(enabled: bool, total: int, done: int) -> _Bar | None:
    return _Bar(total, done) if enabled else None
