"""edgec bundle: content-addressed, stratified, self-checking; edgec verify BUNDLE reproduces the host's metrics."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.device.bundle import stratified
from edgec.verify.golden import load_golden

runner = CliRunner()


def bundle(build, out, *args):
    result = runner.invoke(app, ["bundle", str(build / "cpu"), "-o", str(out), "--no-wheel", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_stratified_spreads_over_labels():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [-1] * 2)
    pick = stratified(labels, 6)
    assert len(pick) == 6 and len(set(pick.tolist())) == 6 and list(pick) == sorted(pick)
    assert sorted(np.unique(labels[pick]).tolist()) == [-1, 0, 1, 2]  # every label, the unlabelled too
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels[pick], return_counts=True))}
    assert counts == {-1: 2, 0: 2, 1: 1, 2: 1}  # round-robin over the labels in order
    assert stratified(labels, 15).tolist().count(13) == 1 and (labels[stratified(labels, 15)] == 0).sum() == 9
    assert list(stratified(labels, None)) == list(range(16)) and len(stratified(labels, 99)) == 16


def test_bundle_is_content_addressed_and_reproducible(device_build, tmp_path):
    a = bundle(device_build, tmp_path / "a.tar.gz", "--images", "12")
    b = bundle(device_build, tmp_path / "b.tar.gz", "--images", "12")
    assert a["id"] == b["id"] and (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    c = bundle(device_build, tmp_path / "c.tar.gz", "--images", "24")
    assert c["id"] != a["id"]
    assert a["images"]["images"] == 12 and a["images"]["of"] == 120
    golden = load_golden(device_build / "golden")
    picked = golden.label_ids[a["images"]["indices"]]
    assert len(set(picked.tolist())) == 12  # 24 labels, 12 images: 12 different labels
    assert a["requirements"][0].startswith("edgec==") and a["wheel"] is None
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        assert top == f"edgec-bundle-cpu-{a['id'][:12]}" and all(n.split("/")[0] == top for n in names)
        assert {f"{top}/cpu/model.int8.onnx", f"{top}/cpu/manifest.json", f"{top}/cpu/labels.json",
                f"{top}/golden/golden.npz", f"{top}/requirements.txt", f"{top}/bundle.json"} <= set(names)
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_default_name_carries_the_id(device_build, tmp_path):
    result = runner.invoke(app, ["bundle", str(device_build / "cpu"), "--images", "6", "--no-wheel", "--no-host-check",
                                 "--json"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    path = device_build / "bundles" / f"edgec-bundle-cpu-{rec['id'][:12]}.tar.gz"
    assert rec["bundle"] == str(path) and path.is_file() and rec["host"]["results"] is None
    shutil.rmtree(device_build / "bundles")


def test_verify_bundle_reproduces_the_host_metrics_exactly(device_build, tmp_path):
    # all images: the bundle's verify gives exactly what 'edgec verify build/cpu' gives on the host
    work = tmp_path / "build"
    shutil.copytree(device_build, work)
    host = runner.invoke(app, ["verify", str(work / "cpu"), "--json"])
    assert host.exit_code == 0, host.output
    host_metrics = json.loads(host.stdout)["results"][0]["metrics"]
    rec = bundle(device_build, tmp_path / "all.tar.gz")
    assert rec["host"]["results"][0]["metrics"] == host_metrics
    result = runner.invoke(app, ["verify", str(tmp_path / "all.tar.gz"), "--json", "--junit", str(tmp_path / "j.xml")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["results"][0]["metrics"] == host_metrics and host_metrics["images"] == 120
    assert report["host_comparison"]["same"] is True and report["executed_on"] == "host"
    assert report["machine"]["runtimes"]["onnxruntime"] and report["bundle"]["id"] == rec["id"]
    assert json.loads((tmp_path / "all.verify.json").read_text())["results"][0]["metrics"] == host_metrics
    assert 'tests="2" failures="0"' in (tmp_path / "j.xml").read_text()
    # a subset: the device reproduces the metrics the host recorded on the same images
    sub = bundle(device_build, tmp_path / "sub.tar.gz", "--images", "12")
    result = runner.invoke(app, ["verify", str(tmp_path / "sub.tar.gz"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["results"][0]["metrics"]
    assert metrics == sub["host"]["results"][0]["metrics"] and metrics["images"] == 12
    assert sorted(tmp_path.iterdir()) == sorted(tmp_path / n for n in (
        "all.tar.gz", "all.verify.json", "build", "j.xml", "sub.tar.gz", "sub.verify.json"))  # no scratch left


def test_a_failed_gate_on_a_bundle_exits_1_with_its_report(device_build, tmp_path):
    bundle(device_build, tmp_path / "b.tar.gz", "--images", "6", "--no-host-check")
    result = runner.invoke(app, ["verify", str(tmp_path / "b.tar.gz"), "--gate", "cosine_mean>=1.5"])
    assert result.exit_code == 1 and "gate cosine_mean>=1.5 failed" in result.stderr
    report = json.loads((tmp_path / "b.verify.json").read_text())
    assert report["passed"] is False and report["host_comparison"] is None


def test_altered_or_foreign_bundles_are_refused(device_build, tmp_path):
    bundle(device_build, tmp_path / "folder", "--images", "6", "--no-host-check")
    art = tmp_path / "folder" / "cpu" / "model.int8.onnx"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(tmp_path / "folder")])
    assert result.exit_code == 2 and "model.int8.onnx is missing or does not match its sha256" in result.stderr
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    result = runner.invoke(app, ["verify", str(tmp_path / "junk.tar.gz")])
    assert result.exit_code == 2 and "cannot be read as a .tar.gz" in result.stderr
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(art, arcname="../escape.onnx")
    result = runner.invoke(app, ["verify", str(evil)])
    assert result.exit_code == 2 and "not an edgec bundle" in result.stderr
    assert not (tmp_path.parent / "escape.onnx").exists()


@pytest.mark.parametrize("images", ["0", "-3"])
def test_bad_image_count_is_a_usage_error(device_build, images):
    result = runner.invoke(app, ["bundle", str(device_build / "cpu"), "--images", images])
    assert result.exit_code == 2
