"""make bench-breadth: real-size random-init teachers through inspect, golden, compile --target all
--no-distill and verify, as a user runs them (the edgec command line, exit codes and one-line errors
as they come), into a BENCHMARKS.md table of model x target.

Each model is built locally from its published architecture with random weights (no hub, no network;
edgec.models.teachers). MACs: what ``edgec inspect`` prints for the image tower, beside an independent
count read from the ONNX graph of that tower (Conv, MatMul and Gemm nodes with their inferred shapes).

    python -m edgec.benchmarks.breadth [--models a,b] [--targets a,b] [--work DIR] [--benchmarks BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SECTION = "breadth"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "shapes-clip"
# model -> (teacher family, real architecture override)
MODELS = {
    "open_clip ViT-B-16": ("open_clip-vit", "ViT-B-16"),
    "open_clip ViT-B-32": ("open_clip-vit", "ViT-B-32"),
    "HF CLIPConfig()": ("hf-clip", None),
    "HF SiglipConfig()": ("hf-siglip", None),
    "open_clip convnext_tiny": ("open_clip-convnext", None),
    "open_clip RN50": ("open_clip-resnet", None),
}
TARGETS = ("cpu", "jetson", "edgetpu", "android-tflite", "android", "ios")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def edgec(*args: str, cwd: Path | None = None, timeout: int = 7200) -> tuple[int, str, str, float]:
    """Run the edgec CLI; (exit code, stdout, the last stderr line, seconds)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    return proc.returncode, proc.stdout, lines[-1] if lines else "", time.time() - t0


def onnx_macs(path: Path) -> int:
    """Multiply-accumulates of an ONNX graph's Conv, MatMul and Gemm nodes (see :func:`onnx_mac_split`)."""
    return onnx_mac_split(path)["total"]


