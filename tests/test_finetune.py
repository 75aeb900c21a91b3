"""Downstream fine-tuning: `pertvl finetune nli` and `pertvl finetune chexpert` on fabricated files.

The encoder is a TINY DualEncoder (2-layer BERT of width 32 with MiniLM's tokenizer, resnet-tiny
at 32 px) saved with save_pretrained as RUN_DIR/final — not a trained run. The NLI set is made
learnable on purpose (hypothesis = premise → entailment; "no " + premise → contradiction; a sentence
from an unrelated pool → neutral), so a working fine-tune must beat chance clearly.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pertvl.cli import main as pertvl_main
from pertvl.evaluate.finetune.chexpert import (
    CHEXPERT_LABELS,
    DEFAULT_GROUP_PATTERN,
    PAPER_CHEXPERT_LABELS,
    chexpert_targets,
    finetune_chexpert,
    multilabel_scores,
    prepare_chexpert,
    read_chexpert_csv,
    split_by_group,
)
from pertvl.evaluate.finetune.fit import FINETUNE_DEFAULTS, PROBE_DEFAULTS, FitSettings, fit_settings
from pertvl.evaluate.finetune.nli import (
    NLI_LABELS,
    NLI_MAX_LENGTH,
    NliExample,
    NliFile,
    classification_metrics,
    finetune_nli,
    nli_folds,
    nli_truncation,
    read_nli,
)
from tests.conftest import chexpert_csv_row as _csv_row
from tests.conftest import chexpert_png as _png
from tests.conftest import write_chexpert_csv as _write_csv

FINDINGS = ["pleural effusion", "consolidation", "atelectasis", "pneumothorax", "edema", "opacity", "nodule",
            "cardiomegaly"]
SIZES = ["small", "moderate", "large", "mild", "trace"]
PLACES = ["left base", "right base", "left apex", "right apex", "lingula", "right middle lobe"]
UNRELATED = ["patient reports chest pain since yesterday", "history of diabetes and hypertension",
             "the patient was admitted for fever", "follow up appointment in two weeks",
             "family history of heart disease", "patient denies shortness of breath",
             "medications include aspirin and metformin", "the patient is a former smoker"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP's spinning threads make these tiny
    models ~100x slower (measured), and the numbers do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, minilm_path) -> Path:
    """RUN_DIR with final/ = a tiny DualEncoder (save_pretrained), random weights."""
    import torch
    from transformers import BertConfig, BertModel

    from pertvl.model import create_model

    root = tmp_path_factory.mktemp("tiny")
    bert_dir = root / "tiny_bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(bert_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path) / name, bert_dir)
    model = create_model({"text_name_or_path": str(bert_dir), "image_arch": "resnet-tiny", "embed_dim": 16})
    run = root / "run"
    model.save_pretrained(run / "final")
    (run / "config.yaml").write_text("data:\n  image_size: 32\n")
    return run


def _nli_items(n_per_class: int, rng: np.random.Generator) -> list[dict]:
    items = []
    for i in range(n_per_class):
        premise = f"{rng.choice(SIZES)} {rng.choice(FINDINGS)} in the {rng.choice(PLACES)}"
        items.append({"sentence1": premise, "sentence2": premise, "gold_label": "entailment", "pairID": f"e{i}"})
        premise = f"{rng.choice(SIZES)} {rng.choice(FINDINGS)} in the {rng.choice(PLACES)}"
        items.append({"sentence1": premise, "sentence2": "no " + premise, "gold_label": "contradiction",
                      "pairID": f"c{i}"})
        premise = f"{rng.choice(SIZES)} {rng.choice(FINDINGS)} in the {rng.choice(PLACES)}"
        items.append({"sentence1": premise, "sentence2": str(rng.choice(UNRELATED)), "gold_label": "neutral",
                      "pairID": f"n{i}"})
    return [items[i] for i in rng.permutation(len(items))]


@pytest.fixture(scope="module")
def nli_files(tmp_path_factory) -> dict[str, Path]:
    """mli_{train,dev,test}_v1.jsonl: 90 / 30 / 30 learnable items; train has 4 bad lines at known places."""
    root = tmp_path_factory.mktemp("nli")
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 30), ("dev", 10), ("test", 10)):
        lines = [json.dumps(it) for it in _nli_items(n, rng)]
        if split == "train":
            lines.insert(2, "{not json")  # line 3
            lines.insert(5, json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "-"}))  # line 6
            lines.insert(7, json.dumps({"sentence1": "a", "gold_label": "neutral"}))  # line 8
            lines.insert(9, json.dumps(["a", "b"]))  # line 10
            lines.insert(11, "")  # a blank line: not counted as a line at all
        files[split] = root / f"mli_{split}_v1.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


# ----------------------------------------------------------------------------- NLI


def test_read_nli_names_and_counts_bad_lines(nli_files):
    f = read_nli(nli_files["train"])
    assert len(f.examples) == 90 and f.lines == 94
    assert sum(f.skipped.values()) == 4
    where = {p.split(": ", 1)[0].rsplit(":", 1)[1]: p for p in f.problems}
    assert sorted(where, key=int) == ["3", "6", "8", "10"]
    assert "not JSON" in where["3"] and "gold_label '-' not one of entailment/contradiction/neutral" in where["6"]
    assert "missing sentence2" in where["8"] and "not a JSON object (list)" in where["10"]
    assert all(p.startswith(f"{nli_files['train']}:") for p in f.problems)


def test_read_nli_rejects_a_file_without_examples(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "gold_label": "maybe"}\n')
    with pytest.raises(ValueError, match="no usable NLI example.*'maybe'"):
        read_nli(bad)


def test_classification_metrics_equal_sklearn():
    from sklearn.metrics import classification_report, confusion_matrix

    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 50)
    y_pred = np.where(rng.random(50) < 0.6, y_true, rng.integers(0, 2, 50))  # class 2 predicted only when right
    y_pred[y_true == 2] = 0  # …and never: its precision is undefined (0.0 as zero_division=0)
    m = classification_metrics(y_true, y_pred)
    ref = classification_report(y_true, y_pred, labels=[0, 1, 2], target_names=list(NLI_LABELS),
                                output_dict=True, zero_division=0)
    for lab in NLI_LABELS:
        c = m.per_class[lab]
        assert (c.precision, c.recall, c.f1, c.support) == pytest.approx(
            (ref[lab]["precision"], ref[lab]["recall"], ref[lab]["f1-score"], ref[lab]["support"]), abs=1e-12)
    assert m.accuracy == pytest.approx(ref["accuracy"], abs=1e-12)
    assert m.macro_f1 == pytest.approx(ref["macro avg"]["f1-score"], abs=1e-12)
    assert m.confusion == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    assert m.per_class["neutral"].precision == 0.0


def test_nli_finetune_end_to_end_learns_and_reports(tiny_run, nli_files, tmp_path, capsys):
    from sklearn.metrics import classification_report

    out = tmp_path / "nli"
    code = pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", str(nli_files["train"]),
                        "--dev", str(nli_files["dev"]), "--test", str(nli_files["test"]), "--epochs", "6",
                        "--lr", "1e-2", "--head-lr", "1e-2", "--batch-size", "16", "--dropout", "0",
                        "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped: not JSON" in printed and str(out / "nli.json") in printed
    doc = json.loads((out / "nli.json").read_text())
    assert doc["schema"] == "pertvl-finetune-nli/1" and doc["info"]["encoder"] == "torch-run"
    assert doc["data"]["train"]["examples"] == 90 and sum(doc["data"]["train"]["skipped"].values()) == 4
    assert len(doc["history"]) == 6 and 1 <= doc["best_epoch"] <= 6
    best = doc["history"][doc["best_epoch"] - 1]["metrics"]["dev_accuracy"]
    assert best == max(h["metrics"]["dev_accuracy"] for h in doc["history"])
    assert doc["dev"]["accuracy"] == pytest.approx(best)
    # Clearly above chance (1/3) on a learnable set.
    assert doc["dev"]["accuracy"] >= 0.7, doc["history"]
    assert doc["test"]["accuracy"] >= 0.6
    # Every reported number equals sklearn's on the written predictions.
    preds = [json.loads(line) for line in (out / "nli.predictions.jsonl").read_text().splitlines()]
    for split in ("dev", "test"):
        rows = [p for p in preds if p["split"] == split]
        assert len(rows) == 30 and all(p["where"].startswith(str(nli_files[split])) for p in rows)
        ref = classification_report([p["gold"] for p in rows], [p["predicted"] for p in rows],
                                    labels=list(NLI_LABELS), output_dict=True, zero_division=0)
        got = doc[split]
        assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert got["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"], abs=1e-12)
        for lab in NLI_LABELS:
            for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                                 ("support", "support")):
                assert got["per_class"][lab][key] == pytest.approx(ref[lab][ref_key], abs=1e-12)
        assert sum(map(sum, got["confusion"])) == 30
    md = (out / "nli.md").read_text()
    assert "| entailment |" in md and "Confusion matrix (test" in md


def test_nli_is_seeded(tiny_run, nli_files):
    from dataclasses import asdict

    files = [read_nli(nli_files[s]) for s in ("train", "dev", "test")]
    settings = FitSettings(epochs=1, lr=1e-3, batch_size=16, device="cpu", seed=5)
    a = finetune_nli(*files, run=tiny_run, settings=settings)
    b = finetune_nli(*files, run=tiny_run, settings=settings)
    assert a.history[0].train_loss == b.history[0].train_loss
    assert asdict(a.test) == asdict(b.test) and a.predictions == b.predictions


@pytest.fixture(scope="module")
def radnli_files(tmp_path_factory) -> dict[str, Path]:
    """radnli_{dev,test}_v1.jsonl in RadNLI's format (sentence1, sentence2, gold_label): RadNLI ships
    no training file. 45 / 30 learnable items, 15 / 10 per label."""
    root = tmp_path_factory.mktemp("radnli")
    rng = np.random.default_rng(7)
    files = {}
    for split, n in (("dev", 15), ("test", 10)):
        files[split] = root / f"radnli_{split}_v1.jsonl"
        files[split].write_text("".join(json.dumps(it) + "\n" for it in _nli_items(n, rng)))
    return files


def _text_tokenizer(tiny_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run / "final" / "text_encoder")


def test_nli_sentences_reach_the_tokenizer_unchanged(tiny_run):
    """No report cleaning for NLI: "isn't" stays "isn't" (clean_text made it "isn t", losing the
    negation cue); the uncased tokenizer lowercases by itself and keeps the apostrophe piece."""
    tok = _text_tokenizer(tiny_run)
    seen = []

    class Spy:
        def __call__(self, a, b, **kw):
            seen.append((list(a), list(b)))
            return tok(a, b, **kw)

    premise, hypothesis = "The heart isn't enlarged.", "No CARDIOMEGALY; the lungs aren't clear."
    from pertvl.evaluate.finetune.nli import NliCollate

    batch = NliCollate(Spy(), 256)([NliExample(premise, hypothesis, 1, "x.jsonl:1")])
    assert seen == [([premise], [hypothesis])]
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens[:8] == ["[CLS]", "the", "heart", "isn", "'", "t", "enlarged", "."]
    assert "'" in tokens[tokens.index("[SEP]"):] and "cardiomegaly" in "".join(tokens).replace("##", "")
    assert batch["token_type_ids"][0].tolist() == [0] * (tokens.index("[SEP]") + 1) + [1] * (
        len(tokens) - tokens.index("[SEP]") - 1)


def test_nli_truncation_is_counted_and_reported(tiny_run, radnli_files, tmp_path, capsys):
    tok = _text_tokenizer(tiny_run)
    long_premise = " ".join(["small left pleural effusion"] * 12) + "."
    lines = [{"sentence1": long_premise, "sentence2": "there is an effusion", "gold_label": "entailment"},
             {"sentence1": "no effusion", "sentence2": "there is an effusion", "gold_label": "contradiction"},
             {"sentence1": "heart size normal", "sentence2": long_premise, "gold_label": "neutral"}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    f = read_nli(path)
    lengths = [len(tok(e.premise, e.hypothesis)["input_ids"]) for e in f.examples]
    assert lengths[0] > 32 and lengths[1] < 32 and lengths[2] > 32
    t = nli_truncation(tok, f.examples, 32)
    assert t == {"pairs": 2, "longest": max(lengths), "max_length": 32, "first": f"{path}:1"}
    settings = FitSettings(epochs=1, batch_size=8, device="cpu", freeze_encoder=True)
    r = finetune_nli(f, None, read_nli(radnli_files["test"]), run=tiny_run, settings=settings, max_length=32)
    printed = capsys.readouterr().out
    assert f"warning: {path}: 2 of 3 sentence pairs exceed 32 word pieces (longest {max(lengths)})" in printed
    assert r.data["train"]["truncated"] == t and r.data["test"]["truncated"]["pairs"] == 0
    assert r.settings["max_length"] == 32 and "no report cleaning" in r.data["text"]
    # Above the encoder's positions (the tiny BERT has 128), pairs are cut at 128, said once.
    r = finetune_nli(f, None, f, run=tiny_run, settings=settings, max_length=512)
    assert r.settings["max_length"] == 128 and "max_length 512 > the encoder's 128 positions" in capsys.readouterr().out


def test_nli_folds_are_stratified_disjoint_and_seeded():
    rng = np.random.default_rng(0)
    f = NliFile("x.jsonl", [NliExample(it["sentence1"], it["sentence2"], NLI_LABELS.index(it["gold_label"]),
                                             f"x.jsonl:{i + 1}") for i, it in enumerate(_nli_items(10, rng))], 30)
    folds = nli_folds(f.examples, 4, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(30))
    assert [len(fold) for fold in folds] == [8, 8, 7, 7]
    for fold in folds:  # 10 per label over 4 folds: 2 or 3 of each label per fold
        counts = Counter(f.examples[i].label for i in fold)
        assert all(counts[lab] in (2, 3) for lab in range(3)), counts
    assert folds == nli_folds(f.examples, 4, seed=3) and folds != nli_folds(f.examples, 4, seed=4)
    with pytest.raises(ValueError, match="at least 2 folds"):
        nli_folds(f.examples, 1, seed=0)
    with pytest.raises(ValueError, match="31 folds need at least 31 examples, got 30"):
        nli_folds(f.examples, 31, seed=0)


def test_radnli_train_on_dev_test_on_test(tiny_run, radnli_files, tmp_path, capsys):
    """The authors' RadNLI protocol: train on radnli_dev_v1.jsonl, test on radnli_test_v1.jsonl, no --dev."""
    out = tmp_path / "radnli"
    code = pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", str(radnli_files["dev"]),
                        "--test", str(radnli_files["test"]), "--epochs", "2", "--batch-size", "16",
                        "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{radnli_files['dev']}: 45 examples (entailment 15, contradiction 15, neutral 15;" in printed
    assert f"{radnli_files['test']}: 30 examples (entailment 10, contradiction 10, neutral 10;" in printed
    assert "protocol: train/test (last epoch; no dev set)" in printed
    doc = json.loads((out / "nli.json").read_text())
    assert doc["dev"] is None and doc["best_epoch"] == 2 and len(doc["history"]) == 2
    assert doc["settings"]["protocol"] == "train/test" and doc["settings"]["selection"] == "last epoch (no dev set)"
    assert set(doc["data"]) >= {"train", "test"} and "dev" not in doc["data"]
    assert doc["data"]["train"]["labels"] == {"entailment": 15, "contradiction": 15, "neutral": 15}
    preds = [json.loads(line) for line in (out / "nli.predictions.jsonl").read_text().splitlines()]
    assert {p["split"] for p in preds} == {"test"} and len(preds) == 30
    assert doc["test"]["accuracy"] == pytest.approx(np.mean([p["gold"] == p["predicted"] for p in preds]), abs=1e-12)
    assert "last epoch of 2 (no dev set)" in (out / "nli.md").read_text()


