"""Twin phantoms (pertvl.data.phantom.twins, `pertvl data twins`) and `pertvl eval twins`: the pairs
differ in one fact and their reports only in its words; the controls hold on the real twin text."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pertvl.data.counterfactual import counterfactual_record, fits_findings, parse_report
from pertvl.data.phantom import generate_phantoms
from pertvl.data.phantom.findings import Finding
from pertvl.data.phantom.twins import EDITS, generate_twins, word_diff
from pertvl.data.records import read_pairs
from pertvl.data.shards import iter_samples
from pertvl.data.shards.twins import make_twin_shards
from pertvl.evaluate.twins import CHANCE, EVALUATION, TwinResult, evaluate_twins, outcomes, twin_scores


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twins")
    generate_phantoms(n=240, seed=3, size=64, out=root / "corpus")
    make_twin_shards(str(root / "corpus"), str(root / "twins"), str(root / "shards"))
    return {"root": root, "corpus": root / "corpus", "twins": root / "twins", "shards": root / "shards"}


def side0_records(folder: Path) -> list[dict]:
    return [p.extra["twin"] for p in read_pairs(folder / "pairs.jsonl") if p.extra["twin"]["side"] == 0]


def _truth(records: list[dict]) -> list[Finding]:
    return [Finding.from_json(f) for f in records]


def test_twin_set_is_deterministic_and_its_counts_reconcile(twins, tmp_path):
    again = generate_twins(twins["corpus"], tmp_path / "again")
    assert (tmp_path / "again" / "pairs.jsonl").read_bytes() == (twins["twins"] / "pairs.jsonl").read_bytes()
    for png in sorted((twins["twins"] / "images").glob("*.png"))[:20]:
        assert (tmp_path / "again" / "images" / png.name).read_bytes() == png.read_bytes()
    summary = json.loads((twins["twins"] / "summary.json").read_text())
    assert summary["pairs"] == again["pairs"] == sum(summary["pairs_per_edit"].values()) == summary["records"] // 2
    for e in EDITS:
        assert sum(summary["pairs_per_edit_and_finding"][e].values()) == summary["pairs_per_edit"][e]
        assert summary["pairs_per_edit"][e] > 0, e  # every edit type occurs on 240 phantoms
        hist = summary["changed_words"][e]["histogram"]
        assert sum(hist.values()) == summary["pairs_per_edit"][e]
    manifest = json.loads((twins["shards"] / "manifest.json").read_text())
    assert manifest["splits"]["test"]["num_samples"] == summary["records"]


def _edited_as_declared(t: dict) -> bool:
    before, after = _truth(t["truth"][0]), _truth(t["truth"][1])
    kept = [f for f in before if f.type != t["finding"]]
    f0 = next(f for f in before if f.type == t["finding"])
    changed = [f for f in after if f not in kept]
    if t["edit"] in ("negation", "cardiomegaly"):
        return changed == [] and len(after) == len(before) - 1
    (f1,) = changed
    if t["edit"] == "laterality":
        return (f1.type, f1.severity) == (f0.type, f0.severity) and {f0.side, f1.side} == {"left", "right"}
    if t["edit"] == "severity":
        return (f1.type, f1.side, f1.location) == (f0.type, f0.side, f0.location) and f1.severity != f0.severity
    return f1.type != f0.type and (f1.side, f1.location) == (f0.side, f0.location)  # finding identity


def test_each_pair_differs_in_one_fact_and_its_reports_only_in_its_words(twins):
    records = side0_records(twins["twins"])
    assert records
    for t in records:
        assert _edited_as_declared(t), t
        truth = [_truth(t["truth"][0]), _truth(t["truth"][1])]
        for side in (0, 1):
            sentences = parse_report(t["texts"][side])
            assert fits_findings(sentences, truth[side]) is None, (side, t["texts"][side])  # the generator's own
            assert fits_findings(sentences, truth[1 - side]) is not None  # false of the other image
        removed, added = word_diff(*t["texts"])
        assert (removed, added) == (t["diff"]["removed"], t["diff"]["added"]) and (removed or added)
        if t["edit"] == "laterality":  # the same sentences with the side words swapped
            words = {re.sub(r"\W", "", w.lower()) for w in removed + added}
            assert words <= {"left", "right"} and len(removed) == len(added), t["texts"]


def test_twin_images_are_the_same_patient_with_the_finding_changed(twins):
    pairs = {p.id: p for p in read_pairs(twins["twins"] / "pairs.jsonl")}
    fractions = {}
    for pid, p in pairs.items():
        if p.extra["twin"]["side"] != 1:
            continue
        other = pairs[pid[:-1] + "0"]
        a = np.asarray(Image.open(twins["twins"] / other.image), dtype=np.int16)
        b = np.asarray(Image.open(twins["twins"] / p.image), dtype=np.int16)
        fractions.setdefault((p.extra["twin"]["edit"], p.extra["twin"]["finding"]), []).append(
            float((np.abs(a - b) > 8).mean()))
    assert all(f > 0 for fs in fractions.values() for f in fs)  # the edit is drawn
    # a nodule is small: removing it leaves the rest of the image (same patient, vessels, noise) as it was
    assert max(fractions[("negation", "nodule")]) < 0.05


def _pair_texts_and_truth(folder: Path):
    records = side0_records(folder)
    return records, [t["edit"] for t in records]


def _scores(records, fn) -> np.ndarray:
    """s[p, i, t] = fn(truth of image i, text t) over the pairs."""
    return np.array([[[fn(_truth(t["truth"][i]), t["texts"][j]) for j in (0, 1)] for i in (0, 1)] for t in records])


def test_oracle_reading_the_truth_scores_100_percent_group(twins):
    records, edits = _pair_texts_and_truth(twins["twins"])
    s = _scores(records, lambda truth, text: float(fits_findings(parse_report(text), truth) is None))
    r = twin_scores(s, edits, bootstrap=50)
    assert r.overall.values == {"text": 1.0, "image": 1.0, "group": 1.0, "pairwise": 1.0}
    assert all(st.values["group"] == 1.0 for st in r.per_edit.values())


def _train_text_prior(corpus: Path):
    """An n-gram classifier of original vs counterfactual reports, trained on the training split."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels = [], []
    for p in read_pairs(corpus / "pairs.jsonl"):
        if p.split != "train":
            continue
        rec = counterfactual_record(p.text, p.extra["findings"], seed=0)
        texts.append(rec.text)
        labels.append(1)
        texts += list(rec.counterfactuals.values())
        labels += [0] * len(rec.counterfactuals)
    vec = CountVectorizer(ngram_range=(1, 3))
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(texts), labels)
    return lambda text: float(clf.decision_function(vec.transform([text]))[0])


