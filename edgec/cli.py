"""The edgec command line: parse, call one library function, render. Errors are mapped to exit
codes in one place (:func:`_command`); heavy libraries are imported only by the commands that
need them, so ``edgec --version``, ``targets`` and artifact inspection start fast and torch-free.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_OK, EdgecError, InputError, from_os_error

class _OneLineErrors(TyperGroup):
    """Click's usage errors (unknown command or option, bad or missing value) as one line on stderr
    and exit 2, like every other edgec error, instead of a multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # bare 'edgec' or 'edgec devices ...': the help, exit 0
            sys.stdout.write(exc.ctx.get_help() + "\n")
            sys.exit(EXIT_OK)
        except click_errors.ClickException as exc:
            err.print(f"error: {_usage_line(exc)}")
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:
            err.print("error: interrupted")
            sys.exit(130)
        if code == 130:  # Ctrl-C (typer turns KeyboardInterrupt into exit 130)
            err.print("error: interrupted")
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _usage_line(exc: click_errors.ClickException) -> str:
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} -h')" if ctx is not None else text


app = typer.Typer(
    name="edgec",
    help="Compile trained multimodal models for edge devices and prove the artifacts still agree.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts name TOML sections such as [model]: no markup to eat them
    cls=_OneLineErrors,
)
devices_app = typer.Typer(help="Device profiles (devices/*.toml).", no_args_is_help=False, invoke_without_command=True,
                          rich_markup_mode=None)
app.add_typer(devices_app, name="devices")


class _ErrorConsole:
    """Writes edgec's own lines to the stderr the command started with: while a command runs,
    ``sys.stderr`` is the log (library warnings and chatter go there, see :func:`_capture_output`)."""

    def print(self, text: str, markup: bool = False) -> None:
        stream = _state["stderr"] or sys.stderr
        Console(file=stream, highlight=False, soft_wrap=True).print(text, markup=markup)
        stream.flush()


out = Console(highlight=False, soft_wrap=True)
err = _ErrorConsole()
_state: dict[str, Any] = {"traceback": False, "stderr": None, "log": None}

ReselectOpt = Annotated[bool, typer.Option(
    "--reselect", help="Decide again what edgec.lock recorded (time the candidate precisions, search the float "
                       "fallback) and rewrite it.")]
