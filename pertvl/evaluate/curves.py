"""`pertvl report curves RUN…`: learning curves of the evaluations run during training.

Reads each run's metrics.jsonl ("eval/…" rows) and the chance levels in RUN/eval/step*/, and writes
curves.png (the panels of `PANELS`, one colour per run, epochs on the top axis), curves.json (per
run every eval/… series and the chance levels) and curves.md (the last point of each run).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertvl.evaluate.report import ci, md_table, new_figure, pct, print_paths, read_metrics_jsonl, save_png
from pertvl.files import atomic_write_text, write_json

SCHEMA = "pertvl-curves/1"
FIGSIZE_PER_PANEL = (5.0, 3.6)


@dataclass(frozen=True)
class Panel:
    """One subplot: the keys (regular expressions over "eval/…" keys, each with its line style), the
    reference line(s) and whether values are shares (drawn ×100)."""

    title: str
    series: tuple[tuple[str, str], ...]  # (key pattern, line style); several matches: one line per key
    refs: tuple[tuple[float | str, str], ...] = ()  # (value, or a run's "…_chance" key, label)
    percent: bool = True
    band: tuple[str, str] | None = None  # suffixes of the CI keys drawn as a band around a series


PANELS = (
    Panel("Structure accuracy (own image ─, wrong image ‒‒, text only ··)",
          (("eval/structure/overall", "-"), ("eval/structure/wrong_image", "--"), ("eval/structure/text_only", ":")),
          refs=(("structure_chance", "chance"),)),
    Panel("Image-grounding margin: own − wrong image", (("eval/structure/margin", "-"),),
          refs=((0.0, "no grounding"),), band=("_ci_low", "_ci_high")),
    Panel("Grounded margin per counterfactual edit", ((r"eval/structure/(cf_\w+)_margin", "-"),),
          refs=((0.0, "no grounding"),)),
    Panel("Twin group score, all and per edit (global cosine)", ((r"eval/twins/global/(?:(\w+)/)?group", "-"),),
          refs=((1 / 6, "chance"),)),
    Panel("Retrieval R@10 (image→report ─, report→image ‒‒)",
          (("eval/retrieval/image_to_text/R@10", "-"), ("eval/retrieval/text_to_image/R@10", "--")),
          refs=(("retrieval_chance", "chance I→R 10/reports"),)),
    Panel("Zero-shot mean AUROC", (("eval/zeroshot/mean_auroc", "-"),), refs=((0.5, "chance"),), percent=False),
)


def run_curves(run: str | os.PathLike) -> dict[str, Any]:
    """{"steps", "epochs", "series": {key: values (None where not measured)}, "structure_chance"} of
    one run's eval rows (the last row of a step wins: a resumed run re-evaluates)."""
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl (not a training run folder)")
    rows, _ = read_metrics_jsonl(path)
    by_step = {int(r["step"]): r for r in rows if any(k.startswith("eval/") for k in r)}
    if not by_step:
        raise ValueError(f"{path}: no eval/… rows; train with train.eval_every > 0")
    steps = sorted(by_step)
    keys = sorted({k for r in by_step.values() for k in r if k.startswith("eval/")})
    return {"steps": steps, "epochs": [by_step[s].get("eval/epoch") for s in steps],
            "series": {k: [by_step[s].get(k) for s in steps] for k in keys}, **_chances(run, steps)}


def _chances(run: Path, steps: list[int]) -> dict[str, float | None]:
    """Chance levels the flat metrics do not carry, from the last evaluation's JSON: the structure
    test's (mean 1/(1 + K) over images) and image→report R@10's (10 / distinct reports)."""
    out: dict[str, float | None] = {"structure_chance": None, "retrieval_chance": None}
    for step in reversed(steps):
        folder = run / "eval" / f"step{step:08d}"
        if out["structure_chance"] is None and (folder / "structure.json").is_file():
            doc = json.loads((folder / "structure.json").read_text(encoding="utf-8"))
            out["structure_chance"] = doc["overall"].get("chance")
        if out["retrieval_chance"] is None and (folder / "retrieval.json").is_file():
            texts = json.loads((folder / "retrieval.json").read_text(encoding="utf-8")).get("texts")
            out["retrieval_chance"] = min(1.0, 10 / texts) if texts else None
    return out


def _matches(panel: Panel, keys: list[str]) -> list[tuple[str, str, str]]:
    """(key, style, label suffix) of the run's keys this panel draws."""
    out = []
    for pattern, style in panel.series:
        for key in keys:
            m = re.fullmatch(pattern, key)
            if m and not key.endswith(("_ci_low", "_ci_high")):
                out.append((key, style, (m.group(1) or "all") if m.groups() else ""))
    return out


