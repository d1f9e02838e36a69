"""Train the shapes-clip teacher contrastively and save it in edgec's checkpoint format.

    python examples/shapes-clip/train_teacher.py            # data from make_data.py
    python examples/shapes-clip/train_teacher.py --epochs 2 --out /tmp/teacher   # a quick try

Uses CUDA when it is available, else the CPU (all its cores). Seeded; the run's settings,
time and final zero-shot accuracy are written into the checkpoint's edgec_model.json.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent

from edgec.data.folder import load_pixels, read_folder  # noqa: E402
from edgec.data.preprocess import Preprocess  # noqa: E402
from edgec.models import edgec_format  # noqa: E402
from edgec.models.edgec_clip import ClipSpec, EdgecClip, TextSpec, VisionSpec  # noqa: E402
from edgec.models.tokenizers import WordTokenizer  # noqa: E402
from edgec.verify.metrics import top1_accuracy, zero_shot_predictions  # noqa: E402

PROMPTS = ("a photo of a {}.",)


def same_text(texts: list[str], device: torch.device) -> torch.Tensor:
    """Soft contrastive targets: a caption repeated in the batch is a positive for every image it
    describes, not a negative (identical short captions are common in this data)."""
    codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([codes[t] for t in texts], device=device)
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def zero_shot(model: EdgecClip, tok: WordTokenizer, pixels: torch.Tensor, labels: list[str], y: np.ndarray,
              device: torch.device) -> float:
    model.eval()
    with torch.inference_mode():
        ids = torch.as_tensor(tok([p.format(c) for c in labels for p in PROMPTS]), device=device)
        text = F.normalize(model.text(ids), dim=-1).reshape(len(labels), len(PROMPTS), -1).mean(1)
        img = torch.cat([model.visual(pixels[i:i + 512].to(device)) for i in range(0, len(pixels), 512)])
    model.train()
    return top1_accuracy(zero_shot_predictions(img.cpu().numpy(), text.cpu().numpy()), y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=HERE / "teacher")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--stem", choices=["patch", "conv"], default="conv")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pre = Preprocess(size=(args.image_size, args.image_size), resize="bicubic", crop="center")

    t0 = time.time()
    train, evals = read_folder(args.data / "train"), read_folder(args.data / "eval")
    labels = train.labels
    x_train = torch.from_numpy(load_pixels(train, pre).pixels)
    x_eval = torch.from_numpy(load_pixels(evals, pre).pixels)
    y_eval = np.array([labels.index(it.label) for it in evals.items])
    caps = [it.captions for it in train.items]
    tok = WordTokenizer.build([c for cs in caps for c in cs] + [p.format(c) for c in labels for p in PROMPTS],
                              context_length=16)
    print(f"loaded {len(x_train)} train / {len(x_eval)} eval images, vocabulary {len(tok.vocab)} "
          f"in {time.time() - t0:.1f}s on {device}")

    spec = ClipSpec(
        embed_dim=256,
        vision=VisionSpec(image_size=args.image_size, patch_size=args.patch_size, stem=args.stem, width=256, layers=6, heads=4),
        text=TextSpec(vocab_size=len(tok.vocab), context_length=16, width=128, layers=2, heads=4, eot_id=tok.eot_id),
    )
    model = EdgecClip(spec).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))

    t_train = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            texts = [caps[i][rng.integers(len(caps[i]))] for i in idx]
            pixels = x_train[idx].to(device)
            ids = torch.as_tensor(tok(texts), device=device)
            img, txt = model(pixels, ids)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = (F.cross_entropy(logits, target := same_text(texts, device)) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
        acc = zero_shot(model, tok, x_eval, labels, y_eval, device)
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} "
              f"zero-shot top-1 {acc:.4f} ({time.time() - t_train:.0f}s)", flush=True)
    train_s = time.time() - t_train

    model = model.cpu().eval()
    edgec_format.save(model, args.out, preprocess=pre, tokenizer=tok, extra={
        "name": "shapes-clip-teacher",
        "labels": labels,
        "prompts": list(PROMPTS),
        "training": {
            "script": "examples/shapes-clip/train_teacher.py", "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
            "train_seconds": round(train_s, 1), "machine": platform.processor() or platform.machine(),
            "eval_zero_shot_top1": round(acc, 4), "torch": torch.__version__,
        },
    })
    print(f"wrote {args.out} (zero-shot top-1 {acc:.4f}, {train_s / 60:.1f} min training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
