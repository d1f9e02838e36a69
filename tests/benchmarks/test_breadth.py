"""bench-breadth's table: a run of some models or targets adds to the rows and cells of earlier runs."""

from __future__ import annotations

import json

from edgec.benchmarks.breadth import columns, main, markdown, merge_rows


def _cell(**kw):
    return {"compile_exit": 0, "build_s": 10, "mb": 1.5, "verify_exit": 0, "cosine": 0.99, **kw}


def _rows():
    return [{"model": "open_clip ViT-B-32", "inspect": {"image_macs": 4.41e9, "onnx_macs": 4.41e9},
             "targets": {"cpu": _cell(), "android": _cell(delegated_share=0.68,
                                                         rewrites={"layer_norm": 26, "attention": 0})}},
            {"model": "HF CLIPConfig()", "inspect": {"image_macs": 4.41e9, "onnx_macs": 4.41e9,
                                                     "image_attention_macs": 0.18e9, "onnx_attention_macs": 0.18e9},
             "targets": {"cpu": _cell()}}]


def test_a_rerun_replaces_its_own_cells_and_keeps_the_others():
    again = {"model": "open_clip ViT-B-32", "inspect": {"image_macs": 4.41e9, "onnx_macs": 4.41e9,
                                                        "image_attention_macs": 0.18e9, "onnx_attention_macs": 0.18e9},
             "targets": {"android": _cell(delegated_share=0.95)}}
    rn50 = {"model": "open_clip RN50", "targets": {}}
    merged = merge_rows(_rows(), [rn50, again])
    assert [r["model"] for r in merged] == ["open_clip ViT-B-32", "HF CLIPConfig()", "open_clip RN50"]  # MODELS order
    vit = merged[0]
    assert vit["targets"]["android"]["delegated_share"] == 0.95 and "cpu" in vit["targets"]
    assert vit["inspect"]["image_attention_macs"] == 0.18e9
    # a row whose run has not reached inspect yet keeps the earlier figures
    assert merge_rows(_rows(), [{"model": "HF CLIPConfig()", "targets": {}}])[1]["inspect"]["image_macs"] == 4.41e9


def test_the_table_has_every_measured_target_and_the_attention_split():
    rows = _rows()
    assert columns(rows, ["cpu"]) == ["cpu", "android"]
    table = markdown(rows, columns(rows, ["cpu"]), "2 cores")
    assert "| HF CLIPConfig() | 4.41 G / 4.41 G (attention matmuls 0.18 G / 0.18 G) | passed" in table
    assert "XNNPACK 68.0% (rewritten: 26 LayerNorm, 0 attention)" in table
    assert "HF CLIPConfig() on android" in table  # the cell no run measured is named
    assert "HF SiglipConfig()" in table.split("Not measured")[1]


def test_table_only_rewrites_the_section_from_the_work_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "results.json").write_text(json.dumps(_rows()))
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nother section stays\n")
    assert main(["--work", str(work), "--benchmarks", str(bench), "--table-only", "--targets", "cpu"]) == 0
    text = bench.read_text()
    assert "other section stays" in text and "| open_clip ViT-B-32 |" in text and "| android |" in text
