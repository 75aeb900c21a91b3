"""Inference on an ONNX export with onnxruntime: embeddings, similarity, word→region attention.

`Embedder.from_export(DIR)` loads an export folder written by `pertvl export`
(pertvl.export describes the format): it checks the sha256 of every file against
pertvl_export.json and that each ONNX file's metadata_props agree with it, then runs the two
towers with onnxruntime. It implements the evaluation's `Encoder` protocol
(pertvl.evaluate.encoder: `embed_images`, `embed_texts`), so every evaluation runs on an export.

This module imports numpy, onnxruntime, tokenizers and PIL only — never torch nor transformers'
models — so an export can be served where torch is not installed.

Texts are cleaned with the export's own cleaning rule (pertvl.data.text.clean_text with the
recorded max_words/drop_deid; cleaning a cleaned text changes nothing) and tokenized with
pertvl.data.tokenize.encode_texts, exactly as in training. Images are preprocessed like the
shards (pertvl.data.shards: grayscale, shorter side resized, center crop) and scaled to [0, 1];
the intensity normalization of the image model lives inside the graph.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    decode_metadata,
    metadata_differences,
    read_manifest,
    sha256_file,
    tower_metadata,
)

log = logging.getLogger(__name__)

__all__ = [
    "Embedder",
    "ExportFormatError",
    "ImageFeatures",
    "TextFeatures",
    "attention_maps",
    "default_providers",
    "open_session",
    "physical_cores",
    "session_options",
]


# ----------------------------------------------------------------------------------------------
# onnxruntime sessions
# ----------------------------------------------------------------------------------------------
def physical_cores() -> int:
    """Physical CPU cores (hyper-threads do not help GEMM-bound inference); os.cpu_count() as fallback."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is optional: it only refines the thread count
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions used for every tower: all graph optimizations, intra-op threads =
    physical cores (`threads` overrides), one inter-op thread (the graphs are sequential)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else physical_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return so


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU (Azure and friends are skipped)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# Sessions are created with denormals flushed to zero: the masked softmax of the text tower's
# attention produces denormals, and flushing them made the text tower 7 % (fp32) and 13 % (int8)
# faster here with bit-identical outputs. onnxruntime also sets that flag on the thread that creates
# the session or calls run(), so both happen on one private thread: the caller's floating-point
# mode (numpy, torch in the same process) stays as it was.
_RUNNER: ThreadPoolExecutor | None = None
_RUNNER_LOCK = threading.Lock()


def _runner() -> ThreadPoolExecutor:
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pertvl-onnxruntime")
        return _RUNNER


def _forget_runner_in_child() -> None:
    """A forked child has no copy of the runner's thread: give it a fresh executor (and lock)."""
    global _RUNNER, _RUNNER_LOCK
    _RUNNER, _RUNNER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_runner_in_child)


class IsolatedSession:
    """An onnxruntime InferenceSession whose run() executes on pertvl's onnxruntime thread (see
    above); every other attribute is the session's own. Calls from several threads queue."""

    def __init__(self, session):
        self.session = session

    def run(self, output_names, input_feed, run_options=None):
        return _runner().submit(self.session.run, output_names, input_feed, run_options).result()

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> IsolatedSession:
    """An onnxruntime session of `path` with pertvl's options (session_options, denormals as zero)."""
    import onnxruntime as ort

    options = session_options(threads)
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    create = _runner().submit(ort.InferenceSession, os.fspath(path), sess_options=options,
                              providers=list(providers or default_providers()))
    return IsolatedSession(create.result())


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """Image tower outputs.

    Attributes:
        emb: [N, D] L2-normalized global embeddings.
        regions: [N, M, Dl] projected region features (M = h·w, row-major over the grid).
        grid: (h, w) of the region grid.
    """

    emb: np.ndarray
    regions: np.ndarray
    grid: tuple[int, int]


