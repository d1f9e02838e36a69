"""A battery of user mistakes and faults, each through the real CLI in a subprocess.

Every case must end with its exit code (2 bad input, 3 missing toolchain), exactly one line on
stderr that starts with ``error:``, no traceback, and nothing new or changed in the project: the
shared build folder (golden set, a compiled and verified cpu target), the model, the data and the
case's own files are fingerprinted before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

LOCK = ".edgec.lock"  # the build lock's holder record: rewritten by design whenever a command takes it


# ---------------------------------------------------------------------------------------------
# the project every case starts from

@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_edgec, shapes_data) -> Path:
    """teacher/, data/{train,eval}/, edgec.toml, build/golden and build/cpu (compiled, verified)."""
    root = tmp_path_factory.mktemp("battery")
    shutil.copytree(tiny_edgec, root / "teacher")
    shutil.copytree(shapes_data, root / "data")
    (root / "edgec.toml").write_text(toml(base_config(root)))
    for argv in (["golden"], ["compile", "--target", "cpu", "--no-distill", "--no-progress"], ["verify", "build/cpu"]):
        proc = edgec(argv, cwd=root)
        assert proc.returncode == 0, proc.stderr
    return root


def base_config(root: Path, out: Path | None = None) -> dict:
    return {
        "model": {"path": str(root / "teacher")},
        "student": {"name": "test_efficientnet"},
        "data": {"train": str(root / "data" / "train"), "eval": str(root / "data" / "eval")},
        "distill": {"epochs": 1, "batch_size": 16},
        "calibration": {"path": str(root / "data" / "train"), "num_images": 32},
        "targets": {"out": str(out or root / "build")},
    }


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)  # int (any size) or float as written


def toml(data: dict) -> str:
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {v.raw if isinstance(v, Raw) else _value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Raw:
    """A TOML value written as it is (nan, inf, huge integers)."""

    raw: str


def edgec(argv: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "EDGEC_TRUST_PICKLE"}
    full_env.update({"EDGEC_LOG": str(cwd.parent / "edgec-battery.log"), **(env or {})})
    return subprocess.run([sys.executable, "-m", "edgec.cli", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def fingerprint(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: type, size, mtime, mode (the build lock's record excepted)."""
    seen: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            seen[str(root)] = ("absent",)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if name == LOCK:
                    continue
                st = p.lstat()
                if p.is_dir() and not p.is_symlink():  # a folder: its entries are listed themselves
                    seen[str(p)] = (oct(st.st_mode),)
                else:
                    seen[str(p)] = (oct(st.st_mode), st.st_size, st.st_mtime_ns)
    return seen


# ---------------------------------------------------------------------------------------------
# the cases

@dataclass
class Ctx:
    proj: Path
    dir: Path  # this case's own folder (also the command's working directory)

    def config(self, name: str = "edgec.toml", *, drop: tuple[str, ...] = (), out: Path | None = None, **sections) -> Path:
        data = base_config(self.proj, out)
        for section, keys in sections.items():
            if not isinstance(keys, dict):
                data[section] = keys
                continue
            table = data.setdefault(section, {})
            table.update(keys)
        for dotted in drop:
            section, key = dotted.split(".")
            data[section].pop(key, None)
        path = self.dir / name
        path.write_text(toml(data))
        return path

    def local_build(self, *parts: str) -> Path:
        """A copy of the shared build's ``parts`` (golden, cpu) in this case's folder."""
        build = self.dir / "build"
        for part in parts:
            shutil.copytree(self.proj / "build" / part, build / part)
        build.mkdir(exist_ok=True)
        return build

    def folder(self, name: str, files: dict[str, bytes]) -> Path:
        root = self.dir / name
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    code: int = 2
    needle: str = ""  # in the error line, case-insensitive
    env: Callable[[Ctx], dict] | None = None
    needs: str = ""  # "mount": a tmpfs mount (root with CAP_SYS_ADMIN)
    extra_roots: Callable[[Ctx], list[Path]] = field(default=lambda c: [])


