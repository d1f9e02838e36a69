"""Verification bundles: everything a device needs to run ``edgec verify`` on a target, in one file.

A bundle holds the target folder (artifacts, manifest, head and tokenizer files), the golden
inputs and teacher outputs it is checked against (all, or ``images`` of them chosen evenly
across labels), the requirements of the device (edgec's base install and the artifact's
runtime), the edgec wheel for an install there, and the metrics the host computed on exactly
those inputs. Its id is the sha256 of what is verified (target files and golden subset), so the
same build gives the same id and, as a ``.tar.gz``, the same bytes.

``verify_bundle`` checks every file against ``bundle.json``, verifies a scratch copy (the bundle
itself is never written into) and writes the report beside the bundle, with the machine it ran
on and how its metrics compare with the host's. Reading a bundle needs numpy and the runtime only.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import EdgecError, GateFailed, InputError
from ..manifest import atomic_write_bytes, atomic_write_json, read_json, sha256_file, sha256_json
from ..verify.golden import GOLDEN_JSON, GOLDEN_NPZ

BUNDLE_JSON = "bundle.json"
SCHEMA = 1
TAR_SUFFIXES = (".tar.gz", ".tgz")
GOLDEN = "golden"
WHEEL_DIR = "wheel"
# files of a target folder that are results of running it, not part of it
_NOT_SHIPPED = ("verify.json", "bench.json", "verify.device.json")
# what each runtime needs beyond edgec's base install (numpy, onnxruntime, ai-edge-litert, typer, rich, pillow)
RUNTIME_REQUIREMENTS = {
    "onnxruntime": [],
    "tensorrt": ["# TensorRT: onnxruntime-gpu built with the TensorRT execution provider (on a Jetson, NVIDIA's wheel "
                 "for your JetPack) runs the Q/DQ model in TensorRT; without it the base onnxruntime runs it on the CPU"],
    "litert": ["# Coral boards: tflite-runtime and libedgetpu1-std (Coral's Debian repository) instead of ai-edge-litert "
               "run *_edgetpu.tflite on the Edge TPU"],
    "executorch": ["executorch"],
}


@dataclass
class BundleResult:
    path: Path  # the .tar.gz or the folder
    record: dict  # bundle.json


# ---------------------------------------------------------------------------------------------- building


def stratified(label_ids: np.ndarray, n: int | None) -> np.ndarray:
    """``n`` indices spread as evenly over the labels as their counts allow (round-robin over labels, evenly spaced
    within each), sorted; all indices when ``n`` is None or not smaller than the set."""
    total = len(label_ids)
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise InputError(f"--images must be at least 1, not {n}")
    groups = [np.flatnonzero(label_ids == lab) for lab in np.unique(label_ids)]
    quota = [0] * len(groups)
    left = n
    while left:
        for g, members in enumerate(groups):
            if left and quota[g] < len(members):
                quota[g] += 1
                left -= 1
    picked = [members[(np.arange(q) * len(members)) // q] for members, q in zip(groups, quota) if q]
    return np.sort(np.concatenate(picked))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend only on the arrays (fixed member order and timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def write_golden_subset(golden_dir: Path, out: Path, images: int | None) -> dict:
    """The golden set restricted to ``images`` images chosen by :func:`stratified`, written to ``out``."""
    from ..verify.golden import load_golden

    golden = load_golden(golden_dir)  # checks the hashes before anything is copied
    meta = json.loads((golden_dir / GOLDEN_JSON).read_text(encoding="utf-8"))
    with np.load(golden_dir / GOLDEN_NPZ, allow_pickle=False) as z:  # as stored (the loader widens some dtypes)
        arrays = {k: z[k] for k in z.files}
    total = len(golden.images)
    keep = stratified(arrays["label_ids"], images)
    arrays["images"] = np.asarray(golden.images[keep])  # inside golden.npz, which every golden reader takes
    for key in ("image_embeddings", "label_ids"):
        arrays[key] = arrays[key][keep]
    if "caption_owner" in arrays:  # captions of the kept images, their owners renumbered
        rows = np.flatnonzero(np.isin(arrays["caption_owner"], keep))
        remap = {int(old): new for new, old in enumerate(keep)}
        arrays["caption_embeddings"] = arrays["caption_embeddings"][rows]
        arrays["caption_owner"] = np.asarray([remap[int(o)] for o in arrays["caption_owner"][rows]], np.int32)
    data = npz_bytes(arrays)
    atomic_write_bytes(out / GOLDEN_NPZ, data)
    meta = {k: v for k, v in meta.items() if k not in ("images_file", "images_sha256")}
    for key in ("files", "captions"):
        if meta.get(key) is not None:
            meta[key] = [meta[key][i] for i in keep]
    meta["eval"] = dict(meta.get("eval") or {}, images=len(keep))
    meta["npz_sha256"] = sha256_file(out / GOLDEN_NPZ)
    meta["subset"] = {"images": len(keep), "of": total, "rule": "evenly across labels", "indices": keep.tolist()}
    atomic_write_json(out / GOLDEN_JSON, meta)
    return meta["subset"]


def requirements(manifest: dict) -> list[str]:
    """The device's requirements: this edgec's base install and what each artifact's runtime needs beyond it."""
    lines = [f"edgec=={__version__}"]
    for runtime in sorted({a["runtime"] for a in manifest["artifacts"]}):
        lines += [r for r in RUNTIME_REQUIREMENTS.get(runtime, [f"# runtime {runtime}: install it on the device"])
                  if r not in lines]
    return lines


