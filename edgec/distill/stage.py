"""The distill stage keyed by its inputs, interrupt-safe and resumable.

``ensure_student(config)`` returns the distilled student for ``config``:

* reused when ``<out>/manifest.json`` records the same inputs key (teacher weights, student name and
  size, train/eval folder contents, every ``[distill]`` setting, prompts, torch/timm/edgec versions)
  and the student files still match their sha256;
* a folder distilled before keys were recorded is adopted when every input its manifest records
  matches (the key is then written into it), so an unchanged project is not distilled again;
* otherwise trained in ``<out>/../.<name>.work/`` and swapped into ``<out>`` only when finished,
  so the previous student stays in place until the new one is complete. An interrupted run leaves
  the work folder (with its per-epoch ``last/`` checkpoint and the inputs key it was started
  for); the next run with the same key resumes from that epoch.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..manifest import (atomic_write_json, package_versions, read_json, replace_dir, sha256_file, sha256_json,
                        sha256_tree)
from ..schema import to_dict
from . import DistillConfig

KEY_FILE = "edgec_inputs.json"  # in the work folder: the inputs key it was started for


@dataclass
class StudentStage:
    out: Path
    student: Path
    manifest: dict
    key: str
    status: Literal["cached", "adopted", "trained", "resumed"]
    seconds: float

    @property
    def cached(self) -> bool:
        return self.status in ("cached", "adopted")


def tree_sha(path: Path, memo: dict | None = None) -> str:
    """sha256_tree, computed once per path within ``memo`` (release hashes the train folder once)."""
    key = str(Path(path).resolve())
    if memo is not None and key in memo:
        return memo[key]
    value = sha256_tree(path)
    if memo is not None:
        memo[key] = value
    return value


def distill_inputs(config: DistillConfig, memo: dict | None = None) -> dict:
    """Everything the distilled student depends on (no torch import: cheap enough for every run)."""
    from .data import source_identity

    versions = package_versions("torch", "timm")
    return {
        "teacher": source_identity(config.teacher.path),
        "teacher_kind": config.teacher.kind,
        "teacher_arch": Path(config.teacher.arch).name if config.teacher.arch else None,
        "student": config.student,
        "image_size": config.image_size,
        "train": tree_sha(config.train, memo),
        "eval": tree_sha(config.eval, memo) if config.eval else None,
        "params": to_dict(config.params),
        "augment": config.augment,
        "prompts": list(config.prompts),
        "captions_file": config.captions_file,
        "max_bad_fraction": config.max_bad_fraction,
        "versions": {k: versions[k] for k in ("edgec", "torch", "timm")},
    }


def inputs_key(inputs: dict) -> str:
    return sha256_json(inputs)


def _intact(out: Path, manifest: dict) -> bool:
    """The student files listed in the manifest exist with their recorded sha256."""
    arts = manifest.get("artifacts") or []
    if not arts or not (out / "student").is_dir():
        return False
    return all((out / a["path"]).is_file() and sha256_file(out / a["path"]) == a["sha256"] for a in arts)


def _teacher_preprocess(config: DistillConfig) -> dict | None:
    """The teacher's preprocessing as the student inherits it (from edgec_model.json when it has it)."""
    meta = read_json(Path(config.teacher.path) / "edgec_model.json")
    if meta and "preprocess" in meta:
        from ..data.preprocess import Preprocess

        pre = Preprocess.from_json(meta["preprocess"])
    else:
        from ..models import load_model

        pre = load_model(config.teacher.path, config.teacher.kind, arch=config.teacher.arch,
                         trust_pickle=config.teacher.trust_pickle).preprocess
    return (pre.with_size(config.image_size) if config.image_size else pre).to_json()


def _legacy_match(config: DistillConfig, manifest: dict, inputs: dict) -> bool:
    """A manifest written before inputs keys were recorded: do the inputs it records match?"""
    try:
        recorded_config = dict(manifest["config"])
        prompts = recorded_config.pop("prompts")  # the rest is [distill] with 'augment' written over it
        return (manifest["teacher"]["sha256"] == inputs["teacher"]
                and manifest["student"]["name"] == config.student
                and manifest["data"]["train_sha256"] == inputs["train"]
                and manifest["data"].get("eval_sha256") == inputs["eval"]
                and recorded_config == {**inputs["params"], "augment": inputs["augment"]} and prompts == inputs["prompts"]
                and all(manifest["versions"].get(k) == v for k, v in inputs["versions"].items())
                and manifest["student"]["preprocess"] == _teacher_preprocess(config))
    except (KeyError, TypeError, AttributeError):
        return False


def cached_student(config: DistillConfig, inputs: dict, key: str) -> tuple[dict, str] | None:
    """(manifest, 'cached' | 'adopted') when ``config.out`` holds a student made from these inputs."""
    manifest = read_json(config.out / "manifest.json")
    if manifest is None or not _intact(config.out, manifest):
        return None
    recorded = (manifest.get("cache") or {}).get("key")
    if recorded is not None:
        return (manifest, "cached") if recorded == key else None
    if not _legacy_match(config, manifest, inputs):
        return None
    manifest["cache"] = {"key": key, "inputs": inputs, "adopted": True}
    atomic_write_json(config.out / "manifest.json", manifest)
    return manifest, "adopted"


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def ensure_student(config: DistillConfig, *, progress: bool = True, log=print, memo: dict | None = None,
                   label: str | None = None) -> StudentStage:
    """The student for ``config``: reused when its inputs are unchanged, else distilled (resuming an
    interrupted run of the same inputs)."""
    from . import run

    t0 = time.time()
    label = label or f"distill {config.student}"
    inputs = distill_inputs(config, memo)
    key = inputs_key(inputs)
    hit = cached_student(config, inputs, key)
    if hit is not None:
        manifest, status = hit
        note = " (recorded inputs match; key written)" if status == "adopted" else ""
        log(f"{label}: from cache{note}")
        return StudentStage(config.out, config.out / "student", manifest, key, status, time.time() - t0)

    work = work_dir(config.out)
    started = read_json(work / KEY_FILE)
    resume = started is not None and started.get("key") == key and (work / "last").is_dir()
    if resume:
        epoch = (read_json(work / "last" / "trainer_state.json") or {}).get("epoch")
        log(f"{label}: inputs changed or no student yet; resuming the interrupted run from epoch {epoch}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        atomic_write_json(work / KEY_FILE, {"key": key, "inputs": inputs})
        reason = "inputs changed" if (config.out / "manifest.json").is_file() else "no student yet"
        log(f"{label}: {reason}; distilling into {work} (the current folder stays until it finishes)")
    result = run(dataclasses.replace(config, out=work), resume=resume, progress=progress, log=log)
    manifest = dict(result.manifest, cache={"key": key, "inputs": inputs})
    atomic_write_json(work / "manifest.json", manifest)
    replace_dir(work, config.out)
    (config.out / KEY_FILE).unlink()
    return StudentStage(config.out, config.out / "student", manifest, key, "resumed" if resume else "trained",
                        time.time() - t0)


__all__ = ["StudentStage", "cached_student", "distill_inputs", "ensure_student", "inputs_key", "work_dir"]
