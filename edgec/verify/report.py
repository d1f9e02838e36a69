"""edgec report: one self-contained HTML page comparing the teacher and every target.

Reads each folder's manifest.json, verify.json and bench.json (when present) and the golden
set; plots (matplotlib, embedded as PNG) accuracy against latency and size, per-class agreement,
and shows the eval images on which each artifact agrees least with the teacher.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError, require_module
from ..manifest import atomic_write_text, read_manifest
from .golden import load_golden

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2330;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:1rem 0} th,td{padding:.35rem .7rem;border-bottom:1px solid #e4e6ee;text-align:right}
th:first-child,td:first-child{text-align:left} .pass{color:#137333;font-weight:600} .fail{color:#b3261e;font-weight:600}
.thumbs{display:flex;flex-wrap:wrap;gap:.6rem} figure{margin:0;width:132px;font-size:.72rem;text-align:center}
figure img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccd} .muted{color:#667}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_REQUIRED = {"verify": ({"golden": str, "results": list}, {"artifact": str, "precision": str, "metrics": dict,
                                                           "per_image": dict, "gates": list, "passed": bool}),
             "bench": ({"results": list}, {"artifact": str, "median_ms": (int, float)})}


def _load(folder: Path, name: str) -> dict | None:
    """``verify.json`` or ``bench.json`` of ``folder``, checked for what the report reads (None when absent)."""
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    damaged = InputError(f"{path} is damaged or not written by this edgec", hint=f"run 'edgec {name} {folder}' again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged from None
    top, row = _REQUIRED[name]

    def of(value, kind) -> bool:  # a bool is not a number here
        return isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)

    ok = isinstance(data, dict) and all(of(data.get(k), t) for k, t in top.items())
    ok = ok and all(isinstance(r, dict) and all(of(r.get(k), t) for k, t in row.items()) for r in data["results"])
    if not ok:
        raise damaged
    return data


def _read(folder: Path) -> dict:
    entry = {"folder": folder, "manifest": read_manifest(folder), "verify": _load(folder, "verify"),
             "bench": _load(folder, "bench")}
    if entry["verify"] is None:
        raise InputError(f"{folder} has not been verified (no verify.json)", hint=f"run 'edgec verify {folder}' first")
    return entry


def plot_limits(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Axes for agreement vs latency: x from 0 past the slowest point, y from at most 0.9 (lower when an
    artifact is lower) to 1, so a single target near 1.0 is not blown up into a meaningless range."""
    x_hi = max(xs) * 1.25 if xs and max(xs) > 0 else 1.0
    y_lo = min([0.9, *(y - 0.02 for y in ys if y == y)])
    return 0.0, x_hi, max(0.0, y_lo)


def _failed(row: dict) -> str:
    """The gates an artifact failed, with the values: what a FAIL cell says."""
    failed = [g for g in row.get("gates", []) if not g.get("passed")]
    if not failed:
        return "gate failed"
    return "; ".join(f"{g['gate']} ({g['metric']} = {g['value']:.4f})" if isinstance(g.get("value"), (int, float))
                     else str(g["gate"]) for g in failed)


def _where(bench: dict | None) -> str:
    """Where a latency was measured: this host with the runtime that ran, never the device's figure."""
    if bench is None:
        return "<span class='muted'>(host, eager PyTorch)</span>"
    ran = bench.get("runtime", "?")  # the runtime that ran on this host (bench.json's measured_with says it in words)
    target = bench.get("target_runtime") or bench.get("runtime")
    note = f", not {target}" if target and target != ran else ""
    return f"<span class='muted'>(host, {html.escape(str(ran))}{html.escape(note)})</span>"


def _stage_plots(entries: list[dict]) -> list[tuple[str, str, Path]]:
    """The learning curve of each target's student and the layer sensitivity of its backend, when the
    build folder still has them (distill/<student>/learning_curve.png, quantize/<backend>/sensitivity.png)."""
    plots, seen = [], set()
    for e in entries:
        folder, m = Path(e["folder"]), e["manifest"]
        build = folder.parent
        student_sha = (m.get("sources") or {}).get("student")
        for d in sorted((build / "distill").glob("*/")) if student_sha else []:
            meta = d / "student" / "edgec_student.json"
            curve = d / "learning_curve.png"
            try:
                same = json.loads(meta.read_text()).get("weights_sha256") == student_sha
            except (OSError, ValueError):
                same = False
            if same and curve.is_file() and curve not in seen:
                seen.add(curve)
                plots.append((f"Learning curve: {d.name} (student of {m['target']})", "learning curve", curve))
        backend = (m.get("build") or {}).get("backend")
        sens = build / "quantize" / str(backend) / "sensitivity.png"
        if backend and sens.is_file() and sens not in seen:
            seen.add(sens)
            plots.append((f"Layer sensitivity: {backend} (edgec quantize)", "layer sensitivity", sens))
    return plots


