"""ONNX export of both towers of a trained DualEncoder, with metadata, a parity check and int8.

`export_model(model, out)` writes the export folder described in pertvl.export:

1. Each tower is wrapped in a small module (`ImageTower`, `TextTower`) that calls
   `model.encode_image` / `model.encode_text` and L2-normalizes the global embedding, and is
   exported with dynamic batch (and sequence length for text).
2. The text graph (`text_graph`, see TEXT_GRAPHS): for a BERT backbone, "unpadded" — the dense
   layers run on the real tokens of the batch only and the attention core is onnxruntime's
   MultiHeadAttention contrib op (pertvl.export.unpadded); otherwise "fused" — traced under eager
   attention and fused by onnxruntime's transformer optimizer (Attention, EmbedLayerNormalization,
   SkipLayerNormalization). Both run on the CPU and CUDA providers.
3. Each file gets the export's facts as metadata_props (pertvl.export.tower_metadata).
4. Parity: random and real inputs (phantom-like images, real report sentences) at batch sizes
   1, 3 and 8 and reports of 5 and 60 words run through torch and onnxruntime; the max absolute
   difference per output must be <= 1e-4 in fp32, or the export fails.
5. With `quantize="int8"`: dynamically quantized towers, their parity (max abs diff, cosine
   agreement) and their speed against fp32.
6. The manifest pertvl_export.json (sha256 of every file) is written last, in a temporary folder
   that is renamed to the export name only when everything passed: a failed export leaves no folder.

Exporter choice: torch.onnx.export with dynamo=False (TorchScript tracer, opset 17). Measured here
on MiniLM, batch 32 of ~40-word reports against torch eager (bench/bench_onnx.py --variants):
the SDPA trace runs unfused (neither it nor anything of the dynamo exporter's graph is recognized
by onnxruntime's fusion); the eager-attention trace fuses 6/6 Attention but lands at torch's speed,
because the fused graph keeps every padded token row and onnxruntime's CPU SkipLayerNormalization
is slow; the unpadded graph is the fastest in fp32 and int8.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pertvl import __version__
from pertvl.data.text import DEFAULT_MAX_WORDS, clean_text
from pertvl.data.tokenize import encode_texts
from pertvl.export import (
    FORMAT,
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    MANIFEST_NAME,
    ONNX_FILES,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    sha256_file,
    tower_metadata,
)
from pertvl.export.int8 import (
    DEFAULT_RESIDUAL,
    INT8_OP_TYPES,
    add_residual_passes,
    parse_residual_layers,
    quantize_int8,
    quiet_onnxruntime_tools,
)
from pertvl.export.unpadded import UnpaddedBert, unpadded_unsupported

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
DEFAULT_IMAGE_SIZE = 224
EXPORTER = "torch.onnx.export(dynamo=False)"
# text graph: "auto" = "unpadded" when the backbone supports it (BertModel), else "fused"
TEXT_GRAPHS = ("auto", "unpadded", "fused", "traced")
_TWO_GB = 2**31 - 1

# Real report sentences for the parity check (Open-I-style findings; cleaned before use).
REAL_REPORTS = (
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Heart size is normal. The mediastinal contours are within normal limits.",
    "Mild cardiomegaly. Small bilateral pleural effusions with bibasilar atelectasis.",
    "Right upper lobe opacity concerning for pneumonia; follow-up radiograph is recommended.",
    "No acute cardiopulmonary abnormality. Degenerative changes of the thoracic spine.",
    "Stable appearance of the chest. XXXX sternotomy wires are intact. No focal consolidation, "
    "pleural effusion or pneumothorax is seen.",
    "Interval increase in the size of the left-sided pleural effusion. The right lung is clear. "
    "Cardiomediastinal silhouette is enlarged but stable compared to the prior examination of 2.5 "
    "years ago. Calcified granuloma in the left lower lobe. Osseous structures are intact. "
    "Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm.",
    "Low lung volumes.",
)


class ExportError(RuntimeError):
    """The export could not be completed (the message says which step and why)."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""


# ----------------------------------------------------------------------------------------------
# the exported modules
# ----------------------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """images [B, 1, S, S] in [0, 1] -> (image_emb [B, D] L2-normalized, regions [B, M, Dl])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode_image(images)
        return F.normalize(out.global_emb, dim=-1), out.regions


