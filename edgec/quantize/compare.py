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
from .methods import BACKEND_METHODS, DEFAULT_METHODS
from .run import BACKENDS, EvalSet

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


# ---- default flows -------------------------------------------------------------------------------

def onnx_default(fp32: Path, out: Path, calib) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"pixels": b} for b in calib.batches(batch_size=1)])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader())
    return out


def litert_default(model, shape_nchw, out: Path, calib, *, per_channel: bool = False) -> Path:
    """litert-torch's PT2E route with its default config (per-tensor); ``per_channel``: android-tflite's form."""
    from ..backends.litert import quantize_pt2e

    n, c, h, w = shape_nchw
    quantize_pt2e(model, (n, h, w, c), out, [b for b in calib.batches(layout="NHWC", batch_size=1)],
                  per_channel=per_channel)
    return out


# ---- the comparison ------------------------------------------------------------------------------

def _row(backend: str, flow: str, config: str, measured: dict, seconds: float) -> dict:
    return {"backend": backend, "flow": flow, "config": config, "seconds": round(seconds, 1), **measured}


def compare(model, preprocess, calib, evalset: EvalSet, backends=BACKENDS, *, percentile: float = 99.999,
            log=print) -> list[dict]:
    from .run import make_program, measure

    h, w = preprocess.size
    shape = (1, 3, h, w)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgec-compare-") as tmp:
        work = Path(tmp)
        for backend in backends:
            bdir = work / backend
            bdir.mkdir()
            t0 = time.time()
            if backend == "onnx":
                from ..backends.onnx import export

                fp32 = bdir / "model.fp32.onnx"
                export(model.encoder, shape, fp32, dynamic_batch=True)
                path = onnx_default(fp32, bdir / "default.onnx", calib)
                rows.append(_row(backend, "default", "onnxruntime quantize_static defaults: QDQ, U8S8, per-tensor, MinMax, "
                                 "all op types", measure(path, backend, evalset), time.time() - t0))
            elif backend == "litert":
                path = litert_default(model, shape, bdir / "default.tflite", calib)
                rows.append(_row(backend, "default", "litert-torch PT2E, get_symmetric_quantization_config() defaults "
                                 "(per-tensor, histogram)", measure(path, backend, evalset), time.time() - t0))
            else:
                from .pt2e import Pt2eProgram

                prog = Pt2eProgram(model, shape, [b[0] for b in calib.batches(batch_size=1)], method="histogram",
                                   per_channel=False)
                path = bdir / "default.pte"
                prog.lower(path)
                rows.append(_row(backend, "default", "XNNPACKQuantizer, get_symmetric_quantization_config() defaults "
                                 "(per-tensor, histogram)", measure(path, backend, evalset), time.time() - t0))
            log(f"compare: {backend} default: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
            for method in BACKEND_METHODS[backend]:
                t0 = time.time()
                program, _ = make_program(backend, model, shape, calib, bdir, method=method, percentile=percentile,
                                          log=log)
                path = bdir / f"edgec-{method}{'.onnx' if backend == 'onnx' else '.tflite' if backend == 'litert' else '.pte'}"
                if backend == "executorch":
                    program.lower(path)
                else:
                    program.write(path)
                desc = {"onnx": "symmetric S8S8 Q/DQ, per-channel, Conv/MatMul/Gemm",
                        "litert": "ai-edge-quantizer static_wi8_ai8, fully integer",
                        "executorch": "XNNPACKQuantizer per-channel"}[backend]
                rows.append(_row(backend, "edgec", f"{desc}, {method}", measure(path, backend, evalset), time.time() - t0))
                rows[-1]["method"] = method
                log(f"compare: {backend} edgec {method}: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
            if backend == "onnx":  # the cpu target's form (onnxruntime only): asymmetric uint8 activations
                from .onnx_qdq import quantize_onnx

                t0 = time.time()
                path = quantize_onnx(fp32, bdir / "edgec-asymmetric.onnx", calib, activations="asymmetric",
                                     reduce_range=True, int8_chains=True).path
                rows.append(_row(backend, "edgec", "cpu target (no device): asymmetric U8S7 Q/DQ, per-channel, int8 chains "
                                 "through SiLU/residual adds/data movement, attention and LayerNorm float, minmax",
                                 measure(path, backend, evalset), time.time() - t0))
                rows[-1]["form"] = "cpu"
                log(f"compare: onnx edgec asymmetric: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
            if backend == "litert":  # the android-tflite target's form: PT2E, per-channel weights (not fully integer)
                t0 = time.time()
                path = litert_default(model, shape, bdir / "edgec-pt2e-per-channel.tflite", calib, per_channel=True)
                rows.append(_row(backend, "edgec", "android-tflite target: litert-torch PT2E, per-channel int8 weights "
                                 "(float islands; the edgetpu target needs the fully integer form above)",
                                 measure(path, backend, evalset), time.time() - t0))
                rows[-1]["form"] = "android-tflite"
                log(f"compare: litert edgec PT2E per-channel: cosine vs float {rows[-1]['vs_float']['cosine_mean']:.5f}")
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


MAIN_FORM = {"onnx": ", jetson's symmetric TensorRT form", "litert": ", edgetpu's fully integer form"}


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
        if r["flow"] == "edgec" and DEFAULT_METHODS.get(r["backend"]) == r.get("method"):
            config = f"**{config}**"
        lines.append(f"| {r['backend']} | {r['flow']} | {config} | {f(m['cosine_mean'], 5)} ({f(m['cosine_p1'])}) | "
                     f"{f(m.get('agreement'))} | {f(m.get('agreement_float'))} | {f(t.get('cosine_mean'))} | "
                     f"{r['bytes'] / 1e6:.2f} | {f(r.get('median_ms'), 2)} |")
    lines.append("")
    for backend in dict.fromkeys(r["backend"] for r in rows):
        default = next(r for r in rows if r["backend"] == backend and r["flow"] == "default")
        ours = next((r for r in rows if r["backend"] == backend and r.get("method") == DEFAULT_METHODS[backend]), None)
        if ours is None:
            continue
        d, o = default["vs_float"]["cosine_mean"], ours["vs_float"]["cosine_mean"]
        verdict = "at least as close to the float model as" if o >= d else "**less close** to the float model than"
        lines.append(f"- {backend}: edgec ({DEFAULT_METHODS[backend]}{MAIN_FORM.get(backend, '')}) is {verdict} the default flow "
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
    rows = compare(model, preprocess, calib, evalset, backends, percentile=config.percentile, log=log)
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


__all__ = ["compare", "compare_from_config", "keep_sections", "litert_default", "onnx_default", "write_section"]


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
