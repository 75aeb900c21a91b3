"""The shared records, the cleaning rule and word-aware tokenization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pertvl.data.records import (
    Pair,
    assign_paper_split,
    assign_splits,
    read_pairs,
    split_counts,
    write_pairs,
)
from pertvl.data.text import clean_text, normalize_report
from pertvl.data.tokenize import CachedTokenizer, encode_texts, load_tokenizer


def _pairs(n_studies: int, views: int = 2) -> list[Pair]:
    return [
        Pair(id=f"s{s}_v{v}", study_id=f"s{s}", image=f"{s}_{v}.png", projection="Frontal", text=f"report {s}")
        for s in range(n_studies)
        for v in range(views if s % 3 else 1)
    ]


def test_pairs_roundtrip(tmp_path):
    pairs = _pairs(5)
    pairs[0].labels = {"Pleural Effusion": 1.0}
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(path, pairs) == len(pairs)
    back = list(read_pairs(path))
    assert [p.to_json() for p in back] == [p.to_json() for p in pairs]


def test_read_pairs_names_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_pairs(1)[0].to_json()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        list(read_pairs(path))
    path.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks field"):
        list(read_pairs(path))


def test_study_split_keeps_studies_whole_and_is_deterministic():
    pairs = _pairs(300)
    assign_splits(pairs, seed=3)
    by_study: dict[str, set[str]] = {}
    for p in pairs:
        by_study.setdefault(p.study_id, set()).add(p.split)
    assert all(len(s) == 1 for s in by_study.values())
    counts = split_counts(pairs)
    assert sum(counts.values()) == len(pairs)
    # test share within one study of 7.25 %
    assert abs(counts["test"] - 0.0725 * len(pairs)) <= 2
    again = _pairs(300)[::-1]  # order must not matter
    assign_splits(again, seed=3)
    assert {p.id: p.split for p in again} == {p.id: p.split for p in pairs}
    other = _pairs(300)
    assign_splits(other, seed=4)
    assert {p.id: p.split for p in other} != {p.id: p.split for p in pairs}


def test_split_fractions_validated_and_paper_split():
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(_pairs(3), fractions=(0.5, 0.5, 0.5))
    pairs = _pairs(10)
    assign_paper_split(pairs, n_train=7)
    assert [p.split for p in pairs].count("train") == 7
    assert all(p.split == "test" for p in pairs[7:])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The lungs are clear. There is no pleural effusion or pneumothorax.",
         "the lungs are clear there is no pleural effusion or pneumothorax"),
        ("No XXXX of a pleural effusion; T-spine 2.5 cm, 3/4 -- effusión!",
         "no of a pleural effusion t-spine 2.5 cm 3/4 effusion"),
        ("end. 2. Next", "end 2 next"),
        ("a - b . c", "a b c"),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_text_rule(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_caps_words_and_keeps_deid_on_request():
    long = " ".join(["word"] * 2000)
    assert len(clean_text(long).split()) == 60
    assert len(clean_text(long, max_words=None).split()) == 2000
    assert clean_text("no XXXX effusion", drop_deid=False) == "no xxxx effusion"


def test_normalize_report_only_touches_whitespace():
    assert normalize_report("  Heart  size\nnormal. XXXX  ") == "Heart size normal. XXXX"
    assert normalize_report("No XXXX seen.", drop_deid=True) == "No seen."
    assert normalize_report(None) == ""


def test_encode_texts_word_ids(minilm_path):
    tok = load_tokenizer(minilm_path)
    enc = encode_texts(tok, ["no pneumothorax", "the lungs are clear", ""], max_length=16)
    # "pneumothorax" splits into 6 word pieces, all belonging to word 1
    assert enc.word_ids[0].tolist()[:9] == [-1, 0, 1, 1, 1, 1, 1, 1, -1]
    assert enc.num_words.tolist() == [2, 4, 0]
    assert enc.attention_mask.sum(1).tolist() == [9, 6, 2]
    assert (enc.input_ids[enc.attention_mask == 0] == 0).all()
    trunc = encode_texts(tok, ["no pneumothorax"], max_length=5)
    assert trunc.input_ids.shape == (1, 5) and trunc.word_ids[0, -1] == -1
    assert np.array_equal(trunc.word_ids[0], [-1, 0, 1, 1, -1])


def test_cached_tokenizer_equals_encode_texts(minilm_path):
    tok = load_tokenizer(minilm_path)

    long = " ".join(["pneumothorax"] * 30)  # 180 pieces: cut inside a word at max_length
    texts = ["no pneumothorax seen", "", "t-spine 2.5 cm 3/4 naïve café", long, "the lungs are clear"]
    enc = CachedTokenizer(tok, max_length=32)
    for _ in range(2):  # first call: verified against encode_texts; second: the cached fast path
        got, want = enc(texts), encode_texts(tok, texts, max_length=32)
        for f in ("input_ids", "attention_mask", "word_ids"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert enc._mode == "fast" and "pneumothorax" in enc._cache
