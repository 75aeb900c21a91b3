"""Evaluation core: structure (Table IV), retrieval, zero-shot, text-structure, report writers, CLI.

Everything runs on hand-built embeddings and stand-in encoders whose answers are known.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pertvl.data.records import PERTURBATION_TYPES
from pertvl.evaluate.comparison import write_comparison_table
from pertvl.evaluate.encoder import Encoder, TextEncoder, l2_normalize
from pertvl.evaluate.report import plot_training_curves, save_attention_map, write_result
from pertvl.evaluate.retrieval import RetrievalResult, evaluate_retrieval, retrieval_recall
from pertvl.evaluate.structure import bootstrap_ci, evaluate_structure, scores_from_cosines
from pertvl.evaluate.structure_result import StructureResult, StructureScores
from pertvl.evaluate.text_structure import evaluate_text_structure, read_report_sections
from pertvl.evaluate.zeroshot import ZeroShotResult, auroc, evaluate_zeroshot

# ----------------------------------------------------------------------------- stand-ins


@dataclass
class Sample:
    key: str
    image: np.ndarray
    meta: dict


def make_sample(i: int, text: str, perturbations=None, unavailable=None, study=None, labels=None) -> Sample:
    """Image i is a flat image of value i, so a lookup encoder can tell images apart."""
    meta = {"id": f"img{i}", "study_id": study or f"s{i}", "projection": "Frontal", "split": "test",
            "labels": labels, "text": text, "perturbations": perturbations or {}, "unavailable": unavailable or {}}
    return Sample(f"img{i}", np.full((8, 8), i, dtype=np.uint8), meta)


@dataclass
class LookupEncoder:
    """Image i (pixel value i) → image_vecs[i]; text → text_vecs[text]; records every call."""

    image_vecs: dict[int, np.ndarray]
    text_vecs: dict[str, np.ndarray]
    default_text: np.ndarray | None = None
    texts_seen: list[str] = field(default_factory=list)
    image_calls: list[int] = field(default_factory=list)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.float32 and images.ndim == 4 and images.shape[1] == 1
        assert 0.0 <= images.min() and images.max() <= 1.0
        self.image_calls.append(len(images))
        ids = np.rint(images[:, 0, 0, 0] * 255).astype(int)
        return np.stack([self.image_vecs[i] for i in ids]).astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.texts_seen.extend(texts)
        return np.stack([self.text_vecs.get(t, self.default_text) for t in texts]).astype(np.float32)


def unit_at_cosine(c: float) -> np.ndarray:
    """A unit vector whose cosine with [1, 0, 0] is c."""
    return np.array([c, math.sqrt(1 - c * c), 0.0])


class HashedNgramEncoder:
    """Counts of hashed word n-grams (n = 1: bag of words, blind to order; n = 2: bigrams)."""

    def __init__(self, n: int, dim: int = 1 << 16):
        self.n, self.dim = n, dim

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            w = t.split()
            for j in range(len(w) - self.n + 1):
                out[i, zlib.crc32(" ".join(w[j : j + self.n]).encode()) % self.dim] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


# ----------------------------------------------------------------------------- structure

T3 = ("shuffle_all", "reverse", "antonym_adjectives")


def hand_built_structure_case():
    """5 scored images with known answers, one with no valid perturbation, one with no text.

    cosine(image, text) per image (o = original; S = shuffle_all, R = reverse, A = antonym):
      img0: o .9  S .5  R .6  A .8                      → correct; S✓ R✓ A✓
      img1: o .7  S .8  R .2  A .1                      → wrong;   S✗ R✓ A✓
      img2: o .6  S .3  R unavailable, A = original text (file says valid: must be excluded,
            else its tie would make img2 wrong)         → correct; S✓
      img3: o .5  S .5 (exact tie)  R .4  A .95          → wrong;   S✗ R✓ A✗
      img4: o .8  S .7  R .75  A in neither map (malformed) → correct; S✓ R✓
      img5: every type unavailable → not in the overall accuracy
      img6: empty report → skipped
    Overall 3/5; S 3/5; R 4/4; A 2/3.
    """
    cos = {0: (0.9, 0.5, 0.6, 0.8), 1: (0.7, 0.8, 0.2, 0.1), 2: (0.6, 0.3, None, None),
           3: (0.5, 0.5, 0.4, 0.95), 4: (0.8, 0.7, 0.75, None)}
    words = ["lungs", "are", "clear", "no", "effusion", "seen"]
    samples, text_vecs = [], {}
    for i, (o, s, r, a) in cos.items():
        orig = " ".join([f"case{i}", *words[i:], *words[:i]])
        text_vecs[orig] = unit_at_cosine(o)
        pert, unav = {}, {}
        for t, c, text in ((T3[0], s, " ".join(sorted(orig.split()))), (T3[1], r, " ".join(orig.split()[::-1])),
                           (T3[2], a, orig.replace("clear", "unclear"))):
            if c is not None:
                pert[t] = text
                text_vecs[text] = unit_at_cosine(c)
        if i == 2:
            unav["reverse"] = "one noun"
            pert["antonym_adjectives"] = orig  # identical to the original
        samples.append(make_sample(i, orig, pert, unav))
    samples.append(make_sample(5, "heart normal size", {}, {t: "no adjective" for t in T3}))
    text_vecs["heart normal size"] = unit_at_cosine(0.9)
    samples.append(make_sample(6, "", {}, {}))
    encoder = LookupEncoder({i: np.array([1.0, 0.0, 0.0]) for i in range(7)}, text_vecs)
    return encoder, samples


def test_stand_ins_satisfy_the_protocols():
    enc, _ = hand_built_structure_case()
    assert isinstance(enc, Encoder) and isinstance(HashedNgramEncoder(1), TextEncoder)
    assert not isinstance(HashedNgramEncoder(1), Encoder)


def test_structure_hand_built_case():
    enc, samples = hand_built_structure_case()
    r = evaluate_structure(enc, samples, types=T3, bootstrap=200, seed=3, batch_size=2)
    o = r.overall
    assert (o.correct, o.n, o.accuracy) == (3, 5, 0.6)
    assert o.chance == pytest.approx((1 / 4 + 1 / 4 + 1 / 2 + 1 / 4 + 1 / 3) / 5)
    assert o.mean_candidates == pytest.approx((4 + 4 + 2 + 4 + 3) / 5)
    s, rv, a = (r.per_type[t] for t in T3)
    assert (s.correct, s.n, s.accuracy, s.chance) == (3, 5, 0.6, 0.5)
    assert (rv.correct, rv.n, rv.accuracy) == (4, 4, 1.0)
    assert (a.correct, a.n) == (2, 3) and a.accuracy == pytest.approx(2 / 3)
    # Exclusions are counted where they happened, and never scored.
    assert (a.excluded_identical, a.unavailable, a.missing) == (1, 1, 1)
    assert (rv.unavailable, s.unavailable, s.excluded_identical) == (2, 1, 0)
    assert (o.excluded_identical, o.unavailable, o.missing) == (1, 4, 1)
    assert (r.images, r.images_without_valid_perturbation, r.skipped) == (6, 1, {"empty_text": 1})
    # Every distinct text embedded exactly once; images streamed in batches of 2.
    assert len(enc.texts_seen) == len(set(enc.texts_seen)) == 6 + 3 + 3 + 1 + 3 + 2
    assert enc.image_calls == [2, 2, 2]
    # CI: contains the estimate, inside [0, 1], degenerate when every image is right.
    for stat in (o, s, a):
        assert 0 <= stat.ci95[0] <= stat.accuracy <= stat.ci95[1] <= 1
    assert rv.ci95 == (1.0, 1.0)
    assert s.ci95[0] < s.ci95[1]


def test_structure_bootstrap_is_deterministic_per_seed():
    enc, samples = hand_built_structure_case()
    a = evaluate_structure(enc, samples, types=T3, bootstrap=300, seed=7)
    b = evaluate_structure(enc, samples, types=T3, bootstrap=300, seed=7)
    c = evaluate_structure(enc, samples, types=T3, bootstrap=300, seed=8)
    assert a.to_json() == b.to_json()
    assert a.overall.accuracy == c.overall.accuracy
    # With 5 images the percentiles sit on a coarse grid; on 101 values the seed shows.
    values = (np.arange(101) % 3 == 0).astype(float)
    ci = bootstrap_ci(values, 500, seed=1)
    assert ci == bootstrap_ci(values, 500, seed=1) != bootstrap_ci(values, 500, seed=2)
    assert ci[0] < values.mean() < ci[1] and bootstrap_ci(values[:1], 500, seed=1) is None
    assert evaluate_structure(enc, samples, types=T3, bootstrap=0).overall.ci95 is None


# Scores of image embeddings against report and perturbation embeddings, as arrays (a reference
# for evaluate_structure's scoring).
def structure_scores(
    image_emb: np.ndarray,
    orig_emb: np.ndarray,
    pert_emb: np.ndarray,
    valid: np.ndarray,
) -> StructureScores:
    """Score each image's original report against its perturbations by cosine similarity.

    Args:
        image_emb: [N, D] image global embeddings (the anchors; any scale: normalized here).
        orig_emb: [N, D] global embeddings of each image's original report.
        pert_emb: [N, K, D] embeddings of the perturbations (anything where invalid).
        valid: [N, K] bool, which perturbations are candidates.

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
    return scores_from_cosines(orig, pert, valid)


