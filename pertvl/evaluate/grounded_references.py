"""The references a grounded structure accuracy is read against (in place of the 1/(1+k) chance that
assumes exchangeable candidates): the empirical null (the same candidates scored from random
anchors, mean and 2.5-97.5 % range) and the text prior (a word 1-3-gram logistic regression of
originals vs counterfactuals on the training split, scoring each candidate by its text alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NULL_DRAWS = 200


@dataclass
class Reference:
    overall: float | None
    per_type: dict[str, float | None]
    overall_range: list[float] | None = None
    per_type_range: dict[str, list[float] | None] | None = None
    detail: str = ""


@dataclass
class GroundedReferences:
    """The empirical null and (when the training split has counterfactuals) the text-prior baseline."""

    null_random_anchors: Reference
    text_prior: Reference | None


def accuracies(scores: Any, types: Sequence[str]) -> tuple[float | None, dict[str, float | None]]:
    """Overall (original above all its valid candidates) and per-type pairwise accuracy of StructureScores."""
    has = scores.has_candidates
    overall = float(scores.correct[has].mean()) if has.any() else None
    per = {t: (float(scores.pairwise[scores.valid[:, j], j].mean()) if scores.valid[:, j].any() else None)
           for j, t in enumerate(types)}
    return overall, per


def random_anchor_null(anchors: np.ndarray, score_fn: Any, types: Sequence[str], draws: int = NULL_DRAWS,
                       seed: int = 0) -> Reference:
    """`score_fn(anchors) -> StructureScores` on `draws` sets of random anchors shaped like `anchors`."""
    rng = np.random.default_rng(seed)
    runs = [accuracies(score_fn(rng.standard_normal(np.shape(anchors))), types) for _ in range(draws)]

    def summary(values: list[float | None]) -> tuple[float | None, list[float] | None]:
        v = np.array([x for x in values if x is not None], dtype=np.float64)
        if not v.size:
            return None, None
        return float(v.mean()), [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]

    overall, overall_range = summary([r[0] for r in runs])
    per = {t: summary([r[1][t] for r in runs]) for t in types}
    return Reference(overall, {t: p[0] for t, p in per.items()}, overall_range, {t: p[1] for t, p in per.items()},
                     f"random anchor directions, {draws} draws (seed {seed}); range: 2.5-97.5 % of the draws")


class TextPriorScorer:
    """A scorer that ignores the anchor: s(I, T) = the text prior's score of T (a candidate_scores scorer)."""

    score = "text_prior"

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    def prepare(self, anchors: np.ndarray) -> np.ndarray:
        return np.asarray(anchors)

    def __call__(self, anchors: np.ndarray, text_rows: np.ndarray) -> np.ndarray:
        return self.values[np.asarray(text_rows, dtype=np.int64)]


def text_prior_values(train: Sequence[tuple[str, Sequence[str]]], texts: Sequence[str]) -> np.ndarray:
    """log-odds "this is an original, not a counterfactual" of each of `texts`, by word 1-3-gram
    logistic regression trained on `train` = [(original, its counterfactuals)] (cleaned texts)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    docs = [t for orig, cfs in train for t in (orig, *cfs)]
    labels = [y for orig, cfs in train for y in (1, *[0] * len(cfs))]
    vec = CountVectorizer(ngram_range=(1, 3), token_pattern=r"(?u)\b\w+\b")
    clf = LogisticRegression(max_iter=5000).fit(vec.fit_transform(docs), labels)
    return clf.decision_function(vec.transform(list(texts)))


def references_markdown(overall: Any, per_type: Mapping[str, Any], refs: GroundedReferences) -> str:
    """The model's grounded accuracies beside the empirical null (with its range) and the text prior."""
    from pertvl.evaluate.report import ci, md_table, pct

    tp = refs.text_prior
    rows = [["**overall**", pct(overall.accuracy), pct(refs.null_random_anchors.overall), ci(refs.null_random_anchors.overall_range),
             pct(tp.overall) if tp else "—"]]
    for t, st in per_type.items():
        rng = (refs.null_random_anchors.per_type_range or {}).get(t)
        rows.append([t, pct(st.accuracy), pct(refs.null_random_anchors.per_type.get(t)), ci(rng),
                     pct(tp.per_type.get(t)) if tp else "—"])
    return "\n".join([
        "### Grounded structure against its references", "",
        md_table(["", "model", "empirical null", "null 95% range", "text prior (no image)"], rows),
        f"Empirical null: {refs.null_random_anchors.detail}. Text prior: "
        + (tp.detail if tp else "not measured (no training split with counterfactuals)") + ".",
    ])
