"""Grounding evaluation: the phantom masks and finding words, the pointing game on stand-in
encoders whose attention is known (random: chance; oracle: 100 %), outputs and the registry."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pertvl.data.phantom import generate_phantoms
from pertvl.data.phantom.findings import FINDING_TYPES
from pertvl.data.phantom.grounding import PhantomTruth, finding_words, phantom_masks, region_shares
from pertvl.data.records import read_pairs
from pertvl.data.text import clean_text
from pertvl.evaluate.grounding import evaluate_grounding, item_scores
from pertvl.evaluate.report import write_result
from pertvl.infer import ImageFeatures, TextFeatures

GRID = (8, 8)


@dataclass
class Sample:
    key: str
    image: np.ndarray
    meta: dict


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """80 phantoms at 64 px as shard samples would carry them (cleaned text, labels, extra)."""
    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(n=80, seed=5, size=64, out=out)
    samples = []
    for p in read_pairs(out / "pairs.jsonl"):
        image = np.asarray(Image.open(out / p.image).convert("L"))
        samples.append(Sample(p.id, image, {"id": p.id, "study_id": p.study_id, "labels": p.labels,
                                            "text": clean_text(p.text), "extra": p.extra}))
    return samples


def _key(image: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(image).tobytes())


class StubLocalEncoder:
    """image_features / text_features with known attention.

    oracle: region m has, per finding type, channel = 30 where cell m overlaps the finding's mask;
    a finding word is the one-hot of its type, so it attends where its finding is (an indicator,
    not the share: GLoRIA's softmax over the report's words would let a finding with a larger
    share in the same cell, an effusion around atelectasis, take the cell). Otherwise: random
    region and word features (attention independent of the masks).
    """

    def __init__(self, samples, oracle: bool, seed: int = 0):
        self.oracle = oracle
        self.rng = np.random.default_rng(seed)
        self.truth = {_key(s.image): PhantomTruth.from_meta(s.meta) for s in samples}
        self.dim = len(FINDING_TYPES) + 1

    def image_features(self, images):
        regions = []
        for im in images:
            if not self.oracle:
                regions.append(self.rng.standard_normal((GRID[0] * GRID[1], self.dim)))
                continue
            u8 = np.round(im[0] * 255).astype(np.uint8)
            masks = phantom_masks(self.truth[_key(u8)])
            r = np.zeros((GRID[0] * GRID[1], self.dim))
            for t, m in masks.items():
                r[:, FINDING_TYPES.index(t)] = 30.0 * (region_shares(m, GRID).ravel() > 0)
            regions.append(r)
        return ImageFeatures(np.zeros((len(images), 4), np.float32), np.stack(regions).astype(np.float32), GRID)

    def text_features(self, texts):
        width = max(len(t.split()) for t in texts)
        words = np.zeros((len(texts), width, self.dim), np.float32)
        mask = np.zeros((len(texts), width), bool)
        for i, t in enumerate(texts):
            n = len(t.split())
            mask[i, :n] = True
            if not self.oracle:
                words[i, :n] = self.rng.standard_normal((n, self.dim))
                continue
            truth = next(tr for tr in self.truth.values() if _fw_text(tr) == t)
            for w in finding_words(truth, t):
                words[i, w.index, FINDING_TYPES.index(w.type)] = 1.0
        return TextFeatures(np.zeros((len(texts), 4), np.float32), words, mask, list(texts),
                            [t.split() for t in texts])


def _fw_text(truth: PhantomTruth) -> str:
    from pertvl.data.phantom.corpus import _streams
    from pertvl.data.phantom.language import compose_report

    return clean_text(" ".join(s.text for s in compose_report(truth.findings, _streams(truth.seed, truth.index)[2])))


def test_finding_words_name_present_findings_only(phantoms):
    total = 0
    for s in phantoms:
        truth = PhantomTruth.from_meta(s.meta)
        ws = finding_words(truth, s.meta["text"])
        words = s.meta["text"].split()
        assert all(words[w.index] == w.word for w in ws)
        assert {w.type for w in ws} == {f.type for f in truth.findings}  # each present finding is named
        total += len(ws)
    assert total > 40
    with pytest.raises(ValueError, match="re-composed"):
        finding_words(PhantomTruth.from_meta(phantoms[0].meta), "no acute findings")
    with pytest.raises(ValueError, match="extra"):
        PhantomTruth.from_meta({"text": "x"})


def test_item_scores_uniform_oracle_and_ties():
    share = np.zeros((4, 4))
    share[1, 2], share[3, 0] = 1.0, 0.25
    uniform = np.full((4, 4), 1 / 16)
    assert item_scores(uniform, share) == pytest.approx((2 / 16, 2 / 16, 1.25 / 16, 1.25 / 16))
    oracle = share / share.sum()
    p, chance, mass, area = item_scores(oracle, share)
    assert p == 1.0 and mass == pytest.approx((1 + 0.25**2) / 1.25) and area == pytest.approx(1.25 / 16)
    with pytest.raises(ValueError, match="grid"):
        item_scores(uniform, share[:2])


def test_pointing_game_is_chance_for_random_attention_many_items():
    """Random maps against random masks: the mean hit rate is the mean chance within 4 standard errors."""
    rng = np.random.default_rng(0)
    hits, chances, masses, areas = [], [], [], []
    for _ in range(3000):
        share = (rng.random((8, 8)) < rng.uniform(0.05, 0.4)).astype(float)
        if not share.any():
            continue
        attn = rng.dirichlet(np.full(64, 0.3)).reshape(8, 8)
        p, c, m, a = item_scores(attn, share)
        hits.append(p), chances.append(c), masses.append(m), areas.append(a)
    n = len(hits)
    se = np.sqrt(np.sum(np.array(chances) * (1 - np.array(chances)))) / n
    assert abs(np.mean(hits) - np.mean(chances)) < 4 * se
    assert abs(np.mean(masses) - np.mean(areas)) < 4 * np.std(np.array(masses) - areas) / np.sqrt(n)


def test_grounding_random_stub_is_chance_and_oracle_is_perfect(phantoms):
    rand = evaluate_grounding(StubLocalEncoder(phantoms, oracle=False), phantoms, bootstrap=200, batch_size=16)
    o = rand.overall
    n = o.items
    assert n >= 40 and rand.images + rand.images_without_finding_words == len(phantoms) and not rand.skipped
    # Hits are Bernoulli(chance_i) under random attention: within 4 standard errors of the chance.
    items = rand.items
    se = np.sqrt(sum(it.pointing_chance * (1 - it.pointing_chance) for it in items)) / n
    assert abs(o.pointing - o.pointing_chance) < 4 * se + 1e-9
    assert o.pointing_ci95[0] <= o.pointing <= o.pointing_ci95[1]

    oracle = evaluate_grounding(StubLocalEncoder(phantoms, oracle=True), phantoms, bootstrap=200, batch_size=16)
    assert oracle.overall.items == n and oracle.overall.pointing == 1.0
    assert all(s.pointing == 1.0 for s in oracle.per_type.values())
    assert oracle.overall.mass > 3 * oracle.overall.area
    assert set(oracle.per_type) == {f.type for s in phantoms for f in PhantomTruth.from_meta(s.meta).findings}
    assert oracle.grid == GRID


def test_grounding_outputs_registry_and_skips(phantoms, tmp_path):
    from pertvl.evaluate.catalog import EVALUATIONS, result_from_json
    from pertvl.evaluate.evaluation import Suite

    samples = phantoms[:20] + [Sample("openi", phantoms[0].image, {"text": "heart normal", "labels": None})]
    r = evaluate_grounding(StubLocalEncoder(phantoms, oracle=True), samples, bootstrap=50)
    assert r.skipped == {"not_a_phantom": 1}
    paths = write_result(r, tmp_path, "grounding")
    d = json.loads(paths["json"].read_text())
    assert d["schema"] == "pertvl-grounding/1" and result_from_json(d).to_json() == d == r.to_json()
    md = paths["markdown"].read_text()
    assert "| **all finding words** |" in md and "untrained local branch" in md
    with Image.open(paths["png"]) as im:
        assert im.size == (1100, 450)
    m = r.metrics()
    assert m["grounding/pointing"] == 1.0 and "grounding/area" in m
    assert "pointing game 100.0%" in r.headline()
    e = EVALUATIONS["grounding"]
    assert {Suite.DEMO, Suite.ABLATE} <= e.suites and "--bootstrap" in e.options()
    with pytest.raises(ValueError, match="local branch"):
        evaluate_grounding(SimpleNamespace(embed_images=None), samples)


def test_finding_attention_maps_show_finding_words_only(tmp_path):
    """The demo report's maps: one per word naming a present finding, with its sentence."""
    from pertvl.data.phantom.grounding import PhantomTruth, finding_words
    from pertvl.data.records import read_pairs
    from pertvl.data.text import clean_text
    from pertvl.evaluate.report import finding_attention_maps

    corpus = tmp_path / "corpus"
    generate_phantoms(6, seed=0, size=64, out=corpus, workers=1)
    pairs = list(read_pairs(corpus / "pairs.jsonl"))
    rng = np.random.default_rng(0)

    class Stub:  # region/word features of the right shapes; the maps' values do not matter here
        def clean(self, texts):
            return [clean_text(t) for t in texts]

        def load_images(self, paths):
            return np.zeros((len(paths), 1, 64, 64), np.float32)

        def image_features(self, images):
            return SimpleNamespace(regions=rng.normal(size=(len(images), 16, 8)), grid=(4, 4))

        def text_features(self, texts):
            n = len(clean_text(texts[0]).split())
            return SimpleNamespace(words=rng.normal(size=(1, n, 8)), word_mask=np.ones((1, n), bool))

    written = finding_attention_maps(Stub(), pairs, corpus, tmp_path / "maps", limit=100)
    expected = [(p.id, w.word) for p in pairs for w in finding_words(PhantomTruth.from_meta({"extra": p.extra}),
                                                                     clean_text(p.text))]
    assert expected and len(written) == len(expected)
    for (png, caption), (pid, word) in zip(written, expected, strict=True):
        assert png.is_file() and png.name.startswith(pid) and f'"{word}"' in caption
        sentence = caption.split(" in ", 1)[1].strip('"')
        assert sentence in next(p.text for p in pairs if p.id == pid) and word in clean_text(sentence).split()
