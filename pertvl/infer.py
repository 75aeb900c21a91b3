"""Inference on an ONNX export with onnxruntime: embeddings, similarity, word→region attention.

`Embedder.from_export(DIR)` checks every file of an export folder (pertvl.export describes the
format) against pertvl_export.json, then runs the two towers; it is the evaluation's `Encoder`.
Texts are cleaned and tokenized, images read, exactly as in training. This module never imports
torch, matplotlib nor an evaluation module (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertvl.data.image import read_image
from pertvl.data.text import clean_text
from pertvl.data.tokenize import encode_texts, load_tokenizer
from pertvl.export import (
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    MANIFEST_NAME,
    ONNX_FILES,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    ExportFormatError,
    metadata_differences,
    read_manifest,
    tower_metadata,
)
from pertvl.export.runtime import open_session
from pertvl.files import sha256_file

log = logging.getLogger(__name__)


# -- outputs -----------------------------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """Image tower outputs: L2-normalized emb [N, D], regions [N, M, Dl] (M = h·w, row-major)."""

    emb: np.ndarray
    regions: np.ndarray
    grid: tuple[int, int]


@dataclass
class TextFeatures:
    """Text tower outputs: L2-normalized emb [N, D], words [N, W, Dl] (zero-padded) and word_mask
    [N, W]; `word_lists`: the words of each cleaned text the model saw, aligned with the mask."""

    emb: np.ndarray
    words: np.ndarray
    word_mask: np.ndarray
    texts: list[str]
    word_lists: list[list[str]] = field(default_factory=list)


# -- attention maps (numpy) --------------------------------------------------------------------------
def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def attention_maps(image_regions: np.ndarray, grid: Sequence[int], words: np.ndarray,
                   word_mask: np.ndarray | None = None, gamma1: float = 4.0) -> np.ndarray:
    """Word→region attention of one image/report pair, as GLoRIA's attention_fn (softmax over words,
    then γ1-scaled softmax over regions; float64 inside). image_regions [M, Dl] with grid (h, w);
    words [W, Dl] (word_mask [W], None: all real) -> [n, h, w] float32 for the n real words, each
    summing to 1 over the regions.
    ValueError on inconsistent shapes or a report without words."""
    regions = np.asarray(image_regions, dtype=np.float64)
    words = np.asarray(words, dtype=np.float64)
    if regions.ndim != 2 or words.ndim != 2:
        raise ValueError(f"attention_maps: expected image_regions [M, Dl] and words [W, Dl], got shapes "
                         f"{regions.shape} and {words.shape}")
    if regions.shape[1] != words.shape[1]:
        raise ValueError(f"attention_maps: expected the same feature width, got regions {regions.shape[1]} "
                         f"and words {words.shape[1]}")
    h, w = (int(g) for g in grid)
    if h * w != regions.shape[0]:
        raise ValueError(f"attention_maps: grid {h}x{w} does not hold M={regions.shape[0]} regions")
    if word_mask is not None:
        mask = np.asarray(word_mask, dtype=bool)
        if mask.shape != (words.shape[0],):
            raise ValueError(f"attention_maps: expected word_mask [{words.shape[0]}], got shape {mask.shape}")
        words = words[mask]
    if len(words) == 0:
        raise ValueError("attention_maps: the report has no words")
    p = regions @ words.T  # [M, W]
    a = _softmax(gamma1 * _softmax(p, axis=1), axis=0)  # over words, then over regions
    return a.T.reshape(len(words), h, w).astype(np.float32)


def local_scores(regions: np.ndarray, words: np.ndarray, word_mask: np.ndarray, gamma1: float = 4.0,
                 gamma2: float = 5.0, aggregation: str = "sum") -> np.ndarray:
    """GLoRIA's similarity S(I_n, T_n) of row-paired images and reports: the diagonal of
    pertvl.losses.local_similarity in numpy (float64 inside). regions [N, M, Dl], words [N, W, Dl],
    word_mask [N, W] -> [N] float64, -inf for a report without words."""
    r = np.asarray(regions, dtype=np.float64)
    x = np.asarray(words, dtype=np.float64)
    mask = np.asarray(word_mask, dtype=bool)
    if r.ndim != 3 or x.ndim != 3 or r.shape[0] != x.shape[0] or r.shape[2] != x.shape[2]:
        raise ValueError(f"local_scores: expected regions [N, M, D] and words [N, W, D], got shapes {r.shape} "
                         f"and {x.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"local_scores: expected word_mask {list(x.shape[:2])}, got shape {list(mask.shape)}")
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"local_scores: expected aggregation 'sum' or 'mean', got {aggregation!r}")
    has_words = mask.any(axis=1)
    real = mask | ~has_words[:, None]  # a report without words: unmasked here, -inf below (as the loss)
    p = np.einsum("nmd,nwd->nmw", r, x)
    a1 = _softmax(np.where(real[:, None, :], p, -np.inf), axis=2)  # over the report's words
    a = _softmax(gamma1 * a1, axis=1)  # over regions, per word
    context = np.einsum("nmw,nmd->nwd", a, r)
    norms = np.linalg.norm(x, axis=2) * np.linalg.norm(context, axis=2)
    cos = np.einsum("nwd,nwd->nw", x, context) / np.maximum(norms, 1e-8)  # GLoRIA's clamp
    z = np.where(real, gamma2 * cos, -np.inf)
    top = z.max(axis=1, keepdims=True)
    s = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    if aggregation == "mean":
        s = s - np.log(np.maximum(real.sum(axis=1), 1))
    return np.where(has_words, s, -np.inf)


# -- the Embedder ------------------------------------------------------------------------------------
class Embedder:
    """Image and report embeddings from an ONNX export; load with `Embedder.from_export(DIR)`."""

    def __init__(self, export_dir, manifest: dict, image_session, text_session, tokenizer,
                 variant: str = "fp32", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.image_session = image_session
        self.text_session = text_session
        self.tokenizer = tokenizer
        self.variant = variant
        self.batch_size = batch_size
        pre = manifest["image"]["preprocessing"]
        self.image_size = int(pre["size"])
        self.channels = int(pre["channels"])
        self.grid: tuple[int, int] = tuple(int(g) for g in manifest["image"]["grid"])  # type: ignore[assignment]
        cleaning = manifest["text"]["cleaning"]
        self.max_words = cleaning["max_words"]
        self.drop_deid = bool(cleaning["drop_deid"])
        self.max_length = int(manifest["text"]["max_length"])
        self.embedding_dim = int(manifest["embedding_dim"])
        self.local_dim = int(manifest["local_dim"])

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                    int8: bool = False, batch_size: int = 32, threads: int | None = None) -> Embedder:
        """Verify and load an export folder (`int8`: the quantized towers): FileNotFoundError for a
        missing file, ExportFormatError naming the file whose sha256, ONNX metadata or graph inputs
        and outputs differ from the manifest."""
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        variant = "int8" if int8 else "fp32"
        files = manifest["files"]
        sessions = {}
        for tower in ("image", "text"):
            name = ONNX_FILES[(tower, variant)]
            if name not in files:
                hint = " (re-export with --quantize int8)" if int8 else ""
                raise ExportFormatError(f"{export_dir / MANIFEST_NAME}: no {variant} {tower} tower listed{hint}")
            sessions[tower] = _verified_session(export_dir, manifest, tower, variant, providers, threads)
        for name, entry in files.items():
            if entry.get("kind") == "tokenizer":
                _check_sha(export_dir / name, entry["sha256"])
        tokenizer = load_tokenizer(export_dir)
        return cls(export_dir, manifest, sessions["image"], sessions["text"], tokenizer, variant, batch_size)

    # -- images ------------------------------------------------------------------------------------
    def load_images(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Image files as the export expects them, [N, 1, S, S] float32 in [0, 1], read by the
        preprocessing of `pertvl pack` (FileNotFoundError, or ImageReadError naming the file)."""
        out = np.empty((len(paths), 1, self.image_size, self.image_size), dtype=np.float32)
        for i, path in enumerate(paths):
            out[i, 0] = read_image(path, self.image_size).astype(np.float32) / 255.0
        return out

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        s, c = self.image_size, self.channels
        if images.ndim != 4 or images.shape[1:] != (c, s, s):
            raise ValueError(
                f"expected images [N, {c}, {s}, {s}] float32 in [0, 1] (use Embedder.load_images for files), "
                f"got shape {tuple(images.shape)}"
            )
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.size and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
            raise ValueError(
                f"expected image intensities in [0, 1], got [{images.min():g}, {images.max():g}] "
                "(8-bit images must be divided by 255)"
            )
        return images

    def image_features(self, images: np.ndarray) -> ImageFeatures:
        """Global embeddings and region features of images [N, 1, S, S] float32 in [0, 1]."""
        images = self._check_images(images)
        parts = [self.image_session.run(list(IMAGE_OUTPUTS), {IMAGE_INPUTS[0]: images[s : s + self.batch_size]})
                 for s in range(0, len(images), self.batch_size)]
        if not parts:
            m = self.grid[0] * self.grid[1]
            return ImageFeatures(np.zeros((0, self.embedding_dim), np.float32),
                                 np.zeros((0, m, self.local_dim), np.float32), self.grid)
        return ImageFeatures(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), self.grid)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """[N, D] float32 L2-normalized embeddings of images [N, 1, S, S] float32 in [0, 1]."""
        images = self._check_images(images)
        out = [
            self.image_session.run([IMAGE_OUTPUTS[0]], {IMAGE_INPUTS[0]: images[s : s + self.batch_size]})[0]
            for s in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)

    # -- texts -------------------------------------------------------------------------------------
    def clean(self, texts: Sequence[str]) -> list[str]:
        """The export's cleaning rule applied to each text (idempotent on cleaned texts)."""
        if isinstance(texts, str):
            raise ValueError("expected a list of texts, got a single string")
        return [clean_text(t, max_words=self.max_words, drop_deid=self.drop_deid) for t in texts]

    def _run_texts(self, cleaned: list[str], outputs: Sequence[str]):
        """(indices into `cleaned`, Encoded, onnxruntime outputs) per batch of similar-length texts."""
        order = np.argsort([len(t.split()) for t in cleaned], kind="stable")
        for start in range(0, len(cleaned), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = encode_texts(self.tokenizer, [cleaned[i] for i in idx], max_length=self.max_length)
            feeds = {name: getattr(enc, name) for name in TEXT_INPUTS}
            yield idx, enc, self.text_session.run(list(outputs), feeds)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 L2-normalized embeddings of report texts (cleaned here with the export's rule)."""
        cleaned = self.clean(texts)
        out = np.zeros((len(cleaned), self.embedding_dim), np.float32)
        for idx, _, (emb,) in self._run_texts(cleaned, TEXT_OUTPUTS[:1]):
            out[idx] = emb
        return out

    def text_features(self, texts: list[str]) -> TextFeatures:
        """Global embeddings, word features and word masks of report texts (cleaned here)."""
        cleaned = self.clean(texts)
        n = len(cleaned)
        parts = [(idx, enc, *outs) for idx, enc, outs in self._run_texts(cleaned, TEXT_OUTPUTS)]
        width = max([p[3].shape[1] for p in parts] + [0])
        emb_all = np.zeros((n, self.embedding_dim), np.float32)
        words_all = np.zeros((n, width, self.local_dim), np.float32)
        mask_all = np.zeros((n, width), bool)
        word_lists: list[list[str]] = [[] for _ in range(n)]
        for idx, enc, emb, words, mask in parts:
            w = words.shape[1]
            emb_all[idx] = emb
            words_all[idx, :w] = words
            mask_all[idx, :w] = mask.astype(bool)
            for row, i in enumerate(idx):
                word_lists[i] = cleaned[i].split()[: int(enc.num_words[row])]
        return TextFeatures(emb_all, words_all, mask_all, cleaned, word_lists)

    # -- both --------------------------------------------------------------------------------------
    def similarity(self, images: np.ndarray | Sequence[str | os.PathLike], texts: list[str]) -> np.ndarray:
        """Cosine similarity [N_images, N_texts] between images (array or file paths) and report texts."""
        if not isinstance(images, np.ndarray):
            images = self.load_images(list(images))
        img = self.embed_images(images).astype(np.float64)
        txt = self.embed_texts(texts).astype(np.float64)
        img /= np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
        txt /= np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
        return (img @ txt.T).astype(np.float32)


# -- verification ------------------------------------------------------------------------------------
def _check_sha(path: Path, expected: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in {MANIFEST_NAME} but missing")
    got = sha256_file(path)
    if got != expected:
        raise ExportFormatError(
            f"{path}: sha256 {got} differs from {MANIFEST_NAME} ({expected}): the file was modified or corrupted"
        )


def _verified_session(export_dir: Path, manifest: dict, tower: str, variant: str, providers, threads):
    """Load one tower after checking its sha256, its metadata_props and its input/output names."""
    name = ONNX_FILES[(tower, variant)]
    path = export_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in {MANIFEST_NAME} but missing")
    expected_meta = tower_metadata(manifest, tower, variant)
    expected_sha = manifest["files"][name]["sha256"]
    got_sha = sha256_file(path)
    try:
        session = open_session(path, providers, threads)
    except Exception as e:  # onnxruntime raises its own exception types for unparsable graphs
        raise ExportFormatError(
            f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"sha256 {got_sha}, {MANIFEST_NAME} expects {expected_sha}: the file is corrupted"
        ) from None
    diffs = metadata_differences(expected_meta, session.get_modelmeta().custom_metadata_map)
    if diffs:
        raise ExportFormatError(
            f"{path}: its ONNX metadata does not match {MANIFEST_NAME} (a file from another export?): "
            + "; ".join(diffs)
        )
    if got_sha != expected_sha:
        raise ExportFormatError(
            f"{path}: sha256 {got_sha} differs from {MANIFEST_NAME} ({expected_sha}) although its metadata "
            "matches: the file was modified or corrupted after export"
        )
    want_in = IMAGE_INPUTS if tower == "image" else TEXT_INPUTS
    want_out = IMAGE_OUTPUTS if tower == "image" else TEXT_OUTPUTS
    got_in = tuple(i.name for i in session.get_inputs())
    got_out = tuple(o.name for o in session.get_outputs())
    if got_in != want_in or got_out != want_out:
        raise ExportFormatError(f"{path}: expected inputs {want_in} and outputs {want_out}, got {got_in} and {got_out}")
    return session
