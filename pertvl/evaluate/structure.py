"""Zero-shot clinical semantic structure evaluation (the paper's Table IV, §IV-C-3), done right.

For each test image, the candidates are its original report and the report's *valid*
perturbations; each candidate is scored by the cosine of the image's global embedding and the
text's global embedding (paper: S(I,T) = e_I·e_T / (‖e_I‖‖e_T‖)).

- Overall accuracy: the share of images whose original report scores strictly above every one
  of its valid perturbations. Chance level = mean over those images of 1/(1 + K_i), K_i = the
  image's number of valid perturbations.
- Per type t: pairwise, original vs the type-t perturbation, over the images where type t is
  valid (chance 0.5).
- Ties count as wrong: a perturbation scoring within `tie_tolerance` (1e-6 cosine) of the
  original beats it. An encoder that cannot tell the candidates apart (e.g. a bag of words on a
  shuffle) thus scores 0, never a lucky 50 % from float noise or list order.
- Excluded, never counted: perturbations listed as unavailable, missing from the record, or
  whose words equal the original's (a file may say otherwise; such a text is counted under
  `excluded_identical`). Images left with no valid perturbation are not part of the overall
  accuracy (nothing to discriminate) and are counted in `images_without_valid_perturbation`.
- 95 % confidence intervals: percentile bootstrap over images (scipy.stats.bootstrap),
  `bootstrap` resamples, seeded, each metric from its own `numpy.random.default_rng(seed)` so a
  number does not depend on which other types were evaluated. Null when fewer than 2 images.
- Each distinct text is embedded once (views of a study share a report).

Controls (image structure only): the same test with another anchor in place of each image's
own embedding, so that what the image contributes can be told from a preference of the text side
(a direction "reads like a training report" scores the same whatever the anchor):

- wrong image: a fixed derangement of the test images (`wrong_image_partners`, seeded by --seed):
  each image's anchor is another study's image whose positive labels differ (`finding_signature`;
  for the phantoms the labels are the finding types). Samples without labels (Open-I) only get
  the other-study rule, and their partner may show the same findings; images no rule-keeping
  partner exists for are left out and counted (`pairing`).
- mean image: one anchor for every image, the mean of the L2-normalized test-image embeddings.
- text only: no image at all; image i's anchor is the mean L2-normalized embedding of the test
  reports whose text differs from its own report (so the anchor never contains the report it
  scores). A report that scores high here is preferred for its wording alone.
- image-grounding margin = own − wrong-image accuracy, over the images that have a partner: the
  mean of the per-image difference (1/0 correct), with the percentile bootstrap CI over those
  images; per type likewise (pairwise). An encoder whose image embedding ignores the image has a
  margin of exactly 0.

Grounded structure (issue 13, §2): when the samples carry counterfactual reports (`pertvl pack
--counterfactuals`: `counterfactuals` {cf_type: text}, `cf_unavailable` {cf_type: reason}), the same
test with the counterfactuals as the candidates: the original ranked strictly above all of its
valid counterfactuals (chance 1/(1+k) per image), per type original vs that counterfactual (chance
50 %), with the same controls and margin. Counterfactuals describe a different image in the
original's words, so only the image can tell them apart: an encoder that ignores the image is at
chance with every anchor, and its grounded margin is 0. Samples without the keys are left out
(counted); a split without any gives `grounded` null.

Text-disjoint subset (issue 13, §3): given the training split's texts (`pertvl eval structure`
reads them from the same shards), the overall and per-type accuracies (and the grounded one) on
the images whose cleaned report text is not a training report's, with the counts.

JSON schema "pertvl-structure/3" (`StructureResult.to_json`; text_structure.py writes the same
layout without "controls", "grounded" and "text_disjoint" under "pertvl-text-structure/3"; /1
and /2 files, without the mean cosines and controls or without the grounded and text-disjoint
parts, are still read):

    {
      "schema": "pertvl-structure/3",
      "overall": STAT,                  # original ranked strictly first among all candidates
      "per_type": {type: STAT, ...},    # every requested type, in PERTURBATION_TYPES order
      "images": int,                    # samples scored (non-empty report)
      "images_without_valid_perturbation": int,
      "skipped": {reason: int},         # samples not scored (e.g. "empty_text")
      "bootstrap": {"resamples": int, "seed": int, "confidence": 0.95, "method": "percentile"},
      "tie_tolerance": float,
      "controls": {                     # null when no image was scored
        "wrong_image" | "mean_image" | "text_only": {"overall": STAT, "per_type": {type: STAT},
                                                      "unpaired": int (images left out)},
        "margin": MARGIN, "margin_per_type": {type: MARGIN},
        "pairing": {"rule": str, "seed": int, "paired": int, "unpaired": int}
      },
      "grounded": {                     # null when no sample carries counterfactuals
        "overall": STAT, "per_type": {cf_type: STAT}, "controls": CONTROLS (as above) | null,
        "images": int (scored images with a counterfactual record),
        "images_without_valid_counterfactual": int, "samples_without_record": int
      },
      "text_disjoint": {                # null when the training texts were not given
        "train_texts": int (distinct), "images": int, "images_text_in_train": int,
        "texts": int (distinct scored), "texts_in_train": int,
        "overall": STAT, "per_type": {type: STAT}, "grounded": STAT | null
      },
      "score": "global" | "local",     # S(I, T): global cosine | local branch (structure-local)
      "info": {...}                     # free-form provenance (encoder, shards, split, ...)
    }
    STAT = {"accuracy": float|null, "ci95": [low, high]|null, "n": int (images), "correct": int,
            "chance": float|null, "mean_candidates": float|null,
            "excluded_identical": int, "unavailable": int, "missing": int,
            "cos_original": float|null,   # mean cosine(anchor, original) over the STAT's images
            "cos_perturbed": float|null}  # mean cosine(anchor, negative) over their valid negatives
    MARGIN = {"margin": float|null, "ci95": [low, high]|null, "n": int (paired images),
              "own": float|null, "wrong": float|null}   # own and wrong accuracy on those images

Flat metrics: structure/overall, structure/TYPE, structure/{wrong_image,mean_image,text_only}
(overall accuracy with that anchor), structure/margin and structure/margin_ci_{low,high};
with counterfactuals structure/grounded, structure/grounded_{wrong_image,mean_image,text_only},
structure/grounded_margin (+ _ci_low/_ci_high), structure/CF_TYPE (pairwise) and its own − wrong
image margin structure/CF_TYPE_margin (+ _ci_low/_ci_high); with the
training texts structure/text_disjoint (and structure/text_disjoint_grounded).

For the overall STAT the three exclusion counts are totals over types. A null accuracy means
"not measured" (n = 0), never 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.text import clean_text
from pertvl.evaluate.encoder import (
    Encoder,
    ImageBatcher,
    embed_texts_unique,
    l2_normalize,
    word_features_unique,
)
from pertvl.evaluate.evaluation import Evaluation, MetricInfo, Suite, non_negative
from pertvl.evaluate.report import ci, md_table, new_figure, pct, save_png

SCHEMA = "pertvl-structure/3"
# /1: before the controls and mean cosines (read back with controls None and cosines null);
# /2: before the grounded structure and the text-disjoint subset (read back with both None).
READABLE_SCHEMAS = ("pertvl-structure/1", "pertvl-structure/2", SCHEMA,
                    "pertvl-text-structure/1", "pertvl-text-structure/2", "pertvl-text-structure/3")
TIE_TOLERANCE = 1e-6
SCORES = ("global", "local")  # S(I, T): cosine of global embeddings (the paper's) | GLoRIA's local score
CONFIDENCE = 0.95


@dataclass
class StructureScores:
    """Per-image scores of one structure evaluation (N anchors, K perturbation types).

    orig:           [N] cosine(anchor, original report)
    pert:           [N, K] cosine(anchor, perturbation k), NaN where invalid
    valid:          [N, K] bool
    correct:        [N] bool, original strictly above every valid perturbation (False if none valid)
    pairwise:       [N, K] bool, original strictly above perturbation k (False where invalid)
    num_candidates: [N] int, 1 + number of valid perturbations
    """

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
    """One accuracy with its uncertainty, sample size, chance level and exclusion counts."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "ci95": list(self.ci95) if self.ci95 is not None else None,
            "n": self.n,
            "correct": self.correct,
            "chance": self.chance,
            "mean_candidates": self.mean_candidates,
            "excluded_identical": self.excluded_identical,
            "unavailable": self.unavailable,
            "missing": self.missing,
            "cos_original": self.cos_original,
            "cos_perturbed": self.cos_perturbed,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AccuracyStat:
        ci = d.get("ci95")
        return cls(
            accuracy=d["accuracy"],
            ci95=(float(ci[0]), float(ci[1])) if ci is not None else None,
            n=int(d["n"]),
            correct=int(d["correct"]),
            chance=d.get("chance"),
            mean_candidates=d.get("mean_candidates"),
            excluded_identical=int(d.get("excluded_identical", 0)),
            unavailable=int(d.get("unavailable", 0)),
            missing=int(d.get("missing", 0)),
            cos_original=d.get("cos_original"),
            cos_perturbed=d.get("cos_perturbed"),
        )


