"""Text-disjoint sets: held-out reports whose cleaned text is a training report's."""

from __future__ import annotations

import json

import pytest

from pertvl.cli import main as pertvl_main
from pertvl.data.openi import ingest_openi
from pertvl.data.overlap import describe_overlap, text_overlap
from pertvl.data.records import Pair


def _pair(i: int, split: str, text: str) -> Pair:
    return Pair(id=f"p{i}", study_id=f"s{i}", image=f"{i}.png", projection="Frontal", text=text, split=split)


def test_counts_on_a_fabricated_corpus():
    rows = [
        ("train", "The lungs are clear. No pneumothorax."),
        ("train", "Small left effusion."),
        ("train", "Heart size normal."),
        ("test", "the lungs are CLEAR, no pneumothorax"),  # the same cleaned text as a training report
        ("test", "The lungs are clear.  No pneumothorax."),  # again: a second pair, the same text
        ("test", "Small right effusion."),
        ("test", "Small right effusion."),
        ("test", "XXXX"),  # empty once the de-identification token is dropped: never counted
        ("val", "Heart size normal."),
        ("val", "Mild cardiomegaly."),
    ]
    pairs = [_pair(i, split, text) for i, (split, text) in enumerate(rows)]
    ov = text_overlap(pairs)
    assert ov == {
        "val": {"pairs": 2, "pairs_in_train": 1, "texts": 2, "texts_in_train": 1},
        "test": {"pairs": 4, "pairs_in_train": 2, "texts": 2, "texts_in_train": 1},
    }
    assert describe_overlap(ov).startswith("val: 1 of 2 pairs (1 of 2 distinct texts)")
    assert text_overlap(pairs, held_out=["test"]).keys() == {"test"}
    with pytest.raises(ValueError, match="held-out split"):
        text_overlap(pairs, held_out=["train"])
    with pytest.raises(ValueError, match="pair 'p0' has split 'dev'"):
        text_overlap([_pair(0, "dev", "x")])


def test_real_openi_study_split_overlap(openi_dir):
    """The issue's numbers: with the default study split (seed 0) 131 of the 469 test pairs (44 of
    222 distinct texts) have a cleaned findings text identical to a training report."""
    res = ingest_openi(openi_dir / "indiana_reports.csv", projections=openi_dir / "indiana_projections.csv",
                       text_only=True)
    assert res.summary["text_overlap"] == {
        "val": {"pairs": 323, "pairs_in_train": 101, "texts": 147, "texts_in_train": 38},
        "test": {"pairs": 469, "pairs_in_train": 131, "texts": 222, "texts_in_train": 44},
    }
    assert text_overlap(res.pairs) == res.summary["text_overlap"]


def test_cli_prints_and_writes_the_overlap(openi_dir, tmp_path, capsys):
    out = tmp_path / "openi"
    rc = pertvl_main(["data", "openi", "--reports", str(openi_dir / "indiana_reports.csv"), "--text-only",
                      "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test 131 of 469 pairs (44 of 222 distinct cleaned texts)" in printed
    assert json.loads((out / "summary.json").read_text())["text_overlap"]["test"]["texts_in_train"] == 44
