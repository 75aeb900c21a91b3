"""The grounded structure test's references: the empirical null from random anchors and the text
prior (an n-gram classifier trained on training originals vs counterfactuals, no image)."""

from __future__ import annotations

import json

import numpy as np

from pertvl.evaluate.structure import StructureResult, evaluate_structure
from tests.test_grounded_structure import cf_case


def _train_pairs(n: int = 40) -> list[tuple[str, list[str]]]:
    """Training reports whose counterfactuals give themselves away by text: 'left' and 'no' mark them."""
    return [(f"report {i} small right effusion", [f"report {i} small left effusion", f"report {i} no right effusion"])
            for i in range(n)]


def test_grounded_accuracy_stands_beside_its_empirical_null_and_text_prior():
    enc, samples = cf_case(n=8)
    r = evaluate_structure(enc, samples, types=("reverse",), bootstrap=20, train_counterfactuals=_train_pairs())
    refs = r.grounded.references
    assert refs is not None and refs.text_prior is not None
    # a text-only classifier solves these counterfactuals without the image: the old test is not grounded
    assert refs.text_prior.overall == 1.0 and refs.text_prior.per_type["cf_negation"] == 1.0
    # random anchors: original vs one counterfactual is a coin flip; the range brackets 50 %
    lo, hi = refs.null_random_anchors.per_type_range["cf_negation"]
    assert lo <= 0.5 <= hi and 0.3 < refs.null_random_anchors.per_type["cf_negation"] < 0.7
    null = refs.null_random_anchors
    assert 0.0 < null.overall < 0.6 and null.per_type["cf_severity"] is None  # never measured
    d = json.loads(json.dumps(r.to_json()))
    assert StructureResult.from_json(d).to_json() == d
    assert d["grounded"]["references"]["null_random_anchors"]["overall"] == refs.null_random_anchors.overall
    md = r.markdown("structure")
    assert "### Grounded structure against its references" in md and "text prior (no image)" in md
    assert "empirical null" in r.headline() and "text prior 100.0%" in r.headline()


def test_without_training_counterfactuals_the_null_stands_alone():
    enc, samples = cf_case(n=6)
    r = evaluate_structure(enc, samples, types=("reverse",), bootstrap=0)
    refs = r.grounded.references
    assert refs.text_prior is None and refs.null_random_anchors.overall is not None
    again = evaluate_structure(enc, samples, types=("reverse",), bootstrap=0)
    assert again.grounded.references.null_random_anchors == refs.null_random_anchors  # seeded
    assert "not measured" in r.markdown("structure")
    assert np.isfinite(refs.null_random_anchors.overall)


def test_grounded_partners_share_no_finding():
    from pertvl.evaluate.structure import wrong_image_partners

    labels = [{"Edema", "Cardiomegaly"}, {"Edema"}, {"No Finding"}, {"Pleural Effusion"}, {"No Finding"},
              {"Cardiomegaly", "Pleural Effusion"}, {"Lung Lesion"}, {"Edema", "Pleural Effusion"}]
    sig = [frozenset(x) for x in labels] * 3
    studies = [f"s{i}" for i in range(len(sig))]
    loose = wrong_image_partners(sig, studies, seed=0)
    strict = wrong_image_partners(sig, studies, seed=0, disjoint=True)
    assert any(sig[i] & sig[j] for i, j in enumerate(loose) if j >= 0)  # "labels differ" lets them share one
    assert (strict >= 0).sum() >= len(sig) - 2
    assert all(not sig[i] & sig[j] for i, j in enumerate(strict) if j >= 0)