@dataclass
class AnchorControl:
    """The structure accuracies with another anchor in place of each image's own embedding."""

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    unpaired: int = 0  # images left out (wrong image: no partner whose findings differ)

    def to_json(self) -> dict[str, Any]:
        return {"overall": self.overall.to_json(), "per_type": {t: s.to_json() for t, s in self.per_type.items()},
                "unpaired": self.unpaired}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AnchorControl:
        return cls(AccuracyStat.from_json(d["overall"]),
                   {t: AccuracyStat.from_json(s) for t, s in d["per_type"].items()}, int(d.get("unpaired", 0)))


@dataclass
class MarginStat:
    """own − wrong-image accuracy over the images that have a wrong-image partner (paired)."""

    margin: float | None
    ci95: tuple[float, float] | None
    n: int
    own: float | None
    wrong: float | None

    def to_json(self) -> dict[str, Any]:
        return {"margin": self.margin, "ci95": list(self.ci95) if self.ci95 is not None else None, "n": self.n,
                "own": self.own, "wrong": self.wrong}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MarginStat:
        ci = d.get("ci95")
        return cls(d["margin"], (float(ci[0]), float(ci[1])) if ci is not None else None, int(d["n"]),
                   d.get("own"), d.get("wrong"))


@dataclass
class Controls:
    """The anchors that tell image-grounded structure from a text-side preference (module docstring)."""

    wrong_image: AnchorControl
    mean_image: AnchorControl
    text_only: AnchorControl | None  # None for the local score (a text has no regions)
    margin: MarginStat
    margin_per_type: dict[str, MarginStat]
    pairing: dict[str, Any]  # how wrong images were chosen: rule, seed, paired, unpaired

    def anchors(self) -> dict[str, AnchorControl]:
        """The control anchors that were measured, in a fixed order."""
        return {k: a for k, a in (("wrong_image", self.wrong_image), ("mean_image", self.mean_image),
                                  ("text_only", self.text_only)) if a is not None}

    def to_json(self) -> dict[str, Any]:
        return {"text_only": None, **{k: a.to_json() for k, a in self.anchors().items()},
                "margin": self.margin.to_json(),
                "margin_per_type": {t: m.to_json() for t, m in self.margin_per_type.items()},
                "pairing": dict(self.pairing)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Controls:
        return cls(AnchorControl.from_json(d["wrong_image"]), AnchorControl.from_json(d["mean_image"]),
                   AnchorControl.from_json(d["text_only"]) if d.get("text_only") else None,
                   MarginStat.from_json(d["margin"]),
                   {t: MarginStat.from_json(m) for t, m in d.get("margin_per_type", {}).items()},
                   dict(d.get("pairing", {})))


@dataclass
class GroundedStructure:
    """The structure test with counterfactual reports as the candidates (module docstring)."""

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    controls: Controls | None
    images: int  # scored images that carry a counterfactual record
    images_without_valid_counterfactual: int
    samples_without_record: int  # scored images without `counterfactuals` in their json (left out)

    def to_json(self) -> dict[str, Any]:
        return {"overall": self.overall.to_json(), "per_type": {t: s.to_json() for t, s in self.per_type.items()},
                "controls": self.controls.to_json() if self.controls else None, "images": self.images,
                "images_without_valid_counterfactual": self.images_without_valid_counterfactual,
                "samples_without_record": self.samples_without_record}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroundedStructure:
        return cls(AccuracyStat.from_json(d["overall"]),
                   {t: AccuracyStat.from_json(s) for t, s in d["per_type"].items()},
                   Controls.from_json(d["controls"]) if d.get("controls") else None, int(d["images"]),
                   int(d.get("images_without_valid_counterfactual", 0)), int(d.get("samples_without_record", 0)))


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

    def to_json(self) -> dict[str, Any]:
        return {"train_texts": self.train_texts, "images": self.images,
                "images_text_in_train": self.images_text_in_train, "texts": self.texts,
                "texts_in_train": self.texts_in_train, "overall": self.overall.to_json(),
                "per_type": {t: s.to_json() for t, s in self.per_type.items()},
                "grounded": self.grounded.to_json() if self.grounded else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextDisjoint:
        return cls(int(d["train_texts"]), int(d["images"]), int(d["images_text_in_train"]), int(d["texts"]),
                   int(d["texts_in_train"]), AccuracyStat.from_json(d["overall"]),
                   {t: AccuracyStat.from_json(s) for t, s in d["per_type"].items()},
                   AccuracyStat.from_json(d["grounded"]) if d.get("grounded") else None)


@dataclass
class StructureResult:
    """The outcome of a (text-)structure evaluation; `to_json` gives the documented schema."""

    overall: AccuracyStat
    per_type: dict[str, AccuracyStat]
    images: int
    images_without_valid_perturbation: int
    skipped: dict[str, int]
    bootstrap: dict[str, Any]
    tie_tolerance: float = TIE_TOLERANCE
    info: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    controls: Controls | None = None  # image structure only (None: text-structure, or a /1 file)
    grounded: GroundedStructure | None = None  # image structure with counterfactuals in the samples
    text_disjoint: TextDisjoint | None = None  # image structure given the training texts
    score: str = "global"  # SCORES: how candidates were scored (image structure)
    # Per-image detail for pictures/debugging; not serialized.
    ids: list[str] = field(default_factory=list, repr=False, compare=False)
    scores: StructureScores | None = field(default=None, repr=False, compare=False)

    @property
    def is_text(self) -> bool:
        """A text-structure result (anchor = impression, "images" count reports)."""
        return self.schema.startswith("pertvl-text-structure")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "overall": self.overall.to_json(),
            "per_type": {t: s.to_json() for t, s in self.per_type.items()},
            "images": self.images,
            "images_without_valid_perturbation": self.images_without_valid_perturbation,
            "skipped": dict(self.skipped),
            "bootstrap": dict(self.bootstrap),
            "tie_tolerance": self.tie_tolerance,
            **({} if self.is_text else {
                "controls": self.controls.to_json() if self.controls else None,
                "grounded": self.grounded.to_json() if self.grounded else None,
                "text_disjoint": self.text_disjoint.to_json() if self.text_disjoint else None,
                "score": self.score,
            }),
            "info": dict(self.info),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StructureResult:
        """Read a result back from its JSON form.

        Raises:
            ValueError: when `d` is not a pertvl structure result.
        """
        schema = d.get("schema") if isinstance(d, Mapping) else None
        if schema not in READABLE_SCHEMAS:
            raise ValueError(f"not a pertvl structure result: schema {schema!r}")
        controls = d.get("controls")
        return cls(
            overall=AccuracyStat.from_json(d["overall"]),
            per_type={t: AccuracyStat.from_json(s) for t, s in d["per_type"].items()},
            images=int(d["images"]),
            images_without_valid_perturbation=int(d["images_without_valid_perturbation"]),
            skipped={k: int(v) for k, v in d.get("skipped", {}).items()},
            bootstrap=dict(d.get("bootstrap", {})),
            tie_tolerance=float(d.get("tie_tolerance", TIE_TOLERANCE)),
            info=dict(d.get("info", {})),
            schema=schema,
            controls=Controls.from_json(controls) if controls else None,
            grounded=GroundedStructure.from_json(d["grounded"]) if d.get("grounded") else None,
            text_disjoint=TextDisjoint.from_json(d["text_disjoint"]) if d.get("text_disjoint") else None,
            score=str(d.get("score") or "global"),
        )


    # -- Result protocol (pertvl.evaluate.evaluation) -------------------------------------------
    def markdown(self, name: str) -> str:
        title = ("Text-only structure (impression → findings): " if self.is_text
                 else "Clinical semantic structure: ") + name
        return structure_markdown(self, title)

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        title = ("Text-only structure (impression → findings): " if self.is_text
                 else "Clinical semantic structure: ") + name
        return {"png": plot_structure(self, Path(out_dir) / f"{name}.png", title)}

    @property
    def key(self) -> str:
        """The evaluation key, prefix of the flat metrics."""
        return "text_structure" if self.is_text else "structure" if self.score == "global" else "structure_local"

    def metrics(self) -> dict[str, float | None]:
        key = self.key
        out: dict[str, float | None] = {f"{key}/overall": self.overall.accuracy}
        out.update({f"{key}/{t}": s.accuracy for t, s in self.per_type.items()})
        if self.controls is not None:
            c = self.controls
            out.update({f"{key}/{name}": a.overall.accuracy for name, a in c.anchors().items()})
            out[f"{key}/margin"] = c.margin.margin
            out[f"{key}/margin_ci_low"] = c.margin.ci95[0] if c.margin.ci95 else None
            out[f"{key}/margin_ci_high"] = c.margin.ci95[1] if c.margin.ci95 else None
        if self.grounded is not None:
            g = self.grounded
            out[f"{key}/grounded"] = g.overall.accuracy
            if g.controls is not None:
                gc = g.controls
                out.update({f"{key}/grounded_{name}": a.overall.accuracy for name, a in gc.anchors().items()})
                out[f"{key}/grounded_margin"] = gc.margin.margin
                out[f"{key}/grounded_margin_ci_low"] = gc.margin.ci95[0] if gc.margin.ci95 else None
                out[f"{key}/grounded_margin_ci_high"] = gc.margin.ci95[1] if gc.margin.ci95 else None
                for t, m in gc.margin_per_type.items():  # per counterfactual type: own − wrong image
                    out[f"{key}/{t}_margin"] = m.margin
                    out[f"{key}/{t}_margin_ci_low"] = m.ci95[0] if m.ci95 else None
                    out[f"{key}/{t}_margin_ci_high"] = m.ci95[1] if m.ci95 else None
            out.update({f"{key}/{t}": s.accuracy for t, s in g.per_type.items()})
        if self.text_disjoint is not None:
            out[f"{key}/text_disjoint"] = self.text_disjoint.overall.accuracy
            if self.text_disjoint.grounded is not None:
                out[f"{key}/text_disjoint_grounded"] = self.text_disjoint.grounded.accuracy
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        from pertvl.data.perturb import PERTURBATIONS, type_label

        prefix, metric = key.split("/", 1)
        info = cls._metric_info(prefix, metric, PERTURBATIONS, type_label)
        if prefix == "structure_local":  # in the summary: the grounded accuracy and margin only (docs/GROUNDING.md)
            info = dataclasses.replace(info, label=info.label + " (local S)",
                                       summary=info.summary and metric in ("grounded", "grounded_margin"))
        return info

    @staticmethod
    def _metric_info(prefix: str, metric: str, perturbations: Any, type_label: Any) -> MetricInfo:
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
        types = list(perturbations)
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


CONTROL_LABELS = {
    "wrong_image": "Wrong image",
    "mean_image": "Mean image",
    "text_only": "Text-only anchor",
    "margin": "Grounding margin (own − wrong)",
    "margin_ci_low": "Margin 95% CI low",
    "margin_ci_high": "Margin 95% CI high",
}


# Per-type margins in the comparison's summary (issue 14: laterality and finding identity).
SUMMARY_CF_MARGINS = ("cf_laterality", "cf_finding")

MARGINS = ("margin", "grounded_margin")  # own − wrong image, with bootstrap CIs (KEY_ci_low / KEY_ci_high)


GROUNDED_LABELS = {
    "grounded": "Grounded structure (counterfactuals)",
    "grounded_wrong_image": "Grounded, wrong image",
    "grounded_mean_image": "Grounded, mean image",
    "grounded_text_only": "Grounded, text-only anchor",
    "grounded_margin": "Grounded margin (own − wrong)",
    "grounded_margin_ci_low": "Grounded margin 95% CI low",
    "grounded_margin_ci_high": "Grounded margin 95% CI high",
    "text_disjoint": "Structure, text-disjoint subset",
    "text_disjoint_grounded": "Grounded, text-disjoint subset",
}


def counterfactual_types() -> tuple[str, ...]:
    """The counterfactual types (pertvl.data.counterfactual.COUNTERFACTUAL_TYPES), in table order."""
    from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES

    return tuple(COUNTERFACTUAL_TYPES)


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
    if g.controls is not None:
        line += (f", wrong image {pct(g.controls.wrong_image.overall.accuracy)}: grounded margin "
                 f"{margin_text(g.controls.margin)}")
    return line


def margin_text(m: MarginStat) -> str:
    """"+2.8 pts [−1.4, 6.9] (n=72)": percentage points, its CI, the paired images."""
    if m.margin is None:
        return "n/a (no paired image)"
    ci_part = "" if m.ci95 is None else f" [{100 * m.ci95[0]:+.1f}, {100 * m.ci95[1]:+.1f}]"
    return f"{100 * m.margin:+.1f} pts{ci_part} (n={m.n})"


def structure_scores(
    image_emb: np.ndarray,
    orig_emb: np.ndarray,
    pert_emb: np.ndarray,
    valid: np.ndarray,
    tie_tolerance: float = TIE_TOLERANCE,
) -> StructureScores:
    """Score each image's original report against its perturbations by cosine similarity.

    Args:
        image_emb: [N, D] image global embeddings (the anchors; any scale: normalized here).
        orig_emb: [N, D] global embeddings of each image's original report.
        pert_emb: [N, K, D] embeddings of the perturbations (anything where invalid).
        valid: [N, K] bool, which perturbations are candidates.
        tie_tolerance: a perturbation within this cosine of the original counts as beating it.

    Returns:
        StructureScores (see its docstring).

    Raises:
        ValueError: on inconsistent shapes.
    """
    image_emb = np.asarray(image_emb)
    orig_emb = np.asarray(orig_emb)
    pert_emb = np.asarray(pert_emb)
    valid = np.asarray(valid)
    if image_emb.ndim != 2 or orig_emb.shape != image_emb.shape:
        raise ValueError(
            f"expected image_emb and orig_emb of the same shape [N, D], got "
            f"{tuple(image_emb.shape)} and {tuple(orig_emb.shape)}"
        )
    n, d = image_emb.shape
    if pert_emb.ndim != 3 or pert_emb.shape[0] != n or pert_emb.shape[2] != d:
        raise ValueError(f"expected pert_emb [{n}, K, {d}], got {tuple(pert_emb.shape)}")
    if valid.shape != pert_emb.shape[:2] or valid.dtype != np.bool_:
        raise ValueError(f"expected valid as bool [{n}, {pert_emb.shape[1]}], got {valid.dtype} {tuple(valid.shape)}")
    img = l2_normalize(image_emb)
    orig = np.einsum("nd,nd->n", img, l2_normalize(orig_emb))
    pert = np.einsum("nd,nkd->nk", img, l2_normalize(pert_emb))
    return scores_from_cosines(orig, pert, valid, tie_tolerance)


def scores_from_cosines(
    orig: np.ndarray, pert: np.ndarray, valid: np.ndarray, tie_tolerance: float = TIE_TOLERANCE
) -> StructureScores:
    """StructureScores from precomputed cosines: orig [N], pert [N, K], valid [N, K] bool."""
    orig = np.asarray(orig, dtype=np.float64)
    pert = np.where(valid, np.asarray(pert, dtype=np.float64), np.nan)
    # Strictly above, by more than the tolerance: ties go against the original.
    wins = orig[:, None] - np.nan_to_num(pert, nan=-np.inf) > tie_tolerance
    pairwise = wins & valid
    correct = valid.any(axis=1) & np.all(wins | ~valid, axis=1)
    return StructureScores(
        orig=orig,
        pert=pert,
        valid=valid.copy(),
        correct=correct,
        pairwise=pairwise,
        num_candidates=1 + valid.sum(axis=1),
    )


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float] | None:
    """Percentile bootstrap 95 % CI of the mean of `values` (resampling its entries).

    Returns None when it is undefined (fewer than 2 values) or disabled (resamples = 0).
    """
    values = np.asarray(values, dtype=np.float64)
    if resamples <= 0 or values.size < 2:
        return None
    from scipy.stats import bootstrap

    res = bootstrap(
        (values,),
        np.mean,
        n_resamples=resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class CandidateCounts:
    """Exclusion counts per perturbation type, gathered while building the candidate lists."""

    excluded_identical: Counter = field(default_factory=Counter)
    unavailable: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)


def valid_perturbations(
    text: str,
    perturbations: Mapping[str, Any] | None,
    unavailable: Mapping[str, Any] | None,
    types: Sequence[str],
    counts: CandidateCounts,
) -> list[str | None]:
    """The candidate text of each type for one report, None where it is not a valid candidate.

    A perturbation whose words equal the original's is invalid whatever its record says
    (counted as `excluded_identical`); a type listed as unavailable, or absent from both maps
    (a malformed record), is invalid and counted as `unavailable` / `missing`.
    """
    perturbations = perturbations or {}
    unavailable = unavailable or {}
    words = text.split()
    out: list[str | None] = []
    for t in types:
        p = perturbations.get(t)
        if isinstance(p, str) and p.strip():
            if p.split() == words:
                counts.excluded_identical[t] += 1
                out.append(None)
            else:
                out.append(p)
        elif t in unavailable:
            counts.unavailable[t] += 1
            out.append(None)
        else:  # neither a usable text nor a stated reason: a malformed record
            counts.missing[t] += 1
            out.append(None)
    return out


def requested_types(types: Sequence[str]) -> tuple[str, ...]:
    """The perturbation types to score, in the order asked (the table's columns), validated against
    the table's; a repeated type is refused. (pertvl.data.perturb.select_types is the
    generation side: table order, a comma string accepted.)"""
    from pertvl.data.perturb import PERTURBATIONS

    types = tuple(types)
    unknown = [t for t in types if t not in PERTURBATIONS]
    if unknown or not types:
        raise ValueError(f"unknown perturbation type(s) {unknown}; expected a non-empty subset of {tuple(PERTURBATIONS)}")
    if len(set(types)) != len(types):
        raise ValueError(f"perturbation types repeated: {list(types)}")
    return types


class GlobalScorer:
    """The paper's S(I, T): cosine of the anchor's and the text's global embeddings."""

    score = "global"

    def __init__(self, text_emb: np.ndarray) -> None:
        self.texts = l2_normalize(text_emb)

    def prepare(self, anchors: np.ndarray) -> np.ndarray:
        # Row by row: a constant image embedding gives bit-identical scores, so a margin of exactly 0.
        return l2_normalize(anchors)

    def __call__(self, anchors: np.ndarray, text_rows: np.ndarray) -> np.ndarray:
        """Scores of prepared anchors [n, D] against the texts of `text_rows` [n]."""
        return np.einsum("nd,nd->n", anchors, self.texts[text_rows])

    def mean_anchor(self, anchors: np.ndarray) -> np.ndarray:
        img = l2_normalize(anchors)
        return np.broadcast_to(img.mean(axis=0), img.shape)

    def text_anchor(self, text_index: dict[str, int], originals: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The text-only control: each image's anchor is the mean embedding of the other reports (those
        whose text differs), so it never contains the report it scores; and the rows that have one."""
        rows = np.array([text_index[t] for t in originals], dtype=np.int64)
        vecs = self.texts[rows]
        same = np.bincount(rows, minlength=len(self.texts))[rows].astype(np.float64)
        others = len(originals) - same
        return (vecs.sum(axis=0)[None] - same[:, None] * vecs) / np.maximum(others, 1)[:, None], others > 0


class LocalScorer:
    """GLoRIA's local S(I, T) (pertvl.infer.local_scores): anchors are region features [N, M, D],
    texts their word features. A globally pooled embedding may lose where a finding is (left or
    right); the region features keep it, so both scores are reported."""

    score = "local"
    CHUNK = 256  # rows per local_scores call: bounds the [n, M, W] temporaries

    def __init__(self, words: np.ndarray, word_mask: np.ndarray, gamma1: float = 4.0, gamma2: float = 5.0) -> None:
        self.words, self.word_mask, self.gamma1, self.gamma2 = words, word_mask, gamma1, gamma2

    def prepare(self, anchors: np.ndarray) -> np.ndarray:
        return np.asarray(anchors)

    def __call__(self, anchors: np.ndarray, text_rows: np.ndarray) -> np.ndarray:
        """S(I, T) of region features [n, M, D] against the texts of `text_rows` [n]."""
        from pertvl.infer import local_scores

        out = [local_scores(anchors[i : i + self.CHUNK], self.words[text_rows[i : i + self.CHUNK]],
                            self.word_mask[text_rows[i : i + self.CHUNK]], self.gamma1, self.gamma2)
               for i in range(0, len(text_rows), self.CHUNK)]
        return np.concatenate(out) if out else np.zeros(0)

    def mean_anchor(self, anchors: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(anchors).mean(axis=0), np.shape(anchors))

    def text_anchor(self, text_index: dict[str, int], originals: Sequence[str]) -> None:
        return None  # a text has no regions: no text-only control for the local score


def cosine_candidates(
    anchor_emb: np.ndarray,
    text_index: dict[str, int],
    text_emb: np.ndarray,
    originals: Sequence[str],
    candidates: Sequence[Sequence[str | None]],
    num_types: int,
    tie_tolerance: float = TIE_TOLERANCE,
) -> StructureScores:
    """Scores from anchors [N, D] and the embeddings of distinct texts, without materializing
    an [N, K, D] array (the full Open-I split would take hundreds of MB).

    Args:
        anchor_emb: [N, D] anchors (image embeddings, or impression embeddings for text-structure).
        text_index: text → row of `text_emb` (from embed_texts_unique).
        text_emb: [U, D] embeddings of the distinct texts.
        originals: the N original reports.
        candidates: N rows of `num_types` perturbation texts, None where not a valid candidate.
        num_types: K.
        tie_tolerance: see `scores_from_cosines`.

    Raises:
        ValueError: when anchor and text embedding widths differ.
    """
    n, k = len(originals), num_types
    if n == 0:
        empty = np.zeros((0, k))
        return scores_from_cosines(np.zeros(0), empty, empty.astype(bool), tie_tolerance)
    if anchor_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"anchor embeddings have width {anchor_emb.shape[1]} but text embeddings {text_emb.shape[1]}: "
            "the two towers must share the joint space"
        )
    return candidate_scores(anchor_emb, text_index, GlobalScorer(text_emb), originals, candidates, k, tie_tolerance)


def candidate_scores(
    anchors: np.ndarray,
    text_index: dict[str, int],
    scorer: GlobalScorer | LocalScorer,
    originals: Sequence[str],
    candidates: Sequence[Sequence[str | None]],
    num_types: int,
    tie_tolerance: float = TIE_TOLERANCE,
) -> StructureScores:
    """`cosine_candidates` with any scorer: scorer(prepared anchors[rows], text rows) -> [rows] scores."""
    n, k = len(originals), num_types
    if n == 0:
        empty = np.zeros((0, k))
        return scores_from_cosines(np.zeros(0), empty, empty.astype(bool), tie_tolerance)
    anchors = scorer.prepare(anchors)
    orig = scorer(anchors, np.array([text_index[t] for t in originals], dtype=np.int64))
    valid = np.array([[c is not None for c in row] for row in candidates], dtype=bool).reshape(n, k)
    pert = np.full((n, k), np.nan)
    for j in range(k):
        rows = np.flatnonzero(valid[:, j])
        if rows.size:
            idx = np.array([text_index[candidates[i][j]] for i in rows], dtype=np.int64)
            pert[rows, j] = scorer(anchors[rows], idx)
    return scores_from_cosines(orig, pert, valid, tie_tolerance)


def _mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else None


def accuracy_stats(
    scores: StructureScores,
    types: Sequence[str],
    counts: CandidateCounts,
    bootstrap: int,
    seed: int,
    rows: np.ndarray | None = None,
) -> tuple[AccuracyStat, dict[str, AccuracyStat]]:
    """Overall and per-type AccuracyStats of `scores` (restricted to the bool [N] `rows` if given),
    with bootstrap CIs and the mean cosines of originals and negatives."""
    keep = np.ones(len(scores.orig), bool) if rows is None else np.asarray(rows, bool)
    has = scores.has_candidates & keep
    n_all = int(has.sum())
    overall_values = scores.correct[has].astype(np.float64)
    overall = AccuracyStat(
        accuracy=float(overall_values.mean()) if n_all else None,
        ci95=bootstrap_ci(overall_values, bootstrap, seed),
        n=n_all,
        correct=int(overall_values.sum()),
        chance=float(np.mean(1.0 / scores.num_candidates[has])) if n_all else None,
        mean_candidates=float(np.mean(scores.num_candidates[has])) if n_all else None,
        excluded_identical=sum(counts.excluded_identical.values()),
        unavailable=sum(counts.unavailable.values()),
        missing=sum(counts.missing.values()),
        cos_original=_mean(scores.orig[has]),
        cos_perturbed=_mean(scores.pert[has][scores.valid[has]]),
    )
    per_type: dict[str, AccuracyStat] = {}
    for j, t in enumerate(types):
        v = scores.valid[:, j] & keep
        values = scores.pairwise[v, j].astype(np.float64)
        n = int(v.sum())
        per_type[t] = AccuracyStat(
            accuracy=float(values.mean()) if n else None,
            ci95=bootstrap_ci(values, bootstrap, seed),
            n=n,
            correct=int(values.sum()),
            chance=0.5 if n else None,
            mean_candidates=2.0 if n else None,
            excluded_identical=counts.excluded_identical[t],
            unavailable=counts.unavailable[t],
            missing=counts.missing[t],
            cos_original=_mean(scores.orig[v]),
            cos_perturbed=_mean(scores.pert[v, j]),
        )
    return overall, per_type


def summarize(
    scores: StructureScores,
    types: Sequence[str],
    counts: CandidateCounts,
    *,
    skipped: Mapping[str, int],
    bootstrap: int,
    seed: int,
    schema: str = SCHEMA,
    info: Mapping[str, Any] | None = None,
    ids: Sequence[str] = (),
    tie_tolerance: float = TIE_TOLERANCE,
    controls: Controls | None = None,
) -> StructureResult:
    """Turn per-image scores into overall and per-type accuracies with bootstrap CIs."""
    if bootstrap < 0:
        raise ValueError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    overall, per_type = accuracy_stats(scores, types, counts, bootstrap, seed)
    return StructureResult(
        overall=overall,
        per_type=per_type,
        images=len(scores.orig),
        images_without_valid_perturbation=int((~scores.has_candidates).sum()),
        skipped=dict(skipped),
        bootstrap={"resamples": bootstrap, "seed": seed, "confidence": CONFIDENCE, "method": "percentile"},
        tie_tolerance=tie_tolerance,
        info=dict(info or {}),
        schema=schema,
        ids=list(ids),
        scores=scores,
        controls=controls,
    )


# ----------------------------------------------------------------------------- controls


def finding_signature(meta: Mapping[str, Any]) -> frozenset[str] | None:
    """What "the findings differ" compares: the set of positive (1.0) labels of a sample's json;
    None when it has no labels (Open-I: its findings are unknown)."""
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        return None
    return frozenset(k for k, v in labels.items() if v == 1.0)


def wrong_image_partners(
    signatures: Sequence[frozenset[str] | None], studies: Sequence[str], seed: int
) -> np.ndarray:
    """A fixed derangement: for each image i the image whose embedding replaces its own, -1 if none.

    The partner is another study's image, and where both signatures are known they differ (the
    wrong image's findings are not the report's). Rule: a random cycle through all images (seeded),
    so every image is used once as a wrong anchor; a pair breaking the rule is repaired by swapping
    partners with another image where both new pairs keep it; what no swap repairs is left unpaired.
    Where a signature is unknown only the study rule applies (such a partner may show the same
    findings).
    """
    n = len(studies)
    partner = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return partner

    def ok(a: int, b: int) -> bool:
        if a == b or studies[a] == studies[b]:
            return False
        sa, sb = signatures[a], signatures[b]
        return sa is None or sb is None or sa != sb

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    partner[order] = np.roll(order, -1)
    for i in rng.permutation(n):
        if ok(i, partner[i]):
            continue
        for j in rng.permutation(n):
            if j != i and ok(i, partner[j]) and ok(j, partner[i]):
                partner[i], partner[j] = partner[j], partner[i]
                break
    bad = np.array([not ok(i, partner[i]) for i in range(n)])
    partner[bad] = -1
    return partner


def pairing_rule(signatures: Sequence[frozenset[str] | None]) -> str:
    known = sum(s is not None for s in signatures)
    if known == len(signatures):
        return "another study's image whose positive labels differ"
    if known == 0:
        return "another study's image (findings unknown: the partner's may be the same)"
    return f"another study's image; positive labels differ where both are known ({known}/{len(signatures)} known)"


def _margin(own: np.ndarray, wrong: np.ndarray, rows: np.ndarray, bootstrap: int, seed: int) -> MarginStat:
    own_v, wrong_v = own[rows].astype(np.float64), wrong[rows].astype(np.float64)
    n = int(rows.sum())
    diff = own_v - wrong_v
    return MarginStat(margin=float(diff.mean()) if n else None, ci95=bootstrap_ci(diff, bootstrap, seed), n=n,
                      own=float(own_v.mean()) if n else None, wrong=float(wrong_v.mean()) if n else None)


def structure_controls(
    image_emb: np.ndarray,
    own: StructureScores,
    text_index: dict[str, int],
    text_emb: np.ndarray | None,
    originals: Sequence[str],
    candidates: Sequence[Sequence[str | None]],
    types: Sequence[str],
    counts: CandidateCounts,
    signatures: Sequence[frozenset[str] | None],
    studies: Sequence[str],
    *,
    bootstrap: int,
    seed: int,
    tie_tolerance: float = TIE_TOLERANCE,
    scorer: GlobalScorer | LocalScorer | None = None,
) -> Controls:
    """The control anchors and the image-grounding margin (module docstring). `image_emb` are the
    scorer's anchors (global embeddings; region features for a LocalScorer, which has no text-only
    anchor: a text has no regions)."""
    scorer = GlobalScorer(text_emb) if scorer is None else scorer
    n, k = len(originals), len(types)
    anchors = np.asarray(image_emb)
    partner = wrong_image_partners(signatures, studies, seed)
    paired = partner >= 0
    wrong_anchor = anchors[np.where(paired, partner, np.arange(n))]  # unpaired: left out below
    anchor_rows = {"wrong_image": (wrong_anchor, paired), "mean_image": (scorer.mean_anchor(anchors), None),
                   "text_only": scorer.text_anchor(text_index, originals)}
    controls: dict[str, AnchorControl | None] = {}
    scores: dict[str, StructureScores] = {}
    for name, anchor_and_rows in anchor_rows.items():
        if anchor_and_rows is None:
            controls[name] = None
            continue
        anchor, rows = anchor_and_rows
        sc = scores[name] = candidate_scores(anchor, text_index, scorer, originals, candidates, k, tie_tolerance)
        overall, per_type = accuracy_stats(sc, types, counts, bootstrap, seed, rows)
        left_out = 0 if rows is None else int((~rows & sc.has_candidates).sum())
        controls[name] = AnchorControl(overall, per_type, left_out)
    wrong = scores["wrong_image"]
    both = paired & own.has_candidates
    margin = _margin(own.correct, wrong.correct, both, bootstrap, seed)
    per_type = {t: _margin(own.pairwise[:, j], wrong.pairwise[:, j], paired & own.valid[:, j], bootstrap, seed)
                for j, t in enumerate(types)}
    pairing = {"rule": pairing_rule(signatures), "seed": seed, "paired": int(paired.sum()),
               "unpaired": int((~paired).sum())}
    return Controls(controls["wrong_image"], controls["mean_image"], controls["text_only"], margin, per_type, pairing)


def evaluate_structure(
    encoder: Encoder,
    samples: Iterable[Any],
    types: Sequence[str] = PERTURBATION_TYPES,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    tie_tolerance: float = TIE_TOLERANCE,
    info: Mapping[str, Any] | None = None,
    train_texts: Iterable[str] | None = None,
    score: str = "global",
) -> StructureResult:
    """Run the image→report structure evaluation over shard samples.

    Args:
        encoder: an Encoder (image and text global embeddings in one joint space).
        samples: objects with `.key`, `.image` (uint8 [H, W]) and `.meta` (dict with `text`,
            `perturbations`, `unavailable`, `id`), e.g. pertvl.data.shards.iter_samples(...).
        types: perturbation types to evaluate (subset of PERTURBATION_TYPES, order kept).
        bootstrap: bootstrap resamples for the 95 % CIs (0 disables them).
        seed: bootstrap seed.
        batch_size: images / texts per encoder call.
        tie_tolerance: cosine margin under which a perturbation ties the original (counts wrong).
        info: provenance stored in the result's `info`.
        train_texts: the training split's report texts (cleaned here); given, the result has the
            text-disjoint subset (images whose cleaned report is none of them).
        score: "global" (the paper's cosine of global embeddings) or "local" (GLoRIA's S(I, T) on
            region and word features, `LocalScorer`; the encoder needs the local branch; no
            text-only control).

    Returns:
        StructureResult with schema "pertvl-structure/3" (controls included; `grounded` when
        samples carry `counterfactuals`).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    local = score == "local"
    types = requested_types(types)
    counts = CandidateCounts()
    skipped: Counter = Counter()
    batcher = ImageBatcher(encoder, batch_size, regions=local)
    ids: list[str] = []
    originals: list[str] = []
    candidates: list[list[str | None]] = []
    signatures: list[frozenset[str] | None] = []
    studies: list[str] = []
    cf_types = counterfactual_types()
    cf_counts = CandidateCounts()
    cf_candidates: list[list[str | None]] = []
    has_cf: list[bool] = []
    for sample in samples:
        meta = sample.meta
        text = (meta.get("text") or "").strip()
        if not text:
            skipped["empty_text"] += 1
            continue
        batcher.add(sample)
        ids.append(str(meta.get("id", getattr(sample, "key", len(ids)))))
        originals.append(text)
        candidates.append(valid_perturbations(text, meta.get("perturbations"), meta.get("unavailable"), types, counts))
        signatures.append(finding_signature(meta))
        studies.append(str(meta.get("study_id", ids[-1])))
        has_cf.append(isinstance(meta.get("counterfactuals"), Mapping))
        cf_candidates.append(valid_perturbations(text, meta.get("counterfactuals"), meta.get("cf_unavailable"),
                                                 cf_types, cf_counts) if has_cf[-1] else [None] * len(cf_types))
    image_emb = batcher.finish()
    all_texts = originals + [c for row in candidates for c in row if c is not None]
    cf_texts = [c for row in cf_candidates for c in row if c is not None]
    scorer: GlobalScorer | LocalScorer
    if local:
        anchors = batcher.regions()
        index, words, word_mask = word_features_unique(encoder, all_texts + cf_texts, batch_size)
        text_emb = None  # the scorer holds the word features
        scorer = LocalScorer(words, word_mask)
    else:
        anchors = image_emb
        index, text_emb = embed_texts_unique(encoder, all_texts, batch_size)
        scorer = GlobalScorer(text_emb)
    scores = candidate_scores(anchors, index, scorer, originals, candidates, len(types), tie_tolerance)
    controls = None
    if originals:
        controls = structure_controls(anchors, scores, index, text_emb, originals, candidates, types, counts,
                                      signatures, studies, bootstrap=bootstrap, seed=seed, tie_tolerance=tie_tolerance,
                                      scorer=scorer)
    grounded = grounded_scores = None
    if any(has_cf):
        # The counterfactual texts are embedded in calls of their own, after the others, so the
        # embeddings (and numbers) of the perturbation test are those of a split without them.
        extra = [c for c in cf_texts if c not in index]
        if extra and text_emb is not None:
            cf_index, cf_emb = embed_texts_unique(encoder, extra, batch_size)
            index = {**index, **{t: len(text_emb) + i for t, i in cf_index.items()}}
            text_emb = np.concatenate([text_emb, cf_emb.astype(text_emb.dtype)], axis=0)
            scorer = GlobalScorer(text_emb)
        grounded, grounded_scores = grounded_structure(
            anchors, index, text_emb, originals, cf_candidates, cf_types, cf_counts, np.array(has_cf), signatures,
            studies, bootstrap=bootstrap, seed=seed, tie_tolerance=tie_tolerance, scorer=scorer)
    disjoint = None
    if train_texts is not None:
        disjoint = text_disjoint_stats(originals, set(map(clean_text, train_texts)) - {""}, scores, types, counts,
                                       grounded_scores, cf_types, cf_counts, bootstrap=bootstrap, seed=seed)
    result = summarize(
        scores,
        types,
        counts,
        skipped=skipped,
        bootstrap=bootstrap,
        seed=seed,
        schema=SCHEMA,
        info=info,
        ids=ids,
        tie_tolerance=tie_tolerance,
        controls=controls,
    )
    result.grounded, result.text_disjoint, result.score = grounded, disjoint, score
    return result