@dataclass
class TextFeatures:
    """Text tower outputs.

    Attributes:
        emb: [N, D] L2-normalized global embeddings.
        words: [N, W, Dl] projected word features (word pieces averaged per word), zero-padded.
        word_mask: [N, W] bool, True for real words.
        texts: the cleaned texts that were embedded.
        word_lists: the words of each cleaned text that the model saw (after max_length truncation),
            aligned with the True entries of `word_mask`.
    """

    emb: np.ndarray
    words: np.ndarray
    word_mask: np.ndarray
    texts: list[str]
    word_lists: list[list[str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# attention maps (numpy)
# ----------------------------------------------------------------------------------------------
def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def attention_maps(
    image_regions: np.ndarray,
    grid: Sequence[int],
    words: np.ndarray,
    word_mask: np.ndarray | None = None,
    gamma1: float = 4.0,
) -> np.ndarray:
    """Word→region attention of one image/report pair, GLoRIA's attention_fn (paper §III-B 2):

        P_mw = r_m · x_w,   A1 = softmax over the report's words (P),   a_wm = softmax over regions (γ1·A1)

    — the same as pertvl.losses.local_attention_maps, in numpy (float64 inside).

    Args:
        image_regions: [M, Dl] region features of one image (ImageFeatures.regions[i]).
        grid: (h, w) with h·w = M.
        words: [W, Dl] word features of one report (TextFeatures.words[j]).
        word_mask: [W] bool, True for real words; None = all words are real.
        gamma1: GLoRIA's region temperature γ1.
    Returns:
        [n, h, w] float32 for the n real words (in order): each map sums to 1 over the grid.
    Raises:
        ValueError: on inconsistent shapes or a report without words.
    """
    regions = np.asarray(image_regions, dtype=np.float64)
    words = np.asarray(words, dtype=np.float64)
    if regions.ndim != 2 or words.ndim != 2:
        raise ValueError(
            f"attention_maps: expected image_regions [M, Dl] and words [W, Dl], got shapes "
            f"{regions.shape} and {words.shape}"
        )
    if regions.shape[1] != words.shape[1]:
        raise ValueError(
            f"attention_maps: expected the same feature width, got regions {regions.shape[1]} and words {words.shape[1]}"
        )
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


# ----------------------------------------------------------------------------------------------
# the Embedder
# ----------------------------------------------------------------------------------------------
class Embedder:
    """Image and report embeddings from an ONNX export (the evaluation `Encoder` protocol).

    Use `Embedder.from_export(DIR)`; the constructor takes already-verified parts.

    Args:
        export_dir: the export folder.
        manifest: its parsed pertvl_export.json.
        image_session / text_session: onnxruntime InferenceSessions of the two towers.
        tokenizer: the export's `tokenizers.Tokenizer`.
        variant: "fp32" or "int8".
        batch_size: images / texts per onnxruntime call.
    """

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
        """Verify and load an export folder.

        Args:
            export_dir: folder written by `pertvl export`.
            providers: onnxruntime execution providers (default: CUDA if available, then CPU).
            int8: load the dynamically quantized towers (export made with --quantize int8).
            batch_size: images / texts per onnxruntime call.
            threads: intra-op threads (default: physical cores).
        Raises:
            FileNotFoundError: a file of the export is missing.
            ExportFormatError: a file's sha256 or ONNX metadata differs from the manifest (the
                message names the file and what differs), or the graph's inputs/outputs are not
                the format's.
        """
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

    def metadata(self, tower: str) -> dict[str, Any]:
        """The decoded pertvl metadata_props of a tower's loaded ONNX model."""
        session = {"image": self.image_session, "text": self.text_session}[tower]
        return decode_metadata(session.get_modelmeta().custom_metadata_map)

    @property
    def info(self) -> dict[str, Any]:
        """What this Embedder serves: the export facts, the variant and the providers."""
        return {
            "export_dir": str(self.export_dir),
            "export_id": self.manifest["export_id"],
            "variant": self.variant,
            "providers": list(self.image_session.get_providers()),
            "embedding_dim": self.embedding_dim,
            "local_dim": self.local_dim,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "max_length": self.max_length,
            "cleaning": dict(self.manifest["text"]["cleaning"]),
            "metadata": {"image": self.metadata("image"), "text": self.metadata("text")},
        }

    # -- images ------------------------------------------------------------------------------------
    def load_images(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Read image files as the export expects them: [N, 1, S, S] float32 in [0, 1].

        Grayscale (16-bit/float images min-max scaled to 8 bit), shorter side resized to S
        (bilinear), center crop S × S, /255 — the preprocessing of `pertvl pack`.

        Raises:
            ValueError: naming the file that cannot be read as an image.
        """
        from PIL import Image, UnidentifiedImageError

        from pertvl.data.shards import resize_center_crop, to_grayscale8

        out = np.empty((len(paths), 1, self.image_size, self.image_size), dtype=np.float32)
        for i, path in enumerate(paths):
            try:
                with Image.open(path) as im:
                    im.load()
                    img = resize_center_crop(to_grayscale8(im), self.image_size)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise ValueError(f"{path}: cannot read as an image ({e})") from None
            out[i, 0] = np.asarray(img, dtype=np.float32) / 255.0
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
        embs, regions = [], []
        for start in range(0, len(images), self.batch_size):
            emb, reg = self.image_session.run(list(IMAGE_OUTPUTS), {IMAGE_INPUTS[0]: images[start : start + self.batch_size]})
            embs.append(emb)
            regions.append(reg)
        if not embs:
            m = self.grid[0] * self.grid[1]
            return ImageFeatures(np.zeros((0, self.embedding_dim), np.float32),
                                 np.zeros((0, m, self.local_dim), np.float32), self.grid)
        return ImageFeatures(np.concatenate(embs), np.concatenate(regions), self.grid)

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
        """Yield (indices into `cleaned`, Encoded, onnxruntime outputs) per batch of similar-length texts."""
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
        parts = []
        for idx, enc, (emb, words, mask) in self._run_texts(cleaned, TEXT_OUTPUTS):
            parts.append((idx, enc, emb, words, mask))
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


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# `pertvl embed` / `pertvl similarity` (parsers in pertvl.export.cli)
# ----------------------------------------------------------------------------------------------
def _safe_name(text: str, limit: int = 40) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return keep[:limit] or "_"


def save_attention_pngs(embedder: Embedder, images: np.ndarray, image_names: Sequence[str], texts: list[str],
                        out_dir: str | os.PathLike, gamma1: float = 4.0) -> list[dict[str, Any]]:
    """One PNG heatmap per (image, report, word) over the preprocessed image, the word as title.

    Returns:
        index rows {"image", "text", "word_index", "word", "png"} of the files written.
    """
    from pertvl.evaluate.report import save_attention_map

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img = embedder.image_features(images)
    txt = embedder.text_features(texts)
    rows = []
    for i, name in enumerate(image_names):
        pixels = np.round(images[i, 0] * 255.0).clip(0, 255).astype(np.uint8)
        for j in range(len(texts)):
            if not txt.word_mask[j].any():
                log.warning("report %d is empty after cleaning: no attention maps", j)
                continue
            maps = attention_maps(img.regions[i], img.grid, txt.words[j], txt.word_mask[j], gamma1=gamma1)
            for k, (word, attn) in enumerate(zip(txt.word_lists[j], maps, strict=True)):
                png = out_dir / f"img{i:03d}_txt{j:03d}_w{k:03d}_{_safe_name(word)}.png"
                save_attention_map(pixels, attn, word, png)
                rows.append({"image": name, "text": j, "word_index": k, "word": word, "png": png.name})
    return rows


def embed_cli_main(args) -> int:
    """`pertvl embed`: write image_emb.npy, text_emb.npy, similarity.npy and index.json."""
    from pertvl.data.records import write_json

    if not args.images and not args.texts:
        raise SystemExit("pertvl embed: give --images and/or --texts")
    embedder = Embedder.from_export(args.export, int8=args.int8, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"export": str(args.export), "export_id": embedder.manifest["export_id"],
                             "variant": embedder.variant, "images": [], "texts": [], "files": {}}
    images = img_emb = txt_emb = None
    if args.images:
        images = embedder.load_images(args.images)
        img_emb = embedder.embed_images(images)
        np.save(out / "image_emb.npy", img_emb)
        index["images"] = [str(p) for p in args.images]
        index["files"]["image_emb"] = "image_emb.npy"
    if args.texts:
        txt_emb = embedder.embed_texts(args.texts)
        np.save(out / "text_emb.npy", txt_emb)
        index["texts"] = list(args.texts)
        index["cleaned_texts"] = embedder.clean(args.texts)
        index["files"]["text_emb"] = "text_emb.npy"
    if img_emb is not None and txt_emb is not None:
        sim = (img_emb.astype(np.float64) @ txt_emb.astype(np.float64).T).astype(np.float32)
        np.save(out / "similarity.npy", sim)
        index["files"]["similarity"] = "similarity.npy"
    if args.attention_maps:
        if images is None or not args.texts:
            raise SystemExit("pertvl embed: --attention-maps needs both --images and --texts")
        rows = save_attention_pngs(embedder, images, index["images"], list(args.texts), args.attention_maps,
                                   gamma1=args.gamma1)
        write_json(Path(args.attention_maps) / "attention_maps.json", {"gamma1": args.gamma1, "maps": rows})
        index["attention_maps"] = {"dir": str(args.attention_maps), "count": len(rows)}
    write_json(out / "index.json", index)
    written = [f"{name} {list(np.load(out / name, mmap_mode='r').shape)}" for name in index["files"].values()]
    print(f"wrote {', '.join(written)} and index.json to {out}")
    if args.attention_maps:
        print(f"wrote {index['attention_maps']['count']} attention maps to {args.attention_maps}")
    return 0


def format_similarity_table(sim: np.ndarray, image_names: Sequence[str], texts: Sequence[str],
                            width: int = 70) -> str:
    """An image × report table of cosine scores, the best report of each image marked with '*'."""
    lines = ["reports:"]
    for j, t in enumerate(texts):
        short = t if len(t) <= width else t[: width - 3] + "..."
        lines.append(f"  R{j + 1}  {short}")
    names = [os.path.basename(str(n)) for n in image_names]
    w0 = max([len(n) for n in names] + [5])
    lines.append("")
    lines.append(f"{'image':<{w0}}" + "".join(f"{'R' + str(j + 1):>10}" for j in range(len(texts))))
    for i, name in enumerate(names):
        best = int(np.argmax(sim[i])) if sim.shape[1] else -1
        cells = "".join(f"{sim[i, j]:>9.4f}{'*' if j == best else ' '}" for j in range(sim.shape[1]))
        lines.append(f"{name:<{w0}}{cells}")
    return "\n".join(lines)


def similarity_cli_main(args) -> int:
    """`pertvl similarity`: print the image × report cosine table."""
    embedder = Embedder.from_export(args.export, int8=args.int8, batch_size=args.batch_size)
    sim = embedder.similarity(list(args.images), list(args.texts))
    print(f"cosine similarity, export {args.export} ({embedder.variant})")
    print(format_similarity_table(sim, args.images, args.texts))
    return 0
