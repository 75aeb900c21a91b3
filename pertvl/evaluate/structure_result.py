"""The structure test's results: the dataclasses whose fields are the JSON schema "pertvl-structure/3"
("pertvl-text-structure/3" without controls, grounded, text_disjoint and score), their flat
metrics ("structure/overall", "structure/TYPE", "structure/margin", ...), Markdown and figure.
A null accuracy means "not measured" (n = 0), never 0.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.evaluate.evaluation import JsonResult, MetricInfo
from pertvl.evaluate.report import ci, md_table, new_figure, pct, save_png

SCHEMA = "pertvl-structure/3"
TEXT_SCHEMA = "pertvl-text-structure/3"
TIE_TOLERANCE = 1e-6


@dataclass
class StructureScores:
    """Per-image scores of N anchors against K candidate types: orig [N], pert [N, K] (NaN where
    invalid), valid [N, K], correct [N] (original strictly above every valid candidate), pairwise
    [N, K] and num_candidates [N] (1 + valid candidates)."""

    orig: np.ndarray
    pert: np.ndarray
    valid: np.ndarray
    correct: np.ndarray
    pairwise: np.ndarray
    num_candidates: np.ndarray

    @property
    def has_candidates(self) -> np.ndarray:
        """[N] bool: images with at least one valid perturbation (the overall accuracy's images)."""
        return self.valid.any(axis=1)


@dataclass
class AccuracyStat:
    accuracy: float | None
    ci95: tuple[float, float] | None
    n: int
    correct: int
    chance: float | None
    mean_candidates: float | None
    excluded_identical: int = 0
    unavailable: int = 0
    missing: int = 0
    # Mean cosine of the anchor with the originals and with the negatives these images were scored
    # against: an offset shared by all candidates shows here, not in the accuracy.
    cos_original: float | None = None
    cos_perturbed: float | None = None


@dataclass
class AnchorControl:
    """The structure accuracies with another anchor in place of each image's own embedding."""

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    unpaired: int = 0  # images left out (wrong image: no partner whose findings differ)


@dataclass
class MarginStat:
    """own − wrong-image accuracy over the images that have a wrong-image partner (paired)."""

    margin: float | None
    ci95: tuple[float, float] | None
    n: int
    own: float | None
    wrong: float | None


@dataclass
class Controls:
    """The anchors that tell image-grounded structure from a text-side preference (module docstring)."""

    text_only: AnchorControl | None  # None for the local score (a text has no regions)
    wrong_image: AnchorControl
    mean_image: AnchorControl
    margin: MarginStat
    margin_per_type: dict[str, MarginStat]
    pairing: dict[str, Any]  # how wrong images were chosen: rule, seed, paired, unpaired

    def anchors(self) -> dict[str, AnchorControl]:
        """The control anchors that were measured, in a fixed order."""
        return {k: a for k, a in (("wrong_image", self.wrong_image), ("mean_image", self.mean_image),
                                  ("text_only", self.text_only)) if a is not None}


@dataclass
class Reference:
    overall: float | None
    per_type: dict[str, float | None]
    overall_range: list[float] | None = None
    per_type_range: dict[str, list[float] | None] | None = None
    detail: str = ""


@dataclass
class GroundedReferences:
    """What a grounded accuracy is read against, in place of the 1/(1+k) chance that assumes
    exchangeable candidates: the empirical null (the same candidates scored from random anchors, mean
    and 2.5-97.5 % range) and, when the training split has counterfactuals, the text prior (a word
    1-3-gram logistic regression of originals vs counterfactuals, scoring each candidate by its text alone)."""

    null_random_anchors: Reference
    text_prior: Reference | None


@dataclass
class GroundedStructure:
    """The structure test with counterfactual reports as the candidates (module docstring)."""

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    controls: Controls | None
    images: int  # scored images that carry a counterfactual record
    images_without_valid_counterfactual: int
    samples_without_record: int  # scored images without `counterfactuals` in their json (left out)
    references: GroundedReferences | None = None


@dataclass
class TextDisjoint:
    """The accuracies on the images whose cleaned report is no training report (module docstring)."""

    train_texts: int
    images: int
    images_text_in_train: int
    texts: int
    texts_in_train: int
    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    grounded: AccuracyStat | None = None

    def describe(self) -> str:
        """'text-disjoint: 41 of 72 images (20 of 30 distinct texts) have no training text'."""
        return (f"{self.images - self.images_text_in_train} of {self.images} images "
                f"({self.texts - self.texts_in_train} of {self.texts} distinct texts) have a report that is no "
                f"training report ({self.train_texts} distinct training texts)")


@dataclass
class StructureResult(JsonResult):
    """The outcome of a (text-)structure evaluation; its JSON is these fields in this order
    (text-structure: without controls, grounded, text_disjoint and score)."""

    SCHEMAS, WHAT = (SCHEMA, TEXT_SCHEMA), "structure"

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    images: int
    images_without_valid_perturbation: int
    skipped: dict[str, int]
    bootstrap: dict[str, Any]
    tie_tolerance: float = TIE_TOLERANCE
    schema: str = SCHEMA
    controls: Controls | None = None  # image structure only; None when no image was scored
    grounded: GroundedStructure | None = None  # image structure with counterfactuals in the samples
    text_disjoint: TextDisjoint | None = None  # image structure given the training texts
    score: str = "global"  # SCORES: how candidates were scored (image structure)
    info: dict[str, Any] = field(default_factory=dict)  # provenance (encoder, shards, split, ...)
    # Per-image scores; not serialized (repr=False).
    scores: StructureScores | None = field(default=None, repr=False, compare=False)

    @property
    def is_text(self) -> bool:
        """A text-structure result (anchor = impression, "images" count reports)."""
        return self.schema.startswith("pertvl-text-structure")

    def to_json(self) -> dict[str, Any]:
        image_only = ("controls", "grounded", "text_disjoint", "score") if self.is_text else ()
        return {k: v for k, v in super().to_json().items() if k not in image_only}

    def title(self, name: str) -> str:
        return ("Text-only structure (impression → findings): " if self.is_text
                else "Clinical semantic structure: ") + name

    def markdown(self, name: str) -> str:
        return structure_markdown(self, self.title(name))

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        return {"png": plot_structure(self, Path(out_dir) / f"{name}.png", self.title(name))}

    @property
    def key(self) -> str:
        """The evaluation key, prefix of the flat metrics."""
        return "text_structure" if self.is_text else "structure" if self.score == "global" else "structure_local"

    def metrics(self) -> dict[str, float | None]:
        key = self.key
        out: dict[str, float | None] = {f"{key}/overall": self.overall.accuracy}
        out.update({f"{key}/{t}": s.accuracy for t, s in self.per_type.items()})
        if self.controls is not None:
            out.update(_control_metrics(f"{key}/", self.controls))
        if self.grounded is not None:
            g = self.grounded
            out[f"{key}/grounded"] = g.overall.accuracy
            if g.controls is not None:
                out.update(_control_metrics(f"{key}/grounded_", g.controls))
                for t, m in g.controls.margin_per_type.items():  # per counterfactual type: own − wrong image
                    out.update(_margin_metrics(f"{key}/{t}_margin", m))
            out.update({f"{key}/{t}": s.accuracy for t, s in g.per_type.items()})
        if self.text_disjoint is not None:
            out[f"{key}/text_disjoint"] = self.text_disjoint.overall.accuracy
            if self.text_disjoint.grounded is not None:
                out[f"{key}/text_disjoint_grounded"] = self.text_disjoint.grounded.accuracy
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        prefix, metric = key.split("/", 1)
        info = cls._metric_info(prefix, metric)
        if prefix == "structure_local":  # in the summary: the grounded accuracy and margin only (docs/GROUNDING.md)
            info = dataclasses.replace(info, label=info.label + " (local S)",
                                       summary=info.summary and metric in ("grounded", "grounded_margin"))
        return info

    @staticmethod
    def _metric_info(prefix: str, metric: str) -> MetricInfo:
        from pertvl.data.perturb import PERTURBATIONS, type_label

        if metric == "overall":
            return MetricInfo("Text structure overall" if prefix == "text_structure" else "Structure overall",
                              order=(0,), summary=True)
        # the summary shows the accuracies, and the own − wrong image margins with their CIs
        ci = (f"{prefix}/{metric}_ci_low", f"{prefix}/{metric}_ci_high") if metric in MARGINS else None
        if metric in CONTROL_LABELS:  # after the per-type columns
            return MetricInfo(CONTROL_LABELS[metric], order=(3, list(CONTROL_LABELS).index(metric)),
                              summary=metric in MARGINS, ci=ci)
        if metric in GROUNDED_LABELS:  # after the controls
            return MetricInfo(GROUNDED_LABELS[metric], order=(4, list(GROUNDED_LABELS).index(metric)),
                              summary=metric in ("grounded", *MARGINS), ci=ci)
        if metric.startswith("cf_") and "_margin" in metric:  # per type: own − wrong image, with its CI
            base, _, part = metric.partition("_margin")
            label = f"{type_name(base)}, margin (own − wrong)" + {"_ci_low": " 95% CI low", "_ci_high": " 95% CI high"}.get(part, "")
            ci = (f"{prefix}/{base}_margin_ci_low", f"{prefix}/{base}_margin_ci_high") if not part else None
            # the summary: the types only the image decides where the paper's thesis is sharpest
            return MetricInfo(label, order=(5, base, part), ci=ci,
                              summary=not part and base in SUMMARY_CF_MARGINS)
        if metric.startswith("cf_"):  # per counterfactual type: original vs that counterfactual, pairwise
            return MetricInfo(type_name(metric), order=(5, metric), chance=0.5)
        types = list(PERTURBATIONS)
        # per type: original vs that perturbation, pairwise (chance 50 %)
        return MetricInfo(type_label(metric), order=(1, types.index(metric)) if metric in types else (2, metric),
                          chance=0.5)

    def headline(self) -> str:
        o = self.overall
        acc = "n/a" if o.accuracy is None else f"{100 * o.accuracy:.1f}% (chance {100 * o.chance:.1f}%)"
        what, unit = ("text-structure", "reports") if self.is_text else (
            "structure" if self.score == "global" else "structure (local S)", "images")
        line = f"{what} accuracy {acc} over {o.n} {unit}"
        if self.controls is not None:
            c = self.controls
            line += (f"; own image {pct(o.accuracy)} vs wrong image {pct(c.wrong_image.overall.accuracy)}: "
                     f"image-grounding margin {margin_text(c.margin)}")
        if self.grounded is not None:
            line += "; " + grounded_text(self.grounded)
        if self.text_disjoint is not None:
            td = self.text_disjoint
            line += f"; text-disjoint subset {pct(td.overall.accuracy)}: {td.describe()}"
        return line


def _margin_metrics(name: str, m: MarginStat) -> dict[str, float | None]:
    """NAME, NAME_ci_low, NAME_ci_high of one own − wrong image margin."""
    return {name: m.margin, f"{name}_ci_low": m.ci95[0] if m.ci95 else None,
            f"{name}_ci_high": m.ci95[1] if m.ci95 else None}


def _control_metrics(prefix: str, c: Controls) -> dict[str, float | None]:
    """PREFIX{anchor} (overall accuracy with each control anchor) and PREFIXmargin with its CI."""
    return {**{f"{prefix}{name}": a.overall.accuracy for name, a in c.anchors().items()},
            **_margin_metrics(f"{prefix}margin", c.margin)}


CONTROL_LABELS = {"wrong_image": "Wrong image", "mean_image": "Mean image", "text_only": "Text-only anchor",
                  "margin": "Grounding margin (own − wrong)", "margin_ci_low": "Margin 95% CI low",
                  "margin_ci_high": "Margin 95% CI high"}

# Per-type margins in the comparison's summary: laterality and finding identity, which only the image decides.
SUMMARY_CF_MARGINS = ("cf_laterality", "cf_finding")

MARGINS = ("margin", "grounded_margin")  # own − wrong image, with bootstrap CIs (KEY_ci_low / KEY_ci_high)

GROUNDED_LABELS = {"grounded": "Grounded structure (counterfactuals)",
                   "grounded_wrong_image": "Grounded, wrong image",
                   "grounded_mean_image": "Grounded, mean image",
                   "grounded_text_only": "Grounded, text-only anchor",
                   "grounded_margin": "Grounded margin (own − wrong)",
                   "grounded_margin_ci_low": "Grounded margin 95% CI low",
                   "grounded_margin_ci_high": "Grounded margin 95% CI high",
                   "text_disjoint": "Structure, text-disjoint subset",
                   "text_disjoint_grounded": "Grounded, text-disjoint subset"}


def type_name(t: str) -> str:
    """A perturbation's or counterfactual's label in tables ("Counterfactual: laterality swap")."""
    if t.startswith("cf_"):
        from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES

        return f"Counterfactual: {COUNTERFACTUAL_TYPES[t].label}" if t in COUNTERFACTUAL_TYPES else t
    from pertvl.data.perturb import type_label

    return type_label(t)


def grounded_text(g: GroundedStructure) -> str:
    """'grounded structure 61.1% (chance 35.2%) over 72 images, wrong image 40.3%: margin +20.8 pts ...'."""
    o = g.overall
    line = f"grounded structure {pct(o.accuracy)}" + ("" if o.chance is None else f" (chance {pct(o.chance)})") + \
        f" over {o.n} images"
    if g.references is not None:
        tp = g.references.text_prior
        line += f" (empirical null {pct(g.references.null_random_anchors.overall)}" + (
            f", text prior {pct(tp.overall)})" if tp is not None else ")")
    if g.controls is not None:
        line += (f", wrong image {pct(g.controls.wrong_image.overall.accuracy)}: grounded margin "
                 f"{margin_text(g.controls.margin)}")
    return line


def margin_text(m: MarginStat) -> str:
    """"+2.8 pts [−1.4, 6.9] (n=72)": percentage points, its CI, the paired images."""
    if m.margin is None:
        return "n/a (no paired image)"
    ci_part = f" {signed_ci(m.ci95)}" if m.ci95 else ""
    return f"{100 * m.margin:+.1f} pts{ci_part} (n={m.n})"


def signed_ci(ci95: tuple[float, float] | None) -> str:
    """"[−1.4, +6.9]": a difference's CI in percentage points; "" for none."""
    return "" if ci95 is None else f"[{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]"


STRUCTURE_FIGSIZE = (11.0, 5.0)  # → 1100 × 500 px


def cos(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def structure_markdown(result: StructureResult, title: str) -> str:
    """The overall and per-type table, then (image structure) the controls and margin, the grounded
    structure and the text-disjoint subset."""

    def row(label: str, st: AccuracyStat, digits: int) -> list[str]:
        cells = _stat_row(label, st)
        return [*cells[:5], "—" if st.mean_candidates is None else f"{st.mean_candidates:.{digits}f}", *cells[5:],
                f"{st.excluded_identical} / {st.unavailable} / {st.missing}"]

    unit = "reports" if result.is_text else "images"
    rows = [row("**Overall** (original ranked first)", result.overall, 2)]
    rows += [row(f"{type_name(t)} (`{t}`)", st, 0) for t, st in result.per_type.items()]
    header = ["", "accuracy", "95% CI", f"n ({unit})", "chance", "candidates", "mean cos original",
              "mean cos negatives", "excluded (identical / unavailable / missing)"]
    b = result.bootstrap
    notes = [
        f"# {title}",
        "",
        md_table(header, rows),
        f"{result.images} {unit} scored; {result.images_without_valid_perturbation} without any valid "
        f"perturbation (not in the overall accuracy)"
        + (f"; skipped: {', '.join(f'{k} {v}' for k, v in sorted(result.skipped.items()))}" if result.skipped else "")
        + ".",
        "",
        f"Per type: original vs that perturbation (chance 50%). Ties (within {result.tie_tolerance:g} cosine) "
        f"count as wrong. CI: {b.get('method', 'percentile')} bootstrap over {unit}, "
        f"{b.get('resamples')} resamples, seed {b.get('seed')}. Mean cos: cosine of the anchor with the "
        "original reports and with the negatives of the same rows.",
    ]
    if result.score == "local":
        notes += ["", "Score: GLoRIA's local S(I, T) = log Σ_w exp(γ2·cos(word_w, context_w)) over the report's "
                  "words, contexts attended from the image's region features (γ1 4, γ2 5; what L_local trains), "
                  "in place of the global cosine; the \"mean cos\" columns hold the mean S. The mean-image anchor "
                  "is the mean of the test images' region features; there is no text-only anchor (a text has no "
                  "regions)."]
    if any(t.startswith("cf_") for t in result.per_type):
        notes += ["", "Counterfactual rows (`cf_*`): the same pairwise test against the report's counterfactuals "
                  "(pertvl.data.counterfactual); not candidates of the overall accuracy."]
    if result.controls is not None:
        notes += ["", _controls_tables(result.overall, result.per_type, result.controls,
                                       "## Controls: the same test with another anchor", result.score)]
    if result.grounded is not None:
        notes += ["", grounded_markdown(result.grounded, result.score)]
    if result.text_disjoint is not None:
        notes += ["", text_disjoint_markdown(result)]
    return "\n".join(notes) + "\n"


def _stat_row(label: str, st: AccuracyStat) -> list[str]:
    return [label, pct(st.accuracy), ci(st.ci95), str(st.n), pct(st.chance), cos(st.cos_original),
            cos(st.cos_perturbed)]


def grounded_markdown(g: GroundedStructure, score: str = "global") -> str:
    """The grounded structure table (overall and per counterfactual type) and its controls."""
    rows = [_stat_row("**Grounded overall** (original ranked above all its counterfactuals)", g.overall)]
    rows += [_stat_row(f"{type_name(t)} (`{t}`)", st) for t, st in g.per_type.items()]
    parts = [
        "## Grounded structure: original vs counterfactual reports (read against the empirical null and the text prior)",
        "",
        md_table(["", "accuracy", "95% CI", "n (images)", "chance", "mean cos original", "mean cos counterfactuals"],
                 rows),
        f"{g.images} images carry a counterfactual record ({g.images_without_valid_counterfactual} of them without "
        f"any valid counterfactual); {g.samples_without_record} without one (left out). Per type: original vs that "
        "counterfactual (stated chance 50%); overall stated chance 1/(1+k) per image. The candidates are not "
        "exchangeable and the counterfactuals carry text cues, so these are not the nulls: read the accuracies "
        "against the references below (for a test the text prior cannot pass, see the twin phantoms).",
    ]
    if g.references is not None:
        parts += ["", references_markdown(g.overall, g.per_type, g.references)]
    if g.controls is not None:
        parts += ["", _controls_tables(g.overall, g.per_type, g.controls,
                                       "### Grounded structure with another anchor", score)]
    return "\n".join(parts)


def references_markdown(overall: AccuracyStat, per_type: dict[str, AccuracyStat], refs: GroundedReferences) -> str:
    """The model's grounded accuracies beside the empirical null (with its range) and the text prior."""
    null, tp = refs.null_random_anchors, refs.text_prior
    rows = [["**overall**", pct(overall.accuracy), pct(null.overall), ci(null.overall_range),
             pct(tp.overall) if tp else "—"]]
    for t, st in per_type.items():
        rows.append([t, pct(st.accuracy), pct(null.per_type.get(t)), ci((null.per_type_range or {}).get(t)),
                     pct(tp.per_type.get(t)) if tp else "—"])
    return "\n".join([
        "### Grounded structure against its references", "",
        md_table(["", "model", "empirical null", "null 95% range", "text prior (no image)"], rows),
        f"Empirical null: {null.detail}. Text prior: "
        + (tp.detail if tp else "not measured (no training split with counterfactuals)") + ".",
    ])


def text_disjoint_markdown(result: StructureResult) -> str:
    """The accuracies on the images whose report is no training report, beside all images."""
    td = result.text_disjoint
    assert td is not None
    rows = [_stat_row("Overall, all images", result.overall), _stat_row("**Overall, text-disjoint**", td.overall)]
    rows += [_stat_row(f"{type_name(t)}, text-disjoint", st) for t, st in td.per_type.items()]
    if td.grounded is not None and result.grounded is not None:
        rows += [_stat_row("Grounded, all images", result.grounded.overall),
                 _stat_row("**Grounded, text-disjoint**", td.grounded)]
    return "\n".join([
        "## Text-disjoint subset: reports that are no training report",
        "",
        md_table(["", "accuracy", "95% CI", "n (images)", "chance", "mean cos original", "mean cos negatives"], rows),
        f"{td.describe()}; {td.images_text_in_train} images ({td.texts_in_train} distinct texts) have a cleaned "
        "report identical to a training report, whose perturbations are then training negatives.",
    ])


ANCHOR_TEXT = {"own": "own image", "wrong_image": "wrong image (another study's, findings differ)",
               "mean_image": "mean test-image embedding",
               "text_only": "text only (mean embedding of the other test reports)"}


def anchor_text(name: str, score: str = "global") -> str:
    """What an anchor is, for tables ("mean image" means the mean region features for the local score)."""
    return "mean test-image region features" if (name, score) == ("mean_image", "local") else ANCHOR_TEXT[name]


def _controls_tables(own_overall: AccuracyStat, own_per_type: dict[str, AccuracyStat], c: Controls,
                     heading: str, score: str) -> str:
    """Overall accuracy per anchor with mean cosines, the margin, and per type per anchor."""
    anchors = {"own": AnchorControl(own_overall, own_per_type), **c.anchors()}
    rows = [[anchor_text(name, score), pct(a.overall.accuracy), ci(a.overall.ci95), str(a.overall.n),
             cos(a.overall.cos_original), cos(a.overall.cos_perturbed)] for name, a in anchors.items()]
    m = c.margin
    rows.append(["**image-grounding margin** (own − wrong, paired images)",
                 "—" if m.margin is None else f"{100 * m.margin:+.1f} pts",
                 signed_ci(m.ci95) or "—", str(m.n), "", ""])
    per_type = []
    for t in own_per_type:
        mt = c.margin_per_type.get(t)
        cells = [f"{pct(a.per_type[t].accuracy)} ({cos(a.per_type[t].cos_original)} / "
                 f"{cos(a.per_type[t].cos_perturbed)})" for a in anchors.values()]
        margin = "—" if mt is None or mt.margin is None else f"{100 * mt.margin:+.1f} pts {signed_ci(mt.ci95)}"
        per_type.append([f"{type_name(t)} (`{t}`)", *cells, margin])
    p = c.pairing
    return "\n".join([
        heading,
        "",
        md_table(["anchor", "overall accuracy", "95% CI", "n (images)", "mean cos original", "mean cos negatives"],
                 rows),
        md_table(["type", *[anchor_text(name, score).split(" (")[0] for name in anchors], "margin (own − wrong) [95% CI]"],
                 per_type),
        "Per-type cells: pairwise accuracy (mean cos original / mean cos that perturbation). "
        f"Wrong image: a fixed derangement of the test images (seed {p.get('seed')}): {p.get('rule')}; "
        f"{p.get('paired')} paired, {p.get('unpaired')} without a partner (left out of the wrong-image rows "
        "and the margin). Mean image: one anchor for all, the mean of the "
        + ("test images' region features. " if score == "local" else "normalized test-image embeddings. ")
        + ("Text only: no image; each image's anchor is the mean normalized embedding of the test reports whose "
           "text differs from its own. " if "text_only" in anchors else "")
        + "The margin is the mean over paired images of own − wrong "
        "(1 correct, 0 wrong), its CI a percentile bootstrap over those images.",
    ])


def plot_structure(result: StructureResult, out_png: str | os.PathLike, title: str) -> Path:
    """Bar chart: overall + one bar per type, CI error bars, the chance level of each bar."""
    from pertvl.data.perturb import type_label

    names = ["Overall"] + [type_label(t) for t in result.per_type]
    stats = [result.overall, *result.per_type.values()]
    acc = np.array([np.nan if s.accuracy is None else 100 * s.accuracy for s in stats])
    lo = np.array([0.0 if s.ci95 is None or s.accuracy is None else 100 * (s.accuracy - s.ci95[0]) for s in stats])
    hi = np.array([0.0 if s.ci95 is None or s.accuracy is None else 100 * (s.ci95[1] - s.accuracy) for s in stats])
    x = np.arange(len(stats))
    fig = new_figure(STRUCTURE_FIGSIZE)
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
    c = result.controls
    if c is not None:  # the same bars' accuracies with the control anchors, as markers beside them
        for k, (name, style) in enumerate((("wrong_image", ("X", "#222222")), ("mean_image", ("o", "#7f7f7f")),
                                            ("text_only", ("D", "#e67e22")))):
            a = c.anchors().get(name)
            if a is None:
                continue
            ys = [a.overall.accuracy, *[a.per_type[t].accuracy if t in a.per_type else None for t in result.per_type]]
            ax.scatter(x + 0.22 * (k - 1), [np.nan if y is None else 100 * y for y in ys], marker=style[0],
                       color=style[1], s=28, zorder=3, label=ANCHOR_TEXT[name].split(" (")[0])
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=9)
    ax.set_ylim(0, 115)  # room for the labels above a 100 % bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if c is not None:
        title += f"\nbars: own image; image-grounding margin (own − wrong image) {margin_text(c.margin)}"
    ax.set_title(title, fontsize=10 if c is not None else None)
    fig.legend(loc="outside upper right", fontsize=9)  # outside the axes: never over a bar label
    return save_png(fig, out_png)