def grounded_structure(
    image_emb: np.ndarray,
    text_index: dict[str, int],
    text_emb: np.ndarray | None,
    originals: Sequence[str],
    cf_candidates: Sequence[Sequence[str | None]],
    cf_types: Sequence[str],
    cf_counts: CandidateCounts,
    has_record: np.ndarray,
    signatures: Sequence[frozenset[str] | None],
    studies: Sequence[str],
    *,
    bootstrap: int,
    seed: int,
    tie_tolerance: float = TIE_TOLERANCE,
    scorer: GlobalScorer | LocalScorer | None = None,
) -> tuple[GroundedStructure, StructureScores]:
    """The structure test with the counterfactuals as candidates, its controls and margin.

    Images without a counterfactual record take part in nothing (they have no valid candidate,
    so they are outside every accuracy and margin) and are counted; the wrong-image partners and
    the text-only anchors are those of the perturbation test (all scored images), so the two
    tests are controlled alike.
    """
    k = len(cf_types)
    scorer = GlobalScorer(text_emb) if scorer is None else scorer
    scores = candidate_scores(image_emb, text_index, scorer, originals, cf_candidates, k, tie_tolerance)
    overall, per_type = accuracy_stats(scores, cf_types, cf_counts, bootstrap, seed)
    controls = structure_controls(image_emb, scores, text_index, text_emb, originals, cf_candidates, cf_types,
                                  cf_counts, signatures, studies, bootstrap=bootstrap, seed=seed,
                                  tie_tolerance=tie_tolerance, scorer=scorer) if len(originals) else None
    has_record = np.asarray(has_record, bool)
    g = GroundedStructure(overall, per_type, controls, images=int(has_record.sum()),
                          images_without_valid_counterfactual=int((has_record & ~scores.has_candidates).sum()),
                          samples_without_record=int((~has_record).sum()))
    return g, scores


