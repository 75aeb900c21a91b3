"""Tokenization with word boundaries, shared by the training stream, export and inference.

Texts are cleaned by pertvl.data.text.clean_text first, so a *word* is a whitespace-separated
token of the cleaned text. We hand the words to the tokenizer pre-split
(`is_pretokenized=True`) so that the tokenizer's word ids index exactly those words — the
BERT pre-tokenizer would otherwise split "t-spine" or "2.5" into several "words".

Works on a `tokenizers.Tokenizer` (the fast backend of any HF tokenizer, or one loaded from a
tokenizer.json) and returns numpy arrays, so it needs neither torch nor transformers' models
(pertvl.infer relies on that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Encoded:
    input_ids: np.ndarray  # [N, L] int64
    attention_mask: np.ndarray  # [N, L] int64
    word_ids: np.ndarray  # [N, L] int64: index of the word each token belongs to, -1 for special/pad

    @property
    def num_words(self) -> np.ndarray:
        """Words of each text that survived truncation, [N]."""
        return (self.word_ids.max(axis=1) + 1).clip(min=0)


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from a folder with tokenizer.json (or the file itself)."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (export the tokenizer with save_pretrained)")
    return Tokenizer.from_file(path)


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` of an HF fast tokenizer, or the argument if it is one already."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"need a fast tokenizer (tokenizers.Tokenizer), got {type(tokenizer).__name__}")
    return backend


def encode_texts(tokenizer, texts: list[str], max_length: int = 128, pad_to: int | None = None) -> Encoded:
    """Tokenize cleaned texts as pre-split words, truncate to `max_length`, pad to the longest
    (or to `pad_to`). Empty texts give just [CLS] [SEP]."""
    backend = backend_of(tokenizer)
    backend.no_padding()
    backend.enable_truncation(max_length=max_length)
    encs = backend.encode_batch([t.split() for t in texts], is_pretokenized=True)
    length = max([len(e.ids) for e in encs] + [pad_to or 0, 1])
    n = len(encs)
    input_ids = np.full((n, length), _pad_id(backend), dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    word_ids = np.full((n, length), -1, dtype=np.int64)
    for i, e in enumerate(encs):
        k = len(e.ids)
        input_ids[i, :k] = e.ids
        attention_mask[i, :k] = 1
        word_ids[i, :k] = [-1 if w is None else w for w in e.word_ids]
    return Encoded(input_ids, attention_mask, word_ids)


def _pad_id(backend) -> int:
    for tok in ("[PAD]", "<pad>"):
        tid = backend.token_to_id(tok)
        if tid is not None:
            return int(tid)
    return 0