def test_structure_scores_on_arrays_match_the_evaluation():
    # The same case as arrays: anchors all e0; text at cosine c is unit_at_cosine(c).
    table = [(0.9, 0.5, 0.6, 0.8), (0.7, 0.8, 0.2, 0.1), (0.6, 0.3, None, None), (0.5, 0.5, 0.4, 0.95),
             (0.8, 0.7, 0.75, None)]
    img = np.tile([1.0, 0.0, 0.0], (5, 1)) * 3.0  # any scale: cosine normalizes
    orig = np.stack([unit_at_cosine(row[0]) for row in table])
    pert = np.stack([[unit_at_cosine(c if c is not None else 0.0) for c in row[1:]] for row in table])
    valid = np.array([[c is not None for c in row[1:]] for row in table])
    sc = structure_scores(img, orig, pert, valid)
    assert sc.correct.tolist() == [True, False, True, False, True]
    assert sc.pairwise.tolist() == [[True, True, True], [False, True, True], [True, False, False],
                                    [False, True, False], [True, True, False]]
    assert sc.num_candidates.tolist() == [4, 4, 2, 4, 3]
    assert np.isnan(sc.pert[2, 1]) and sc.orig == pytest.approx([0.9, 0.7, 0.6, 0.5, 0.8])
    with pytest.raises(ValueError, match="pert_emb"):
        structure_scores(img, orig, pert[:, :, :2], valid)
    with pytest.raises(ValueError, match="valid"):
        structure_scores(img, orig, pert, valid.astype(int))


def test_structure_embeds_shared_reports_once_and_checks_images():
    text, pert = "small left effusion", {"reverse": "effusion left small"}
    enc = LookupEncoder({0: np.array([1.0, 0, 0]), 1: np.array([1.0, 0, 0])},
                        {text: unit_at_cosine(0.9), "effusion left small": unit_at_cosine(0.1)})
    views = [make_sample(0, text, pert, study="s"), make_sample(1, text, pert, study="s")]
    r = evaluate_structure(enc, views, types=("reverse",), bootstrap=10)
    assert sorted(enc.texts_seen) == sorted([text, "effusion left small"])
    assert (r.overall.accuracy, r.overall.n) == (1.0, 2)
    bad = make_sample(2, text, pert)
    bad.image = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="img2"):
        evaluate_structure(enc, [views[0], bad], types=("reverse",))
    with pytest.raises(ValueError, match="unknown perturbation type"):
        evaluate_structure(enc, views, types=("reversed",))


