"""Host/device-side tokenisation for a compiled text tower, from the shipped ``tokenizer/`` folder.

numpy only (no torch): ``edgec verify`` tokenises the golden prompts and captions with exactly
the files an app ships. Two kinds, as the manifest's ``tokenizer`` record says:

- ``word`` (edgec checkpoints): ``vocab.json`` (a list; the id of a word is its index).
  Lower-case the text, take the words matching ``[a-z0-9]+``, map unknown ones to ``<unk>``,
  keep the first ``context_length - 2``, write ``<sot> words... <eot>`` then ``<pad>`` (id 0).
- ``tokenizers`` (Hugging Face, open_clip): ``tokenizer.json`` for the Hugging Face
  ``tokenizers`` library (Rust; bindings exist for Python, Swift, Kotlin via JNI, C++), with
  truncation to ``context_length`` (the end-of-text token kept) and padding to it with ``pad_id``.

Token ids are int32, shape (N, context_length), as the text artifact takes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError, require_module

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIALS = (PAD, SOT, EOT, UNK)
WORD_PATTERN = r"[a-z0-9]+"
_WORD = re.compile(WORD_PATTERN)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Lower-cased word-level tokenizer with a fixed vocabulary (edgec's own checkpoints).

    ``<sot> w1 w2 ... <eot> <pad> ...``; long texts are cut so that ``<eot>`` always stays.
    Unknown words become ``<unk>``.
    """

    def __init__(self, vocab: Sequence[str], context_length: int) -> None:
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {list(SPECIALS)}")
        if context_length < 3:
            raise ValueError("context_length must be at least 3")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int) -> WordTokenizer:
        found = sorted({w for t in texts for w in words(t)})
        return cls(list(SPECIALS) + found, context_length)

    @property
    def eot_id(self) -> int:
        return self.index[EOT]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int64)
        unk, keep = self.index[UNK], self.context_length - 2
        for row, text in enumerate(texts):
            ids = [self.index.get(w, unk) for w in words(text)][:keep]
            seq = [self.index[SOT], *ids, self.index[EOT]]
            out[row, : len(seq)] = seq
        return out


class TokenizersTokenizer:
    """A ``tokenizer.json`` run by the ``tokenizers`` library, truncated and padded to the context length."""

    def __init__(self, path: Path, context_length: int, pad_id: int, pad_token: str | None = None) -> None:
        tokenizers = require_module("tokenizers", install="tokenizers", purpose="tokenising text for a text tower")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
            raise InputError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}", hint="compile the target again") from None
        self.tok.enable_truncation(max_length=context_length)
        self.tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token or self.tok.id_to_token(pad_id) or "")
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([e.ids for e in self.tok.encode_batch(list(texts))], np.int64)


def load_tokenizer(folder: str | Path, record: dict):
    """The tokenizer a manifest's ``tokenizer`` record describes, from the target folder ``folder``."""
    from ..manifest import inside

    folder = Path(folder)
    kind = record.get("kind")
    root = inside(folder, record.get("folder", "tokenizer"), "manifest.json: tokenizer.folder")
    try:
        length = int(record["context_length"])
        if kind == "word":
            vocab = json.loads(inside(root, record.get("vocab", "vocab.json"), "tokenizer.vocab").read_text(encoding="utf-8"))
            return WordTokenizer(vocab, length)
        if kind == "tokenizers":
            return TokenizersTokenizer(inside(root, record.get("file", "tokenizer.json"), "tokenizer.file"), length,
                                       int(record["pad_id"]), record.get("pad_token"))
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise InputError(f"{folder}: the tokenizer record or files are invalid ({type(exc).__name__}: {exc})",
                         hint="compile the target again") from None
    raise InputError(f"{folder}: unknown tokenizer kind {kind!r} in manifest.json", hint="compile with this edgec version")


def tokenize(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int32 ids (N, context_length), as the text artifact takes them."""
    return np.asarray(tokenizer(list(texts)), np.int32)
