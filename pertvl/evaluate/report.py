"""Generic writers for evaluation outputs: a result's files, the comparison table, training curves.

Nothing here knows an evaluation by name: a result (pertvl.evaluate.evaluation.Result) brings its
JSON, Markdown, figures and flat metrics, and pertvl.evaluate.registry says which evaluation a
schema or a metric belongs to. The helpers below (tables, figures) are shared by the evaluations.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot, no global
backend state) at fixed sizes (no tight bounding box), so a PNG's pixel size is
figsize × dpi and can be checked. Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.evaluate.markdown import markdown_table
from pertvl.files import atomic_open, atomic_write_text, write_json

log = logging.getLogger(__name__)

COMPARISON_SCHEMA = "pertvl-comparison/1"
DPI = 100
COMPARISON_FIGSIZE = (15.0, 5.5)  # → 1500 × 550 px
CURVES_FIGSIZE = (10.0, 6.0)  # → 1000 × 600 px
ATTENTION_FIGSIZE = (4.0, 4.4)  # → 400 × 440 px


# ----------------------------------------------------------------------------- helpers


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


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def ci(interval: Sequence[float] | None) -> str:
    return "—" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table ending with a newline (pertvl.evaluate.markdown.markdown_table)."""
    return markdown_table(header, rows, align) + "\n"


# ----------------------------------------------------------------------------- one result