def test_structure_result_json_round_trips():
    enc, samples = hand_built_structure_case()
    r = evaluate_structure(enc, samples, types=PERTURBATION_TYPES, bootstrap=50)
    r.info = {"split": "test"}
    d = json.loads(json.dumps(r.to_json()))
    assert d["schema"] == "pertvl-structure/3"
    assert list(d["per_type"]) == list(PERTURBATION_TYPES)
    assert set(d) == {"schema", "overall", "per_type", "images", "images_without_valid_perturbation", "skipped",
                      "bootstrap", "tie_tolerance", "controls", "grounded", "text_disjoint", "score", "info"}
    assert set(d["overall"]) == {"accuracy", "ci95", "n", "correct", "chance", "mean_candidates",
                                 "excluded_identical", "unavailable", "missing", "cos_original", "cos_perturbed"}
    assert set(d["controls"]) == {"wrong_image", "mean_image", "text_only", "margin", "margin_per_type", "pairing"}
    # Types present in no record are "not measured", never 0.
    assert d["per_type"]["swap_adjacent"]["accuracy"] is None and d["per_type"]["swap_adjacent"]["missing"] == 6
    assert StructureResult.from_json(d).to_json() == d
    with pytest.raises(ValueError, match="schema"):
        StructureResult.from_json({"schema": "something-else"})
    # The JSON is the dataclass fields, in their order.
    assert list(d["controls"]) == ["text_only", "wrong_image", "mean_image", "margin", "margin_per_type", "pairing"]
    assert list(d)[0] == "schema" and list(d)[-1] == "info"


def grounded_case(n: int = 4):
    """Image i = e_i; its report = e_i; every perturbation = e_n (orthogonal to all images).

    Own image: cos(original) = 1 > 0 → all correct. Wrong image e_j: original and perturbations
    both at 0 → ties → all wrong. Mean image: original at 1/√n > 0 → all correct. Text only (mean of
    the other reports): 0 vs 0 → all wrong. So own 100 %, wrong 0 %, margin +100 pts.
    """
    eye = np.eye(n + 1)
    samples, text_vecs = [], {}
    for i in range(n):
        text = f"report {i} lungs clear"
        pert = {"reverse": " ".join(text.split()[::-1]), "shuffle_all": " ".join(sorted(text.split()))}
        text_vecs[text] = eye[i]
        for p in pert.values():
            text_vecs[p] = eye[n]
        samples.append(make_sample(i, text, pert, labels={"No Finding": 0.0, f"Finding {i}": 1.0}))
    return LookupEncoder({i: eye[i] for i in range(n)}, text_vecs), samples


def test_structure_controls_wrong_mean_and_text_only_anchors():
    enc, samples = grounded_case()
    r = evaluate_structure(enc, samples, types=("reverse", "shuffle_all"), bootstrap=100)
    c = r.controls
    assert r.overall.accuracy == 1.0 and c.wrong_image.overall.accuracy == 0.0
    assert c.mean_image.overall.accuracy == 1.0 and c.text_only.overall.accuracy == 0.0
    assert (c.margin.margin, c.margin.n, c.margin.own, c.margin.wrong) == (1.0, 4, 1.0, 0.0)
    assert c.margin.ci95 == (1.0, 1.0) and c.margin_per_type["reverse"].margin == 1.0
    assert c.pairing["paired"] == 4 and c.pairing["unpaired"] == 0 and "labels differ" in c.pairing["rule"]
    # The mean cosines show the offsets: own 1 vs 0, wrong 0 vs 0, mean image 1/2 vs 0.
    assert (r.overall.cos_original, r.overall.cos_perturbed) == (pytest.approx(1.0), pytest.approx(0.0))
    assert c.wrong_image.overall.cos_original == pytest.approx(0.0)
    assert c.mean_image.overall.cos_original == pytest.approx(0.5)
    m = r.metrics()
    assert (m["structure/wrong_image"], m["structure/mean_image"], m["structure/text_only"], m["structure/margin"]) \
        == (0.0, 1.0, 0.0, 1.0)
    md = r.markdown("structure")
    assert "| **image-grounding margin** (own − wrong, paired images) | +100.0 pts | [+100.0, +100.0] | 4 |" in md
    assert "| wrong image (another study's, findings differ) | 0.0% |" in md
    assert "image-grounding margin +100.0 pts" in r.headline()
    from pertvl.evaluate.catalog import metric_info

    assert metric_info("structure/margin").label.startswith("Grounding margin")


def test_constant_image_embedding_gives_margin_exactly_zero():
    """An image tower that ignores the image: whatever the texts, own and wrong anchors are the
    same vector, so the margin is exactly 0 (overall and per type)."""
    rng = np.random.default_rng(0)
    samples, text_vecs = [], {}
    for i in range(30):
        text = f"case {i} " + " ".join(rng.choice(["left", "right", "small", "large", "effusion"], 5))
        pert = {"reverse": " ".join(text.split()[::-1]), "shuffle_all": text + " x"}
        for t in (text, *pert.values()):
            text_vecs[t] = rng.standard_normal(8)
        samples.append(make_sample(i, text, pert, labels={"Edema": float(i % 3 == 0), "Pleural Effusion": float(i % 2)}))
    enc = LookupEncoder({i: np.full(8, 0.3) for i in range(30)}, text_vecs)
    r = evaluate_structure(enc, samples, types=("reverse", "shuffle_all"), bootstrap=200)
    c = r.controls
    assert c.margin.margin == 0.0 and c.margin.ci95 == (0.0, 0.0) and c.margin.n == 30
    assert all(mt.margin == 0.0 for mt in c.margin_per_type.values())
    assert c.wrong_image.overall.accuracy == r.overall.accuracy == c.mean_image.overall.accuracy
    assert r.metrics()["structure/margin"] == 0.0


def test_wrong_image_partners_rule():
    from pertvl.evaluate.structure import wrong_image_partners

    sig = [frozenset({"a"})] * 6 + [frozenset({"b"})] * 6 + [None] * 3
    studies = [f"s{i // 2}" for i in range(15)]  # two images per study
    p = wrong_image_partners(sig, studies, seed=3)
    assert np.array_equal(p, wrong_image_partners(sig, studies, seed=3))
    assert (p >= 0).all() and sorted(p.tolist()) == list(range(15))  # a permutation: each image used once
    for i, j in enumerate(p):
        assert j != i and studies[j] != studies[i]
        assert sig[i] is None or sig[j] is None or sig[i] != sig[j]
    # Nobody to pair with: one label set for all, or a single study.
    assert (wrong_image_partners([frozenset({"a"})] * 4, ["a", "b", "c", "d"], 0) == -1).all()
    assert (wrong_image_partners([None] * 3, ["s"] * 3, 0) == -1).all()


