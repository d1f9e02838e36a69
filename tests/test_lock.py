"""edgec.lock: decisions written as readable TOML, reused only for the inputs they were made from."""

from __future__ import annotations

import tomllib

import pytest

from edgec.lock import DecisionLock, LockOutOfDate, dumps_decisions, read_decisions


def test_decisions_round_trip_through_readable_toml(tmp_path):
    data = {"targets": {"cpu": {"precision": {"inputs": "ab" * 32, "chosen": "int8", "gates": ["agreement>=0.97"],
                                              "candidates": [{"precision": "int8", "median_ms": 0.41, "passed": True},
                                                             {"precision": "fp32", "median_ms": 0.52, "passed": True}]}},
                        "jetson-fp16": {"float_layers": {"inputs": "cd" * 32, "float_layers": ['/enc/Conv "q"', "/x"],
                                                         "search": {"loss": 1e-4, "met": True, "agreement": None}}}}}
    text = dumps_decisions(data)
    assert text.startswith("# edgec.lock") and "[targets.cpu.precision]" in text and 'chosen = "int8"' in text
    back = tomllib.loads(text)
    assert back["targets"]["cpu"]["precision"]["candidates"][1]["median_ms"] == 0.52
    assert back["targets"]["jetson-fp16"]["float_layers"]["float_layers"] == ['/enc/Conv "q"', "/x"]
    assert "agreement" not in back["targets"]["jetson-fp16"]["float_layers"]["search"]  # None is left out
    assert dumps_decisions(back) == text  # stable: rewriting an unchanged lock changes no byte


def test_a_decision_is_reused_only_for_its_inputs(tmp_path):
    path = tmp_path / "edgec.lock"
    lock = DecisionLock(path)
    assert lock.get("cpu", "precision", "k1") is None
    lock.put("cpu", "precision", "k1", {"chosen": "fp32"})
    lock.save()
    assert DecisionLock(path).get("cpu", "precision", "k1")["chosen"] == "fp32"
    assert DecisionLock(path).get("cpu", "precision", "k2") is None  # other inputs: decide again
    assert DecisionLock(path, reselect=True).get("cpu", "precision", "k1") is None
    other = DecisionLock(path)  # a second writer (another target) merges, it does not overwrite
    other.put("jetson", "float_layers", "k3", {"float_layers": ["a"]})
    other.save()
    assert set(read_decisions(path)["targets"]) == {"cpu", "jetson"}


def test_locked_refuses_a_missing_or_stale_decision(tmp_path):
    path = tmp_path / "edgec.lock"
    lock = DecisionLock(path)
    lock.put("cpu", "precision", "k1", {"chosen": "int8"})
    lock.save()
    assert DecisionLock(path, locked=True).get("cpu", "precision", "k1")["chosen"] == "int8"
    with pytest.raises(LockOutOfDate, match="made from other inputs") as info:
        DecisionLock(path, locked=True).get("cpu", "precision", "k2")
    assert info.value.exit_code == 2 and "--reselect" in info.value.hint
    with pytest.raises(LockOutOfDate, match="has none"):
        DecisionLock(path, locked=True).get("android", "precision", "k1")
    assert DecisionLock(path, locked=True, reselect=True).get("cpu", "precision", "k2") is None


def test_a_broken_lock_file_is_a_one_line_error(tmp_path):
    from edgec.errors import InputError

    path = tmp_path / "edgec.lock"
    path.write_text("[targets.cpu\n")
    with pytest.raises(InputError, match="not a valid edgec.lock") as info:
        read_decisions(path)
    assert info.value.exit_code == 2 and "\n" not in info.value.message
