"""edgec release: golden -> distill -> compile -> verify for every configured target, one record for CI.

``run(ReleaseConfig) -> ReleaseOutputs``. Each stage is keyed by the hash of its inputs and reused
when they are unchanged (golden: teacher, eval folder, prompts; distill: see
:mod:`edgec.distill.stage`; compile: :func:`edgec.compile.cache_key`; verify: the artifacts' sha256,
the golden set, the gates and the runtime versions), so a changed config key re-runs exactly the
stages downstream of it. Quantize is the stage compile consumes (:mod:`edgec.quantize.stage`: the
target's own int8 program with the configured method and, with a tolerance, its float layers); it is
listed per target with its own status. Decisions that depend on timing or search come from
``edgec.lock`` beside the config (``reselect``: decide again; ``locked``: fail instead of changing it).

Interrupts: every stage writes through :func:`edgec.manifest.staged_dir` or atomic file writes, the
distill stage trains beside the current student and swaps it in when finished, and the whole run
holds the build folder's lock (:mod:`edgec.lock`). Leftovers of a killed run (``.*.partial``
folders, ``.*.tmp`` files, a ``.X.old`` folder whose replacement never landed) are cleaned up or
restored when the next run takes the lock. ``release.json`` is written last, also when a gate
fails (then ``passed`` is false and the CLI exits 1).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .config import EdgecConfig, load_config
from .errors import EXIT_GATE_FAILED, EdgecError, GateFailed, InputError
from .lock import DECISIONS_FILE
from .manifest import (atomic_write_json, atomic_write_text, package_versions, read_json, sha256_file, sha256_json,
                       sha256_path)

SCHEMA = 1
RELEASE_JSON = "release.json"
RELEASE_JUNIT = "release.junit.xml"
RELEASE_MD = "release.md"
VERIFY_JSON = "verify.json"
TOOL_PACKAGES = ("numpy", "torch", "timm", "onnx", "onnxruntime", "litert-torch", "ai-edge-quantizer", "ai-edge-litert",
                 "executorch", "torchao", "coremltools")
RUNTIME_PACKAGES = ("onnxruntime", "ai-edge-litert", "executorch")
NOT_VERIFY_INPUTS = ("manifest.json", VERIFY_JSON, "bench.json")  # written into a target folder after compile


@dataclass(frozen=True)
class ReleaseConfig:
    config: Path = Path("edgec.toml")
    targets: tuple[str, ...] = ()  # empty: [targets] build
    wait: bool = False  # wait for another run's lock instead of refusing
    wait_timeout: float | None = None
    progress: bool = False  # distillation progress bar
    reselect: bool = False  # decide again what edgec.lock holds (fastest precision, fallback layers)
    locked: bool = False  # CI: fail (exit 2) instead of changing edgec.lock
    version: int = 1


@dataclass
class ReleaseOutputs:
    paths: dict[str, Path]  # release_json, junit, markdown
    manifest: dict

    @property
    def passed(self) -> bool:
        return bool(self.manifest["passed"])

    @property
    def exit_code(self) -> int:
        return int(self.manifest["exit_code"])


@dataclass
class _Stage:
    stage: str
    name: str
    key: str | None
    status: str  # cached | ran | resumed | failed
    seconds: float
    out: str | None = None
    error: str | None = None
    exit_code: int | None = None  # of a failed stage: 1 a gate, 2 bad input, 3 a missing toolchain
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        d = {"stage": self.stage, "name": self.name, "status": self.status, "key": self.key,
             "seconds": round(self.seconds, 2), "out": self.out}
        if self.error:
            d.update(error=self.error, exit_code=self.exit_code)
        return d

    @classmethod
    def failed(cls, stage: str, name: str, t0: float, out: Path, exc: EdgecError, log) -> _Stage:
        log(f"{name}: {stage} FAILED: {exc}")
        return cls(stage, name, None, "failed", time.time() - t0, str(out), error=str(exc), exit_code=exc.exit_code)




_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial$")  # staged_dir's temporary folders (mkdtemp)
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write_bytes's temporary files (mkstemp)
_DEPTH = 3  # build/distill/<student>/last is the deepest staged folder


def recover(build: Path, log=print) -> list[str]:
    """Undo what a killed run left behind (call with the lock held): restore a ``.X.old`` folder whose
    replacement never landed, remove ``.*.partial`` folders and ``.*.tmp`` files (only the names edgec's
    staged writes use, at most three levels below the build folder). Returns what was done."""
    done = []
    if not build.is_dir():
        return done
    for root, dirs, files in os.walk(build):
        here = Path(root)
        if len(here.relative_to(build).parts) >= _DEPTH:
            dirs.clear()
        for d in list(dirs):
            p = here / d
            if d.startswith(".") and d.endswith(".old") and len(d) > 5:
                final = here / d[1:-4]
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, final)
                    done.append(f"restored {final} (its replacement was interrupted)")
                dirs.remove(d)
            elif _PARTIAL.match(d):
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p} (half-written by an interrupted run)")
                dirs.remove(d)
        for f in files:
            if _TMP.match(f):
                (here / f).unlink(missing_ok=True)
                done.append(f"removed {here / f} (half-written by an interrupted run)")
    for line in done:
        log(line)
    return done


# ---------------------------------------------------------------- golden


def _golden_stage(cfg: EdgecConfig, build: Path, memo: dict, log) -> _Stage:
    from .distill.data import source_identity
    from .distill.stage import describe_change, tree_sha
    from .verify.golden import GOLDEN_JSON, GOLDEN_NPZ, GoldenConfig, build_golden

    t0 = time.time()
    out = build / "golden"
    gcfg = GoldenConfig.from_edgec(cfg, out=out)
    inputs = {"teacher": source_identity(gcfg.teacher.path), "eval": tree_sha(gcfg.eval, memo), "prompts": list(gcfg.prompts),
              "captions_file": gcfg.captions_file, "max_bad_fraction": gcfg.max_bad_fraction}
    key = sha256_json(inputs)
    meta = read_json(out / GOLDEN_JSON)
    if meta is not None:
        try:
            same = (meta["teacher"]["sha256"] == inputs["teacher"] and meta["eval"]["sha256"] == inputs["eval"]
                    and meta["prompts"] == inputs["prompts"] and (out / GOLDEN_NPZ).is_file()
                    # recorded since golden schema 1 gained them; older sets were made with the defaults
                    and meta.get("captions_file", "captions.jsonl") == inputs["captions_file"]
                    and meta.get("max_bad_fraction", 0.05) == inputs["max_bad_fraction"]
                    and sha256_file(out / GOLDEN_NPZ) == meta["npz_sha256"]
                    and _images_intact(out, meta))
        except (KeyError, TypeError):
            same = False
        if same:
            log("golden: from cache")
            return _Stage("golden", "golden", key, "cached", time.time() - t0, str(out), extra={"meta": meta})
    why = ""
    if isinstance(meta, dict):
        recorded = {"teacher": (meta.get("teacher") or {}).get("sha256"), "eval": (meta.get("eval") or {}).get("sha256"),
                    "prompts": meta.get("prompts"), "captions_file": meta.get("captions_file", "captions.jsonl"),
                    "max_bad_fraction": meta.get("max_bad_fraction", 0.05)}
        change = describe_change(recorded, inputs)
        why = f" ({change})" if change != "inputs changed" else " (its files are missing or changed)"
    log("golden: computing the teacher's outputs on the eval set" + why)
    build_golden(gcfg, log=log)
    return _Stage("golden", "golden", key, "ran", time.time() - t0, str(out), extra={"meta": read_json(out / GOLDEN_JSON)})


def _images_intact(out: Path, meta: dict) -> bool:
    """The golden images file the set records (``images.npy``) is there with its sha256; older sets keep their
    images inside golden.npz and record none."""
    from .verify.golden import GOLDEN_IMAGES

    if meta.get("images_file") is None:
        return True
    path = out / GOLDEN_IMAGES  # the one name golden writes (the record's own text is not followed)
    return meta.get("images_file") == GOLDEN_IMAGES and path.is_file() and sha256_file(path) == meta.get("images_sha256")


# ---------------------------------------------------------------- verify


def _verify_key(folder: Path, manifest: dict, golden_meta: dict, gates: list[str]) -> str:
    """What a verification depends on: every file of the target folder (artifacts, head and tokenizer
    files) and what the manifest says about them, the golden set, the gates, the runtimes' versions."""
    files = [(f["path"], f["sha256"]) for f in _files(folder) if f["path"] not in NOT_VERIFY_INPUTS]
    described = {k: manifest.get(k) for k in ("artifacts", "inputs", "outputs", "head", "towers")}
    return sha256_json({"files": files, "manifest": described, "golden": golden_meta.get("npz_sha256"), "gates": gates,
                  "versions": package_versions(*RUNTIME_PACKAGES)})


