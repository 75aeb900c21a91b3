"""What the evaluations need from a model, and the helpers that feed it: an encoder has
`embed_images(images [N, 1, H, W] float in [0, 1])` and `embed_texts(cleaned texts)`, each returning
float32 [N, D] L2-normalized rows (pertvl.infer.Embedder, torch_encoder.TorchEncoder); the local
branch adds `image_features` / `text_features`. Scores re-normalize, so a slightly
non-normalized encoder cannot change a ranking.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextEncoder(Protocol):
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed cleaned texts (pertvl.data.text.clean_text). Returns [N, D] float32, L2-normalized."""
        ...


@runtime_checkable
class Encoder(TextEncoder, Protocol):
    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Embed images [N, 1, H, W] float32 in [0, 1]. Returns [N, D] float32, L2-normalized."""
        ...


def image_array(sample: Any) -> np.ndarray:
    """A shard sample's uint8 [H, W] image as float32 [1, H, W] in [0, 1]; ValueError naming the sample
    otherwise."""
    img = np.asarray(sample.image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"sample {getattr(sample, 'key', '?')!r}: expected a uint8 [H, W] grayscale image, "
                         f"got {img.dtype} {tuple(img.shape)}")
    return (img.astype(np.float32) / 255.0)[None]


def with_text(samples: Iterable[Any], skipped: MutableMapping[str, int]) -> Iterator[tuple[Any, str]]:
    """(sample, stripped report text) of the shard samples that have one; the others are counted in
    skipped["empty_text"]."""
    for sample in samples:
        text = (sample.meta.get("text") or "").strip()
        if text:
            yield sample, text
        else:
            skipped["empty_text"] += 1


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (so cosine scores are compared without float32 noise)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_embeddings(emb: Any, n: int, what: str) -> np.ndarray:
    """An encoder output checked to be [n, D] finite numbers; ValueError saying what it was."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{what}: expected an [{n}, D] embedding array, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    return arr.astype(np.float32, copy=False)


def embed_texts_unique(encoder: TextEncoder, texts: Iterable[str], batch_size: int = 32
                       ) -> tuple[dict[str, int], np.ndarray]:
    """Embed each distinct text once, `batch_size` texts per call: (index, embeddings) with
    index[text] the row of that text in embeddings [U, D]."""
    index = unique_index(texts)
    items = list(index)
    chunks = [check_embeddings(encoder.embed_texts(items[i : i + batch_size]), len(items[i : i + batch_size]),
                               "embed_texts") for i in range(0, len(items), batch_size)]
    if not chunks:
        return index, np.zeros((0, 0), dtype=np.float32)
    return index, np.concatenate(chunks)


def unique_index(texts: Iterable[str]) -> dict[str, int]:
    """text → its row among the distinct texts, in first-seen order."""
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    return index


def stack_padded(words: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Word features of batches [n_i, W_i, D] (and their masks [n_i, W_i]) in one zero-padded
    [Σn, max W, D] array and its mask."""
    width = max([w.shape[1] for w in words] + [0])
    dim = words[0].shape[2] if len(words) else 0
    out = np.zeros((sum(len(w) for w in words), width, dim), np.float32)
    mask = np.zeros(out.shape[:2], bool)
    row = 0
    for w, m in zip(words, masks, strict=True):
        out[row : row + len(w), : w.shape[1]] = w
        mask[row : row + len(w), : m.shape[1]] = m
        row += len(w)
    return out, mask


class ImageBatcher:
    """Embeds sample images a full batch at a time, so a shard split streams without holding every image;
    with `regions=True` also the local branch's region features [N, M, D] (`regions()`)."""

    def __init__(self, encoder: Encoder, batch_size: int = 32, *, regions: bool = False):
        if regions and not hasattr(encoder, "image_features"):
            raise ValueError("region features need the local branch (image_features): an ONNX export (--export) "
                             "or a run (--run)")
        self.encoder = encoder
        self.batch_size = batch_size
        self.with_regions = regions
        self._regions: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self._pending_keys: list[str] = []
        self._done: list[np.ndarray] = []
        self._shape: tuple[int, ...] | None = None

    def add(self, sample: Any) -> None:
        arr = image_array(sample)
        if self._shape is None:
            self._shape = arr.shape
        elif arr.shape != self._shape:
            raise ValueError(f"sample {getattr(sample, 'key', '?')!r}: image shape {arr.shape[1:]} differs "
                             f"from the split's {self._shape[1:]} (shards hold one image size)")
        self._pending.append(arr)
        self._pending_keys.append(str(getattr(sample, "key", "?")))
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch = np.stack(self._pending).astype(np.float32, copy=False)
        what = f"embed_images (samples {self._pending_keys[0]!r}..{self._pending_keys[-1]!r})"
        if self.with_regions:
            feats = self.encoder.image_features(batch)
            self._done.append(check_embeddings(feats.emb, len(batch), what))
            self._regions.append(np.asarray(feats.regions, dtype=np.float32))
        else:
            self._done.append(check_embeddings(self.encoder.embed_images(batch), len(batch), what))
        self._pending, self._pending_keys = [], []

    def finish(self) -> np.ndarray:
        """All embeddings so far, [N, D] in the order the samples were added."""
        self._flush()
        if not self._done:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(self._done)

    def regions(self) -> np.ndarray:
        """All region features so far, [N, M, D] (built with regions=True)."""
        self._flush()
        return np.concatenate(self._regions) if self._regions else np.zeros((0, 0, 0), dtype=np.float32)


def word_features_unique(encoder: Any, texts: Iterable[str], batch_size: int = 32
                         ) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """The local branch's word features of each distinct text, once: (index, words [U, W, D] zero-padded
    to the longest, word_mask [U, W] bool)."""
    index = unique_index(texts)
    unique = list(index)
    parts = [encoder.text_features(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    words, mask = stack_padded([p.words for p in parts], [p.word_mask for p in parts])
    return index, words, mask
