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
    (tmp_path / "proj" / "teacher").mkdir(parents=True)
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
        ("[student]\nimage_size = 4\n", ["student.image_size", "must be 16 to 1024, got 4"]),
        ("[distill]\nepochs = 99999999999999999999999\n", ["distill.epochs", "must be 1 to 10000"]),
        ("[distill]\nlr = 0.0\n", ["distill.lr", "must be above 0 up to 10, got 0"]),
        ("[distill.losses]\nlogit = 1e9\n", ["distill.losses.logit", "must be 0 to 100"]),
        ("[calibration]\nnum_images = 0\n", ["calibration.num_images", "must be 1 to 100000"]),
        ("[model]\npath = 'm'\ntrust_pickle = true\n", ["model.trust_pickle", "cannot allow unpickling",
                                                         "--trust-pickle", "EDGEC_TRUST_PICKLE"]),
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


NUMERIC = (int, float, "int", "float", "int | None", "float | None")


def _numeric_fields(section):
    import typing

    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        args = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}
        if args & {int, float} and bool not in args:
            yield f


@pytest.mark.parametrize("section", [*SECTIONS, cfg.QuantizeTarget, cfg.EdgecConfig], ids=lambda s: s.__name__)
def test_every_numeric_key_has_a_sane_range(section):
    from edgec.schema import value_range

    fields = list(_numeric_fields(section))
    missing = [f.name for f in fields if value_range(f) is None]
    assert not missing, f"{section.__name__}: no range for {missing}"


def test_cli_overrides_are_checked_like_the_file(tmp_path):
    path = write(tmp_path, "[model]\npath = 'm'\n[data]\ntrain = 'd'\n")
    for argv, needle in ((["--epochs", "0"], "--epochs: must be 1 to 10000, got 0"),
                         (["--epochs", "99999999999999999999999"], "--epochs: must be 1 to 10000"),
                         (["--lr", "nan"], "--lr: expected a finite number"),
                         (["--batch-size", "-2"], "--batch-size: must be 1 to 65536, got -2")):
        result = runner.invoke(app, ["distill", "--config", str(path), "--no-progress", *argv])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {needle}" or result.stderr.strip().startswith(f"error: {needle}"), result.stderr
    result = runner.invoke(app, ["quantize", "--config", str(path), "--tolerance", "1.5"])
    assert result.exit_code == 2 and "--tolerance: must be 0 to 0.99" in result.stderr


def test_the_model_section_never_trusts_pickles():
    assert cfg.ModelSection(path="m").trust_pickle is False
    assert "trust_pickle" not in {f.name for f in dataclasses.fields(cfg.ModelSection)}
    with pytest.raises(ConfigError, match="cannot allow unpickling"):
        cfg.config_from_dict({"model": {"path": "m", "trust_pickle": True}})


def test_init_writes_ranges_and_refuses_a_missing_model(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "p" / "edgec.toml").read_text()
    assert "# passes over the training images (1 to 10000)" in text and "trust_pickle" not in text
    result = runner.invoke(app, ["init", str(tmp_path / "q"), "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.stderr and not (tmp_path / "q" / "edgec.toml").exists()
