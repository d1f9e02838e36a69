"""Unpickling a checkpoint (code from the file runs) only when the person running edgec trusts it,
pinned to the file's sha256; never from edgec.toml."""

from __future__ import annotations

import argparse

import pytest

from edgec import trust
from edgec.errors import ConfigError, InputError
from edgec.manifest import sha256_file


@pytest.fixture()
def pickled(tmp_path, torch):
    """A checkpoint a real training script writes: the state dict plus its argparse arguments (a Python
    object, so weights_only loading refuses it)."""
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


def test_refused_without_trust_and_the_hint_names_the_digest(pickled, monkeypatch):
    from edgec.models.openclip import read_checkpoint

    monkeypatch.delenv(trust.ENV, raising=False)
    with pytest.raises(InputError) as info:
        read_checkpoint(pickled)
    assert "--trust-pickle" in str(info.value) and sha256_file(pickled) in str(info.value)


def test_environment_trust_is_pinned_to_the_digest(pickled, monkeypatch, tmp_path, torch):
    from edgec.models.openclip import read_checkpoint

    monkeypatch.setenv(trust.ENV, sha256_file(pickled).upper())
    assert set(read_checkpoint(pickled)) == {"w"}
    other = tmp_path / "other.pt"  # same kind of file, other bytes: not trusted
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.2)}, other)
    with pytest.raises(InputError, match="pickled Python objects"):
        read_checkpoint(other)
    monkeypatch.setenv(trust.ENV, "1")
    with pytest.raises(ConfigError, match="sha256"):
        read_checkpoint(pickled)


def test_trust_file_pins_what_the_command_line_names(pickled, monkeypatch, torch):
    from edgec.models.openclip import read_checkpoint

    monkeypatch.delenv(trust.ENV, raising=False)
    digest = trust.trust_file(pickled)
    assert digest == sha256_file(pickled) and trust.pickle_trusted(pickled)
    assert set(read_checkpoint(pickled)) == {"w"}
    torch.save({"state_dict": {"w": torch.zeros(3)}, "args": argparse.Namespace(lr=0.3)}, pickled)  # swapped
    assert not trust.pickle_trusted(pickled)
    with pytest.raises(InputError):
        read_checkpoint(pickled)