# ----------------------------------------------------------------------------- retrieval

E = np.eye(4)


def test_retrieval_recall_hand_built_with_shared_study():
    # Study A: images 0, 1 share one report (texts 0, 1 are the same vector); B: image 2; C: image 3.
    img = np.stack([E[0], 0.8 * E[0] + 0.6 * E[1], 0.6 * E[1] + 0.8 * E[2], 0.8 * E[0] + 0.6 * E[2]])
    txt = np.stack([E[0], E[0], E[1], E[2]])
    studies = ["A", "A", "B", "C"]
    r = retrieval_recall(img, txt, ks=(1, 2, 3, 5), study_ids=studies)
    # image→report first-hit ranks 1, 1, 2 (C ahead), 3 (both copies of A ahead).
    assert r.image_to_text == {"R@1": 0.5, "R@2": 0.75, "R@3": 1.0, "R@5": 1.0}
    # report→image: A texts rank 1; B: image 1 ties image 2 at 0.6 (ties count against) → 2; C → 2.
    assert r.text_to_image == {"R@1": 0.5, "R@2": 1.0, "R@3": 1.0, "R@5": 1.0}
    assert r.median_rank == {"image_to_text": 1.5, "text_to_image": 1.5} and r.match == "study"
    # A deduplicated gallery: one text per study.
    g = retrieval_recall(img, np.stack([E[0], E[1], E[2]]), ks=(1, 2), study_ids=studies, text_study_ids=["A", "B", "C"])
    assert g.image_to_text == {"R@1": 0.5, "R@2": 1.0}
    assert g.text_to_image["R@1"] == pytest.approx(1 / 3) and (g.images, g.texts) == (4, 3)
    with pytest.raises(ValueError, match="no correct item"):
        retrieval_recall(img, txt[:3], study_ids=studies, text_study_ids=["A", "B", "X"])


def test_evaluate_retrieval_matches_identical_reports():
    normal = "heart size normal lungs clear"
    samples = [make_sample(0, normal, study="A"), make_sample(1, normal, study="B"),
               make_sample(2, "left effusion", study="C"), make_sample(3, "", study="D")]
    enc = LookupEncoder({0: E[0], 1: E[0] + 0.1 * E[1], 2: E[1]}, {normal: E[0], "left effusion": E[1]})
    r = evaluate_retrieval(enc, samples, ks=(1,))
    assert (r.image_to_text, r.text_to_image, r.texts, r.images) == ({"R@1": 1.0}, {"R@1": 1.0}, 2, 3)
    assert r.skipped == {"empty_text": 1}
    by_study = evaluate_retrieval(enc, samples, ks=(1,), match="study")
    # Studies A and B hold the same text: identical embeddings tie, and ties count against.
    assert by_study.image_to_text["R@1"] == pytest.approx(1 / 3) and by_study.texts == 3
    assert RetrievalResult.from_json(json.loads(json.dumps(r.to_json()))).to_json() == r.to_json()


# ----------------------------------------------------------------------------- zero-shot


def test_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1
        scores = rng.integers(0, 4 if trial % 2 else 1000, n).astype(float)  # heavy ties on odd trials
        assert auroc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert auroc(np.array([0.1, 0.2, 0.2, 0.9]), np.array([0, 1, 0, 1])) == 0.875
    assert auroc(np.array([0.3, 0.1]), np.array([1, 1])) is None
    with pytest.raises(ValueError):
        auroc(np.array([0.3, 0.1]), np.array([1, 2]))


def test_zeroshot_hand_built():
    e = np.eye(5)
    text_vecs = {"pleural effusion": e[0], "no pleural effusion": e[1], "pneumothorax": e[2], "no pneumothorax": e[3]}
    # Effusion score = v0 - v1: images 0..3 → 1, -0.2, -0.2, -1 (images 1 and 2 tie exactly).
    imgs = {0: e[0], 1: 0.6 * e[0] + 0.8 * e[1], 2: 0.6 * e[0] + 0.8 * e[1], 3: e[1], 4: e[0], 5: e[1]}
    labels = [
        {"Pleural Effusion": 1.0, "Pneumothorax": 1.0, "Support Devices": 1.0},
        {"pleural effusion": 1.0, "Pneumothorax": 1.0},
        {"Pleural Effusion": 0.0, "Pneumothorax": 1.0},
        {"Pleural Effusion": 0.0},
        {"Pleural Effusion": -1.0, "Pneumothorax": float("nan")},  # no definite label: not embedded
        None,
    ]
    samples = [make_sample(i, "report", labels=lab) for i, lab in enumerate(labels)]
    enc = LookupEncoder(imgs, text_vecs, default_text=e[4])
    r = evaluate_zeroshot(enc, samples, prompts={"Pleural Effusion": ("Pleural effusion!", "No pleural effusion."),
                                                 "Pneumothorax": [("pneumothorax", "no pneumothorax")]})
    eff, ptx = r.per_label["Pleural Effusion"], r.per_label["Pneumothorax"]
    assert eff.auroc == 0.875 and (eff.n_pos, eff.n_neg, eff.n_skipped) == (2, 2, 1)
    assert eff.prompts == [["pleural effusion", "no pleural effusion"]]  # cleaned
    assert ptx.auroc is None and (ptx.n_pos, ptx.n_neg, ptx.n_skipped) == (3, 0, 1)  # one class: undefined
    assert r.mean_auroc == 0.875 and r.images == 4
    assert r.unprompted_labels == ["Support Devices"]
    assert r.skipped == {"no_definite_label": 1, "no_labels": 1}
    d = json.loads(json.dumps(r.to_json()))
    assert d["per_label"]["Pneumothorax"]["auroc"] is None and d["labels_defined"] == 1
    assert ZeroShotResult.from_json(d).to_json() == d
    # Default prompts: labels absent from the data are not reported at all.
    default = evaluate_zeroshot(enc, samples)
    assert set(default.per_label) == {"Pleural Effusion", "Pneumothorax"}