def _draw_panel(ax, panel: Panel, curves: dict[str, dict[str, Any]]) -> None:
    scale = 100.0 if panel.percent else 1.0
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        matches = _matches(panel, list(c["series"]))
        for j, (key, style, part) in enumerate(matches):
            pts = [(s, v) for s, v in zip(c["steps"], c["series"][key], strict=True) if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # Several keys of one run in one panel (edit types): the run's colour, a marker per key.
            marker = "osD^vP*X"[j % 8] if len({m[1] for m in matches}) == 1 and len(matches) > 1 else "o"
            ax.plot(xs, [scale * y for y in ys], style, color=color, marker=marker, markersize=3,
                    label=f"{label}{' ' + part if part else ''}" if style == "-" else None)
            if panel.band and all(key + b in c["series"] for b in panel.band):
                lo, hi = (c["series"][key + b] for b in panel.band)
                band = [(s, a, b) for s, a, b in zip(c["steps"], lo, hi, strict=True) if a is not None and b is not None]
                if band:
                    bx, blo, bhi = zip(*band, strict=True)
                    ax.fill_between(bx, [scale * v for v in blo], [scale * v for v in bhi], color=color, alpha=0.15)
    for value, text in panel.refs:
        levels = ([c[value] for c in curves.values() if c.get(value) is not None]
                  if isinstance(value, str) else [value])
        for level in sorted(set(levels))[:1]:  # the same test split: one level
            ax.axhline(scale * level, color="0.4", ls="--", lw=0.9, label=f"{text} {scale * level:.3g}")


def plot_curves(curves: dict[str, dict[str, Any]], out_png: str | os.PathLike) -> list[str]:
    """curves.png; returns the titles of the panels drawn (a panel no run measured is left out)."""
    drawable = [p for p in PANELS if any(_matches(p, list(c["series"])) for c in curves.values())]
    cols = min(3, len(drawable))
    rows = -(-len(drawable) // cols)
    fig = new_figure((FIGSIZE_PER_PANEL[0] * cols, FIGSIZE_PER_PANEL[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ratio = _steps_per_epoch(curves)
    for ax, panel in zip(axes, drawable, strict=False):
        _draw_panel(ax, panel, curves)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("%" if panel.percent else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if ratio:
            top = ax.secondary_xaxis("top", functions=(lambda s, r=ratio: s / r, lambda e, r=ratio: e * r))
            top.set_xlabel("epoch", fontsize=8)
    for ax in axes[len(drawable):]:
        ax.set_axis_off()
    save_png(fig, out_png)
    return [p.title for p in drawable]


def _steps_per_epoch(curves: dict[str, dict[str, Any]]) -> float | None:
    """Steps per epoch shared by every run (None when the runs differ or do not say)."""
    ratios = {round(s / e, 6) for c in curves.values() for s, e in zip(c["steps"], c["epochs"], strict=True) if e}
    return ratios.pop() if len(ratios) == 1 else None


def _last_row(label: str, c: dict[str, Any]) -> list[str]:
    s = c["series"]

    def last(key: str) -> float | None:
        return s.get(key, [None])[-1]

    margin = last("eval/structure/margin")
    band = [last("eval/structure/margin_ci_low"), last("eval/structure/margin_ci_high")]
    auroc = last("eval/zeroshot/mean_auroc")
    return [label, str(c["steps"][-1]), "—" if c["epochs"][-1] is None else f"{c['epochs'][-1]:.2f}",
            pct(last("eval/structure/overall")), pct(last("eval/structure/wrong_image")),
            "—" if margin is None else f"{100 * margin:+.1f} {ci(band) if None not in band else ''}",
            pct(last("eval/retrieval/image_to_text/R@10")), "—" if auroc is None else f"{auroc:.3f}"]


def write_curves(runs: dict[str, str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """curves.png, curves.json, curves.md of the runs ({label: run folder}) in out_dir."""
    curves = {label: run_curves(run) for label, run in runs.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = plot_curves(curves, out / "curves.png")
    write_json(out / "curves.json", {"schema": SCHEMA, "command": " ".join(["pertvl", *sys.argv[1:]]),
                                     "runs": {k: str(v) for k, v in runs.items()}, "panels": panels, "curves": curves})
    header = ["run", "step", "epoch", "structure (own)", "wrong image", "margin [95 % CI]", "I→R R@10", "zero-shot AUROC"]
    chance = {c["structure_chance"] for c in curves.values()} - {None}
    text = ("# Learning curves: the last evaluation of each run\n\n"
            + md_table(header, [_last_row(label, c) for label, c in curves.items()])
            + (f"\nStructure chance {pct(min(chance))}; margin = own − wrong-image accuracy (points), percentile "
               "bootstrap CI over images. Every point: RUN/eval/stepN/*.json.\n" if chance else ""))
    atomic_write_text(out / "curves.md", text)
    return {"png": out / "curves.png", "json": out / "curves.json", "markdown": out / "curves.md"}


def _label_runs(items: list[str]) -> dict[str, str]:
    """RUN or LABEL=RUN -> {label: run}; the label defaults to the run folder's name."""
    runs: dict[str, str] = {}
    for item in items:
        label, sep, run = item.partition("=")
        label, run = (label, run) if sep and not Path(item).exists() else (Path(item).name, item)
        if label in runs:
            raise ValueError(f"two runs labelled {label!r}: name them LABEL=RUN")
        runs[label] = run
    return runs


def cli_main(args: Any) -> int:
    """`pertvl report curves RUN… --out DIR`."""
    try:
        paths = write_curves(_label_runs(args.runs), args.out)
    except ValueError as e:
        print(f"pertvl: error: {e}", file=sys.stderr)
        return 2
    print_paths(paths)
    return 0