def source_tree() -> Path | None:
    """The edgec source checkout this edgec runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "edgec" / "__init__.py").is_file() else None


def build_wheel(dest: Path) -> Path | None:
    """The edgec wheel for a device install: built from the source checkout (pip wheel), None when there is none."""
    root = source_tree()
    if root is None:
        return None
    with tempfile.TemporaryDirectory(prefix="edgec-wheel-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(root)],
                              capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("edgec-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise InputError(f"could not build the edgec wheel from {root}: {last[:200]}",
                             hint="pass --no-wheel (the device then needs 'pip install edgec' itself)")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], dest / wheels[0].name))


def _target_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                  p.relative_to(folder).parts) and p.name not in _NOT_SHIPPED)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != BUNDLE_JSON}


def make_bundle(folder: str | Path, *, golden: str | Path | None = None, out: str | Path | None = None,
                images: int | None = None, wheel: bool = True, host_check: bool = True, threads: int | None = None,
                log=print) -> BundleResult:
    """Write the verification bundle of target ``folder``: a ``.tar.gz`` (default ``<folder>/../bundles/``) or, when
    ``out`` does not end in .tar.gz/.tgz, a folder."""
    from ..manifest import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    target = manifest.get("target") or folder.name
    golden_dir = Path(golden) if golden else folder.parent / "golden"
    parent = Path(out).parent if out else folder.parent / "bundles"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgec-bundle-", dir=parent) as tmp:
        stage = Path(tmp) / "bundle"
        log(f"bundle: copying {folder} and the golden set {golden_dir}")
        for p in _target_files(folder):
            dst = stage / target / p.relative_to(folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        subset = write_golden_subset(golden_dir, stage / GOLDEN, images)
        log(f"bundle: {subset['images']} of {subset['of']} golden images ({subset['rule']})")
        from .phone import add_phone_checks

        phone = add_phone_checks(stage, target, log=log)
        reqs = requirements(manifest)
        (stage / "requirements.txt").write_text("\n".join(reqs) + "\n", encoding="utf-8")
        payload = {k: v for k, v in file_hashes(stage).items() if k.startswith((f"{target}/", f"{GOLDEN}/"))}
        bundle_id = sha256_json(payload)
        wheel_name = None
        if wheel:
            log("bundle: building the edgec wheel for a device install")
            built = build_wheel(stage / WHEEL_DIR)
            wheel_name = f"{WHEEL_DIR}/{built.name}" if built else None
            if built is None:
                log("bundle: edgec is not running from a source checkout: no wheel in the bundle (--install needs one)")
        from .identity import machine_identity

        record = {"schema": SCHEMA, "id": bundle_id, "target": target, "edgec": __version__,
                  "artifacts": [{k: a.get(k) for k in ("path", "runtime", "precision", "sha256")} for a in manifest["artifacts"]],
                  "images": subset, "requirements": reqs, "wheel": wheel_name, "phone": phone,
                  "host": {"machine": machine_identity(), "results": None, "not_run": None},
                  "files": file_hashes(stage)}
        atomic_write_json(stage / BUNDLE_JSON, record)
        if host_check:
            log("bundle: verifying the bundle on this machine (the device must reproduce these metrics)")
            try:
                with opened(stage) as scratch:  # verify writes into the folder it checks: never into the bundle
                    try:
                        report = _verify_staged(scratch, threads=threads)
                    except GateFailed:
                        report = read_json(_scratch_report(scratch))
                record["host"]["results"] = [{"artifact": r["artifact"], "executed_by": r["executed_by"],
                                              "metrics": r["metrics"]} for r in report["results"]]
            except EdgecError as exc:  # e.g. the runtime is not installed here: the device's figures stand alone
                record["host"]["not_run"] = str(exc)
            atomic_write_json(stage / BUNDLE_JSON, record)
        name = f"edgec-bundle-{target}-{bundle_id[:12]}"
        dest = Path(out) if out else parent / f"{name}.tar.gz"
        if dest.name.endswith(TAR_SUFFIXES):
            atomic_write_bytes(dest, tar_bytes(stage, name))
        else:
            from ..manifest import replace_dir

            replace_dir(stage, dest)
    log(f"bundle: wrote {dest} (id {bundle_id[:12]})")
    return BundleResult(dest, record)


def tar_bytes(root: Path, top: str) -> bytes:
    """A gzip'd tar of ``root`` under ``top/`` whose bytes depend only on the files (sorted, no times or owners)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = p.stat().st_size, 0o755 if p.stat().st_mode & 0o111 else 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    out = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- verifying


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return path.name.endswith(TAR_SUFFIXES) or (path.is_dir() and (path / BUNDLE_JSON).is_file())


