"""Counterfactual reports (issue 13, section 2): every type contradicts its image by `fact_holds`,
speaks the report generator's own language, and is deterministic by seed; the text rules for
real reports give exactly the reviewed outputs."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from pertvl.data.counterfactual import (
    COUNTERFACTUAL_TYPES,
    TEXT_COUNTERFACTUAL_TYPES,
    UNAVAILABLE_REASONS,
    Counterfactual,
    Kind,
    Reason,
    _text_results,
    counterfactual_record,
    fits_findings,
    parse_report,
    phantom_counterfactuals,
    read_counterfactuals,
    summary_path_for,
    text_counterfactual_record,
    write_counterfactuals,
)
from pertvl.data.phantom import sample_findings
from pertvl.data.phantom.findings import Finding, as_findings
from pertvl.data.phantom.language import Fact, compose_report, fact_holds
from pertvl.data.records import Pair, write_pairs
from pertvl.data.text import clean_text

N_PHANTOMS = 1000
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def text_counterfactuals(text: str) -> dict[str, str]:
    """The text counterfactuals that apply, as written (before cleaning)."""
    return {t: r for t, r in _text_results(text).items() if not isinstance(r, Reason)}


def _phantom(seed: int, i: int) -> tuple[list[Finding], list]:
    """Findings and report sentences of phantom i of corpus `seed`, as `pertvl data phantom`
    draws them (streams 0 and 2 of SeedSequence(seed, spawn_key=(i,))), without rendering."""
    streams = np.random.SeedSequence(seed, spawn_key=(i,)).spawn(4)
    fs = sample_findings(np.random.default_rng(streams[0]))
    return fs, compose_report(fs, np.random.default_rng(streams[2]))


@pytest.fixture(scope="module")
def corpus():
    """1,000 phantoms of corpus seed 0 (reports only) and their counterfactuals, record seed 0."""
    out = []
    for i in range(N_PHANTOMS):
        fs, sents = _phantom(0, i)
        report = " ".join(s.text for s in sents)
        out.append((fs, sents, report, phantom_counterfactuals(report, fs, seed=0)))
    return out


@pytest.fixture(scope="module")
def language():
    """The generator's language: words and within-sentence word bigrams of 4,000 other reports."""
    words: set[str] = set()
    bigrams: set[tuple[str, str]] = set()
    for i in range(4000):
        for s in _phantom(1, i)[1]:
            ws = ["<s>", *_WORD.findall(s.text.lower()), "</s>"]
            words.update(ws)
            bigrams.update(zip(ws, ws[1:], strict=False))
    return words, bigrams


def _holds(fact: Fact, fs) -> bool:
    # fact_holds answers a present bilateral fact by its side alone; with at most one finding per
    # type, the severity of a bilateral finding is checked by the same fact without its side.
    if fact.present and fact.side == "bilateral":
        return fact_holds(fact, fs) and fact_holds(replace(fact, side=None), fs)
    return fact_holds(fact, fs)


def test_types_table_and_reasons_are_closed():
    assert tuple(COUNTERFACTUAL_TYPES) == ("cf_laterality", "cf_severity", "cf_finding", "cf_negation")
    assert all(r.name == k and r.label and r.rule for k, r in COUNTERFACTUAL_TYPES.items())
    with pytest.raises(TypeError):
        COUNTERFACTUAL_TYPES["cf_new"] = COUNTERFACTUAL_TYPES["cf_finding"]  # type: ignore[index]
    assert set(TEXT_COUNTERFACTUAL_TYPES) <= set(COUNTERFACTUAL_TYPES)
    assert UNAVAILABLE_REASONS == tuple(r.value for r in Reason)


def test_parser_reads_the_facts_the_generator_attached(corpus):
    """parse_report, from the words alone, gives every sentence exactly the facts compose_report
    attached; and every generated report passes the report-level rules of `fits_findings`."""
    for fs, sents, report, _ in corpus:
        parsed = parse_report(report)
        assert [p.text for p in parsed] == [s.text for s in sents]
        assert [p.facts for p in parsed] == [s.facts for s in sents], report
        assert fits_findings(parsed, fs) is None, report