def test_radnli_k_fold_cross_validation(tiny_run, radnli_files, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    out = tmp_path / "cv"
    code = pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", str(radnli_files["dev"]), "--cv", "3",
                        "--freeze-encoder", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                        "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{radnli_files['dev']}: 45 examples (entailment 15, contradiction 15, neutral 15;" in printed
    for k in (1, 2, 3):  # 15 per label over 3 folds: exactly 5 of each in every test fold
        assert (f"fold {k}/3: train 30 (entailment 10, contradiction 10, neutral 10), test 15 (entailment 5, "
                "contradiction 5, neutral 5)") in printed
    doc = json.loads((out / "nli.json").read_text())
    assert doc["schema"] == "pertvl-finetune-nli-cv/1" and doc["settings"]["folds"] == 3
    assert doc["data"]["folds"] == [15, 15, 15] and len(doc["folds"]) == 3
    preds = [json.loads(line) for line in (out / "nli.predictions.jsonl").read_text().splitlines()]
    # every example is predicted exactly once, by the fold that held it out
    assert sorted(p["where"] for p in preds) == sorted(f"{radnli_files['dev']}:{i}" for i in range(1, 46))
    per_fold = []
    for k in (1, 2, 3):
        rows = [p for p in preds if p["split"] == f"fold{k}"]
        per_fold.append(accuracy_score([p["gold"] for p in rows], [p["predicted"] for p in rows]))
        assert doc["folds"][k - 1]["test"]["metrics"]["accuracy"] == pytest.approx(per_fold[-1], abs=1e-12)
        assert doc["folds"][k - 1]["train"]["examples"] == 30 and doc["folds"][k - 1]["test"]["examples"] == 15
    assert doc["accuracy"]["per_fold"] == pytest.approx(per_fold, abs=1e-12)
    assert doc["accuracy"]["mean"] == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert doc["accuracy"]["std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-12)
    gold, pred = [p["gold"] for p in preds], [p["predicted"] for p in preds]
    assert doc["pooled"]["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert doc["pooled"]["macro_f1"] == pytest.approx(
        f1_score(gold, pred, labels=list(NLI_LABELS), average="macro", zero_division=0), abs=1e-12)
    assert "3-fold cross-validation" in (out / "nli.md").read_text()


def test_nli_protocol_errors(tiny_run, radnli_files, tmp_path, capsys):
    base = ["finetune", "nli", "--run", str(tiny_run), "--train", str(radnli_files["dev"]), "--out", str(tmp_path)]
    assert pertvl_main([*base, "--cv", "3", "--test", str(radnli_files["test"])]) == 2
    assert "--cv K cross-validates on --train alone; drop --dev/--test" in capsys.readouterr().err
    assert pertvl_main(base) == 2
    assert "give --test JSONL (train/test or train/dev/test protocol) or --cv K" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pertvl_main([*base, "--cv", "1"])


# ----------------------------------------------------------------------------- CheXpert


@pytest.mark.parametrize("blank", ["mask", "zero"])
def test_uncertain_policies_on_known_rows(chexpert, blank):
    nan = math.nan
    # rows kept (frontal, image present): patient00001 (1, 0), 00002 (-1, 1), 00003 (blank, -1);
    # the lateral view of 00003 is filtered and 00004's image is missing.
    expected = {
        "zeros": ([[1, 0], [0, 1], [0, 0]], [[1, 1], [1, 1], [0, 1]]),
        "ones": ([[1, 0], [1, 1], [0, 1]], [[1, 1], [1, 1], [0, 1]]),
        "ignore": ([[1, 0], [0, 1], [0, 0]], [[1, 1], [0, 1], [0, 0]]),
        # Consolidation and Pleural Effusion are both U-Zeros labels of the authors' mix
        "u-mix": ([[1, 0], [0, 1], [0, 0]], [[1, 1], [1, 1], [0, 1]]),
    }
    for policy, (targets, mask) in expected.items():
        if blank == "zero":  # patient00003's blank Consolidation: a negative in the loss
            mask = [row[:] for row in mask]
            mask[2][0] = 1
        data = prepare_chexpert(chexpert["known"], chexpert["images"], valid_csv=chexpert["known"],
                                   uncertain=policy, blank=blank)
        assert [r.group for r in data.train] == ["patient00001", "patient00002", "patient00003"]
        np.testing.assert_array_equal(data.train_targets, np.array(targets, np.float32))
        np.testing.assert_array_equal(data.train_mask, np.array(mask, np.float32))
        np.testing.assert_array_equal(data.test_values, np.array([[1, 0], [-1, 1], [nan, -1]]))
        s = data.summary
        assert s["rows_read"] == 10 and s["rows_skipped"] == {"lateral view (frontal only)": 2}
        assert s["images_missing"] == 2  # patient00004, in the train and in the (same) test CSV
        assert all("patient00004" in p and "not found" in p for p in s["image_problems"])
        assert any(p.endswith(":5: lateral view (frontal only)") for p in s["row_problems"])
    all_views = prepare_chexpert(chexpert["known"], chexpert["images"], valid_csv=chexpert["known"],
                                    frontal_only=False, blank=blank)
    assert len(all_views.train) == 4 and all_views.train[3].view == "Lateral"
    np.testing.assert_array_equal(all_views.train_targets[3], [1, 1])


def test_blank_cells_are_negatives_by_default_in_a_chexpert_csv(tmp_path):
    """CheXpert's convention: a blank cell = not mentioned = negative. A frontal "No Finding" row with
    blank Consolidation / Pleural Effusion trains with targets [0, 0] (it trained nothing before)."""
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)
    assert header.startswith("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,") and "Pleural Effusion" in header
    cells = {name: "" for name in CHEXPERT_LABELS}
    cells["No Finding"] = "1.0"
    row = "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP," + ",".join(
        cells[name] for name in CHEXPERT_LABELS)
    (tmp_path / "train.csv").write_text(header + "\n" + row + "\n")
    _png(tmp_path / "images" / "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg", 90)
    data = prepare_chexpert(tmp_path / "train.csv", tmp_path / "images", valid_csv=tmp_path / "train.csv")
    np.testing.assert_array_equal(data.test_values, [[np.nan, np.nan]])
    np.testing.assert_array_equal(data.train_targets, np.array([[0, 0]], np.float32))
    np.testing.assert_array_equal(data.train_mask, np.array([[1, 1]], np.float32))
    assert data.summary["blank_policy"] == "zero"
    masked = prepare_chexpert(tmp_path / "train.csv", tmp_path / "images", valid_csv=tmp_path / "train.csv",
                                 blank="mask")
    np.testing.assert_array_equal(masked.train_mask, np.array([[0, 0]], np.float32))


def test_u_mix_is_u_ones_for_edema_and_atelectasis_only():
    labels = ("Edema", "Atelectasis", "Consolidation", "Pleural Effusion", "Cardiomegaly")
    values = np.array([[-1.0, -1.0, -1.0, -1.0, -1.0], [0.0, np.nan, 1.0, np.nan, -1.0]])
    targets, mask = chexpert_targets(values, "u-mix", labels=labels)
    np.testing.assert_array_equal(targets, np.array([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], np.float32))
    np.testing.assert_array_equal(mask, np.ones((2, 5), np.float32))
    targets, mask = chexpert_targets(values, "u-mix", blank="mask", labels=labels)
    np.testing.assert_array_equal(mask, np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], np.float32))


