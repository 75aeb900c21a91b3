"""Tokenization with word boundaries, shared by the training stream, export and inference.

A *word* is a whitespace-separated token of the cleaned text (pertvl.data.text.clean_text); the words
go to the tokenizer pre-split (`is_pretokenized=True`), so its word ids index exactly those words.
Works on a `tokenizers.Tokenizer` and returns numpy arrays: no torch or transformers models needed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


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


def encode_texts(tokenizer, texts: list[str], max_length: int = 128) -> Encoded:
    """Tokenize cleaned texts as pre-split words, truncate to `max_length`, pad to the longest.
    Empty texts give just [CLS] [SEP]."""
    backend = backend_of(tokenizer)
    backend.no_padding()
    backend.enable_truncation(max_length=max_length)
    encs = backend.encode_batch([t.split() for t in texts], is_pretokenized=True)
    length = max([len(e.ids) for e in encs] + [1])
    rows = [(e.ids, [-1 if w is None else w for w in e.word_ids]) for e in encs]
    return _padded(rows, _pad_id(backend), length)


def _padded(rows: list[tuple[list[int], list[int]]], pad: int, length: int) -> Encoded:
    """(token ids, word ids) rows right-padded to `length` with `pad` (word id -1, attention 0)."""
    n = len(rows)
    input_ids = np.full((n, length), pad, dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    word_ids = np.full((n, length), -1, dtype=np.int64)
    for i, (ids, wids) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        word_ids[i, : len(ids)] = wids
    return Encoded(input_ids, attention_mask, word_ids)


def _pad_id(backend) -> int:
    for tok in ("[PAD]", "<pad>"):
        tid = backend.token_to_id(tok)
        if tid is not None:
            return int(tid)
    return 0


class CachedTokenizer:
    """`encode_texts` with a word -> word-pieces cache for WordPiece (BERT-family) tokenizers.

    Pre-split, a WordPiece tokenizer encodes each word on its own, so a text is [CLS] + its words' pieces
    (cut to max_length) + [SEP]; the perturbations reuse the original's words, so the cache makes the
    1 + 9 texts of a sample much cheaper. The first call is checked against encode_texts token for token;
    other tokenizer models, or any difference, use encode_texts itself: the output is always exactly
    encode_texts'.
    """

    _MAX_CACHE = 1 << 18

    def __init__(self, tokenizer, max_length: int = 128):
        self.backend = backend_of(tokenizer)
        self.max_length = max_length
        self._cache: dict[str, list[int]] = {}
        self._mode: str | None = None  # None until verified, then "fast" or "reference"
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        self._budget = 0
        self._pad = 0

    def __call__(self, texts: list[str]) -> Encoded:
        if self._mode == "fast":
            return self._fast(texts)
        reference = encode_texts(self.backend, texts, max_length=self.max_length)
        if self._mode is None:
            fast = self._fast(texts) if self._setup() else None
            same = fast is not None and all(np.array_equal(getattr(reference, f), getattr(fast, f))
                                            for f in ("input_ids", "attention_mask", "word_ids"))
            if fast is not None and not same:
                log.warning("word-piece cache disagrees with encode_texts for this tokenizer; "
                            "using encode_texts")
            self._mode = "fast" if same else "reference"
        return reference

    def _setup(self) -> bool:
        b = self.backend
        if type(b.model).__name__ != "WordPiece":
            return False
        b.no_padding()
        b.no_truncation()
        full = b.encode(["a"], is_pretokenized=True).ids
        bare = b.encode(["a"], is_pretokenized=True, add_special_tokens=False).ids
        starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
        if not bare or not starts:
            return False
        self._prefix, self._suffix = full[: starts[0]], full[starts[0] + len(bare) :]
        self._budget = self.max_length - len(self._prefix) - len(self._suffix)
        self._pad = _pad_id(b)
        return self._budget > 0

    def _fast(self, texts: list[str]) -> Encoded:
        words = [t.split() for t in texts]
        new = list({w for ws in words for w in ws if w not in self._cache})
        if new:
            if len(self._cache) + len(new) > self._MAX_CACHE:
                self._cache.clear()
            self.backend.no_truncation()
            encs = self.backend.encode_batch([[w] for w in new], is_pretokenized=True,
                                             add_special_tokens=False)
            self._cache.update(zip(new, (e.ids for e in encs), strict=True))
        rows = []
        for ws in words:
            ids, wids = list(self._prefix), [-1] * len(self._prefix)
            room = self._budget
            for j, w in enumerate(ws):
                pieces = self._cache[w][:room]
                ids += pieces
                wids += [j] * len(pieces)
                room -= len(pieces)
                if room <= 0:
                    break
            rows.append((ids + self._suffix, wids + [-1] * len(self._suffix)))
        return _padded(rows, self._pad, max(len(r[0]) for r in rows))


def tokenization_rule(tokenizer, tokenizer_file: str = "tokenizer.json") -> dict:
    """`encode_texts` stated as data for an export's manifest (the max length is the text tower's)."""
    backend = backend_of(tokenizer)
    return {
        "tokenizer_file": tokenizer_file,
        "load": "tokenizers.Tokenizer.from_file",
        "words": "the cleaned text split on single spaces: one 'word' per item",
        "encode": "encode_batch(list of word lists, is_pretokenized=True), special tokens added; no padding, "
        "truncation to max_length tokens",
        "pad_id": _pad_id(backend),
        "padding": "right, to the longest sequence of the batch: input_ids pad_id, attention_mask 0",
        "word_ids": "per token, the index of its word in the word list (Encoding.word_ids); -1 for special and "
        "padding tokens",
        "dtype": "int64",
    }