def test_every_counterfactual_contradicts_its_image(corpus, capsys):
    made: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for fs, _, report, out in corpus:
        assert list(out) == list(COUNTERFACTUAL_TYPES)
        for t, cf in out.items():
            if isinstance(cf, Reason):
                reasons[(t, cf.value)] += 1
                continue
            made[t] += 1
            assert isinstance(cf, Counterfactual) and cf.type == t
            facts = [fa for s in parse_report(cf.report) for fa in s.facts]
            false = [fa for fa in facts if not _holds(fa, fs)]
            assert false, (t, report, cf.report)  # contradicts the image ...
            assert tuple(false) == cf.contradicted
            new = as_findings(cf.findings)
            assert all(_holds(fa, new) for fa in facts), (t, cf.report)  # ... and describes another one
            assert fits_findings(parse_report(cf.report), new) is None
            assert cf.text == clean_text(cf.report) != clean_text(report)
            # The edit is the one the type names, on one finding.
            old_set, new_set = set(fs), set(new)
            gone, came = old_set - new_set, new_set - old_set
            if t == "cf_negation":
                assert len(gone) + len(came) == 1
            else:
                assert len(gone) == len(came) == 1, (t, fs, new)
                (g,), (c,) = gone, came
                if t == "cf_laterality":
                    assert (g.type, g.severity) == (c.type, c.severity) and {g.side, c.side} == {"left", "right"}
                elif t == "cf_severity":
                    assert (g.type, g.side, g.location) == (c.type, c.side, c.location) and g.severity != c.severity
                else:
                    assert g.type != c.type and c.type not in {f.type for f in fs}
    # Unavailable exactly when the phantom offers nothing to edit, or (rarely) no edit passes.
    for fs, _, _, out in corpus:
        lateral = any(f.side in ("left", "right") for f in fs)
        assert (out["cf_laterality"] == Reason.NO_LATERALIZED_FINDING) == (not lateral)
        assert (out["cf_severity"] == Reason.NO_GRADED_FINDING) == (not fs)
        assert (out["cf_finding"] == Reason.NO_PRESENT_FINDING) == (not any(f.type != "cardiomegaly" for f in fs))
    with capsys.disabled():
        print(f"\ncounterfactuals on {N_PHANTOMS} phantoms (corpus seed 0, record seed 0): "
              + ", ".join(f"{t} {made[t]}" for t in COUNTERFACTUAL_TYPES)
              + "; unavailable: " + ", ".join(f"{t}/{r} {n}" for (t, r), n in sorted(reasons.items())))
    assert made["cf_negation"] == N_PHANTOMS  # every report has a heart sentence to flip
    assert made["cf_severity"] == sum(bool(fs) for fs, *_ in corpus)
    assert made["cf_laterality"] >= 0.9 * sum(any(f.side in ("left", "right") for f in fs) for fs, *_ in corpus)
    assert made["cf_finding"] >= 0.95 * sum(any(f.type != "cardiomegaly" for f in fs) for fs, *_ in corpus)


def test_counterfactuals_speak_the_generator_language(corpus, language):
    """No word, and no word pair inside a sentence, that the report templates never write; every
    finding sentence is one the generator writes for that finding."""
    words, bigrams = language
    support: dict[Finding, set[str]] = {}

    def writes(f: Finding) -> set[str]:
        if f not in support:
            fact = Fact(f.type, True, f.side, f.severity, f.location)
            support[f] = {s.text for k in range(800) for s in compose_report([f], np.random.default_rng([77, k]))
                          if s.facts == (fact,)}
        return support[f]

    for *_, out in corpus:
        for cf in out.values():
            if not isinstance(cf, Counterfactual):
                continue
            for s in parse_report(cf.report):
                ws = ["<s>", *_WORD.findall(s.text.lower()), "</s>"]
                assert set(ws) <= words, (set(ws) - words, cf.report)
                assert set(zip(ws, ws[1:], strict=False)) <= bigrams, (s.text, cf.report)
                if s.kind is Kind.PRESENT:
                    f = next(f for f in cf.findings if f.type == s.facts[0].type)
                    assert s.text in writes(f), (s.text, f)


