"""The comparison table of `pertvl ablate`: one row per configuration (mean ± std over seeds), one
column per flat metric, grouped by evaluation in the order of pertvl.evaluate.catalog; JSON,
Markdown and a figure. A result brings its own flat metrics and their labels (`metrics`,
`metric_info`); the catalog says which evaluation a schema or a metric key belongs to.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.evaluate.catalog import (
    EVALUATIONS,
    by_key,
    evaluation_for_metric,
    metric_info,
    result_from_json,
    result_sources,
)
from pertvl.evaluate.evaluation import Result
from pertvl.evaluate.report import md_table, new_figure, save_png
from pertvl.files import atomic_write_text, write_json

COMPARISON_SCHEMA = "pertvl-comparison/1"
COMPARISON_FIGSIZE = (15.0, 5.5)  # → 1500 × 550 px


def flatten_metrics(item: Any) -> dict[str, float | None]:
    """Metric key → value for one run: a result, its JSON, a {evaluation key: result or JSON} dict, or an
    already flat {metric key: number} dict. ValueError on anything else."""

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
    """Metric keys in table order: evaluations (then fine-tunes) in table order, each in its own metric order."""

    order = {e.key: i for i, e in enumerate(result_sources())}

    def sort_key(k: str) -> tuple:
        e = evaluation_for_metric(k)
        return (order[e.key] if e is not None else len(order), metric_info(k).order, k)

    return sorted(set(keys), key=sort_key)


def _column_groups(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(title, columns) per evaluation in column order; metrics of no evaluation under "Other metrics"."""

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


def write_comparison_table(results: Mapping[str, Sequence[Any]], out_dir: str | os.PathLike,
                           name: str = "comparison", *, notes: Sequence[str] = ()) -> dict[str, Path]:
    """The ablation table, mean ± sample std over seeds: NAME.json ("pertvl-comparison/1"), NAME.md and
    NAME.png. `results`: config name → one item per seed, anything `flatten_metrics` reads; `notes`:
    paragraphs under the summary table. Rows follow LOSS_PRESETS, columns the catalog."""
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
        rows.append({"config": config, "label": preset_label(config), "seeds": len(runs),
                     "metrics": {c: _aggregate([m.get(c) for m in runs]) for c in columns},
                     "ci_excludes_zero": {c: _ci_excludes_zero(runs, ci) for c, ci in with_ci.items()}})
    doc = {"schema": COMPARISON_SCHEMA, "columns": columns, "summary": summary, "notes": list(notes), "rows": rows}
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    write_json(paths["json"], doc)
    atomic_write_text(paths["markdown"], comparison_markdown(doc))
    plot_comparison(doc, paths["png"])
    return paths


def _summary_cell(row: Mapping[str, Any], key: str) -> str:
    """mean ± std, and for a metric with a CI: [mean CI low, mean CI high] (seeds whose CI excludes 0)."""

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
    per evaluation (table order); one row per configuration."""

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
        rows = [[r["label"], str(r["seeds"]), *[_fmt_mean_std(r["metrics"].get(c), metric_info(c).percent)
                                                for c in group]] for r in doc["rows"]]
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
            ax.bar(x + (j - (len(rows) - 1) / 2) * width, [100 * m if m is not None else 0 for m in means],
                   width, yerr=[100 * s if s is not None else 0 for s in stds], capsize=2,
                   color=palette[j % len(palette)], label=f"{r['label']} (n={r['seeds']})")
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