def text_disjoint_stats(
    originals: Sequence[str],
    train_texts: set[str],
    scores: StructureScores,
    types: Sequence[str],
    counts: CandidateCounts,
    grounded_scores: StructureScores | None,
    cf_types: Sequence[str],
    cf_counts: CandidateCounts,
    *,
    bootstrap: int,
    seed: int,
) -> TextDisjoint:
    """The accuracies restricted to the images whose cleaned report is not in `train_texts`
    (cleaned training texts). Exclusion counts are those of the whole split."""
    in_train = np.array([clean_text(t) in train_texts for t in originals], dtype=bool)
    overall, per_type = accuracy_stats(scores, types, counts, bootstrap, seed, ~in_train)
    grounded = None
    if grounded_scores is not None:
        grounded, _ = accuracy_stats(grounded_scores, cf_types, cf_counts, bootstrap, seed, ~in_train)
    texts = {clean_text(t) for t in originals}
    return TextDisjoint(train_texts=len(train_texts), images=len(originals), images_text_in_train=int(in_train.sum()),
                        texts=len(texts), texts_in_train=len(texts & train_texts), overall=overall,
                        per_type=per_type, grounded=grounded)


def split_texts(folder: str | os.PathLike, split: str) -> list[str] | None:
    """The report texts of one split of a shard folder (its sample json), None when the split is
    not in the manifest (the text-disjoint subset is then not measured)."""
    from pertvl.data.shards import iter_samples
    from pertvl.data.shards.format import read_shards_manifest

    if split not in read_shards_manifest(folder).get("splits", {}):
        return None
    return [s.meta.get("text") or "" for s in iter_samples(folder, split)]


