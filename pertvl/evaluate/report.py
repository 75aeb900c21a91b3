"""Writers shared by the evaluations: a result's files, training curves, attention maps, tables.
Figures are matplotlib Figures on the Agg canvas at fixed sizes (pixel size = figsize × DPI);
every file is written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.files import atomic_open, atomic_write_text, write_json

log = logging.getLogger(__name__)

DPI = 100
CURVES_FIGSIZE = (10.0, 6.0)  # → 1000 × 600 px
ATTENTION_FIGSIZE = (4.0, 4.4)  # → 400 × 440 px


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas at DPI, constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    """Save at the figure's own size, atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=DPI, format="png")
    return path


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def ci(interval: Sequence[float] | None) -> str:
    return "—" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A pipe table ending with a newline. align: one "l" or "r" per column; default: the first
    column left, the others right (names, then numbers)."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_result(result: Any, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """NAME.json, NAME.md and the result's figures; returns {"json", "markdown", **figures} paths."""
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], result.markdown(name))
    paths.update(result.figures(out, name))
    return paths


def run_info() -> dict[str, Any]:
    """The pertvl version and the command line, in every result's info."""
    import sys

    from pertvl import __version__

    return {"pertvl_version": __version__, "command": " ".join(["pertvl", *sys.argv[1:]])}


def print_paths(paths: dict[str, Path]) -> None:
    for kind, path in paths.items():
        print(f"  {kind}: {path}")


