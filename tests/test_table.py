"""`pertvl data csv`: your own CSV / JSONL table -> pairs.jsonl, bad rows named and counted, and the
result perturbs, packs, trains, exports and evaluates.

The table is written from a small phantom corpus (real images and reports) plus one row per kind
of damage.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pertvl.cli import main
from pertvl.data.records import read_pairs

COLUMNS = ["image", "report", "study", "subject", "view", "Pleural Effusion", "Cardiomegaly"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from pertvl.data.phantom import generate_phantoms

    out = tmp_path_factory.mktemp("table") / "corpus"
    generate_phantoms(40, seed=0, size=64, out=out, workers=1)
    return out


def good_rows(corpus: Path) -> list[dict[str, str]]:
    """One row per phantom: two views of each of 20 studies, two studies per subject."""
    rows = []
    for i, p in enumerate(read_pairs(corpus / "pairs.jsonl")):
        labels = p.labels or {}
        rows.append({"image": p.image, "report": p.text, "study": f"s{i // 2}", "subject": f"p{i // 4}",
                     "view": "PA" if i % 2 == 0 else "LATERAL",
                     "Pleural Effusion": "" if "Pleural Effusion" not in labels else str(labels["Pleural Effusion"]),
                     "Cardiomegaly": "-1" if i == 3 else ""})
    return rows


BAD_ROWS = {  # reason -> (row, fields to change)
    "no_image": {"image": ""},
    "empty_report": {"report": "   "},
    "bad_label": {"Cardiomegaly": "maybe"},
    "missing_image": {"image": "images/not_there.png"},
}


def write_csv(path: Path, rows: list[dict[str, str]], extra_line: str = "") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
        f.write(extra_line)


def test_csv_rows_are_named_and_counted_and_groups_stay_together(corpus: Path, tmp_path: Path, capsys) -> None:
    rows = good_rows(corpus)
    bad = [{**rows[0], **change} for change in BAD_ROWS.values()] + [dict(rows[5])]  # the last: duplicate_image
    table = corpus / "table.csv"
    write_csv(table, rows + bad, extra_line="images/x.png,a report,s9,p9,PA,,,one field too many\n")
    out = tmp_path / "data"
    assert main(["data", "csv", "--table", str(table), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["considered"] == len(rows) + len(bad) + 1
    assert s["skipped"] == {"unreadable_row": 1, "no_image": 1, "empty_report": 1, "bad_label": 1,
                            "duplicate_image": 1, "missing_image": 1}
    assert s["pairs_written"] == len(rows) and s["pairs_written"] + sum(s["skipped"].values()) == s["considered"]
    first_bad = len(rows) + 2  # header on line 1
    assert s["skipped_examples"]["no_image"] == [f"table.csv line {first_bad}: the image column is empty"]
    assert s["skipped_examples"]["unreadable_row"][0].startswith(f"table.csv line {first_bad + len(bad)}: 8 fields")
    printed = capsys.readouterr().out
    assert f"{len(rows)} pairs of {s['considered']} rows" in printed and "skipped 1 (missing_image)" in printed
    pairs = list(read_pairs(out / "pairs.jsonl"))
    assert [p.text for p in pairs] == [r["report"] for r in rows]
    assert all(Path(p.image).is_absolute() and Path(p.image).is_file() for p in pairs)
    assert s["split_group"] == "subject" and sum(s["splits"].values()) == len(rows) and s["splits"]["test"] > 0
    by_subject: dict[str, set[str]] = {}
    for p in pairs:
        by_subject.setdefault(p.extra["subject_id"], set()).add(p.split)
    assert all(len(splits) == 1 for splits in by_subject.values())  # never one patient on both sides
    assert [p.projection for p in pairs[:2]] == ["Frontal", "Lateral"] and pairs[1].study_id == "s0"
    assert pairs[3].extra["uncertain_labels"] == ["Cardiomegaly"] and "Cardiomegaly" not in pairs[3].labels
    assert all(p.labels is not None for p in pairs) and s["label_columns"] == ["Cardiomegaly", "Pleural Effusion"]


def test_jsonl_with_a_given_split(corpus: Path, tmp_path: Path) -> None:
    rows = good_rows(corpus)[:6]
    lines = [json.dumps({"image": r["image"], "report": r["report"], "split": sp})
             for r, sp in zip(rows, ["train", "validate", "test", "dev", "TRAIN", "holdout"], strict=True)]
    table = corpus / "table.jsonl"
    table.write_text("\n".join(lines[:3]) + "\n[1, 2]\n{not json\n\n" + "\n".join(lines[3:]) + "\n")
    out = tmp_path / "data"
    assert main(["data", "csv", "--table", str(table), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped"] == {"unreadable_row": 2, "bad_split": 1} and s["considered"] == 8
    assert s["skipped_examples"]["unreadable_row"] == ["table.jsonl line 4: a JSON list, not an object",
                                                       "table.jsonl line 5: not JSON (Expecting property name "
                                                       "enclosed in double quotes at column 2)"]
    assert [p.split for p in read_pairs(out / "pairs.jsonl")] == ["train", "val", "test", "val", "train"]
    assert s["split"] == "given" and all(p.labels is None for p in read_pairs(out / "pairs.jsonl"))


def test_a_table_without_the_needed_columns_is_one_error_line(tmp_path: Path, capsys) -> None:
    table = tmp_path / "t.csv"
    table.write_text("path,text\na.png,no effusion\n")
    assert main(["data", "csv", "--table", str(table), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pertvl: error: ") and "no 'image' and no 'report' column" in err and "\n" not in err
    assert main(["data", "csv", "--table", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_own_table_trains_exports_and_evaluates(corpus: Path, tmp_path: Path, minilm_path: str) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    table = corpus / "own.csv"
    write_csv(table, good_rows(corpus) + [{**good_rows(corpus)[0], "image": "gone.png"}])
    data, shards, run, export = tmp_path / "data", tmp_path / "shards", tmp_path / "run", tmp_path / "export"
    assert main(["data", "csv", "--table", str(table), "--out", str(data), "--split-fractions", "0.5,0.1,0.4"]) == 0
    assert main(["perturb", "--pairs", str(data / "pairs.jsonl"), "--out", str(data / "perturbations.jsonl")]) == 0
    assert main(["pack", "--pairs", str(data / "pairs.jsonl"), "--perturbations", str(data / "perturbations.jsonl"),
                 "--out", str(shards), "--image-size", "64", "--maxcount", "8", "--workers", "1"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data:\n  num_workers: 0\n  max_length: 48\n  shuffle_buffer: 8\nmodel:\n  image_arch: resnet-tiny\n"
                      f"  text_name_or_path: {tmp_path / 'bert'}\n  embed_dim: 32\ntrain:\n  micro_batch: 4\n"
                      "  grad_accum: 1\n  lr: 0.05\n  warmup_steps: 1\n  checkpoint_every: 0\n")
    done = subprocess.run([sys.executable, "-m", "pertvl", "train", "--config", str(config), "--shards", str(shards),
                           "--out", str(run), "--max-steps", "2", "--no-wandb"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["export", "--run", str(run), "--out", str(export), "--no-parity"]) == 0
    assert main(["eval", "retrieval", "--export", str(export), "--shards", str(shards), "--out", str(tmp_path / "ev")]) == 0
    card = (export / "MODEL_CARD.md").read_text()
    counts = json.loads((data / "summary.json").read_text())["splits"]
    assert "a user's own table of images and reports" in card and f"train {counts['train']:,}" in card
    result = json.loads((tmp_path / "ev" / "retrieval.json").read_text())
    test_pairs = sum(1 for p in read_pairs(data / "pairs.jsonl") if p.split == "test")
    assert test_pairs > 0 and result["images"] + sum(result["skipped"].values()) == test_pairs