class BrightnessEncoder:
    """Image -> its mean, 1 - mean and spread; a finding prompt -> near [1, 0, 0] (bright), a "no ..."
    prompt near [0, 1, 0], each moved by noise seeded by its text (all L2-normalized)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        m, sd = images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))
        return _unit(np.stack([m, 1 - m, 4 * sd], axis=1))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return _unit(np.stack([np.eye(3)[int(t.startswith("no ") or t.startswith("normal"))]
                               + 0.3 * np.random.default_rng(zlib.crc32(t.encode())).normal(size=3) for t in texts]))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _chexpert_reference(chexpert, encoder, size: int, blank: str) -> dict[str, float | None]:
    """AUROC per prompted label with sklearn, on the encoder's scores of the CSV's readable frontal
    images: 1/0 cells, blanks as negatives (blank "zero") or left out ("mask"), uncertain left out."""
    import csv

    from sklearn.metrics import roc_auc_score

    from pertvl.data.image import read_image
    from pertvl.data.text import clean_text
    from pertvl.evaluate.zeroshot import DEFAULT_PROMPTS

    with open(chexpert["csv"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Frontal/Lateral"] == "Frontal"]
    images, kept = [], []
    for r in rows:
        try:
            images.append(read_image(chexpert["images"] / r["Path"], size))
            kept.append(r)
        except (FileNotFoundError, ValueError):
            continue
    img = encoder.embed_images(np.stack(images)[:, None].astype(np.float32) / 255.0).astype(np.float64)
    out = {}
    for lp in DEFAULT_PROMPTS:
        score = np.mean([img @ encoder.embed_texts([clean_text(p)])[0] - img @ encoder.embed_texts([clean_text(n)])[0]
                         for p, n in lp.pairs], axis=0)
        cells = [r[lp.label] for r in kept]
        use = [c in ("1.0", "0.0") or (c == "" and blank == "zero") for c in cells]
        y = np.array([c == "1.0" for c, u in zip(cells, use, strict=True) if u], dtype=int)
        out[lp.label] = roc_auc_score(y, score[use]) if 0 < y.sum() < len(y) else None
    return out


@pytest.mark.parametrize("blank", ["zero", "mask"])
def test_zeroshot_on_a_chexpert_csv_equals_sklearn(chexpert, tmp_path, monkeypatch, capsys, blank):
    """`pertvl eval zeroshot --chexpert-csv`: the fine-tune's reader (frontal only, its blank and
    uncertain rule), unreadable images skipped and named, AUROC = sklearn's on the encoder's scores."""
    import pertvl.evaluate.cli as ecli
    from pertvl.cli import main

    enc = BrightnessEncoder()
    monkeypatch.setattr(ecli, "_build_encoder", lambda args: (enc, {"encoder": "stand-in"}))
    args = ["eval", "zeroshot", "--export", "unused", "--chexpert-csv", str(chexpert["csv"]), "--images",
            str(chexpert["images"]), "--image-size", "32", "--blank", blank, "--out", str(tmp_path)]
    assert main(args) == 0
    z = json.loads((tmp_path / "zeroshot.json").read_text())
    expected = _chexpert_reference(chexpert, enc, 32, blank)
    assert set(z["per_label"]) == set(expected)  # the CSV has every CheXpert column
    for label, value in expected.items():
        got = z["per_label"][label]["auroc"]
        assert (got is None and value is None) or got == pytest.approx(value, abs=1e-12), label
    eff, cons = z["per_label"]["Pleural Effusion"], z["per_label"]["Consolidation"]
    assert eff["auroc"] > 0.9  # brightness follows the effusion label
    assert (eff["n_skipped"], cons["n_skipped"]) == (1, 1 if blank == "zero" else 2)  # uncertain (+ blank)
    # 46 rows - 1 lateral - 2 unreadable; under "mask" patient00003 has no scored label left
    masked = {"no_definite_label": 1} if blank == "mask" else {}
    assert z["images"] == 43 - len(masked) and z["skipped"] == {"unreadable_image": 2, **masked}
    info = z["info"]["chexpert"]
    assert info["rows_skipped"] == {"lateral view (frontal only)": 1} and info["blank_policy"] == blank
    assert [p.split(": ")[0] for p in info["image_problems"]] == [f"{chexpert['csv']}:6", f"{chexpert['csv']}:47"]
    assert f"{z['images']} images" in capsys.readouterr().out


def test_zeroshot_data_options_are_checked(chexpert, tmp_path, monkeypatch):
    import pertvl.evaluate.cli as ecli
    from pertvl.cli import main

    monkeypatch.setattr(ecli, "_build_encoder", lambda args: (BrightnessEncoder(), {"encoder": "stand-in"}))
    base = ["eval", "zeroshot", "--export", "unused", "--out", str(tmp_path)]
    csv_args = ["--chexpert-csv", str(chexpert["csv"]), "--images", str(chexpert["images"])]
    for extra, message in (([], "give --shards DIR"), ([*csv_args, "--shards", "s"], "not both"),
                           (csv_args[:2], "needs --images"),
                           (["--chexpert-csv", str(tmp_path / "no.csv"), "--images", str(tmp_path)], "no.csv: no such CSV")):
        with pytest.raises(SystemExit, match=message):
            main([*base, *extra])


# ----------------------------------------------------------------------------- text structure

# (impression, findings, {type: perturbation}); every perturbation keeps the words but breaks
# the bigrams the findings share with the impression.
TEXT_CASES = [
    ("no pleural effusion", "the lungs are clear there is no pleural effusion",
     {"shuffle_all": "effusion clear the no lungs there pleural is are",
      "swap_adjacent": "lungs the clear are is there pleural no effusion",
      "reverse": "effusion pleural no is there clear are lungs the"}),
    ("mild cardiomegaly", "the heart shows mild cardiomegaly without edema",
     {"shuffle_all": "cardiomegaly the without mild heart edema shows",
      "reverse": "edema without cardiomegaly mild shows heart the",
      "shuffle_trigrams": "mild the heart cardiomegaly without edema shows"}),
    ("small left pneumothorax", "there is a small left pneumothorax",
     {"swap_adjacent": "is there small a pneumothorax left", "reverse": "pneumothorax left small a is there",
      "shuffle_all": "left there small is pneumothorax a"}),
]


def text_records(cases=TEXT_CASES):
    return [(imp, SimpleNamespace(text=fnd, perturbations=p, unavailable={"antonym_adjectives": "no antonym"}))
            for imp, fnd, p in cases]


def test_text_structure_bag_of_words_ties_and_bigrams_win():
    bigrams = HashedNgramEncoder(2)
    for imp, fnd, perts in TEXT_CASES:  # the premise of the test, checked
        a, f = bigrams.embed_texts([imp, fnd])
        assert a @ f > 0 and all(a @ v == 0 for v in bigrams.embed_texts(list(perts.values())))
        assert all(sorted(p.split()) == sorted(fnd.split()) for p in perts.values())
    bow = evaluate_text_structure(HashedNgramEncoder(1), text_records(), bootstrap=50)
    order = evaluate_text_structure(bigrams, text_records(), bootstrap=50)
    assert bow.schema == order.schema == "pertvl-text-structure/3"
    assert (bow.overall.accuracy, bow.overall.n) == (0.0, 3)
    assert (order.overall.accuracy, order.overall.n) == (1.0, 3)
    assert bow.overall.chance == pytest.approx(0.25)
    for t, n in {"shuffle_all": 3, "reverse": 3, "swap_adjacent": 2, "shuffle_trigrams": 1}.items():
        assert (bow.per_type[t].accuracy, order.per_type[t].accuracy, bow.per_type[t].n) == (0.0, 1.0, n)
    assert bow.per_type["antonym_adjectives"].unavailable == 3 and bow.per_type["antonym_adjectives"].n == 0
    assert order.per_type["shuffle_nouns_adjectives"].missing == 3
    d = json.loads(json.dumps(order.to_json()))
    assert StructureResult.from_json(d).to_json() == d


def test_text_structure_skips_and_accepts_mappings():
    records = text_records() + [
        ("", {"text": "lungs clear", "perturbations": {"reverse": "clear lungs"}, "unavailable": {}}),
        ("lungs clear", {"text": "lungs clear", "perturbations": {"reverse": "clear lungs"}, "unavailable": {}}),
        ("heart normal", {"text": "heart is normal", "perturbations": {"reverse": "normal is heart"}, "unavailable": {}}),
    ]
    r = evaluate_text_structure(HashedNgramEncoder(2), records, types=("reverse",), bootstrap=0)
    assert r.skipped == {"empty_impression": 1, "impression_equals_findings": 1}
    assert r.per_type["reverse"].n == 4
    # Report f shares no bigram with either candidate: a tie, counted wrong.
    assert r.per_type["reverse"].correct == 3


def test_text_structure_on_real_openi(openi_dir):
    import csv

    sections = read_report_sections(openi_dir / "indiana_reports.csv")
    with open(openi_dir / "indiana_reports.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # every row is read and either kept or counted under a reason
    assert sections.rows_read == len(rows) and len(sections) + sum(sections.skipped.values()) == len(rows)
    both = sum(bool((r["findings"] or "").strip()) and bool((r["impression"] or "").strip()) for r in rows)
    assert 0 < len(sections) <= both and set(sections.skipped) >= {"no_impression"}
    head = read_report_sections(openi_dir / "indiana_reports.csv", limit=300)
    assert head.findings == sections.findings[:300]
    records = [(imp, {"text": f, "perturbations": {"reverse": " ".join(f.split()[::-1])}, "unavailable": {}})
               for imp, f in zip(head.impressions, head.findings, strict=True)]
    r = evaluate_text_structure(HashedNgramEncoder(1, dim=4096), records, types=("reverse",), bootstrap=0)
    assert r.per_type["reverse"].n > 280 and r.per_type["reverse"].accuracy == 0.0  # order-blind: all ties


def test_read_report_sections_rejects_other_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("uid,findings\n1,lungs clear\n")
    with pytest.raises(ValueError, match="x.csv.*impression"):
        read_report_sections(p)


# ----------------------------------------------------------------------------- report writers


def test_write_structure_outputs(tmp_path):
    enc, samples = hand_built_structure_case()
    r = evaluate_structure(enc, samples, types=T3, bootstrap=100)
    paths = write_result(r, tmp_path / "out", "structure")
    d = json.loads(paths["json"].read_text())
    assert StructureResult.from_json(d).to_json() == r.to_json() == d
    md = paths["markdown"].read_text()
    main_table = md.split("## Controls")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 3  # header, overall, three types
    assert rows[1].startswith("| **Overall**") and "| 60.0% |" in rows[1] and "| 31.7% |" in rows[1]
    assert "`reverse`" in rows[3] and "| 100.0% | [100.0, 100.0] | 4 | 50.0% |" in rows[3]
    assert "| 1 / 1 / 1 |" in rows[4]  # antonym: one identical, one unavailable, one missing excluded
    with Image.open(paths["png"]) as im:
        assert im.size == (1100, 500)


def test_write_retrieval_and_zeroshot_outputs(tmp_path):
    r = retrieval_recall(np.eye(3), np.eye(3), ks=(1, 5), study_ids=range(3))
    p = write_result(r, tmp_path, "retrieval")
    assert json.loads(p["json"].read_text())["image_to_text"] == {"R@1": 1.0, "R@5": 1.0}
    assert "| image → report | 100.0% | 100.0% | 1 |" in p["markdown"].read_text()
    z = ZeroShotResult.from_json({"schema": "pertvl-zeroshot/1", "images": 3, "per_label": {
        "Edema": {"auroc": None, "n_pos": 3, "n_neg": 0, "prompts": [["edema", "no edema"]]}}})
    p = write_result(z, tmp_path, "zeroshot")
    assert "| Edema | undefined (one class) | 3 | 0 |" in p["markdown"].read_text()


def test_write_comparison_table(tmp_path):
    enc, samples = hand_built_structure_case()
    structure = evaluate_structure(enc, samples, types=T3, bootstrap=0)  # overall 0.6
    retrieval = retrieval_recall(np.eye(3), np.eye(3), study_ids=range(3))
    results = {
        "full": [{"structure": structure, "retrieval": retrieval.to_json()},
                 {"structure/overall": 0.8, "zeroshot/mean_auroc": 0.9}],
        "convirt": [{"structure/overall": 0.4, "zeroshot/mean_auroc": 0.6},
                    {"structure/overall": 0.2, "zeroshot/mean_auroc": 0.5}],
        "no_local": [structure.to_json()],
        "gloria": [{"structure/overall": 0.3}, {"structure/overall": 0.3}, {"structure/overall": 0.6}],
    }
    paths = write_comparison_table(results, tmp_path, "ablation")
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == "pertvl-comparison/1"
    assert [r["config"] for r in doc["rows"]] == ["convirt", "gloria", "no_local", "full"]
    assert [r["label"] for r in doc["rows"]] == ["ConVIRT-like", "GLoRIA-like", "Ours w/o local", "Ours"]
    full = doc["rows"][3]["metrics"]
    assert full["structure/overall"]["mean"] == pytest.approx(0.7)
    assert full["structure/overall"]["std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert full["zeroshot/mean_auroc"] == {"mean": 0.9, "std": None, "n": 1, "values": [0.9]}
    assert full["retrieval/image_to_text/R@10"]["mean"] == 1.0
    assert doc["rows"][2]["metrics"]["structure/overall"]["std"] is None  # one seed
    assert doc["columns"][:4] == ["structure/overall", "structure/shuffle_all", "structure/reverse",
                                  "structure/antonym_adjectives"]
    md = paths["markdown"].read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [line.split("|")[1].strip() for line in lines]
    # the summary, then one table per evaluation in the registry's order: structure, retrieval, zero-shot
    assert labels == ["Method", "ConVIRT-like", "GLoRIA-like", "Ours w/o local", "Ours"] * 4
    assert doc["summary"] == ["structure/overall", "structure/margin", "retrieval/image_to_text/R@10",
                              "zeroshot/mean_auroc"]
    assert md.index("## Summary") < md.index("## Clinical semantic structure")
    assert "| Method | seeds | Structure overall | Grounding margin (own − wrong) | I→R R@10 | Zero-shot mean AUROC |" in md
    assert "| ConVIRT-like | 2 | 30.0 ± 14.1 |" in md and "| Ours w/o local | 1 | 60.0 |" in md
    with Image.open(paths["png"]) as im:
        assert im.size == (1500, 550)
    with pytest.raises(ValueError, match="cannot read metrics"):
        write_comparison_table({"full": [["not", "metrics"]]}, tmp_path)


def test_comparison_summary_shows_margins_with_their_cis_and_notes(tmp_path):
    """A summary column whose MetricInfo names CI bounds shows mean ± std [mean low, mean high] and how
    many seeds' own CIs exclude 0; the notes follow the summary table."""
    seeds = [{"structure/overall": 0.5, "structure/margin": m, "structure/margin_ci_low": lo,
              "structure/margin_ci_high": hi, "structure/wrong_image": 0.4}
             for m, lo, hi in ((0.10, 0.02, 0.18), (0.04, -0.03, 0.11), (0.07, 0.01, 0.13))]
    paths = write_comparison_table({"full": seeds}, tmp_path, notes=["Row full: the config's preset."])
    doc = json.loads(paths["json"].read_text())
    assert doc["summary"] == ["structure/overall", "structure/margin"]  # not the wrong-image accuracy, not the CI
    assert doc["rows"][0]["ci_excludes_zero"] == {"structure/margin": [2, 3]}
    assert doc["notes"] == ["Row full: the config's preset."]
    md = paths["markdown"].read_text()
    std = 100 * np.std([0.10, 0.04, 0.07], ddof=1)
    assert f"| Ours | 3 | 50.0 ± 0.0 | +7.0 ± {std:.1f} [+0.0, +14.0] (2/3) |" in md
    assert md.index("Row full: the config's preset.") < md.index("## Clinical semantic structure")


