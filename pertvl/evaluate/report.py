"""Writers for evaluation outputs: JSON (stable schemas), Markdown tables, PNG figures.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot, no global
backend state) at fixed sizes (no tight bounding box), so a PNG's pixel size is
figsize × dpi and can be checked. Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.records import PERTURBATION_TYPES, atomic_write_text, write_json
from pertvl.evaluate.markdown import markdown_table
from pertvl.evaluate.retrieval import RetrievalResult
from pertvl.evaluate.structure import StructureResult
from pertvl.evaluate.zeroshot import ZeroShotResult
from pertvl.files import atomic_open

log = logging.getLogger(__name__)

COMPARISON_SCHEMA = "pertvl-comparison/1"
DPI = 100
STRUCTURE_FIGSIZE = (11.0, 5.0)  # → 1100 × 500 px
COMPARISON_FIGSIZE = (15.0, 5.5)  # → 1500 × 550 px
CURVES_FIGSIZE = (10.0, 6.0)  # → 1000 × 600 px
ATTENTION_FIGSIZE = (4.0, 4.4)  # → 400 × 440 px

# Table I names of the perturbation types (the paper's wording, shortened for axis labels).
TYPE_NAMES = {
    "shuffle_all": "Shuffle all words",
    "swap_adjacent": "Swap adjacent words",
    "reverse": "Reverse sentence",
    "shuffle_within_trigrams": "Shuffle within trigrams",
    "shuffle_trigrams": "Shuffle trigrams",
    "shuffle_nouns_adjectives": "Shuffle nouns & adjectives",
    "shuffle_all_but_nouns_adjectives": "Shuffle all but nouns & adj.",
    "shuffle_nouns_verbs_adjectives": "Shuffle nouns, verbs & adj.",
    "antonym_adjectives": "Adjectives → antonyms",
}

# The paper's rows (Tables II-IV), in its order: config name → row label.
CONFIG_NAMES = {
    "convirt": "ConVIRT-like",
    "gloria": "GLoRIA-like",
    "no_local": "Ours w/o local",
    "full": "Ours",
}


# ----------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Save at the figure's own size, atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=DPI, format="png")
    return path


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    return markdown_table(header, rows, align) + "\n"


def type_name(t: str) -> str:
    return TYPE_NAMES.get(t, t)


# ----------------------------------------------------------------------------- structure


def structure_markdown(result: StructureResult, title: str) -> str:
    """The overall + per-type table of one structure result."""
    is_text = result.schema.startswith("pertvl-text-structure")
    unit = "reports" if is_text else "images"
    rows = []
    o = result.overall
    rows.append(
        [
            "**Overall** (original ranked first)",
            _pct(o.accuracy),
            _ci(o.ci95),
            str(o.n),
            _pct(o.chance),
            "—" if o.mean_candidates is None else f"{o.mean_candidates:.2f}",
            f"{o.excluded_identical} / {o.unavailable} / {o.missing}",
        ]
    )
    for t, s in result.per_type.items():
        rows.append(
            [
                f"{type_name(t)} (`{t}`)",
                _pct(s.accuracy),
                _ci(s.ci95),
                str(s.n),
                _pct(s.chance),
                "—" if s.mean_candidates is None else f"{s.mean_candidates:.0f}",
                f"{s.excluded_identical} / {s.unavailable} / {s.missing}",
            ]
        )
    header = ["", "accuracy", "95% CI", f"n ({unit})", "chance", "candidates", "excluded (identical / unavailable / missing)"]
    b = result.bootstrap
    notes = [
        f"# {title}",
        "",
        _md_table(header, rows),
        f"{result.images} {unit} scored; {result.images_without_valid_perturbation} without any valid "
        f"perturbation (not in the overall accuracy)"
        + (f"; skipped: {', '.join(f'{k} {v}' for k, v in sorted(result.skipped.items()))}" if result.skipped else "")
        + ".",
        "",
        f"Per type: original vs that perturbation (chance 50%). Ties (within {result.tie_tolerance:g} cosine) "
        f"count as wrong. CI: {b.get('method', 'percentile')} bootstrap over {unit}, "
        f"{b.get('resamples')} resamples, seed {b.get('seed')}.",
    ]
    return "\n".join(notes) + "\n"


def plot_structure(result: StructureResult, out_png: str | os.PathLike, title: str = "") -> Path:
    """Bar chart: overall + one bar per type, CI error bars, the chance level of each bar."""
    names = ["Overall"] + [type_name(t) for t in result.per_type]
    stats = [result.overall, *result.per_type.values()]
    acc = np.array([np.nan if s.accuracy is None else 100 * s.accuracy for s in stats])
    lo = np.array([0.0 if s.ci95 is None or s.accuracy is None else 100 * (s.accuracy - s.ci95[0]) for s in stats])
    hi = np.array([0.0 if s.ci95 is None or s.accuracy is None else 100 * (s.ci95[1] - s.accuracy) for s in stats])
    x = np.arange(len(stats))
    fig = _new_figure(STRUCTURE_FIGSIZE)
    ax = fig.add_subplot()
    colors = ["#1f4e79"] + ["#4f81bd"] * (len(stats) - 1)
    ax.bar(x, np.nan_to_num(acc), color=colors, width=0.7, yerr=[lo, hi], capsize=4, ecolor="#333333")
    for i, s in enumerate(stats):
        if s.chance is not None:
            ax.hlines(100 * s.chance, i - 0.42, i + 0.42, colors="#c0392b", linestyles="--", linewidth=1.8,
                      label="chance" if i == 0 else None)
        label = "n/a" if s.accuracy is None else f"{acc[i]:.0f}%"
        top = 0.0 if s.accuracy is None else acc[i] + hi[i]  # above the error bar
        ax.text(i, top + 1.5, f"{label}\nn={s.n}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=9)
    ax.set_ylim(0, 115)  # room for the labels above a 100 % bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or "Clinical semantic structure: original report ranked above perturbations")
    fig.legend(loc="outside upper right", fontsize=9)  # outside the axes: never over a bar label
    return _save_png(fig, out_png)


def write_structure_outputs(result: StructureResult, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write NAME.json (the result's schema), NAME.md (the table) and NAME.png (the bar chart).

    Returns:
        {"json": path, "markdown": path, "png": path}.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    is_text = result.schema.startswith("pertvl-text-structure")
    title = ("Text-only structure (impression → findings): " if is_text else "Clinical semantic structure: ") + name
    write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], structure_markdown(result, title))
    plot_structure(result, paths["png"], title)
    return paths


# ----------------------------------------------------------------------------- retrieval / zero-shot


def write_retrieval_outputs(result: RetrievalResult, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write NAME.json and NAME.md (Recall@K both directions)."""
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    ks = list(result.image_to_text)
    rows = [
        ["image → report", *[_pct(result.image_to_text[k]) for k in ks], f"{result.median_rank['image_to_text']:g}"],
        ["report → image", *[_pct(result.text_to_image[k]) for k in ks], f"{result.median_rank['text_to_image']:g}"],
    ]
    md = (
        f"# Retrieval: {name}\n\n"
        + _md_table(["", *ks, "median rank"], rows)
        + f"\n{result.images} images, {result.texts} distinct reports in the gallery; matching by {result.match}; "
        f"ties (within {result.tie_tolerance:g} cosine) rank against the correct item.\n"
    )
    write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], md)
    return paths


