"""Tokenizers that produce fixed-length int64 id arrays, as the text towers take them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the word tokenizer is torch-free and lives with the runtime: verify and apps tokenise with it
from ..runtime.tokenize import EOT, PAD, SOT, SPECIALS, UNK, WordTokenizer, words

__all__ = ["EOT", "PAD", "SOT", "SPECIALS", "UNK", "HFTokenizer", "OpenClipTokenizer", "WordTokenizer", "words"]


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