def test_plot_training_curves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss/total": 4 / (1 + s / 10), "loss/global": 3 / (1 + s / 10),
                         "loss/local": 5 - s / 30, "loss/pert": 2.1 - s / 100, "lr": 0.0015 * min(1, s / 10)})
             for s in range(1, 101)]
    log.write_text("\n".join(lines[:50]) + "\n" + json.dumps({"event": "eval"}) + "\n" + "\n".join(lines[50:])
                   + '\n{"step": 101, "loss/tot')
    info = plot_training_curves(log, tmp_path / "curves.png")
    assert info["keys"] == ["loss/total", "loss/global", "loss/local", "loss/pert", "lr"]
    assert (info["points"], info["bad_lines"]) == (100, 2)
    with Image.open(info["png"]) as im:
        assert im.size == (1000, 600)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        plot_training_curves(empty, tmp_path / "x.png")


def test_save_attention_map(tmp_path):
    yy, xx = np.mgrid[0:224, 0:224]
    image = (128 + 100 * np.sin(xx / 20) * np.cos(yy / 30)).astype(np.uint8)
    attn = np.zeros((14, 14), dtype=np.float32)
    attn[10:13, 2:5] = 1.0
    out = save_attention_map(image, attn, "effusion", tmp_path / "attn.png")
    with Image.open(out) as im:
        assert im.size == (400, 440)
    with pytest.raises(ValueError, match="uint8"):
        save_attention_map(image.astype(float), attn, "x", tmp_path / "bad.png")
    with pytest.raises(ValueError, match="attention"):
        save_attention_map(image, attn[0], "x", tmp_path / "bad.png")


