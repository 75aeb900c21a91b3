"""Statistics shared by the evaluations and the fine-tuning metrics (numpy/scipy only, no torch)."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """AUROC of scores [N] for 0/1 targets [N] as the Mann–Whitney U statistic, ties given half credit;
    None when only one class is present (sklearn raises instead)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 1:
        raise ValueError(f"expected scores and targets of the same shape [N], got {scores.shape} and {targets.shape}")
    pos = targets == 1
    if not np.all(pos | (targets == 0)):
        raise ValueError(f"targets must be 0 or 1, got {sorted(set(targets[~(pos | (targets == 0))].tolist()))[:5]}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks: a tie between a positive and a negative counts 1/2
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