def read_metrics_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Rows of a monitor JSONL with a numeric "step", and the count of other lines (skipped and logged: a
    killed run can leave a half-written last line)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(d, dict) or not isinstance(d.get("step"), int | float):
                bad += 1
                continue
            rows.append(d)
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON objects with a step", path, bad)
    return rows, bad


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.array(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> dict[str, Any]:
    """Every "loss/…" key and "lr" of a monitor JSONL against "step". Returns {"png", "keys", "points",
    "bad_lines"}; ValueError naming the file when it holds no loss values."""
    rows, bad = read_metrics_jsonl(metrics_jsonl)
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss/")},
                       key=lambda k: (k != "loss/total", k))
    if not loss_keys:
        raise ValueError(f"{metrics_jsonl}: no 'loss/…' values with a 'step' to plot")
    has_lr = any(isinstance(r.get("lr"), int | float) for r in rows)
    fig = new_figure(CURVES_FIGSIZE)
    axes = fig.subplots(2 if has_lr else 1, 1, sharex=True, height_ratios=[3, 1] if has_lr else None, squeeze=False)[:, 0]
    colors = {"loss/total": "black", "loss/global": "#4f81bd", "loss/local": "#9bbb59", "loss/pert": "#c0504d"}
    for i, k in enumerate(loss_keys):
        x, y = _series(rows, k)
        if not len(x):
            continue
        color = colors.get(k, f"C{i + 4}")
        window = max(1, len(y) // 25)
        if window > 1:
            axes[0].plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            axes[0].plot(x, _smooth(y, window), color=color, linewidth=2, label=f"{k} (moving avg {window})")
        else:
            axes[0].plot(x, y, color=color, linewidth=2, marker="o" if len(y) < 30 else None, markersize=3, label=k)
    axes[0].set_ylabel("loss")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    axes[0].set_title("Training losses")
    if has_lr:
        x, y = _series(rows, "lr")
        axes[1].plot(x, y, color="#f79646", linewidth=1.5)
        axes[1].set_ylabel("learning rate")
        axes[1].grid(alpha=0.3)
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step")
    path = save_png(fig, out_png)
    return {"png": path, "keys": loss_keys + (["lr"] if has_lr else []), "points": len(rows), "bad_lines": bad}


def save_attention_map(image: np.ndarray, attn: np.ndarray, word: str, out_png: str | os.PathLike) -> Path:
    """A word→region attention map attn [h, w] as a heatmap over image [H, W] uint8 (upsampled bilinearly,
    scaled to [0, 1]), the word as title; 400 × 440 px. ValueError on wrong shapes."""
    from PIL import Image

    image = np.asarray(image)
    attn = np.asarray(attn, dtype=np.float32)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W] image, got {image.dtype} {tuple(image.shape)}")
    if attn.ndim != 2 or not np.isfinite(attn).all():
        raise ValueError(f"expected a finite [h, w] attention map, got shape {tuple(attn.shape)}")
    h, w = image.shape
    up = np.asarray(Image.fromarray(attn).resize((w, h), Image.Resampling.BILINEAR))
    span = float(up.max() - up.min())
    up = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    fig = new_figure(ATTENTION_FIGSIZE)
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    # Opacity follows attention, so unattended regions show the plain radiograph.
    ax.imshow(up, cmap="jet", alpha=0.65 * up, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(word, fontsize=16)
    return save_png(fig, out_png)


FINDING_ATTENTION_FIGSIZE = (5.2, 4.6)  # → 520 × 460 px


def save_finding_attention(image: np.ndarray, attn: np.ndarray, mask: np.ndarray, word: str, sentence: str,
                           out_png: str | os.PathLike) -> Path:
    """A finding word's attention attn [h, w] over image [H, W], the finding's true outline (mask [H, W]),
    a colour bar in the grid's units and the sentence as caption."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from PIL import Image

    image, attn = np.asarray(image), np.asarray(attn, dtype=np.float32)
    h, w = image.shape
    up = np.asarray(Image.fromarray(attn).resize((w, h), Image.Resampling.BILINEAR))
    lo, top = float(attn.min()), float(attn.max())
    span = top - lo if top > lo else 1.0
    fig = new_figure(FINDING_ATTENTION_FIGSIZE)
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    # Opacity follows attention, so the least attended regions show the plain radiograph.
    ax.imshow(up, cmap="jet", alpha=0.65 * np.clip((up - lo) / span, 0, 1), vmin=lo, vmax=lo + span,
              interpolation="bilinear")
    if np.asarray(mask).any():
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="white", linewidths=1.5)
    ax.set_axis_off()
    ax.set_title(f'"{word}"', fontsize=14)
    bar = fig.colorbar(ScalarMappable(Normalize(lo, lo + span), cmap="jet"), ax=ax, shrink=0.85)
    bar.set_label("attention share per region")
    fig.supxlabel(textwrap.fill(sentence, 70), fontsize=9)
    return save_png(fig, out_png)


def _sentence_of(text: str, index: int) -> str:
    """The sentence of a raw report holding its cleaned word number `index`."""
    from pertvl.data.text import clean_text

    seen = 0
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        n = len(clean_text(sentence, max_words=None).split())
        if seen <= index < seen + n:
            return sentence
        seen += n
    return text


def finding_attention_maps(embedder: Any, pairs: Sequence[Any], images_root: str | os.PathLike,
                           out_dir: str | os.PathLike, limit: int = 6) -> list[tuple[Path, str]]:
    """Attention maps of the words naming a present finding on phantom pairs, from an export; pairs that
    are not phantoms or were cut by max_length are passed over. [(png, caption)], at most `limit`."""
    from pertvl.data.image import read_image
    from pertvl.data.phantom.grounding import PhantomTruth, finding_words, phantom_masks
    from pertvl.infer import attention_maps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    for pair in pairs:
        if len(written) >= limit:
            break
        try:
            truth = PhantomTruth.from_meta({"extra": pair.extra})
            text = embedder.clean([pair.text])[0]
            words = finding_words(truth, text)
        except ValueError:
            continue
        path = Path(images_root) / pair.image
        img, txt = embedder.image_features(embedder.load_images([path])), embedder.text_features([pair.text])
        maps = attention_maps(img.regions[0], img.grid, txt.words[0], txt.word_mask[0])
        masks, image = phantom_masks(truth), read_image(path, truth.size)
        for fw in words:
            if fw.index >= len(maps) or len(written) >= limit:
                continue
            sentence = _sentence_of(pair.text, fw.index)
            png = save_finding_attention(image, maps[fw.index], masks[fw.type], fw.word, sentence,
                                         out_dir / f"{pair.id}_w{fw.index:03d}_{fw.word}.png")
            written.append((png, f"{pair.id}: \"{fw.word}\" ({fw.type}) in \"{sentence}\""))
    return written