# ----------------------------------------------------------------------------- CLI and adapters


def test_eval_cli_parsers(capsys):
    from pertvl.cli import build_parser, main

    parser = build_parser()
    args = parser.parse_args(["eval", "structure", "--export", "export/x", "--shards", "shards/x", "--out", "o"])
    assert (args.split, args.bootstrap, args.seed, args.types) == ("test", 1000, 0, PERTURBATION_TYPES)
    args = parser.parse_args(["eval", "text-structure", "--text-model", "m", "--reports", "r.csv", "--out", "o",
                              "--types", "reverse,shuffle_all"])
    assert args.types == ("reverse", "shuffle_all") and args.pooling == "mean"
    for sub in ("structure", "retrieval", "zeroshot"):
        assert parser.parse_args(["eval", sub, "--run", "runs/x", "--shards", "s", "--out", "o"]).run == "runs/x"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "structure", "--export", "a", "--run", "b", "--shards", "s", "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "structure", "--text-model", "m", "--shards", "s", "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "text-structure", "--text-model", "m", "--reports", "r", "--out", "o",
                           "--types", "bogus"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["eval", "structure", "--help"])
    assert exc.value.code == 0 and "--bootstrap" in capsys.readouterr().out


def test_hf_text_encoder_keeps_input_order(minilm_path):
    from pertvl.evaluate.torch_encoder import HFTextEncoder

    enc = HFTextEncoder(minilm_path, pooling="mean", device="cpu", batch_size=2)
    texts = ["the lungs are clear there is no pleural effusion or pneumothorax", "cardiomegaly",
             "small left pleural effusion", "no acute cardiopulmonary abnormality", "heart size normal"]
    emb = enc.embed_texts(texts)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    alone = np.concatenate([enc.embed_texts([t]) for t in texts])
    assert np.allclose(emb, alone, atol=1e-5)
    assert isinstance(enc, TextEncoder)