LockedOpt = Annotated[bool, typer.Option(
    "--locked", help="CI: fail (exit 2) instead of changing edgec.lock when a decision it holds no longer matches "
                     "its inputs.")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _logger(quiet: bool):
    """Progress lines for the console, silenced when the command's output is JSON."""
    from .progress import saw_output

    def log(text: str) -> None:
        out.print(text, markup=False)
        saw_output()

    return (lambda *_: None) if quiet else log


def log_path() -> Path:
    """Where library warnings and each run's unexpected tracebacks go: $EDGEC_LOG, else the user's
    cache folder (never the build folder, which a failed command must leave as it was)."""
    import os

    if os.environ.get("EDGEC_LOG"):
        return Path(os.environ["EDGEC_LOG"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edgec" / "edgec.log"


class _LogStream:
    """A text stream for ``sys.stderr`` that writes whole lines into the log (and to ``echo`` with --verbose)."""

    def __init__(self, logger, echo=None) -> None:
        self._logger, self._echo, self._buf, self._busy = logger, echo, "", False

    def write(self, text: str) -> int:
        if self._echo is not None:
            self._echo.write(text)
        if self._busy:  # logging reports its own failure on sys.stderr: never loop
            return len(text)
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        self._busy = True
        try:
            for line in lines:
                if line.strip():
                    self._logger.warning(line)
        finally:
            self._busy = False
        return len(text)

    def flush(self) -> None:
        if self._echo is not None:
            self._echo.flush()

    def close(self) -> None:  # a logging handler that kept this stream closes it at exit: the real stderr stays open
        with contextlib.suppress(ValueError, OSError):  # echo may already be closed at interpreter exit
            self.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # some libraries ask; their C code then writes to the real stderr
        return (self._echo or sys.__stderr__).fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


def _capture_output(ctx: typer.Context, verbose: bool) -> None:
    """For the command's lifetime: Python warnings, library log records and anything written to
    ``sys.stderr`` go to the log (and to stderr too with --verbose); edgec's own error line goes to
    the real stderr. Undone when the command ends (CliRunner tests run many in one process)."""
    import logging
    import logging.handlers
    import os
    import time

    if _state["stderr"] is not None:  # already capturing (nested invocation)
        return
    real = sys.stderr
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):  # writable now, or no log file (rather than errors later)
            pass
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=1, delay=True,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter(f"%(asctime)s pid {os.getpid()} %(name)s %(levelname)s: %(message)s"))
        handlers.append(handler)
        _state["log"] = path
    except OSError:  # no writable cache folder: warnings are dropped unless --verbose
        _state["log"] = None
    if verbose:
        stream = logging.StreamHandler(real)
        stream.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        handlers.append(stream)
    old_level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    saved_lastresort = logging.lastResort
    logging.lastResort = None  # records without a handler must not reach the real stderr
    terminal, saved_fd = real, None
    if not verbose and _state["log"] is not None and _is_fd(real, 2):
        # what native code (C++ runtimes, compilers) writes to file descriptor 2 goes to the log too;
        # edgec's own line goes to a copy of the original descriptor
        try:
            real.flush()
            saved_fd = os.dup(2)
            log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            terminal = os.fdopen(os.dup(saved_fd), "w", encoding=getattr(real, "encoding", None) or "utf-8",
                                 errors="backslashreplace", buffering=1)
        except OSError:
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
            terminal, saved_fd = real, None
    _state["stderr"] = terminal
    captured = logging.getLogger("edgec.stderr")  # written to sys.stderr by a library: the log file only,
    captured.propagate = False                     # echoed as it was with --verbose
    for h in handlers[:1] if _state["log"] else ():
        captured.addHandler(h)
    sys.stderr = _LogStream(captured, real if verbose else None)
    logging.getLogger("edgec").info("start %s at %s", " ".join(sys.argv), time.strftime("%Y-%m-%d %H:%M:%S"))

    def restore() -> None:
        sys.stderr = real
        if saved_fd is not None:
            terminal.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            terminal.close()
        for h in list(captured.handlers):
            captured.removeHandler(h)
        _state["stderr"] = None
        logging.captureWarnings(False)
        logging.lastResort = saved_lastresort
        root.setLevel(old_level)
        for h in handlers:
            root.removeHandler(h)
            h.close()

    ctx.call_on_close(restore)


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # CliRunner's and pytest's streams have none
        return False


def _fail(code: int, line: str, *, as_json: bool = False, payload: dict | None = None,
          exc: BaseException | None = None) -> None:
    """The one way a command ends on an error: (the traceback with --traceback), one line, the exit code."""
    if exc is not None and _state["traceback"]:
        import traceback

        traceback.print_exception(exc, file=_state["stderr"] or sys.stderr)
    if as_json:
        _emit_json({**(payload or {"error": line}), "exit_code": code})
    err.print(f"error: {line}")
    raise typer.Exit(code)


def _unexpected(exc: BaseException) -> str:
    """One line for an exception edgec did not anticipate; its traceback goes to the log."""
    import logging

    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    logging.getLogger("edgec").error("unexpected error", exc_info=exc)
    where = f"; traceback in {_state['log']}" if _state["log"] and not _state["traceback"] else ""
    return (f"unexpected {type(exc).__name__}: {text} (edgec does not check this input yet, or this is a bug in "
            f"edgec{where}; --traceback shows it)")


def _guarded(fn, name: str | None = None):
    """Every error of ``fn`` as one line on stderr (JSON too with --json) and its exit code: an
    :class:`EdgecError` with its own code, what the system refused (no space, read-only folder,
    permissions) and anything unexpected with 2. --traceback adds the traceback, not another code."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any):
        from .progress import heartbeat, phase

        as_json = bool(kw.get("as_json"))
        try:  # a step that runs long without output says which phase runs and for how long
            with heartbeat(lambda text: out.print(text, markup=False), enabled=not as_json), \
                    phase(f"edgec {name or fn.__name__.removesuffix('_cmd')}"):
                return fn(*a, **kw)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except EdgecError as exc:
            _fail(exc.exit_code, str(exc), as_json=as_json, exc=exc,
                  payload={"error": exc.message, "hint": exc.hint})
        except OSError as exc:
            mapped = from_os_error(exc)
            _fail(mapped.exit_code, str(mapped), as_json=as_json, exc=exc,
                  payload={"error": mapped.message, "hint": mapped.hint})
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: still one line, no traceback
            _fail(EXIT_BAD_INPUT, _unexpected(exc), as_json=as_json, exc=exc)

    return wrapper


def _command(*args: Any, target: typer.Typer = app, **kwargs: Any):
    """Register a command whose errors are handled by :func:`_guarded`."""
    return lambda fn: target.command(*args, **kwargs)(_guarded(fn, args[0] if args else None))


def _version(value: bool) -> None:
    if value:
        out.print(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
    traceback: Annotated[bool, typer.Option("--traceback", help="Also show the traceback of an error (debugging); "
                                            "the exit code stays the same.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show library warnings and logs on stderr "
                                          "(otherwise they go to the log file, $EDGEC_LOG or ~/.cache/edgec/edgec.log).")] = False,
) -> None:
    _state["traceback"] = traceback
    _capture_output(ctx, verbose)


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
    for name, t in info["towers"].items():
        split = t.get("macs_split") or {}
        if split.get("attention_matmuls"):
            out.print(f"{name} MACs: {_fmt_count(t['macs'])} = {_fmt_count(split['weight_layers'])} in layers with "
                      f"weights + {_fmt_count(split['attention_matmuls'])} in attention matmuls (activation x "
                      "activation; weights-only counts such as fvcore's leave these out)", markup=False)
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


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _folder_out(value: Optional[Path]) -> Optional[Path]:
    """An output folder option: refused before any work when a file is in its place (never replaced)."""
    if value is not None:
        if value.exists() and not value.is_dir():
            raise typer.BadParameter(f"{value} is a file, not a folder (edgec would replace it): choose another path")
        base = _existing_ancestor(value)
        if not base.is_dir():
            raise typer.BadParameter(f"{base} is a file, so {value} cannot be created")
    return value


def _file_out(value: Optional[Path]) -> Optional[Path]:
    """An output file option: refused before any work when it is a folder or cannot be created."""
    if value is not None:
        if value.is_dir():
            raise typer.BadParameter(f"{value} is a folder: give a file name")
        base = _existing_ancestor(value.parent)
        if not base.is_dir():
            raise typer.BadParameter(f"{base} is a file, so {value} cannot be created")
    return value


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="edgec.toml (default: ./edgec.toml).")]


def _override(cfg, section: str, **options: tuple[str, Any]):
    """``cfg`` with command-line values for keys of ``section``, checked exactly like the same keys
    in edgec.toml (type and range); the error names the option."""
    import dataclasses

    from .schema import override

    values = {key: value for key, (_, value) in options.items()}
    names = {key: flag for key, (flag, _) in options.items()}
    return dataclasses.replace(cfg, **{section: override(getattr(cfg, section), values, names=names)})


TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling the model checkpoint as it is now "
                                        "(pinned to its sha256; it runs code from the file: only for sources you "
                                        "trust). CI: set EDGEC_TRUST_PICKLE=<sha256> instead. Never from edgec.toml.")]


def _trust(requested: bool, cfg=None, model: Path | None = None) -> None:
    """--trust-pickle: trust the checkpoint this command reads, pinned to its current sha256 (edgec.trust)."""
    if not requested:
        return
    from .trust import trust_file

    if model is None and cfg is not None and cfg.model is not None:
        model = cfg.resolve(cfg.model.path)
    if model is not None and Path(model).exists():
        trust_file(model)


@_command("inspect")
def inspect_cmd(
    model: Annotated[Optional[Path], typer.Argument(
        help="Model folder/checkpoint, or a compiled artifact (.onnx, .tflite). Default: [model] of edgec.toml.")] = None,
    config: ConfigOpt = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="auto, edgec, hf or open_clip.")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="open_clip architecture name or model-config .json.")] = None,
    trust_pickle: TrustOpt = False,
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
            arch = arch or cfg.model.arch
            student, image_size = student or cfg.student.name, cfg.student.image_size
        if is_student_checkpoint(model):
            info, render = describe_student(model, None), _render_student
        else:
            kind = kind or "auto"
            if kind not in ModelKind.__members__:
                raise EdgecError(f"--kind must be one of {', '.join(ModelKind.__members__)}, not {kind!r}")
            _trust(trust_pickle, model=model)
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
    out_dir: Annotated[Optional[Path], typer.Option("--out", callback=_folder_out, help="Output folder (default: <build>/distill/<student>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last finished epoch in the output folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Distil the teacher's image tower into a timm student in the teacher's embedding space."""
    from .config import load_config
    from .distill import DistillConfig, run

    if target is not None:  # an unknown target is refused, not silently the default student
        from . import registry

        registry.get("targets", target)
    edgec_cfg = _override(load_config(config), "distill", epochs=("--epochs", epochs),
                          batch_size=("--batch-size", batch_size), lr=("--lr", lr))
    _trust(trust_pickle, edgec_cfg)
    cfg = DistillConfig.from_edgec(edgec_cfg, target=target, student=student, out=out_dir)
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
    out_dir: Annotated[Optional[Path], typer.Option("--out", callback=_folder_out, help="Output folder (default: <build>/golden).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")] = "auto",
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Teacher outputs on the eval set at full precision -> build/golden/ (records the device used)."""
    from .config import check_device, load_config
    from .verify.golden import GoldenConfig, build_golden, load_golden

    cfg = load_config(config)
    _trust(trust_pickle, cfg)
    check_device(device, "--device")
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
    out_dir: Annotated[Optional[Path], typer.Option("--out", callback=_folder_out, help="Output folder (default: <build>/<target>).")] = None,
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
    reselect: ReselectOpt = False,
    locked: LockedOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a target folder: artifacts, zero-shot head files and manifest.json (runs distill first when missing)."""
    from .compile import compile_from_config
    from .config import DEFAULT_CONFIG, load_config

    cfg = load_config(config)
    _trust(trust_pickle, cfg)
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
                                head=head, reselect=reselect, locked=locked, log=log)
            _compile_summary(many, as_json)
            return
        res = compile_from_config(cfg, targets[0], no_distill=no_distill, out=out_dir, config_path=config_path,
                                  progress=progress and not as_json, device=device, force=force, log=log,
                                  reselect=reselect, locked=locked,
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
    max_fallback: Annotated[int, typer.Option("--max-fallback", min=1, max=10_000, help="At most this many float layers.")] = 16,
    eval_images: Annotated[int, typer.Option("--eval-images", min=1, help="Golden images for the ranking and the fallback "
                                             "search (the final metrics use all of them).")] = 128,
    sensitivity: Annotated[bool, typer.Option("--sensitivity/--no-sensitivity", help="Rank every layer (one program per layer).")] = True,
    out_dir: Annotated[Optional[Path], typer.Option("--out", callback=_folder_out, help="Output folder (default: <build>/quantize).")] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Quantize the teacher's image tower as it is.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Instead: each backend's default flow vs edgec's, every "
                                                            "calibration method, one table (<out>/compare.md).")] = False,
    benchmarks: Annotated[Optional[Path], typer.Option("--benchmarks", callback=_file_out, help="Also put the --compare table (or the "
                                                       "--tolerance fallback table) in a marked section of this "
                                                       "Markdown file.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the distillation progress bar.")] = True,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """int8 programs per backend with per-layer sensitivity and accuracy-aware fallback -> <build>/quantize/<backend>/."""
    from .config import load_config
    from .quantize.run import BACKENDS, check_tolerance_met, quantize_from_config

    cfg = _override(load_config(config), "quantize", tolerance=("--tolerance", tolerance), method=("--method", method))
    _trust(trust_pickle, cfg)
    if backend != "all" and backend not in BACKENDS:  # before any work (the teacher's outputs are cached early)
        from .errors import UnknownNameError

        raise UnknownNameError(f"unknown backend {backend!r} for quantize", hint=f"one of {', '.join(BACKENDS)} or all")
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
    reselect: ReselectOpt = False,
    locked: LockedOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """golden, distill, compile and verify every target, reusing each stage whose inputs are unchanged;
    writes build/release.json, release.junit.xml and release.md. Exit 1 when a gate fails."""
    from .config import DEFAULT_CONFIG, load_config
    from .release import ReleaseConfig, run

    names = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else ()
    cfg = load_config(config)
    if cfg.model is not None and not cfg.resolve(cfg.model.path).exists():  # before any stage hashes it
        raise InputError(f"model not found: {cfg.resolve(cfg.model.path)} ([model] path in {config or DEFAULT_CONFIG})",
                         hint="give an edgec checkpoint folder, a Hugging Face folder, or an open_clip checkpoint file")
    _trust(trust_pickle, cfg)
    result = run(ReleaseConfig(config=Path(config or DEFAULT_CONFIG), targets=names, wait=wait,
                               progress=progress and not as_json, reselect=reselect, locked=locked), log=_logger(as_json))
    if as_json:
        _emit_json(result.manifest)
    if not result.passed:
        failed = [f"{t}: {f}" for t, rec in result.manifest["targets"].items() for f in rec["failures"]]
        err.print(f"error: release failed: {'; '.join(failed)} (details in {result.paths['markdown']})", markup=False)
        raise typer.Exit(result.exit_code)  # 1 a gate failed; 2 or 3 when a target stopped on bad input or a missing toolchain