def default_report(bundle: Path) -> Path:
    """Where the device report of a bundle goes: ``<bundle>/verify.json``, or ``<name>.verify.json`` beside a .tar.gz."""
    if bundle.is_dir():
        return bundle / "verify.json"
    name = bundle.name
    for suffix in TAR_SUFFIXES:
        name = name.removesuffix(suffix)
    return bundle.with_name(f"{name}.verify.json")


@contextlib.contextmanager
def opened(bundle: Path) -> Iterator[Path]:
    """A scratch copy of the bundle's contents (extracted from a .tar.gz), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="edgec-verify-bundle-") as tmp:
        root = Path(tmp) / "bundle"
        if bundle.is_dir():
            shutil.copytree(bundle, root)
        else:
            _safe_extract(bundle, root)
        yield root


def _safe_extract(path: Path, root: Path) -> None:
    """Extract a bundle .tar.gz: regular files and folders below one top folder only (bundles arrive from elsewhere)."""
    if not path.is_file():
        raise InputError(f"no bundle at {path}", hint="write one with 'edgec bundle build/<target>'")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            tops = {m.name.split("/", 1)[0] for m in members}
            for m in members:
                parts = Path(m.name).parts
                if len(tops) != 1 or m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise InputError(f"{path} is not an edgec bundle (member {m.name!r})",
                                     hint="write one with 'edgec bundle build/<target>'")
            root.mkdir(parents=True)
            for m in members:
                dst = root.joinpath(*Path(m.name).parts[1:])
                if m.isdir():
                    dst.mkdir(parents=True, exist_ok=True)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with open(dst, "wb") as f:
                    shutil.copyfileobj(src, f)
                dst.chmod(0o755 if m.mode & 0o111 else 0o644)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise InputError(f"{path} cannot be read as a .tar.gz ({exc})",
                         hint="the file is truncated or corrupt; copy the bundle again") from None


def zlib_error():
    import zlib

    return zlib.error


def read_record(root: Path, where: Path) -> dict:
    """bundle.json, with every file it lists present and matching its sha256."""
    record = read_json(root / BUNDLE_JSON)
    if not isinstance(record, dict) or "files" not in record:
        raise InputError(f"{where} has no valid {BUNDLE_JSON}", hint="write the bundle again with 'edgec bundle'")
    if record.get("schema") != SCHEMA:
        raise InputError(f"{where} is a bundle of schema {record.get('schema')}, this edgec reads schema {SCHEMA}",
                         hint=f"install the edgec that wrote it (edgec=={record.get('edgec')})")
    for rel, digest in record["files"].items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            raise InputError(f"{where}: {rel} is missing or does not match its sha256 in {BUNDLE_JSON}",
                             hint="the bundle was altered or truncated; copy it again")
    return record


def _scratch_report(root: Path) -> Path:
    record = read_json(root / BUNDLE_JSON) or {}
    return root / str(record.get("target")) / "verify.json"


def _verify_staged(root: Path, *, gates: list[str] | None = None, threads: int | None = None) -> dict:
    from ..verify.run import verify

    record = read_json(root / BUNDLE_JSON)
    return verify(root / record["target"], root / GOLDEN, gates, threads=threads)


def compare_with_host(report: dict, record: dict) -> dict | None:
    """Per artifact: does every metric equal the host's, and the largest difference."""
    host = {r["artifact"]: r["metrics"] for r in (record.get("host") or {}).get("results") or []}
    if not host:
        return None
    rows = {}
    for r in report["results"]:
        ref = host.get(r["artifact"])
        if ref is None:
            continue
        keys = sorted(set(ref) & set(r["metrics"]))
        diff = max((abs(float(r["metrics"][k]) - float(ref[k])) for k in keys), default=0.0)
        rows[r["artifact"]] = {"same": all(r["metrics"][k] == ref[k] for k in keys) and set(ref) == set(r["metrics"]),
                               "max_abs_diff": diff, "host_executed_by": next(
                                   (h.get("executed_by") for h in record["host"]["results"] if h["artifact"] == r["artifact"]),
                                   None), "executed_by": r["executed_by"]}
    return {"same": all(v["same"] for v in rows.values()), "artifacts": rows}