# ----------------------------------------------------------------------------- Markdown and figure

STRUCTURE_FIGSIZE = (11.0, 5.0)  # → 1100 × 500 px


def cos(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def structure_markdown(result: StructureResult, title: str) -> str:
    """The overall + per-type table of one structure result (type labels: pertvl.data.perturb),
    then, for image structure, the control anchors and the image-grounding margin, the grounded
    structure (counterfactuals) and the text-disjoint subset."""
    type_label = type_name

    unit = "reports" if result.is_text else "images"
    o = result.overall
    rows = [[
        "**Overall** (original ranked first)", pct(o.accuracy), ci(o.ci95), str(o.n), pct(o.chance),
        "—" if o.mean_candidates is None else f"{o.mean_candidates:.2f}",
        cos(o.cos_original), cos(o.cos_perturbed),
        f"{o.excluded_identical} / {o.unavailable} / {o.missing}",
    ]]
    for t, st in result.per_type.items():
        rows.append([
            f"{type_label(t)} (`{t}`)", pct(st.accuracy), ci(st.ci95), str(st.n), pct(st.chance),
            "—" if st.mean_candidates is None else f"{st.mean_candidates:.0f}",
            cos(st.cos_original), cos(st.cos_perturbed),
            f"{st.excluded_identical} / {st.unavailable} / {st.missing}",
        ])
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
        notes += ["", controls_markdown(result)]
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
        "## Grounded structure: original vs counterfactual reports (only the image can tell them apart)",
        "",
        md_table(["", "accuracy", "95% CI", "n (images)", "chance", "mean cos original", "mean cos counterfactuals"],
                 rows),
        f"{g.images} images carry a counterfactual record ({g.images_without_valid_counterfactual} of them without "
        f"any valid counterfactual); {g.samples_without_record} without one (left out). Per type: original vs that "
        "counterfactual (chance 50%); overall chance 1/(1+k) per image.",
    ]
    if g.controls is not None:
        parts += ["", _controls_tables(g.overall, g.per_type, g.controls,
                                       "### Grounded structure with another anchor", score)]
    return "\n".join(parts)


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