def _png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` grey pixels, with a tiny (incomplete) image body:
    enough for PIL to see the size at open time (decompression-bomb check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _good_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _eval_folder(c: Ctx, files: dict[str, bytes]) -> Path:
    return c.folder("evalset", files)


def _golden_with_eval(c: Ctx, folder: Path) -> list[str]:
    cfg = c.config(data={"eval": str(folder)}, out=c.dir / "build")
    return ["golden", "--config", str(cfg)]


def _bomb_folder(c: Ctx) -> list[str]:
    files = {f"a/{i}.png": _png(30000, 30000) for i in range(6)}
    return _golden_with_eval(c, _eval_folder(c, files))


def _non_utf8_captions(c: Ctx) -> list[str]:
    files = {"x.png": _good_png(), "y.png": _good_png(),
             "captions.jsonl": b'{"image": "x.png", "caption": "caf\xe9 red"}\n{"image": "y.png", "caption": "b"}\n'}
    return _golden_with_eval(c, _eval_folder(c, files))


def _captions_bad_json(c: Ctx) -> list[str]:
    files = {"x.png": _good_png(), "captions.jsonl": b'{"image": "x.png", "caption": "a"\n'}
    return _golden_with_eval(c, _eval_folder(c, files))


def _captions_missing_image(c: Ctx) -> list[str]:
    files = {"x.png": _good_png(), "captions.jsonl": b'{"image": "gone.png", "caption": "a"}\n'}
    return _golden_with_eval(c, _eval_folder(c, files))


def _captions_symlink_out(c: Ctx) -> list[str]:
    outside = c.dir / "secret.png"
    outside.write_bytes(_good_png())
    folder = _eval_folder(c, {"x.png": _good_png(), "captions.jsonl": b'{"image": "link.png", "caption": "a"}\n'})
    (folder / "link.png").symlink_to(outside)
    return _golden_with_eval(c, folder)


def _image_folder_symlink_out(c: Ctx) -> list[str]:
    outside = c.dir / "secret.png"
    outside.write_bytes(_good_png())
    folder = _eval_folder(c, {"cat/x.png": _good_png(), "dog/y.png": _good_png()})
    (folder / "dog" / "z.png").symlink_to(outside)
    return _golden_with_eval(c, folder)


def _all_corrupt_images(c: Ctx) -> list[str]:
    return _golden_with_eval(c, _eval_folder(c, {f"k/{i}.png": b"not a png" for i in range(5)}))


def _calibration_list(c: Ctx, text: bytes) -> list[str]:
    lst = c.dir / "calib.txt"
    lst.write_bytes(text)
    c.local_build("golden")
    cfg = c.config(calibration={"path": str(lst), "num_images": 16, "min_images": 1}, out=c.dir / "build")
    return ["compile", "--target", "cpu", "--no-distill", "--no-progress", "--config", str(cfg)]


def _teacher_with(c: Ctx, value: float, key: str | None = None) -> Path:
    """A copy of the teacher with one value of a weight changed (``key``: that whole weight set to it)."""
    from safetensors.numpy import load_file, save_file

    teacher = c.dir / "teacher"
    shutil.copytree(c.proj / "teacher", teacher)
    weights = load_file(teacher / "model.safetensors")
    name = key or sorted(k for k, v in weights.items() if v.dtype.kind == "f" and v.ndim == 2)[0]
    weights[name] = weights[name].copy()
    if key:
        weights[name][...] = value
    else:
        weights[name].flat[0] = value
    save_file(weights, teacher / "model.safetensors")
    from edgec.manifest import sha256_file

    meta = json.loads((teacher / "edgec_model.json").read_text())  # a consistent checkpoint, only its values odd
    meta["weights_sha256"] = sha256_file(teacher / "model.safetensors")
    (teacher / "edgec_model.json").write_text(json.dumps(meta))
    return teacher


def _golden_of_teacher(c: Ctx, teacher: Path) -> list[str]:
    return ["golden", "--config", str(c.config(model={"path": str(teacher)}, out=c.dir / "build"))]


def _evil_pickle(path: Path) -> Path:
    """A torch checkpoint whose unpickling would run code (it only writes a marker file)."""
    marker = path.parent / "PWNED"
    code = (f"import torch, os\n"
            f"class Evil:\n"
            f"    def __reduce__(self):\n"
            f"        return (os.system, ({f'touch {marker}'!r},))\n"
            f"torch.save({{'state_dict': {{}}, 'evil': Evil()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _open_clip_pickle(c: Ctx, env: bool = False) -> list[str]:
    ckpt = _evil_pickle(c.dir / "model.pt")
    return ["inspect", str(ckpt), "--arch", "ViT-B-32", "--no-macs"]


def _hf_pickle(c: Ctx) -> list[str]:
    folder = c.dir / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    _evil_pickle(folder / "pytorch_model.bin")
    return ["inspect", str(folder), "--no-macs"]


def _hf_config(c: Ctx, text: str) -> list[str]:
    folder = c.folder("hf", {"config.json": text.encode(), "model.safetensors": b"\0" * 16})
    return ["inspect", str(folder), "--no-macs"]


def _verify_copy(c: Ctx, edit: Callable[[Path], None], *extra: str) -> list[str]:
    build = c.local_build("golden", "cpu")
    edit(build)
    return ["verify", str(build / "cpu"), *extra]


def _manifest_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(build: Path) -> None:
        path = build / "cpu" / "manifest.json"
        m = json.loads(path.read_text())
        change(m)
        path.write_text(json.dumps(m))
    return edit


def _first_artifact(build: Path) -> Path:
    m = json.loads((build / "cpu" / "manifest.json").read_text())
    return build / "cpu" / m["artifacts"][0]["path"]


def _truncate(build: Path) -> None:
    p = _first_artifact(build)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _other_teacher_golden(c: Ctx) -> list[str]:
    """Golden set of a teacher with the same architecture and other weights: same shapes, other identity."""
    teacher = _teacher_with(c, 0.5)
    build = c.local_build("cpu")
    cfg = c.config(model={"path": str(teacher)}, out=build)
    proc = edgec(["golden", "--config", str(cfg)], cwd=c.dir)
    assert proc.returncode == 0, proc.stderr
    return ["verify", str(build / "cpu")]


def _release_missing_model(c: Ctx) -> list[str]:
    return ["release", "--config", str(c.config(model={"path": str(c.dir / "no-such-model")}, out=c.dir / "build"))]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, options: str = ""):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (f",{options}" if options else ""), "tmpfs",
                    str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/edgec-mount-probe-{os.getpid()}")
    try:
        with _tmpfs(probe, "64k"):
            return True
    except (subprocess.CalledProcessError, OSError):
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _read_only_build(c: Ctx) -> list[str]:
    """The build folder (golden set only) on a read-only file system; or, for a non-root user, read-only by mode."""
    build = c.dir / "build"
    golden = c.proj / "build" / "golden"
    if os.geteuid() != 0:
        shutil.copytree(golden, build / "golden")
        for p in [build, *build.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    else:
        c._mount = _tmpfs(build, "64m")
        c._mount.__enter__()
        shutil.copytree(golden, build / "golden")
        subprocess.run(["mount", "-o", "remount,ro", str(build)], check=True, capture_output=True)
    cfg = c.config(out=build)
    return ["compile", "--target", "cpu", "--no-distill", "--no-progress", "--config", str(cfg)]


def _full_disk(c: Ctx) -> list[str]:
    """The build folder on a file system with a few KB free after the golden set."""
    build = c.dir / "build"
    golden = c.proj / "build" / "golden"
    used = sum(p.stat().st_size for p in golden.rglob("*") if p.is_file())
    c._mount = _tmpfs(build, f"{(used + 64 * 1024) // 1024 + 64}k")
    c._mount.__enter__()
    shutil.copytree(golden, build / "golden")
    cfg = c.config(out=build)
    return ["compile", "--target", "cpu", "--no-distill", "--no-progress", "--config", str(cfg)]


def _bad_config_text(text: bytes) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        path = c.dir / "edgec.toml"
        path.write_bytes(text)
        return ["golden", "--config", str(path)]
    return setup


def _cfg(command: list[str], **sections) -> Callable[[Ctx], list[str]]:
    """``edgec COMMAND --config <edgec.toml with sections changed>``; the build folder is the shared one."""
    def setup(c: Ctx) -> list[str]:
        return [*command, "--config", str(c.config(**sections))]
    return setup


def _argv(*argv: str, config: bool = False) -> Callable[[Ctx], list[str]]:
    """A plain command line run in the project folder; ``{proj}`` and ``{dir}`` are filled in."""
    def setup(c: Ctx) -> list[str]:
        words = [a.format(proj=c.proj, dir=c.dir) for a in argv]
        return [*words, "--config", str(c.proj / "edgec.toml")] if config else words
    return setup


GOLDEN = ["golden"]
DISTILL = ["distill", "--no-progress"]
COMPILE = ["compile", "--target", "cpu", "--no-distill", "--no-progress"]

CASES = [
    # --- the command line itself
    Case("unknown-command", _argv("compyle"), needle="compile"),
    Case("unknown-option", _argv("verify", "{proj}/build/cpu", "--gates", "x"), needle="--gate"),
    Case("missing-argument", _argv("verify"), needle="folder"),
    Case("unknown-global-option", _argv("--bogus", "targets"), needle="--bogus"),
    Case("bench-runs-0", _argv("bench", "{proj}/build/cpu", "--runs", "0"), needle="--runs"),
    Case("bench-runs-not-a-number", _argv("bench", "{proj}/build/cpu", "--runs", "many"), needle="--runs"),
    Case("bench-threads-0", _argv("bench", "{proj}/build/cpu", "--threads", "0"), needle="--threads"),
    Case("verify-threads-0", _argv("verify", "{proj}/build/cpu", "--threads", "0"), needle="--threads"),
    Case("verify-threads-negative", _argv("verify", "{proj}/build/cpu", "--threads", "-3"), needle="--threads"),
    Case("distill-epochs-0", _argv(*DISTILL, "--epochs", "0", config=True), needle="epochs"),
    Case("distill-epochs-huge", _argv(*DISTILL, "--epochs", "99999999999999999999999", config=True), needle="epochs"),
    Case("distill-batch-size-0", _argv(*DISTILL, "--batch-size", "0", config=True), needle="--batch-size"),
    Case("distill-unknown-target", _argv(*DISTILL, "--target", "cpuu", config=True), needle="cpuu"),
    Case("distill-lr-negative", _argv(*DISTILL, "--lr", "-1", config=True), needle="lr"),
    Case("distill-lr-nan", _argv(*DISTILL, "--lr", "nan", config=True), needle="lr"),
    Case("quantize-tolerance-2", _argv("quantize", "--tolerance", "2", "--no-progress", config=True), needle="tolerance"),
    Case("quantize-eval-images-0", _argv("quantize", "--eval-images", "0", "--no-progress", config=True),
         needle="--eval-images"),
    Case("quantize-unknown-backend", _argv("quantize", "--backend", "tvm", "--no-progress", config=True), needle="tvm"),
    Case("quantize-unknown-method", _argv("quantize", "--method", "magic", "--no-progress", config=True), needle="magic"),
    Case("compile-unknown-target", _argv("compile", "--target", "cpuu", config=True), needle="cpu"),
    Case("compile-unknown-device", _argv("compile", "--device", "nokia-3310", config=True), needle="nokia-3310"),
    Case("compile-towers-bogus", _argv(*COMPILE, "--towers", "audio", config=True), needle="towers"),
    Case("devices-show-unknown", _argv("devices", "show", "nokia-3310"), needle="nokia-3310"),
    Case("inspect-unknown-kind", _argv("inspect", "{proj}/teacher", "--kind", "keras"), needle="keras"),
    Case("release-unknown-target", _argv("release", "--targets", "cpuu", config=True), needle="cpuu"),
    Case("golden-device-unknown", _argv("golden", "--device", "tpu:9", config=True), needle="tpu:9"),
    # --- edgec.toml
    Case("config-missing", _argv("golden", "--config", "{dir}/nope.toml"), needle="not found"),
    Case("config-not-toml", _bad_config_text(b"[model\npath = 1\n"), needle="TOML"),
    Case("config-not-utf8", _bad_config_text(b'[model]\npath = "t\xff\xfe"\n'), needle="UTF-8"),
    Case("config-binary", _bad_config_text(bytes(range(256)) * 4)),
    Case("config-unknown-section", _cfg(GOLDEN, modle={"path": "x"}), needle="modle"),
    Case("config-unknown-key", _cfg(DISTILL, distill={"epoch": 3}), needle="epoch"),
    Case("config-wrong-type", _cfg(DISTILL, distill={"epochs": "3"}), needle="epochs"),
    Case("config-epochs-0", _cfg(DISTILL, distill={"epochs": 0}), needle="epochs"),
    Case("config-epochs-huge", _cfg(DISTILL, distill={"epochs": Raw("99999999999999999999999")}), needle="epochs"),
    Case("config-batch-size-negative", _cfg(DISTILL, distill={"batch_size": -1}), needle="batch_size"),
    Case("config-batch-size-huge", _cfg(DISTILL, distill={"batch_size": 10**9}), needle="batch_size"),
    Case("config-lr-nan", _cfg(DISTILL, distill={"lr": Raw("nan")}), needle="lr"),
    Case("config-lr-inf", _cfg(DISTILL, distill={"lr": Raw("inf")}), needle="lr"),
    Case("config-lr-huge", _cfg(DISTILL, distill={"lr": 1e6}), needle="lr"),
    Case("config-warmup-negative", _cfg(DISTILL, distill={"warmup_epochs": -1.0}), needle="warmup_epochs"),
    Case("config-weight-decay-huge", _cfg(DISTILL, distill={"weight_decay": 50.0}), needle="weight_decay"),
    Case("config-temperature-0", _cfg(DISTILL, distill={"temperature": 0.0}), needle="temperature"),
    Case("config-patience-0", _cfg(DISTILL, distill={"patience": 0}), needle="patience"),
    Case("config-seed-negative", _cfg(DISTILL, distill={"seed": -5}), needle="seed"),
    Case("config-loss-weight-negative", _cfg(DISTILL, **{"distill.losses": {"feature_cosine": -1.0}}), needle="loss"),
    Case("config-percentile-50", _cfg(COMPILE, quantize={"percentile": 50.0}), needle="percentile"),
    Case("config-num-images-0", _cfg(COMPILE, calibration={"num_images": 0}), needle="num_images"),
    Case("config-num-images-huge", _cfg(COMPILE, calibration={"num_images": 10**12}), needle="num_images"),
    Case("config-image-size-5", _cfg(DISTILL, student={"image_size": 5}), needle="image_size"),
    Case("config-max-bad-fraction-2", _cfg(GOLDEN, data={"max_bad_fraction": 2.0}), needle="max_bad_fraction"),
    Case("config-prompt-without-braces", _cfg(GOLDEN, data={"prompts": ["a photo"]}), needle="{}"),
    Case("config-gate-bad-expression", _cfg(COMPILE, gates={"default": ["agreement>>0.9"]}), needle="agreement>>0.9"),
    Case("config-version-99", _cfg(GOLDEN, version=99), needle="version"),
    Case("config-towers-text-only", _cfg(COMPILE, targets={"towers": ["text"]}), needle="towers"),
    Case("config-trust-pickle", _cfg(GOLDEN, model={"trust_pickle": True}), needle="trust_pickle"),
    Case("config-unknown-student", _cfg(DISTILL, student={"name": "resnet9000_ultra"}), needle="resnet9000_ultra"),
    Case("config-build-unknown-target", _cfg(["release"], targets={"build": ["cpuu"]}), needle="cpuu"),
    # --- models
    Case("model-missing", _argv("inspect", "{dir}/no-such-model"), needle="not found"),
    Case("model-missing-via-golden", _cfg(GOLDEN, model={"path": "/nonexistent/teacher"}), needle="not found"),
    Case("model-missing-via-release", _release_missing_model, needle="model not found"),
    Case("model-empty-folder", lambda c: ["inspect", str(c.folder("empty", {"README": b"hi"}))]),
    Case("model-random-file", lambda c: ["inspect", str(c.folder("m", {"model.bin": os.urandom(256)}) / "model.bin")]),
    Case("model-truncated-safetensors", lambda c: ["inspect", str(_truncated_teacher(c)), "--no-macs"]),
    Case("model-nan-weights", lambda c: _golden_of_teacher(c, _teacher_with(c, float("nan"))), needle="finite"),
    Case("model-inf-weights", lambda c: _golden_of_teacher(c, _teacher_with(c, float("inf"))), needle="finite"),
    Case("model-overflowing-outputs", lambda c: _golden_of_teacher(c, _teacher_with(c, 3e38, "visual.proj.weight")),
         needle="NaN or inf"),
    Case("open-clip-pickle", _open_clip_pickle, needle="--trust-pickle"),
    Case("open-clip-pickle-env-not-a-hash", _open_clip_pickle, env=lambda c: {"EDGEC_TRUST_PICKLE": "yes"},
         needle="EDGEC_TRUST_PICKLE"),
    Case("open-clip-pickle-env-other-hash", _open_clip_pickle, env=lambda c: {"EDGEC_TRUST_PICKLE": "ab" * 32},
         needle="--trust-pickle"),
    Case("hf-pytorch-model-bin-pickle", _hf_pickle, needle="pytorch_model.bin"),
    Case("hf-config-not-an-object", lambda c: _hf_config(c, "[1, 2, 3]"), needle="config.json"),
    Case("hf-config-not-json", lambda c: _hf_config(c, "{model_type: clip"), needle="config.json"),
    Case("hf-config-unsupported-type", lambda c: _hf_config(c, '{"model_type": "bert"}'), needle="bert"),
    # --- data
    Case("data-train-one-image", lambda c: [*DISTILL, "--config", str(c.config(
        data={"train": str(c.folder("one", {"a/x.png": _good_png()}))}, out=c.dir / "build"))], needle="at least 2"),
    Case("data-eval-missing", _cfg(GOLDEN, data={"eval": "/nonexistent/eval"}), needle="/nonexistent/eval"),
    Case("data-eval-empty", lambda c: _golden_with_eval(c, c.folder("evalset", {"README.txt": b"x"}))),
    Case("data-all-corrupt", _all_corrupt_images),
    Case("data-decompression-bombs", _bomb_folder),
    Case("data-captions-not-utf8", _non_utf8_captions, needle="UTF-8"),
    Case("data-captions-bad-json", _captions_bad_json, needle="captions.jsonl"),
    Case("data-captions-missing-image", _captions_missing_image, needle="gone.png"),
    Case("data-captions-symlink-out", _captions_symlink_out, needle="link.png"),
    Case("data-folder-symlink-out", _image_folder_symlink_out, needle="z.png"),
    Case("calibration-missing-fresh-build", lambda c: [*COMPILE, "--config", str(c.config(
        calibration={"path": str(c.dir / "no-calibration")}, out=c.dir / "build"))], needle="no-calibration"),
    Case("int8-without-calibration-fresh-build", lambda c: [*COMPILE, "--config", str(c.config(
        drop=("calibration.path", "calibration.num_images"), out=c.dir / "build"))], needle="calibration images"),
    Case("config-build-empty", _cfg(["compile", "--target", "all", "--no-distill"], targets={"build": []}),
         needle="at least one target"),
    Case("calibration-folder-empty-compile", lambda c: [*COMPILE, "--config", str(c.config(
        calibration={"path": str(c.folder("calib", {"README.txt": b"x"}))}, out=c.dir / "build"))], needle="no images"),
    Case("calibration-folder-empty-quantize", lambda c: [
        "quantize", "--no-distill", "--no-progress", "--backend", "onnx", "--no-sensitivity", "--config", str(c.config(
            calibration={"path": str(c.folder("calib", {"README.txt": b"x"}))}, out=c.dir / "build"))],
         needle="no images"),
    Case("calibration-list-not-utf8", lambda c: _calibration_list(c, b"/tmp/caf\xe9.png\n"), needle="UTF-8"),
    Case("calibration-list-missing-files", lambda c: _calibration_list(c, b"/nonexistent/a.png\n/nonexistent/b.png\n")),
    # --- verify, bench, report on broken folders
    Case("verify-folder-missing", _argv("verify", "{dir}/nope"), needle="nope"),
    Case("verify-no-manifest", lambda c: ["verify", str(c.folder("x", {"a.onnx": b"0"}))], needle="manifest"),
    Case("verify-manifest-not-json", lambda c: _verify_copy(c, lambda b: (b / "cpu" / "manifest.json").write_text("{")),
         needle="manifest"),
    Case("verify-manifest-a-list", lambda c: _verify_copy(c, lambda b: (b / "cpu" / "manifest.json").write_text("[]")),
         needle="manifest"),
    Case("verify-artifact-truncated", lambda c: _verify_copy(c, _truncate), needle="sha256"),
    Case("verify-artifact-missing", lambda c: _verify_copy(c, lambda b: _first_artifact(b).unlink())),
    Case("verify-artifact-path-escapes", lambda c: _verify_copy(c, _manifest_edit(
        lambda m: m["artifacts"][0].update(path="../../../etc/passwd"))), needle="passwd"),
    Case("verify-golden-missing", _argv("verify", "{proj}/build/cpu", "--golden", "{dir}/nope"), needle="nope"),
    Case("verify-golden-corrupt", lambda c: _verify_copy(
        c, lambda b: next((b / "golden").glob("*.npz")).write_bytes(b"PK\x03\x04 broken"))),
    Case("verify-golden-json-a-list", lambda c: _verify_copy(
        c, lambda b: (b / "golden" / "golden.json").write_text("[]")), needle="golden.json"),
    Case("verify-golden-other-teacher", _other_teacher_golden, needle="teacher"),
    Case("verify-gate-bad", _argv("verify", "{proj}/build/cpu", "--gate", "agreement>>1"), needle="agreement>>1"),
    Case("verify-gate-unknown-metric", _argv("verify", "{proj}/build/cpu", "--gate", "happiness>=1"), needle="happiness"),
    Case("verify-junit-under-a-file", _argv("verify", "{proj}/build/cpu", "--junit", "{proj}/edgec.toml/x.xml"),
         needle="edgec.toml"),
    Case("bench-folder-missing", _argv("bench", "{dir}/nope", "--runs", "1"), needle="nope"),
    Case("bench-teacher-config-missing", _argv("bench", "{proj}/build/cpu", "--runs", "1", "--teacher", "{dir}/no.toml"),
         needle="no.toml"),
    Case("bench-teacher-config-without-model", lambda c: ["bench", str(c.proj / "build" / "cpu"), "--runs", "1",
                                                         "--teacher", str(_write(c.dir / "t.toml", "version = 1\n"))],
         needle="[model]"),
    Case("report-verify-json-damaged", lambda c: ["report", str(_with_file(c, "verify.json", "{")),
                                                  "--html", str(c.dir / "r.html")], needle="verify.json"),
    Case("report-verify-json-wrong-shape", lambda c: ["report", str(_with_file(c, "verify.json", '{"results": 3}')),
                                                      "--html", str(c.dir / "r.html")], needle="verify.json"),
    Case("report-bench-json-damaged", lambda c: ["report", str(_with_file(c, "bench.json", "[1, 2]")),
                                                 "--html", str(c.dir / "r.html")], needle="bench.json"),
    Case("report-folder-missing", _argv("report", "{dir}/nope", "--html", "{dir}/r.html"), needle="nope"),
    Case("report-not-verified", lambda c: ["report", str(_unverified(c)), "--html", str(c.dir / "r.html")],
         needle="verified"),
    # --- init
    Case("init-model-missing", _argv("init", "{dir}/p", "--model", "/nonexistent/model"), needle="/nonexistent/model"),
    Case("init-exists", lambda c: ["init", str(c.folder("p", {"edgec.toml": b"version = 1\n"}))], needle="--force"),
    Case("init-dir-is-a-file", lambda c: ["init", str(c.folder("p", {"f": b""}) / "f")], needle="not a folder"),
    # --- the environment
    Case("build-read-only", _read_only_build, needle="read-only", needs="mount-or-user"),
    Case("disk-full", _full_disk, needle="space", needs="mount"),
    Case("log-file-is-a-folder", _argv("verify", "{dir}/nope"), env=lambda c: {"EDGEC_LOG": str(c.dir)}, needle="nope"),
    Case("compile-out-is-a-file", lambda c: [*COMPILE, "--config", str(c.proj / "edgec.toml"), "--out",
                                            str(c.folder("o", {"f": b""}) / "f")], needle="f"),
]


def _with_file(c: Ctx, name: str, text: str) -> Path:
    """A verified copy of the cpu target with ``name`` replaced by ``text``."""
    build = c.local_build("golden", "cpu")
    (build / "cpu" / name).write_text(text)
    return build / "cpu"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated_teacher(c: Ctx) -> Path:
    teacher = c.dir / "teacher"
    shutil.copytree(c.proj / "teacher", teacher)
    w = teacher / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return teacher


def _unverified(c: Ctx) -> Path:
    build = c.local_build("golden", "cpu")
    (build / "cpu" / "verify.json").unlink(missing_ok=True)
    return build / "cpu"


def test_the_battery_is_big_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, project: Path, tmp_path: Path):
    if case.needs == "mount" and not _can_mount():
        pytest.skip("needs root with tmpfs mounts (CI runs as root)")
    if case.needs == "mount-or-user" and os.geteuid() == 0 and not _can_mount():
        pytest.skip("as root a read-only folder needs a read-only mount, which this machine refuses")
    ctx = Ctx(project, tmp_path / "case")
    ctx.dir.mkdir()
    try:
        argv = case.setup(ctx)
        env = case.env(ctx) if case.env else {}
        roots = [project, ctx.dir]
        before = fingerprint(*roots)
        proc = edgec(argv, cwd=ctx.dir, env=env)
        after = fingerprint(*roots)
    finally:
        mount = getattr(ctx, "_mount", None)
        if mount is not None:
            mount.__exit__(None, None, None)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    shown = f"argv {argv}\nexit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    assert proc.returncode == case.code, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert case.needle.lower() in lines[0].lower(), shown
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{shown}\nchanged or new: {changed[:10]}"
    assert not (ctx.dir / "PWNED").exists(), "a pickle's code ran"


def test_traceback_flag_keeps_the_exit_code(project: Path, tmp_path: Path):
    proc = edgec(["--traceback", "verify", str(tmp_path / "nope")], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_a_broken_step_summary_path_does_not_change_the_verdict(project: Path, tmp_path: Path):
    """$GITHUB_STEP_SUMMARY is the CI's convenience: a folder there is logged, verify still passes."""
    ctx = Ctx(project, tmp_path / "case")
    ctx.dir.mkdir()
    argv = _verify_copy(ctx, lambda b: None)
    proc = edgec(argv, cwd=ctx.dir, env={"GITHUB_STEP_SUMMARY": str(ctx.dir)})
    assert proc.returncode == 0 and "cpu: passed" in proc.stdout and not proc.stderr, proc.stderr
    assert "GITHUB_STEP_SUMMARY" in (tmp_path / "edgec-battery.log").read_text()
