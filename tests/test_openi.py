"""Open-I ingestion: the three layouts, bad input counted by reason, splits, and the CLI."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from pertvl.cli import main as pertvl_main
from pertvl.data.openi import OpenIError, ingest_openi
from pertvl.data.records import read_pairs

# --------------------------------------------------------------------------- fabricated fixtures


def _nlm_xml(uid: str, findings: str | None, impression: str | None, images: list[str]) -> str:
    """An ecgen-radiology file shaped like the NLM release's."""
    sections = "".join(
        f'<AbstractText Label="{label}">{text}</AbstractText>' if text is not None
        else f'<AbstractText Label="{label}"/>'
        for label, text in (("COMPARISON", "None."), ("INDICATION", "Cough."),
                            ("FINDINGS", findings), ("IMPRESSION", impression))
    )
    parents = "".join(
        f'<parentImage id="{i}"><figureId>F{n}</figureId><caption>Xray Chest PA and Lateral</caption>'
        f"<panel type=\"single\"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel></parentImage>"
        for n, i in enumerate(images, 1)
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/>'
        f'<uId id="{uid}"/><pmcId id="{uid[3:]}"/><docSource>CXR</docSource>'
        '<MedlineCitation Owner="Indiana University"><Article PubModel="Electronic">'
        f"<ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle><Abstract>{sections}</Abstract>"
        f"</Article></MedlineCitation><MeSH><major>normal</major></MeSH>{parents}</eCitation>\n"
    )


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<eCitation><uId id="CXR5"/><Abstract><AbstractText Label="FINDINGS">&lol9;</AbstractText></Abstract>
<parentImage id="CXR5_IM-0005-1001"/></eCitation>
"""

F1 = "The  lungs are clear.\n  XXXX  is normal."
I1 = "No acute disease."


@pytest.fixture
def xml_release(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of NLM XML files (good, empty findings, malformed, entity bomb, non-UTF-8) + images."""
    folder = tmp_path / "ecgen-radiology"
    folder.mkdir()
    (folder / "1.xml").write_text(_nlm_xml("CXR1", F1, I1, ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]))
    (folder / "2.xml").write_text(
        _nlm_xml("CXR2", "Heart size normal.", "Clear.", ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"]))
    (folder / "3.xml").write_text(_nlm_xml("CXR3", None, "Normal chest.", ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"]))
    (folder / "10.xml").write_text(_nlm_xml("CXR10", "Small left effusion.", None, ["CXR10_IM-0002-1001"]))
    (folder / "4.xml").write_text(_nlm_xml("CXR4", "Cut", "off", ["CXR4_IM-1"])[:250])  # truncated
    (folder / "5.xml").write_text(BILLION_LAUGHS)
    (folder / "6.xml").write_bytes(_nlm_xml("CXR6", "Pleural effusi\u00f3n.", "x", ["CXR6_IM-1"]).encode("latin-1"))
    (folder / "notes.txt").write_text("not a report")
    images = tmp_path / "png"
    images.mkdir()
    for name in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001",
                 "CXR3_IM-1384-1001", "CXR3_IM-1384-2001", "CXR10_IM-0002-1001"):
        (images / f"{name}.png").write_bytes(b"\x89PNG fake")
    return folder, images  # CXR2_IM-0652-2001.png is missing on purpose


def _reconciles(s: dict) -> None:
    """The counting identities the module documents."""
    by = s["skipped_by_level"]
    assert s["pairs_written"] + sum(by["image"].values()) == s["images_read"]
    assert s["pairs_written"] + sum(s["skipped"].values()) == s["considered"]
    assert s["considered"] == s["images_read"] + sum(by["report"].values())
    assert sum(s["splits"].values()) == s["pairs_written"] == sum(s["projections"].values())


def _examples(summary: dict, reason: str) -> list[str]:
    return [e["record"] for e in summary["skipped_examples"].get(reason, [])]


# --------------------------------------------------------------------------- NLM XML


def test_xml_bad_files_counted_named_and_others_unaffected(xml_release, caplog):
    folder, images = xml_release
    caplog.set_level(logging.DEBUG, logger="pertvl.data.openi")
    res = ingest_openi(folder.parent, images=images)  # the release folder holding ecgen-radiology/
    s = res.summary
    assert s["layout"] == "xml"
    assert s["reports_read"] == 4 and s["reports_with_text"] == 3 and s["images_read"] == 7
    assert s["skipped"] == {"empty_text": 2, "missing_image": 1, "unreadable_record": 3}
    assert s["skipped_by_level"]["report"] == {"unreadable_record": 3}
    assert s["pairs_written"] == 4 and s["considered"] == 10
    _reconciles(s)

    # Natural file order (2.xml before 10.xml), one pair per parentImage, image = id + ".png".
    assert [p.id for p in res.pairs] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001",
                                         "CXR2_IM-0652-1001", "CXR10_IM-0002-1001"]
    p = res.pairs[0]
    assert (p.study_id, p.text, p.projection, p.source) == ("CXR1", "The lungs are clear. XXXX is normal.",
                                                            "unknown", "openi-xml")
    assert p.image == (images.resolve() / "CXR1_1_IM-0001-3001.png").as_posix()
    assert p.extra == {"uid": "1"}
    assert res.pairs[3].text == "Small left effusion."

    # Every bad file is named, with its reason, in the summary and in the log.
    unreadable = {e["record"]: e["detail"] for e in s["skipped_examples"]["unreadable_record"]}
    assert set(unreadable) == {"4.xml", "5.xml", "6.xml"}
    assert "malformed XML" in unreadable["4.xml"]
    assert "EntitiesForbidden" in unreadable["5.xml"] and "billion laughs" in unreadable["5.xml"]
    assert "not utf-8 text: byte 0xf3" in unreadable["6.xml"]
    assert _examples(s, "empty_text") == ["3.xml image CXR3_IM-1384-1001", "3.xml image CXR3_IM-1384-2001"]
    assert _examples(s, "missing_image") == ["2.xml image CXR2_IM-0652-2001"]
    log = caplog.text
    for name in ("4.xml", "5.xml", "6.xml"):
        assert re.search(rf"WARNING .*{re.escape(str(folder / name))}", log)
    missing = [r for r in caplog.records if "missing_image" in r.getMessage()]
    assert len(missing) == 1 and missing[0].levelno == logging.DEBUG
    assert "CXR2_IM-0652-2001.png" in missing[0].getMessage()


def test_xml_text_only_sections_deid_and_projection_lookup(xml_release, tmp_path):
    folder, _ = xml_release
    res = ingest_openi(folder, text_only=True)
    assert res.summary["pairs_written"] == 5 and "missing_image" not in res.summary["skipped"]
    assert res.pairs[0].image == "CXR1_1_IM-0001-3001.png"  # no --images: the layout's own file name

    both = ingest_openi(folder, text_only=True, section="both", drop_deid=True)
    texts = {p.study_id: p.text for p in both.pairs}
    assert texts["CXR1"] == "The lungs are clear. is normal. No acute disease."
    assert texts["CXR3"] == "Normal chest."  # empty findings: the impression alone
    assert texts["CXR10"] == "Small left effusion."
    assert both.summary["pairs_written"] == 7 and "empty_text" not in both.summary["skipped"]
    impression = ingest_openi(folder, text_only=True, section="impression")
    assert sorted({p.study_id for p in impression.pairs}) == ["CXR1", "CXR2", "CXR3"]
    assert impression.summary["skipped"]["empty_text"] == 1  # CXR10 has no impression

    # The NLM XML has no projection; the Kaggle projections table supplies it by file name.
    proj = tmp_path / "indiana_projections.csv"
    proj.write_text("uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n1,1_IM-0001-3001.dcm.png,Lateral\n"
                    "2,2_IM-0652-1001.dcm.png,Frontal\n")
    looked = ingest_openi(folder, projections=proj, text_only=True)
    assert {p.id: p.projection for p in looked.pairs} == {
        "CXR1_1_IM-0001-3001": "Lateral", "CXR1_1_IM-0001-4001": "Frontal", "CXR2_IM-0652-1001": "Frontal",
        "CXR2_IM-0652-2001": "unknown", "CXR10_IM-0002-1001": "unknown"}
    # Study split: all views of a study on one side.
    sides = defaultdict(set)
    for p in looked.pairs:
        sides[p.study_id].add(p.split)
    assert all(len(v) == 1 for v in sides.values())


# --------------------------------------------------------------------------- Kaggle CSV


def test_kaggle_bad_rows_counted_and_named(tmp_path):
    header = "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
    rows = [
        b'1,normal,normal,PA,Cough,None.,"Lungs  clear.\n Heart normal.",Normal.\n',
        b',normal,normal,PA,Cough,None.,Orphan text.,Normal.\n',  # missing uid
        b'abc,normal,normal,PA,Cough,None.,Bad uid.,Normal.\n',  # invalid uid
        b'2,normal,normal,PA,Cough,None.,,Only impression.\n',  # empty findings
        b'3,normal,normal,PA,Cough,None.,Effusi\xf3n.,Normal.\n',  # not UTF-8
        b'1,normal,normal,PA,Cough,None.,Again.,Normal.\n',  # duplicate uid
        b'4,normal,normal,PA,Cough,None.,No views listed.,Normal.\n',  # no projections rows
        b'5,normal,normal,PA,Cough,None.,Too,many,fields\n',
    ]
    reports = tmp_path / "indiana_reports.csv"
    reports.write_bytes(header.encode() + b"".join(rows))
    (tmp_path / "indiana_projections.csv").write_text(
        "uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n1,1_IM-0001-3001.dcm.png,Lateral\n"
        "2,2_IM-0652-1001.dcm.png,Frontal\n3,3_IM-1384-1001.dcm.png,Frontal\n,x.dcm.png,Frontal\n"
        "9,9_IM-0009-1001.dcm.png,lateral\n")
    res = ingest_openi(reports, text_only=True)  # projections found next to the reports file
    s = res.summary
    assert s["layout"] == "kaggle" and s["reports_read"] == 3 and s["images_read"] == 6
    assert s["skipped_by_level"] == {
        "report": {"duplicate_record": 1, "no_images": 1, "unreadable_record": 4},
        "image": {"empty_text": 1, "no_report": 2, "unreadable_image_record": 1},
    }
    assert s["pairs_written"] == 2 and s["considered"] == 12
    _reconciles(s)
    assert [(p.id, p.study_id, p.projection, p.text) for p in res.pairs] == [
        ("CXR1_IM-0001-4001", "CXR1", "Frontal", "Lungs clear. Heart normal."),
        ("CXR1_IM-0001-3001", "CXR1", "Lateral", "Lungs clear. Heart normal."),
    ]
    unreadable = {e["record"]: e["detail"] for e in s["skipped_examples"]["unreadable_record"]}
    assert unreadable == {
        "indiana_reports.csv line 4": "missing uid",
        "indiana_reports.csv line 5 (uid 'abc')": "invalid uid: expected a non-negative integer",
        "indiana_reports.csv line 7 (uid '3')": "column 'findings' holds bytes that are not UTF-8",
        "indiana_reports.csv line 10 (uid '5')": "9 fields, the header has 8",
    }
    (tmp_path / "p.csv").write_text("uid,file\n1,a.png\n")
    with pytest.raises(OpenIError, match=r"p.csv: header .* lacks column\(s\) \['filename', 'projection'\]"):
        ingest_openi(reports, projections=tmp_path / "p.csv", text_only=True)
    assert _examples(s, "unreadable_image_record") == ["indiana_projections.csv line 6 (x.dcm.png)"]
    assert _examples(s, "no_images") == ["indiana_reports.csv line 9 (uid '4')"]

    # Without a projections table next to it, the layout says what it needs.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(reports, alone / "reports.csv")
    with pytest.raises(OpenIError, match="needs --projections indiana_projections.csv"):
        ingest_openi(alone / "reports.csv", text_only=True)


# --------------------------------------------------------------------------- R2Gen JSON


def test_r2gen_fabricated_entries_and_images(tmp_path):
    ann = {
        "train": [
            {"id": "CXR7_IM-0007", "report": "Clear  lungs.", "image_path": ["CXR7_IM-0007/0.png",
                                                                             "CXR7_IM-0007/1.png"], "split": "train"},
            {"id": "CXR8_IM-0008", "image_path": ["CXR8_IM-0008/0.png"], "split": "train"},  # no report
            {"id": "CXR7_IM-0007", "report": "dup", "image_path": [], "split": "train"},
        ],
        "test": [{"id": "CXR9_IM-0009", "report": "Cardiomegaly.", "image_path": ["CXR9_IM-0009/0.png"],
                  "split": "test"}],
    }
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ann))
    images = tmp_path / "images"
    for rel in ("CXR7_IM-0007/0.png", "CXR9_IM-0009/0.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(b"png")
    res = ingest_openi(path, images=images)
    s = res.summary
    assert s["split"] == "given" and s["splits"] == {"train": 1, "val": 0, "test": 1}
    assert s["skipped"] == {"duplicate_record": 1, "missing_image": 1, "unreadable_record": 1}
    _reconciles(s)
    assert [(p.id, p.study_id, p.split, p.projection) for p in res.pairs] == [
        ("CXR7_IM-0007_0", "CXR7_IM-0007", "train", "unknown"), ("CXR9_IM-0009_0", "CXR9_IM-0009", "test", "unknown")]
    assert _examples(s, "unreadable_record") == ["annotation.json train[1] (id 'CXR8_IM-0008')"]
    with pytest.raises(OpenIError, match="only the findings"):
        ingest_openi(path, text_only=True, section="both")


# --------------------------------------------------------------------------- refusals


def test_unknown_layouts_and_missing_options_fail_at_once(tmp_path, xml_release):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.json").write_text('{"images": []}')
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for bad in ("notes.txt", "empty", "other.json", "other.csv", "nowhere"):
        with pytest.raises(OpenIError, match="accepted layouts: xml .*kaggle .*r2gen"):
            ingest_openi(tmp_path / bad, text_only=True)
    folder, _ = xml_release
    with pytest.raises(OpenIError, match="pass --images DIR .* or --text-only"):
        ingest_openi(folder)
    with pytest.raises(OpenIError, match="gives no split"):
        ingest_openi(folder, text_only=True, split="given")
    with pytest.raises(OpenIError, match="accepted layouts"):
        ingest_openi(folder, fmt="r2gen", text_only=True)


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(xml_release, tmp_path, caplog):
    folder, images = xml_release
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="pertvl.data.openi")
    rc = pertvl_main(["data", "openi", "--reports", str(folder), "--images", str(images),
                      "--section", "both", "--seed", "3", "--out", str(out)])
    assert rc == 0
    pairs = list(read_pairs(out / "pairs.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    expected = ingest_openi(folder, images=images, section="both", seed=3)
    assert [p.to_json() for p in pairs] == [p.to_json() for p in expected.pairs]
    assert summary == json.loads(json.dumps(expected.summary))
    assert summary["pairs_written"] == 6 and summary["inputs"]["seed"] == 3
    assert all(Path(p.image).is_file() for p in pairs)
    assert "pairs_written=6" in caplog.text and "missing_image" in caplog.text

    rc = pertvl_main(["data", "openi", "--reports", str(tmp_path / "out" / "summary.json"), "--text-only",
                      "--out", str(tmp_path / "bad")])
    assert rc == 2 and "accepted layouts" in caplog.text and not (tmp_path / "bad").exists()
    assert pertvl_main(["data", "openi", "--reports", str(folder), "--text-only", "--split-fractions", "0.5,0.5",
                        "--out", str(tmp_path / "bad")]) == 2


# --------------------------------------------------------------------------- the real Open-I text


@pytest.fixture(scope="module")
def kaggle(openi_dir):
    return ingest_openi(openi_dir / "indiana_reports.csv", projections=openi_dir / "indiana_projections.csv",
                        text_only=True)


@pytest.fixture(scope="module")
def r2gen(openi_dir):
    return ingest_openi(openi_dir / "r2gen_annotation.json", text_only=True)


def test_real_kaggle_counts(kaggle):
    s = kaggle.summary
    assert s["pairs_written"] == 6469
    assert s["projections"] == {"Frontal": 3307, "Lateral": 3162, "unknown": 0}
    assert s["reports_read"] == 3851 and s["reports_with_text"] == 3337 and s["images_read"] == 7466
    assert s["skipped"] == {"empty_text": 997}
    _reconciles(s)
    assert len({p.id for p in kaggle.pairs}) == 6469


def test_real_r2gen_given_split(r2gen):
    s = r2gen.summary
    assert s["pairs_written"] == 5910 and s["reports_read"] == 2955
    assert s["studies"] == {"train": 2069, "val": 296, "test": 590}
    assert s["splits"] == {"train": 4138, "val": 592, "test": 1180}
    assert s["projections"]["unknown"] == 5910
    assert len({p.id for p in r2gen.pairs}) == 5910
    assert r2gen.pairs[0].id == "CXR2384_IM-0942_0" and r2gen.pairs[0].study_id == "CXR2384_IM-0942"


def test_real_layouts_agree_on_shared_studies(kaggle, r2gen):
    kaggle_text = {p.extra["uid"]: p.text for p in kaggle.pairs}
    r2gen_text = {p.extra["uid"]: p.text for p in r2gen.pairs}
    assert r2gen_text["2384"] == kaggle_text["2384"]  # R2Gen CXR2384_IM-0942 is Kaggle uid 2384
    shared = r2gen_text.keys() & kaggle_text.keys()
    assert len(shared) == 2955  # every R2Gen study is in the Kaggle layout
    assert [u for u in shared if r2gen_text[u] != kaggle_text[u]] == []


def test_real_study_and_paper_splits(openi_dir, kaggle):
    sides = defaultdict(set)
    for p in kaggle.pairs:
        sides[p.study_id].add(p.split)
    assert all(len(v) == 1 for v in sides.values())
    assert kaggle.summary["splits"] == {"train": 5677, "val": 323, "test": 469}  # seed 0, default fractions

    reports = openi_dir / "indiana_reports.csv"
    again = ingest_openi(reports, text_only=True, seed=0)
    assert [p.split for p in again.pairs] == [p.split for p in kaggle.pairs]
    other = ingest_openi(reports, text_only=True, seed=1)
    assert [p.split for p in other.pairs] != [p.split for p in kaggle.pairs]
    assert abs(other.summary["splits"]["test"] - 469) <= 5

    paper = ingest_openi(reports, text_only=True, split="paper")
    assert paper.summary["splits"] == {"train": 6000, "val": 0, "test": 469}
    assert [p.id for p in paper.pairs] == [p.id for p in kaggle.pairs]  # row order
    assert all(p.split == "train" for p in paper.pairs[:6000])
    assert all(p.split == "test" for p in paper.pairs[6000:])
