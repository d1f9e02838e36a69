"""edgec.toml: init writes a file that loads; errors name file, key and expected type."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgec import config as cfg
from edgec.cli import app
from edgec.errors import ConfigError, EdgecError
from edgec.schema import from_dict, to_dict

runner = CliRunner()

SECTIONS = [cfg.ModelSection, cfg.StudentSection, cfg.DataSection, cfg.LossWeights, cfg.DistillSection,
            cfg.CalibrationSection, cfg.QuantizeSection, cfg.TargetsSection]


def write(tmp_path, text: str):
    path = tmp_path / "edgec.toml"
    path.write_text(text)
    return path


def test_init_writes_an_annotated_file_that_loads(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "proj"), "--model", "teacher"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "proj" / "edgec.toml"
    assert f"wrote {path}" in result.stdout
    text = path.read_text()
    assert "# timm model name of the on-device image encoder" in text
    loaded = cfg.load_config(path)
    assert loaded.model.path == "teacher"
    assert loaded.resolve(loaded.model.path) == (tmp_path / "proj" / "teacher").resolve()
    assert loaded.to_dict() == dataclasses.replace(cfg.EdgecConfig(), model=cfg.ModelSection(path="teacher")).to_dict()


def test_init_refuses_to_overwrite(tmp_path):
    assert runner.invoke(app, ["init", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["init", str(tmp_path)])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert runner.invoke(app, ["init", str(tmp_path), "--force"]).exit_code == 0


def test_every_config_round_trips_through_json():
    full = cfg.EdgecConfig(model=cfg.ModelSection(path="m", kind="open_clip", arch="ViT-B-32"),
                           student=cfg.StudentSection(name="mobilevit_xs", image_size=96, targets={"edgetpu": "x"}),
                           gates={"default": ["agreement>=0.9"], "edgetpu": ["cosine_mean>=0.95"]})
    data = json.loads(json.dumps(full.to_dict()))
    assert cfg.config_from_dict(data).to_dict() == full.to_dict()
    for section in SECTIONS:
        required = {f.name: "x" for f in dataclasses.fields(section)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        obj = section(**required)
        assert from_dict(section, json.loads(json.dumps(to_dict(obj))), source="t") == obj


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[distill]\nepochs = 'ten'\n", ["distill.epochs", "expected integer", "string 'ten'"]),
        ("[distill]\nepoch = 3\n", ["distill.epoch", "unknown key", "did you mean 'epochs'"]),
        ("[distil]\nepochs = 3\n", ["unknown key 'distil'", "did you mean 'distill'"]),
        ("[distill.losses]\nfeature_cosine = true\n", ["distill.losses.feature_cosine", "expected number", "boolean"]),
        ("[data]\nprompts = 'a photo of {}'\n", ["data.prompts", "expected list of string"]),
        ("[data]\nprompts = ['a photo']\n", ["data", "{}"]),
        ("[quantize]\nmethod = 'kl'\n", ["quantize.method", "one of 'minmax', 'percentile', 'entropy'"]),
        ("[model]\nkind = 'hf'\n", ["model.path", "missing required key"]),
        ("[gates]\ndefault = ['agrement>=0.9']\n", ["unknown metric 'agrement'", "did you mean 'agreement'"]),
        ("[gates]\ncpu = ['agreement => 0.9']\n", ["not of the form"]),
        ("[student]\nimage_size = 4\n", ["student", "between 16 and 1024"]),
        ("version = 99\n", ["newer than this edgec"]),
        ("[distill\n", ["not valid TOML"]),
    ],
)
def test_config_errors_name_file_key_and_type(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        cfg.load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, message


def test_config_error_through_the_cli_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "[model]\npath = 3\n")
    result = runner.invoke(app, ["inspect", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: model.path: expected string, got integer 3"


def test_inspect_reads_the_model_from_the_config(tmp_path, tiny_edgec):
    write(tmp_path, f"[model]\npath = {json.dumps(str(tiny_edgec))}\n")
    result = runner.invoke(app, ["inspect", "--config", str(tmp_path / "edgec.toml"), "--no-macs", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "tiny-edgec"


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["inspect", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "edgec init" in result.stderr


def test_gates_per_target_fall_back_to_default():
    c = cfg.config_from_dict({"gates": {"default": ["agreement>=0.97"], "edgetpu": ["agreement>=0.9"]}})
    assert c.gates_for("edgetpu") == ["agreement>=0.9"]
    assert c.gates_for("cpu", ["cosine_mean>=0.9"]) == ["agreement>=0.97"]
    assert cfg.config_from_dict({}).gates_for("cpu", ["cosine_mean>=0.9"]) == ["cosine_mean>=0.9"]


def test_generated_file_is_plain_toml():
    from edgec.init import render

    data = tomllib.loads(render("m"))
    assert data["model"]["path"] == "m" and data["distill"]["losses"]["feature_cosine"] == 1.0
    assert data["gates"] == {}


def test_every_known_metric_parses_as_a_gate():
    from edgec.verify.gates import METRICS, parse_gate

    for metric in METRICS:
        gate = parse_gate(f"{metric}>=0.5")
        assert gate.metric == metric and gate.holds(0.5) and not gate.holds(0.4)


# ---- the parser is fuzzed: any file either loads or fails with the documented one-line error ----

def _toml_value():
    scalars = (st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=6)


def _section_keys():
    names = {"model": cfg.ModelSection, "student": cfg.StudentSection, "data": cfg.DataSection,
             "distill": cfg.DistillSection, "calibration": cfg.CalibrationSection, "quantize": cfg.QuantizeSection,
             "targets": cfg.TargetsSection}
    return {section: [f.name for f in dataclasses.fields(klass)] + ["typo_key"] for section, klass in names.items()}


KEYS = _section_keys()


def _dump(data: dict) -> str:
    """A small TOML writer for the fuzzer (values as inline tables/arrays)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)  # TOML spells inf and nan the way Python's repr does
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
    lines = []
    for section, body in data.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{json.dumps(k)} = {val(v)}" for k, v in body.items()]
        else:
            lines.insert(0, f"{section} = {val(body)}")
    return "\n".join(lines) + "\n"