def build_report(folders: list[Path], out: Path, golden_dir: Path | None = None) -> Path:
    require_module("matplotlib", install="matplotlib", purpose="the HTML report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [_read(Path(f)) for f in folders]
    if golden_dir is None:  # the one verify used; it may have been recorded relative to another working folder
        golden_dir = Path(entries[0]["verify"]["golden"])
        beside = Path(entries[0]["folder"]).parent / "golden"
        if not (golden_dir / "golden.json").is_file() and (beside / "golden.json").is_file():
            golden_dir = beside
    golden = load_golden(golden_dir)
    labels = golden.labels
    rows = []
    for e in entries:
        bench = {r["artifact"]: r for r in (e["bench"] or {}).get("results", [])}
        for r in e["verify"]["results"]:
            rows.append({"target": e["manifest"]["target"], "model": e["manifest"].get("model", ""), **r,
                         "bench": bench.get(r["artifact"]),
                         "bytes": next(a["bytes"] for a in e["manifest"]["artifacts"] if a["path"] == r["artifact"])})
    teacher_bench = next((e["bench"]["teacher"] for e in entries if e["bench"] and e["bench"].get("teacher")), None)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edgec report</title><style>{CSS}</style></head><body>",
             "<h1>edgec report</h1>",
             f"<p class='muted'>Teacher {html.escape(golden.meta['teacher']['name'])}; golden outputs on "
             f"{html.escape(golden.meta['device'])}, {len(golden.images)} eval images, {len(labels)} classes.</p>",
             "<h2>Targets</h2><table><tr><th>target / artifact</th><th>model</th><th>precision</th><th>agreement</th>"
             "<th>accuracy</th><th>cosine mean</th><th>cosine p1</th><th>latency ms (median; where measured)</th><th>MB</th>"
             "<th>gates</th></tr>"]
    teacher_acc = next((r["metrics"].get("teacher_accuracy") for r in rows if "teacher_accuracy" in r["metrics"]), None)
    if teacher_acc is not None:
        lat = f"{teacher_bench['median_ms']:.2f} {_where(None)}" if teacher_bench else "-"
        parts.append(f"<tr><td>teacher (full precision)</td><td>{html.escape(golden.meta['teacher']['name'])}</td><td>fp32</td>"
                     f"<td>1.0000</td><td>{teacher_acc:.4f}</td><td>1.0000</td><td>1.0000</td><td>{lat}</td><td>-</td><td></td></tr>")
    for r in rows:
        m = r["metrics"]
        ok = "<span class='pass'>pass</span>" if r["passed"] else f"<span class='fail'>FAIL: {html.escape(_failed(r))}</span>"
        lat = f"{r['bench']['median_ms']:.2f} {_where(r['bench'])}" if r["bench"] else "-"
        parts.append(f"<tr><td>{html.escape(r['target'])} / {html.escape(r['artifact'])}</td><td>{html.escape(r['model'])}</td>"
                     f"<td>{r['precision']}</td><td>{m.get('agreement', float('nan')):.4f}</td>"
                     f"<td>{m.get('accuracy', float('nan')):.4f}</td><td>{m['cosine_mean']:.4f}</td><td>{m['cosine_p1']:.4f}</td>"
                     f"<td>{lat}</td><td>{r['bytes'] / 1e6:.2f}</td><td>{ok}</td></tr>")
    parts.append("</table>")

    # agreement vs latency (marker area ~ size); fixed axes so one target does not autoscale to noise
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    points = [(r["bench"]["median_ms"], r["metrics"].get("agreement", r["metrics"]["cosine_mean"]), r)
              for r in rows if r["bench"]]
    for x, y, r in points:
        ax.scatter(x, y, s=30 + r["bytes"] / 1e5, alpha=0.7)
        ax.annotate(f"{r['target']}/{r['precision']}", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    xs = [x for x, _, _ in points] + ([teacher_bench["median_ms"]] if teacher_bench else [])
    ys = [y for _, y, _ in points]
    if teacher_bench:
        ax.scatter(teacher_bench["median_ms"], 1.0, marker="*", s=160, color="black", zorder=3)
        ax.annotate("teacher (eager, host)", (teacher_bench["median_ms"], 1.0), fontsize=8, xytext=(4, -10),
                    textcoords="offset points")
    else:  # the teacher agrees with itself: the line every artifact is measured against
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.annotate("teacher (agreement 1.0)", (0, 1.0), xycoords=("axes fraction", "data"), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")
    x_lo, x_hi, y_lo = plot_limits(xs, ys)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, 1.005)
    ax.set_xlabel("latency, median ms (batch 1, measured on this host)")
    ax.set_ylabel("zero-shot agreement with teacher")
    ax.set_title("agreement vs latency (marker area ~ artifact size)", fontsize=10)
    ax.grid(alpha=0.3)
    parts.append(f"<h2>Agreement, latency, size</h2><img alt='agreement vs latency' src='{_png(fig)}'>")
    plt.close(fig)
    if not any(r["bench"] for r in rows):
        parts.append("<p class='muted'>No bench.json yet: run 'edgec bench DIR' for latencies.</p>")

    for title, alt, path in _stage_plots(entries):
        parts.append(f"<h2>{html.escape(title)}</h2><p class='muted'>{html.escape(str(path))}</p>"
                     f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>")

    # per-class agreement
    if labels and all("pred" in r["per_image"] for r in rows):
        y = golden.label_ids
        fig, ax = plt.subplots(figsize=(max(6.5, 0.32 * len(labels)), 3.4))
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            pred, ref = np.asarray(r["per_image"]["pred"]), np.asarray(r["per_image"]["teacher_pred"])
            per_class = [float(np.mean(pred[y == c] == ref[y == c])) if (y == c).any() else np.nan for c in range(len(labels))]
            ax.bar(np.arange(len(labels)) + i * width, per_class, width, label=f"{r['target']}/{r['precision']}")
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("agreement")
        ax.legend(fontsize=7)
        parts.append(f"<h2>Per-class agreement</h2><img alt='per-class agreement' src='{_png(fig)}'>")
        plt.close(fig)

    # worst-agreeing images per artifact
    for r in rows:
        cos = np.asarray(r["per_image"]["cosine"])
        worst = np.argsort(cos)[:8]
        parts.append(f"<h2>Least agreement: {html.escape(r['target'])} / {html.escape(r['artifact'])}</h2><div class='thumbs'>")
        for i in worst:
            caption = f"cos {cos[i]:.3f}"
            if "pred" in r["per_image"] and labels:
                p, t = r["per_image"]["pred"][i], r["per_image"]["teacher_pred"][i]
                caption += f"<br>artifact: {html.escape(labels[p])}<br>teacher: {html.escape(labels[t])}"
            parts.append(f"<figure><img alt='eval image {i}' src='{_thumb(golden.images[i])}'><figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return atomic_write_text(out, "\n".join(parts))


def benchmarks_markdown(folders: list[Path]) -> str:
    """BENCHMARKS.md: per target, teacher vs every candidate precision (latency, size, agreement, accuracy)."""
    import datetime

    entries = [_read(Path(f)) for f in folders]
    machine = next((e["bench"]["machine"] for e in entries if e["bench"]), {})
    lines = ["# Benchmarks", "",
             f"Written by `make bench` on {datetime.date.today().isoformat()}: {machine.get('cpu', '?')}, "
             f"{machine.get('cores', '?')} cores, no GPU. Latency is the median of single-image runs after warm-up, "
             "so ±20 % between runs is noise; agreement is zero-shot top-1 agreement with the full-precision teacher "
             "on the golden eval set. Shipped artifacts: `edgec bench` latency; candidates that did not ship: the latency "
             "measured when compile chose between them (30 runs). Jetson and Edge TPU rows run on this CPU: they show "
             "accuracy and size, not device speed.", ""]
    for e in entries:
        m, v, b = e["manifest"], e["verify"], e["bench"] or {}
        lines += [f"## {m['target']}", "", f"Model on the device: {m.get('model')}; input {m['inputs'][0]['shape']}.", "",
                  "| model | precision | runtime | latency ms (median) | size MB | agreement | accuracy | cosine mean |",
                  "|---|---|---|---|---|---|---|---|"]
        teacher = b.get("teacher")
        t_acc = next((r["metrics"].get("teacher_accuracy") for r in v["results"]), None)
        if teacher:
            lines.append(f"| teacher {teacher['name']} | fp32 | eager PyTorch | {teacher['median_ms']:.2f} | - | 1.0000 | "
                         f"{t_acc:.4f} | 1.0000 |" if t_acc is not None else
                         f"| teacher {teacher['name']} | fp32 | eager PyTorch | {teacher['median_ms']:.2f} | - | - | - | - |")
        shipped = {r["precision"]: r for r in v["results"]}
        timed = {r["precision"]: r for r in b.get("results", [])}
        runtime = m["artifacts"][0]["runtime"]
        ran = next((r.get("measured_with") for r in b.get("results", []) if r.get("measured_with")), None)
        measured_on = (ran or runtime) + (f", not {runtime}" if ran and ran.split()[0] != runtime else "")
        rows = [c for c in (m.get("selection") or {}).get("candidates", []) if "median_ms" in c]
        if not rows:  # candidates not timed at compile time: the shipped artifact, from verify + bench
            rows = [{"precision": p, "median_ms": timed[p]["median_ms"] if p in timed else float("nan"),
                     "bytes": next(a["bytes"] for a in m["artifacts"] if a.get("precision") == p),
                     "metrics": r["metrics"]} for p, r in shipped.items()]
        for c in rows:
            p = c["precision"]
            mark = " (shipped)" if p in shipped else ""
            lat = timed[p]["median_ms"] if p in timed else c["median_ms"]
            cm = c["metrics"]
            lines.append(f"| {m.get('model')}{mark} | {p} | {measured_on} | {lat:.2f} | "
                         f"{c['bytes'] / 1e6:.2f} | {cm.get('agreement', float('nan')):.4f} | "
                         f"{cm.get('accuracy', float('nan')):.4f} | {cm['cosine_mean']:.4f} |")
        lines.append("")
    return "\n".join(lines) + "\n"
