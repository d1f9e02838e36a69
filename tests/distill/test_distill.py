"""edgec distill on the example teacher with a tiny timm student: training, cache, resume, errors, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgec.cli import app

from ..conftest import EXAMPLE, REPO

runner = CliRunner()
STUDENT = "test_efficientnet"  # timm's 99k-parameter test network: fast, with BatchNorm


@pytest.fixture(scope="module")
def data(shapes_data) -> Path:
    return shapes_data


def project(tmp_path: Path, data: Path, **distill) -> Path:
    settings = {"epochs": 2, "batch_size": 16, "lr": 0.01, "seed": 0, **distill}
    losses = settings.pop("losses", None)
    lines = [
        "[model]", f"path = {json.dumps(str(EXAMPLE / 'teacher'))}",
        "[student]", f'name = "{STUDENT}"',
        "[data]", f"train = {json.dumps(str(data / 'train'))}", f"eval = {json.dumps(str(data / 'eval'))}",
        "[targets]", f"out = {json.dumps(str(tmp_path / 'build'))}",
        "[distill]", *[f"{k} = {json.dumps(v)}" for k, v in settings.items()],
    ]
    if losses:
        lines += ["[distill.losses]", *[f"{k} = {v}" for k, v in losses.items()]]
    path = tmp_path / "edgec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def distill(config: Path, *args: str):
    return runner.invoke(app, ["distill", "--config", str(config), "--no-progress", *args])


def student_weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("run")
    config = project(tmp, data, epochs=3, losses={"feature_cosine": 1.0, "contrastive_text": 0.5, "logit": 0.5})
    result = distill(config)
    assert result.exit_code == 0, result.output
    return config, tmp / "build" / "distill" / STUDENT, result


def test_distill_trains_a_student_into_the_teacher_space(trained, torch):
    from edgec.models.student import load_student

    _, out, result = trained
    assert "teacher outputs computed and cached" in result.stdout
    assert "5 undecodable" not in result.stdout  # odd modes are converted, not skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "distill" and manifest["epochs_run"] == 3
    assert manifest["data"]["train_images"] == 24 * 8 + 5
    assert manifest["teacher"]["image_params"] > 20 * manifest["student"]["params"]

    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,train_loss")
    assert Image.open(out / "learning_curve.png").size[0] > 100

    student, spec, _ = load_student(out / "student")
    assert spec.embed_dim == 256 and spec.preprocess.size == (64, 64)
    # trained student agrees with the teacher better than the same network untrained
    from edgec.models.student import create_student

    from edgec.data.folder import load_pixels, read_folder
    from edgec.models import load_model

    teacher = load_model(EXAMPLE / "teacher")
    ev = read_folder(Path(manifest["data"]["eval"]))
    x = torch.from_numpy(load_pixels(ev, spec.preprocess).pixels)
    t = teacher.encode_image(x)
    last, _, _ = load_student(out / "last")
    with torch.no_grad():
        cos_best = torch.nn.functional.cosine_similarity(student(x), t).mean().item()
        cos_last = torch.nn.functional.cosine_similarity(last(x), t).mean().item()
        cos_random = torch.nn.functional.cosine_similarity(create_student(spec, seed=0).eval()(x), t).mean().item()
    assert cos_best == pytest.approx(manifest["metrics"]["cosine_mean"], abs=1e-4)  # the kept student is the one measured
    assert cos_last > cos_random + 0.15


def test_inspect_a_student_checkpoint(trained):
    _, out, _ = trained
    result = runner.invoke(app, ["inspect", str(out / "student"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["name"] == STUDENT and info["output"]["shape"] == [1, 256] and info["params"] > 90_000


def test_second_run_reads_the_teacher_cache(trained, tmp_path, data):
    config, _, _ = trained
    out = tmp_path / "again"
    result = distill(config, "--epochs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("teacher outputs from cache") == 2


def test_resume_continues_exactly(tmp_path, data, monkeypatch):
    from edgec.distill import trainer

    config = project(tmp_path, data)
    straight, part = tmp_path / "straight", tmp_path / "part"
    assert distill(config, "--out", str(straight)).exit_code == 0

    real = trainer._checkpoint

    def interrupted(*args, **kwargs):  # Ctrl-C right after the first epoch's checkpoint
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_checkpoint", interrupted)
    result = distill(config, "--out", str(part))
    assert result.exit_code == 130  # Ctrl-C
    assert json.loads((part / "last" / "trainer_state.json").read_text())["epoch"] == 1
    assert not list(part.glob(".*partial"))
    monkeypatch.setattr(trainer, "_checkpoint", real)

    resumed = distill(config, "--out", str(part), "--resume")
    assert resumed.exit_code == 0 and "resumed from" in resumed.stdout
    a, b = student_weights(straight / "last"), student_weights(part / "last")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    rows = (part / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch, torch):
    from edgec.distill import losses

    config = project(tmp_path, data)
    out = tmp_path / "nan"
    real, calls = losses.DistillLoss.forward, []
    steps_per_epoch = (24 * 8 + 5) // 16

    def diverging(self, batch):
        calls.append(1)
        loss, parts = real(self, batch)
        return (loss * float("nan") if len(calls) > steps_per_epoch else loss), parts

    monkeypatch.setattr(losses.DistillLoss, "forward", diverging)
    result = distill(config, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "loss became nan at epoch 2, step 1" in result.stderr and "lower distill.lr" in result.stderr
    assert json.loads((out / "last" / "trainer_state.json").read_text())["epoch"] == 1
    assert (out / "student" / "model.safetensors").is_file()


def test_early_stop_when_eval_stops_improving(tmp_path, data):
    config = project(tmp_path, data, epochs=5, lr=1e-12, patience=1)  # lr ~ 0: nothing improves after epoch 1
    result = distill(config, "--out", str(tmp_path / "es"))
    assert result.exit_code == 0, result.output
    assert "early stop: no agreement improvement for 1 epochs" in result.stdout
    manifest = json.loads((tmp_path / "es" / "manifest.json").read_text())
    assert manifest["epochs_run"] == 2 and manifest["stopped_early"] is True


def test_a_teacher_without_tokenizer_is_named_as_why_captions_go_unused(tmp_path, data, tiny_hf_siglip):
    """The train folder has captions, the teacher cannot embed them: the note names the tokenizer, not the data."""
    config = project(tmp_path, data, epochs=1)
    config.write_text(config.read_text().replace(json.dumps(str(EXAMPLE / "teacher")), json.dumps(str(tiny_hf_siglip))))
    assert (data / "train" / "captions.jsonl").is_file()
    result = distill(config, "--out", str(tmp_path / "t"))
    assert result.exit_code == 0, result.output
    assert "has no tokenizer to embed captions with; the contrastive_text loss is off" in result.stdout
    assert "has no captions" not in result.stdout


def test_unlabelled_folder_distils_on_features_alone(tmp_path, data):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((data / "train").glob("*/*.png"))[:40]):
        shutil.copy(p, flat / f"{i}.png")
    config = project(tmp_path, data, epochs=1)
    config.write_text(config.read_text().replace(json.dumps(str(data / "train")), json.dumps(str(flat)))
                      .replace(json.dumps(str(data / "eval")), json.dumps(str(flat))))
    result = distill(config, "--out", str(tmp_path / "u"))
    assert result.exit_code == 0, result.output
    assert "has no captions; the contrastive_text loss is off" in result.stdout
    manifest = json.loads((tmp_path / "u" / "manifest.json").read_text())
    assert "cosine_mean" in manifest["metrics"] and "agreement" not in manifest["metrics"]
    # the configured weight is what the stage key and compile compare; the one used is recorded beside it
    assert manifest["losses_used"]["contrastive_text"] == 0.0 and manifest["config"]["losses"]["contrastive_text"] == 0.5

    config.write_text(config.read_text() + "[distill.losses]\nlogit = 1.0\n")
    result = distill(config, "--out", str(tmp_path / "u2"))
    assert result.exit_code == 2 and "logit needs labels" in result.stderr


def test_distill_then_compile_reuses_the_student_and_changes_are_named(tmp_path, data, monkeypatch):
    """A folder without captions: the CLI records the configured losses and the inputs key, so the
    stage compile runs (default out folder, same config) finds the student; a change is named."""
    import edgec.distill as distill_pkg
    from edgec.config import load_config
    from edgec.distill import DistillConfig
    from edgec.distill.stage import cached_student, distill_inputs, ensure_student, inputs_key

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((data / "train").glob("*/*.png"))[:32]):
        shutil.copy(p, flat / f"{i}.png")
    config = project(tmp_path, data, epochs=1)
    config.write_text(config.read_text().replace(json.dumps(str(data / "train")), json.dumps(str(flat))))
    assert distill(config).exit_code == 0
    dcfg = DistillConfig.from_edgec(load_config(config), target="cpu")
    inputs = distill_inputs(dcfg)
    hit = cached_student(dcfg, inputs, inputs_key(inputs))
    assert hit is not None and hit[1] == "cached"

    lines = []

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_pkg, "run", stop)
    changed = DistillConfig.from_edgec(load_config(config), target="cpu", epochs=2, lr=0.02)
    with pytest.raises(KeyboardInterrupt):
        ensure_student(changed, log=lines.append, progress=False)
    assert f"distill {STUDENT}: inputs changed: params.epochs, params.lr; distilling" in lines[0]


def test_unknown_student_suggests_names(tmp_path, data):
    config = project(tmp_path, data)
    result = distill(config, "--student", "mobilevit_xxxs")
    assert result.exit_code == 2 and "unknown student 'mobilevit_xxxs'" in result.stderr
    assert "mobilevit_xxs" in result.stderr


def test_resume_with_other_embedding_dim_is_refused(tmp_path, data, tiny_edgec):
    out = tmp_path / "mixed"
    config = project(tmp_path, data, epochs=1)
    assert distill(config, "--out", str(out)).exit_code == 0
    text = config.read_text().replace(json.dumps(str(EXAMPLE / "teacher")), json.dumps(str(tiny_edgec)))
    config.write_text(text)
    result = distill(config, "--out", str(out), "--resume")
    assert result.exit_code == 2 and "embedding dim 256" in result.stderr and "dim 16" in result.stderr


def test_empty_and_broken_training_folders(tmp_path, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = project(tmp_path, data)
    config.write_text(config.read_text().replace(json.dumps(str(data / "train")), json.dumps(str(empty))))
    result = distill(config)
    assert result.exit_code == 2 and "no images in" in result.stderr

    broken = tmp_path / "broken" / "x"
    broken.mkdir(parents=True)
    for i in range(4):
        (broken / f"{i}.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(broken / "ok.png")
    config.write_text(config.read_text().replace(json.dumps(str(empty)), json.dumps(str(broken.parent))))
    result = distill(config)
    assert result.exit_code == 2 and "4 of 5 images" in result.stderr


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path, data):
    """torchrun, 2 CPU processes with gloo: identical weights on both ranks, close to one process."""
    config = project(tmp_path, data, epochs=1, lr=0.001)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "edgec.cli", "distill", "--config", str(config), "--no-progress", "--out", str(ddp_out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = distill(config, "--out", str(single_out))
    assert single.exit_code == 0
    manifest = json.loads((ddp_out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ranks_max_abs_diff"] == 0.0
    a, b = student_weights(ddp_out / "last"), student_weights(single_out / "last")
    diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a if a[k].dtype.kind == "f"}
    # batch norm statistics come from all ranks, so only float summation order differs
    assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    single_m = json.loads((single_out / "manifest.json").read_text())["metrics"]
    assert manifest["metrics"]["cosine_mean"] == pytest.approx(single_m["cosine_mean"], abs=1e-3)


def folder_to_shards(folder: Path, out: Path, n_shards: int) -> str:
    """The training folder as img2dataset-style WebDataset shards; returns the brace pattern."""
    from edgec.data.folder import read_folder
    from edgec.data.shards import write_shard

    items = read_folder(folder).items
    out.mkdir(parents=True)
    for s in range(n_shards):
        samples = [(f"{i:09d}", {it.path.suffix.lstrip(".").lower(): it.path.read_bytes(),
                                 "txt": it.captions[0].encode() if it.captions else b"",
                                 "json": json.dumps({"label": it.label}).encode()})
                   for i, it in enumerate(items) if i % n_shards == s]
        write_shard(out / f"train-{s:05d}.tar", samples)
    return str(out / f"train-{{00000..{n_shards - 1:05d}}}.tar")


@pytest.mark.slow
def test_ddp_on_shards_gives_the_same_cache_and_weights_as_one_process(tmp_path, data):
    """torchrun, 2 gloo processes on WebDataset shards: each rank embeds its shards; the cache equals
    one process's byte for byte, every key is in it once, and the weights match one process's."""
    pattern = folder_to_shards(data / "train", tmp_path / "wds", n_shards=5)
    configs = {}
    for name in ("ddp", "single"):
        (tmp_path / name).mkdir()
        config = project(tmp_path / name, data, epochs=1, lr=0.001)
        config.write_text(config.read_text().replace(json.dumps(str(data / "train")), json.dumps(pattern)))
        configs[name] = config
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29562",
           "-m", "edgec.cli", "distill", "--config", str(configs["ddp"]), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = distill(configs["single"])
    assert single.exit_code == 0, single.output
    outs = {k: tmp_path / k / "build" / "distill" / STUDENT for k in configs}
    manifest = json.loads((outs["ddp"] / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ranks_max_abs_diff"] == 0.0
    assert manifest["data"]["train_images"] == 24 * 8 + 5

    def cache_files(name):
        (train_cache,) = [d for d in (tmp_path / name / "build" / "cache").iterdir()
                          if len(list(d.glob("part-*.json"))) == 5]
        return {p.name: p.read_bytes() for p in sorted(train_cache.iterdir())}

    ddp_cache, single_cache = cache_files("ddp"), cache_files("single")
    assert ddp_cache.keys() == single_cache.keys() and all(ddp_cache[k] == single_cache[k] for k in ddp_cache)
    keys = [k for name, blob in ddp_cache.items() if name.endswith(".json") and name.startswith("part-")
            for k in json.loads(blob)["keys"]]
    assert len(keys) == len(set(keys)) == 24 * 8 + 5  # no duplicates, no gaps
    a, b = student_weights(outs["ddp"] / "last"), student_weights(outs["single"] / "last")
    diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a if a[k].dtype.kind == "f"}
    assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