def test_deterministic_by_seed(corpus):
    some = corpus[:150]
    again = [phantom_counterfactuals(report, fs, seed=0) for fs, _, report, _ in some]
    assert again == [out for *_, out in some]
    other = [phantom_counterfactuals(report, fs, seed=1) for fs, _, report, _ in some]
    changed = Counter(t for a, b in zip(again, other, strict=True) for t in COUNTERFACTUAL_TYPES if a[t] != b[t])
    assert all(changed[t] > 0 for t in COUNTERFACTUAL_TYPES), changed


# Two phantoms and reports written in the generator's templates (a right effusion with its side
# negation and right basal atelectasis; a normal study), and their reviewed counterfactuals.
_FIXED = [
    ([Finding("pleural_effusion", "small", "right"), Finding("atelectasis", "mild", "right", "right lower lobe")],
     "Heart size is normal. There is a small right pleural effusion. Mild right basilar atelectasis. "
     "No pneumothorax or pulmonary edema. No left pleural effusion."),
    ([], "The heart is normal in size. The lungs are clear. No pneumothorax or pleural effusion. "
         "No acute bony abnormality."),
]
_EXPECTED = {
    0: [{
        "cf_laterality": "heart size is normal there is a small left pleural effusion mild right basilar atelectasis "
                         "no pneumothorax or pulmonary edema no right pleural effusion",
        "cf_severity": "heart size is normal there is a large right pleural effusion mild right basilar atelectasis "
                       "no pneumothorax or pulmonary edema no left pleural effusion",
        # the effusion (and its side negation) gone, a consolidation in its place
        "cf_finding": "heart size is normal small right lower lung zone consolidation mild right basilar "
                      "atelectasis no pneumothorax or pulmonary edema",
        # the heart sentence drawn as the generator writes it, not the nearest to "heart size is normal"
        "cf_negation": "there is severe cardiomegaly there is a small right pleural effusion mild right basilar "
                       "atelectasis no pneumothorax or pulmonary edema no left pleural effusion",
    }, {
        "cf_negation": "the heart is severely enlarged the lungs are clear no pneumothorax or pleural effusion "
                       "no acute bony abnormality",
    }],
    1: [{
        "cf_laterality": "heart size is normal there is a small left pleural effusion mild right basilar atelectasis "
                         "no pneumothorax or pulmonary edema no right pleural effusion",
        "cf_severity": "heart size is normal there is a small right pleural effusion moderate right basilar "
                       "atelectasis no pneumothorax or pulmonary edema no left pleural effusion",
        "cf_finding": "heart size is normal a small pulmonary nodule is seen in the right upper lung mild right "
                      "basilar atelectasis no pneumothorax or pulmonary edema",
        # atelectasis negated: the lungs are now clear, 'otherwise' than the effusion
        "cf_negation": "heart size is normal there is a small right pleural effusion otherwise the lungs are clear "
                       "no pneumothorax or pulmonary edema no left pleural effusion",
    }, {
        # pneumothorax asserted: out of the negation list, 'otherwise clear' after it
        "cf_negation": "the heart is normal in size moderate pneumothorax on the right the lungs are otherwise "
                       "clear no pleural effusion no acute bony abnormality",
    }],
}


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_outputs_on_fixed_seeds(seed):
    for (fs, report), expected in zip(_FIXED, _EXPECTED[seed], strict=True):
        rec = counterfactual_record(report, fs, seed=seed)
        assert rec.counterfactuals == expected, json.dumps(rec.counterfactuals, indent=1)
        assert rec.text == clean_text(report) and rec.seed == seed
        assert set(rec.counterfactuals) | set(rec.unavailable) == set(COUNTERFACTUAL_TYPES)
        assert not set(rec.counterfactuals) & set(rec.unavailable)
    normal = counterfactual_record(_FIXED[1][1], _FIXED[1][0], seed=seed)
    assert normal.unavailable == {"cf_laterality": "no_lateralized_finding", "cf_severity": "no_graded_finding",
                                  "cf_finding": "no_present_finding"}


def test_bad_reports_are_refused_with_the_reason():
    fs, report = _FIXED[0]
    with pytest.raises(ValueError, match="not a sentence of the phantom report templates: 'The ribs are fine.'"):
        phantom_counterfactuals(report + " The ribs are fine.", fs)
    with pytest.raises(ValueError, match="contradict"):
        phantom_counterfactuals(report.replace("small right", "small left"), fs)
    with pytest.raises(ValueError, match="does not state its findings"):
        phantom_counterfactuals(report, [*fs, Finding("nodule", "small", "left", "left upper lobe")])
    with pytest.raises(ValueError, match="unknown counterfactual type"):
        phantom_counterfactuals(report, fs, types=["cf_colour"])


