"""``edgec init``: an annotated edgec.toml written from the schema, so it always loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG, EdgecConfig, ModelSection, config_from_dict
from .errors import InputError
from .manifest import atomic_write_text
from .schema import to_dict, value_range

HEADER = """\
# edgec.toml: the whole pipeline for one model. Every key is optional unless marked required;
# the values shown are the defaults. Paths are relative to this file. Docs: edgec --help.
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(type(value))


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else json.dumps(name)


def _section(name: str, obj: Any, lines: list[str], overrides: dict[str, Any]) -> None:
    nested = []
    lines.append(f"\n[{name}]")
    for f in dataclasses.fields(obj):
        if not f.init or f.name == "root":
            continue
        value = overrides.get(f.name, getattr(obj, f.name))
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{f.name}", value))
            continue
        help_text = f.metadata.get("help", "")
        span = value_range(f)
        if help_text:
            lines.append(f"# {help_text}" + (f" ({span})" if span else ""))
        if value is None:
            lines.append(f"# {f.name} = ...")
        else:
            lines.append(f"{f.name} = {_toml_value(to_dict(value))}")
    for sub_name, sub in nested:
        _section(sub_name, sub, lines, {})


def render(model_path: str | None = None) -> str:
    defaults = EdgecConfig()
    lines = [HEADER.rstrip("\n"), f"version = {defaults.version}"]
    model = ModelSection(path=model_path or "path/to/model")
    if model_path is None:
        lines.append("\n# [model] is required by distill/compile: point path at your trained model.")
    _section("model", model, lines, {})
    for f in dataclasses.fields(defaults):
        if f.name in ("version", "model", "root", "gates"):
            continue
        _section(f.name, getattr(defaults, f.name), lines, {})
    lines.append("\n# Verification gates per target; 'default' applies to targets without their own list,")
    lines.append("# and without either each target file's gates apply (edgec targets --json shows them).")
    lines.append("[gates]")
    lines.append('# default = ["agreement>=0.97", "cosine_mean>=0.95"]')
    lines.append('# edgetpu = ["agreement>=0.95"]')
    return "\n".join(lines) + "\n"


def init_project(directory: str | Path = ".", *, model_path: str | None = None, force: bool = False) -> Path:
    directory = Path(directory)
    path = directory / DEFAULT_CONFIG
    if path.exists() and not force:
        raise InputError(f"{path} already exists", hint="pass --force to overwrite it")
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is not a folder", hint="give a project folder (created if missing)")
    if model_path is not None:
        model = Path(model_path).expanduser()
        where = model if model.is_absolute() else directory / model
        if not where.exists():
            raise InputError(f"--model: {model_path} does not exist" + ("" if model.is_absolute() else f" (in {directory})"),
                             hint="give the path of the trained model; a relative path is relative to the project folder")
    text = render(model_path)
    import tomllib

    config_from_dict(tomllib.loads(text), root=directory, source=str(path))  # what we write must load
    return atomic_write_text(path, text)