@st.composite
def config_dicts(draw):
    """Known sections with known (and misspelt) keys holding arbitrary values, plus stray top-level entries."""
    data = {}
    for name in draw(st.lists(st.sampled_from([*KEYS, "gates", "version", "root", "nonsense"]), max_size=4, unique=True)):
        if name in KEYS:
            data[name] = draw(st.dictionaries(st.sampled_from(KEYS[name]), _toml_value(), max_size=4))
        else:
            data[name] = draw(_toml_value())
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=config_dicts())
def test_fuzzed_configs_load_or_fail_with_the_documented_error(tmp_path, data):
    path = write(tmp_path, _dump(data))
    try:
        loaded = cfg.load_config(path)
    except EdgecError as exc:
        assert exc.exit_code == 2 and exc.message.strip()
        return
    assert isinstance(loaded, cfg.EdgecConfig)
    assert cfg.config_from_dict(json.loads(json.dumps(loaded.to_dict()))).to_dict() == loaded.to_dict()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_config_load_or_fail_cleanly(tmp_path, raw):
    path = tmp_path / "edgec.toml"
    path.write_bytes(raw)
    try:
        cfg.load_config(path)
    except EdgecError as exc:
        assert exc.exit_code == 2


@pytest.mark.parametrize("text", ["[distill]\nlr = nan\n", "[distill.losses]\nfeature_cosine = inf\n"])
def test_non_finite_numbers_are_refused_where_they_are_written(tmp_path, text):
    with pytest.raises(ConfigError, match="finite number"):
        cfg.load_config(write(tmp_path, text))