def _pairs_file(tmp_path, n: int = 40):
    pairs = []
    for i in range(n):
        fs, sents = _phantom(5, i)
        pairs.append(Pair(id=f"p{i}", study_id=f"p{i}", image=f"images/p{i}.png", projection="Frontal",
                          text=" ".join(s.text for s in sents), source="phantom",
                          extra={"findings": [f.to_json() for f in fs]}))
    dup = pairs[3]  # a second image with the same report and findings: one record
    pairs.append(replace(dup, id="dup", study_id="dup", text=dup.text + "  "))
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    return path, pairs


def test_write_counterfactuals_format_and_summary(tmp_path):
    path, pairs = _pairs_file(tmp_path)
    out = tmp_path / "counterfactuals.jsonl"
    summary = write_counterfactuals(path, out, seed=3)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == summary.distinct_texts == len({clean_text(p.text) for p in pairs}) == len(pairs) - 1
    assert [ln["text"] for ln in lines] == list(dict.fromkeys(clean_text(p.text) for p in pairs))
    for ln in lines:
        assert set(ln) == {"text", "counterfactuals", "unavailable", "seed"} and ln["seed"] == 3
        assert set(ln["counterfactuals"]) | set(ln["unavailable"]) == set(COUNTERFACTUAL_TYPES)
        assert all(v != ln["text"] and v == clean_text(v) for v in ln["counterfactuals"].values())
        assert set(ln["unavailable"].values()) <= set(UNAVAILABLE_REASONS)
    assert summary.pairs == len(pairs)
    for t in COUNTERFACTUAL_TYPES:
        assert summary.counterfactuals[t] + sum(summary.unavailable[t].values()) == len(lines)
    on_disk = json.loads(summary_path_for(out).read_text())
    assert on_disk == summary.to_json() and summary_path_for(out).name == "counterfactuals.summary.json"
    assert [r.to_json() for r in read_counterfactuals(out)] == lines
    by_text = {ln["text"]: ln for ln in lines}
    p = pairs[7]
    assert by_text[clean_text(p.text)]["counterfactuals"] == counterfactual_record(
        p.text, p.extra["findings"], seed=3).counterfactuals


