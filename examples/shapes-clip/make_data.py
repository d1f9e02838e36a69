"""Deterministic image-caption data for the shapes-clip example.

Each image shows one shape (6 kinds) in one colour (4), at one of 3 sizes and 5 positions,
on one of 6 backgrounds, with pixel noise and a small rotation. The class is "<colour>
<shape>" (24 classes); captions are composed from all the attributes. Splits are written
the way a user's data looks: an image folder per class plus a ``captions.jsonl``.

    python examples/shapes-clip/make_data.py --out examples/shapes-clip/data

The same seed gives the same bytes (numpy PCG64 + Pillow drawing, no threads).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
}
SIZES = {"small": (0.13, 0.17), "medium": (0.21, 0.26), "large": (0.30, 0.36)}
POSITIONS = {
    "center": (0.5, 0.5),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
BACKGROUNDS = ("white", "black", "gray", "noisy", "striped", "gradient")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# (split, images per class, seed)
SPLITS = {"train": (400, 1), "eval": (25, 2), "calibration": (8, 3)}

# Every image gets three short captions (colour and shape only) and three long ones. The short
# ones matter: a long caption can be told from the others in a batch by colour, size, position
# and background alone, so a contrastive model trained on long captions barely learns shape.
SHORT_TEMPLATES = (
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
)
LONG_TEMPLATES = (
    "a {size} {colour} {shape} in the {pos} on a {bg} background",
    "a photo of a {size} {colour} {shape}",
    "{colour} {shape}, {size}, {pos}",
    "there is a {colour} {shape} at the {pos}",
    "a {colour} {shape} on a {bg} background",
    "a {size} {colour} {shape}",
    "a {bg} background with a {colour} {shape}",
)


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    size: str
    pos: str
    bg: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (45, 135, 225, 315)]
        pts = [(x * 1.0, y * 1.0) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -1.15), (0.8, 0), (0, 1.15), (-0.8, 0)]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:  # pragma: no cover
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _background(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    tone = rng.integers(-12, 13)
    if kind == "white":
        img = np.full((n, n, 3), 240 + tone // 2, np.float32)
    elif kind == "black":
        img = np.full((n, n, 3), 22 + tone, np.float32)
    elif kind == "gray":
        img = np.full((n, n, 3), 128 + tone, np.float32)
    elif kind == "noisy":
        img = rng.normal(128 + tone, 45, (n, n, 1)).repeat(3, axis=2).astype(np.float32)
    elif kind == "striped":
        period = int(rng.integers(8, 17))
        a, b = 90 + tone, 170 + tone
        idx = np.arange(n)
        band = ((idx // period) % 2).astype(np.float32)
        line = a + (b - a) * band
        img = (line[None, :, None] if rng.random() < 0.5 else line[:, None, None]) * np.ones((n, n, 3), np.float32)
    elif kind == "gradient":
        ramp = np.linspace(30 + tone, 220 + tone, n, dtype=np.float32)
        img = (ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]) * np.ones((n, n, 3), np.float32)
    else:  # pragma: no cover
        raise ValueError(kind)
    return img


def render(sample: Sample, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One image for ``sample``; the rng supplies jitter, rotation and noise."""
    ss = 2  # supersample for anti-aliased edges
    n = size * ss
    bg = np.clip(_background(sample.bg, n, rng), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    lo, hi = SIZES[sample.size]
    r = float(rng.uniform(lo, hi)) * n
    px, py = POSITIONS[sample.pos]
    cx = float(np.clip(px * n + rng.uniform(-0.05, 0.05) * n, r * 1.05, n - r * 1.05))
    cy = float(np.clip(py * n + rng.uniform(-0.05, 0.05) * n, r * 1.05, n - r * 1.05))
    colour = np.clip(np.array(COLOURS[sample.colour]) + rng.integers(-20, 21, 3), 0, 255)
    fill = tuple(int(v) for v in colour)
    angle = math.radians(float(rng.uniform(-12, 12)))
    draw = ImageDraw.Draw(img)
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(sample.shape, cx, cy, r, angle), fill=fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, np.float32) + rng.normal(0, float(rng.uniform(0, 10)), (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def captions(sample: Sample, rng: np.random.Generator) -> list[str]:
    templates = list(SHORT_TEMPLATES)
    templates += [LONG_TEMPLATES[i] for i in rng.choice(len(LONG_TEMPLATES), size=3, replace=False)]
    return [t.format(size=sample.size, colour=sample.colour, shape=sample.shape, pos=sample.pos, bg=sample.bg)
            for t in templates]


def write_split(out: Path, per_class: int, seed: int, size: int = 96) -> int:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, label in enumerate(CLASSES):
        colour, shape = label.split(" ")
        folder = out / label.replace(" ", "_")
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            sample = Sample(
                shape=shape,
                colour=colour,
                size=str(rng.choice(list(SIZES))),
                pos=str(rng.choice(list(POSITIONS))),
                bg=str(rng.choice(BACKGROUNDS)),
            )
            name = f"{folder.name}/{ci:02d}_{i:04d}.png"
            render(sample, rng, size).save(out / name, optimize=False)
            rows.append(
                {
                    "image": name,
                    "label": sample.label,
                    "captions": captions(sample, rng),
                    "attributes": {"shape": shape, "colour": colour, "size": sample.size, "position": sample.pos,
                                   "background": sample.bg},
                }
            )
    with open(out / "captions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--splits", nargs="*", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply images per class (tests use less)")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--force", action="store_true", help="write splits that already exist again")
    args = ap.parse_args(argv)
    for split in args.splits:
        per_class, seed = SPLITS[split]
        if (args.out / split / "captions.jsonl").is_file() and not args.force:
            print(f"{args.out / split} exists (deterministic: same seed, same images); --force writes it again")
            continue
        n = write_split(args.out / split, max(1, round(per_class * args.scale)), seed, args.size)
        print(f"wrote {n} images to {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
