"""Metrics of the fine-tunes: per-class precision/recall/F1 and confusion (NLI), per-label AUROC and accuracy (CheXpert)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pertvl.evaluate.finetune.tasks import BLANK_POLICIES, NLI_LABELS
from pertvl.evaluate.stats import auroc

log = logging.getLogger(__name__)


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    """Single-label scores from one confusion matrix (rows = true, columns = predicted); an undefined
    precision/recall/F1 is 0.0 (scikit-learn's zero_division=0)."""

    n: int
    accuracy: float
    per_class: dict[str, ClassScores]
    macro_f1: float
    labels: list[str]
    confusion: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClassificationMetrics:
        return cls(n=int(d["n"]), accuracy=float(d["accuracy"]),
                   per_class={k: ClassScores(**v) for k, v in d["per_class"].items()},
                   macro_f1=float(d["macro_f1"]), labels=list(d["labels"]), confusion=[list(r) for r in d["confusion"]])


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           labels: Sequence[str] = NLI_LABELS) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1/support and macro F1 (checked against sklearn's
    classification_report in the tests)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"expected y_true and y_pred of one shape [N], got {y_true.shape} and {y_pred.shape}")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k):
        raise ValueError(f"class indices must be in [0, {k})")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(y_true.size)
    return ClassificationMetrics(
        n=n, accuracy=float(tp.sum() / n) if n else 0.0,
        per_class={lab: ClassScores(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
                   for i, lab in enumerate(labels)},
        macro_f1=float(f1.mean()), labels=list(labels), confusion=cm.tolist())


@dataclass
class LabelScores:
    """Test scores of one CheXpert label over its definite (0/1) cells."""

    auroc: float | None  # None when only one class is present
    accuracy: float | None  # threshold 0.5 on the predicted probability
    n: int
    n_pos: int
    n_neg: int
    excluded_uncertain: int
    excluded_blank: int
    blank_negatives: int = 0  # blank cells scored as negatives (blank policy "zero")


def multilabel_scores(probs: np.ndarray, values: np.ndarray, labels: Sequence[str],
                      blank: str = "zero") -> dict[str, LabelScores]:
    """AUROC and accuracy per label of probs [N, L] against test values [N, L] (1, 0, -1 uncertain, nan
    blank): 1/0 scored, blanks as negatives under blank "zero" (excluded under "mask"), uncertain never."""
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy: expected one of {BLANK_POLICIES}, got {blank!r}")
    out = {}
    for j, name in enumerate(labels):
        v, p = values[:, j], probs[:, j]
        is_blank = np.isnan(v)
        scored = (v == 1.0) | (v == 0.0) | (is_blank if blank == "zero" else False)
        y = (v[scored] == 1.0).astype(np.int64)
        out[name] = LabelScores(
            auroc=auroc(p[scored], y) if scored.any() else None,
            accuracy=float(((p[scored] >= 0.5) == (y == 1)).mean()) if scored.any() else None,
            n=int(scored.sum()), n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()),
            excluded_uncertain=int((v == -1.0).sum()),
            excluded_blank=int(is_blank.sum()) if blank == "mask" else 0,
            blank_negatives=int(is_blank.sum()) if blank == "zero" else 0)
    return out


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def format_number(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"