def write_zeroshot_outputs(result: ZeroShotResult, out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write NAME.json and NAME.md (AUROC per label, null = only one class present)."""
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    rows = [
        [
            label,
            "undefined (one class)" if v.auroc is None else f"{v.auroc:.3f}",
            str(v.n_pos),
            str(v.n_neg),
            str(v.n_skipped),
            "; ".join(f'"{p}" vs "{n}"' for p, n in v.prompts),
        ]
        for label, v in result.per_label.items()
    ]
    mean = result.mean_auroc
    md = (
        f"# Zero-shot classification: {name}\n\n"
        + _md_table(["label", "AUROC", "positives", "negatives", "uncertain/unknown", "prompts"], rows, "lrrrrl")
        + f"\nMean AUROC over defined labels: {'—' if mean is None else f'{mean:.3f}'}; {result.images} images.\n"
    )
    write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], md)
    return paths


# ----------------------------------------------------------------------------- comparison (ablation)


def comparison_columns(types: Sequence[str] = PERTURBATION_TYPES, ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """Metric keys of the comparison table, in column order."""
    return (
        ["structure/overall"]
        + [f"structure/{t}" for t in types]
        + [f"retrieval/image_to_text/R@{k}" for k in ks]
        + [f"retrieval/text_to_image/R@{k}" for k in ks]
        + ["zeroshot/mean_auroc"]
    )


def _result_from_json(d: Mapping[str, Any]):
    schema = str(d.get("schema", ""))
    if schema.startswith(("pertvl-structure", "pertvl-text-structure")):
        return StructureResult.from_json(d)
    if schema.startswith("pertvl-retrieval"):
        return RetrievalResult.from_json(d)
    if schema.startswith("pertvl-zeroshot"):
        return ZeroShotResult.from_json(d)
    raise ValueError(f"unknown result schema {schema!r}")


def flatten_metrics(item: Any) -> dict[str, float | None]:
    """Metric key → value for one run (one seed of one configuration).

    Accepts a StructureResult / RetrievalResult / ZeroShotResult, the JSON dict of one, a dict
    {"structure": …, "retrieval": …, "zeroshot": …} of those, or an already flat
    {metric key: number} dict (keys as in `comparison_columns`).

    Raises:
        ValueError: on anything else.
    """
    if isinstance(item, StructureResult):
        out: dict[str, float | None] = {"structure/overall": item.overall.accuracy}
        out.update({f"structure/{t}": s.accuracy for t, s in item.per_type.items()})
        return out
    if isinstance(item, RetrievalResult):
        out = {f"retrieval/image_to_text/{k}": v for k, v in item.image_to_text.items()}
        out.update({f"retrieval/text_to_image/{k}": v for k, v in item.text_to_image.items()})
        return out
    if isinstance(item, ZeroShotResult):
        return {"zeroshot/mean_auroc": item.mean_auroc}
    if isinstance(item, Mapping):
        if "schema" in item:
            return flatten_metrics(_result_from_json(item))
        parts = {k: v for k, v in item.items() if k in ("structure", "retrieval", "zeroshot")}
        if parts:
            out = {}
            for v in parts.values():
                out.update(flatten_metrics(v))
            return out
        if all(isinstance(k, str) and (v is None or isinstance(v, int | float)) for k, v in item.items()):
            return {k: (None if v is None else float(v)) for k, v in item.items()}
    raise ValueError(f"cannot read metrics from {type(item).__name__}: expected a pertvl result, its JSON, "
                     "or a {metric: number} dict")


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
    known = [c for c in CONFIG_NAMES if c in names]
    return known + [c for c in names if c not in CONFIG_NAMES]


def _fmt_mean_std(agg: Mapping[str, Any], percent: bool) -> str:
    if agg is None or agg["mean"] is None:
        return "—"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    s = f"{scale * agg['mean']:.{digits}f}"
    if agg["std"] is not None:
        s += f" ± {scale * agg['std']:.{digits}f}"
    return s


def write_comparison_table(
    results: Mapping[str, Sequence[Any]], out_dir: str | os.PathLike, name: str = "comparison"
) -> dict[str, Path]:
    """The ablation table in the paper's layout, mean ± std over seeds.

    Args:
        results: config name (convirt, gloria, no_local, full, or others) → one item per seed;
            an item is anything `flatten_metrics` reads.
        out_dir: folder for NAME.json, NAME.md, NAME.png.
        name: file stem.

    Returns:
        {"json": path, "markdown": path, "png": path}.

    JSON schema "pertvl-comparison/1": {"schema", "columns": [metric key], "rows": [{"config",
    "label", "seeds", "metrics": {metric key: {"mean", "std", "n", "values"}}}]}; std is the
    sample standard deviation (ddof=1), null for one seed.
    """
    if not results:
        raise ValueError("write_comparison_table: no configurations given")
    flat = {c: [flatten_metrics(item) for item in items] for c, items in results.items()}
    types = [t for t in PERTURBATION_TYPES if any(f"structure/{t}" in m for ms in flat.values() for m in ms)]
    extra_types = sorted({k.split("/", 1)[1] for ms in flat.values() for m in ms for k in m
                          if k.startswith("structure/") and k != "structure/overall"} - set(types))
    columns = comparison_columns([*types, *extra_types])
    present = {k for ms in flat.values() for m in ms for k in m}
    columns = [c for c in columns if c in present] + sorted(present - set(columns))
    rows = []
    for config in _ordered_configs(list(flat)):
        runs = flat[config]
        rows.append(
            {
                "config": config,
                "label": CONFIG_NAMES.get(config, config),
                "seeds": len(runs),
                "metrics": {c: _aggregate([m.get(c) for m in runs]) for c in columns},
            }
        )
    doc = {"schema": COMPARISON_SCHEMA, "columns": columns, "rows": rows}
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    write_json(paths["json"], doc)
    atomic_write_text(paths["markdown"], comparison_markdown(doc))
    plot_comparison(doc, paths["png"])
    return paths


def _column_label(c: str) -> str:
    if c == "structure/overall":
        return "Structure overall"
    if c.startswith("structure/"):
        return type_name(c.split("/", 1)[1])
    if c.startswith("retrieval/image_to_text/"):
        return "I→R " + c.rsplit("/", 1)[1]
    if c.startswith("retrieval/text_to_image/"):
        return "R→I " + c.rsplit("/", 1)[1]
    if c == "zeroshot/mean_auroc":
        return "Zero-shot mean AUROC"
    return c


def comparison_markdown(doc: Mapping[str, Any]) -> str:
    """Two tables (structure accuracy; retrieval + zero-shot), one row per configuration."""
    cols = doc["columns"]
    s_cols = [c for c in cols if c.startswith("structure/")]
    o_cols = [c for c in cols if not c.startswith("structure/")]
    parts = ["# Ablation: loss configurations (mean ± std over seeds)", ""]
    for title, group in (("Clinical semantic structure accuracy (%)", s_cols),
                         ("Retrieval Recall@K (%) and zero-shot AUROC", o_cols)):
        if not group:
            continue
        rows = [
            [r["label"], str(r["seeds"]), *[_fmt_mean_std(r["metrics"].get(c), percent=c != "zeroshot/mean_auroc")
                                            for c in group]]
            for r in doc["rows"]
        ]
        parts += [f"## {title}", "", _md_table(["Method", "seeds", *[_column_label(c) for c in group]], rows), ""]
    parts.append("Std: sample standard deviation over seeds (— with one seed). Per-type structure accuracy is "
                 "pairwise (chance 50%); overall is the original ranked first among all valid candidates.")
    return "\n".join(parts) + "\n"


def plot_comparison(doc: Mapping[str, Any], out_png: str | os.PathLike) -> Path:
    """Grouped bars: structure accuracy per type (left), retrieval and zero-shot (right)."""
    cols = doc["columns"]
    s_cols = [c for c in cols if c.startswith("structure/")]
    o_cols = [c for c in cols if not c.startswith("structure/")]
    rows = doc["rows"]
    fig = _new_figure(COMPARISON_FIGSIZE)
    panels = [(s_cols, "Clinical semantic structure accuracy (%)")] + ([(o_cols, "Retrieval R@K (%) / zero-shot AUROC (×100)")]
                                                                         if o_cols else [])
    axes = fig.subplots(1, len(panels), width_ratios=[max(len(g), 1) for g, _ in panels], squeeze=False)[0]
    palette = ["#7f7f7f", "#bcbd22", "#4f81bd", "#c0504d", "#8064a2", "#f79646"]
    for ax, (group, title) in zip(axes, panels, strict=True):
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
        ax.set_xticks(x, [_column_label(c) for c in group], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 118)  # headroom for the legend above the 100 % line
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(title, fontsize=11)
    if len(s_cols) > 1:  # the 50 % chance holds for the per-type (pairwise) columns only
        axes[0].hlines(50, 0.5, len(s_cols) - 0.5, colors="#c0392b", linestyles="--", linewidth=1,
                       label="pairwise chance")
    axes[0].legend(fontsize=8, loc="upper center", ncols=5)
    fig.suptitle("Ablation: mean ± std over seeds")
    return _save_png(fig, out_png)


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
    fig = _new_figure(CURVES_FIGSIZE)
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
    path = _save_png(fig, out_png)
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
    fig = _new_figure(ATTENTION_FIGSIZE)
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    # Opacity follows attention, so unattended regions show the plain radiograph.
    ax.imshow(up, cmap="jet", alpha=0.65 * up, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(word, fontsize=16)
    return _save_png(fig, out_png)
