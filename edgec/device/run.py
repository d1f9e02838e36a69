"""One entry for ``edgec verify`` of a bundle or ``--on`` a device: where it runs, and the reports it leaves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import GateFailed, InputError
from ..manifest import atomic_write_json, atomic_write_text
from .bundle import default_report, is_bundle, make_bundle, verify_bundle

DEVICE_REPORT = "verify.device.json"


def verify_device(source: str | Path, *, on: str | None = None, golden: Path | None = None, gates: list[str] | None = None,
                  threads: int | None = None, junit: Path | None = None, markdown: Path | None = None,
                  report: Path | None = None, images: int | None = None, known_hosts: Path | None = None,
                  identity: Path | None = None, install: bool = False, edgec: str = "edgec", python: str = "python3",
                  remote_dir: str | None = None, log=print) -> dict:
    """Verify a bundle here, or a target folder / bundle on the device ``on`` (ssh://user@host[:port]).

    The report goes to ``report`` (default: beside the bundle, or ``<folder>/verify.device.json``) and, like
    ``edgec verify``, to JUnit / Markdown / $GITHUB_STEP_SUMMARY. Raises GateFailed after writing them."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist", hint="pass a target folder (build/<target>) or a bundle")
    if is_bundle(source) and (golden is not None or images is not None):
        raise InputError(f"{source} is a bundle: it carries its golden images, so --golden and --images do not apply",
                         hint="pass them to 'edgec bundle', or verify the target folder")
    if on is None:
        if not is_bundle(source):
            raise InputError(f"{source} is not a bundle", hint="verify a target folder without --on, or bundle it first")
        failed = None
        try:
            result = verify_bundle(source, gates=gates, threads=threads, report_path=report, log=log)
        except GateFailed as exc:
            failed, result = exc, None
        if result is None:
            from ..manifest import read_json

            result = read_json(Path(report) if report else default_report(source))
        return _finish(result, failed, junit, markdown)
    from .remote import DEFAULT_REMOTE_DIR, connect, verify_on

    if report:
        dest = Path(report)
    elif is_bundle(source) and not source.is_dir():  # x.tar.gz -> x.verify.device.json
        dest = default_report(source).with_name(default_report(source).name.replace(".verify.json", f".{DEVICE_REPORT}"))
    else:
        dest = source / DEVICE_REPORT
    device = connect(on, known_hosts=known_hosts, identity=identity, remote_dir=remote_dir or DEFAULT_REMOTE_DIR, log=log)
    with tempfile.TemporaryDirectory(prefix="edgec-device-") as tmp:
        if is_bundle(source) and not source.is_dir():
            bundle = source
        else:  # a target folder, or a bundle folder: the device gets a .tar.gz
            if is_bundle(source):
                from .bundle import BUNDLE_JSON, tar_bytes
                from ..manifest import read_json

                rec = read_json(source / BUNDLE_JSON) or {}
                bundle = Path(tmp) / f"edgec-bundle-{rec.get('target')}-{str(rec.get('id'))[:12]}.tar.gz"
                bundle.write_bytes(tar_bytes(source, bundle.name.removesuffix(".tar.gz")))
            else:
                made = make_bundle(source, golden=golden, out=Path(tmp) / "bundle.tar.gz", images=images,
                                   wheel=install, threads=threads, log=log)
                bundle = made.path.rename(made.path.with_name(
                    f"edgec-bundle-{made.record['target']}-{made.record['id'][:12]}.tar.gz"))
        result, failed = verify_on(device, bundle, install=install, edgec=edgec, python=python, gates=gates,
                                   threads=threads, log=log)
    atomic_write_json(dest, result)
    log(f"device: wrote {dest}")
    return _finish(result, failed, junit, markdown)


def _finish(report: dict, failed: GateFailed | None, junit: Path | None, markdown: Path | None) -> dict:
    from ..verify.run import to_junit, to_markdown

    if junit:
        atomic_write_text(junit, to_junit(report))
    md = to_markdown(report)
    machine = report.get("machine") or {}
    md += f"\nExecuted on {report.get('executed_on')} {machine.get('hostname')} ({machine.get('os')}, {machine.get('arch')})."
    if markdown:
        atomic_write_text(markdown, md)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(md + "\n")
    if failed is not None:
        raise failed
    return report


__all__ = ["verify_device", "DEVICE_REPORT"]