def test_torch_encoder_on_a_stand_in_model(minilm_path):
    import torch

    from pertvl.evaluate.torch_encoder import TorchEncoder

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(minilm_path)
            self.scale = torch.nn.Parameter(torch.tensor([2.0]))

        def encode_image(self, images):
            return SimpleNamespace(global_emb=self.scale * torch.stack([images.mean((1, 2, 3)), images.amax((1, 2, 3))], 1))

        def encode_text(self, input_ids, attention_mask, word_ids):
            return SimpleNamespace(global_emb=self.scale * torch.stack(
                [attention_mask.sum(1).float(), (word_ids.amax(1) + 1).float()], 1))

    enc = TorchEncoder(StandIn(), device="cpu", batch_size=2)
    texts = ["a b c", "a", "a b c d e f", "a b"]
    emb = enc.embed_texts(texts)
    tokens_and_words = np.array([[5, 3], [3, 1], [8, 6], [4, 2]], dtype=np.float64)
    assert np.allclose(emb, tokens_and_words / np.linalg.norm(tokens_and_words, axis=1, keepdims=True), atol=1e-6)
    images = np.stack([np.full((1, 4, 4), v, dtype=np.float32) for v in (0.2, 0.5, 1.0)])
    images[0, 0, 0, 0] = 1.0
    img = enc.embed_images(images)
    expect = np.array([[(0.2 * 15 + 1) / 16, 1.0], [0.5, 0.5], [1.0, 1.0]])
    assert np.allclose(img, expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        enc.embed_images(images[:, 0])


def test_eval_cli_handlers_write_outputs(tmp_path, monkeypatch, capsys):
    """The four handlers end to end, with the encoder, the shard reader and the perturber stood in."""
    import pertvl.data.perturb
    import pertvl.data.shards
    import pertvl.evaluate.cli as ecli
    from pertvl.cli import main

    enc, samples = hand_built_structure_case()
    for s, labels in zip(samples, [{"Pleural Effusion": 1.0}, {"Pleural Effusion": 0.0}, None, None, None, None, None],
                         strict=True):
        s.meta["labels"] = labels
    enc.default_text = unit_at_cosine(0.3)
    monkeypatch.setattr(pertvl.data.shards, "iter_samples", lambda folder, split: iter(samples))
    monkeypatch.setattr(ecli, "_build_encoder", lambda args: (enc, {"encoder": "stand-in"}))
    common = ["--export", "unused", "--shards", "unused", "--out", str(tmp_path)]
    assert main(["eval", "structure", *common, "--types", ",".join(T3), "--bootstrap", "20"]) == 0
    assert "structure accuracy 60.0%" in capsys.readouterr().out
    d = json.loads((tmp_path / "structure.json").read_text())
    assert d["overall"]["accuracy"] == 0.6 and d["info"]["encoder"] == "stand-in" and d["info"]["split"] == "test"
    assert main(["eval", "retrieval", *common, "--ks", "1,5"]) == 0
    assert set(json.loads((tmp_path / "retrieval.json").read_text())["image_to_text"]) == {"R@1", "R@5"}
    assert main(["eval", "zeroshot", *common, "--limit", "3"]) == 0
    z = json.loads((tmp_path / "zeroshot.json").read_text())
    assert z["images"] == 2 and z["per_label"]["Pleural Effusion"]["auroc"] == 0.5  # both score the default text

    class FakePerturber:
        def __init__(self, seed):
            self.seed = seed

        def perturb_many(self, texts, progress=False):
            return [SimpleNamespace(text=t, perturbations={"reverse": " ".join(t.split()[::-1])}, unavailable={})
                    for t in texts]

    monkeypatch.setattr(pertvl.data.perturb, "Perturber", FakePerturber)
    monkeypatch.setattr(ecli, "_build_encoder", lambda args: (HashedNgramEncoder(1, dim=256), {"encoder": "bow"}))
    csv_path = tmp_path / "indiana_reports.csv"
    csv_path.write_text('uid,MeSH,findings,impression\n1,normal,"Lungs are clear.",No effusion.\n'
                        "2,normal,,Normal chest.\n3,x,Heart is normal.,Heart is normal\n")
    assert main(["eval", "text-structure", "--text-model", "unused", "--reports", str(csv_path),
                 "--out", str(tmp_path), "--types", "reverse", "--bootstrap", "0"]) == 0
    t = json.loads((tmp_path / "text_structure.json").read_text())
    reverse = t["per_type"]["reverse"]
    assert t["schema"] == "pertvl-text-structure/3" and "controls" not in t and {
        k: v for k, v in reverse.items() if not k.startswith("cos_")} == {
        "accuracy": 0.0, "ci95": None, "n": 1, "correct": 0, "chance": 0.5, "mean_candidates": 2.0,
        "excluded_identical": 0, "unavailable": 0, "missing": 0}
    assert reverse["cos_original"] > reverse["cos_perturbed"] - 1e-9  # a bag of words: reversal ties
    assert t["skipped"] == {"impression_equals_findings": 1} and t["info"]["rows_left_out"] == {"no_findings": 1}
