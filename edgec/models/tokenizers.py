"""Tokenizers that produce fixed-length int64 id arrays, as the text towers take them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIALS = (PAD, SOT, EOT, UNK)
_WORD = re.compile(r"[a-z0-9]+")


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


class HFTokenizer:
    """A Hugging Face tokenizer padded to the text tower's context length."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="np")
        return np.asarray(enc["input_ids"], np.int64)


class OpenClipTokenizer:
    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts), context_length=self.context_length).numpy().astype(np.int64)
