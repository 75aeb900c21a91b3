"""Grounded structure (counterfactual reports as candidates) and the text-disjoint subset of the
structure evaluation (issue 13, §2 and §3), on stub encoders with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pertvl.evaluate.structure import evaluate_structure
from pertvl.evaluate.structure_result import StructureResult
from tests.test_evaluate import LookupEncoder, make_sample

CF = ("cf_laterality", "cf_negation")


def cf_case(n: int = 6, *, constant_image: bool = False, without_record: tuple[int, ...] = ()):
    """Image i = e_i; its report = e_i; its perturbation and counterfactuals = e_n (orthogonal to
    every image). Own image: original at 1, counterfactuals at 0 → all correct. Wrong image:
    0 vs 0, a tie → all wrong. Image 0 has no cf_laterality (unavailable)."""
    eye = np.eye(n + 1)
    samples, text_vecs = [], {}
    for i in range(n):
        text = f"report {i} small right effusion"
        pert = {"reverse": " ".join(text.split()[::-1])}
        cfs = {"cf_laterality": f"report {i} small left effusion", "cf_negation": f"report {i} no right effusion"}
        unav = {}
        if i == 0:
            del cfs["cf_laterality"]
            unav["cf_laterality"] = "no_lateralized_finding"
        text_vecs[text] = eye[i]
        for t in (*pert.values(), *cfs.values()):
            text_vecs[t] = eye[n]
        s = make_sample(i, text, pert, labels={"No Finding": 0.0, f"Finding {i}": 1.0})
        if i not in without_record:
            s.meta["counterfactuals"], s.meta["cf_unavailable"] = cfs, unav
        samples.append(s)
    images = {i: (np.full(n + 1, 0.3) if constant_image else eye[i]) for i in range(n)}
    return LookupEncoder(images, text_vecs), samples


def test_grounded_structure_scores_the_original_above_its_counterfactuals():
    enc, samples = cf_case(without_record=(5,))
    r = evaluate_structure(enc, samples, types=("reverse",), bootstrap=50)
    g = r.grounded
    assert g is not None and list(g.per_type) == ["cf_laterality", "cf_severity", "cf_finding", "cf_negation"]
    assert (g.overall.accuracy, g.overall.n, g.images, g.samples_without_record) == (1.0, 5, 5, 1)
    # chance 1/(1+k): image 0 has one counterfactual (1/2), images 1-4 two (1/3)
    assert g.overall.chance == pytest.approx((1 / 2 + 4 / 3) / 5)
    assert (g.per_type["cf_laterality"].n, g.per_type["cf_laterality"].unavailable) == (4, 1)
    assert g.per_type["cf_negation"].accuracy == 1.0 and g.per_type["cf_negation"].chance == 0.5
    assert g.per_type["cf_severity"].accuracy is None and g.per_type["cf_severity"].n == 0
    c = g.controls
    assert c.wrong_image.overall.accuracy == 0.0 and (c.margin.margin, c.margin.n) == (1.0, 5)
    assert c.margin_per_type["cf_negation"].margin == 1.0
    m = r.metrics()
    assert (m["structure/grounded"], m["structure/grounded_wrong_image"], m["structure/grounded_margin"],
            m["structure/cf_negation"]) == (1.0, 0.0, 1.0, 1.0)
    assert m["structure/overall"] == 1.0  # the perturbation test is unchanged by the counterfactuals
    md = r.markdown("structure")
    assert "## Grounded structure" in md and "| **Grounded overall**" in md
    assert "Counterfactual: negation flip (`cf_negation`)" in md
    assert "grounded structure 100.0%" in r.headline() and "grounded margin +100.0 pts" in r.headline()
    d = json.loads(json.dumps(r.to_json()))
    assert d["schema"] == "pertvl-structure/3" and d["grounded"]["samples_without_record"] == 1
    assert StructureResult.from_json(d).to_json() == d
    from pertvl.evaluate.catalog import metric_info, result_from_json

    assert result_from_json(d).grounded.overall.accuracy == 1.0
    assert metric_info("structure/grounded_margin").label.startswith("Grounded margin")
    assert metric_info("structure/cf_negation").chance == 0.5
    # per-type margins: in the flat metrics with their CIs; laterality and finding in the summary
    assert m["structure/cf_negation_margin"] == 1.0 and m["structure/cf_negation_margin_ci_low"] == 1.0
    assert m["structure/cf_severity_margin"] is None  # not measured, never 0
    lat = metric_info("structure/cf_laterality_margin")
    assert lat.label == "Counterfactual: laterality swap, margin (own − wrong)" and lat.summary
    assert lat.ci == ("structure/cf_laterality_margin_ci_low", "structure/cf_laterality_margin_ci_high")
    assert not metric_info("structure/cf_negation_margin").summary
    assert not metric_info("structure/cf_laterality_margin_ci_low").summary
    assert not metric_info("structure_local/cf_laterality_margin").summary  # local S: grounded columns only
    assert metric_info("structure/cf_laterality_margin").order > metric_info("structure/cf_laterality").order


def test_grounded_margin_is_zero_for_a_constant_image_embedding():
    enc, samples = cf_case(constant_image=True)
    r = evaluate_structure(enc, samples, types=("reverse",), bootstrap=50)
    c = r.grounded.controls
    assert c.margin.margin == 0.0 and c.margin.n == 6
    assert all(mt.margin in (0.0, None) for mt in c.margin_per_type.values())
    assert r.grounded.overall.accuracy == c.wrong_image.overall.accuracy == c.mean_image.overall.accuracy


def test_counterfactuals_do_not_change_the_perturbation_numbers():
    enc, samples = cf_case()
    with_cf = evaluate_structure(enc, samples, types=("reverse",), bootstrap=50).to_json()
    for s in samples:
        del s.meta["counterfactuals"], s.meta["cf_unavailable"]
    without = evaluate_structure(enc, samples, types=("reverse",), bootstrap=50).to_json()
    assert without.pop("grounded") is None and with_cf.pop("grounded") is not None
    assert with_cf == without


def test_text_disjoint_subset_counts_and_accuracy():
    """Images 0-5; the reports of images 0 and 1 (and a repeat of 1) occur in training, spelled
    differently (cleaning decides); image 0 is also scored wrong, so the disjoint subset is 4/4."""
    enc, samples = cf_case()
    enc.text_vecs["report 0 small right effusion"] = np.eye(7)[6] * -1.0  # image 0: original below its negatives
    samples.append(make_sample(6, "report 1 small right effusion", {"reverse": "effusion right small 1 report"},
                               study="s6", labels={"Finding 6": 1.0}))
    enc.image_vecs[6] = np.eye(7)[1]
    train = ["Report 0 small right effusion.", "REPORT 1  small right effusion", "something else", ""]
    r = evaluate_structure(enc, samples, types=("reverse",), bootstrap=50, train_texts=train)
    td = r.text_disjoint
    assert (td.images, td.images_text_in_train, td.texts, td.texts_in_train, td.train_texts) == (7, 3, 6, 2, 3)
    assert (td.overall.n, td.overall.accuracy) == (4, 1.0)
    assert r.overall.n == 7 and r.overall.accuracy == pytest.approx(6 / 7)
    assert td.grounded is not None and td.grounded.n == 4
    assert r.metrics()["structure/text_disjoint"] == 1.0
    assert "4 of 7 images (4 of 6 distinct texts) have a report that is no training report" in r.headline()
    assert "## Text-disjoint subset" in r.markdown("structure")
    d = json.loads(json.dumps(r.to_json()))
    assert StructureResult.from_json(d).to_json() == d
    assert evaluate_structure(enc, samples, types=("reverse",), bootstrap=0).text_disjoint is None


def test_text_structure_adds_the_text_counterfactual_rows():
    """cf_laterality and cf_negation of the findings as written become extra per-type rows; the
    overall accuracy and the perturbation rows are those of a run without them."""
    from types import SimpleNamespace

    from pertvl.data.counterfactual import text_counterfactual_record
    from pertvl.data.text import clean_text
    from pertvl.evaluate.text_structure import evaluate_text_structure
    from tests.test_evaluate import HashedNgramEncoder

    raws = ["There is a small left pneumothorax.", "Heart size is normal. The lungs are clear.",
            "Right basilar atelectasis. No left pleural effusion."]
    imps = ["small left pneumothorax", "normal chest", "right basilar atelectasis"]
    records = [(imp, SimpleNamespace(text=clean_text(raw), perturbations={"reverse": " ".join(clean_text(raw).split()[::-1])},
                                     unavailable={})) for imp, raw in zip(imps, raws, strict=True)]
    cfs = [text_counterfactual_record(raw) for raw in raws]
    assert cfs[0].counterfactuals == {"cf_laterality": "there is a small right pneumothorax",
                                      "cf_negation": "there is no small left pneumothorax"}
    enc = HashedNgramEncoder(2)
    plain = evaluate_text_structure(enc, records, types=("reverse",), bootstrap=0)
    r = evaluate_text_structure(enc, records, types=("reverse",), bootstrap=0, counterfactuals=cfs)
    assert list(r.per_type) == ["reverse", "cf_laterality", "cf_negation"]
    assert r.overall == plain.overall
    assert r.per_type["reverse"] == plain.per_type["reverse"]
    lat, neg = r.per_type["cf_laterality"], r.per_type["cf_negation"]
    assert (lat.n, lat.unavailable, neg.n, neg.chance) == (2, 1, 3, 0.5)
    # bigrams: "small left pneumothorax" shares "small left"/"left pneumothorax" with the findings,
    # not with the laterality swap; the negation keeps "small left pneumothorax"
    # bigrams: the impressions share "small left"/"left pneumothorax"/"right basilar" with the
    # findings and not with their laterality swaps; the negation keeps most of those bigrams
    assert (lat.correct, neg.correct) == (2, 1)
    assert r.metrics()["text_structure/cf_laterality"] == lat.accuracy
    md = r.markdown("text_structure")
    assert "Counterfactual: laterality swap (`cf_laterality`)" in md and "not candidates of the overall" in md
    d = json.loads(json.dumps(r.to_json()))
    assert d["schema"] == "pertvl-text-structure/3" and StructureResult.from_json(d).to_json() == d
    with pytest.raises(ValueError, match="counterfactual records"):
        evaluate_text_structure(enc, records, counterfactuals=cfs[:1])


def test_retrieval_text_disjoint_subset():
    """Three images, reports A (seen in training), B and C; image 2 retrieves A instead of C."""
    from pertvl.evaluate.retrieval import RetrievalResult, evaluate_retrieval

    eye = np.eye(3)
    texts = ["heart size normal", "left effusion", "right effusion"]
    samples = [make_sample(i, t) for i, t in enumerate(texts)]
    enc = LookupEncoder({0: eye[0], 1: eye[1], 2: eye[0] + 0.1 * eye[2]}, dict(zip(texts, eye, strict=True)))
    r = evaluate_retrieval(enc, samples, ks=(1, 5), train_texts=["Heart size normal.", "something else"])
    td = r.text_disjoint
    assert (td["train_texts"], td["images"], td["texts"]) == (2, 2, 2)
    assert r.image_to_text["R@1"] == pytest.approx(2 / 3) and td["image_to_text"] == {"R@1": 0.5, "R@5": 1.0}
    assert td["text_to_image"]["R@1"] == 1.0
    assert r.metrics()["retrieval/text_disjoint_image_to_text/R@1"] == 0.5
    assert "Text-disjoint subset" in r.markdown("retrieval") and "text-disjoint image→report R@1 50.0%" in r.headline()
    d = json.loads(json.dumps(r.to_json()))
    assert d["schema"] == "pertvl-retrieval/2" and RetrievalResult.from_json(d).to_json() == d
    assert list(d)[0] == "schema" and list(d)[-2:] == ["text_disjoint", "info"]
    assert evaluate_retrieval(enc, samples, ks=(1,)).text_disjoint is None