def verify_bundle(bundle: str | Path, *, gates: list[str] | None = None, threads: int | None = None,
                  report_path: str | Path | None = None, executed_on: str | None = None, log=print) -> dict:
    """Verify a bundle (folder or .tar.gz) on this machine; writes the report (default :func:`default_report`).
    Raises GateFailed after writing it when a gate fails."""
    from .identity import machine_identity

    bundle = Path(bundle)
    report_path = Path(report_path) if report_path else default_report(bundle)
    with opened(bundle) as root:
        record = read_record(root, bundle)
        log(f"verify: bundle {record['id'][:12]} ({record['target']}, {record['images']['images']} images) on "
            f"{machine_identity()['hostname']}")
        failed: GateFailed | None = None
        try:
            report = _verify_staged(root, gates=gates, threads=threads)
        except GateFailed as exc:
            failed = exc
            report = read_json(_scratch_report(root))
        phone = None
        if record.get("phone"):
            from .phone import check_phone

            phone = check_phone(root, record, log=log)
            bad = [p for p in phone if p.get("passed") is False]
            if bad and failed is None:
                failed = GateFailed(f"{record['target']}/{bad[0]['artifact']}: the bundled {bad[0]['kind']} check failed "
                                    f"on {len(bad[0]['failed_cases'])} of {bad[0]['cases']} golden inputs (max abs "
                                    f"diff {bad[0]['max_abs_diff']:.3g})")
    machine = machine_identity()
    if executed_on is None:  # the machine that wrote the bundle is the host; any other one is a device
        executed_on = "host" if machine["hostname"] == record["host"]["machine"].get("hostname") else "device"
    report.update({"folder": str(bundle), "golden": f"{bundle}:{GOLDEN}", "executed_on": executed_on,
                   "machine": machine, "bundle": {"id": record["id"], "images": record["images"],
                                                              "requirements": record["requirements"]},
                   "host_comparison": compare_with_host(report, record), "phone": phone})
    atomic_write_json(report_path, report)
    if failed is not None:
        raise GateFailed(failed.message, hint=f"details in {report_path}")
    return report


__all__ = ["make_bundle", "verify_bundle", "is_bundle", "stratified", "requirements", "default_report", "describe_run",
           "BundleResult"]


def describe_run(report: dict) -> str:
    """One line: where a bundle was verified and whether its metrics are the host's."""
    m = report.get("machine") or {}
    where = f"executed on {report.get('executed_on')} {m.get('hostname')} ({m.get('os')}, {m.get('arch')})"
    cmp = report.get("host_comparison")
    if cmp is None:
        return f"{where}; no host metrics in the bundle to compare with"
    if cmp["same"]:
        return f"{where}; every metric equals the host's"
    diff = max(a["max_abs_diff"] for a in cmp["artifacts"].values())
    return f"{where}; metrics differ from the host's by up to {diff:.2e} (runtimes: " + ", ".join(
        f"{a['executed_by']} here vs {a['host_executed_by']}" for a in cmp["artifacts"].values()) + ")"