def test_test_scores_follow_the_blank_policy():
    from sklearn.metrics import roc_auc_score

    values = np.array([[1.0], [0.0], [np.nan], [-1.0], [np.nan], [1.0]])
    probs = np.array([[0.9], [0.2], [0.6], [0.5], [0.1], [0.4]])
    zero = multilabel_scores(probs, values, ["Edema"])["Edema"]
    y, p = [1, 0, 0, 0, 1], [0.9, 0.2, 0.6, 0.1, 0.4]  # blanks scored as negatives, uncertain left out
    assert (zero.n, zero.n_pos, zero.n_neg, zero.blank_negatives) == (5, 2, 3, 2)
    assert (zero.excluded_uncertain, zero.excluded_blank) == (1, 0)
    assert zero.auroc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert zero.accuracy == pytest.approx(3 / 5)
    mask = multilabel_scores(probs, values, ["Edema"], blank="mask")["Edema"]
    assert (mask.n, mask.n_pos, mask.n_neg, mask.blank_negatives, mask.excluded_blank) == (3, 2, 1, 0, 2)
    assert mask.auroc == pytest.approx(roc_auc_score([1, 0, 1], [0.9, 0.2, 0.4]), abs=1e-12)


def test_read_chexpert_csv_errors_and_bad_cells(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Consolidation\nx.png,1.0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Pleural Effusion', 'Frontal/Lateral'\]"):
        read_chexpert_csv(bad)
    cells = tmp_path / "cells.csv"
    _write_csv(cells, [_csv_row("a/patient00001/s/v.png", "Frontal", "yes", "1.0"),
                       _csv_row("b.png", "Frontal", "1", "0")])
    table = read_chexpert_csv(cells)
    assert [r.path for r in table.rows] == ["b.png"] and table.rows[0].group == "b.png"
    assert table.problems == [f"{cells}:2: bad label value: Consolidation = 'yes' (expected 1.0, 0.0, -1.0 or blank)"]


def test_split_by_group_keeps_patients_together():
    groups = [f"patient{i // 2}" for i in range(40)] + ["lonely.png"]
    a = split_by_group(groups, 0.25, seed=3)
    assert (a == split_by_group(groups, 0.25, seed=3)).all()
    assert not (a == split_by_group(groups, 0.25, seed=4)).all()
    for g in set(groups):
        assert len({bool(t) for t, gg in zip(a, groups, strict=True) if gg == g}) == 1
    assert len({g for g, t in zip(groups, a, strict=True) if t}) == round(0.25 * 21)


def test_chexpert_finetune_end_to_end(tiny_run, chexpert, tmp_path):
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "cx"
    code = pertvl_main(["finetune", "chexpert", "--run", str(tiny_run), "--csv", str(chexpert["csv"]),
                        "--images", str(chexpert["images"]), "--uncertain", "ignore", "--test-fraction", "0.4",
                        "--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--seed", "1",
                        "--device", "cpu", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "chexpert.json").read_text())
    d = doc["data"]
    assert doc["schema"] == "pertvl-finetune-chexpert/1" and doc["settings"]["image_size"] == 32
    assert d["rows_read"] == 46 and d["rows_skipped"] == {"lateral view (frontal only)": 1}
    assert d["images_missing"] == 1 and "patient00004" in d["image_problems"][0]
    assert d["images_undecodable"] == 1 and any("patient00045" in p and "cannot decode" in p
                                                for p in d["image_problems"])
    assert d["train_rows"] + d["test_rows"] == 44  # 45 frontal rows, one image missing
    same = prepare_chexpert(chexpert["csv"], chexpert["images"], uncertain="ignore", test_fraction=0.4,
                            seed=1)
    assert len(same.test) == d["test_rows"]
    broken_in_test = any(r.group == "patient00045" for r in same.test)
    assert d["test_images_scored"] == d["test_rows"] - broken_in_test
    per = doc["test"]["per_label"]
    assert list(per) == ["Consolidation", "Pleural Effusion"]
    with open(out / "chexpert.predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == d["test_images_scored"]
    for lab in per:
        rows = [r for r in preds if r[lab] in ("1.0", "0.0", "")]  # blanks are negatives (--blank zero)
        y = [int(r[lab] == "1.0") for r in rows]
        p = [float(r[f"{lab} probability"]) for r in rows]
        assert per[lab]["n"] == len(rows) and per[lab]["n_pos"] == sum(y) and 0 < sum(y) < len(y)
        assert per[lab]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert per[lab]["accuracy"] == pytest.approx(np.mean([(pp >= 0.5) == (yy == 1) for pp, yy in zip(p, y,
                                                                                                     strict=True)]))
    assert doc["test"]["mean_auroc"] == pytest.approx(np.mean([v["auroc"] for v in per.values()]))
    assert "U-Ignore" in (out / "chexpert.md").read_text()


def test_frozen_probe_matches_across_runs_and_split_is_by_patient(tiny_run, chexpert):
    data = prepare_chexpert(chexpert["csv"], chexpert["images"], test_fraction=0.3, seed=2)
    train_groups, test_groups = {r.group for r in data.train}, {r.group for r in data.test}
    assert not train_groups & test_groups
    settings = FitSettings(epochs=3, lr=1e-3, batch_size=8, device="cpu", freeze_encoder=True, seed=0)
    a = finetune_chexpert(data, chexpert["images"], run=tiny_run, settings=settings)
    b = finetune_chexpert(data, chexpert["images"], run=tiny_run, settings=settings)
    assert a.info["mode"] == "frozen encoder (linear probe)"
    assert a.predictions == b.predictions and [h.train_loss for h in a.history] == [h.train_loss for h in b.history]


# ----------------------------------------------------------------------------- ONNX probe, phantom corpus


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    from pertvl.export.onnx import export_model
    from pertvl.model import DualEncoder

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(DualEncoder.from_pretrained(tiny_run / "final"), out, image_size=32, parity=False, text_graph="traced")
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from pertvl.data.phantom import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(n=40, seed=0, size=64, out=out, nli=True)
    return out


def test_export_probe_nli_and_chexpert(tiny_export, nli_files, phantoms, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "probe"
    code = pertvl_main(["finetune", "nli", "--export", str(tiny_export), "--train", str(nli_files["train"]),
                        "--dev", str(nli_files["dev"]), "--test", str(nli_files["test"]), "--out", str(out)])
    assert code == 0 and "linear probe" in capsys.readouterr().out
    doc = json.loads((out / "nli.json").read_text())
    assert doc["info"]["encoder"] == "onnx-probe" and doc["settings"]["freeze_encoder"] is True
    assert (doc["settings"]["epochs"], doc["settings"]["head_lr"]) == PROBE_DEFAULTS
    # [u, v, |u-v|, u*v] separates copies, negations and unrelated sentences even for a random encoder.
    assert doc["dev"]["accuracy"] >= 0.7, doc["history"]

    code = pertvl_main(["finetune", "chexpert", "--export", str(tiny_export), "--csv", str(phantoms / "labels.csv"),
                        "--images", str(phantoms), "--workers", "0", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "chexpert.json").read_text())
    assert doc["settings"]["image_size"] == 32 and doc["data"]["rows_read"] == 40
    assert doc["data"]["train_rows"] + doc["data"]["test_rows"] == 40
    with open(out / "chexpert.predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    for lab, scores in doc["test"]["per_label"].items():
        y = [int(float(r[lab])) for r in preds]
        p = [float(r[f"{lab} probability"]) for r in preds]
        expected = roc_auc_score(y, p) if 0 < sum(y) < len(y) else None
        assert scores["auroc"] == pytest.approx(expected, abs=1e-9)

    code = pertvl_main(["finetune", "chexpert", "--export", str(tiny_export), "--csv", str(phantoms / "labels.csv"),
                        "--images", str(phantoms), "--image-size", "64", "--out", str(out)])
    assert code == 2 and "takes 32 px images" in capsys.readouterr().err


def test_phantom_corpus_drives_both_tasks(tiny_run, phantoms, tmp_path):
    summary = json.loads((phantoms / "summary.json").read_text())
    out = tmp_path / "ph"
    assert pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", str(phantoms / "nli_train.jsonl"),
                        "--dev", str(phantoms / "nli_dev.jsonl"), "--test", str(phantoms / "nli_test.jsonl"),
                        "--epochs", "1", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads((out / "nli.json").read_text())
    for split in ("train", "dev", "test"):
        assert doc["data"][split]["examples"] == summary["nli"][split]["items"]
        assert doc["data"][split]["skipped"] == {}
    assert pertvl_main(["finetune", "chexpert", "--run", str(tiny_run), "--csv", str(phantoms / "labels.csv"),
                        "--images", str(phantoms), "--epochs", "1", "--workers", "0", "--device", "cpu",
                        "--out", str(out)]) == 0
    doc = json.loads((out / "chexpert.json").read_text())
    assert doc["settings"]["image_size"] == 32  # the run's data.image_size
    assert doc["data"]["images_missing"] == 0 and doc["data"]["images_undecodable"] == 0
    counts = doc["data"]["train_label_counts"]["Pleural Effusion"]
    assert counts["uncertain"] == 0 and counts["blank"] == 0 and counts["positive"] > 0


def test_cli_defaults_match_the_module():
    from pertvl.cli import build_parser

    args = build_parser().parse_args(["finetune", "chexpert", "--run", "r", "--csv", "c", "--images", "i",
                                      "--out", "o"])
    assert args.group_pattern == DEFAULT_GROUP_PATTERN and args.frontal_only is True
    assert args.labels.split(",") == list(PAPER_CHEXPERT_LABELS) and args.uncertain == "zeros"
    assert args.blank == "zero"
    args_nli = build_parser().parse_args(["finetune", "nli", "--run", "r", "--train", "t", "--test", "x", "--out", "o"])
    assert args_nli.max_length == NLI_MAX_LENGTH == 256 and args_nli.dev is None and args_nli.cv is None
    assert build_parser().parse_args(["finetune", "chexpert", "--run", "r", "--csv", "c", "--images", "i", "--out",
                                      "o", "--blank", "mask", "--uncertain", "u-mix"]).blank == "mask"
    settings = fit_settings(args, "chexpert")
    expected = (*FINETUNE_DEFAULTS["chexpert"], False)
    assert (settings.epochs, settings.head_lr, settings.freeze_encoder) == expected
    args = build_parser().parse_args(["finetune", "chexpert", "--export", "e", "--csv", "c", "--images", "i",
                                      "--out", "o", "--all-views", "--epochs", "4"])
    assert args.frontal_only is False
    assert (fit_settings(args, "chexpert").epochs, fit_settings(args, "chexpert").freeze_encoder) == (4, True)


def test_split_from_pairs_and_the_results_as_comparison_columns(tiny_run, phantoms, tmp_path, capsys):
    """`--split-from PAIRS`: the corpus' train split trains, val and test are tested (no image the
    pretraining saw is tested); a CSV row whose image no pair has is skipped and counted. The results
    read back through the registry as the comparison table's flat metrics; `--dataset` names the
    NLI columns."""
    from pertvl.data.records import read_pairs
    from pertvl.evaluate.catalog import metric_info, result_from_json

    corpus = tmp_path / "corpus"  # a copy, with one more labelled image that no pair has
    shutil.copytree(phantoms, corpus)
    splits = Counter(p.split for p in read_pairs(corpus / "pairs.jsonl"))
    csv_path = corpus / "labels.csv"
    first = sorted((corpus / "images").iterdir())[0]
    shutil.copy(first, corpus / "images" / "not-a-phantom.png")
    with open(csv_path, "a") as f:
        f.write("images/not-a-phantom.png,,,Frontal,PA" + "," * (len(CHEXPERT_LABELS) - 1) + "\n")
    out = tmp_path / "out"
    assert pertvl_main(["finetune", "chexpert", "--run", str(tiny_run), "--csv", str(csv_path), "--images",
                        str(corpus), "--split-from", str(corpus / "pairs.jsonl"), "--freeze-encoder",
                        "--epochs", "2", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads((out / "chexpert.json").read_text())
    assert doc["data"]["train_rows"] == splits["train"] and doc["data"]["test_rows"] == splits["val"] + splits["test"]
    assert doc["data"]["rows_skipped"] == {"image not in the pairs file": 1}
    assert doc["data"]["split"]["split_from"] == str(corpus / "pairs.jsonl")
    flat = result_from_json(doc).metrics()
    for lab, s in doc["test"]["per_label"].items():
        assert flat[f"chexpert/{lab}/auroc"] == s["auroc"] and flat[f"chexpert/{lab}/accuracy"] == s["accuracy"]
    assert flat["chexpert/mean_auroc"] == doc["test"]["mean_auroc"]
    assert metric_info("chexpert/Pleural Effusion/auroc").label == "Pleural Effusion AUROC"
    assert metric_info("chexpert/mean_accuracy").summary and not metric_info("chexpert/mean_auroc").percent

    assert pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", str(phantoms / "nli_train.jsonl"),
                        "--test", str(phantoms / "nli_test.jsonl"), "--dataset", "phantom", "--freeze-encoder",
                        "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads((out / "nli.json").read_text())
    assert doc["info"]["dataset"] == "phantom"
    assert result_from_json(doc).metrics() == {"nli/phantom/accuracy": doc["test"]["accuracy"],
                                               "nli/phantom/macro_f1": doc["test"]["macro_f1"]}
    assert metric_info("nli/phantom/accuracy").label == "NLI phantom accuracy"

    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: one split rule only
        pertvl_main(["finetune", "chexpert", "--run", str(tiny_run), "--csv", str(csv_path), "--images",
                     str(corpus), "--split-from", "p.jsonl", "--valid-csv", "v.csv", "--out", str(out)])
    with pytest.raises(SystemExit):
        pertvl_main(["finetune", "nli", "--run", str(tiny_run), "--train", "t", "--test", "t", "--dataset", "a/b",
                     "--out", str(out)])
    assert "a metric key part" in capsys.readouterr().err
    assert pertvl_main(["finetune", "chexpert", "--run", str(tiny_run), "--csv", str(csv_path), "--images",
                        str(corpus), "--split-from", str(tmp_path / "nowhere.jsonl"), "--out", str(out)]) == 2
    assert "nowhere.jsonl: no such pairs file (--split-from)" in capsys.readouterr().err