class _no_step_summary:
    """verify() appends to $GITHUB_STEP_SUMMARY per target; release writes one summary for all."""

    def __enter__(self):
        self.saved = os.environ.pop("GITHUB_STEP_SUMMARY", None)

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ["GITHUB_STEP_SUMMARY"] = self.saved


def _verify_stage(target: str, folder: Path, golden: Path, golden_meta: dict, gates: list[str], log) -> tuple[_Stage, dict]:
    from .manifest import read_manifest
    from .verify.run import verify

    t0 = time.time()
    manifest = read_manifest(folder)
    key = _verify_key(folder, manifest, golden_meta, gates)
    report = read_json(folder / VERIFY_JSON)
    if report is not None and report.get("cache_key") == key and report.get("results"):
        status = "cached"
    else:
        status = "ran"
        with _no_step_summary():
            try:
                verify(folder, golden, gates)
            except GateFailed:
                pass  # verify.json holds the failures; release reports them and exits 1
        report = read_json(folder / VERIFY_JSON)
        report["cache_key"] = key
        atomic_write_json(folder / VERIFY_JSON, report)
    shown = []
    for r in report["results"]:
        m = r["metrics"]
        shown.append(", ".join(f"{k} {m[k]:.4f}" for k in ("agreement", "cosine_mean", "accuracy_delta") if k in m))
    failed = [f"{g['gate']} ({g['metric']} = {'n/a' if g['value'] is None else format(g['value'], '.4f')})"
              for r in report["results"] for g in r["gates"] if not g["passed"]]
    verdict = "passed" if report["passed"] else "FAILED " + "; ".join(failed) + ";"
    log(f"verify {target}: {verdict} {' | '.join(shown)}" + (" (from cache)" if status == "cached" else ""))
    return _Stage("verify", target, key, status, time.time() - t0, str(folder / VERIFY_JSON)), report