class TextTower(nn.Module):
    """input_ids, attention_mask, word_ids [B, L] -> (text_emb [B, D] L2-normalized,
    words [B, W, Dl], word_mask [B, W] bool) with W = L (the model's static word slots).

    unpadded: compute the transformer's hidden states with pertvl.export.unpadded.UnpaddedBert
    (same numbers, dense layers on real tokens only) instead of the backbone's own forward;
    split_special: in it, run the [CLS]/[SEP] rows through the dense layers separately (the
    source graph of int8 quantization, which gives those rows their own scale)."""

    def __init__(self, model: nn.Module, unpadded: bool = False, split_special: bool = False):
        super().__init__()
        self.model = model
        special = model.text.special_ids if split_special else ()
        self.unpadded = UnpaddedBert(model.text.backbone, special) if unpadded else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.unpadded is None:
            out = self.model.encode_text(input_ids, attention_mask, word_ids)
        else:
            hidden = self.unpadded(input_ids, attention_mask)
            out = self.model.text.outputs(hidden, input_ids, attention_mask, word_ids)
        return F.normalize(out.global_emb, dim=-1), out.words, out.word_mask


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Switch every transformers model inside `model` to eager attention for the duration (the
    pattern onnxruntime's attention fusion recognizes); yields the names of the switched modules."""
    switched: list[tuple[nn.Module, str]] = []
    try:
        for name, module in model.named_modules():
            cfg = getattr(module, "config", None)
            current = getattr(cfg, "_attn_implementation", None)
            if current in (None, "eager") or not hasattr(module, "set_attn_implementation"):
                continue
            try:
                module.set_attn_implementation("eager")
            except (ValueError, NotImplementedError) as e:  # remote-code models may refuse
                log.warning("%s: cannot switch to eager attention (%s); exporting with %s", name, e, current)
                continue
            switched.append((module, current))
        yield [type(m).__name__ for m, _ in switched]
    finally:
        for module, previous in switched:
            module.set_attn_implementation(previous)


def _text_transformer_config(model: nn.Module):
    """The HF config of the text transformer (heads and hidden size for the fusion), or None."""
    backbone = getattr(getattr(model, "text", None), "backbone", None)
    cfg = getattr(backbone, "config", None)
    if cfg is not None and getattr(cfg, "num_attention_heads", None) and getattr(cfg, "hidden_size", None):
        return cfg
    return None


# ----------------------------------------------------------------------------------------------
# parity inputs
# ----------------------------------------------------------------------------------------------
def phantom_like_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Chest-radiograph-like test images [n, 1, size, size] float32 in [0, 1]: dark lung fields
    in a brighter body, a heart shadow, rib arcs, a random opacity and noise. Deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = 0.15 + 0.55 * np.exp(-(((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.55) ** 2) ** 2)
        for cx in (0.32, 0.68):  # lungs
            lung = ((xx - cx + rng.normal(0, 0.01)) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
            img = np.where(lung, img - 0.3, img)
        heart = ((xx - 0.55) / (0.13 + rng.uniform(0, 0.06))) ** 2 + ((yy - 0.65) / 0.12) ** 2 < 1
        img = np.where(heart, img + 0.25, img)
        img += 0.06 * (np.sin(yy * 40 + 6 * (xx - 0.5) ** 2) > 0.7)  # ribs
        if rng.random() < 0.6:  # an opacity (effusion / consolidation)
            cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.8), rng.uniform(0.04, 0.12)
            img += 0.3 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        img += rng.normal(0, 0.02, img.shape)
        out[i, 0] = np.clip(img, 0, 1)
    return out


def random_vocab_texts(tokenizer, n: int, words: int, seed: int = 0) -> list[str]:
    """`n` texts of `words` random whole-word vocabulary entries (lower-case alphabetic, no "##")."""
    from pertvl.data.tokenize import backend_of

    vocab = sorted(w for w in backend_of(tokenizer).get_vocab() if w.isalpha() and w.islower() and len(w) > 1)
    if not vocab:
        raise ExportError("tokenizer vocabulary has no lower-case whole words to build random texts from")
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# export steps
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_export():
    """Silence the TorchScript exporter's deprecation and tracer warnings (checked by the parity
    step instead: every traced constant is exercised at other batch sizes and lengths)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_image_tower(model: nn.Module, path: Path, image_size: int, opset: int, regions_shape: Sequence[int]) -> None:
    """Trace the image tower to `path` (dynamic batch; example batch 2: size-1 dims get fixed).

    `regions_shape` (M, Dl) is written into the graph's output type, which the tracer leaves
    symbolic after a transpose."""
    example = torch.from_numpy(phantom_like_images(2, image_size, seed=123))
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            ImageTower(model).eval(), (example,), os.fspath(path),
            input_names=list(IMAGE_INPUTS), output_names=list(IMAGE_OUTPUTS),
            dynamic_axes={"images": {0: "batch"}, "image_emb": {0: "batch"}, "regions": {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    set_output_dims(path, {"regions": ["batch", *regions_shape]})


def set_output_dims(path: Path, dims: dict[str, list[int | str]]) -> None:
    """Declare output shapes of an ONNX file: an int is a fixed size, a str a named dynamic axis."""
    import onnx

    model = onnx.load(os.fspath(path))
    for out in model.graph.output:
        if out.name not in dims:
            continue
        shape = out.type.tensor_type.shape
        if len(shape.dim) != len(dims[out.name]):
            raise ExportError(f"{path.name}: output {out.name!r} has {len(shape.dim)} dims, expected {dims[out.name]}")
        for d, value in zip(shape.dim, dims[out.name], strict=True):
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = int(value)
    onnx.save_model(model, os.fspath(path))


TEXT_TRACES = ("unpadded", "unpadded-split", "eager", "sdpa")


def export_text_tower(model: nn.Module, path: Path, max_length: int, opset: int, trace: str = "unpadded") -> list[str]:
    """Trace the text tower to `path` (dynamic batch and sequence). trace: "unpadded"
    (pertvl.export.unpadded), "unpadded-split" (the same with [CLS]/[SEP] rows apart: the int8
    source graph), "eager" (the backbone under eager attention: the pattern onnxruntime's fusion
    recognizes) or "sdpa" (the backbone as it is). Returns the modules switched to eager attention."""
    if trace not in TEXT_TRACES:
        raise ValueError(f"trace: expected one of {TEXT_TRACES}, got {trace!r}")
    # two reports of different lengths: the trace sees padding
    texts = [clean_text(REAL_REPORTS[0]), clean_text(REAL_REPORTS[2])]
    enc = encode_texts(model.tokenizer, texts, max_length=max_length)
    example = tuple(torch.from_numpy(getattr(enc, k)) for k in TEXT_INPUTS)
    seq = {0: "batch", 1: "sequence"}
    attention = eager_attention(model) if trace == "eager" else contextlib.nullcontext([])
    with torch.no_grad(), _quiet_export(), attention as switched:
        torch.onnx.export(
            TextTower(model, unpadded=trace.startswith("unpadded"), split_special=trace == "unpadded-split").eval(),
            example, os.fspath(path),
            input_names=list(TEXT_INPUTS), output_names=list(TEXT_OUTPUTS),
            dynamic_axes={**{k: seq for k in TEXT_INPUTS}, "text_emb": {0: "batch"}, "words": seq, "word_mask": seq},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    return switched


def optimize_text_graph(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse the BERT graph in place with onnxruntime.transformers.optimizer (opt_level 0: only
    the portable contrib-op fusions; the session adds ORT_ENABLE_ALL at load). Returns the counts
    of fused operators."""
    from onnxruntime.transformers import optimizer

    with quiet_onnxruntime_tools():
        opt = optimizer.optimize_model(os.fspath(path), model_type="bert", num_heads=int(num_heads),
                                       hidden_size=int(hidden_size), opt_level=0)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(os.fspath(path))
    return stats


def set_metadata(path: Path, props: dict[str, str], doc: str) -> list[str]:
    """Replace the pertvl metadata_props of an ONNX file; returns the files it now consists of
    (the .onnx, plus `<name>.data` when the model is over 2 GB and needs external data)."""
    import onnx

    model = onnx.load(os.fspath(path))
    keep = [p for p in model.metadata_props if not p.key.startswith("pertvl.")]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = doc
    model.producer_name = "pertvl"
    model.producer_version = __version__
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if weights > _TWO_GB - (64 << 20):  # protobuf's limit: only then split weights into a .data file
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
        return [path.name, data.name]
    onnx.save_model(model, os.fspath(path))
    return [path.name]


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX file as onnxruntime sees them: name, dtype, shape (a dynamic
    axis is its name)."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])

    def desc(arg) -> dict:
        dtype = arg.type.removeprefix("tensor(").removesuffix(")")
        dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
        return {"name": arg.name, "dtype": dtype, "shape": [d if isinstance(d, int) else str(d) for d in arg.shape]}

    return [desc(a) for a in session.get_inputs()], [desc(a) for a in session.get_outputs()]


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------
@dataclass
class ParityReport:
    """max_abs: per tower and output, max |torch - onnxruntime| over every case; scale: max |torch
    output| (the local features are not normalized); min_cosine: worst cosine between torch's and
    onnxruntime's global embeddings; cases: the same per case."""

    max_abs: dict[str, dict[str, float]]
    scale: dict[str, dict[str, float]]
    min_cosine: dict[str, float]
    cases: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "scale": self.scale, "min_cosine": self.min_cosine, "cases": self.cases}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def parity_bound(name: str, tolerance: float, scale: float) -> float:
    """The allowed max abs difference of one output: `tolerance` for the L2-normalized embeddings;
    `tolerance × max(1, scale)` for the unnormalized local features (regions, words), whose fp32
    rounding grows with their magnitude (a random-init ResNet-50 gives |regions| ≈ 50, and a
    correct export then differs by ~1e-4 absolute, i.e. 2e-6 relative)."""
    return tolerance if name in ("image_emb", "text_emb") else tolerance * max(1.0, scale)


def parity_inputs(model: nn.Module, image_size: int, max_length: int,
                  batch_sizes: Sequence[int] = (1, 3, 8), word_counts: Sequence[int] = (5, 60)):
    """The parity cases: (tower, description, inputs dict of numpy arrays): random and phantom-like
    images, random-vocabulary reports of each word count and the real report sentences, at each
    batch size."""
    cases = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        cases.append(("image", f"random uniform, batch {b}",
                      {"images": rng.random((b, 1, image_size, image_size), dtype=np.float32)}))
    cases.append(("image", "phantom-like, batch 4", {"images": phantom_like_images(4, image_size, seed=1)}))
    for b in batch_sizes:
        for w in word_counts:
            texts = random_vocab_texts(model.tokenizer, b, w, seed=b * 100 + w)
            enc = encode_texts(model.tokenizer, texts, max_length=max_length)
            cases.append(("text", f"random words, batch {b}, {w} words", {k: getattr(enc, k) for k in TEXT_INPUTS}))
    real = [clean_text(t) for t in REAL_REPORTS]
    enc = encode_texts(model.tokenizer, real, max_length=max_length)
    cases.append(("text", f"real reports, batch {len(real)}", {k: getattr(enc, k) for k in TEXT_INPUTS}))
    return cases


def run_torch(model: nn.Module, tower: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The wrapped tower's outputs in torch (float32, CPU), as numpy."""
    module = ImageTower(model) if tower == "image" else TextTower(model)
    names = IMAGE_INPUTS if tower == "image" else TEXT_INPUTS
    with torch.inference_mode():
        outs = module.eval()(*(torch.from_numpy(feeds[k]) for k in names))
    return [o.detach().cpu().numpy() for o in outs]


def check_parity(model: nn.Module, files: dict[str, Path], cases, tolerance: float | None) -> ParityReport:
    """Run every case through torch and onnxruntime and compare.

    Args:
        model: the DualEncoder (CPU, float32, eval).
        files: {"image": path, "text": path} of the ONNX files to check.
        cases: `parity_inputs(...)`.
        tolerance: max abs difference allowed per output (see `parity_bound`); None = report only (int8).
    Raises:
        ParityError: naming the file, output and case whose difference exceeds the bound, or
            when shapes or word masks disagree.
    """
    from pertvl.export.runtime import open_session

    sessions = {t: open_session(p, ["CPUExecutionProvider"]) for t, p in files.items()}
    names = {"image": IMAGE_OUTPUTS, "text": TEXT_OUTPUTS}
    max_abs = {t: dict.fromkeys(names[t], 0.0) for t in files}
    scale = {t: dict.fromkeys(names[t], 0.0) for t in files}
    min_cos = dict.fromkeys(files, 1.0)
    rows = []
    for tower, what, feeds in cases:
        if tower not in sessions:
            continue
        ref = run_torch(model, tower, feeds)
        got = sessions[tower].run(list(names[tower]), feeds)
        diffs, scales = {}, {}
        for name, r, g in zip(names[tower], ref, got, strict=True):
            where = f"{files[tower].name}: output {name!r}"
            if r.shape != g.shape:
                raise ParityError(f"{where} has shape {g.shape}, torch gives {r.shape} ({what})")
            if r.dtype == np.bool_:
                bad = int((r != g.astype(bool)).sum())
                if bad:
                    raise ParityError(f"{where} differs from torch in {bad} entries ({what})")
                diffs[name] = scales[name] = 0.0
                continue
            r64 = r.astype(np.float64)
            diffs[name] = float(np.abs(r64 - g.astype(np.float64)).max()) if r.size else 0.0
            scales[name] = float(np.abs(r64).max()) if r.size else 0.0
            max_abs[tower][name] = max(max_abs[tower][name], diffs[name])
            scale[tower][name] = max(scale[tower][name], scales[name])
            if tolerance is not None and diffs[name] > parity_bound(name, tolerance, scales[name]):
                raise ParityError(
                    f"{where} differs from torch by {diffs[name]:.3g} > {parity_bound(name, tolerance, scales[name]):.3g} "
                    f"(tolerance {tolerance:g}, output magnitude {scales[name]:.3g}; {what})"
                )
        cos = float(_cosines(ref[0], got[0]).min())
        min_cos[tower] = min(min_cos[tower], cos)
        rows.append({"tower": tower, "file": files[tower].name, "input": what,
                     "shape": list(next(iter(feeds.values())).shape), "max_abs": diffs, "scale": scales,
                     "min_cosine": cos})
    return ParityReport(max_abs, scale, min_cos, rows)


def measure_speed(files: dict[str, dict[str, Path]], cases, repeats: int = 3) -> dict[str, Any]:
    """onnxruntime time of fp32 vs int8 per tower on the largest parity batch (best of `repeats`)."""
    from pertvl.export.runtime import open_session

    out: dict[str, Any] = {}
    for tower in ("image", "text"):
        feeds = max((c for c in cases if c[0] == tower), key=lambda c: next(iter(c[2].values())).size)
        times = {}
        for variant, path in files[tower].items():
            session = open_session(path, ["CPUExecutionProvider"])
            session.run(None, feeds[2])
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                session.run(None, feeds[2])
                best = min(best, time.perf_counter() - t0)
            times[variant] = best
        out[tower] = {"input": feeds[1], "seconds": times,
                      "int8_speedup": times["fp32"] / times["int8"] if "int8" in times else None}
    return out


# ----------------------------------------------------------------------------------------------
# the whole export
# ----------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """out_dir: the export folder; manifest: its pertvl_export.json content."""

    out_dir: Path
    manifest: dict[str, Any]


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_length: int | None = None,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    int8_residual: str | Sequence[str] = DEFAULT_RESIDUAL,
    parity: bool = True,
    text_graph: str = "auto",
    tolerance: float = PARITY_TOLERANCE,
    force: bool = False,
    source: dict[str, Any] | None = None,
    command: str | None = None,
    max_words: int | None = DEFAULT_MAX_WORDS,
    drop_deid: bool = True,
) -> ExportResult:
    """Export a DualEncoder to `out_dir` (see the module docstring).

    Args:
        model: a pertvl.model.DualEncoder (moved to CPU float32 for the export).
        out_dir: the export folder to create.
        image_size: side S of the square input images.
        max_length: word pieces per report (default: the model config's max_length, else 128).
        opset: ONNX opset.
        quantize: None or "int8".
        int8_residual: text layers whose int8 input gets a residual pass (pertvl.export.int8:
            "qkv", "attn-out", "ffn-in", "ffn-out", as a sequence or a comma list; () or "none"
            for none); unpadded text graph only.
        parity: run the torch-vs-onnxruntime check (fp32 must be within `tolerance`).
        text_graph: "auto" ("unpadded" when the backbone supports it, else "fused"), "unpadded",
            "fused" (eager-attention trace + onnxruntime's transformer optimizer) or "traced"
            (eager-attention trace as it is).
        tolerance: max abs difference allowed per fp32 output.
        force: replace an existing `out_dir`.
        source: where the model came from (recorded in the manifest).
        command: the command line that made the export (recorded in the manifest).
        max_words, drop_deid: the clean_text parameters the model was trained with.
    Returns:
        ExportResult.
    Raises:
        FileExistsError: `out_dir` exists and `force` is False.
        ParityError: onnxruntime and torch disagree; nothing is written.
        ValueError: an unknown `text_graph` or `int8_residual` layer, or "unpadded" for a backbone
            that does not support it.
    """
    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (use --force to replace it)")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize: expected None or 'int8', got {quantize!r}")
    if text_graph not in TEXT_GRAPHS:
        raise ValueError(f"text_graph: expected one of {TEXT_GRAPHS}, got {text_graph!r}")
    int8_residual = parse_residual_layers(int8_residual if isinstance(int8_residual, str) else ",".join(int8_residual))
    max_length = int(max_length or getattr(getattr(model, "config", None), "max_length", 128) or 128)
    model = model.to("cpu", torch.float32).eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            probe = model.encode_image(torch.from_numpy(phantom_like_images(2, image_size, seed=7)))
        grid = [int(g) for g in probe.grid]
        embedding_dim, local_dim = int(probe.global_emb.shape[1]), int(probe.regions.shape[2])
        paths = {t: tmp / ONNX_FILES[(t, "fp32")] for t in ("image", "text")}
        export_image_tower(model, paths["image"], image_size, opset, (grid[0] * grid[1], local_dim))
        text_info = _export_text_graph(model, paths["text"], max_length, opset, text_graph)
        log.info("traced both towers in %.1f s (text graph: %s)", time.perf_counter() - t0, text_info["mode"])
        tok_files = sorted(Path(p).name for p in model.tokenizer.save_pretrained(tmp) if Path(p).is_file())

        image_io, text_io = graph_io(paths["image"]), graph_io(paths["text"])
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "pertvl_version": __version__,
            "export_id": uuid.uuid4().hex,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "source": source or {},
            "model_config": model.config.to_dict() if hasattr(model.config, "to_dict") else None,
            "opset": opset,
            "embedding_dim": embedding_dim,
            "local_dim": local_dim,
            "exporter": {"method": EXPORTER, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "text_graph": text_info},
            "image": {
                "inputs": image_io[0], "outputs": image_io[1], "grid": grid,
                "preprocessing": {
                    "size": int(image_size), "channels": 1, "dtype": "float32",
                    "grayscale": "PIL luma; 16-bit and float images min-max scaled to 8 bit",
                    "resize": "shorter side to size, bilinear", "crop": "center, size x size",
                    "intensity": "uint8 / 255 -> [0, 1]",
                    "normalization": "inside the graph (the model's mean/std)",
                    "reference": "pertvl.infer.Embedder.load_images (= pertvl.data.shards.resize_center_crop)",
                },
            },
            "text": {
                "inputs": text_io[0], "outputs": text_io[1],
                "cleaning": {"rule": "pertvl.data.text.clean_text", "max_words": max_words, "drop_deid": drop_deid},
                "max_length": max_length,
                "tokenization": "pertvl.data.tokenize.encode_texts (pre-split words, word_ids -1 for special/pad)",
                "tokenizer_files": {},
            },
            "files": {},
            "parity": None,
            "speed": None,
        }
        for name in tok_files:
            entry = {"kind": "tokenizer", "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            manifest["files"][name] = entry
            manifest["text"]["tokenizer_files"][name] = entry["sha256"]

        variants = ["fp32"] + (["int8"] if quantize == "int8" else [])
        if "int8" in variants:
            quantize_int8(paths["image"], tmp / ONNX_FILES[("image", "int8")], "image")
            text_info["int8"] = _quantize_text(model, paths["text"], tmp / ONNX_FILES[("text", "int8")],
                                               text_info["mode"], max_length, opset, int8_residual)
        for variant in variants:
            for tower in ("image", "text"):
                path = tmp / ONNX_FILES[(tower, variant)]
                doc = f"pertvl {tower} encoder ({variant}); facts in metadata_props 'pertvl.*' and {MANIFEST_NAME}"
                for name in set_metadata(path, tower_metadata(manifest, tower, variant), doc):
                    manifest["files"][name] = {"kind": "onnx" if name.endswith(".onnx") else "onnx-data",
                                               "tower": tower, "variant": variant,
                                               "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}

        cases = parity_inputs(model, image_size, max_length) if parity or "int8" in variants else []
        int8_paths = {t: tmp / ONNX_FILES[(t, "int8")] for t in ("image", "text")}
        if "int8" in variants:
            manifest["speed"] = measure_speed(
                {t: {"fp32": paths[t], "int8": int8_paths[t]} for t in ("image", "text")}, cases)
        if parity:
            t1 = time.perf_counter()
            report = {"tolerance": tolerance,
                      "rule": "fp32: max abs diff <= tolerance for image_emb/text_emb, <= tolerance x max(1, "
                              "max |torch output|) for regions/words; word_mask identical; int8: reported only",
                      "fp32": check_parity(model, paths, cases, tolerance).to_json()}
            if "int8" in variants:
                report["int8"] = check_parity(model, int8_paths, cases, None).to_json()
            manifest["parity"] = report
            log.info("parity checked in %.1f s: fp32 max abs %s", time.perf_counter() - t1,
                     {t: max(v.values()) for t, v in report["fp32"]["max_abs"].items()})

        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, manifest)


def _export_text_graph(model: nn.Module, path: Path, max_length: int, opset: int, text_graph: str) -> dict[str, Any]:
    """Write the text tower's graph in the `text_graph` form; returns its manifest entry."""
    import onnx

    backbone = model.text.backbone
    reason = unpadded_unsupported(backbone)
    if reason is None and getattr(model.text, "needs_word_states", False):
        reason = (f"word_features {model.text.word_features!r} needs intermediate hidden states, which the "
                  "unpadded graph does not return")
    if text_graph == "unpadded" and reason:
        raise ValueError(f"text_graph 'unpadded': {reason}; use 'fused'")
    mode = ("fused" if reason else "unpadded") if text_graph == "auto" else text_graph
    info: dict[str, Any] = {"mode": mode}
    if text_graph == "auto" and reason:
        info["unpadded_unsupported"] = reason
    switched = export_text_tower(model, path, max_length, opset, "unpadded" if mode == "unpadded" else "eager")
    if mode == "unpadded":
        ops = [n.op_type for n in onnx.load(os.fspath(path), load_external_data=False).graph.node]
        info["contrib_ops"] = {"MultiHeadAttention": ops.count("MultiHeadAttention")}
    else:
        info["eager_attention_for"] = switched
    cfg = _text_transformer_config(model)
    if mode == "fused" and cfg is not None:
        info["tool"] = "onnxruntime.transformers.optimizer (model_type=bert, opt_level=0)"
        info["fused"] = optimize_text_graph(path, cfg.num_attention_heads, cfg.hidden_size)
        if not info["fused"].get("Attention"):
            log.warning("text graph: onnxruntime fused no Attention node (fused: %s); it will run unfused",
                        info["fused"])
    return info


def _quantize_text(model: nn.Module, fp32: Path, dst: Path, mode: str, max_length: int, opset: int,
                   residual: tuple[str, ...]) -> dict[str, Any]:
    """Write the int8 text tower; returns its manifest entry. The residual passes need the
    unpadded graph (they find the layers by their weight names there); other graphs get none."""
    if mode != "unpadded":
        quantize_int8(fp32, dst, "text")
        if residual:  # a warning when asked for, not for the default
            (log.info if residual == DEFAULT_RESIDUAL else log.warning)(
                "int8: residual passes %s need the unpadded text graph; the %s graph gets none", list(residual), mode)
        return {"source": "the fp32 graph", "op_types": INT8_OP_TYPES["text"], "residual": {}}
    source = dst.with_name(".text_int8_source.onnx")
    try:
        export_text_tower(model, source, max_length, opset, "unpadded-split")
        quantize_int8(source, dst, "text")
    finally:
        source.unlink(missing_ok=True)
    counts = add_residual_passes(dst, residual) if residual else {}
    return {"source": "unpadded-split trace ([CLS]/[SEP] rows quantized apart from word rows)",
            "op_types": INT8_OP_TYPES["text"], "fp32": ["word/position embeddings", "attention core", "layer norms"],
            "residual": counts}


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary folder to `out_dir` (replacing an old export only now)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.chmod(0o755)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# loading the model to export
# ----------------------------------------------------------------------------------------------
def _is_pretrained_dir(path: Path) -> bool:
    from pertvl.model.dual import CONFIG_NAME

    return (path / CONFIG_NAME).is_file() and (path / "model.safetensors").is_file()


def _find_run_config(checkpoint: Path) -> Path | None:
    """config.yaml of the run a checkpoint folder belongs to (the folder or up to 3 parents)."""
    for folder in [checkpoint, *list(checkpoint.parents)[:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _deepspeed_checkpoint(path: Path):
    """The CheckpointInfo (tag folder) of a DeepSpeed checkpoint at `path` (a tag folder, a
    checkpoints folder or a run folder), or None when there is none."""
    from pertvl.train.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path, path)
    except FileNotFoundError:
        return None


def _consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint tag folder, loading with weights_only=True.

    The trainable parameters come from the fp32 master copies
    (deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint; it passes
    weights_only=False to torch.load, we force True and allow-list the four DeepSpeed classes
    its files hold, pertvl.train.checkpoint.deepspeed_safe_globals). Frozen parameters (BERT's
    unused pooler) are not in them (DeepSpeed 0.19.8 records no frozen_param_shapes here) and
    come, like everything under ZeRO 0, from mp_rank_00_model_states.pt["module"].
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pertvl.train.checkpoint import deepspeed_safe_globals

    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportError(f"{tag_dir}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module = torch.load(states, map_location="cpu", weights_only=True).get("module")
        if not isinstance(module, dict):
            raise ExportError(f"{states}: holds no 'module' state dict")
        state: dict[str, torch.Tensor] = {}
        if any(tag_dir.glob("*optim_states.pt")):
            torch.load = weights_only_load  # zero_to_fp32 calls torch.load through the module attribute
            try:
                state = dict(get_fp32_state_dict_from_zero_checkpoint(os.fspath(tag_dir.parent), tag=tag_dir.name))
            finally:
                torch.load = original
    from_module = [k for k in module if k not in state]
    for k in from_module:
        v = module[k]
        state[k] = v.float() if v.is_floating_point() else v
    if state and from_module and len(from_module) < len(module):
        log.info("%s: %d tensors (frozen parameters, buffers) taken from the model states", tag_dir, len(from_module))
    return state


def load_deepspeed_checkpoint(checkpoint: Path, config_path: Path | None = None):
    """A DualEncoder from a DeepSpeed checkpoint (any ZeRO stage) + the run's config.yaml
    (cfg["model"] -> create_model).

    Raises:
        FileNotFoundError: no checkpoint, or no config.yaml given or found.
        ExportError: the weights do not fit the configured model, or the files hold objects that
            torch.load(weights_only=True) refuses.
    """
    import yaml

    from pertvl.model import create_model

    info = _deepspeed_checkpoint(checkpoint)
    if info is None:
        raise FileNotFoundError(f"{checkpoint}: no complete DeepSpeed checkpoint there")
    config_path = config_path or _find_run_config(info.path)
    if config_path is None or not Path(config_path).is_file():
        raise FileNotFoundError(
            f"{checkpoint}: a DeepSpeed checkpoint needs the run's config.yaml (not found next to it; pass --config)"
        )
    cfg = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model") or {}, dict):
        raise ExportError(f"{config_path}: expected a run config with a 'model:' mapping")
    try:
        state = _consolidated_state_dict(info.path)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":
            raise ExportError(
                f"{info.path}: holds objects that torch.load(weights_only=True) refuses "
                f"({str(e).splitlines()[0][:300]})"
            ) from None
        raise
    model = create_model(cfg.get("model") or {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{info.path}: weights do not fit the model of {config_path}: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval(), cfg, info


def load_for_export(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                    config: str | os.PathLike | None = None):
    """(model, source facts, run config or None) from `--run RUN_DIR` (RUN_DIR/final) or
    `--checkpoint PATH` (a save_pretrained folder or a DeepSpeed checkpoint folder).

    Raises:
        FileNotFoundError: naming what is missing and what was expected.
    """
    import yaml

    from pertvl.model import DualEncoder

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of run / checkpoint")
    if run is not None:
        run = Path(run)
        final = run / "final"
        if not _is_pretrained_dir(final):
            raise FileNotFoundError(
                f"{final}: no finished model (config.json + model.safetensors written by save_pretrained); "
                "for an unfinished run pass --checkpoint with one of its checkpoint folders"
            )
        cfg_path = run / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else None
        return DualEncoder.from_pretrained(final).eval(), {"kind": "run", "path": str(run.resolve())}, cfg
    checkpoint = Path(checkpoint)
    if _is_pretrained_dir(checkpoint):
        cfg_path = Path(config) if config else _find_run_config(checkpoint)
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path and cfg_path.is_file() else None
        return (DualEncoder.from_pretrained(checkpoint).eval(),
                {"kind": "pretrained", "path": str(checkpoint.resolve())}, cfg)
    if checkpoint.is_dir() and _deepspeed_checkpoint(checkpoint) is not None:
        model, cfg, info = load_deepspeed_checkpoint(checkpoint, Path(config) if config else None)
        return model, {"kind": "deepspeed", "path": str(info.path.resolve()), "tag": info.tag, "step": info.step}, cfg
    raise FileNotFoundError(
        f"{checkpoint}: neither a save_pretrained folder (config.json + model.safetensors) nor a DeepSpeed "
        "checkpoint (a tag folder with mp_rank_00_model_states.pt, or a folder with checkpoints/latest)"
    )


def _run_image_size(cfg: dict | None) -> int | None:
    """data.image_size of a run config, or the image_size of the shards it trained on."""
    data = (cfg or {}).get("data") or {}
    if data.get("image_size"):
        return int(data["image_size"])
    shards = data.get("shards")
    if shards and (Path(shards) / "manifest.json").is_file():
        size = json.loads((Path(shards) / "manifest.json").read_text(encoding="utf-8")).get("image_size")
        return int(size) if size else None
    return None


def cli_main(args) -> int:
    """`pertvl export`."""
    model, source, cfg = load_for_export(run=args.run, checkpoint=args.checkpoint, config=args.config)
    image_size = args.image_size or _run_image_size(cfg) or DEFAULT_IMAGE_SIZE
    max_length = args.max_length or ((cfg or {}).get("data") or {}).get("max_length") or model.config.max_length
    try:
        result = export_model(
            model, args.out, image_size=image_size, max_length=max_length, opset=args.opset,
            quantize=args.quantize, int8_residual=parse_residual_layers(args.int8_residual),
            parity=not args.no_parity, text_graph=args.text_graph,
            tolerance=args.tolerance, force=args.force, source=source,
            command=" ".join(["pertvl", *sys.argv[1:]]),
        )
    except ParityError as e:
        print(f"pertvl export: parity check FAILED, nothing written to {args.out}: {e}", file=sys.stderr)
        return 1
    m = result.manifest
    print(f"exported to {result.out_dir} (export_id {m['export_id']}, opset {m['opset']}, image {image_size} px, "
          f"D={m['embedding_dim']}, Dl={m['local_dim']}, grid {m['image']['grid']})")
    graph = m["exporter"]["text_graph"]
    print(f"  text graph: {graph['mode']}" + (f", fused {graph['fused']}" if graph.get("fused") else "")
          + (f" (unpadded unsupported: {graph['unpadded_unsupported']})" if graph.get("unpadded_unsupported") else ""))
    if "int8" in graph:
        residual = graph["int8"].get("residual") or {}
        print("  int8 text residual passes: " + (", ".join(f"{k} ({n} matmuls)" for k, n in residual.items()) or "none"))
    if m["parity"]:
        for variant in ("fp32", "int8"):
            if variant in m["parity"]:
                p = m["parity"][variant]
                for tower in ("image", "text"):
                    diffs = ", ".join(f"{k} {v:.2e}" + (f" (|x| <= {p['scale'][tower][k]:.3g})"
                                                            if k in ("regions", "words") else "")
                                      for k, v in p["max_abs"][tower].items() if k != "word_mask")
                    print(f"  parity {variant} {tower}: max abs diff {diffs}; min cosine {p['min_cosine'][tower]:.6f}")
    if m["speed"]:
        for tower, s in m["speed"].items():
            print(f"  speed {tower} ({s['input']}): fp32 {s['seconds']['fp32'] * 1e3:.1f} ms, "
                  f"int8 {s['seconds']['int8'] * 1e3:.1f} ms ({s['int8_speedup']:.2f}x)")
    return 0
