"""``edgec quantize --compare``: each backend's default int8 flow beside edgec's, same model, same
calibration images, one run, every artifact measured in its own runtime.

Default flows (what a user gets following each tool's own documentation with its defaults):

* ONNX: onnxruntime ``quant_pre_process`` + ``quantize_static`` with its defaults (QDQ, uint8
  activations / int8 weights, per-tensor, MinMax, every supported op type);
* LiteRT: litert-torch's PT2E route, ``PT2EQuantizer`` with ``get_symmetric_quantization_config()``
  defaults (per-tensor weights, histogram observer), ``convert_pt2e(fold_quantize=False)``,
  ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))``;
* ExecuTorch: ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config()`` defaults
  (per-tensor weights, histogram observer), lowered with the XNNPACK partitioner.

edgec's flows: symmetric per-channel Q/DQ (ONNX), ai-edge-quantizer fully integer (LiteRT), PT2E
with per-channel weights (ExecuTorch), each with every calibration method the backend takes.

The Markdown table goes to ``<out>/compare.md`` and, with ``benchmarks``, into a marked section of
that file (:func:`write_section`); ``edgec report --benchmarks`` keeps marked sections when it
rewrites the file (:func:`keep_sections`).
"""

from __future__ import annotations

import datetime
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import EdgecConfig
from ..manifest import atomic_write_json, atomic_write_text
from ..backends import get as get_backend
from .run import BACKENDS, EvalSet, int8_targets

SECTION = "quantize-compare"
_MARK = re.compile(r"<!-- edgec-section: (?P<name>[\w-]+) -->\n.*?<!-- /edgec-section: (?P=name) -->\n?", re.DOTALL)


def _begin(name: str) -> str:
    return f"<!-- edgec-section: {name} -->\n"