# ---------------------------------------------------------------- records


def _files(folder: Path) -> list[dict]:
    return [{"path": p.relative_to(folder).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def _target_record(target: str, folder: Path, compile_stage: _Stage, verify_stage: _Stage | None,
                   report: dict | None) -> dict:
    from .manifest import read_manifest

    rec: dict = {"path": str(folder), "compile": compile_stage.record(), "verify": verify_stage.record() if verify_stage else None}
    broken = next((s for s in (compile_stage, verify_stage) if s is not None and s.status == "failed"), None)
    if broken is not None:
        rec.update(passed=False, exit_code=broken.exit_code, failures=[f"{broken.stage}: {broken.error}"], artifacts=[],
                   files=[], gates=[], metrics={})
        return rec
    manifest = read_manifest(folder)
    rec["artifacts"] = [{k: a.get(k) for k in ("path", "sha256", "bytes", "format", "runtime", "precision")}
                        for a in manifest["artifacts"]]
    rec["variants"] = manifest.get("variants")  # e.g. ios: a Core ML .pte beside the verified one
    rec["files"] = _files(folder)
    rec["sources"] = manifest.get("sources")
    rec["versions"] = manifest.get("versions")
    rec["selection"] = {k: manifest.get("selection", {}).get(k) for k in ("policy", "chosen", "decided_by")} \
        if manifest.get("selection") else None
    q = manifest.get("quantization")
    rec["quantization"] = None if q is None else {
        "method": q.get("method"), "calibration_sha256": q.get("calibration_sha256"), "shipped": q.get("shipped"),
        "tolerance": q.get("tolerance"), "float_layers": [la.get("name") for la in q.get("float_layers", [])]}
    rec["metrics"] = {r["artifact"]: r["metrics"] for r in report["results"]}
    rec["gates"] = [dict(g, artifact=r["artifact"]) for r in report["results"] for g in r["gates"]]
    rec["passed"] = bool(report["passed"])
    rec["exit_code"] = 0 if rec["passed"] else EXIT_GATE_FAILED
    rec["failures"] = [f"{g['artifact']}: {g['gate']} ({g['metric']} = {g['value']})" for g in rec["gates"] if not g["passed"]]
    return rec


def to_junit(release: dict) -> str:
    """One <testsuite> per target: a case per stage that stopped (a gate: failure; an error: error) and
    per gate of each artifact (edgec.verify.junit)."""
    from .verify.junit import Case, Suite, gate_case, testsuites_xml

    suites = []
    for target, rec in release["targets"].items():
        cases = []
        t = (rec.get("verify") or {}).get("seconds", 0)
        for stage in ("compile", "verify"):
            st = rec.get(stage)
            if st and st["status"] == "failed":  # a gate decided it (failure) or an error stopped it (error)
                case = Case(f"{target}: {stage}", f"edgec.release.{target}", st.get("seconds") or 0.0)
                if st.get("exit_code") == EXIT_GATE_FAILED:
                    case.failure = st.get("error") or "a gate failed"
                else:
                    case.error = st.get("error") or "stopped"
                    case.error_type = {2: "bad input", 3: "missing toolchain"}.get(st.get("exit_code"), "error")
                cases.append(case)
        cases += [gate_case(f"edgec.release.{target}", target, g["artifact"], g, t) for g in rec.get("gates", [])]
        suites.append(Suite(f"edgec release {target}", cases))
    return testsuites_xml(suites, package="edgec.release")


def to_markdown(release: dict) -> str:
    status = "passed" if release["passed"] else "FAILED"
    lines = [f"### edgec release: {status}", "",
             "| target | result | artifact | MB | agreement | cosine mean | accuracy Δ | stages |", "|---|---|---|---|---|---|---|---|"]
    for target, rec in release["targets"].items():
        stages = f"compile {rec['compile']['status']}" + (f", verify {rec['verify']['status']}" if rec.get("verify") else "")
        if not rec["artifacts"]:
            lines.append(f"| {target} | ❌ | - | - | - | - | - | {stages} |")
            continue
        for a in rec["artifacts"]:
            m = rec["metrics"].get(a["path"], {})
            shown = " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in ("agreement", "cosine_mean", "accuracy_delta"))
            lines.append(f"| {target} | {'✅' if rec['passed'] else '❌'} | {a['path']} | {a['bytes'] / 1e6:.2f} | "
                         f"{shown} | {stages} |")
    failures = [f"- {t}: {f}" for t, rec in release["targets"].items() for f in rec["failures"]]
    if failures:
        lines += ["", "Failed:", *failures]
    g = release["golden"]
    cached = sum(s["status"] == "cached" for s in release["stages"])
    lines += ["", (f"Golden set: {g.get('images')} images, computed on {g.get('device')}. "
                  f"{cached} of {len(release['stages'])} stages reused from cache; {release['seconds']:.1f} s.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- run


def run(config: ReleaseConfig, *, log=print) -> ReleaseOutputs:
    """Every stage for every target (cached by inputs), then release.json / .junit.xml / .md in the build folder."""
    from .compile import compile_from_config
    from .distill import DistillConfig
    from .distill.stage import ensure_student, tree_sha
    from .lock import build_lock

    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cfg = load_config(config.config)
    targets = list(config.targets) or list(cfg.targets.build)
    if not targets:
        raise InputError(f"{config.config}: [targets] build is empty", hint="list targets there or pass --targets")
    for t in targets:
        registry.get("targets", t)  # unknown names fail before any work, with a did-you-mean
    build = cfg.resolve(cfg.targets.out)
    memo: dict = {}
    with build_lock(build, "edgec release", wait=config.wait, timeout=config.wait_timeout, log=log):
        recover(build, log)
        golden = _golden_stage(cfg, build, memo, log)
        stages = [golden]

        students = {}
        for t in targets:
            dcfg = DistillConfig.from_edgec(cfg, target=t)
            if dcfg.student in students:
                continue
            s = ensure_student(dcfg, progress=config.progress, log=log, memo=memo)
            students[dcfg.student] = s
            status = "cached" if s.cached else "ran" if s.status == "trained" else s.status  # adopted counts as cached
            stages.append(_Stage("distill", dcfg.student, s.key, status, s.seconds, str(s.out)))

        records, device = {}, cfg.targets.device
        for t in targets:
            name = DistillConfig.from_edgec(cfg, target=t).student
            t1 = time.time()
            folder = build / t
            # a [targets] device profile applies to its own target only
            tcfg = cfg if device is None or registry.get("devices", device).spec.target == t else dataclasses.replace(
                cfg, targets=dataclasses.replace(cfg.targets, device=None))
            try:
                res = compile_from_config(tcfg, t, config_path=Path(config.config), progress=config.progress, log=log,
                                          student_dir=students[name].student, reselect=config.reselect,
                                          locked=config.locked)
                q = res.manifest.get("quantization")
                if q is not None:  # the quantize stage compile consumed (cached when compile was, or its folder was)
                    stages.append(_Stage("quantize", t, q.get("key"),
                                         "cached" if res.cached else q.get("status", "ran"), q.get("seconds") or 0.0,
                                         str(build / "quantized" / t)))
                cstage = _Stage("compile", t, res.manifest["build"].get("cache_key"), "cached" if res.cached else "ran",
                                time.time() - t1, str(res.out))
            except EdgecError as exc:  # recorded; the other targets still run and release.json is still written
                cstage = _Stage.failed("compile", t, t1, folder, exc, log)
            stages.append(cstage)
            vstage = report = None
            if cstage.status != "failed":
                gates = cfg.gates_for(t, list(registry.get("targets", t).spec.gates))
                t2 = time.time()
                try:
                    vstage, report = _verify_stage(t, folder, build / "golden", golden.extra["meta"], gates, log)
                except EdgecError as exc:  # e.g. the artifact's runtime is not installed here
                    vstage = _Stage.failed("verify", t, t2, folder / VERIFY_JSON, exc, log)
                stages.append(vstage)
            records[t] = _target_record(t, folder, cstage, vstage, report)

        gmeta = golden.extra["meta"] or {}
        config_path = Path(config.config)
        calib = cfg.resolve(cfg.calibration.path)
        release = {
            "schema": SCHEMA,
            "passed": all(r["passed"] for r in records.values()),
            # the first failed target's code: 1 a gate, 2 bad input, 3 a missing toolchain
            "exit_code": next((r["exit_code"] for r in records.values() if not r["passed"]), 0),
            "started": started,
            "seconds": round(time.time() - t0, 2),
            "config": str(config_path.resolve()),
            "build": str(build),
            "targets": records,
            "golden": {"path": str(build / "golden"), "key": golden.key, "device": gmeta.get("device"),
                       "images": (gmeta.get("eval") or {}).get("images"), "npz_sha256": gmeta.get("npz_sha256")},
            "students": {n: {"path": str(s.student), "key": s.key, "status": s.status,
                             "weights_sha256": read_json(s.student / "edgec_student.json").get("weights_sha256"),
                             "metrics": s.manifest.get("metrics")} for n, s in students.items()},
            "stages": [s.record() for s in stages],
            "lock": str(config_path.resolve().parent / DECISIONS_FILE),
            "sources": {
                "config": sha256_file(config_path) if config_path.is_file() else None,
                "teacher": golden.extra["meta"]["teacher"]["sha256"] if golden.extra["meta"] else None,
                "train": tree_sha(cfg.resolve(cfg.data.train), memo) if cfg.data.train else None,
                "eval": tree_sha(cfg.resolve(cfg.data.eval), memo),
                "calibration": sha256_path(calib) if calib is not None and calib.exists() else None,
            },
            "versions": {**package_versions(*TOOL_PACKAGES), "python": platform.python_version()},
        }
        paths = {"release_json": build / RELEASE_JSON, "junit": build / RELEASE_JUNIT, "markdown": build / RELEASE_MD}
        md = to_markdown(release)
        atomic_write_text(paths["junit"], to_junit(release))
        atomic_write_text(paths["markdown"], md)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(md + "\n")
        atomic_write_json(paths["release_json"], release)  # last: its presence means the release finished
    cached = sum(s.status == "cached" for s in stages)
    log(f"release: {'passed' if release['passed'] else 'FAILED'} ({len(targets)} target(s), {cached} of {len(stages)} "
        f"stages from cache, {release['seconds']:.1f} s); wrote {paths['release_json']}, {paths['junit'].name}, "
        f"{paths['markdown'].name}")
    return ReleaseOutputs(paths, release)


__all__ = ["ReleaseConfig", "ReleaseOutputs", "recover", "run", "to_junit", "to_markdown"]