def write_result(result: Any, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """NAME.json (the result's schema), NAME.md (its Markdown) and its figures (e.g. NAME.png).

    Returns:
        {"json": path, "markdown": path, **figures}.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], result.markdown(name))
    paths.update(result.figures(out, name))
    return paths


# ----------------------------------------------------------------------------- comparison (ablation)


def flatten_metrics(item: Any) -> dict[str, float | None]:
    """Metric key → value for one run (one seed of one configuration).

    Accepts a registered result, the JSON dict of one, a dict {evaluation key or name: result or
    its JSON} of those, or an already flat {metric key: number} dict ("structure/overall", ...).

    Raises:
        ValueError: on anything else.
    """
    from pertvl.evaluate.evaluation import Result
    from pertvl.evaluate.registry import EVALUATIONS, by_key, result_from_json

    if isinstance(item, Result) and not isinstance(item, Mapping):
        return item.metrics()
    if isinstance(item, Mapping):
        if "schema" in item:
            return result_from_json(item).metrics()
        parts = {k: v for k, v in item.items() if isinstance(k, str) and (by_key(k) or k in EVALUATIONS)}
        if parts:
            out: dict[str, float | None] = {}
            for v in parts.values():
                out.update(flatten_metrics(v))
            return out
        if all(isinstance(k, str) and (v is None or isinstance(v, int | float)) for k, v in item.items()):
            return {k: (None if v is None else float(v)) for k, v in item.items()}
    raise ValueError(f"cannot read metrics from {type(item).__name__}: expected a pertvl result, its JSON, "
                     "or a {metric: number} dict")


def comparison_columns(keys: Sequence[str]) -> list[str]:
    """Metric keys in table order: evaluations (then fine-tunes) in registry order, each in its own metric order."""
    from pertvl.evaluate.registry import evaluation_for_metric, metric_info, result_sources

    order = {e.key: i for i, e in enumerate(result_sources())}

    def sort_key(k: str) -> tuple:
        e = evaluation_for_metric(k)
        return (order[e.key] if e is not None else len(order), metric_info(k).order, k)

    return sorted(set(keys), key=sort_key)


def _column_groups(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(title, columns) per evaluation in column order; metrics of no evaluation under "Other metrics"."""
    from pertvl.evaluate.registry import evaluation_for_metric

    groups: dict[str, list[str]] = {}
    for c in columns:
        e = evaluation_for_metric(c)
        groups.setdefault(e.title if e is not None else "Other metrics", []).append(c)
    return list(groups.items())


def _aggregate(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {
        "mean": float(np.mean(vals)) if vals else None,
        # Sample standard deviation over seeds (ddof=1); undefined for a single seed.
        "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else None,
        "n": len(vals),
        "values": vals,
    }


def _ordered_configs(names: Sequence[str]) -> list[str]:
    """Loss presets in their table order (pertvl.losses.LOSS_PRESETS), then other names."""
    from pertvl.losses import LOSS_PRESETS

    known = [c for c in LOSS_PRESETS if c in names]
    return known + [c for c in names if c not in LOSS_PRESETS]


def _fmt_mean_std(agg: Mapping[str, Any] | None, percent: bool) -> str:
    if agg is None or agg["mean"] is None:
        return "—"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    s = f"{scale * agg['mean']:.{digits}f}"
    if agg["std"] is not None:
        s += f" ± {scale * agg['std']:.{digits}f}"
    return s


def _ci_excludes_zero(runs: Sequence[Mapping[str, float | None]], ci: tuple[str, str]) -> list[int]:
    """[seeds whose own CI (low, high keys) excludes 0, seeds with both bounds]."""
    bounds = [(m.get(ci[0]), m.get(ci[1])) for m in runs]
    bounds = [(lo, hi) for lo, hi in bounds if lo is not None and hi is not None]
    return [sum(lo > 0 or hi < 0 for lo, hi in bounds), len(bounds)]


def write_comparison_table(
    results: Mapping[str, Sequence[Any]], out_dir: str | os.PathLike, name: str = "comparison", *,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """The ablation table in the paper's layout, mean ± std over seeds.

    Args:
        results: config name (a loss preset, or another name) → one item per seed; an item is
            anything `flatten_metrics` reads.
        out_dir: folder for NAME.json, NAME.md, NAME.png.
        name: file stem.
        notes: paragraphs printed under the summary table (how the rows and columns were made).

    Returns:
        {"json": path, "markdown": path, "png": path}.

    JSON schema "pertvl-comparison/1": {"schema", "columns": [metric key], "summary": [the metric
    keys whose MetricInfo.summary is set, the first table], "notes", "rows": [{"config", "label",
    "seeds", "metrics": {metric key: {"mean", "std", "n", "values"}}, "ci_excludes_zero": {summary
    key with a CI: [seeds whose CI excludes 0, seeds with a CI]}}]}; std is the sample standard
    deviation (ddof=1), null for one seed. Rows follow the presets' order and take their labels
    (pertvl.losses.LOSS_PRESETS); columns follow the evaluation registry.
    """
    from pertvl.evaluate.registry import metric_info
    from pertvl.losses import preset_label

    if not results:
        raise ValueError("write_comparison_table: no configurations given")
    flat = {c: [flatten_metrics(item) for item in items] for c, items in results.items()}
    columns = comparison_columns([k for ms in flat.values() for m in ms for k in m])
    summary = [c for c in columns if metric_info(c).summary]
    with_ci = {c: metric_info(c).ci for c in summary if metric_info(c).ci}
    rows = []
    for config in _ordered_configs(list(flat)):
        runs = flat[config]
        rows.append(
            {
                "config": config,
                "label": preset_label(config),
                "seeds": len(runs),
                "metrics": {c: _aggregate([m.get(c) for m in runs]) for c in columns},
                "ci_excludes_zero": {c: _ci_excludes_zero(runs, ci) for c, ci in with_ci.items()},
            }
        )
    doc = {"schema": COMPARISON_SCHEMA, "columns": columns, "summary": summary, "notes": list(notes), "rows": rows}
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    write_json(paths["json"], doc)
    atomic_write_text(paths["markdown"], comparison_markdown(doc))
    plot_comparison(doc, paths["png"])
    return paths


def _summary_cell(row: Mapping[str, Any], key: str) -> str:
    """mean ± std, and for a metric with a CI: [mean CI low, mean CI high] (seeds whose CI excludes 0)."""
    from pertvl.evaluate.registry import metric_info

    info = metric_info(key)
    cell = _fmt_mean_std(row["metrics"].get(key), info.percent)
    if info.ci and cell != "—":
        cell = ("+" if row["metrics"][key]["mean"] >= 0 else "") + cell  # a difference: signed like its CI
        lo, hi = (row["metrics"].get(k) or {} for k in info.ci)
        if lo.get("mean") is not None and hi.get("mean") is not None:
            scale = 100.0 if info.percent else 1.0
            cell += f" [{scale * lo['mean']:+.1f}, {scale * hi['mean']:+.1f}]"
        k, n = row.get("ci_excludes_zero", {}).get(key, [0, 0])
        if n:
            cell += f" ({k}/{n})"
    return cell


def comparison_markdown(doc: Mapping[str, Any]) -> str:
    """The summary table (the columns whose MetricInfo.summary is set) with the notes, then one table
    per evaluation (registry order); one row per configuration."""
    from pertvl.evaluate.registry import metric_info

    parts = ["# Ablation: loss configurations (mean ± std over seeds)", ""]
    summary = doc.get("summary") or []
    if summary:
        rows = [[r["label"], str(r["seeds"]), *[_summary_cell(r, c) for c in summary]] for r in doc["rows"]]
        parts += ["## Summary", "", md_table(["Method", "seeds", *[metric_info(c).label for c in summary]], rows), "",
                  "Accuracies and recalls in %, AUROC as is. A column with a 95 % CI (the image-grounding margins: "
                  "own image − wrong image, bootstrap over test images) shows [the CI bounds averaged over seeds] "
                  "and (seeds whose own CI excludes 0 / seeds).", ""]
        parts += [*[p for note in doc.get("notes", []) for p in (note, "")]]
    for title, group in _column_groups(doc["columns"]):
        rows = [
            [r["label"], str(r["seeds"]), *[_fmt_mean_std(r["metrics"].get(c), metric_info(c).percent) for c in group]]
            for r in doc["rows"]
        ]
        unit = " (%)" if all(metric_info(c).percent for c in group) else ""
        parts += [f"## {title}{unit}", "", md_table(["Method", "seeds", *[metric_info(c).label for c in group]], rows),
                  ""]
    parts.append("Std: sample standard deviation over seeds (— with one seed). Percentages ×100; other "
                 "metrics (AUROC) as they are. Per-type structure accuracy is pairwise (chance 50%); overall "
                 "is the original ranked first among all valid candidates.")
    return "\n".join(parts) + "\n"


def plot_comparison(doc: Mapping[str, Any], out_png: str | os.PathLike) -> Path:
    """Grouped bars, one panel per evaluation; values ×100 (AUROC too), a dashed line at each
    column's chance level where the evaluation states one."""
    from pertvl.evaluate.registry import metric_info

    rows = doc["rows"]
    panels = _column_groups(doc["columns"]) or [("(no metrics)", [])]
    fig = new_figure(COMPARISON_FIGSIZE)
    axes = fig.subplots(1, len(panels), width_ratios=[max(len(g), 1) for _, g in panels], squeeze=False)[0]
    palette = ["#7f7f7f", "#bcbd22", "#4f81bd", "#c0504d", "#8064a2", "#f79646"]
    for ax, (title, group) in zip(axes, panels, strict=True):
        x = np.arange(len(group))
        width = 0.8 / max(len(rows), 1)
        for j, r in enumerate(rows):
            means = [r["metrics"][c]["mean"] for c in group]
            stds = [r["metrics"][c]["std"] for c in group]
            ax.bar(
                x + (j - (len(rows) - 1) / 2) * width,
                [100 * m if m is not None else 0 for m in means],
                width,
                yerr=[100 * s if s is not None else 0 for s in stds],
                capsize=2,
                color=palette[j % len(palette)],
                label=f"{r['label']} (n={r['seeds']})",
            )
        for i, c in enumerate(group):
            chance = metric_info(c).chance
            if chance is not None:
                ax.hlines(100 * chance, i - 0.45, i + 0.45, colors="#c0392b", linestyles="--", linewidth=1)
        ax.set_xticks(x, [metric_info(c).label for c in group], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 118)  # headroom for the legend above the 100 % line
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(title, fontsize=11)
    axes[0].legend(fontsize=8, loc="upper center", ncols=5)
    fig.suptitle("Ablation: mean ± std over seeds (×100)")
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- training curves


def read_metrics_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Rows of a monitor JSONL that have a numeric "step"; returns (rows, lines skipped).

    A line that is not a JSON object with a step is skipped and counted (a killed run can leave
    a half-written last line); the count is logged.
    """
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
    """Loss terms (every "loss/…" key) and the learning rate ("lr") against "step".

    Args:
        metrics_jsonl: the monitor's JSONL (one JSON object per line, with "step").
        out_png: figure to write.

    Returns:
        {"png": path, "keys": plotted keys, "points": rows read, "bad_lines": skipped lines}.

    Raises:
        ValueError: naming the file when it holds no loss values.
    """
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


# ----------------------------------------------------------------------------- attention maps


def save_attention_map(
    image: np.ndarray, attn: np.ndarray, word: str, out_png: str | os.PathLike
) -> Path:
    """A word→region attention map as a heatmap over the image, the word as title.

    Args:
        image: [H, W] uint8 grayscale image.
        attn: [h, w] attention weights over the region grid (any non-negative scale); upsampled
            bilinearly to H × W and scaled to [0, 1] for display.
        word: the word the attention belongs to.
        out_png: figure to write (400 × 440 px).

    Raises:
        ValueError: on a wrongly shaped image or attention map.
    """
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
    """A finding word's attention over the image, the finding's true outline, a colour bar and the sentence.

    Args:
        image: [H, W] uint8 grayscale image.
        attn: [h, w] the word's attention over the region grid (sums to 1); shown upsampled, the
            colour bar in the grid's own units (share of the word's attention per region).
        mask: [H, W] bool, where the finding truly is (the phantom's truth); drawn as a white outline.
        word, sentence: the word, and the report sentence it comes from (the caption).
    """
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
    """Attention maps of the words that name a present finding, on phantom pairs, from an export.

    Each map shows the finding's true outline (re-drawn from the phantom's recipe), a colour bar
    and the sentence. Pairs that are not phantoms, or whose words were cut by max_length, are
    passed over. Returns [(png, caption)] for at most `limit` maps.
    """
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