def test_write_counterfactuals_names_the_bad_record(tmp_path):
    path, pairs = _pairs_file(tmp_path, n=4)
    bad = [*pairs, Pair(id="real-1", study_id="real-1", image="x.png", projection="Frontal", text="Lungs clear.")]
    write_pairs(path, bad)
    with pytest.raises(ValueError, match=r"pairs.jsonl: pair 'real-1' has no extra\['findings'\]"):
        write_counterfactuals(path, tmp_path / "cf.jsonl")
    wrong = replace(pairs[0], id="liar", extra={"findings": [{"type": "nodule", "severity": "small", "side": "left",
                                                              "location": "left upper lobe"}]})
    write_pairs(path, [wrong])
    with pytest.raises(ValueError, match="pair 'liar'"):
        write_counterfactuals(path, tmp_path / "cf.jsonl")
    sick = next(p for p in pairs if p.extra["findings"])
    twin = replace(sick, id="twin", extra={"findings": []})
    write_pairs(path, [sick, twin])
    with pytest.raises(ValueError, match="same cleaned report but different findings"):
        write_counterfactuals(path, tmp_path / "cf.jsonl")
    (tmp_path / "cf.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"cf.jsonl:1: not a counterfactual record"):
        read_counterfactuals(tmp_path / "cf.jsonl")


# Real-style Open-I findings (as written) and the reviewed outputs of the text rules.
_TEXT_CASES = [
    ("The heart is normal in size. There is a small right pleural effusion. No pneumothorax.",
     {"cf_laterality": "The heart is normal in size. There is a small left pleural effusion. No pneumothorax.",
      "cf_negation": "The heart is normal in size. There is no small right pleural effusion. No pneumothorax."}),
    ("Left basilar atelectasis. No right pleural effusion.",
     {"cf_laterality": "Right basilar atelectasis. No left pleural effusion.",
      "cf_negation": "No left basilar atelectasis. No right pleural effusion."}),
    ("Heart size normal. Lungs are clear. No pneumothorax or pleural effusion.",
     {"cf_negation": "Heart size normal. Lungs are clear. Pneumothorax or pleural effusion."}),
    ("The lungs are clear. There is no focal consolidation.",
     {"cf_negation": "The lungs are clear. There is focal consolidation."}),
    ("No evidence of pneumothorax. The heart is not enlarged.",
     {"cf_negation": "There is evidence of pneumothorax. The heart is not enlarged."}),
    ("Right middle lobe opacity is present. No pneumothorax.",
     {"cf_negation": "Right middle lobe opacity is not present. No pneumothorax."}),
    ("Stable calcified granuloma in the left upper lobe. Heart size is within normal limits.",
     {"cf_laterality": "Stable calcified granuloma in the right upper lobe. Heart size is within normal limits.",
      "cf_negation": "No stable calcified granuloma in the left upper lobe. Heart size is within normal limits."}),
    ("The cardiomediastinal silhouette is within normal limits. Lungs are clear.",
     {"cf_negation": "The cardiomediastinal silhouette is not within normal limits. Lungs are clear."}),
]


@pytest.mark.parametrize("text,expected", _TEXT_CASES)
def test_text_rules_exact(text, expected):
    assert text_counterfactuals(text) == expected


def test_text_records_clean_and_give_reasons():
    rec = text_counterfactual_record(_TEXT_CASES[0][0], seed=2)
    assert rec.text == clean_text(_TEXT_CASES[0][0]) and rec.seed == 2
    assert rec.counterfactuals == {t: clean_text(v) for t, v in _TEXT_CASES[0][1].items()}
    assert text_counterfactual_record("Heart size normal. Lungs are clear.").unavailable == {
        "cf_laterality": "no_lateralized_finding"}
    assert text_counterfactual_record("Right middle lobe opacity is present.").unavailable == {
        "cf_laterality": "no_mirror_location"}
    assert text_counterfactual_record("Heart size normal.").unavailable == {
        "cf_laterality": "no_lateralized_finding", "cf_negation": "no_negatable_sentence"}
    assert text_counterfactual_record("  ").unavailable == {t: "empty_text" for t in TEXT_COUNTERFACTUAL_TYPES}


def test_text_rules_on_real_openi(openi_dir):
    """On every real findings section the rules make a counterfactual or name a reason; laterality
    only ever swaps sides, and a negation flip changes exactly one sentence."""
    import csv

    with open(openi_dir / "indiana_reports.csv", newline="", encoding="utf-8") as f:
        texts = [r["findings"] for r in csv.DictReader(f) if r["findings"].strip()]
    made: Counter[str] = Counter()
    for text in texts:
        rec = text_counterfactual_record(text)
        made.update(rec.counterfactuals.keys())
        lat = rec.counterfactuals.get("cf_laterality")
        if lat is not None:
            back = re.sub(r"\b(left|right)\b", lambda m: {"left": "right", "right": "left"}[m.group(1)], lat)
            assert back == rec.text and lat != rec.text  # sides swapped, nothing else
    assert made["cf_negation"] > 0.9 * len(texts) and made["cf_laterality"] > 0.1 * len(texts), made


def test_text_negation_never_prefixes_a_clause_or_denies_a_change():
    assert text_counterfactuals("Mild cardiomegaly is unchanged. Lungs are clear.") == {
        "cf_negation": "Mild cardiomegaly is unchanged. Lungs are not clear."}
    assert text_counterfactuals("The heart and lungs have XXXX XXXX in the interval. Lungs are clear.") == {
        "cf_negation": "The heart and lungs have XXXX XXXX in the interval. Lungs are not clear."}


def test_finding_swaps_are_not_shorter_than_their_originals(corpus):
    """Replacement sentences are drawn as the generator writes them, not the nearest (short) template,
    so a finding swap's length does not give it away: about half are shorter than their original."""
    shorter = total = 0
    for _, _, report, made in corpus:
        c = made.get("cf_finding")
        if isinstance(c, Counterfactual):
            total += 1
            shorter += len(c.text.split()) < len(clean_text(report).split())
    assert total > 500 and abs(shorter / total - 0.5) < 0.04  # the nearest template: 57 % shorter