def test_text_only_scorers_score_exactly_zero_text_score(twins):
    from pertvl.data.text import clean_text

    records, edits = _pair_texts_and_truth(twins["twins"])
    prior = _train_text_prior(twins["corpus"])
    s = _scores(records, lambda truth, text: prior(clean_text(text)))
    assert (s[:, 0, 0] != s[:, 0, 1]).mean() > 0.9  # the classifier does tell the twin texts apart
    r = twin_scores(s, edits, bootstrap=50)
    assert (r.overall.values["text"], r.overall.values["image"], r.overall.values["pairwise"]) == (0.0, 0.0, 0.5)
    # a text-only anchor: each report's cosine with the mean of all reports (hashed bags of words)
    bags = {t: _bag(t) for rec in records for t in rec["texts"]}
    mean = np.mean(list(bags.values()), axis=0)
    s = _scores(records, lambda truth, text: float(bags[text] @ mean / np.linalg.norm(bags[text])))
    assert twin_scores(s, edits, bootstrap=0).overall.values["text"] == 0.0


def _bag(text: str, dim: int = 64) -> np.ndarray:
    v = np.zeros(dim)
    for w in text.lower().split():
        v[int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1
    return v


def test_random_scores_match_the_chance_levels(twins):
    records, edits = _pair_texts_and_truth(twins["twins"])
    r = twin_scores(np.zeros((len(records), 2, 2)), edits, bootstrap=500)
    for m in ("text", "image", "group", "pairwise"):  # the null on the same pairs brackets chance
        lo, hi = r.null_random_scores.ci95[m]
        assert lo <= CHANCE[m] <= hi, m
    assert r.overall.values["text"] == r.overall.values["image"] == 0.0  # all ties: strict > fails
    big = outcomes(np.random.default_rng(0).standard_normal((60_000, 2, 2)))
    for m in ("text", "image", "group", "pairwise"):
        se = np.sqrt(CHANCE[m] * (1 - CHANCE[m]) / 60_000)
        assert abs(big[m].mean() - CHANCE[m]) < 4 * se, m


class PixelTextEncoder:
    """Images: a fixed random projection of the pixels; texts: hashed bags of words (16-d)."""

    def __init__(self, constant_image: bool = False):
        self.constant = constant_image
        self.proj: np.ndarray | None = None

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        if self.proj is None:
            self.proj = np.random.default_rng(0).standard_normal((flat.shape[1], 16))
        emb = np.ones((len(images), 16)) if self.constant else flat @ self.proj
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        emb = np.stack([_bag(t, 16) + 1e-3 for t in texts])
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def test_constant_image_scores_zero_image_score_through_the_shards(twins):
    r = evaluate_twins(PixelTextEncoder(constant_image=True), iter_samples(twins["shards"], "test"), bootstrap=50)
    g = r.scores["global"].overall
    assert list(r.scores) == ["global"]  # no local branch: the local score is left out
    assert g.n == r.pairs == sum(r.pairs_per_edit.values()) > 0
    assert (g.values["image"], g.values["text"], g.values["group"]) == (0.0, 0.0, 0.0)
    assert g.values["pairwise"] <= 0.5  # one of two at most; hashed bags may tie (a tie fails both)


def test_eval_twins_writes_its_result(twins, tmp_path):
    import argparse

    from pertvl.evaluate.catalog import result_from_json
    from pertvl.evaluate.report import write_result

    opts = argparse.Namespace(scores="global", bootstrap=100, seed=0, twins=None, shards=str(twins["shards"]),
                              split="test", batch_size=8)
    data = EVALUATION.load(opts)
    assert data is None  # the shards are the twin shards themselves: --shards is read
    opts.shards, opts.twins = str(twins["root"]), str(twins["shards"])
    r = EVALUATION.run(PixelTextEncoder(), EVALUATION.load(opts), opts)
    paths = write_result(r, tmp_path, "twins")
    d = json.loads(paths["json"].read_text())
    assert d["schema"] == "pertvl-twins/1" and d["chance"]["group"] == pytest.approx(1 / 6)
    overall = d["scores"]["global"]["overall"]
    assert overall["n"] == d["pairs"] and len(overall["group_ci95"]) == 2
    assert set(d["scores"]["global"]["per_edit"]) == set(EDITS)
    assert TwinResult.from_json(d).to_json() == d and result_from_json(d).pairs == d["pairs"]
    md = paths["markdown"].read_text()
    assert "| **all** |" in md and "any text-only scorer" in md and "Example pairs" in md
    assert Image.open(paths["png"]).size == (650, 420)
    assert Image.open(paths["examples_png"]).size[1] == 290 * len(EDITS)
    m = r.metrics()
    assert m["twins/global/group"] == overall["group"] and "twins/global/laterality/text" in m
    assert "twins (global cosine)" in r.headline() and "  laterality (n=" in r.headline()


def test_sampler_puts_one_sided_findings_left_and_right_equally():
    """'left' must not itself hint at a counterfactual: the sampler draws each side half the time."""
    from pertvl.data.phantom.corpus import _streams
    from pertvl.data.phantom.findings import sample_findings

    sides = [f.side for i in range(4000) for f in sample_findings(_streams(0, i)[0]) if f.side in ("left", "right")]
    assert len(sides) > 2500
    assert abs(sides.count("right") / len(sides) - 0.5) < 0.03
