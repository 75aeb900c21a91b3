"""The phantom corpus: determinism, files other tools read, reports that say what the pixels show."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pertvl.cli import main as pertvl_main
from pertvl.data.phantom import (
    CHEXPERT_COLUMNS,
    FINDING_TYPES,
    Finding,
    compose_report,
    fact_holds,
    generate_phantoms,
    make_nli_items,
    phantom_id,
    render_phantom,
    sample_findings,
    write_report,
)
from pertvl.data.records import read_pairs
from pertvl.data.text import clean_text

HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
          "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
          "Fracture,Support Devices")
CHEXPERT_NAME = {"pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
                 "consolidation": "Consolidation", "cardiomegaly": "Cardiomegaly", "nodule": "Lung Lesion",
                 "atelectasis": "Atelectasis", "edema": "Edema"}
# The test's own reading of report words (independent of the generator's tables).
KEYWORDS = {"pleural_effusion": {"effusion", "effusions"}, "pneumothorax": {"pneumothorax"},
            "consolidation": {"consolidation"}, "cardiomegaly": {"cardiomegaly", "enlarged", "enlargement"},
            "nodule": {"nodule", "nodular"}, "atelectasis": {"atelectasis"}, "edema": {"edema"}}
SIDES = {"left": {"left"}, "right": {"right"}, "bilateral": {"bilateral", "bilaterally", "both"}}
SEVERITY = {"small": {"small", "focal", "patchy"}, "moderate": {"moderate", "moderately"},
            "large": {"large", "dense", "extensive"}, "mild": {"mild", "mildly"},
            "severe": {"severe", "severely"}}
NEGATIONS = {"no", "not", "without", "negative"}


def _sentences(report: str) -> list[set[str]]:
    return [set(clean_text(s).split()) for s in report.split(".") if s.strip()]


def _corpus(tmp: Path, n: int, seed: int, workers: int = 1, **kw) -> tuple[dict, Path]:
    out = tmp / f"s{seed}_w{workers}"
    return generate_phantoms(n, seed, 64, out, workers=workers, **kw), out


# ---------------------------------------------------------------------------------------------- files


def test_same_seed_same_bytes_across_workers_other_seed_differs(tmp_path):
    _, a = _corpus(tmp_path, 10, seed=3, workers=1, nli=True)
    _, b = _corpus(tmp_path, 10, seed=3, workers=2, nli=True)
    _, c = _corpus(tmp_path, 10, seed=4, workers=1, nli=True)
    names = ["pairs.jsonl", "labels.csv", "nli_train.jsonl", "nli_dev.jsonl", "nli_test.jsonl"]
    pngs = sorted(p.name for p in (a / "images").glob("*.png"))
    assert pngs == [f"{phantom_id(3, i)}.png" for i in range(10)]
    for name in names + [f"images/{p}" for p in pngs]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "pairs.jsonl").read_bytes() != (c / "pairs.jsonl").read_bytes()
    img_a = np.asarray(Image.open(a / "images" / pngs[0]))
    img_c = np.asarray(Image.open(c / "images" / f"{phantom_id(4, 0)}.png"))
    assert img_a.shape == img_c.shape == (64, 64) and img_a.dtype == np.uint8
    assert np.abs(img_a.astype(int) - img_c.astype(int)).mean() > 2


def test_pairs_labels_csv_and_summary_reconcile(tmp_path):
    summary, out = _corpus(tmp_path, 40, seed=7, nli=True)
    pairs = list(read_pairs(out / "pairs.jsonl"))
    assert len(pairs) == summary["pairs_written"] == summary["n"] == 40
    assert (out / "labels.csv").read_text().splitlines()[0] == HEADER
    assert ",".join(CHEXPERT_COLUMNS) == HEADER
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pairs)
    label_pos, finding_count, split_count = Counter(), Counter(), Counter()
    for p, row in zip(pairs, rows, strict=True):
        assert row["Path"] == p.image == f"images/{p.id}.png" and (out / row["Path"]).is_file()
        assert p.study_id == p.id and p.projection == "Frontal" and row["Frontal/Lateral"] == "Frontal"
        findings = [Finding.from_json(f) for f in p.extra["findings"]]
        expected = {name: 0.0 for name in CHEXPERT_NAME.values()}
        expected.update({CHEXPERT_NAME[f.type]: 1.0 for f in findings})
        expected["No Finding"] = 0.0 if findings else 1.0
        assert p.labels == expected
        for col in CHEXPERT_COLUMNS[5:]:
            assert row[col] == (f"{expected[col]:.1f}" if col in expected else ""), (p.id, col)
            if row[col] == "1.0":
                label_pos[col] += 1
        finding_count.update(f.type for f in findings)
        split_count[p.split] += 1
    assert summary["labels"] == {k: label_pos.get(k, 0) for k in summary["labels"]}
    assert summary["findings"] == {t: finding_count.get(t, 0) for t in FINDING_TYPES}
    assert summary["splits"] == {s: split_count.get(s, 0) for s in ("train", "val", "test")}
    assert sum(summary["findings_per_image"].values()) == 40
    for name, key in (("train", "train"), ("dev", "dev"), ("test", "test")):
        lines = (out / f"nli_{name}.jsonl").read_text().splitlines()
        assert summary["nli"][key]["items"] == len(lines)
    assert len(list((out / "images").glob("*.png"))) == 40


def test_nli_files_balanced_fields_and_splits(tmp_path):
    _, out = _corpus(tmp_path, 30, seed=11, nli=True)
    split_of = {p.id: p.split for p in read_pairs(out / "pairs.jsonl")}
    seen = set()
    for name, split in (("train", "train"), ("dev", "val"), ("test", "test")):
        items = [json.loads(line) for line in (out / f"nli_{name}.jsonl").read_text().splitlines()]
        assert all(set(it) == {"sentence1", "sentence2", "gold_label", "pairID"} for it in items)
        counts = Counter(it["gold_label"] for it in items)
        assert counts["entailment"] == counts["contradiction"] == counts["neutral"] == len(items) // 3
        for it in items:
            pid = it["pairID"].rsplit("-nli-", 1)[0]
            assert split_of[pid] == split and it["sentence1"] and it["sentence2"]
            seen.add(it["pairID"])
    assert len(seen) == 3 * len(split_of)


def test_nli_labels_follow_from_premise_and_findings():
    # Words by which a premise would speak of a type ("the lungs are clear" speaks of all lung findings).
    mentions = {t: KEYWORDS[t] | {"clear"} for t in KEYWORDS}
    mentions["cardiomegaly"] = KEYWORDS["cardiomegaly"] | {"heart", "cardiac", "cardiomediastinal"}
    mentions["pleural_effusion"] |= {"costophrenic"}
    mentions["atelectasis"] |= {"volumes"}
    mentions["nodule"] |= {"nodules"}
    negated = Counter()
    for i in range(300):
        rng = np.random.default_rng(i)
        findings = sample_findings(rng)
        sentences = compose_report(findings, rng)
        ent, con, neu = make_nli_items(sentences, findings, rng, f"p{i}")
        for item in (ent, con, neu):
            negated[item.gold_label] += bool(set(clean_text(item.sentence2).split()) & NEGATIONS)
        assert (ent.gold_label, con.gold_label, neu.gold_label) == ("entailment", "contradiction", "neutral")
        assert ent.sentence1 == con.sentence1 == neu.sentence1
        assert fact_holds(ent.hypothesis, findings), (ent, findings)
        assert not fact_holds(con.hypothesis, findings), (con, findings)
        # The neutral hypothesis speaks of a finding type the premise never mentions.
        words = set(clean_text(neu.sentence1).split())
        assert not words & mentions[neu.hypothesis.type], (neu.sentence1, neu.sentence2)
        said = {"pleural_effusion": {"fluid"}, "pneumothorax": {"air"}, "consolidation": {"consolidated"}}
        assert set(clean_text(neu.sentence2).split()) & ((mentions[neu.hypothesis.type] - {"clear"})
                                                         | said.get(neu.hypothesis.type, set()))
        # Entailment and contradiction are about a type the premise speaks of.
        for item in (ent, con):
            assert item.hypothesis.type in item.premise_topics
    # A hypothesis' polarity alone does not give its label away.
    assert all(0.3 < negated[label] / 300 < 0.7 for label in ("entailment", "contradiction", "neutral")), negated


# ---------------------------------------------------------------------------------------------- reports


def test_reports_state_present_findings_with_side_and_never_claim_absent_ones():
    lexicon = {"left", "right", "small", "large", "normal", "enlarged", "clear", "mild", "severe", "increased",
               "upper", "lower", "moderate", "sharp", "blunted"}
    lengths, with_antonym = [], 0
    for i in range(400):
        rng = np.random.default_rng(1000 + i)
        findings = sample_findings(rng)
        report = write_report(findings, rng)
        sents = _sentences(report)
        lengths.append(len(report.split()))
        with_antonym += bool(set(clean_text(report).split()) & lexicon)
        present = {f.type: f for f in findings}
        for words in sents:
            named = {t for t, kw in KEYWORDS.items() if words & kw}
            if words & NEGATIONS:
                for t in named & set(present):  # a negated present type must name the OTHER side
                    sides = {s for s, kw in SIDES.items() if words & kw}
                    assert sides and not (sides & {present[t].side, "bilateral"}), (report, findings)
            else:
                assert named <= set(present), (report, findings)
        for f in findings:
            hits = [w for w in sents if w & KEYWORDS[f.type] and not w & NEGATIONS]
            assert hits, (f, report)
            w = hits[0]
            if f.side in ("left", "right", "bilateral") and f.type != "edema":
                assert w & SIDES[f.side] and not w & (SIDES["left"] | SIDES["right"]) - SIDES[f.side], (f, report)
            assert w & SEVERITY[f.severity] or (f.severity == "severe" and w & {"marked", "markedly"}), (f, report)
            if f.location:
                level = f.location.split()[1]
                assert w & {"upper": {"upper"}, "middle": {"middle"}, "lower": {"lower", "base", "basilar"}}[level], \
                    (f, report)
        if not findings:
            assert {"clear", "normal"} <= set(clean_text(report).split()), report
    assert 10 <= min(lengths) and max(lengths) <= 45
    assert with_antonym == 400


def _reading(words: list[str]) -> Counter:
    """What each finding word is attached to: the modifier words just before it (a crude parser)."""
    mods = {"left", "right", "bilateral", "small", "moderate", "large", "mild", "severe", "no", "not",
            "upper", "lower", "middle", "enlarged", "normal", "clear"}
    keys = set().union(*KEYWORDS.values())
    return Counter((w, frozenset(m for m in words[max(0, i - 3):i] if m in mods))
                   for i, w in enumerate(words) if w in keys)


def test_shuffled_report_usually_describes_another_image():
    assert _reading("small left pleural effusion no pneumothorax".split()) != \
        _reading("small pneumothorax no left pleural effusion".split())
    differs = 0
    for i in range(300):
        rng = np.random.default_rng(5000 + i)
        words = clean_text(write_report(sample_findings(rng), rng)).split()
        shuffled = [words[j] for j in rng.permutation(len(words))]
        differs += _reading(words) != _reading(shuffled)
    assert differs >= 0.9 * 300, differs


def test_normal_report_reads_like_open_i():
    rng = np.random.default_rng(0)
    reports = [write_report([], rng) for _ in range(50)]
    assert all(set(clean_text(r).split()) & NEGATIONS for r in reports)  # some absent findings negated
    assert any(r.startswith(("Heart size is normal", "The heart is normal in size", "Normal heart size"))
               for r in reports)
    assert len(set(reports)) > 40  # synonyms and order vary


# ---------------------------------------------------------------------------------------------- findings


def test_finding_priors_and_consistency():
    rng = np.random.default_rng(42)
    samples = [sample_findings(rng) for _ in range(3000)]
    assert 0.2 < sum(not s for s in samples) / len(samples) < 0.3
    assert max(len(s) for s in samples) == 3
    counts = Counter(f.type for s in samples for f in s)
    assert set(counts) == set(FINDING_TYPES) and min(counts.values()) > 100
    for s in samples:
        by = {f.type: f for f in s}
        if "pneumothorax" in by and "pleural_effusion" in by:
            assert by["pleural_effusion"].side not in (by["pneumothorax"].side, "bilateral")
        if "nodule" in by and "consolidation" in by:
            assert by["nodule"].location != by["consolidation"].location
    edema = [s for s in samples if any(f.type == "edema" for f in s)]
    assert sum(any(f.type == "cardiomegaly" for f in s) for s in edema) / len(edema) > 0.3


def test_bad_findings_and_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="severity must be one of"):
        Finding("pleural_effusion", "huge", "left")
    with pytest.raises(ValueError, match="disagrees with location"):
        Finding("nodule", "small", "left", "right upper lobe")
    with pytest.raises(ValueError, match="at most one finding per type"):
        render_phantom([Finding("edema", "mild", "bilateral")] * 2, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="--size must be"):
        generate_phantoms(2, 0, 16, tmp_path)
    with pytest.raises(ValueError, match="--seed must be"):
        generate_phantoms(2, -1, 64, tmp_path)


# ---------------------------------------------------------------------------------------------- pixels

S = 128


def _box(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    """Mean intensity of an image box given in fractions (x: image left -> right, y: top -> bottom)."""
    return float(img[int(y0 * S):int(y1 * S), int(x0 * S):int(x1 * S)].astype(float).mean())


def _heart_width(img: np.ndarray) -> float:
    """Width (fraction of the image) of the bright run around the heart just above the domes."""
    band = img[int(0.64 * S):int(0.70 * S)].astype(float).mean(0)
    c = int(0.55 * S)
    thr = 0.5 * (np.percentile(band, 25) + band[c])
    left, right = c, c
    while left > 0 and band[left - 1] > thr:
        left -= 1
    while right < S - 1 and band[right + 1] > thr:
        right += 1
    return (right - left + 1) / S


def _pair(finding: Finding, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same patient (same generator state) without and with `finding`."""
    return (render_phantom([], S, np.random.default_rng(seed)),
            render_phantom([finding], S, np.random.default_rng(seed)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pixels_agree_with_findings(seed):
    # Patient's LEFT = image RIGHT. A left pneumothorax darkens the image-right apex only.
    base, img = _pair(Finding("pneumothorax", "moderate", "left"), seed)
    assert _box(base, .62, .74, .18, .30) - _box(img, .62, .74, .18, .30) > 8
    assert _box(base, .26, .38, .18, .30) == _box(img, .26, .38, .18, .30)
    base, img = _pair(Finding("pneumothorax", "small", "right"), seed)
    assert _box(base, .26, .38, .16, .26) - _box(img, .26, .38, .16, .26) > 3
    assert _box(base, .62, .74, .16, .26) == _box(img, .62, .74, .16, .26)
    # A left effusion whitens the image-right base; a small right one the image-left costophrenic angle.
    base, img = _pair(Finding("pleural_effusion", "moderate", "left"), seed)
    assert _box(img, .6, .82, .66, .78) - _box(base, .6, .82, .66, .78) > 12
    assert _box(img, .18, .4, .66, .78) == _box(base, .18, .4, .66, .78)
    base, img = _pair(Finding("pleural_effusion", "small", "right"), seed)
    assert _box(img, .12, .26, .68, .8) - _box(base, .12, .26, .68, .8) > 8
    # Cardiomegaly widens the heart silhouette (even mild: CTR >= 0.56 vs <= 0.47).
    base, img = _pair(Finding("cardiomegaly", "mild"), seed)
    assert _heart_width(img) - _heart_width(base) > 0.05
    base, big = _pair(Finding("cardiomegaly", "severe"), seed)
    assert _heart_width(big) > _heart_width(img)
    # Right upper lobe consolidation: the image-left upper zone; edema: both perihilar regions.
    base, img = _pair(Finding("consolidation", "small", "right", "right upper lobe"), seed)
    assert _box(img, .15, .45, .15, .45) - _box(base, .15, .45, .15, .45) > 4
    assert _box(img, .55, .85, .15, .45) == _box(base, .55, .85, .15, .45)
    base, img = _pair(Finding("edema", "mild", "bilateral"), seed)
    for x0, x1 in ((.28, .42), (.58, .72)):
        assert _box(img, x0, x1, .35, .55) - _box(base, x0, x1, .35, .55) > 8
    base, img = _pair(Finding("nodule", "small", "left", "left upper lobe"), seed)
    diff = img.astype(int) - base.astype(int)
    assert diff[:, S // 2:].max() > 50 and np.abs(diff[:, : int(0.4 * S)]).max() == 0
    base, img = _pair(Finding("atelectasis", "mild", "right", "right lower lobe"), seed)
    assert _box(img, .1, .45, .5, .85) - _box(base, .1, .45, .5, .85) > 4


def test_render_is_deterministic_and_varied():
    a = render_phantom([{"type": "edema", "severity": "mild", "side": "bilateral"}], 96, np.random.default_rng(5))
    b = render_phantom([Finding("edema", "mild", "bilateral")], 96, np.random.default_rng(5))
    c = render_phantom([Finding("edema", "mild", "bilateral")], 96, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == (96, 96) and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a[:, :3].mean() < 40 and a[int(0.9 * 96), 48] > 150  # air outside the body, dense abdomen


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "corpus"
    rc = pertvl_main(["data", "phantom", "--n", "6", "--seed", "2", "--size", "64", "--out", str(out),
                      "--nli", "--preview"])
    assert rc == 0
    assert "wrote 6 phantoms" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 2 and summary["image_size"] == 64 and summary["generator_version"]
    assert {"total_s", "phantoms_per_s"} <= set(summary["timings"])
    with Image.open(out / "preview.png") as im:
        assert im.mode == "L" and im.size[0] == 4 * 224 and im.size[1] >= 2 * 224
    assert len(list(read_pairs(out / "pairs.jsonl"))) == 6
    assert pertvl_main(["data", "phantom", "--n", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--n must be a positive" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert pertvl_main(["data", "phantom", "--n", "2", "--size", "64", "--out", str(tmp_path / "a_file")]) == 1
    assert "cannot write the corpus to" in capsys.readouterr().err


def test_fact_holds_checks_the_severity_of_a_bilateral_finding():
    """A present bilateral fact holds only with the severity (and location) it names: "severe
    pulmonary edema" is false of mild edema (it used to be answered by the side alone)."""
    from pertvl.data.phantom.findings import Finding
    from pertvl.data.phantom.language import Fact

    mild = [Finding("edema", "mild", "bilateral")]
    assert fact_holds(Fact("edema", True, "bilateral"), mild)
    assert fact_holds(Fact("edema", True, "bilateral", "mild"), mild)
    assert not fact_holds(Fact("edema", True, "bilateral", "severe"), mild)
    effusions = [Finding("pleural_effusion", "small", "bilateral")]
    assert fact_holds(Fact("pleural_effusion", True, "left", "small"), effusions)
    assert not fact_holds(Fact("pleural_effusion", True, "bilateral", "large"), effusions)
    assert not fact_holds(Fact("pleural_effusion", True, "bilateral"), [Finding("pleural_effusion", "small", "left")])


def test_finding_masks_cover_the_drawn_finding():
    """The mask of a lone finding holds the pixels that change when the finding is drawn: the same
    generator state rendered with and without it (same patient, vessels and noise)."""
    from pertvl.data.phantom.render import finding_masks

    cases = [Finding("pleural_effusion", "moderate", "left"), Finding("pneumothorax", "large", "right"),
             Finding("consolidation", "large", "right", "right lower lobe"),
             Finding("nodule", "large", "left", "left upper lobe"), Finding("edema", "severe", "bilateral"),
             Finding("atelectasis", "moderate", "right", "right lower lobe"), Finding("cardiomegaly", "severe")]
    for seed, f in enumerate(cases):
        with_f = render_phantom([f], 128, np.random.default_rng(seed)).astype(float)
        without = render_phantom([], 128, np.random.default_rng(seed)).astype(float)
        masks = finding_masks([f], 128, np.random.default_rng(seed))
        assert list(masks) == [f.type]
        mask = masks[f.type]
        assert mask.dtype == bool and mask.shape == (128, 128) and 0 < mask.mean() < 0.5
        diff = np.abs(with_f - without)
        # Inside the mask the image changed far more than outside it.
        assert diff[mask].mean() > 3 * diff[~mask].mean(), f
        if f.type not in ("edema", "atelectasis", "cardiomegaly"):  # those also change lung-wide / the anatomy
            changed = diff > 20
            assert changed[mask].sum() > 0.8 * changed.sum(), f  # most strongly changed pixels are inside
        # Deterministic, and the same as the packed image's rendering stream gives.
        again = finding_masks([f], 128, np.random.default_rng(seed))[f.type]
        assert np.array_equal(mask, again)