def _end(name: str) -> str:
    return f"<!-- /edgec-section: {name} -->\n"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the markers of section ``name`` in ``path`` (replaced if present, else appended)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = _begin(name) + body.rstrip("\n") + "\n" + _end(name)
    pattern = re.compile(re.escape(_begin(name)) + r".*?" + re.escape(_end(name)), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    atomic_write_text(path, text)


def keep_sections(old: str, new: str) -> str:
    """``new`` plus every marked section of ``old`` that ``new`` does not have (so a rewrite keeps them)."""
    present = {m.group("name") for m in _MARK.finditer(new)}
    kept = [m.group(0) for m in _MARK.finditer(old) if m.group("name") not in present]
    if not kept:
        return new
    return new.rstrip("\n") + "\n\n" + "\n".join(k.rstrip("\n") + "\n" for k in kept)


# ---- the comparison ------------------------------------------------------------------------------

def _row(backend: str, flow: str, config: str, measured: dict, seconds: float) -> dict:
    return {"backend": backend, "flow": flow, "config": config, "seconds": round(seconds, 1), **measured}


def compare(model, preprocess, calib, evalset: EvalSet, backends=BACKENDS, *, percentile: float = 99.999,
            targets: tuple[str, ...] = (), log=print) -> list[dict]:
    """Per backend: its vendor's default int8 flow (the record's ``reference_int8``), edgec's form of the main
    target (the first of ``targets`` using the backend) with every calibration method its quantizer takes, and
    every other target's form with its default method; each artifact measured in its target's runtime."""
    import dataclasses

    from .run import make_program, measure

    h, w = preprocess.size
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgec-compare-") as tmp:
        work = Path(tmp)
        for backend in backends:
            record = get_backend(backend)
            forms = int8_targets(backend, targets)
            (main, spec), others = forms[0], forms[1:]
            bdir = work / backend
            bdir.mkdir()
            if record.reference_int8 is not None:
                t0 = time.time()
                path, desc = record.reference_int8(model.encoder, (1, 3, h, w), calib, bdir)
                ref_spec = dataclasses.replace(spec, runtime=record.runtimes[0])
                rows.append(_row(backend, "default", desc, measure(path, ref_spec, evalset), time.time() - t0))
                log(f"compare: {backend} default: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
            quantizer = record.quantizer(spec.quantizer)
            sweep = [(main, spec, m) for m in quantizer.methods]
            sweep += [(name, other, record.quantizer(other.quantizer).default_method) for name, other in others]
            for name, form, method in sweep:
                t0 = time.time()
                (bdir / f"{name}-{method}").mkdir()
                program = make_program(backend, model, form, calib, bdir / f"{name}-{method}", method=method,
                                       percentile=percentile)
                path = bdir / f"edgec-{name}-{method}{record.suffix}"
                program.write(path)
                rows.append(_row(backend, "edgec", f"{name} target: {program.description}",
                                 measure(path, form, evalset), time.time() - t0))
                rows[-1].update(method=method, target=name,
                                is_default=method == record.quantizer(form.quantizer).default_method)
                if name != main:
                    rows[-1]["form"] = name
                log(f"compare: {backend} edgec {name} {method}: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
    return rows


def float_metrics(evalset: EvalSet) -> dict:
    """The float model itself against the teacher (the reference line of the table)."""
    out: dict = {}
    if evalset.golden is not None:
        from ..verify.run import compute_metrics

        m = compute_metrics(evalset.reference, evalset.golden)
        out = {"agreement": m.get("agreement"), "cosine_vs_teacher": m["cosine_mean"]}
    return out


def best_methods(rows: list[dict]) -> dict[str, str]:
    """Per backend, the edgec method with the highest mean cosine vs float (agreement breaks no tie: it is coarser)."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["flow"] == "edgec" and "form" not in r:  # the method comparison is over one form
            score = r["vs_float"]["cosine_mean"]
            if r["backend"] not in best or score > best[r["backend"]][0]:
                best[r["backend"]] = (score, r["method"])
    return {b: m for b, (_, m) in best.items()}


def markdown(rows: list[dict], *, model_name: str, images: int, calib_images: int, calib_sha: str,
             float_model: dict | None = None) -> str:
    def f(v, nd=4):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"

    best = best_methods(rows)
    lines = ["## Quantization: each backend's default flow vs edgec", "",
             f"Written by `make bench-quantize` (`edgec quantize --compare`) on {datetime.date.today().isoformat()}: "
             f"{model_name}, the same {calib_images} calibration images (sha256 {calib_sha[:12]}) for every flow, "
             f"{images} golden eval images. Every artifact runs in its own runtime on this CPU. *cosine vs float*: "
             "mean (and 1st percentile) cosine between the int8 and the float model's embeddings; *agreement*: "
             "zero-shot top-1 agreement with the teacher; *vs float*: agreement with the float student's own "
             "zero-shot. Latency: median of 30 single-image runs, 1 thread, taken while other jobs shared the 2 cores: "
             "compare sizes and accuracy, not these latencies (see the tables above for timed runs). Bold: the method "
             "edgec uses by default for that backend (`[quantize] method = \"auto\"`).", "",
             "| backend | flow | configuration | cosine vs float (p1) | agreement | vs float | cosine vs teacher | MB | ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    if float_model:
        lines.append(f"| - | float student | fp32, eager PyTorch | 1 | {f(float_model.get('agreement'))} | 1 | "
                     f"{f(float_model.get('cosine_vs_teacher'))} | - | - |")
    for r in rows:
        m, t = r["vs_float"], r.get("vs_teacher", {})
        config = r["config"]
        if r["flow"] == "edgec" and r.get("is_default") and "form" not in r:
            config = f"**{config}**"
        lines.append(f"| {r['backend']} | {r['flow']} | {config} | {f(m['cosine_mean'], 5)} ({f(m['cosine_p1'])}) | "
                     f"{f(m.get('agreement'))} | {f(m.get('agreement_float'))} | {f(t.get('cosine_mean'))} | "
                     f"{r['bytes'] / 1e6:.2f} | {f(r.get('median_ms'), 2)} |")
    lines.append("")
    for backend in dict.fromkeys(r["backend"] for r in rows):
        default = next(r for r in rows if r["backend"] == backend and r["flow"] == "default")
        ours = next((r for r in rows if r["backend"] == backend and r.get("is_default") and "form" not in r), None)
        if ours is None:
            continue
        d, o = default["vs_float"]["cosine_mean"], ours["vs_float"]["cosine_mean"]
        verdict = "at least as close to the float model as" if o >= d else "**less close** to the float model than"
        lines.append(f"- {backend}: edgec ({ours['method']}, the {ours['target']} target's form) is {verdict} the default flow "
                     f"(cosine {o:.5f} vs {d:.5f}); best measured method: {best.get(backend)}.")
        for form in (r for r in rows if r["backend"] == backend and "form" in r):
            c = form["vs_float"]["cosine_mean"]
            verdict = "at least as close to the float model as" if c >= d else "**less close** to the float model than"
            lines.append(f"- {backend}: the {form['form']} target's form ({form['config'].split(': ', 1)[-1]}) is {verdict} "
                         f"the default flow (cosine {c:.5f} vs {d:.5f}).")
    return "\n".join(lines) + "\n"


def compare_from_config(cfg: EdgecConfig, *, backends=BACKENDS, out: Path | None = None, no_distill: bool = False,
                        benchmarks: Path | None = None, progress: bool = True, log=print) -> dict:
    from .calibration import load_calibration
    from .run import check_finite, config_from_edgec, eval_set, load_source

    # the same student, calibration and golden set as 'edgec quantize' (distilled / computed when missing)
    config = config_from_edgec(cfg, backends=backends, out=out, no_distill=no_distill, progress=progress, log=log)
    model, preprocess, name, _ = load_source(config)
    calib = load_calibration(config.calibration, preprocess)
    check_finite(model, list(calib.batches(batch_size=16)))
    evalset = eval_set(config, model, preprocess, calib)
    rows = compare(model, preprocess, calib, evalset, backends, percentile=config.percentile, targets=config.targets,
                   log=log)
    float_model = float_metrics(evalset)
    md = markdown(rows, model_name=name, images=len(evalset.x), calib_images=len(calib), calib_sha=calib.sha256,
                  float_model=float_model)
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config.out / "compare.json", {"schema": 1, "model": name, "calibration": calib.sha256,
                                                    "calibration_images": len(calib), "images": len(evalset.x),
                                                    "float_model": float_model, "best_methods": best_methods(rows),
                                                    "rows": rows})
    atomic_write_text(config.out / "compare.md", md)
    if benchmarks is not None:
        write_section(benchmarks, SECTION, md)
    return {"rows": rows, "best_methods": best_methods(rows), "markdown": md, "out": str(config.out)}


__all__ = ["compare", "compare_from_config", "keep_sections", "write_section"]


FALLBACK_SECTION = "quantize-fallback"


def fallback_markdown(manifests: dict[str, dict]) -> str:
    """The accuracy-aware fallback of an ``edgec quantize --tolerance`` run: per backend, which layers stayed
    float and what that cost (measured against the all-int8 program, both in the backend's runtime)."""
    def f(v, nd=5):
        return "-" if v is None else f"{v:.{nd}f}"

    first = next(iter(manifests.values()))
    tol = (first.get("fallback") or {}).get("tolerance")
    lines = [f"## Quantization: accuracy-aware fallback (tolerance {tol:g})" if tol is not None else
             "## Quantization: accuracy-aware fallback", "",
             f"Written by `edgec quantize --tolerance {tol:g} --benchmarks BENCHMARKS.md` on "
             f"{datetime.date.today().isoformat()}: {first.get('model')}. The tolerance holds when 1 - mean cosine vs "
             "the float model and the zero-shot agreement lost against the float model are both <= it (searched on "
             "128 golden images, measured on all). Cost: the shipped program minus the all-int8 one, both run in the "
             "backend's runtime (latency on a shared 2-core CPU: noise of ±20 % and more).", "",
             "| backend | method | tolerance met | float layers | cosine vs float int8 -> shipped | agreement int8 -> shipped "
             "| size delta KB | latency delta ms |", "|---|---|---|---|---|---|---|---|"]
    details = []
    for backend, m in manifests.items():
        fb = m.get("fallback")
        if not fb:
            continue
        cost = fb.get("cost") or {}
        base = (cost.get("all_int8") or {}).get("vs_float") or m["metrics"]["vs_float"]
        shipped = m["metrics"]["vs_float"]
        lines.append(f"| {backend} | {m['calibration']['method']} | {'yes' if fb['met'] else '**no**'} | "
                     f"{len(fb['float_layers'])} of {m['layers']['quantizable']} | {f(base['cosine_mean'])} -> "
                     f"{f(shipped['cosine_mean'])} | {f(base.get('agreement'), 4)} -> {f(shipped.get('agreement'), 4)} | "
                     f"{cost['bytes'] / 1e3:+.0f} | {cost['median_ms']:+.2f} |" if cost else
                     f"| {backend} | {m['calibration']['method']} | {'yes' if fb['met'] else '**no**'} | 0 of "
                     f"{m['layers']['quantizable']} | {f(shipped['cosine_mean'])} | {f(shipped.get('agreement'), 4)} | 0 | 0 |")
        if fb["float_layers"]:
            details.append(f"- {backend}: " + "; ".join(
                f"`{la.get('label', la['name'])}` ({la['params']} weights, ~{la['size_bytes_estimate'] / 1e3:.1f} KB, "
                f"saves {la['loss_delta']:.5f} loss)" if "loss_delta" in la else f"`{la.get('label', la['name'])}`"
                for la in fb["float_layers"]))
        if fb.get("edge_tpu"):
            details.append(f"- {backend}: {fb['edge_tpu']}.")
    return "\n".join(lines + [""] + details) + "\n"
