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


def tree_sha(path: Path, memo: dict | None = None, captions_file: str = "captions.jsonl") -> str:
    """The identity of a data set, computed once per path within ``memo`` (release hashes the train folder
    once): a folder's sha256_tree; for shard patterns, shard lists and listing files, the hash of the
    shards or listed files (see :meth:`edgec.data.sources.Source.identity`)."""
    from ..data.shards import is_shard_spec

    key = str(path) if is_shard_spec(path) or not Path(path).exists() else str(Path(path).resolve())
    if memo is not None and key in memo:
        return memo[key]
    if not is_shard_spec(path) and Path(path).is_dir():
        value = sha256_tree(path)
    else:
        from ..data.sources import open_source

        value = open_source(path, captions_file).identity()
    if memo is not None:
        memo[key] = value
    return value


def data_sha(spec, captions_file: str = "captions.jsonl", memo: dict | None = None) -> str:
    return tree_sha(spec, memo, captions_file)


NOT_IN_KEY = ("workers",)  # settings that cannot change the trained weights


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
        "train": data_sha(config.train, config.captions_file, memo),
        "eval": data_sha(config.eval, config.captions_file, memo) if config.eval else None,
        "params": {k: v for k, v in to_dict(config.params).items() if k not in NOT_IN_KEY},
        "augment": config.augment,
        "prompts": list(config.prompts),
        "captions_file": config.captions_file,
        "max_bad_fraction": config.max_bad_fraction,
        "versions": {k: versions[k] for k in ("edgec", "torch", "timm")},
    }


def inputs_key(inputs: dict) -> str:
    return sha256_json(inputs)


def changed_inputs(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """The names of the inputs that differ between two input records (``params.epochs``, ``train``, ...)."""
    if not isinstance(old, dict):
        return [prefix.rstrip(".") or "all inputs"]
    names = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            names += changed_inputs(a, b, f"{prefix}{k}.")
        else:
            names.append(f"{prefix}{k}")
    return names


def describe_change(old: dict | None, new: dict) -> str:
    """``inputs changed: train, params.epochs`` (or a note that the old record does not list them)."""
    if not isinstance(old, dict):
        return "inputs changed (the previous run recorded no inputs)"
    names = changed_inputs(old, new)
    return f"inputs changed: {', '.join(names)}" if names else "inputs changed"


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
        for k in NOT_IN_KEY:
            recorded_config.pop(k, None)
        losses = recorded_config.get("losses")
        if (isinstance(losses, dict) and losses.get("contrastive_text") == 0.0
                and manifest.get("losses_used") is None and not _has_captions(config)):
            # written before the configured losses were recorded: the run switched contrastive_text off
            # because the folder has no captions, and recorded that instead of the configured weight
            recorded_config["losses"] = {**losses, "contrastive_text": inputs["params"]["losses"]["contrastive_text"]}
        return (manifest["teacher"]["sha256"] == inputs["teacher"]
                and manifest["student"]["name"] == config.student
                and manifest["data"]["train_sha256"] == inputs["train"]
                and manifest["data"].get("eval_sha256") == inputs["eval"]
                and recorded_config == {**inputs["params"], "augment": inputs["augment"]} and prompts == inputs["prompts"]
                and all(manifest["versions"].get(k) == v for k, v in inputs["versions"].items())
                and manifest["student"]["preprocess"] == _teacher_preprocess(config))
    except (KeyError, TypeError, AttributeError):
        return False


def _has_captions(config: DistillConfig) -> bool:
    from ..data.folder import HF_METADATA

    root = Path(config.train)
    return root.is_dir() and ((root / config.captions_file).is_file() or (root / HF_METADATA).is_file())


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
    previous = read_json(config.out / "manifest.json")
    if previous is None:
        reason = "no student yet"
    elif not _intact(config.out, previous):
        reason = "the student files changed or are missing"
    else:
        reason = describe_change((previous.get("cache") or {}).get("inputs"), inputs)
    if resume:
        epoch = (read_json(work / "last" / "trainer_state.json") or {}).get("epoch")
        log(f"{label}: {reason}; resuming the interrupted run from epoch {epoch}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        atomic_write_json(work / KEY_FILE, {"key": key, "inputs": inputs})
        log(f"{label}: {reason}; distilling into {work} (the current folder stays until it finishes)")
    result = run(dataclasses.replace(config, out=work), resume=resume, progress=progress, log=log, inputs=inputs)
    manifest = dict(result.manifest, cache={"key": key, "inputs": inputs})
    atomic_write_json(work / "manifest.json", manifest)
    replace_dir(work, config.out)
    (config.out / KEY_FILE).unlink()
    return StudentStage(config.out, config.out / "student", manifest, key, "resumed" if resume else "trained",
                        time.time() - t0)


__all__ = ["StudentStage", "cached_student", "changed_inputs", "describe_change", "distill_inputs", "ensure_student", "inputs_key", "work_dir"]