@_command("verify")
def verify_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile', or a bundle from 'edgec bundle'.")],
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: <folder>/../golden).")] = None,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help="Gate such as agreement>=0.97 (repeatable); "
                                                      "replaces the gates recorded in the manifest.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", callback=_file_out, help="Write JUnit XML here.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", callback=_file_out, help="Write a Markdown summary here "
                                                     "(also appended to $GITHUB_STEP_SUMMARY when set).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Runtime threads.")] = None,
    on: Annotated[Optional[str], typer.Option("--on", help="Verify on a Linux device: ssh://user@host[:port] "
                                              "(system ssh, host key checked against known_hosts).")] = None,
    known_hosts: Annotated[Optional[Path], typer.Option("--known-hosts", help="With --on: the known_hosts file "
                                                        "holding the device's host key (default: ~/.ssh/known_hosts).")] = None,
    identity: Annotated[Optional[Path], typer.Option("--identity", help="With --on: private key for the login.")] = None,
    install: Annotated[bool, typer.Option("--install", help="With --on: install the bundle's edgec wheel and the "
                                          "runtime into a venv on the device first.")] = False,
    remote_edgec: Annotated[str, typer.Option("--edgec", help="With --on: the edgec command on the device.")] = "edgec",
    remote_python: Annotated[str, typer.Option("--python", help="With --on --install: the device's Python.")] = "python3",
    remote_dir: Annotated[Optional[str], typer.Option("--remote-dir", help="With --on: work folder on the device "
                                                      "(default: ~/.cache/edgec).")] = None,
    images: Annotated[Optional[int], typer.Option("--images", min=1, help="With --on and a target folder: bundle only "
                                                  "N golden images, chosen evenly across labels.")] = None,
    report_out: Annotated[Optional[Path], typer.Option("--report", help="With a bundle or --on: where the device "
                                                       "report goes (default: beside the bundle, or "
                                                       "<folder>/verify.device.json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the artifacts in their runtime against the golden set (here, from a bundle, or on a device over ssh);
    exit 1 when a gate fails."""
    from .verify.run import summary_line, verify

    from .device.bundle import is_bundle

    if on is not None or is_bundle(folder):
        from .device.run import verify_device

        report = verify_device(folder, on=on, golden=golden, gates=gate, threads=threads, junit=junit, markdown=markdown,
                               report=report_out, images=images, known_hosts=known_hosts, identity=identity,
                               install=install, edgec=remote_edgec, python=remote_python, remote_dir=remote_dir,
                               log=_logger(as_json))
    else:
        from .errors import GateFailed

        try:
            report = verify(folder, golden, gate, threads=threads, junit=junit, markdown=markdown)
        except GateFailed as exc:
            exc.hint = f"{exc.hint + '; ' if exc.hint else ''}'edgec diagnose {folder}' names the first layers that diverge"
            raise
    if as_json:
        _emit_json(report)
    else:
        out.print(f"{report['target']}: passed; {summary_line(report)}", markup=False)
        if report.get("executed_on"):
            from .device.bundle import describe_run

            out.print(describe_run(report), markup=False)


@_command("bundle")
def bundle_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile'.")],
    output: Annotated[Optional[Path], typer.Option("--out", "-o", help="A .tar.gz (default: <folder>/../bundles/"
                                                   "edgec-bundle-<target>-<id>.tar.gz) or, any other name, a folder.")] = None,
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: <folder>/../golden).")] = None,
    images: Annotated[Optional[int], typer.Option("--images", min=1, help="Only N golden images, chosen evenly "
                                                  "across labels (default: all).")] = None,
    wheel: Annotated[bool, typer.Option("--wheel/--no-wheel", help="Carry the edgec wheel (for --install on a device).")] = True,
    host_check: Annotated[bool, typer.Option("--host-check/--no-host-check", help="Verify the bundle here first and "
                                             "record the metrics the device must reproduce.")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Runtime threads for the host check.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A self-contained, content-addressed verification bundle for a device: artifacts, manifest, golden subset,
    requirements and the host's metrics; 'edgec verify BUNDLE' there reproduces them."""
    from .device.bundle import make_bundle

    result = make_bundle(folder, golden=golden, out=output, images=images, wheel=wheel, host_check=host_check,
                         threads=threads, log=_logger(as_json))
    if as_json:
        _emit_json({"bundle": str(result.path), **result.record})
        return
    out.print(f"on the device: pip install {' '.join(r for r in result.record['requirements'] if not r.startswith('#'))}"
              f" && edgec verify {result.path.name}", markup=False)


@_command("diagnose")
def diagnose_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile'.")],
    config: ConfigOpt = None,
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: <folder>/../golden).")] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Golden images to run, chosen evenly across labels.")] = 8,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="A layer diverges when the cosine "
                                             "between its float and artifact outputs is below this.")] = 0.99,
    show: Annotated[int, typer.Option("--show", min=1, help="How many divergent layers to list.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """The first layers where the artifact's outputs diverge from the float model, named as in the PyTorch model
    (the float model comes from edgec.toml, checked against the manifest's hashes)."""
    from .config import load_config
    from .device.diagnose import diagnose

    report = diagnose(folder, load_config(config), golden=golden, images=images, threshold=threshold, show=show,
                      log=_logger(as_json))
    if as_json:
        _emit_json(report)
        return
    table = Table("layer", "class", "cosine", "")
    for r in report["first_divergent"]:
        table.add_row(r["layer"], r["class"], f"{r['cosine']:.4f}",
                      f"(with {r['fused_with']}, fused)" if r.get("fused_with") else "")
    if report["first_divergent"]:
        out.print(f"first layers of {report['target']}/{report['artifact']} below cosine {report['threshold']:g} "
                  f"({len(report['layers'])} layers compared, {report['images']} images):", markup=False)
        out.print(table)
    out.print(f"fix: {report['fix']}", markup=False)


@_command("bench")
def bench_cmd(
    folder: Annotated[Path, typer.Argument(help="A target folder written by 'edgec compile'.")],
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per artifact.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 10,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Runtime threads (default: all cores).")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="edgec.toml: also time its teacher in eager PyTorch.")] = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Latency (median, p90), throughput, peak memory and size of each artifact -> bench.json."""
    from .bench import bench

    if trust_pickle and teacher is not None:
        from .config import load_config

        _trust(True, load_config(teacher))

    report = bench(folder, runs=runs, warmup=warmup, threads=threads, teacher_config=teacher,
                   log=_logger(as_json))
    if as_json:
        _emit_json(report)
    else:
        out.print(f"wrote {folder / 'bench.json'}", markup=False)


@_command("report")
def report_cmd(
    folders: Annotated[list[Path], typer.Argument(help="Verified target folders.")],
    html_out: Annotated[Path, typer.Option("--html", callback=_file_out, help="Where to write the HTML page.")] = Path("build/report.html"),
    golden: Annotated[Optional[Path], typer.Option("--golden", help="Golden set (default: the one verify used).")] = None,
    benchmarks: Annotated[Optional[Path], typer.Option("--benchmarks", callback=_file_out, help="Also write the Markdown benchmark tables here.")] = None,
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
    from rich.markup import escape

    from .doctor import diagnose

    info = diagnose()
    if as_json:
        _emit_json(info)
        return
    table = Table("package", "version", "for")
    for p in info["packages"]:
        table.add_row(p["package"], p["version"] or f"[dim]not installed: {escape(p['install'])}[/dim]", p["for"])
    out.print(table)
    for t in info["tools"]:
        out.print(f"{t['tool']}: {t['path'] or 'not on PATH'} ({t['for']})", markup=False)
    out.print(f"CUDA: {info['cuda'] or 'not available'}", markup=False)
    isa = info["isa"]
    out.print(f"CPU: {isa['model'] or isa['arch']}; ISA {isa['arch']} [{' '.join(isa['flags'])}]; "
              f"onnxruntime int8 kernels: {isa['int8_kernels']}", markup=False)
    table = Table("target", "build", "verify", "to install")
    for t in info["targets"]:
        need = "; ".join(t.get("install") or []) or ", ".join(sorted(set(t["missing_for_build"]) | set(t["missing_for_verify"])))
        table.add_row(t["target"], "yes" if t["can_build"] else "no", "yes" if t["can_verify"] else "no",
                      escape(need or (t["note"] or "-")))
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


@_command("students")
def students_cmd(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Only the families that reach this target.")] = None,
    size: Annotated[Optional[int], typer.Option("--size", min=16, max=1024, help="Image side for params and MACs "
                                                "(default: [student] image_size of edgec.toml when set, else 224).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Supported student families: params and MACs at the configured size, and the targets each reaches."""
    from .models.students import describe_families

    if size is None:
        from .config import DEFAULT_CONFIG, load_config

        if config is not None or Path(DEFAULT_CONFIG).is_file():
            size = load_config(config).student.image_size
        size = size or 224
    rows = describe_families(size, target=target)
    if as_json:
        _emit_json(rows)
        return
    table = Table("family", "model", "params", f"MACs @{size}px", "image sides", "targets")
    for r in rows:
        table.add_row(r["family"], r["model"], _fmt_count(r["params"]), _fmt_count(r["macs"]), r["sizes_short"],
                      ", ".join(t for t, ok in r["targets"].items() if ok))
    out.print(table)
    for r in rows:
        for t, why in r["not_on"].items():
            if t not in r["untested"]:
                out.print(f"{r['family']}: not {t}: {why}", markup=False)
    untested = sorted({t for r in rows for t in r["untested"]})
    if untested:
        out.print(f"not tested for any family here: {', '.join(untested)} (their backends' student exports are not in "
                  "the support matrix)", markup=False)


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
        err.print("error: interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    run()

__all__ = ["app", "run"]