ANCHOR_TEXT = {
    "own": "own image",
    "wrong_image": "wrong image (another study's, findings differ)",
    "mean_image": "mean test-image embedding",
    "text_only": "text only (mean embedding of the other test reports)",
}


def anchor_text(name: str, score: str = "global") -> str:
    """What an anchor is, for tables ("mean image" means the mean region features for the local score)."""
    return "mean test-image region features" if (name, score) == ("mean_image", "local") else ANCHOR_TEXT[name]


def controls_markdown(result: StructureResult) -> str:
    """Overall accuracy per anchor with mean cosines, the margin, and per type per anchor."""
    assert result.controls is not None
    return _controls_tables(result.overall, result.per_type, result.controls,
                            "## Controls: the same test with another anchor", result.score)


def _controls_tables(own_overall: AccuracyStat, own_per_type: dict[str, AccuracyStat], c: Controls,
                     heading: str, score: str = "global") -> str:
    type_label = type_name
    anchors = {"own": AnchorControl(own_overall, own_per_type), **c.anchors()}
    rows = [[anchor_text(name, score), pct(a.overall.accuracy), ci(a.overall.ci95), str(a.overall.n),
             cos(a.overall.cos_original), cos(a.overall.cos_perturbed)] for name, a in anchors.items()]
    m = c.margin
    rows.append(["**image-grounding margin** (own − wrong, paired images)",
                 "—" if m.margin is None else f"{100 * m.margin:+.1f} pts",
                 "—" if m.ci95 is None else f"[{100 * m.ci95[0]:+.1f}, {100 * m.ci95[1]:+.1f}]", str(m.n), "", ""])
    per_type = []
    for t in own_per_type:
        mt = c.margin_per_type.get(t)
        cells = [f"{pct(a.per_type[t].accuracy)} ({cos(a.per_type[t].cos_original)} / "
                 f"{cos(a.per_type[t].cos_perturbed)})" for a in anchors.values()]
        margin = "—" if mt is None or mt.margin is None else f"{100 * mt.margin:+.1f} pts " + (
            "" if mt.ci95 is None else f"[{100 * mt.ci95[0]:+.1f}, {100 * mt.ci95[1]:+.1f}]")
        per_type.append([f"{type_label(t)} (`{t}`)", *cells, margin])
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


