"""Zero-shot top-1 of a model on the shapes-clip eval split, with prompts built from class names.

    python examples/shapes-clip/evaluate.py [--model examples/shapes-clip/teacher] [--json]

Generates the eval split first if it is missing (make_data.py, deterministic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def evaluate(model_path: Path, data: Path, prompts: list[str]) -> dict:
    from edgec.data.folder import load_pixels, read_folder
    from edgec.models import load_model
    from edgec.models.zeroshot import class_text_embeddings
    from edgec.verify.metrics import top1_accuracy, zero_shot_predictions

    t0 = time.time()
    model = load_model(model_path)
    folder = read_folder(data)
    images = model.encode_image(load_pixels(folder, model.preprocess).pixels).numpy()
    text = class_text_embeddings(model, folder.labels, prompts).numpy()
    pred = zero_shot_predictions(images, text)
    y = folder.label_ids()
    per_class = {c: float(np.mean(pred[y == i] == i)) for i, c in enumerate(folder.labels)}
    return {
        "model": str(model_path),
        "data": str(data),
        "images": len(folder),
        "classes": len(folder.labels),
        "prompts": prompts,
        "zero_shot_top1": round(top1_accuracy(pred, y), 4),
        "worst_classes": dict(sorted(per_class.items(), key=lambda kv: kv[1])[:3]),
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=HERE / "teacher")
    ap.add_argument("--data", type=Path, default=HERE / "data" / "eval")
    ap.add_argument("--prompt", action="append", dest="prompts", help="prompt template with {} (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (args.data / "captions.jsonl").exists() and args.data == HERE / "data" / "eval":
        sys.path.insert(0, str(HERE))
        import make_data

        make_data.main(["--out", str(args.data.parent), "--splits", "eval"])
    result = evaluate(args.model, args.data, args.prompts or ["a photo of a {}."])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"zero-shot top-1 on {args.data}: {result['zero_shot_top1']:.4f} "
              f"({result['images']} images, {result['classes']} classes, {result['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
