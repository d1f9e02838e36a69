"""Text towers of every model kind export with int32 ids and no ArgMax, and match the teacher."""

from __future__ import annotations

import numpy as np
import pytest


def _load(request, kind: str):
    from edgec.models import load_model

    if kind == "open_clip":
        ckpt, arch = request.getfixturevalue("tiny_open_clip")
        return load_model(ckpt, arch=str(arch))
    return load_model(request.getfixturevalue({"edgec": "tiny_edgec", "hf-clip": "tiny_hf_clip",
                                                "hf-siglip": "tiny_hf_siglip"}[kind]))


def _ids(model, rng) -> np.ndarray:
    """Tokenised prompts when the model has a tokenizer, else random ids; plus rows whose EOT id repeats
    (HF CLIP pads with its EOS) and rows with the EOT early, to exercise the first-position rule."""
    L = model.context_length
    if model.tokenizer is not None:
        ids = model.tokenizer(["a photo of a red circle.", "a blue square", "a", "circle circle circle circle circle"])
    else:
        ids = rng.integers(3, 90, size=(4, L))
    return np.asarray(ids, np.int64)


@pytest.mark.parametrize("kind", ["edgec", "hf-clip", "hf-siglip", "open_clip"])
def test_text_tower_onnx_int32_no_argmax_matches_teacher(kind, request, tmp_path, torch):
    import onnx
    import onnxruntime as ort

    from edgec.backends.onnx import export_text
    from edgec.models.text_export import text_export_module

    model = _load(request, kind)
    module, info = text_export_module(model)
    ids = _ids(model, np.random.default_rng(0))
    ref = model.encode_text(torch.from_numpy(ids)).numpy()
    with torch.no_grad():
        ours = module(torch.from_numpy(ids.astype(np.int32))).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    path = tmp_path / "text.onnx"
    rec = export_text(module, model.context_length, path)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "ArgMax" not in ops and "ArgMin" not in ops
    (inp,) = graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.INT64 for i in graph.input)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"token_ids": ids.astype(np.int32)})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert rec["inputs"][0]["dtype"] == "int32" and info["context_length"] == model.context_length


def test_first_position_rule_when_the_eot_id_repeats(torch):
    """HF CLIP pads with its EOS id: the pooled position is the first EOS, not a later pad."""
    from edgec.models.text_export import PooledText

    class Positions(torch.nn.Module):  # feature = position, so the output says which position was pooled
        def forward(self, ids):
            return torch.arange(5.0).repeat(ids.shape[0], 1).unsqueeze(-1)

    tower = PooledText(Positions(), "eot", 5, eot_id=1)
    ids = torch.tensor([[0, 7, 1, 1, 1], [0, 1, 1, 1, 1], [0, 7, 8, 9, 1]], dtype=torch.int32)
    assert tower(ids).squeeze(-1).tolist() == [2.0, 1.0, 4.0]
    tower.pool = "max"  # open_clip 'argmax': first position of the largest id
    ids = torch.tensor([[0, 9, 3, 9, 0]], dtype=torch.int32)
    assert tower(ids).squeeze(-1).tolist() == [1.0]


@pytest.mark.parametrize("kind", ["edgec", "hf-clip", "open_clip"])
def test_shipped_tokenizer_runs_torch_free_and_gives_the_teachers_ids(kind, request, tmp_path):
    import json
    import subprocess
    import sys

    from edgec.models.text_export import ship_tokenizer

    model = _load(request, kind)
    texts = ["a photo of a red circle.", "A  BLUE square!", "", "circle " * 30]
    record = ship_tokenizer(model, tmp_path / "tokenizer", check=texts)
    assert record["context_length"] == model.context_length and record["checked_texts"] == len(texts)
    (tmp_path / "record.json").write_text(json.dumps(record))
    code = ("import json, sys; from edgec.runtime.tokenize import load_tokenizer, tokenize; "
            f"r = json.load(open({str(tmp_path / 'record.json')!r})); "
            f"ids = tokenize(load_tokenizer({str(tmp_path)!r}, r), {texts!r}); "
            "assert 'torch' not in sys.modules; print(json.dumps(ids.tolist(), separators=(',', ':')), ids.dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ")
    assert out[-1].strip() == "int32"
    assert json.loads(out[0]) == np.asarray(model.tokenizer(texts)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["open_clip", "hf-clip"])
def test_text_tower_converts_to_litert_with_int32_ids(kind, request, tmp_path, torch):
    """The open_clip text tower that fails LiteRT conversion on its int64 ArgMax converts with mask pooling."""
    from edgec.backends.litert import export_text
    from edgec.models.text_export import text_export_module
    from edgec.runtime.runners import open_runner

    model = _load(request, kind)
    module, _ = text_export_module(model)
    rec = export_text(module, model.context_length, tmp_path / "text.tflite")
    ids = _ids(model, np.random.default_rng(0))
    got = open_runner(tmp_path / "text.tflite", "litert")(ids.astype(np.int32))
    np.testing.assert_allclose(got, model.encode_text(torch.from_numpy(ids)).numpy(), atol=1e-5)
    assert rec["inputs"][0]["dtype"] == "int32"


def test_text_tower_asked_for_without_tokenizer_is_refused(tmp_path, shapes_data, tiny_hf_siglip):
    """--towers image,text on a model without tokenizer files: exit 2 naming the cause, before anything is built."""
    from typer.testing import CliRunner

    from edgec.cli import app
    from tests.verify.test_verify import write_project

    config = write_project(tmp_path, shapes_data, teacher=tiny_hf_siglip)
    result = CliRunner().invoke(app, ["compile", "--config", str(config), "--target", "cpu", "--no-distill",
                                      "--no-progress", "--towers", "image,text"])
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: ") and "no tokenizer" in line and "Traceback" not in result.output
    assert not (tmp_path / "build" / "cpu").exists()