def plot_structure(result: StructureResult, out_png: str | os.PathLike, title: str = "") -> Path:
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
    title = title or "Clinical semantic structure: original report ranked above perturbations"
    if c is not None:
        title += f"\nbars: own image; image-grounding margin (own − wrong image) {margin_text(c.margin)}"
    ax.set_title(title, fontsize=10 if c is not None else None)
    fig.legend(loc="outside upper right", fontsize=9)  # outside the axes: never over a bar label
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- the catalog entry


def types_arg(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated perturbation types."""
    from pertvl.data.perturb import PERTURBATIONS

    types = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t not in PERTURBATIONS]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"unknown type(s) {unknown}; choose from {', '.join(PERTURBATIONS)}")
    return types


def add_structure_arguments(p: argparse.ArgumentParser) -> None:
    """--types, --bootstrap, --seed (shared with text-structure)."""
    p.add_argument("--types", type=types_arg, default=PERTURBATION_TYPES,
                   help="comma-separated perturbation types (default: the nine)")
    p.add_argument("--bootstrap", type=non_negative, default=1000,
                   help="bootstrap resamples for the 95%% CIs, 0 to skip (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def run(encoder: Encoder, data: Iterable[Any], options: argparse.Namespace, score: str = "global") -> StructureResult:
    """`pertvl eval structure` (and `structure-local`, score "local"): `evaluate_structure` over the
    shard samples; for a held-out split, with the text-disjoint subset against the same shards'
    training split (counts printed)."""
    train = None
    shards, split = getattr(options, "shards", None), getattr(options, "split", None)
    if shards and split and split != "train":
        try:
            train = split_texts(shards, "train")
        except FileNotFoundError as e:  # the samples came from elsewhere: nothing to compare with
            print(f"text-disjoint subset not measured: {e}")
    r = evaluate_structure(encoder, data, types=options.types, bootstrap=options.bootstrap, seed=options.seed,
                           batch_size=options.batch_size, train_texts=train, score=score)
    if r.text_disjoint is not None:
        td = r.text_disjoint
        print(f"text-disjoint subset: {td.describe()}; structure accuracy there {pct(td.overall.accuracy)} "
              f"(all: {pct(r.overall.accuracy)})")
    if r.grounded is not None:
        print(grounded_text(r.grounded) + f"; {r.grounded.samples_without_record} image(s) without a "
              "counterfactual record")
    return r


EVALUATION = Evaluation(
    name="structure",
    help="zero-shot clinical semantic structure (Table IV): original report vs its perturbations",
    description="For each image, score its report and the report's valid perturbations by "
    "cosine(image, text); accuracy overall and per perturbation type with bootstrap CIs. "
    "Writes NAME.json, NAME.md and NAME.png.",
    add_arguments=add_structure_arguments,
    run=run,
    result_type=StructureResult,
    schemas=(SCHEMA, "pertvl-structure/2"),
    title="Clinical semantic structure (Table IV)",
    suites=frozenset({Suite.DEMO, Suite.ABLATE}),
)
