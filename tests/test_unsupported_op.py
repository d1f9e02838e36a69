"""A model with an op the target cannot run: exit 2, the op and the layer named, a fallback suggested,
no target folder left behind."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgec.cli import app

from .verify.test_verify import write_project

runner = CliRunner()


def _odd_encoder(torch, encoder):
    """``encoder`` followed by a layer calling aten::erfinv, which neither the ONNX exporter (opset 17)
    nor litert-torch converts."""

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.erfinv(torch.tanh(x) * 0.5)

    class WithOdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = encoder
            self.post = torch.nn.Sequential(torch.nn.Identity(), Odd())

        def forward(self, x):
            return self.post(self.backbone(x))

    return WithOdd().eval()


def test_unexportable_op_names_op_layer_and_fallback(tmp_path, shapes_data, tiny_edgec, monkeypatch, torch):
    import edgec.models.intake

    real = edgec.models.intake.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        model.image_encoder = _odd_encoder(torch, model.image_encoder)
        return model

    monkeypatch.setattr(edgec.models.intake, "load_model", load_model)  # what compile loads the teacher with
    config = write_project(tmp_path, shapes_data, teacher=tiny_edgec)
    result = runner.invoke(app, ["compile", "--config", str(config), "--target", "cpu", "--no-distill", "--no-progress"])
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "cannot convert op aten::erfinv in layer post.1 (Odd)" in err
    assert "fallbacks: compile for another target" in err and "[student] targets" in err
    build = tmp_path / "build"
    assert not (build / "cpu").exists()
    assert not [p for p in build.iterdir() if p.name.startswith(".cpu")]  # no partial folder either


def test_litert_conversion_error_names_the_layer(torch, tmp_path):
    from edgec.backends.litert import export
    from edgec.errors import InputError

    enc = _odd_encoder(torch, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                                  torch.nn.Flatten()))
    with pytest.raises(InputError) as info:
        export(enc, (1, 16, 16, 3), tmp_path / "odd.tflite")
    assert "LiteRT conversion cannot convert op aten::erfinv in layer post.1 (Odd)" in str(info.value)
    assert "cpu or jetson (ONNX)" in info.value.hint and not (tmp_path / "odd.tflite").exists()


def test_tflite_tensor_names_give_the_module_path():
    from edgec.backends.diagnose import tflite_layer

    name = ("litert_torch._convert.to_channel_last_io.ChannelLastIOWrapper/edgec.backends.onnx.NormalizedEmbedding_wrapped/"
            "edgec.models.student.Student_encoder/timm.models.byobnet.ByobNet_backbone/"
            "torch.nn.modules.container.Sequential_stages/torch.nn.modules.container.Sequential_2/"
            "timm.models.byobnet.BottleneckBlock_0/timm.layers.conv_bn_act.ConvNormAct_conv2_kxk/"
            "timm.layers.norm_act.BatchNormAct2d_bn;;other")
    assert tflite_layer(name) == "backbone.stages.2.0.conv2_kxk.bn"
    assert tflite_layer("serving_default_args_0:0") is None


def test_op_report_records_the_layer_of_each_op(torch, tmp_path):
    from edgec.backends.litert import export, op_report

    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    export(enc.eval(), (1, 16, 16, 3), tmp_path / "m.tflite")
    ops = op_report(tmp_path / "m.tflite", supported=frozenset({"CONV_2D"}))["ops"]
    conv = next(o for o in ops if o["op"] == "CONV_2D")
    assert conv["layer"] in ("0", "1") and conv["float"] is True  # conv + fused ReLU
    assert json.dumps(ops)  # the records stay JSON for the manifest


def test_edgetpu_float_op_error_names_the_op_and_layer(torch, tmp_path):
    """ai-edge-quantizer leaves SIN in float: the fully integer Edge TPU build fails naming it and its layer."""
    import numpy as np

    from edgec import registry
    from edgec.backends.litert import build
    from edgec.errors import EXIT_BAD_INPUT, InputError

    class Wave(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x)

    enc = torch.nn.Sequential()
    enc.add_module("stem", torch.nn.Conv2d(3, 8, 3, padding=1))
    enc.add_module("wave", Wave())
    enc.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    enc.add_module("flat", torch.nn.Flatten())
    enc.add_module("head", torch.nn.Linear(8, 4))

    class Calibration:
        sha256 = "test"

        def __len__(self):
            return 8

        def batches(self, layout, batch_size):
            rng = np.random.default_rng(0)
            for _ in range(8):
                yield rng.standard_normal((1, 16, 16, 3)).astype(np.float32)

    from edgec.quantize import stage

    def quantize(make_program, out):  # the quantize stage as compile hands it to a backend, without a cache
        return stage.run(make_program(Calibration(), "minmax", 99.9), stage.Settings(method="minmax", percentile=99.9),
                         out, log=lambda _: None)

    spec = registry.get("targets", "edgetpu").spec
    with pytest.raises(InputError) as info:
        build(enc.eval(), (1, 16, 16, 3), spec=spec, work=tmp_path, quantize=quantize, options={}, log=lambda _: None)
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert "float ops remain in the int8 model (SIN); the first, #" in str(info.value)
    assert "SIN, is in layer wave" in str(info.value) and "mobilenetv4_conv_small" in info.value.hint
