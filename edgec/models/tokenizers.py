"""Tokenizers that produce fixed-length int64 id arrays, as the text towers take them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the word tokenizer is torch-free and lives with the runtime: verify and apps tokenise with it
from ..runtime.tokenize import EOT, PAD, SOT, SPECIALS, UNK, WordTokenizer, words

__all__ = ["EOT", "PAD", "SOT", "SPECIALS", "UNK", "HFTokenizer", "OpenClipTokenizer", "WordTokenizer", "words"]


def _hf_vocab_size(tokenizer) -> int:
    """One more than the largest id a Hugging Face tokenizer can emit (added and special tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


class HFTokenizer:
    """A Hugging Face tokenizer padded to the text tower's context length."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return _hf_vocab_size(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="np")
        return np.asarray(enc["input_ids"], np.int64)


class OpenClipTokenizer:
    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    @property
    def vocab_size(self) -> int | None:
        """open_clip's SimpleTokenizer says it; its HF-tokenizer wrapper holds a Hugging Face tokenizer."""
        n = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(n, int):
            return n
        hf = getattr(self.tokenizer, "tokenizer", None)
        return _hf_vocab_size(hf) if hf is not None else None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts), context_length=self.context_length).numpy().astype(np.int64)
