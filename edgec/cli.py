"""The edgec command line: parse, call one library function, render. Errors are mapped to exit
codes in one place (:func:`_command`); heavy libraries are imported only by the commands that
need them, so ``edgec --version``, ``targets`` and artifact inspection start fast and torch-free.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import EdgecError

app = typer.Typer(
    name="edgec",
    help="Compile trained multimodal models for edge devices and prove the artifacts still agree.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
devices_app = typer.Typer(help="Device profiles (devices/*.toml).", no_args_is_help=False, invoke_without_command=True)
app.add_typer(devices_app, name="devices")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"traceback": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _logger(quiet: bool):
    """Progress lines for the console, silenced when the command's output is JSON."""
    return (lambda *_: None) if quiet else (lambda text: out.print(text, markup=False))


def _guarded(fn):
    """Turn an :class:`EdgecError` raised by ``fn`` into one line on stderr (JSON too with --json) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any):
        try:
            return fn(*a, **kw)
        except EdgecError as exc:
            if _state["traceback"]:
                raise
            if kw.get("as_json"):
                _emit_json({"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code})
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _command(*args: Any, target: typer.Typer = app, **kwargs: Any):
    """Register a command whose errors are handled by :func:`_guarded`."""
    return lambda fn: target.command(*args, **kwargs)(_guarded(fn))


def _version(value: bool) -> None:
    if value:
        out.print(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show the full traceback of errors (debugging).")] = False,
) -> None:
    _state["traceback"] = traceback


@_command("init")
def init_cmd(
    directory: Annotated[Path, typer.Argument(help="Project folder (created if missing).")] = Path("."),
    model: Annotated[Optional[str], typer.Option("--model", help="Path of the trained model, written into [model].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing edgec.toml.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an annotated edgec.toml with every key and its default."""
    from .init import init_project

    path = init_project(directory, model_path=model, force=force)
    if as_json:
        _emit_json({"wrote": str(path)})
    else:
        out.print(f"wrote {path}")


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _render_model(info: dict) -> None:
    out.print(f"[bold]{info['name']}[/bold] ({info['kind']}) from {info['source']}", markup=True)
    table = Table("tower", "params", "MACs", "input", "output")
    for name, t in info["towers"].items():
        inp = f"{t['input']['shape']} {t['input']['dtype']}" if t["input"] else "-"
        table.add_row(name, _fmt_count(t["params"]), _fmt_count(t["macs"]), inp, str(t["output"]["shape"]))
    out.print(table)
    pre = info["preprocess"]
    out.print(f"embedding dim {info['embedding_dim']}, logit scale {info['logit_scale']}"
              + (f", logit bias {info['logit_bias']:.4f}" if info["logit_bias"] is not None else ""))
    out.print(f"preprocess: {pre['size'][0]}x{pre['size'][1]} {pre['resize']}, crop {pre['crop']}, "
              f"mean {[round(v, 4) for v in pre['mean']]}, std {[round(v, 4) for v in pre['std']]}")
    out.print(f"tokenizer: {info['tokenizer'] or 'none'}, context length {info['context_length']}")
    for note in info["notes"]:
        out.print(f"note: {note}", markup=False)
    if "student" in info:
        _render_student(info["student"])


def _render_student(s: dict) -> None:
    ratio = s.get("vs_teacher_image_tower")
    out.print(f"student {s['name']}: {_fmt_count(s['params'])} params, {_fmt_count(s['macs'])} MACs, input {s['input']['shape']}"
              + (f"; teacher image tower is {ratio['params_ratio']}x the params, {ratio['macs_ratio']}x the MACs" if ratio else ""),
              markup=False)


def _render_artifact(info: dict) -> None:
    out.print(f"[bold]{info['path']}[/bold] ({info['format']}, {info['bytes'] / 1e6:.2f} MB, runtime {info['runtime']})")
    table = Table("", "name", "shape", "dtype", "quantization")
    for role in ("inputs", "outputs"):
        for t in info[role]:
            q = t.get("quantization")
            table.add_row(role[:-1], t["name"], str(t["shape"]), t["dtype"],
                          f"scale {q['scale']:.6g} zp {q['zero_point']}" if q else "-")
    out.print(table)
    if info.get("ops"):
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(info["ops"].items(), key=lambda kv: -kv[1]))
        out.print(f"ops ({sum(info['ops'].values())}): {ops}", markup=False)
    for note in info.get("notes", []):
        out.print(f"note: {note}", markup=False)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="edgec.toml (default: ./edgec.toml).")]


