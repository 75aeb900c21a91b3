"""Zero-shot clinical semantic structure (the paper's Table IV, §IV-C-3).

Each image's candidates are its report and the report's valid perturbations, scored by
S(I, T) = cos(e_I, e_T) (or GLoRIA's local S, `score="local"`). Overall accuracy: the original
strictly above every valid perturbation (chance 1/(1 + K_i)); per type: original vs that type
(chance 0.5). A candidate within TIE_TOLERANCE of the original beats it, so an encoder blind to
the difference scores 0, never a lucky 50 %. Perturbations that are unavailable, missing or
word-identical to the original are excluded and counted. CIs: percentile bootstrap over images,
each metric from its own default_rng(seed). Each distinct text is embedded once.

Controls (wrong image, mean image, text-only anchor), the image-grounding margin, the grounded
test on counterfactual reports and the text-disjoint subset: docs/GROUNDING.md. Results, JSON,
Markdown and figure: pertvl.evaluate.structure_result.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.text import clean_text
from pertvl.evaluate.encoder import (
    Encoder,
    ImageBatcher,
    embed_texts_unique,
    l2_normalize,
    with_text,
    word_features_unique,
)
from pertvl.evaluate.evaluation import Evaluation, Suite, add_bootstrap_arguments
from pertvl.evaluate.report import pct
from pertvl.evaluate.structure_result import (
    SCHEMA,
    TIE_TOLERANCE,
    AccuracyStat,
    AnchorControl,
    Controls,
    GroundedReferences,
    GroundedStructure,
    MarginStat,
    Reference,
    StructureResult,
    StructureScores,
    TextDisjoint,
    grounded_text,
)

NULL_DRAWS = 200  # random-anchor draws of the grounded test's empirical null
SCORES = ("global", "local")  # S(I, T): cosine of global embeddings (the paper's) | GLoRIA's local score
CONFIDENCE = 0.95


def scores_from_cosines(orig: np.ndarray, pert: np.ndarray, valid: np.ndarray) -> StructureScores:
    """StructureScores from precomputed cosines: orig [N], pert [N, K], valid [N, K] bool."""
    orig = np.asarray(orig, dtype=np.float64)
    pert = np.where(valid, np.asarray(pert, dtype=np.float64), np.nan)
    # Strictly above, by more than the tolerance: ties go against the original.
    wins = orig[:, None] - np.nan_to_num(pert, nan=-np.inf) > TIE_TOLERANCE
    pairwise = wins & valid
    correct = valid.any(axis=1) & np.all(wins | ~valid, axis=1)
    return StructureScores(orig=orig, pert=pert, valid=valid.copy(), correct=correct, pairwise=pairwise,
                           num_candidates=1 + valid.sum(axis=1))


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float] | None:
    """Percentile bootstrap 95 % CI of the mean of `values`; None for fewer than 2 values or 0 resamples."""
    values = np.asarray(values, dtype=np.float64)
    if resamples <= 0 or values.size < 2:
        return None
    from scipy.stats import bootstrap

    res = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                    method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class CandidateCounts:
    excluded_identical: Counter = field(default_factory=Counter)
    unavailable: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)


def valid_perturbations(
    text: str, perturbations: Mapping[str, Any] | None, unavailable: Mapping[str, Any] | None,
    types: Sequence[str], counts: CandidateCounts) -> list[str | None]:
    """The candidate text of each type for one report, None where it is invalid (counted in `counts`:
    word-identical to the original, listed as unavailable, or missing from both maps)."""
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
    """The perturbation types to score, in the order asked (the table's columns); ValueError for an
    unknown or repeated type."""
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
    """GLoRIA's local S(I, T) (pertvl.infer.local_scores) of region features [N, M, D] against the texts'
    word features."""

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


def anchors_and_scorer(encoder: Any, batcher: ImageBatcher, texts: list[str], local: bool, batch_size: int
                       ) -> tuple[np.ndarray, dict[str, int], np.ndarray | None, GlobalScorer | LocalScorer]:
    """(anchors, text index, text embeddings, scorer) of the batcher's images and `texts`: the global
    embeddings and cosine, or (`local`) the region and word features and the local S (no text embeddings)."""
    image_emb = batcher.finish()
    if local:
        index, words, word_mask = word_features_unique(encoder, texts, batch_size)
        return batcher.regions(), index, None, LocalScorer(words, word_mask)
    index, text_emb = embed_texts_unique(encoder, texts, batch_size)
    return image_emb, index, text_emb, GlobalScorer(text_emb)


def candidate_scores(
    anchors: np.ndarray, text_index: dict[str, int], scorer: GlobalScorer | LocalScorer,
    originals: Sequence[str], candidates: Sequence[Sequence[str | None]], num_types: int) -> StructureScores:
    """StructureScores of anchors (one per original) against their candidates (N rows of K texts, None
    where invalid) by `scorer(prepared anchors[rows], text rows) -> [rows] scores`."""
    n, k = len(originals), num_types
    if n == 0:
        empty = np.zeros((0, k))
        return scores_from_cosines(np.zeros(0), empty, empty.astype(bool))
    anchors = scorer.prepare(anchors)
    orig = scorer(anchors, np.array([text_index[t] for t in originals], dtype=np.int64))
    valid = np.array([[c is not None for c in row] for row in candidates], dtype=bool).reshape(n, k)
    pert = np.full((n, k), np.nan)
    for j in range(k):
        rows = np.flatnonzero(valid[:, j])
        if rows.size:
            idx = np.array([text_index[candidates[i][j]] for i in rows], dtype=np.int64)
            pert[rows, j] = scorer(anchors[rows], idx)
    return scores_from_cosines(orig, pert, valid)


def _mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else None


def accuracy_stats(scores: StructureScores, types: Sequence[str], counts: CandidateCounts, bootstrap: int,
                   seed: int, rows: np.ndarray | None = None) -> tuple[AccuracyStat, dict[str, AccuracyStat]]:
    """Overall and per-type AccuracyStats of `scores` (restricted to the bool [N] `rows` if given),
    with bootstrap CIs and the mean cosines of originals and negatives."""
    keep = np.ones(len(scores.orig), bool) if rows is None else np.asarray(rows, bool)
    has = scores.has_candidates & keep
    n_all = int(has.sum())
    overall_values = scores.correct[has].astype(np.float64)
    overall = AccuracyStat(accuracy=float(overall_values.mean()) if n_all else None,
                           ci95=bootstrap_ci(overall_values, bootstrap, seed), n=n_all,
                           correct=int(overall_values.sum()),
                           chance=float(np.mean(1.0 / scores.num_candidates[has])) if n_all else None,
                           mean_candidates=float(np.mean(scores.num_candidates[has])) if n_all else None,
                           excluded_identical=sum(counts.excluded_identical.values()),
                           unavailable=sum(counts.unavailable.values()), missing=sum(counts.missing.values()),
                           cos_original=_mean(scores.orig[has]),
                           cos_perturbed=_mean(scores.pert[has][scores.valid[has]]))
    per_type: dict[str, AccuracyStat] = {}
    for j, t in enumerate(types):
        v = scores.valid[:, j] & keep
        values = scores.pairwise[v, j].astype(np.float64)
        n = int(v.sum())
        per_type[t] = AccuracyStat(accuracy=float(values.mean()) if n else None,
                                   ci95=bootstrap_ci(values, bootstrap, seed), n=n, correct=int(values.sum()),
                                   chance=0.5 if n else None, mean_candidates=2.0 if n else None,
                                   excluded_identical=counts.excluded_identical[t],
                                   unavailable=counts.unavailable[t], missing=counts.missing[t],
                                   cos_original=_mean(scores.orig[v]), cos_perturbed=_mean(scores.pert[v, j]))
    return overall, per_type


def summarize(
    scores: StructureScores, types: Sequence[str], counts: CandidateCounts, *, skipped: Mapping[str, int],
    bootstrap: int, seed: int, schema: str = SCHEMA, info: Mapping[str, Any] | None = None) -> StructureResult:
    """Turn per-image scores into overall and per-type accuracies with bootstrap CIs."""
    overall, per_type = accuracy_stats(scores, types, counts, bootstrap, seed)
    return StructureResult(
        overall=overall, per_type=per_type, images=len(scores.orig),
        images_without_valid_perturbation=int((~scores.has_candidates).sum()), skipped=dict(skipped),
        bootstrap={"resamples": bootstrap, "seed": seed, "confidence": CONFIDENCE, "method": "percentile"},
        info=dict(info or {}), schema=schema, scores=scores)


def finding_signature(meta: Mapping[str, Any]) -> frozenset[str] | None:
    """What "the findings differ" compares: the set of positive (1.0) labels of a sample's json;
    None when it has no labels (Open-I: its findings are unknown)."""
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        return None
    return frozenset(k for k, v in labels.items() if v == 1.0)


def wrong_image_partners(signatures: Sequence[frozenset[str] | None], studies: Sequence[str], seed: int,
                         disjoint: bool = False) -> np.ndarray:
    """A seeded derangement: for each image the image whose anchor replaces its own, -1 if none.

    A partner is another study's image whose known positive labels differ (`disjoint`: share none).
    A random cycle through all images, rule-breaking pairs repaired by swaps; what no swap repairs
    is left unpaired."""
    n = len(studies)
    partner = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return partner

    def ok(a: int, b: int) -> bool:
        if a == b or studies[a] == studies[b]:
            return False
        sa, sb = signatures[a], signatures[b]
        return sa is None or sb is None or (not sa & sb if disjoint else sa != sb)

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


def pairing_rule(signatures: Sequence[frozenset[str] | None], disjoint: bool = False) -> str:
    known = sum(s is not None for s in signatures)
    if known == len(signatures):
        return ("another study's image with no positive label in common" if disjoint
                else "another study's image whose positive labels differ")
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
    anchors: np.ndarray, own: StructureScores, text_index: dict[str, int], scorer: GlobalScorer | LocalScorer,
    originals: Sequence[str], candidates: Sequence[Sequence[str | None]], types: Sequence[str],
    counts: CandidateCounts, signatures: Sequence[frozenset[str] | None], studies: Sequence[str], *,
    bootstrap: int, seed: int, disjoint_partners: bool = False) -> Controls:
    """The control anchors and the image-grounding margin. `anchors` are the scorer's (region features
    for a LocalScorer, which has no text-only anchor)."""
    n, k = len(originals), len(types)
    partner = wrong_image_partners(signatures, studies, seed, disjoint_partners)
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
        sc = scores[name] = candidate_scores(anchor, text_index, scorer, originals, candidates, k)
        overall, per_type = accuracy_stats(sc, types, counts, bootstrap, seed, rows)
        left_out = 0 if rows is None else int((~rows & sc.has_candidates).sum())
        controls[name] = AnchorControl(overall, per_type, left_out)
    wrong = scores["wrong_image"]
    both = paired & own.has_candidates
    margin = _margin(own.correct, wrong.correct, both, bootstrap, seed)
    per_type = {t: _margin(own.pairwise[:, j], wrong.pairwise[:, j], paired & own.valid[:, j], bootstrap, seed)
                for j, t in enumerate(types)}
    pairing = {"rule": pairing_rule(signatures, disjoint_partners), "seed": seed, "paired": int(paired.sum()),
               "unpaired": int((~paired).sum())}
    return Controls(text_only=controls["text_only"], wrong_image=controls["wrong_image"],
                    mean_image=controls["mean_image"], margin=margin, margin_per_type=per_type, pairing=pairing)


def evaluate_structure(encoder: Encoder, samples: Iterable[Any], types: Sequence[str] = PERTURBATION_TYPES,
                       bootstrap: int = 1000, seed: int = 0, batch_size: int = 32,
                       train_texts: Iterable[str] | None = None, score: str = "global",
                       train_counterfactuals: Sequence[tuple[str, Sequence[str]]] | None = None) -> StructureResult:
    """The image→report structure evaluation over shard samples (`.key`, `.image`, `.meta`).

    `train_texts` (the training split's reports) adds the text-disjoint subset; `train_counterfactuals`
    [(report, its counterfactuals)] adds the text-prior reference of the grounded test; `score` is
    "global" or "local" (region and word features; no text-only control). Returns a StructureResult
    ("pertvl-structure/3"; `grounded` when the samples carry `counterfactuals`)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    local = score == "local"
    types = requested_types(types)
    counts = CandidateCounts()
    skipped: Counter = Counter()
    batcher = ImageBatcher(encoder, batch_size, regions=local)
    originals: list[str] = []
    candidates: list[list[str | None]] = []
    signatures: list[frozenset[str] | None] = []
    studies: list[str] = []
    cf_types = tuple(COUNTERFACTUAL_TYPES)
    cf_counts = CandidateCounts()
    cf_candidates: list[list[str | None]] = []
    has_cf: list[bool] = []
    for sample, text in with_text(samples, skipped):
        meta = sample.meta
        batcher.add(sample)
        originals.append(text)
        candidates.append(valid_perturbations(text, meta.get("perturbations"), meta.get("unavailable"), types, counts))
        signatures.append(finding_signature(meta))
        studies.append(str(meta.get("study_id", meta.get("id", getattr(sample, "key", len(studies))))))
        has_cf.append(isinstance(meta.get("counterfactuals"), Mapping))
        cf_candidates.append(valid_perturbations(text, meta.get("counterfactuals"), meta.get("cf_unavailable"),
                                                 cf_types, cf_counts) if has_cf[-1] else [None] * len(cf_types))
    all_texts = originals + [c for row in candidates for c in row if c is not None]
    cf_texts = [c for row in cf_candidates for c in row if c is not None]
    anchors, index, text_emb, scorer = anchors_and_scorer(encoder, batcher, all_texts + cf_texts if local
                                                          else all_texts, local, batch_size)
    scores = candidate_scores(anchors, index, scorer, originals, candidates, len(types))
    controls = None
    if originals:
        controls = structure_controls(anchors, scores, index, scorer, originals, candidates, types, counts,
                                      signatures, studies, bootstrap=bootstrap, seed=seed)
    grounded = grounded_scores = None
    if any(has_cf):
        # The counterfactual texts are embedded in calls of their own, after the others, so the
        # embeddings (and numbers) of the perturbation test are those of a split without them.
        if text_emb is not None:
            index, text_emb = embed_after(encoder, index, text_emb, cf_texts, batch_size)
            scorer = GlobalScorer(text_emb)
        grounded, grounded_scores = grounded_structure(
            anchors, index, scorer, originals, cf_candidates, cf_types, cf_counts, np.array(has_cf), signatures,
            studies, bootstrap=bootstrap, seed=seed, train_counterfactuals=train_counterfactuals)
    disjoint = None
    if train_texts is not None:
        disjoint = text_disjoint_stats(originals, set(map(clean_text, train_texts)) - {""}, scores, types, counts,
                                       grounded_scores, cf_types, cf_counts, bootstrap=bootstrap, seed=seed)
    result = summarize(scores, types, counts, skipped=skipped, bootstrap=bootstrap, seed=seed)
    result.controls, result.grounded, result.text_disjoint, result.score = controls, grounded, disjoint, score
    return result


def embed_after(encoder: Encoder, index: dict[str, int], text_emb: np.ndarray, texts: Iterable[str],
                batch_size: int) -> tuple[dict[str, int], np.ndarray]:
    """`index` and `text_emb` extended by the `texts` not yet in `index`, embedded in calls of their own."""
    extra = [t for t in texts if t not in index]
    if not extra:
        return index, text_emb
    more_index, more = embed_texts_unique(encoder, extra, batch_size)
    return ({**index, **{t: len(text_emb) + i for t, i in more_index.items()}},
            np.concatenate([text_emb, more.astype(text_emb.dtype)], axis=0))


def grounded_structure(
    image_emb: np.ndarray, text_index: dict[str, int], scorer: GlobalScorer | LocalScorer, originals: Sequence[str],
    cf_candidates: Sequence[Sequence[str | None]], cf_types: Sequence[str], cf_counts: CandidateCounts,
    has_record: np.ndarray, signatures: Sequence[frozenset[str] | None], studies: Sequence[str], *,
    bootstrap: int, seed: int, train_counterfactuals: Sequence[tuple[str, Sequence[str]]] | None,
) -> tuple[GroundedStructure, StructureScores]:
    """The structure test with the counterfactuals as candidates, its controls, margin and references.
    Images without a counterfactual record take part in nothing and are counted; wrong-image partners
    share no positive label with the image."""
    k = len(cf_types)
    scores = candidate_scores(image_emb, text_index, scorer, originals, cf_candidates, k)
    overall, per_type = accuracy_stats(scores, cf_types, cf_counts, bootstrap, seed)
    controls = structure_controls(image_emb, scores, text_index, scorer, originals, cf_candidates, cf_types,
                                  cf_counts, signatures, studies, bootstrap=bootstrap, seed=seed,
                                  disjoint_partners=True) if len(originals) else None
    has_record = np.asarray(has_record, bool)
    references = grounded_references(image_emb, text_index, scorer, originals, cf_candidates, cf_types, seed,
                                     train_counterfactuals) if len(originals) else None
    g = GroundedStructure(overall, per_type, controls, images=int(has_record.sum()),
                          images_without_valid_counterfactual=int((has_record & ~scores.has_candidates).sum()),
                          samples_without_record=int((~has_record).sum()), references=references)
    return g, scores


def grounded_references(anchors: np.ndarray, text_index: dict[str, int], scorer: GlobalScorer | LocalScorer,
                        originals: Sequence[str], cf_candidates: Sequence[Sequence[str | None]],
                        cf_types: Sequence[str], seed: int,
                        train_counterfactuals: Sequence[tuple[str, Sequence[str]]] | None) -> GroundedReferences:
    """The grounded accuracies' references (GroundedReferences) on the same candidates."""
    k = len(cf_types)
    draws = NULL_DRAWS if scorer.score == "global" else NULL_DRAWS // 4  # the local score costs more per draw
    def score(a: np.ndarray) -> StructureScores:
        return candidate_scores(a, text_index, scorer, originals, cf_candidates, k)

    null = random_anchor_null(anchors, score, cf_types, draws, seed)
    prior = None
    if train_counterfactuals:
        texts = sorted(text_index, key=text_index.__getitem__)
        values = text_prior_values(train_counterfactuals, texts)
        sc = candidate_scores(anchors, text_index, TextPriorScorer(values), originals, cf_candidates, k)
        overall, per = accuracies(sc, cf_types)
        prior = Reference(overall, per, detail=f"word 1-3-gram logistic regression, no image, trained on "
                          f"{len(train_counterfactuals)} training reports vs their counterfactuals")
    return GroundedReferences(null, prior)


def text_disjoint_stats(originals: Sequence[str], train_texts: set[str], scores: StructureScores,
                        types: Sequence[str], counts: CandidateCounts,
                        grounded_scores: StructureScores | None, cf_types: Sequence[str],
                        cf_counts: CandidateCounts, *, bootstrap: int, seed: int) -> TextDisjoint:
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


def accuracies(scores: StructureScores, types: Sequence[str]) -> tuple[float | None, dict[str, float | None]]:
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


def training_samples(options: argparse.Namespace, what: str) -> list[Mapping[str, Any]] | None:
    """The sample json of --shards' training split when a held-out split is evaluated (the data of the
    text-disjoint subset and the text prior); None otherwise, or when the shards have no training split."""
    from pertvl.data.shards import iter_samples
    from pertvl.data.shards.format import read_shards_manifest

    shards, split = getattr(options, "shards", None), getattr(options, "split", None)
    if not (shards and split and split != "train"):
        return None
    try:
        if "train" not in read_shards_manifest(shards).get("splits", {}):
            return None
        return [s.meta for s in iter_samples(shards, "train")]
    except FileNotFoundError as e:  # the samples came from elsewhere: nothing to compare with
        print(f"{what} not measured: {e}")
        return None


def types_arg(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated perturbation types."""
    from pertvl.data.perturb import PERTURBATIONS

    types = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t not in PERTURBATIONS]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"unknown type(s) {unknown}; choose from {', '.join(PERTURBATIONS)}")
    return types


def add_structure_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--types", type=types_arg, default=PERTURBATION_TYPES,
                   help="comma-separated perturbation types (default: the nine)")
    add_bootstrap_arguments(p)


def run(encoder: Encoder, data: Iterable[Any], options: argparse.Namespace, score: str = "global") -> StructureResult:
    """`pertvl eval structure` (and `structure-local`): `evaluate_structure` over the shard samples; for
    a held-out split with the text-disjoint subset and text prior from the same shards' training split."""
    metas = training_samples(options, "text-disjoint subset and text prior")
    train = None if metas is None else [m.get("text") or "" for m in metas]
    cfs = [(m.get("text") or "", list((m.get("counterfactuals") or {}).values())) for m in metas or []]
    train_cf = cfs if any(c for _, c in cfs) else None
    r = evaluate_structure(encoder, data, types=options.types, bootstrap=options.bootstrap, seed=options.seed,
                           batch_size=options.batch_size, train_texts=train, score=score,
                           train_counterfactuals=train_cf)
    if r.text_disjoint is not None:
        td = r.text_disjoint
        print(f"text-disjoint subset: {td.describe()}; structure accuracy there {pct(td.overall.accuracy)} "
              f"(all: {pct(r.overall.accuracy)})")
    if r.grounded is not None:
        print(grounded_text(r.grounded) + f"; {r.grounded.samples_without_record} image(s) without a "
              "counterfactual record")
    return r


EVALUATION = Evaluation(
    name="structure", help="zero-shot clinical semantic structure (Table IV): original report vs its perturbations",
    description="How often cosine(image, report) ranks the report above its perturbations, overall and per "
    "type with bootstrap CIs; writes NAME.json, NAME.md and NAME.png.",
    add_arguments=add_structure_arguments, run=run, result_type=StructureResult, schemas=(SCHEMA,),
    title="Clinical semantic structure (Table IV)", suites=frozenset({Suite.DEMO, Suite.ABLATE}))

# The same test scored by GLoRIA's local S(I, T) on region and word features (a pooled embedding may lose
# where a finding is): same candidates, controls (no text-only anchor) and schema; metrics structure_local/*.
LOCAL_EVALUATION = dataclasses.replace(
    EVALUATION, name="structure-local", key="",
    help="the structure test (Table IV) scored by the local branch's S(I, T) instead of the global cosine",
    description="As `pertvl eval structure`, scored by GLoRIA's local image-report similarity (needs --export "
    "or --run).", run=functools.partial(run, score="local"), title="Clinical semantic structure, local score S(I, T)")
