"""`pertvl data mimic-cxr`: the MIMIC-CXR-JPG v2 layout read as distributed, on generated trees.

The joins (split x metadata x images x reports x labels), every skip reason, sections, views, the
reports zip read without unpacking, Windows line ends, and counts that reconcile.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pertvl.cli import main as pertvl_main
from pertvl.data.mimic import (
    METADATA_FILE,
    MimicError,
    TreeStudy,
    ingest_mimic_cxr,
    mimic_report_text,
    report_section,
    split_sections,
    write_mimic_tree,
)
from pertvl.data.records import read_pairs


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="JPEG")
    return buf.getvalue()


JPG = _jpeg()
WINDOWS = mimic_report_text("Small left pleural effusion.", "Effusion.").replace("\n", "\r\n")


def _studies() -> list[TreeStudy]:
    return [
        # 3 views: PA and AP kept by default, LATERAL not
        TreeStudy("10000032", "50414267", "train", mimic_report_text("No focal consolidation. ___ noted.", "Normal."),
                  (("d1", "PA", JPG), ("d2", "AP", JPG), ("d3", "LATERAL", JPG)),
                  {"No Finding": "1.0", "Consolidation": "", "Edema": "-1.0", "Pleural Effusion": "0.0"}),
        # no report file
        TreeStudy("10000033", "50000001", "train", None, (("d4", "PA", JPG),)),
        # impression only (no FINDINGS section)
        TreeStudy("10000034", "50000002", "validate",
                  " FINAL REPORT\n EXAMINATION: CHEST\n\n IMPRESSION:\n\n No acute process.\n", (("d5", "PA", JPG),)),
        # the image is not on disk
        TreeStudy("10000035", "50000003", "test", mimic_report_text("Heart size normal."), (("d6", "AP", None),)),
        # Windows line ends
        TreeStudy("11000036", "50000004", "test", WINDOWS, (("d7", "PA", JPG),), {"Pleural Effusion": "1.0"}),
        # an empty FINDINGS section
        TreeStudy("11000037", "50000005", "train", " FINDINGS:\n\n IMPRESSION: Stable.\n", (("d8", "PA", JPG),)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = write_mimic_tree(tmp_path_factory.mktemp("mimic"), _studies())
    # one more image in the split file that the metadata does not know
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    lines = gzip.decompress(split.read_bytes()).decode() + "d9,50000005,11000037,train\n"
    split.write_bytes(gzip.compress(lines.encode()))
    return root


def test_sections_are_read_by_their_headers() -> None:
    text = mimic_report_text("There is no pneumothorax.\n Mild cardiomegaly.", "No acute process.")
    parts = split_sections(text)
    assert parts["findings"] == "There is no pneumothorax.\n Mild cardiomegaly."
    assert parts["impression"] == "No acute process." and parts["comparison"] == "None."
    assert parts["indication"] == "___M with cough" and parts[""] == "FINAL REPORT"
    assert report_section(text, "both") == "There is no pneumothorax.\n Mild cardiomegaly. No acute process."
    only_impression = " IMPRESSION: Stable.\n"
    assert report_section(only_impression, "findings") is None
    assert report_section(only_impression, "findings-else-impression") == "Stable."
    assert report_section(" FINDINGS AND IMPRESSION: Clear lungs.\n", "findings") == "Clear lungs."
    assert report_section(WINDOWS, "findings") == "Small left pleural effusion."
    with pytest.raises(MimicError, match="--section must be one of"):
        report_section(text, "summary")


def test_joins_skips_and_counts_reconcile(tree: Path) -> None:
    result = ingest_mimic_cxr(tree, drop_deid=True)
    s = result.summary
    by_id = {p.id: p for p in result.pairs}
    assert sorted(by_id) == ["d1", "d2", "d7"]
    assert s["skipped"] == {"no_metadata": 1, "view_not_selected": 1, "missing_image": 1, "missing_report": 1,
                            "no_section": 1, "empty_section": 1}  # fmt: skip
    assert s["considered"] == 9 == s["pairs_written"] + sum(s["skipped"].values())
    assert s["splits"] == {"train": 2, "val": 0, "test": 1} and s["studies"] == {"train": 1, "val": 0, "test": 1}
    d1 = by_id["d1"]
    assert (d1.study_id, d1.split, d1.projection, d1.source) == ("50414267", "train", "Frontal", "mimic-cxr")
    assert d1.image == "files/p10/p10000032/s50414267/d1.jpg" and (tree / d1.image).is_file()
    assert d1.text == "No focal consolidation. noted."  # "___" dropped, whitespace normalized
    assert d1.labels == {"No Finding": 1.0, "Pleural Effusion": 0.0}  # blank left out
    assert d1.extra["uncertain_labels"] == ["Edema"] and d1.extra["subject_id"] == "10000032"
    assert by_id["d7"].text == "Small left pleural effusion." and by_id["d7"].labels == {"Pleural Effusion": 1.0}
    # the official split is kept: validate -> val, and the lateral view is there when asked for
    wide = ingest_mimic_cxr(tree, views=["PA", "AP", "LATERAL"], section="findings-else-impression",
                            text_only=True, labels="")  # fmt: skip
    assert {p.id: (p.split, p.projection) for p in wide.pairs} == {
        "d1": ("train", "Frontal"), "d2": ("train", "Frontal"), "d3": ("train", "Lateral"),
        "d5": ("val", "Frontal"), "d6": ("test", "Frontal"), "d7": ("test", "Frontal"), "d8": ("train", "Frontal")}  # fmt: skip
    assert all(p.labels is None for p in wide.pairs) and wide.pairs[0].text == "No focal consolidation. ___ noted."


def test_reports_zip_is_read_without_unpacking(tmp_path: Path) -> None:
    folder = write_mimic_tree(tmp_path / "folder", _studies())
    zipped = write_mimic_tree(tmp_path / "zipped", _studies(), reports_zip=True)
    assert not list((zipped / "files").rglob("*.txt"))
    a, b = ingest_mimic_cxr(folder), ingest_mimic_cxr(zipped)
    assert [p.to_json() for p in a.pairs] == [p.to_json() for p in b.pairs]
    assert a.summary["skipped"] == b.summary["skipped"]


def test_cli_writes_the_pairs_contract_and_refuses_bad_input(tree: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    assert pertvl_main(["data", "mimic-cxr", "--root", str(tree), "--out", str(out), "--section", "both"]) == 0
    pairs = list(read_pairs(out / "pairs.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert len(pairs) == summary["pairs_written"] == 5  # "both": d5 (impression only) and d8 (empty findings) too
    assert summary["pairs_written"] + sum(summary["skipped"].values()) == summary["considered"]
    assert pertvl_main(["data", "mimic-cxr", "--root", str(tmp_path), "--out", str(out)]) == 2
    assert "mimic-cxr-2.0.0-split.csv.gz: not found" in caplog.text
    bad = write_mimic_tree(tmp_path / "bad", [TreeStudy("10000001", "1", "train", mimic_report_text("x."),
                                                        (("e1", "PA", JPG),), {"Edema": "maybe"})])  # fmt: skip
    with pytest.raises(MimicError, match=r"chexpert.csv.gz subject 10000001 study 1: label Edema = 'maybe'"):
        ingest_mimic_cxr(bad)
    (bad / METADATA_FILE).write_bytes(gzip.compress(b"dicom_id,study_id\ne1,1\n"))
    with pytest.raises(MimicError, match=r"metadata.csv.gz: missing column\(s\) subject_id, ViewPosition"):
        ingest_mimic_cxr(bad)


def test_phantoms_in_the_mimic_layout_read_back_to_the_same_pairs(tmp_path: Path) -> None:
    """`pertvl data phantom --layout mimic-cxr` writes the real layout; `pertvl data mimic-cxr` reads
    it back: the same report texts, labels and splits, one frontal JPEG per study."""
    out = tmp_path / "corpus"
    assert pertvl_main(["data", "phantom", "--n", "12", "--size", "64", "--out", str(out), "--layout", "mimic-cxr"]) == 0
    tree = out / "mimic-cxr-jpg"
    assert (tree / "mimic-cxr-reports.zip").is_file() and len(list((tree / "files").rglob("*.jpg"))) == 12
    result = ingest_mimic_cxr(tree)
    phantoms = list(read_pairs(out / "pairs.jsonl"))
    assert result.summary["pairs_written"] == 12 and result.summary["skipped"] == {}
    by_id = {p.id: p for p in result.pairs}
    for ph in phantoms:
        got = by_id[ph.id.replace(".", "-")]
        assert (got.text, got.split, got.projection) == (ph.text, ph.split, "Frontal")
        assert got.labels == ph.labels
