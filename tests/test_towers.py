"""compile --towers image,text --head zero-shot: the text tower (int32 ids, no ArgMax) with its tokenizer
files, the logits variant, and verify's text and logits checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.cli import app

from .conftest import EXAMPLE, write_project

runner = CliRunner()


def _compile(config: Path, *args: str):
    result = runner.invoke(app, ["compile", "--config", str(config), "--no-distill", "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def towers(tmp_path_factory, shapes_data):
    """The example teacher (edgec kind) compiled for cpu with both towers and the zero-shot variant."""
    root = tmp_path_factory.mktemp("towers")
    # a text gate in the config: the image candidates are chosen on the image gates, verify checks all
    config = write_project(root, shapes_data, extra='[gates]\ncpu = ["agreement>=0.97", "text_cosine_mean>=0.999"]\n')
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    result = _compile(config, "--target", "cpu", "--towers", "image,text", "--head", "zero-shot")
    return config, root / "build", result.output


def test_text_artifact_record_tokenizer_and_onnx_graph(towers):
    import onnx

    _, build, output = towers
    folder = build / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    image, text, logits = manifest["artifacts"]
    assert image["tower"] == "image" and image["path"].startswith("model.") and manifest["inputs"][0]["name"] == "pixels"
    assert text["tower"] == "text" and text["path"] == "text.fp32.onnx" and text["precision"] == "fp32"
    assert text["inputs"][0]["dtype"] == "int32" and text["inputs"][0]["shape"] == [1, 16]
    assert text["outputs"][0]["normalized"] is True and text["outputs"][0]["shape"] == [1, 256]
    tok = text["tokenizer"]
    assert tok["kind"] == "word" and tok["context_length"] == 16 and tok["eot_id"] == 2 and tok["pad_id"] == 0
    assert tok["lowercase"] is True and (folder / tok["folder"] / tok["vocab"]).is_file()
    assert text["check"]["max_abs_diff"] < 1e-5 and "text tower: fp32 text.fp32.onnx" in output
    graph = onnx.load(str(folder / text["path"])).graph
    assert "ArgMax" not in {n.op_type for n in graph.node}
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT32]
    assert manifest["towers"]["text"] == {"built": True, "artifact": "text.fp32.onnx"}
    assert manifest["head"]["kind"] == "zero-shot" and manifest["head"]["logits"] == logits["path"] == "model.zeroshot.onnx"
    assert logits["tower"] == "zero-shot" and logits["outputs"][0]["shape"] == [1, len(json.loads((folder / "labels.json").read_text()))]


def test_text_artifact_matches_the_teacher_with_host_tokenisation(towers, torch):
    from edgec.models import load_model
    from edgec.runtime.runners import open_runner
    from edgec.runtime.tokenize import load_tokenizer, tokenize

    config, build, _ = towers
    folder = build / "cpu"
    text = json.loads((folder / "manifest.json").read_text())["artifacts"][1]
    texts = ["a photo of a circle.", "a photo of a red triangle", "A BLUE SQUARE!!", "unknownword " * 20]
    ids = tokenize(load_tokenizer(folder, text["tokenizer"]), texts)
    assert ids.dtype == np.int32 and ids.shape == (4, 16)
    got = open_runner(folder / text["path"], "onnxruntime")(ids)
    teacher = load_model(EXAMPLE / "teacher")
    np.testing.assert_allclose(got, teacher.encode_text(texts).numpy(), atol=1e-5)


def test_verify_reports_text_cosine_and_logits_agreement(towers):
    _, build, _ = towers
    result = runner.invoke(app, ["verify", str(build / "cpu"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (row,) = report["results"]  # one image artifact; the text and logits artifacts are checked beside it
    m = row["metrics"]
    assert m["text_cosine_mean"] > 0.9999 and m["text_cosine_p1"] > 0.9999  # fp32 tower vs fp16-stored captions
    assert report["text"]["metrics"]["texts"] == 24 + 120 * 6  # label classes + every caption
    assert m["artifacts_agreement"] >= 0.97
    # the logits artifact decides as the image embeddings with the head files do (same graph up to the head)
    assert m["logits_agreement"] == 1.0 and m["logits_teacher_agreement"] == m["agreement"]
    assert any(g["gate"] == "logits_agreement>=1" and g["passed"] for g in row["gates"])
    assert any(g["gate"] == "text_cosine_mean>=0.999" and g["passed"] for g in row["gates"])  # from [gates] cpu
    gated = runner.invoke(app, ["verify", str(build / "cpu"), "--gate", "text_cosine_p1>=1.01"])
    assert gated.exit_code == 1 and "text_cosine_p1" in gated.stderr
    ok = runner.invoke(app, ["verify", str(build / "cpu"), "--gate", "text_cosine_mean>=0.999", "--gate", "artifacts_agreement>=0.97"])
    assert ok.exit_code == 0, ok.output


def test_logits_artifact_top1_equals_embedding_predictions(towers):
    from edgec.data.preprocess import Preprocess
    from edgec.runtime.runners import open_runner
    from edgec.verify.golden import load_golden
    from edgec.verify.metrics import zero_shot_predictions
    from edgec.verify.run import golden_inputs

    _, build, _ = towers
    folder = build / "cpu"
    manifest = json.loads((folder / "manifest.json").read_text())
    x = golden_inputs(load_golden(build / "golden"), Preprocess.from_json(manifest["inputs"][0]["preprocess"]))
    emb = open_runner(folder / manifest["artifacts"][0]["path"], "onnxruntime")(x)
    logits = open_runner(folder / "model.zeroshot.onnx", "onnxruntime")(x)
    text = np.load(folder / "text_embeddings.npy").astype(np.float32)
    np.testing.assert_array_equal(np.argmax(logits, 1), zero_shot_predictions(emb, text))
    np.testing.assert_allclose(logits, manifest["head"]["logit_scale"] * (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ text.T,
                               atol=1e-3)


def test_verify_of_both_towers_needs_no_torch(towers):
    import subprocess
    import sys

    _, build, _ = towers
    code = ("import sys; sys.modules['torch'] = None\n"  # any 'import torch' raises ImportError
            "from edgec.cli import app\n"
            f"app(['verify', {str(build / 'cpu')!r}, '--gate', 'text_cosine_mean>=0.999'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "text_cosine_mean 1.0000" in proc.stdout


def test_bench_times_only_the_image_model(towers):
    _, build, _ = towers
    result = runner.invoke(app, ["bench", str(build / "cpu"), "--runs", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["artifact"] for r in json.loads(result.stdout)["results"]] == [
        json.loads((build / "cpu" / "manifest.json").read_text())["artifacts"][0]["path"]]


def test_folded_onnx_head_normalises_and_adds_the_bias(tmp_path, torch):
    """The LpNormalization + bias branch (a graph whose output is not normalised, a SigLIP-style bias)."""
    import onnxruntime as ort

    from edgec.backends import get

    fold_head = get("onnx").fold_head  # the backend that folds a head into a built artifact

    lin = torch.nn.Linear(6, 5).eval()
    torch.onnx.export(lin, (torch.zeros(1, 6),), str(tmp_path / "m.onnx"), input_names=["pixels"],
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
    text = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert fold_head(tmp_path / "m.onnx", tmp_path / "z.onnx", text, 10.0, -2.5, normalize=True)
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "z.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    with torch.no_grad():
        emb = lin(torch.from_numpy(x)).numpy()
    want = 10.0 * (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ text.T - 2.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_compile_keeps_one_artifact_and_its_cache_key(towers):
    """Without --towers/--head the folder is the image model alone; switching back rebuilds it."""
    config, build, _ = towers
    result = _compile(config, "--target", "cpu")
    assert "up to date" not in result.output
    manifest = json.loads((build / "cpu" / "manifest.json").read_text())
    assert [a["tower"] for a in manifest["artifacts"]] == ["image"] and manifest["towers"] == {"image": {"built": True, "artifact": manifest["artifacts"][0]["path"]}}
    assert not (build / "cpu" / "tokenizer").exists() and manifest["head"].get("logits") is None


def test_edgetpu_does_not_build_a_text_tower_and_says_why(tmp_path):
    from edgec import registry
    from edgec.backends import get
    from edgec.towers import text_tower

    spec = registry.get("targets", "edgetpu").spec
    lines = []
    res = text_tower("edgetpu", None, spec, get(spec.backend), tmp_path, ["a photo of a circle."], lines.append)
    assert res["built"] is False and "does not map onto it" in res["reason"] and "cpu" in res["reason"]
    assert lines and lines[0].startswith("text tower not built")


def test_hf_clip_teacher_text_tower_compiles_and_verifies(tmp_path, shapes_data, tiny_hf_clip):
    """A Hugging Face CLIP (BPE tokenizer, EOS = pad id): tokenizer.json shipped, host tokenisation, text cosine ~1."""
    config = write_project(tmp_path, shapes_data, teacher=tiny_hf_clip,
                           extra='[gates]\ncpu = ["cosine_mean>=0.99"]\n')
    config.write_text(config.read_text().replace("[targets]\n", '[targets]\ntowers = ["image", "text"]\n', 1))
    assert runner.invoke(app, ["golden", "--config", str(config)]).exit_code == 0
    _compile(config, "--target", "cpu")
    manifest = json.loads((tmp_path / "build" / "cpu" / "manifest.json").read_text())
    text = manifest["artifacts"][1]
    assert text["tokenizer"]["kind"] == "tokenizers" and "tokenizer.json" in text["tokenizer"]["files"]
    assert text["pooling"]["pool"] == "eot" and text["check"]["max_abs_diff"] < 1e-5
    result = runner.invoke(app, ["verify", str(tmp_path / "build" / "cpu"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["metrics"]["text_cosine_mean"] > 0.9999


@pytest.mark.slow
def test_pte_text_tower_runs_in_executorch(tiny_edgec, tmp_path, torch):
    from edgec.backends.executorch import export_text
    from edgec.models import load_model
    from edgec.models.text_export import text_export_module
    from edgec.runtime.runners import open_runner

    model = load_model(tiny_edgec)
    module, _ = text_export_module(model)
    rec = export_text(module, model.context_length, tmp_path / "text.pte")
    assert rec["inputs"][0]["dtype"] == "int32" and rec["delegation"]["delegated_subgraphs"] >= 1
    ids = np.asarray(model.tokenizer(["a photo of a red circle", "a blue square"]), np.int32)
    got = open_runner(tmp_path / "text.pte", "executorch")(ids)
    np.testing.assert_allclose(got, model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy(), atol=1e-5)