def onnx_mac_split(path: Path) -> dict[str, int]:
    """Multiply-accumulates of an ONNX graph's Conv, MatMul and Gemm nodes, with the shapes their tensors take
    when onnxruntime runs the graph once on zeros (every such tensor exposed as an output): ``total`` and
    ``attention_matmuls``, the MatMuls neither of whose inputs is computed from constants alone (initializers,
    Constant nodes and what is computed from them only: weights, however the exporter reshaped them)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    g = model.graph
    nodes = [n for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    const = {t.name: list(t.dims) for t in g.initializer}
    constant = set(const)
    for n in g.node:  # graph order is topological
        if all(x in constant or not x for x in n.input):
            constant.update(n.output)
    names = list(dict.fromkeys(x for n in nodes for x in (n.input[0], n.input[1], n.output[0]) if x not in const))
    present = {o.name for o in g.output}
    g.output.extend(onnx.ValueInfoProto(name=x) for x in names if x not in present)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.int32 if "int32" in i.type else np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    shape = {**const, **{k: list(v.shape) for k, v in outs.items()}}
    total = attention = 0
    for n in nodes:
        out = shape[n.output[0]]
        if n.op_type == "Conv":
            macs = int(np.prod(out)) * int(np.prod(shape[n.input[1]][1:]))
        else:
            a = shape[n.input[0]]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            macs = int(np.prod(out)) * int(a[-2] if trans_a else a[-1])
        total += macs
        if n.op_type == "MatMul" and n.input[0] not in constant and n.input[1] not in constant:
            attention += macs
    return {"total": total, "attention_matmuls": attention}


def write_config(folder: Path, model: Path, arch: str | None, data: Path) -> Path:
    lines = ["[model]", f"path = {json.dumps(str(model))}"]
    if arch:
        lines.append(f"arch = {json.dumps(arch)}")
    lines += ["[student]", 'targets = { edgetpu = "mobilenetv4_conv_small" }',
              "[data]", f"train = {json.dumps(str(data / 'train'))}", f"eval = {json.dumps(str(data / 'eval'))}",
              "[calibration]", f"path = {json.dumps(str(data / 'train'))}", "num_images = 32",
              "[targets]", 'build = ["cpu", "jetson", "edgetpu", "android-tflite", "android", "ios"]']
    path = folder / "edgec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_model(label: str, family: str, arch_override: str | None, work: Path, data: Path, targets: list[str],
                on_cell=lambda row: None, macs_only: bool = False, force: bool = False) -> dict:
    import torch

    from ..models import load_model
    from ..models.teachers import FAMILIES, build_open_clip_vit

    folder = work / label.replace(" ", "_").replace("(", "").replace(")", "")
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{label}: building the random-init real-size model (same seed every run)")
    if family == "open_clip-vit":
        built = build_open_clip_vit(folder / "model", "real", real_arch=arch_override)
    else:
        built = FAMILIES[family].build(folder / "model", "real")
    row: dict = {"model": label, "targets": {}}
    on_cell(row)
    args = [str(built.path)] + (["--arch", built.arch] if built.arch else [])
    code, stdout, error, secs = edgec("inspect", *args, "--json")
    log(f"{label}: inspect exit {code} ({secs:.0f} s) {error}")
    if code != 0:
        row["inspect"] = {"exit": code, "error": error}
        return row
    info = json.loads(stdout)
    row["inspect"] = {"image_macs": info["towers"]["image"]["macs"], "image_params": info["towers"]["image"]["params"],
                      "image_attention_macs": (info["towers"]["image"].get("macs_split") or {}).get("attention_matmuls"),
                      "embedding_dim": info["embedding_dim"], "input": info["towers"]["image"]["input"]["shape"]}
    # independent count: the image tower's own ONNX graph
    from ..backends.onnx import export

    model = load_model(built.path, arch=built.arch)
    onnx_path = folder / "image_tower.onnx"
    with torch.no_grad():
        export(model.image_encoder, tuple(row["inspect"]["input"]), onnx_path, dynamic_batch=False)
    theirs = onnx_mac_split(onnx_path)
    row["inspect"]["onnx_macs"], row["inspect"]["onnx_attention_macs"] = theirs["total"], theirs["attention_matmuls"]
    log(f"{label}: image MACs {row['inspect']['image_macs'] / 1e9:.3f} G (inspect; attention matmuls "
        f"{(row['inspect']['image_attention_macs'] or 0) / 1e9:.3f} G) vs {theirs['total'] / 1e9:.3f} G (ONNX graph; "
        f"{theirs['attention_matmuls'] / 1e9:.3f} G)")
    del model
    if macs_only:
        return row
    config = write_config(folder, built.path, built.arch, data)
    if (folder / "build" / "golden").is_dir():  # same seed, same model: the golden set of an earlier run stands
        code, error, secs = 0, "", 0.0
    else:
        code, _, error, secs = edgec("golden", "--config", str(config), cwd=folder)
    log(f"{label}: golden exit {code} ({secs:.0f} s) {error}")
    if code != 0:
        row["golden"] = {"exit": code, "error": error}
        return row
    for target in targets:
        code, stdout, error, secs = edgec("compile", "--config", str(config), "--target", target, "--no-distill",
                                          "--no-progress", "--json", *(["--force"] if force else []), cwd=folder)
        cell = {"compile_exit": code, "build_s": round(secs)}
        if code != 0:
            cell["error"] = error
            log(f"{label} / {target}: compile exit {code} ({secs:.0f} s) {error}")
            row["targets"][target] = cell
            on_cell(row)
            continue
        out = folder / "build" / target
        manifest = json.loads((out / "manifest.json").read_text())
        image = next(a for a in manifest["artifacts"] if a.get("tower", "image") == "image")
        cell.update({"artifact": image["path"], "mb": round(image["bytes"] / 1e6, 2)})
        ops = manifest.get("ops") or {}
        if ops.get("accelerator_ops_checked"):
            cell["mapped_share"] = ops.get("mapped_share")
            first = ops.get("first_unsupported") or {}
            cell["first_unmapped"] = f"#{first.get('index')} {first.get('op')} in {first.get('layer')}" if first else None
        deleg = (manifest.get("delegation") or {}).get("shipped") or {}
        if deleg:
            cell["delegated_share"] = deleg.get("delegated_share")
            cell["rewrites"] = deleg.get("rewrites")
        coreml = ((manifest.get("variants") or {}).get("coreml") or {})
        if coreml.get("delegation"):
            cell["coreml_share"] = coreml["delegation"].get("delegated_share")
        elif coreml.get("reason"):
            cell["coreml_share"] = coreml["reason"]
        code, stdout, error, vsecs = edgec("verify", str(out), "--json", cwd=folder)
        cell.update({"verify_exit": code, "verify_s": round(vsecs)})
        try:  # verify.json is written before a failed gate stops verify
            report = json.loads((out / "verify.json").read_text())
            cell["cosine"] = report["results"][0]["metrics"]["cosine_mean"]
            cell["agreement"] = report["results"][0]["metrics"].get("agreement")
        except (OSError, json.JSONDecodeError, KeyError, IndexError):
            pass
        if code != 0:
            cell["error"] = error
        log(f"{label} / {target}: compile {secs:.0f} s, {cell['mb']} MB, verify exit {code}, cosine "
            f"{cell.get('cosine')} {error}")
        row["targets"][target] = cell
        on_cell(row)
    return row


def markdown(rows: list[dict], targets: list[str], threads: str) -> str:
    out = ["### Breadth: real-size teachers (random init), `compile --no-distill`, every target", "",
           f"`make bench-breadth` on this machine ({threads}); every cell ran here: `compile` then `verify` (exit code "
           "and the one error line when not 0). cosine: verify's cosine_mean to the eager teacher on the golden images. "
           "Edge TPU: share of ops in the TPU's one subgraph (edgec's op-list check; gate >= 0.95). XNNPACK: share of "
           "nodes delegated in the shipped .pte, with the modules edgec rewrote into ops XNNPACK takes "
           "(`edgec/backends/rewrites.py`; cells built before attention was rewritten say 0 attention). Image MACs: `edgec inspect`'s count beside one read from the "
           "tower's exported ONNX graph (Conv, MatMul, Gemm), with, in brackets, the part in attention matmuls "
           "(activation x activation: Q K^T and A V; weights-only counts such as fvcore's leave it out).", "",
           "| model | image MACs (inspect / ONNX graph) | " + " | ".join(targets) + " |",
           "|---|---|" + "---|" * len(targets)]
    for r in rows:
        ins = r.get("inspect", {})
        if "image_macs" in ins:
            macs = f"{ins['image_macs'] / 1e9:.2f} G / {ins['onnx_macs'] / 1e9:.2f} G"
            if ins.get("image_attention_macs") is not None and ins.get("onnx_attention_macs") is not None:
                macs += (f" (attention matmuls {ins['image_attention_macs'] / 1e9:.2f} G / "
                         f"{ins['onnx_attention_macs'] / 1e9:.2f} G)")
        else:
            macs = f"inspect exit {ins.get('exit')}: {ins.get('error', '')}"
        cells = []
        for t in targets:
            c = r["targets"].get(t)
            if c is None:
                cells.append("not run" if "golden" not in r else f"golden exit {r['golden']['exit']}")
            elif c["compile_exit"] != 0:
                cells.append(f"refused (exit {c['compile_exit']}, {c['build_s']} s): {c.get('error', '').removeprefix('error: ')}")
            else:
                parts = [("passed" if c["verify_exit"] == 0 else f"verify exit {c['verify_exit']}"),
                         f"{c['build_s']} s", f"{c['mb']} MB"]
                if c.get("cosine") is not None:
                    parts.append(f"cos {c['cosine']:.4f}")
                if c.get("agreement") is not None:
                    parts.append(f"agreement {c['agreement']:.4f}")
                if "mapped_share" in c:
                    parts.append(f"TPU {c['mapped_share']:.1%}" + (f" (first off: {c['first_unmapped']})" if c.get("first_unmapped") else ""))
                if "delegated_share" in c:
                    rw = c.get("rewrites")
                    parts.append(f"XNNPACK {c['delegated_share']:.1%}" + (
                        f" (rewritten: {rw.get('layer_norm', 0)} LayerNorm, {rw.get('attention', 0)} attention)"
                        if rw else ""))
                if isinstance(c.get("coreml_share"), float):
                    parts.append(f"Core ML {c['coreml_share']:.1%} (unverified here)")
                elif c.get("coreml_share"):
                    parts.append(f"Core ML not built: {c['coreml_share']}")
                if c["verify_exit"] != 0 and c.get("error"):
                    parts.append(c["error"].removeprefix("error: ").split(" (details in ")[0])
                cells.append(", ".join(parts))
        out.append(f"| {r['model']} | {macs} | " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    missing = [m for m in MODELS if m not in {r["model"] for r in rows}]
    if missing or any(c is None for r in rows for c in (r["targets"].get(t) for t in targets)):
        out += ["", "Not measured in this run (stopped before them; `make bench-breadth` runs every row and cell): "
                + ", ".join(missing + [f"{r['model']} on {t}" for r in rows for t in targets if t not in r["targets"]])
                + "."]
    return "\n".join(out) + "\n"


def merge_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """The rows of an earlier run with this run's measurements over them, in MODELS order: a model run again
    gets this run's inspect and golden results (the earlier ones until this run has its own), and its cells for
    the targets this run built replace the earlier ones (the cells of targets this run did not build stay)."""
    by_model = {r["model"]: r for r in earlier}
    for r in new:
        old = by_model.get(r["model"], {})
        kept = {"inspect": old["inspect"]} if "inspect" in old else {}
        by_model[r["model"]] = {**kept, **r, "targets": {**old.get("targets", {}), **r["targets"]}}
    order = list(MODELS) + [m for m in by_model if m not in MODELS]
    return [by_model[m] for m in order if m in by_model]


def columns(rows: list[dict], targets: list[str]) -> list[str]:
    """The table's targets: this run's and those of earlier rows, in the default order."""
    seen = set(targets) | {t for r in rows for t in r["targets"]}
    return [t for t in TARGETS if t in seen] + [t for t in targets if t not in TARGETS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="edgec on real-size teachers, every target")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgec-bench-breadth"))
    ap.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--fresh", action="store_true", help="remove the work folder first")
    ap.add_argument("--force", action="store_true", help="build every cell again (compile --force: edgec's code "
                                                         "changed, its inputs did not)")
    ap.add_argument("--macs-only", action="store_true", help="inspect and the ONNX graph's MAC count only (the "
                                                             "cells of earlier runs stay)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the section from the work folder's results "
                                                               "(and each target's verify.json) without running anything")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if a.table_only:
        from ..quantize.compare import write_section

        rows = json.loads((a.work / "results.json").read_text())
        for r in rows:
            folder = a.work / r["model"].replace(" ", "_").replace("(", "").replace(")", "")
            for t, c in r["targets"].items():
                try:
                    res = json.loads((folder / "build" / t / "verify.json").read_text())["results"][0]
                    c["cosine"], c["agreement"] = res["metrics"]["cosine_mean"], res["metrics"].get("agreement")
                    bad = [g for g in res["gates"] if not g["passed"]]
                    if bad:
                        c["error"] = "gates failed: " + ", ".join(
                            f"{g['gate']} ({'n/a' if g['value'] is None else format(g['value'], '.4f')})" for g in bad)
                except (OSError, json.JSONDecodeError, KeyError, IndexError):
                    pass
                try:
                    manifest = json.loads((folder / "build" / t / "manifest.json").read_text())
                    variant = (manifest.get("variants") or {}).get("coreml") or {}
                    if variant.get("delegation"):
                        c["coreml_share"] = variant["delegation"].get("delegated_share")
                    shipped = (manifest.get("delegation") or {}).get("shipped") or {}
                    if shipped.get("rewrites") is not None:
                        c["rewrites"] = shipped["rewrites"]
                except (OSError, json.JSONDecodeError):
                    pass
        write_section(a.benchmarks, SECTION, markdown(rows, columns(rows, targets),
                                                      f"{os.cpu_count()} cores, torch threads default"))
        return 0
    if a.fresh:
        shutil.rmtree(a.work, ignore_errors=True)
    data = a.work / "data"
    if not (data / "eval").is_dir():
        log("writing the example's shapes data (small eval and calibration splits)")
        for split, scale in (("train", "0.02"), ("eval", "0.1")):
            subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(data), "--splits", split,
                            "--scale", scale], check=True, capture_output=True)
    from ..quantize.compare import write_section

    rows, results = [], a.work / "results.json"
    threads = f"{os.cpu_count()} cores, torch threads default"

    def save(row: dict) -> None:  # after every cell: an interrupted run keeps what it measured
        # rows of earlier runs in this work folder stay in the table (a run of some models adds or replaces theirs)
        earlier = json.loads(results.read_text()) if results.is_file() else []
        done = merge_rows(earlier, [r for r in rows if r["model"] != row["model"]] + [row])
        results.write_text(json.dumps(done, indent=2))
        write_section(a.benchmarks, SECTION, markdown(done, columns(done, targets), threads))

    for label in models:
        family, arch = MODELS[label]
        rows.append(bench_model(label, family, arch, a.work, data, [] if a.macs_only else targets, on_cell=save,
                                macs_only=a.macs_only, force=a.force))
        save(rows[-1])
        log(f"wrote {a.benchmarks} (section {SECTION}) and {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
