"""`pertvl eval structure-local`: the structure test scored by GLoRIA's local S(I, T) (issue 14),
checked against pertvl.losses.local_similarity (the loss's own implementation) on a stub encoder."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from pertvl.evaluate.structure import evaluate_structure, wrong_image_partners
from pertvl.evaluate.structure_result import StructureResult
from pertvl.infer import ImageFeatures, TextFeatures, local_scores
from pertvl.losses import local_similarity
from tests.test_evaluate import make_sample

M, D = 4, 6


class LocalLookupEncoder:
    """Image i (pixel value i) → seeded random region features; a text → seeded random word
    features, one per word (at most 7). `constant`: every image has the same regions."""

    def __init__(self, constant: bool = False):
        self.constant = constant

    def regions(self, i: int) -> np.ndarray:
        return np.random.default_rng(0 if self.constant else 100 + i).standard_normal((M, D)).astype(np.float32)

    def words(self, text: str) -> np.ndarray:
        n = min(len(text.split()), 7)
        return np.random.default_rng(zlib.crc32(text.encode())).standard_normal((n, D)).astype(np.float32)

    def image_features(self, images: np.ndarray) -> ImageFeatures:
        ids = np.rint(images[:, 0, 0, 0] * 255).astype(int)
        return ImageFeatures(np.ones((len(ids), 3), np.float32), np.stack([self.regions(i) for i in ids]), (2, 2))

    def text_features(self, texts: list[str]) -> TextFeatures:
        width = max(len(self.words(t)) for t in texts)
        words = np.zeros((len(texts), width, D), np.float32)
        mask = np.zeros((len(texts), width), bool)
        for j, t in enumerate(texts):
            w = self.words(t)
            words[j, : len(w)], mask[j, : len(w)] = w, True
        return TextFeatures(np.ones((len(texts), 3), np.float32), words, mask, list(texts))

    def embed_images(self, images):  # the global path must not be used by the local score
        raise AssertionError("embed_images called by the local score")

    def embed_texts(self, texts):
        raise AssertionError("embed_texts called by the local score")


def reference_s(enc: LocalLookupEncoder, image: int, text: str) -> float:
    w = torch.from_numpy(enc.words(text))[None]
    return float(local_similarity(torch.from_numpy(enc.regions(image))[None], w, torch.ones(w.shape[:2], dtype=bool)))


def case(n: int = 8):
    samples = []
    for i in range(n):
        text = f"report {i} small right effusion no pneumothorax"
        pert = {"reverse": " ".join(text.split()[::-1]), "swap_adjacent": f"{i} report small right effusion"}
        s = make_sample(i, text, pert, labels={"No Finding": 0.0, f"Finding {i}": 1.0})
        s.meta["counterfactuals"] = {"cf_laterality": f"report {i} small left effusion no pneumothorax"}
        s.meta["cf_unavailable"] = {}
        samples.append(s)
    return samples


def test_local_scores_equal_the_loss_similarity_diagonal():
    rng = np.random.default_rng(3)
    r, x = rng.standard_normal((4, 9, 5)), rng.standard_normal((4, 6, 5))
    mask = np.ones((4, 6), bool)
    mask[1, 2:] = False
    mask[2] = False  # a report without words: -inf, as the loss
    for agg in ("sum", "mean"):
        ref = local_similarity(torch.from_numpy(r).float(), torch.from_numpy(x).float(), torch.from_numpy(mask),
                               aggregation=agg).numpy()
        got = local_scores(r, x, mask, aggregation=agg)
        assert np.isneginf(got[2]) and np.isneginf(ref[2, 2])
        keep = [0, 1, 3]
        np.testing.assert_allclose(got[keep], np.diag(ref)[keep], rtol=1e-5, atol=1e-5 * np.abs(ref[keep][:, keep]).max())
    with pytest.raises(ValueError, match="word_mask"):
        local_scores(r, x, mask[:, :3])


def test_structure_local_scores_every_candidate_by_s_and_controls_with_partner_regions():
    enc, samples = LocalLookupEncoder(), case()
    r = evaluate_structure(enc, samples, types=("reverse", "swap_adjacent"), bootstrap=0, batch_size=3, score="local")
    texts = [s.meta["text"] for s in samples]
    orig = np.array([reference_s(enc, i, t) for i, t in enumerate(texts)])
    pert = np.array([[reference_s(enc, i, s.meta["perturbations"][k]) for k in ("reverse", "swap_adjacent")]
                     for i, s in enumerate(samples)])
    tol = 1e-5 * np.abs(orig).max()
    np.testing.assert_allclose(r.scores.orig, orig, atol=tol)
    np.testing.assert_allclose(r.scores.pert, pert, atol=tol)
    assert r.overall.correct == int(((orig[:, None] - pert) > 1e-6).all(axis=1).sum())
    # wrong image: the partner's regions against this image's candidates
    partner = wrong_image_partners([frozenset({f"Finding {i}"}) for i in range(len(samples))],
                                   [s.meta["study_id"] for s in samples], 0)
    wrong = [reference_s(enc, int(p), t) > max(reference_s(enc, int(p), c) for c in s.meta["perturbations"].values())
             + 1e-6 for p, t, s in zip(partner, texts, samples, strict=True)]
    assert r.controls.wrong_image.overall.correct == sum(wrong)
    assert r.controls.text_only is None and "text_only" not in r.controls.anchors()
    # grounded: the counterfactual scored by S too
    cf = np.array([reference_s(enc, i, s.meta["counterfactuals"]["cf_laterality"]) for i, s in enumerate(samples)])
    assert r.grounded.per_type["cf_laterality"].correct == int((orig - cf > 1e-6).sum())
    m = r.metrics()
    assert set(m) >= {"structure_local/overall", "structure_local/margin", "structure_local/grounded"}
    assert not any(k.startswith("structure/") or k.endswith("text_only") for k in m)
    back = StructureResult.from_json(r.to_json())
    assert back.score == "local" and back.to_json() == r.to_json() and back.metrics() == m
    md = r.markdown("structure_local")
    assert "local S(I, T)" in md and "text only" not in md
    assert r.headline().startswith("structure (local S) accuracy")
    infos = {k: StructureResult.metric_info(k) for k in m}
    assert {k for k, i in infos.items() if i.summary} == {"structure_local/grounded", "structure_local/grounded_margin"}
    assert infos["structure_local/grounded_margin"].ci == ("structure_local/grounded_margin_ci_low",
                                                           "structure_local/grounded_margin_ci_high")
    assert all(i.label.endswith("(local S)") for i in infos.values())


def test_structure_local_margin_is_exactly_zero_when_every_image_has_the_same_regions():
    r = evaluate_structure(LocalLookupEncoder(constant=True), case(), types=("reverse",), bootstrap=0, score="local")
    assert r.controls.margin.margin == 0.0 and r.grounded.controls.margin.margin == 0.0
    with pytest.raises(ValueError, match="score"):
        evaluate_structure(LocalLookupEncoder(), case(), score="pooled")