@_command("inspect")
def inspect_cmd(
    model: Annotated[Optional[Path], typer.Argument(
        help="Model folder/checkpoint, or a compiled artifact (.onnx, .tflite). Default: [model] of edgec.toml.")] = None,
    config: ConfigOpt = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="auto, edgec, hf or open_clip.")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="open_clip architecture name or model-config .json.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow pickled checkpoints (only for trusted files).")] = False,
    macs: Annotated[bool, typer.Option("--macs/--no-macs", help="Count MACs per tower (one forward pass).")] = True,
    student: Annotated[Optional[str], typer.Option(
        "--student", help="Also show a student (timm name or student folder) beside the teacher; default: [student] of edgec.toml.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Towers, parameters, MACs, embedding dim, input size and preprocessing of a model or artifact."""
    from .runtime.inspect import ARTIFACT_SUFFIXES, inspect_artifact

    if model is not None and model.suffix in ARTIFACT_SUFFIXES:
        info = inspect_artifact(model)
        render = _render_artifact
    else:
        from .models import ModelKind, describe, load_model
        from .models.intake import describe_student
        from .models.student import is_student_checkpoint

        image_size = None
        if model is None:
            from .config import load_config

            cfg = load_config(config)
            if cfg.model is None:
                raise EdgecError(f"{config or 'edgec.toml'} has no [model] section", hint="add [model] path = ... or pass MODEL")
            model, kind = cfg.resolve(cfg.model.path), kind or cfg.model.kind
            arch, trust_pickle = arch or cfg.model.arch, trust_pickle or cfg.model.trust_pickle
            student, image_size = student or cfg.student.name, cfg.student.image_size
        if is_student_checkpoint(model):
            info, render = describe_student(model, None), _render_student
        else:
            kind = kind or "auto"
            if kind not in ModelKind.__members__:
                raise EdgecError(f"--kind must be one of {', '.join(ModelKind.__members__)}, not {kind!r}")
            teacher = load_model(model, kind, arch=arch, trust_pickle=trust_pickle)
            info = describe(teacher, macs=macs)
            if student:
                info["student"] = describe_student(student, teacher, image_size=image_size)
            render = _render_model
    if as_json:
        _emit_json(info)
    else:
        render(info)


@_command("distill")
def distill_cmd(
    config: ConfigOpt = None,
    student: Annotated[Optional[str], typer.Option("--student", help="timm model name (default: [student] name).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Use the student configured for this target.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override [distill] epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Override [distill] batch_size.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Override [distill] lr.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <build>/distill/<student>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last finished epoch in the output folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Distil the teacher's image tower into a timm student in the teacher's embedding space."""
    from .config import load_config
    from .distill import DistillConfig, run

    edgec_cfg = load_config(config)
    cfg = DistillConfig.from_edgec(edgec_cfg, target=target, student=student, out=out_dir,
                                   epochs=epochs, batch_size=batch_size, lr=lr)
    log = _logger(as_json)
    with _build_lock(edgec_cfg, "edgec distill"):
        result = run(cfg, resume=resume, progress=progress and not as_json, log=log)
    if as_json:
        _emit_json(result.manifest)
        return
    m = result.manifest["metrics"]
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("agreement", "accuracy", "teacher_accuracy", "cosine_mean") if k in m)
    out.print(f"best epoch {m.get('epoch')}: {shown}", markup=False)
    out.print(f"wrote {result.student} ({result.manifest['student']['params'] / 1e6:.2f}M params), "
              f"{result.out / 'metrics.csv'}, {result.out / 'learning_curve.png'}, {result.out / 'manifest.json'}", markup=False)


@_command("golden")
def golden_cmd(
    config: ConfigOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <build>/golden).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Teacher outputs on the eval set at full precision -> build/golden/ (records the device used)."""
    from .config import load_config
    from .verify.golden import GoldenConfig, build_golden, load_golden

    cfg = load_config(config)
    gcfg = GoldenConfig.from_edgec(cfg, out=out_dir, device=device)
    with _build_lock(cfg, "edgec golden"):
        path = build_golden(gcfg, log=_logger(as_json))
    if as_json:
        _emit_json({"golden": str(path), **load_golden(path).meta})
    else:
        out.print(f"wrote {path}", markup=False)


@_command("compile")
def compile_cmd(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="A target from 'edgec targets', or 'all' ([targets] build).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="A device from 'edgec devices': picks its target, checks its constraints.")] = None,
    config: ConfigOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <build>/<target>).")] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Compile the teacher's image tower as it is.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the inputs are unchanged.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    towers: Annotated[Optional[str], typer.Option(
        "--towers", help="image (default: [targets] towers) or image,text: also the teacher's text tower (fp32, int32 "
                         "token ids) with its tokenizer files.")] = None,
    head: Annotated[Optional[str], typer.Option(
        "--head", help="embedding (default: [targets] head) or zero-shot: also a model.zeroshot.* variant with the label "
                       "text embeddings folded in (logits out).")] = None,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, help="With several targets (--target all): how many compile at once, each in its own "
                                    "process (default: min(targets, CPU cores)).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a target folder: artifacts, zero-shot head files and manifest.json (runs distill first when missing)."""
    from .compile import compile_from_config
    from .config import DEFAULT_CONFIG, load_config

    cfg = load_config(config)
    tower_list = _parse_towers(towers)
    if head is not None and head not in ("embedding", "zero-shot"):
        raise EdgecError(f"--head must be 'embedding' or 'zero-shot', not {head!r}")
    if target is None:
        if device is None:
            raise EdgecError("give --target (see 'edgec targets') or --device (see 'edgec devices')")
        from . import registry

        target = registry.get("devices", device).spec.target
    targets = cfg.targets.build if target == "all" else [target]
    if out_dir is not None and len(targets) > 1:
        raise EdgecError("--out names one folder; with --target all each target goes to <build>/<target>")
    log = _logger(as_json)
    config_path = Path(config or DEFAULT_CONFIG)
    with _build_lock(cfg, "edgec compile"):
        if len(targets) > 1:
            from .compile import compile_many

            many = compile_many(cfg, targets, jobs=jobs, no_distill=no_distill, config_path=config_path,
                                progress=progress and not as_json, device=device, force=force, towers=tower_list,
                                head=head, log=log)
            _compile_summary(many, as_json)
            return
        res = compile_from_config(cfg, targets[0], no_distill=no_distill, out=out_dir, config_path=config_path,
                                  progress=progress and not as_json, device=device, force=force, log=log,
                                  towers=tower_list, head=head)
    if as_json:
        _emit_json([{"out": str(res.out), **res.manifest}])
    else:
        files = ", ".join(a["path"] for a in res.manifest["artifacts"])
        out.print(f"wrote {res.out} ({files}, manifest.json)", markup=False)


def _compile_summary(results: dict, as_json: bool) -> None:
    """One table for several targets; exit with the first failed target's exit code."""
    from .errors import EXIT_GATE_FAILED

    failed = [r for r in results.values() if r.status == "failed"]
    if as_json:
        _emit_json([{"target": t, "status": r.status, "seconds": r.seconds, "error": r.error, "hint": r.hint,
                     **({"out": str(r.output.out), **r.output.manifest} if r.output else {})} for t, r in results.items()])
    else:
        table = Table("target", "status", "seconds", "artifacts / error")
        for t, r in results.items():
            detail = ", ".join(a["path"] for a in r.output.manifest["artifacts"]) if r.output else f"{r.error}"
            table.add_row(t, r.status if r.status != "failed" else "[red]failed[/red]", f"{r.seconds:.0f}", detail)
        out.print(table)
    if failed:
        first = failed[0]
        code = first.exit_code if first.exit_code is not None else EXIT_GATE_FAILED
        exc = EdgecError(f"{len(failed)} of {len(results)} targets failed ({', '.join(r.target for r in failed)}); "
                         f"{first.target}: {first.error}", hint=first.hint)
        if as_json:  # one JSON document on stdout: the rows above carry each error
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(code)
        exc.exit_code = code
        raise exc


@_command("quantize")
def quantize_cmd(
    config: ConfigOpt = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="onnx, litert, executorch or all.")] = "all",
    method: Annotated[Optional[str], typer.Option("--method", help="Calibration method: minmax, percentile, entropy "
                                                  "(executorch also histogram); default: the best measured per backend.")] = None,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Keep the most sensitive layers in float until "
                                                       "1 - cosine vs float and the agreement lost vs float are both <= T "
                                                       "(default: [quantize] tolerance).")] = None,
    max_fallback: Annotated[int, typer.Option("--max-fallback", help="At most this many float layers.")] = 16,
    eval_images: Annotated[int, typer.Option("--eval-images", help="Golden images for the ranking and the fallback "
                                             "search (the final metrics use all of them).")] = 128,
    sensitivity: Annotated[bool, typer.Option("--sensitivity/--no-sensitivity", help="Rank every layer (one program per layer).")] = True,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <build>/quantize).")] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Quantize the teacher's image tower as it is.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Instead: each backend's default flow vs edgec's, every "
                                                            "calibration method, one table (<out>/compare.md).")] = False,
    benchmarks: Annotated[Optional[Path], typer.Option("--benchmarks", help="Also put the --compare table (or the "
                                                       "--tolerance fallback table) in a marked section of this "
                                                       "Markdown file.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the distillation progress bar.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """int8 programs per backend with per-layer sensitivity and accuracy-aware fallback -> <build>/quantize/<backend>/."""
    from .config import load_config
    from .quantize.run import BACKENDS, check_tolerance_met, quantize_from_config

    cfg = load_config(config)
    backends = BACKENDS if backend == "all" else (backend,)
    log = _logger(as_json)
    if compare:
        from .quantize.compare import compare_from_config

        with _build_lock(cfg, "edgec quantize --compare"):
            result = compare_from_config(cfg, backends=backends, out=out_dir, no_distill=no_distill, benchmarks=benchmarks,
                                         progress=progress and not as_json, log=log)
        if as_json:
            _emit_json(result)
        else:
            out.print(result["markdown"], markup=False)
        return
    with _build_lock(cfg, "edgec quantize"):  # release's recovery removes unlocked half-written folders
        result = quantize_from_config(cfg, backends=backends, method=method, tolerance=tolerance, out=out_dir,
                                      no_distill=no_distill, progress=progress and not as_json, log=log,
                                      max_fallback=max_fallback, sensitivity=sensitivity, eval_images=eval_images,
                                      check_tolerance=False)
    if benchmarks is not None and tolerance is not None:
        from .quantize.compare import FALLBACK_SECTION, fallback_markdown, write_section

        write_section(benchmarks, FALLBACK_SECTION, fallback_markdown(result.manifests))
    for b, folder in result.folders.items() if not as_json else ():
        fb = result.manifests[b]["fallback"]
        out.print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})"
                  + (f"; {len(fb['float_layers'])} layer(s) in float for tolerance {fb['tolerance']:g}" if fb else ""),
                  markup=False)
    check_tolerance_met(result)  # exit 1 when not met (the folders are written)
    if as_json:
        _emit_json({b: {"out": str(result.folders[b]), **m} for b, m in result.manifests.items()})


def _parse_towers(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    towers = tuple(t.strip() for t in value.split(",") if t.strip())
    if "image" not in towers or not set(towers) <= {"image", "text"} or len(set(towers)) != len(towers):
        raise EdgecError(f"--towers must be 'image' or 'image,text', not {value!r}")
    return towers


def _build_lock(cfg, command: str):
    """The build folder's lock (refused with exit 2 while another edgec run writes there)."""
    import contextlib

    from .lock import build_lock, main_process

    if not main_process():  # torchrun: rank 0 holds it for every rank
        return contextlib.nullcontext()
    return build_lock(cfg.resolve(cfg.targets.out), command)


@_command("release")
def release_cmd(
    config: ConfigOpt = None,
    targets: Annotated[Optional[str], typer.Option("--targets", help="Comma-separated targets (default: the build list of the targets section).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for another run holding the build folder's lock "
                                                      "instead of refusing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the distillation progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """golden, distill, compile and verify every target, reusing each stage whose inputs are unchanged;
    writes build/release.json, release.junit.xml and release.md. Exit 1 when a gate fails."""
    from .config import DEFAULT_CONFIG
    from .release import ReleaseConfig, run

    names = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else ()
    result = run(ReleaseConfig(config=Path(config or DEFAULT_CONFIG), targets=names, wait=wait,
                               progress=progress and not as_json), log=_logger(as_json))
    if as_json:
        _emit_json(result.manifest)
    if not result.passed:
        failed = [f"{t}: {f}" for t, rec in result.manifest["targets"].items() for f in rec["failures"]]
        err.print(f"error: release failed: {'; '.join(failed)} (details in {result.paths['markdown']})", markup=False)
        raise typer.Exit(result.exit_code)  # 1 a gate failed; 2 or 3 when a target stopped on bad input or a missing toolchain


@_command("verify")
def verify_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile'.")],
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: <folder>/../golden).")] = None,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help="Gate such as agreement>=0.97 (repeatable); "
                                                      "replaces the gates recorded in the manifest.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML here.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write a Markdown summary here "
                                                     "(also appended to $GITHUB_STEP_SUMMARY when set).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Runtime threads.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the artifacts in their runtime against the golden set; exit 1 when a gate fails."""
    from .verify.run import summary_line, verify

    report = verify(folder, golden, gate, threads=threads, junit=junit, markdown=markdown)
    if as_json:
        _emit_json(report)
    else:
        out.print(f"{report['target']}: passed; {summary_line(report)}", markup=False)


@_command("bench")
def bench_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile'.")],
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per artifact.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 10,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Runtime threads (default: all cores).")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="edgec.toml: also time its teacher in eager PyTorch.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency (median, p90), throughput, peak memory and size of each artifact -> bench.json."""
    from .bench import bench

    report = bench(folder, runs=runs, warmup=warmup, threads=threads, teacher_config=teacher,
                   log=_logger(as_json))
    if as_json:
        _emit_json(report)
    else:
        out.print(f"wrote {folder / 'bench.json'}", markup=False)


@_command("report")
def report_cmd(
    folders: Annotated[list[Path], typer.Argument(help="Verified target folders.")],
    html_out: Annotated[Path, typer.Option("--html", help="Where to write the HTML page.")] = Path("build/report.html"),
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: the one verify used).")] = None,
    benchmarks: Annotated[Optional[Path], typer.Option("--benchmarks", help="Also write the Markdown benchmark tables here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One self-contained HTML page: teacher vs every target (accuracy, latency, size, worst images)."""
    from .manifest import atomic_write_text
    from .verify.report import benchmarks_markdown, build_report

    path = build_report(folders, html_out, golden)
    if benchmarks is not None:
        from .quantize.compare import keep_sections  # sections other commands own (quantize --compare) stay

        old = benchmarks.read_text(encoding="utf-8") if benchmarks.is_file() else ""
        atomic_write_text(benchmarks, keep_sections(old, benchmarks_markdown(folders)))
        if not as_json:
            out.print(f"wrote {benchmarks}", markup=False)
    if as_json:
        _emit_json({"html": str(path)})
    else:
        out.print(f"wrote {path}", markup=False)


@_command("doctor")
def doctor_cmd(as_json: JsonOpt = False) -> None:
    """Installed compilers and runtimes, which targets can be built and verified here, what to install."""
    from .doctor import diagnose

    info = diagnose()
    if as_json:
        _emit_json(info)
        return
    table = Table("package", "version", "for")
    for p in info["packages"]:
        table.add_row(p["package"], p["version"] or "[dim]not installed[/dim]", p["for"])
    out.print(table)
    for t in info["tools"]:
        out.print(f"{t['tool']}: {t['path'] or 'not on PATH'} ({t['for']})", markup=False)
    out.print(f"CUDA: {info['cuda'] or 'not available'}", markup=False)
    table = Table("target", "build", "verify", "to install")
    for t in info["targets"]:
        need = sorted(set(t["missing_for_build"]) | set(t["missing_for_verify"]))
        table.add_row(t["target"], "yes" if t["can_build"] else "no", "yes" if t["can_verify"] else "no",
                      ", ".join(need) or (t["note"] or "-"))
    out.print(table)
    for note in info["notes"]:
        out.print(f"note: {note}", markup=False)


def _registry_rows(kind: str) -> list[dict]:
    from . import registry

    rows = []
    for name, entry in registry.entries(kind).items():
        row = {"name": name, "file": str(entry.path)}
        row.update(registry.to_row(entry))
        rows.append(row)
    return rows


@_command("targets")
def targets_cmd(as_json: JsonOpt = False) -> None:
    """List the compile targets (targets/*.toml)."""
    rows = _registry_rows("targets")
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print("no targets registered")
        return
    table = Table("target", "backend", "precisions", "runtime", "description")
    for r in rows:
        table.add_row(r["name"], r["backend"], ",".join(r["precisions"]), r["runtime"], r["description"])
    out.print(table)


@devices_app.callback()
@_guarded
def devices_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the device profiles (devices/*.toml); 'devices show NAME' for one."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _registry_rows("devices")
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print("no devices registered")
        return
    table = Table("device", "target", "accelerator", "int8 TOPS", "memory GB", "description")
    for r in rows:
        tops = "-" if r["int8_tops"] is None else f"{r['int8_tops']:g}"
        table.add_row(r["name"], r["target"], r["accelerator"], tops, "-" if r["memory_gb"] is None else f"{r['memory_gb']:g}", r["description"])
    out.print(table)


@_command("show", target=devices_app)
def devices_show_cmd(name: Annotated[str, typer.Argument(help="Device name.")], as_json: JsonOpt = False) -> None:
    """Everything known about one device."""
    from . import registry

    entry = registry.get("devices", name)
    data = {"name": entry.name, "file": str(entry.path), **registry.to_row(entry)}
    if as_json:
        _emit_json(data)
        return
    for key, value in data.items():
        out.print(f"{key}: {value}", markup=False)


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    run()

__all__ = ["app", "run"]
