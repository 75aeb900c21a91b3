"""Downstream fine-tuning (paper §IV, Tables II and III): `pertvl finetune nli` and `pertvl finetune chexpert`.

NLI (Table III: MedNLI / RadNLI). The pretrained TEXT transformer reads the BERT sentence-pair
input "[CLS] premise [SEP] hypothesis [SEP]": the sentences go to the model's HF tokenizer as
written — no report cleaning (pertvl's clean_text would split "isn't" into "isn t", a lost negation
cue; an uncased tokenizer lowercases by itself) — and pairs longer than `max_length` word pieces
(default 256: MedNLI's longest pairs reach ~200+ pieces) are truncated, counted and reported. A
dropout + linear head on the [CLS] state predicts entailment / contradiction / neutral.
Cross-entropy, AdamW, linear warm-up then linear decay. Protocols (`nli_protocol`):
    train / dev / test   (MedNLI: mli_{train,dev,test}_v1.jsonl) the epoch with the best dev accuracy
                         is kept (ties: the earlier epoch) and evaluated on dev and test;
    train / test         (RadNLI, the authors' protocol: train on radnli_dev_v1.jsonl, test on
                         radnli_test_v1.jsonl; RadNLI ships no training file) the last epoch is
                         evaluated on test (no dev set to select on);
    k-fold CV on one file (`cross_validate_nli`; e.g. RadNLI's 480 dev + 480 test pairs in one file):
                         label-stratified seeded folds, each fold trained from the pretrained
                         encoder on the others and tested on itself (last epoch); accuracy per fold,
                         mean ± std, and the pooled out-of-fold metrics.

CheXpert (Table II: Consolidation, Pleural Effusion). The pretrained IMAGE backbone's pooled
global features (the input of the global projection head) + a dropout + linear multi-label head,
binary cross-entropy over the label cells the policies keep:
    1.0 → target 1;  0.0 → target 0;
    blank (the labeler found no mention) → `blank` policy: "zero" → target 0 (default: CheXpert's
        convention "not mentioned = negative", as the authors' and GLoRIA's code fill blanks with 0)
        | "mask" → out of the loss;
    -1.0 (uncertain) → `uncertain` policy: "zeros" U-Zeros → 0 (default) | "ones" U-Ones → 1 |
        "ignore" U-Ignore → out of the loss | "u-mix" → U-Ones for Edema and Atelectasis, U-Zeros
        for every other label (the per-label mix of the CheXpert authors, Irvin et al. 2019 §4).
At test time 1/0 cells are scored, blank cells as negatives under blank "zero" (excluded under
"mask"), uncertain cells never. Frontal views only by default (the paper's setting). Without --valid-csv the CSV
is split into train/test by patient (seeded), so no patient is on both sides. The last epoch is
evaluated (there is no separate dev set to select on; selecting on the test set would be cheating).

Where the encoder comes from:
    --run RUN_DIR      RUN_DIR/final (DualEncoder.save_pretrained) with torch: fine-tuned end to end,
                       or frozen with --freeze-encoder (a linear probe on the encoder's features).
    --text-model PATH  (nli only) a plain Hugging Face model folder, e.g. the offline MiniLM: the
                       not-pretrained baseline of Table III.
    --export DIR       an ONNX export (pertvl export). It holds no torch weights, so it cannot be
                       fine-tuned: the encoder is frozen and the head is a linear probe on the
                       export's L2-normalized global embeddings (nli: [u, v, |u-v|, u*v] of premise u
                       and hypothesis v, the InferSent / Sentence-BERT pair features; chexpert: the
                       image embedding), computed with onnxruntime.
When the encoder is frozen, features are computed once, standardized with the training set's
mean/std, and the head trains on them (the CLI then defaults to 30 epochs at head lr 1e-2).

Outputs in --out: NAME.json (schema pertvl-finetune-nli/1 or pertvl-finetune-chexpert/1), NAME.md,
and the per-item predictions (NAME.predictions.jsonl / NAME.predictions.csv) for any other metric.
Bad input never stops a run silently: a bad NLI line or CSV row is skipped, counted by reason and
named (file:line); a missing image is skipped, counted and named before training, an undecodable
one when it is first read (a train image that only ever fell into the dropped ragged last batch
is never read, so never counted).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.records import atomic_write_text, write_json

log = logging.getLogger(__name__)

NLI_SCHEMA = "pertvl-finetune-nli/1"
NLI_CV_SCHEMA = "pertvl-finetune-nli-cv/1"
# Word pieces per NLI sentence pair: MedNLI's longest pairs reach ~200+ pieces with BERT WordPiece
# vocabularies; 256 covers them (the authors used 512, which only pads). Longer pairs are truncated
# and reported; the value is capped at the encoder's max_position_embeddings.
NLI_MAX_LENGTH = 256
CHEXPERT_SCHEMA = "pertvl-finetune-chexpert/1"
NLI_LABELS = ("entailment", "contradiction", "neutral")
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
PAPER_CHEXPERT_LABELS = ("Consolidation", "Pleural Effusion")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore", "u-mix")
UNCERTAIN_NAMES = {"zeros": "U-Zeros", "ones": "U-Ones", "ignore": "U-Ignore",
                   "u-mix": "U-mix (U-Ones for Edema and Atelectasis, U-Zeros otherwise)"}
U_MIX_ONES = ("Edema", "Atelectasis")  # the labels "u-mix" maps uncertain to 1; U-Zeros for the others
BLANK_POLICIES = ("zero", "mask")
VIEW_COLUMN = "Frontal/Lateral"
# The patient folder of CheXpert ("…/patient00001/study1/…") or MIMIC-CXR ("…/p10/p10000032/s5…/…").
DEFAULT_GROUP_PATTERN = r"(?:^|/)(patient\d+|p\d{8})(?=/)"
MAX_LISTED_PROBLEMS = 1000  # problems named in the JSON; all are counted


# ============================================================================ data: NLI


@dataclass
class NliExample:
    premise: str
    hypothesis: str
    label: int  # index into NLI_LABELS
    where: str  # "file:line"


@dataclass
class NliFile:
    """One MedNLI/RadNLI jsonl file: the usable examples and what was skipped (reason → count,
    and the first MAX_LISTED_PROBLEMS problems as "file:line: reason")."""

    path: str
    examples: list[NliExample]
    lines: int  # non-blank lines read
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def label_counts(self) -> dict[str, int]:
        counts = Counter(NLI_LABELS[e.label] for e in self.examples)
        return {lab: counts.get(lab, 0) for lab in NLI_LABELS}

    def summary(self) -> dict[str, Any]:
        return {"file": self.path, "lines": self.lines, "examples": len(self.examples),
                "labels": self.label_counts(), "skipped": dict(self.skipped), "problems": self.problems}

    def describe(self) -> str:
        """One line: examples per label, lines read, skips (printed by the CLI)."""
        per_label = ", ".join(f"{lab} {n}" for lab, n in self.label_counts().items())
        return (f"{self.path}: {len(self.examples)} examples ({per_label}; {self.lines} lines; "
                f"skipped: {_skips(self.skipped)})")

    def subset(self, indices: Sequence[int], name: str) -> NliFile:
        """The examples at `indices` as an NliFile named `name` (a cross-validation fold)."""
        return NliFile(name, [self.examples[i] for i in indices], len(indices))


def nli_folds(examples: Sequence[NliExample], k: int, seed: int) -> list[list[int]]:
    """k label-stratified folds of example indices: the examples of each label are permuted by
    numpy's default_rng(seed) and dealt round-robin (label after label, continuing where the last
    label stopped), so fold sizes differ by at most one and every label is spread evenly.

    Raises:
        ValueError: k < 2 or more folds than examples.
    """
    if k < 2:
        raise ValueError(f"cross-validation: expected at least 2 folds, got {k}")
    if k > len(examples):
        raise ValueError(f"cross-validation: {k} folds need at least {k} examples, got {len(examples)}")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    at = 0
    for label in range(len(NLI_LABELS)):
        idx = [i for i, e in enumerate(examples) if e.label == label]
        for i in rng.permutation(len(idx)):
            folds[at % k].append(idx[i])
            at += 1
    return [sorted(f) for f in folds]


def read_nli(path: str | os.PathLike) -> NliFile:
    """Read a MedNLI/RadNLI jsonl file (fields sentence1, sentence2, gold_label).

    A line that is not a JSON object, lacks a non-empty sentence1/sentence2, or whose gold_label is
    not entailment/contradiction/neutral (case-insensitive; e.g. SNLI's "-") is skipped, counted
    under its reason (the offending label is named in the reason) and listed as file:line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no usable example in the file (the message gives the skip counts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NLI file")
    examples: list[NliExample] = []
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    lines = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
                reason = None if isinstance(obj, dict) else f"not a JSON object ({type(obj).__name__})"
            except json.JSONDecodeError as e:
                obj, reason = None, f"not JSON ({e.msg})"
            if reason is None:
                reason = _nli_problem(obj)
            if reason is not None:
                skipped[reason] += 1
                if len(problems) < MAX_LISTED_PROBLEMS:
                    problems.append(f"{where}: {reason}")
                continue
            label = NLI_LABELS.index(str(obj["gold_label"]).strip().lower())
            examples.append(NliExample(obj["sentence1"].strip(), obj["sentence2"].strip(), label, where))
    if skipped:
        log.warning("%s: skipped %d of %d lines (%s); first: %s", path, sum(skipped.values()), lines,
                    ", ".join(f"{k} ×{v}" for k, v in skipped.items()), problems[0])
    if not examples:
        raise ValueError(f"{path}: no usable NLI example in {lines} lines"
                         + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return NliFile(str(path), examples, lines, dict(skipped), problems)


def _nli_problem(obj: dict) -> str | None:
    for key in ("sentence1", "sentence2"):
        value = obj.get(key)
        if value is None:
            return f"missing {key}"
        if not isinstance(value, str) or not value.strip():
            return f"empty or non-text {key}"
    label = obj.get("gold_label")
    if label is None:
        return "missing gold_label"
    if str(label).strip().lower() not in NLI_LABELS:
        return f"gold_label {label!r} not one of {'/'.join(NLI_LABELS)}"
    return None


# ============================================================================ data: CheXpert


@dataclass
class ChexpertRow:
    path: str  # as written in the CSV (relative to --images)
    view: str  # the Frontal/Lateral cell ("" when the column is absent)
    group: str  # patient (or the path itself when no patient folder is in it)
    values: tuple[float, ...]  # per chosen label: 1.0, 0.0, -1.0 (uncertain) or nan (blank)
    where: str  # "file:line"


@dataclass
class ChexpertTable:
    """Rows of a CheXpert-format CSV kept for the chosen labels and views, and what was left out."""

    path: str
    labels: tuple[str, ...]
    rows: list[ChexpertRow]
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def values(self) -> np.ndarray:
        """[N, L] float: 1, 0, -1 (uncertain), nan (blank)."""
        return np.array([r.values for r in self.rows], dtype=np.float64).reshape(len(self.rows), len(self.labels))


def group_of(path: str, pattern: re.Pattern[str]) -> str:
    """The split group of an image path: the first capture of `pattern` (the patient folder), else the
    path itself (no grouping visible: each image is its own group)."""
    m = pattern.search(path.replace("\\", "/"))
    return m.group(1) if m else path


def read_chexpert_csv(
    path: str | os.PathLike,
    labels: Sequence[str] = PAPER_CHEXPERT_LABELS,
    frontal_only: bool = True,
    group_pattern: str = DEFAULT_GROUP_PATTERN,
) -> ChexpertTable:
    """Read a CheXpert-format CSV (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 label columns).

    Args:
        path: the CSV.
        labels: label columns to keep, in output order.
        frontal_only: keep rows whose Frontal/Lateral cell is "Frontal" (others skipped and counted).
        group_pattern: regex whose first group names a row's patient (the train/test split unit).
    Returns:
        ChexpertTable. A row without a Path or with a label cell other than 1/0/-1/blank is skipped,
        counted and named (file:line).
    Raises:
        FileNotFoundError, ValueError: missing file; a missing Path / label / Frontal/Lateral column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV")
    pattern = re.compile(group_pattern)
    if pattern.groups < 1:
        raise ValueError(f"group pattern {group_pattern!r}: expected a regex with one capture group")
    labels = tuple(labels)
    rows: list[ChexpertRow] = []
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    rows_read = 0

    def skip(reason: str, where: str) -> None:
        skipped[reason] += 1
        if len(problems) < MAX_LISTED_PROBLEMS:
            problems.append(f"{where}: {reason}")

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("Path", *labels) if c not in header]
        if frontal_only and VIEW_COLUMN not in header:
            missing.append(VIEW_COLUMN)
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (header: {header}); a CheXpert CSV has "
                             f"Path, {VIEW_COLUMN} and the label columns" +
                             (" (use --all-views for a CSV without view information)" if VIEW_COLUMN in missing else ""))
        for row in reader:
            rows_read += 1
            where = f"{path}:{reader.line_num}"
            image = (row.get("Path") or "").strip()
            if not image:
                skip("empty Path", where)
                continue
            view = (row.get(VIEW_COLUMN) or "").strip()
            if frontal_only and view.lower() != "frontal":
                skip("lateral view (frontal only)" if view.lower() == "lateral" else f"view {view!r} (frontal only)",
                     where)
                continue
            values, bad = [], None
            for name in labels:
                cell = (row.get(name) or "").strip()
                value = _label_value(cell)
                if value is None:
                    bad = f"{name} = {cell!r} (expected 1.0, 0.0, -1.0 or blank)"
                    break
                values.append(value)
            if bad:
                skip(f"bad label value: {bad}", where)
                continue
            rows.append(ChexpertRow(image, view, group_of(image, pattern), tuple(values), where))
    if skipped:
        log.info("%s: kept %d of %d rows; left out: %s", path, len(rows), rows_read,
                 ", ".join(f"{k} ×{v}" for k, v in skipped.items()))
    return ChexpertTable(str(path), labels, rows, rows_read, dict(skipped), problems)


def _label_value(cell: str) -> float | None:
    """1.0 / 0.0 / -1.0 for those numbers, nan for a blank cell, None for anything else."""
    if not cell:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if value in (1.0, 0.0, -1.0) else None


def chexpert_targets(
    values: np.ndarray,
    uncertain: str = "zeros",
    blank: str = "zero",
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training targets and loss mask from CheXpert label values (the blank and uncertainty policies).

    Args:
        values: [N, L] with 1, 0, -1 (uncertain) or nan (blank).
        uncertain: "zeros" (U-Zeros: -1 → 0), "ones" (U-Ones: -1 → 1), "ignore" (U-Ignore: masked) or
            "u-mix" (U-Ones for Edema and Atelectasis, U-Zeros for the other labels; needs `labels`).
        blank: "zero" (not mentioned = negative, CheXpert's convention: target 0) or "mask" (out of
            the loss).
        labels: the L column names (needed by "u-mix").
    Returns:
        (targets, mask), float32 [N, L]: mask is 1 where the cell enters the loss.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy: expected one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy: expected one of {BLANK_POLICIES}, got {blank!r}")
    values = np.asarray(values, dtype=np.float64)
    if uncertain == "u-mix":
        if labels is None or len(labels) != values.shape[-1]:
            raise ValueError(f"uncertain policy 'u-mix' needs the {values.shape[-1]} label names of the columns, "
                             f"got {labels!r}")
        unknown = [name for name in labels if name not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"uncertain policy 'u-mix': unknown label(s) {unknown}; expected CheXpert's")
    known = ~np.isnan(values)
    bad = known & ~np.isin(values, (1.0, 0.0, -1.0))
    if bad.any():
        raise ValueError(f"label values: expected 1, 0, -1 or nan, got {sorted(set(values[bad].tolist()))}")
    is_unc = values == -1.0
    targets = np.where(values == 1.0, 1.0, 0.0)  # 0 for 0, -1 and blank so far
    mask = known.astype(np.float64) if blank == "mask" else np.ones_like(values)
    if uncertain == "ones":
        targets[is_unc] = 1.0
    elif uncertain == "ignore":
        mask[is_unc] = 0.0
    elif uncertain == "u-mix":
        ones = np.array([name in U_MIX_ONES for name in labels], dtype=bool)
        targets[is_unc & ones[None, :]] = 1.0
    return targets.astype(np.float32), mask.astype(np.float32)


def split_by_group(groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Seeded train/test split of rows by group: returns a bool [N] array, True = test.

    The sorted distinct groups are permuted by numpy's default_rng(seed) and the first
    round(test_fraction × G) (at least 1, at most G − 1) go to test, so every row of a group lands
    on the same side and the split depends on the seed and the set of groups only.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction: expected a number in (0, 1), got {test_fraction}")
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError(f"need at least 2 patients/images to split into train and test, got {len(distinct)}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = min(max(1, round(test_fraction * len(distinct))), len(distinct) - 1)
    test_groups = {distinct[i] for i in order[:n_test]}
    return np.array([g in test_groups for g in groups], dtype=bool)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file as uint8 [size, size]: grayscale, shorter side resized, center crop — the
    preprocessing of `pertvl pack` and the ONNX Embedder (pertvl.data.shards).

    Raises:
        FileNotFoundError: no such file.  ValueError: the file cannot be decoded as an image.
    """
    from PIL import Image, UnidentifiedImageError

    from pertvl.data.shards import resize_center_crop, to_grayscale8

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(resize_center_crop(to_grayscale8(im), size), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode as an image ({e})") from None


# ============================================================================ metrics


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    """Single-label classification scores from one confusion matrix (rows = true, columns =
    predicted). An undefined precision/recall/F1 (no prediction / no example of a class) is 0.0, as
    scikit-learn's zero_division=0."""

    n: int
    accuracy: float
    per_class: dict[str, ClassScores]
    macro_f1: float
    labels: list[str]
    confusion: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           labels: Sequence[str] = NLI_LABELS) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1/support and macro F1 (checked against sklearn's
    classification_report in the tests)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"expected y_true and y_pred of one shape [N], got {y_true.shape} and {y_pred.shape}")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k):
        raise ValueError(f"class indices must be in [0, {k})")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(y_true.size)
    return ClassificationMetrics(
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        per_class={lab: ClassScores(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
                   for i, lab in enumerate(labels)},
        macro_f1=float(f1.mean()),
        labels=list(labels),
        confusion=cm.tolist(),
    )


@dataclass
class LabelScores:
    """Test scores of one CheXpert label over its definite (0/1) cells."""

    auroc: float | None  # None when only one class is present
    accuracy: float | None  # threshold 0.5 on the predicted probability
    n: int
    n_pos: int
    n_neg: int
    excluded_uncertain: int
    excluded_blank: int
    blank_negatives: int = 0  # blank cells scored as negatives (blank policy "zero")


def multilabel_scores(probs: np.ndarray, values: np.ndarray, labels: Sequence[str],
                      blank: str = "zero") -> dict[str, LabelScores]:
    """AUROC (pertvl.evaluate.zeroshot.auroc) and accuracy per label over the scored test cells.

    Args:
        probs: [N, L] predicted probabilities.
        values: [N, L] test label values (1, 0, -1 uncertain, nan blank): 1/0 are scored, blanks as
            negatives under blank "zero" (excluded under "mask"), uncertain cells never.
        blank: "zero" or "mask" (as in training; chexpert_targets).
    """
    from pertvl.evaluate.zeroshot import auroc

    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy: expected one of {BLANK_POLICIES}, got {blank!r}")
    out = {}
    for j, name in enumerate(labels):
        v, p = values[:, j], probs[:, j]
        is_blank = np.isnan(v)
        scored = (v == 1.0) | (v == 0.0) | (is_blank if blank == "zero" else False)
        y = (v[scored] == 1.0).astype(np.int64)
        out[name] = LabelScores(
            auroc=auroc(p[scored], y) if scored.any() else None,
            accuracy=float(((p[scored] >= 0.5) == (y == 1)).mean()) if scored.any() else None,
            n=int(scored.sum()), n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()),
            excluded_uncertain=int((v == -1.0).sum()),
            excluded_blank=int(is_blank.sum()) if blank == "mask" else 0,
            blank_negatives=int(is_blank.sum()) if blank == "zero" else 0,
        )
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ============================================================================ training


@dataclass
class FitSettings:
    """Optimisation settings shared by both tasks.

    lr: encoder learning rate (end-to-end fine-tuning); head_lr: the new head's; AdamW with
    weight_decay on weight matrices only (not biases / norms); linear warm-up over `warmup` of the
    steps, then linear decay to 0; gradients clipped at max_grad_norm. precision: fp32, or bf16 /
    fp16 autocast (fp16 with a gradient scaler). workers: DataLoader processes for image decoding.
    """

    epochs: int = 3
    lr: float = 2e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 0
    freeze_encoder: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size: expected >= 1, got {self.epochs} / {self.batch_size}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError(f"learning rates: expected > 0, got lr {self.lr}, head_lr {self.head_lr}")
        if not 0.0 <= self.warmup < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"warmup and dropout: expected fractions in [0, 1), got {self.warmup} / {self.dropout}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision: expected fp32, bf16 or fp16, got {self.precision!r}")


def pick_device(device: str):
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Precision:
    """Autocast + (fp16) gradient scaling for one device; a no-op in fp32."""

    def __init__(self, device, precision: str):
        import torch

        self.device, self.precision = device, precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _param_groups(encoder_params: Iterable, head_params: Iterable, settings: FitSettings) -> list[dict]:
    """AdamW groups: encoder at lr, head at head_lr; weight decay on matrices only (BERT practice)."""
    groups = []
    for params, lr in ((encoder_params, settings.lr), (head_params, settings.head_lr)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": settings.weight_decay},
                   {"params": rest, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    steps: int
    metrics: dict[str, float | None] = field(default_factory=dict)


def fit(
    module,
    groups: list[dict],
    loader,
    step_loss: Callable[[Any], Any],
    settings: FitSettings,
    device,
    on_epoch: Callable[[int], dict[str, float | None]] | None = None,
    select: Callable[[dict[str, float | None]], float] | None = None,
) -> tuple[list[EpochLog], int]:
    """The training loop shared by both tasks.

    Args:
        module: the nn.Module whose trainable parameters are in `groups` (set to train mode per epoch).
        groups: AdamW parameter groups (_param_groups).
        loader: a DataLoader (its length gives the schedule's step count).
        step_loss: batch → scalar loss tensor, or None for a batch with nothing to learn from.
        on_epoch: called after each epoch (module in eval mode), returns metrics to log.
        select: metrics → score; the state with the best score (first on ties) is restored at the end.
    Returns:
        (history, best epoch): the best epoch is the last one without `select`.
    """
    import torch

    prec = _Precision(device, settings.precision)
    optimizer = torch.optim.AdamW(groups)
    total = settings.epochs * max(1, len(loader))
    warm = int(round(settings.warmup * total))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 (BERT's schedule)
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    params = [p for g in groups for p in g["params"]]
    history: list[EpochLog] = []
    best_epoch, best_score, best_state = settings.epochs, -math.inf, None
    for epoch in range(1, settings.epochs + 1):
        module.train()
        losses = []
        for batch in loader:
            with prec.autocast():
                loss = step_loss(batch)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            prec.scaler.scale(loss).backward()
            prec.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            prec.scaler.step(optimizer)
            prec.scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
        module.eval()
        metrics = on_epoch(epoch) if on_epoch else {}
        history.append(EpochLog(epoch, float(np.mean(losses)) if losses else math.nan, len(losses), metrics))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
        print(f"  epoch {epoch}/{settings.epochs}: train loss {history[-1].train_loss:.4f}"
              + (f", {shown}" if shown else ""), flush=True)
        if select is not None:
            score = select(metrics)
            if score > best_score:
                best_epoch, best_score = epoch, score
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    if best_state is not None and best_epoch != settings.epochs:
        module.load_state_dict(best_state)
    module.eval()
    return history, best_epoch


def _seed_everything(seed: int):
    """Seed torch (CPU and CUDA) and return a seeded generator for DataLoader shuffling."""
    import torch

    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _head(in_dim: int, num_labels: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))


def standardize(features: dict[str, Any], fit_on: str, eps: float = 1e-6) -> dict[str, Any]:
    """Z-score every split's [N, D] features with the mean/std of split `fit_on` (the training set).

    Frozen features come at very different scales (L2-normalized ONNX embeddings are ~1/sqrt(D) per
    dimension, pooled ResNet features are not normalized); standardizing lets one head learning rate
    serve every encoder, as in the usual linear-probe protocol.
    """
    ref = features[fit_on]
    mean = ref.mean(0, keepdim=True)
    std = ref.std(0, keepdim=True) if len(ref) > 1 else ref.new_ones(1, ref.shape[1])
    return {k: (x - mean) / (std + eps) for k, x in features.items()}


def _feature_loader(features, *tensors, batch_size: int, shuffle: bool, generator=None):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.as_tensor(features), *[torch.as_tensor(t) for t in tensors]),
                      batch_size=batch_size, shuffle=shuffle, generator=generator)


# ============================================================================ encoders


def resolve_run(run: str | os.PathLike) -> Path:
    """RUN_DIR/final when present, else RUN_DIR itself if it is a save_pretrained folder."""
    run = Path(run)
    for path in (run / "final", run):
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise FileNotFoundError(f"{run}: no trained model (expected {run / 'final'} with config.json and "
                            "model.safetensors, written by save_pretrained at the end of `pertvl train`)")


def _load_dual(run: str | os.PathLike):
    from pertvl.model import DualEncoder

    path = resolve_run(run)
    return DualEncoder.from_pretrained(path), path


def run_image_size(run: str | os.PathLike) -> int | None:
    """The image size a run trained at: data.image_size of RUN_DIR/config.yaml, else its shards'."""
    import yaml

    cfg_path = Path(run) / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    data = cfg.get("data") or {} if isinstance(cfg, dict) else {}
    if data.get("image_size"):
        return int(data["image_size"])
    manifest = Path(str(data.get("shards") or "")) / "manifest.json"
    if data.get("shards") and manifest.is_file():
        size = json.loads(manifest.read_text(encoding="utf-8")).get("image_size")
        return int(size) if size else None
    return None


# ============================================================================ NLI


@dataclass
class NliResult:
    dev: ClassificationMetrics | None  # None without a dev file (train/test protocol)
    test: ClassificationMetrics
    history: list[EpochLog]
    best_epoch: int
    data: dict[str, Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    predictions: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # split → (file:line, gold, pred)
    schema: str = NLI_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "history": [asdict(h) for h in self.history], "best_epoch": self.best_epoch,
                "dev": None if self.dev is None else self.dev.to_json(), "test": self.test.to_json()}


def finetune_nli(
    train: NliFile,
    dev: NliFile | None,
    test: NliFile,
    *,
    run: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    settings: FitSettings | None = None,
    max_length: int = NLI_MAX_LENGTH,
    info: dict[str, Any] | None = None,
) -> NliResult:
    """Fine-tune (or probe) a text encoder on NLI and score dev and test (see the module docstring).

    Args:
        train, dev, test: read_nli outputs. dev None: the train/test protocol (RadNLI: train on
            radnli_dev_v1.jsonl, test on radnli_test_v1.jsonl): the last epoch is evaluated.
        run / text_model / export: exactly one encoder source.
        settings: FitSettings (an export is always frozen).
        max_length: word pieces per sentence pair (capped at the encoder's position embeddings);
            longer pairs are truncated and counted per file (data[split]["truncated"]).
        info: facts recorded in the result (command, versions).
    Returns:
        NliResult with the selected epoch's dev (None without dev) and test metrics.
    """
    import torch

    if sum(x is not None for x in (run, text_model, export)) != 1:
        raise ValueError("give exactly one of run / text_model / export")
    if max_length < 8:
        raise ValueError(f"max_length: expected at least 8 word pieces per pair, got {max_length}")
    settings = settings or FitSettings()
    if export is not None and not settings.freeze_encoder:
        settings = dataclasses.replace(settings, freeze_encoder=True)
    device = pick_device(settings.device)
    generator = _seed_everything(settings.seed)
    info = dict(info or {})
    splits = [("train", train), ("test", test)] if dev is None else [("train", train), ("dev", dev), ("test", test)]
    y = {name: torch.tensor([e.label for e in f.examples]) for name, f in splits}
    truncated: dict[str, dict[str, Any]] = {}

    if export is not None:
        from pertvl.infer import Embedder

        embedder = Embedder.from_export(export, batch_size=max(settings.batch_size, 32))
        info.update(encoder="onnx-probe", export=str(export), features="[u, v, |u-v|, u*v] of the global embeddings",
                    text="each sentence as the export's manifest says (its cleaning and max_length)")
        feats = {name: _pair_embeddings(embedder, f.examples) for name, f in splits}
        backbone = None
    else:
        if run is not None:
            dual, path = _load_dual(run)
            backbone, tokenizer = dual.text.backbone, dual.tokenizer
            del dual  # the image tower and the projection heads are not used
            info.update(encoder="torch-run", run=str(run), model=str(path))
        else:
            from pertvl.model.text import load_text_backbone

            backbone, tokenizer = load_text_backbone(text_model)
            info.update(encoder="hf-text", text_model=str(text_model))
        backbone = backbone.to(device)
        backbone.requires_grad_(not settings.freeze_encoder)
        positions = getattr(backbone.config, "max_position_embeddings", None)
        if positions and max_length > int(positions):
            print(f"note: max_length {max_length} > the encoder's {positions} positions: pairs are cut at "
                  f"{positions} word pieces", flush=True)
            max_length = int(positions)
        collate = _NliCollate(tokenizer, max_length)
        for name, f in splits:
            truncated[name] = nli_truncation(tokenizer, f.examples, max_length)
            t = truncated[name]
            if t["pairs"]:
                print(f"warning: {f.path}: {t['pairs']} of {len(f.examples)} sentence pairs exceed {max_length} "
                      f"word pieces (longest {t['longest']}) and are truncated; first: {t['first']}", flush=True)
                log.warning("%s: %d pairs truncated at %d word pieces", f.path, t["pairs"], max_length)

        def encode(batch):
            return backbone(**{k: v.to(device) for k, v in batch.items() if k != "labels"},
                            return_dict=True).last_hidden_state[:, 0]

        feats = None
        if settings.freeze_encoder:
            backbone.eval()
            feats = {}
            for name, f in splits:
                feats[name] = _encode_all(encode, _loader(f.examples, collate, settings.batch_size), device, settings)
    info["mode"] = "frozen encoder (linear probe)" if settings.freeze_encoder else "fine-tuned end to end"

    in_dim = int(feats["train"].shape[1]) if feats is not None else int(backbone.config.hidden_size)
    head = _head(in_dim, len(NLI_LABELS), settings.dropout).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    if feats is not None:  # frozen: the head trains on precomputed, standardized features
        feats = standardize(feats, "train")
        module = head
        loader = _feature_loader(feats["train"], y["train"], batch_size=settings.batch_size, shuffle=True,
                                 generator=generator)

        def step(batch):
            x, t = (b.to(device) for b in batch)
            return loss_fn(head(x).float(), t)

        def predict(name: str) -> np.ndarray:
            with torch.inference_mode():
                return head(feats[name].to(device)).float().argmax(1).cpu().numpy()

        groups = _param_groups([], head.parameters(), settings)
    else:
        module = torch.nn.ModuleDict({"backbone": backbone, "head": head})
        loader = _loader(train.examples, collate, settings.batch_size, shuffle=True, generator=generator)

        def step(batch):
            return loss_fn(head(encode(batch)).float(), batch["labels"].to(device))

        def predict(name: str) -> np.ndarray:
            f = {"dev": dev, "test": test}[name]
            assert f is not None
            out = []
            with torch.inference_mode():
                for batch in _loader(f.examples, collate, settings.batch_size):
                    with _Precision(device, settings.precision).autocast():
                        out.append(head(encode(batch)).float().argmax(1).cpu().numpy())
            return np.concatenate(out)

        groups = _param_groups(backbone.parameters(), head.parameters(), settings)

    def on_epoch(epoch: int) -> dict[str, float | None]:
        return {"dev_accuracy": float((predict("dev") == y["dev"].numpy()).mean())}

    if dev is not None:
        history, best = fit(module, groups, loader, step, settings, device, on_epoch,
                            select=lambda m: m["dev_accuracy"])
    else:
        history, best = fit(module, groups, loader, step, settings, device)
    scored = [(name, f) for name, f in splits if name != "train"]
    preds = {name: predict(name) for name, _ in scored}
    result = {name: classification_metrics(y[name].numpy(), preds[name]) for name, _ in scored}
    predictions = {name: [(e.where, e.label, int(p)) for e, p in zip(f.examples, preds[name], strict=True)]
                   for name, f in scored}
    settings_json = {**asdict(settings), "device": str(device), "max_length": max_length,
                     "protocol": "train/dev/test" if dev is not None else "train/test",
                     "selection": "best dev accuracy (first on ties)" if dev is not None else "last epoch (no dev set)"}
    data: dict[str, Any] = {name: f.summary() for name, f in splits}
    for name, t in truncated.items():
        data[name]["truncated"] = t
    data.update(labels=list(NLI_LABELS),
                text="raw sentences to the model's tokenizer as a pair (no report cleaning)"
                if export is None else "the export's own text pipeline")
    return NliResult(result.get("dev"), result["test"], history, best, data, settings_json, info, predictions)


def nli_truncation(tokenizer, examples: Sequence[NliExample], max_length: int) -> dict[str, Any]:
    """How many sentence pairs exceed `max_length` word pieces ([CLS] a [SEP] b [SEP]) untruncated:
    {"pairs", "longest", "max_length", "first" (file:line of the first)}."""
    if not examples:
        return {"pairs": 0, "longest": 0, "max_length": max_length, "first": None}
    enc = tokenizer([e.premise for e in examples], [e.hypothesis for e in examples], truncation=False,
                    add_special_tokens=True)
    lengths = [len(ids) for ids in enc["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    return {"pairs": len(over), "longest": max(lengths), "max_length": max_length,
            "first": examples[over[0]].where if over else None}


@dataclass
class NliCvResult:
    """k-fold cross-validation on one NLI file (cross_validate_nli)."""

    folds: list[NliResult]  # per fold: the held-out fold is its test
    pooled: ClassificationMetrics  # over every example's out-of-fold prediction
    data: dict[str, Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    schema: str = NLI_CV_SCHEMA

    @property
    def fold_accuracies(self) -> list[float]:
        return [f.test.accuracy for f in self.folds]

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.fold_accuracies))

    @property
    def std_accuracy(self) -> float:
        """Sample standard deviation over folds (ddof = 1)."""
        return float(np.std(self.fold_accuracies, ddof=1)) if len(self.folds) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "folds": [{"fold": k, "history": [asdict(h) for h in f.history], "train": f.data["train"],
                           "test": {**f.data["test"], "metrics": f.test.to_json()}}
                          for k, f in enumerate(self.folds, 1)],
                "accuracy": {"per_fold": self.fold_accuracies, "mean": self.mean_accuracy, "std": self.std_accuracy},
                "pooled": self.pooled.to_json()}


def cross_validate_nli(
    data: NliFile,
    folds: int = 5,
    *,
    seed: int = 0,
    run: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    settings: FitSettings | None = None,
    max_length: int = NLI_MAX_LENGTH,
    info: dict[str, Any] | None = None,
    on_fold: Callable[[int, NliFile, NliFile], None] | None = None,
) -> NliCvResult:
    """k-fold cross-validation on one NLI file (e.g. RadNLI, which has no training file): `nli_folds`
    (label-stratified, seeded by `seed`); fold k trains a fresh copy of the encoder on the other
    folds (finetune_nli's train/test protocol: last epoch) and is tested on itself.

    on_fold(k, train, test) is called before fold k trains (the CLI prints the label counts).
    """
    settings = settings or FitSettings()
    parts = nli_folds(data.examples, folds, seed)
    results: list[NliResult] = []
    gold, pred = [], []
    for k, test_idx in enumerate(parts, 1):
        held = set(test_idx)
        train_idx = [i for i in range(len(data.examples)) if i not in held]
        train_k = data.subset(train_idx, f"{data.path} (fold {k} of {folds}: train)")
        test_k = data.subset(test_idx, f"{data.path} (fold {k} of {folds}: test)")
        if on_fold is not None:
            on_fold(k, train_k, test_k)
        r = finetune_nli(train_k, None, test_k, run=run, text_model=text_model, export=export, settings=settings,
                         max_length=max_length, info=info)
        results.append(r)
        gold += [g for _, g, _ in r.predictions["test"]]
        pred += [p for _, _, p in r.predictions["test"]]
    first = results[0]
    settings_json = {**first.settings, "protocol": f"{folds}-fold cross-validation", "folds": folds, "fold_seed": seed,
                     "selection": "last epoch of each fold"}
    summary = {"file": data.summary(), "folds": [len(p) for p in parts], "labels": list(NLI_LABELS),
               "text": first.data["text"]}
    return NliCvResult(results, classification_metrics(gold, pred), summary, settings_json, dict(first.info))


class _NliCollate:
    """Examples → HF sentence-pair encoding ("[CLS] premise [SEP] hypothesis [SEP]", truncated to
    max_length word pieces, longest-first) + labels."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[NliExample]) -> dict[str, Any]:
        import torch

        # The sentences as written: the tokenizer normalizes them as its model expects (an uncased
        # BERT lowercases and strips accents itself); report cleaning would drop "n't" cues.
        enc = self.tokenizer([e.premise for e in examples], [e.hypothesis for e in examples],
                             padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch


def _loader(items: Sequence, collate, batch_size: int, shuffle: bool = False, generator=None, workers: int = 0):
    from torch.utils.data import DataLoader

    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate,
                      num_workers=workers)


def _encode_all(encode, loader, device, settings: FitSettings):
    """Features of every batch of a loader with a frozen encoder, as one float32 CPU tensor."""
    import torch

    out = []
    with torch.inference_mode(), _Precision(device, settings.precision).autocast():
        for batch in loader:
            out.append(encode(batch).float().cpu())
    return torch.cat(out)


def _pair_embeddings(embedder, examples: Sequence[NliExample]):
    """[u, v, |u-v|, u*v] from the export's L2-normalized text embeddings (each distinct text once)."""
    import torch

    from pertvl.evaluate.encoder import embed_texts_unique

    texts = [e.premise for e in examples] + [e.hypothesis for e in examples]
    index, emb = embed_texts_unique(embedder, texts, batch_size=embedder.batch_size)
    u = emb[[index[e.premise] for e in examples]]
    v = emb[[index[e.hypothesis] for e in examples]]
    return torch.from_numpy(np.concatenate([u, v, np.abs(u - v), u * v], axis=1).astype(np.float32))


# ============================================================================ CheXpert


@dataclass
class ChexpertResult:
    per_label: dict[str, LabelScores]
    history: list[EpochLog]
    data: dict[str, Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    # test rows scored: (image path as in the CSV, label values, predicted probabilities)
    predictions: list[tuple[str, tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)
    schema: str = CHEXPERT_SCHEMA

    @property
    def mean_auroc(self) -> float | None:
        return _mean(s.auroc for s in self.per_label.values())

    @property
    def mean_accuracy(self) -> float | None:
        return _mean(s.accuracy for s in self.per_label.values())

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "history": [asdict(h) for h in self.history],
                "test": {"per_label": {k: asdict(v) for k, v in self.per_label.items()},
                         "mean_auroc": self.mean_auroc, "mean_accuracy": self.mean_accuracy}}


@dataclass
class ChexpertData:
    """The rows a CheXpert fine-tune trains and tests on, after the split and the image check."""

    labels: tuple[str, ...]
    train: list[ChexpertRow]
    test: list[ChexpertRow]
    train_targets: np.ndarray  # [N, L] float32 (policy applied)
    train_mask: np.ndarray  # [N, L] float32 (1 = in the loss)
    test_values: np.ndarray  # [M, L] 1 / 0 / -1 / nan: only 1/0 are scored
    summary: dict[str, Any]


def prepare_chexpert(
    csv_path: str | os.PathLike,
    images: str | os.PathLike,
    *,
    valid_csv: str | os.PathLike | None = None,
    labels: Sequence[str] = PAPER_CHEXPERT_LABELS,
    uncertain: str = "zeros",
    frontal_only: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    group_pattern: str = DEFAULT_GROUP_PATTERN,
    blank: str = "zero",
) -> ChexpertData:
    """Read the CSV(s), split (without valid_csv: by patient, seeded), drop rows whose image file is
    missing (counted and named), and apply the blank and uncertainty policies to the training
    labels (chexpert_targets; blank "zero" also scores test blanks as negatives)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy: expected one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy: expected one of {BLANK_POLICIES}, got {blank!r}")
    unknown = [name for name in labels if name not in CHEXPERT_LABELS]
    if unknown or not labels:
        raise ValueError(f"labels: unknown {unknown}; choose from {', '.join(CHEXPERT_LABELS)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels: duplicates in {list(labels)}")
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image root folder not found")
    table = read_chexpert_csv(csv_path, labels, frontal_only, group_pattern)
    if valid_csv is not None:
        test_table = read_chexpert_csv(valid_csv, labels, frontal_only, group_pattern)
        train_rows, test_rows = table.rows, test_table.rows
        split = {"method": "given", "valid_csv": str(valid_csv)}
        tables = [table, test_table]
    else:
        is_test = split_by_group([r.group for r in table.rows], test_fraction, seed)
        train_rows = [r for r, t in zip(table.rows, is_test, strict=True) if not t]
        test_rows = [r for r, t in zip(table.rows, is_test, strict=True) if t]
        n_groups = len({r.group for r in table.rows})
        split = {"method": "seeded split by patient (Path prefix; else per image)", "test_fraction": test_fraction,
                 "seed": seed, "groups": n_groups, "test_groups": len({r.group for r in test_rows}),
                 "group_pattern": group_pattern}
        tables = [table]
    missing: list[str] = []
    kept = {}
    for name, rows in (("train", train_rows), ("test", test_rows)):
        ok = [r for r in rows if (root / r.path).is_file()]
        missing += [f"{r.where}: image {root / r.path} not found" for r in rows if not (root / r.path).is_file()]
        kept[name] = ok
        if not ok:
            raise ValueError(f"no {name} rows with an image file left (CSV {csv_path}, images {root})")
    if missing:
        log.warning("%d image file(s) not found, rows skipped; first: %s", len(missing), missing[0])
    targets, mask = chexpert_targets(_values(kept["train"], labels), uncertain, blank, labels)
    summary = {
        "csv": [t.path for t in tables], "images": str(root), "labels": list(labels),
        "frontal_only": frontal_only, "uncertain_policy": uncertain, "blank_policy": blank, "split": split,
        "rows_read": sum(t.rows_read for t in tables),
        "rows_skipped": dict(sum((Counter(t.skipped) for t in tables), Counter())),
        "row_problems": [p for t in tables for p in t.problems][:MAX_LISTED_PROBLEMS],
        "images_missing": len(missing), "image_problems": missing[:MAX_LISTED_PROBLEMS],
        "train_rows": len(kept["train"]), "test_rows": len(kept["test"]),
        "train_label_counts": _label_counts(_values(kept["train"], labels), labels),
        "test_label_counts": _label_counts(_values(kept["test"], labels), labels),
    }
    return ChexpertData(tuple(labels), kept["train"], kept["test"], targets, mask,
                        _values(kept["test"], labels), summary)


def _values(rows: Sequence[ChexpertRow], labels: Sequence[str]) -> np.ndarray:
    return np.array([r.values for r in rows], dtype=np.float64).reshape(len(rows), len(labels))


def _label_counts(values: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, int]]:
    return {name: {"positive": int((values[:, j] == 1).sum()), "negative": int((values[:, j] == 0).sum()),
                   "uncertain": int((values[:, j] == -1).sum()), "blank": int(np.isnan(values[:, j]).sum())}
            for j, name in enumerate(labels)}


class _ImageRows:
    """A map-style dataset of image files: item i → (i, uint8 [S, S] array or None, problem)."""

    def __init__(self, root: Path, rows: Sequence[ChexpertRow], size: int):
        self.root, self.rows, self.size = root, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            return i, load_image(self.root / row.path, self.size), ""
        except (FileNotFoundError, ValueError) as e:
            return i, None, f"{row.where}: {e}"


def _collate_images(items):
    """→ (indices [B'] of decoded images, images [B', 1, S, S] float in [0, 1] or None, problems)."""
    import torch

    good = [(i, a) for i, a, _ in items if a is not None]
    problems = [p for _, a, p in items if a is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    imgs = torch.from_numpy(np.stack([a for _, a in good])).unsqueeze(1).float() / 255.0 if good else None
    return idx, imgs, problems


class ImageProblems:
    """Undecodable images met while reading batches, each recorded once."""

    def __init__(self) -> None:
        self.items: dict[str, None] = {}

    def add(self, problems: Iterable[str]) -> None:
        for p in problems:
            if p not in self.items:
                log.warning("skipped: %s", p)
                self.items[p] = None


def finetune_chexpert(
    data: ChexpertData,
    images: str | os.PathLike,
    *,
    run: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    image_size: int | None = None,
    settings: FitSettings | None = None,
    info: dict[str, Any] | None = None,
) -> ChexpertResult:
    """Fine-tune (or probe) the image encoder on CheXpert labels and score the test rows.

    Args:
        data: prepare_chexpert output.
        images: the image root the CSV paths are relative to.
        run / export: exactly one encoder source.
        image_size: side of the square input (default: the export's, else the run's, else 224).
        settings: FitSettings (an export is always frozen).
        info: facts recorded in the result.
    Returns:
        ChexpertResult (AUROC and accuracy per label over definite test labels; their means).
    """
    import torch

    if (run is None) == (export is None):
        raise ValueError("give exactly one of run / export")
    settings = settings or FitSettings(epochs=5, lr=1e-4)
    root = Path(images)
    info = dict(info or {})
    if export is not None:
        settings = dataclasses.replace(settings, freeze_encoder=True)
    device = pick_device(settings.device)
    generator = _seed_everything(settings.seed)
    problems = ImageProblems()
    n_labels = len(data.labels)

    def image_loader(rows, shuffle=False, gen=None):
        from torch.utils.data import DataLoader

        # Training batches drop the ragged last batch: BatchNorm in train mode fails on a batch of one.
        return DataLoader(_ImageRows(root, rows, size), batch_size=settings.batch_size, shuffle=shuffle,
                          generator=gen, collate_fn=_collate_images, num_workers=settings.workers,
                          drop_last=shuffle and len(rows) > settings.batch_size)

    if export is not None:
        from pertvl.infer import Embedder

        embedder = Embedder.from_export(export, batch_size=settings.batch_size)
        if image_size is not None and image_size != embedder.image_size:
            raise ValueError(f"--image-size {image_size}: the export {export} takes {embedder.image_size} px images")
        size = embedder.image_size
        info.update(encoder="onnx-probe", export=str(export), features="the export's global image embedding")

        def encode(imgs):
            return torch.from_numpy(embedder.embed_images(imgs.numpy()))

        backbone = None
    else:
        dual, path = _load_dual(run)
        size = image_size or run_image_size(run) or 224
        backbone = dual.image.to(device)  # ImageEncoder: normalization + ResNet (+ unused projections)
        del dual
        backbone.backbone.requires_grad_(not settings.freeze_encoder)
        for head_module in (backbone.global_proj, backbone.local_proj):  # pretraining heads: not used here
            head_module.requires_grad_(False)
        info.update(encoder="torch-run", run=str(run), model=str(path),
                    features="pooled ResNet features (input of the global projection)")

        def encode(imgs):
            out = backbone.backbone(backbone.normalize(imgs.to(device)), return_dict=True)
            return out.pooler_output.flatten(1)

    info["mode"] = "frozen encoder (linear probe)" if settings.freeze_encoder else "fine-tuned end to end"
    targets = torch.from_numpy(data.train_targets)
    mask = torch.from_numpy(data.train_mask)

    def masked_bce(logits, idx):
        t, m = targets[idx].to(logits.device), mask[idx].to(logits.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
        return (loss * m).sum() / m.sum().clamp(min=1.0)

    if settings.freeze_encoder:
        if backbone is not None:
            backbone.eval()
        feats = {}
        for name, rows in (("train", data.train), ("test", data.test)):
            feats[name] = _features(image_loader(rows), encode, problems, device, settings)
        scaled = standardize({k: x for k, (_, x) in feats.items()}, "train")
        feats = {k: (idx, scaled[k]) for k, (idx, _) in feats.items()}
        head = _head(int(feats["train"][1].shape[1]), n_labels, settings.dropout).to(device)
        module = head
        tr_idx, tr_x = feats["train"]
        loader = _feature_loader(tr_x, tr_idx, batch_size=settings.batch_size, shuffle=True, generator=generator)

        def step(batch):
            x, idx = batch
            if not idx.numel() or not mask[idx].any():
                return None
            return masked_bce(head(x.to(device)), idx)

        def predict() -> tuple[np.ndarray, np.ndarray]:
            te_idx, te_x = feats["test"]
            with torch.inference_mode():
                return te_idx.numpy(), torch.sigmoid(head(te_x.to(device)).float()).cpu().numpy()

        groups = _param_groups([], head.parameters(), settings)
    else:
        in_dim = int(backbone.backbone.config.hidden_sizes[-1])
        head = _head(in_dim, n_labels, settings.dropout).to(device)
        module = torch.nn.ModuleDict({"backbone": backbone.backbone, "head": head})
        loader = image_loader(data.train, shuffle=True, gen=generator)

        def step(batch):
            idx, imgs, bad = batch
            problems.add(bad)
            if imgs is None or not mask[idx].any():
                return None
            return masked_bce(head(encode(imgs)), idx)

        def predict() -> tuple[np.ndarray, np.ndarray]:
            idx_all, probs = [], []
            with torch.inference_mode(), _Precision(device, settings.precision).autocast():
                for idx, imgs, bad in image_loader(data.test):
                    problems.add(bad)
                    if imgs is not None:
                        idx_all.append(idx.numpy())
                        probs.append(torch.sigmoid(head(encode(imgs)).float()).cpu().numpy())
            if not probs:
                raise ValueError("no test image could be decoded")
            return np.concatenate(idx_all), np.concatenate(probs)

        groups = _param_groups(backbone.backbone.parameters(), head.parameters(), settings)

    history, _ = fit(module, groups, loader, step, settings, device)
    test_idx, probs = predict()
    per_label = multilabel_scores(probs, data.test_values[test_idx], data.labels,
                                  data.summary.get("blank_policy", "zero"))
    summary = dict(data.summary)
    summary["images_undecodable"] = len(problems.items)
    summary["image_problems"] = (summary["image_problems"] + list(problems.items))[:MAX_LISTED_PROBLEMS]
    summary["test_images_scored"] = int(len(test_idx))
    settings_json = {**asdict(settings), "device": str(device), "image_size": size,
                     "selection": "last epoch", "threshold": 0.5,
                     "scored": ("1/0 test labels and blanks as negatives; uncertain excluded"
                                if data.summary.get("blank_policy", "zero") == "zero"
                                else "definite test labels only (1/0); uncertain and blank excluded")}
    predictions = [(data.test[i].path, data.test[i].values, tuple(float(x) for x in p))
                   for i, p in zip(test_idx.tolist(), probs, strict=True)]
    return ChexpertResult(per_label, history, summary, settings_json, info, predictions)


def _features(loader, encode, problems: ImageProblems, device, settings: FitSettings):
    """(row indices [N'], features [N', D]) of every decodable image, the encoder frozen."""
    import torch

    idx_all, feats = [], []
    with torch.inference_mode(), _Precision(device, settings.precision).autocast():
        for idx, imgs, bad in loader:
            problems.add(bad)
            if imgs is not None:
                idx_all.append(idx)
                feats.append(encode(imgs).float().cpu())
    if not feats:
        raise ValueError("no image could be decoded")
    return torch.cat(idx_all), torch.cat(feats)


# ============================================================================ outputs


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join([":---"] + ["---:"] * (len(header) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _num(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in skipped.items()) or "none"


def _nli_class_tables(split: str, m: ClassificationMetrics) -> list[str]:
    rows = [[lab, _num(c.precision), _num(c.recall), _num(c.f1), str(c.support)] for lab, c in m.per_class.items()]
    return [f"## {split}: per class", "", _md_table(["class", "precision", "recall", "F1", "support"], rows), "",
            f"Confusion matrix ({split}; rows = true, columns = predicted):", "",
            _md_table(["true \\ predicted", *m.labels],
                      [[lab, *map(str, row)] for lab, row in zip(m.labels, m.confusion, strict=True)]), ""]


def _truncation_note(d: dict[str, Any]) -> str:
    t = d.get("truncated")
    if not t:
        return ""
    return f"; {t['pairs']} pairs truncated at {t['max_length']} word pieces (longest {t['longest']})"


def nli_markdown(result: NliResult, title: str) -> str:
    scored = [(s, m) for s, m in (("dev", result.dev), ("test", result.test)) if m is not None]
    selection = (f"best dev epoch {result.best_epoch} of {len(result.history)}" if result.dev is not None
                 else f"protocol train/test: last epoch of {len(result.history)} (no dev set)")
    parts = [f"# {title}", "",
             f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); {selection}.", "",
             _md_table(["split", "n", "accuracy", "macro F1"],
                       [[s, str(m.n), _num(m.accuracy, True), _num(m.macro_f1)] for s, m in scored]), ""]
    for split, m in scored:
        parts += _nli_class_tables(split, m)
    parts.append("## Data")
    parts.append("")
    for split in ("train", "dev", "test"):
        if split not in result.data:
            continue
        d = result.data[split]
        labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
        parts.append(f"- {split}: {d['examples']} examples ({labels}) from {d['file']} ({d['lines']} lines; "
                     f"skipped: {_skips(d['skipped'])}{_truncation_note(d)})")
    return "\n".join(parts) + "\n"


def nli_cv_markdown(result: NliCvResult, title: str) -> str:
    d = result.data["file"]
    labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
    rows = []
    for k, f in enumerate(result.folds, 1):
        tr, te = f.data["train"], f.data["test"]
        rows.append([str(k), str(tr["examples"]), str(te["examples"]),
                     " / ".join(str(te["labels"][lab]) for lab in NLI_LABELS),
                     _num(f.test.accuracy, True), _num(f.test.macro_f1)])
    parts = [f"# {title}", "",
             f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); "
             f"{result.settings['protocol']} on {d['file']} ({d['examples']} examples: {labels}); "
             f"label-stratified folds (seed {result.settings['fold_seed']}); last epoch of each fold.", "",
             f"Accuracy: mean {_num(result.mean_accuracy, True)} ± {100 * result.std_accuracy:.1f} (std over "
             f"folds); pooled out-of-fold accuracy {_num(result.pooled.accuracy, True)}, macro F1 "
             f"{_num(result.pooled.macro_f1)}.", "",
             _md_table(["fold", "train", "test", "test entailment / contradiction / neutral", "accuracy", "macro F1"],
                       rows), ""]
    parts += _nli_class_tables("pooled out-of-fold", result.pooled)
    return "\n".join(parts) + "\n"


def chexpert_markdown(result: ChexpertResult, title: str) -> str:
    rows = [[name, _num(s.auroc), _num(s.accuracy, True), str(s.n), str(s.n_pos), str(s.n_neg),
             str(s.blank_negatives), f"{s.excluded_uncertain} / {s.excluded_blank}"]
            for name, s in result.per_label.items()]
    rows.append(["**mean**", _num(result.mean_auroc), _num(result.mean_accuracy, True), "", "", "", "", ""])
    d = result.data
    return "\n".join([
        f"# {title}", "",
        f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); {result.settings['epochs']} epochs, "
        f"{result.settings['image_size']} px; uncertain policy {UNCERTAIN_NAMES[d['uncertain_policy']]}; "
        f"blank cells: {'negative (0)' if d.get('blank_policy', 'zero') == 'zero' else 'masked'}; "
        f"{'frontal views only' if d['frontal_only'] else 'all views'}.", "",
        _md_table(["label", "AUROC", "accuracy", "n", "positives", "negatives", "of which blank",
                   "excluded (uncertain / blank)"], rows),
        "",
        f"Split: {d['split']['method']}. Train rows {d['train_rows']}, test rows {d['test_rows']} "
        f"({d['test_images_scored']} test images scored). Rows left out: {_skips(d['rows_skipped'])}. Images "
        f"missing: {d['images_missing']}, undecodable: {d['images_undecodable']}.",
        "",
        "Accuracy at probability 0.5; 1/0 test labels are scored"
        + (", blank cells as negatives." if d.get("blank_policy", "zero") == "zero" else "; blank cells are not."),
    ]) + "\n"


def write_outputs(result: NliResult | NliCvResult | ChexpertResult, out_dir: str | os.PathLike,
                  name: str) -> dict[str, Path]:
    """Write NAME.json, NAME.md and the per-item predictions (NLI: NAME.predictions.jsonl with split,
    where, gold, predicted; CheXpert: NAME.predictions.csv with Path and per label the test value and
    the predicted probability), so any other metric can be computed from them.

    Returns:
        {"json": path, "markdown": path, "predictions": path}.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_json(paths["json"], result.to_json())
    if isinstance(result, NliCvResult):
        md = nli_cv_markdown(result, f"NLI cross-validation: {name}")
        paths["predictions"] = out / f"{name}.predictions.jsonl"
        lines = [json.dumps({"split": f"fold{k}", "where": where, "gold": NLI_LABELS[gold],
                             "predicted": NLI_LABELS[pred]})
                 for k, fold in enumerate(result.folds, 1) for where, gold, pred in fold.predictions["test"]]
        atomic_write_text(paths["predictions"], "".join(line + "\n" for line in lines))
    elif isinstance(result, NliResult):
        md = nli_markdown(result, f"NLI fine-tuning: {name}")
        paths["predictions"] = out / f"{name}.predictions.jsonl"
        lines = [json.dumps({"split": split, "where": where, "gold": NLI_LABELS[gold], "predicted": NLI_LABELS[pred]})
                 for split, items in result.predictions.items() for where, gold, pred in items]
        atomic_write_text(paths["predictions"], "".join(line + "\n" for line in lines))
    else:
        md = chexpert_markdown(result, f"CheXpert fine-tuning: {name}")
        paths["predictions"] = out / f"{name}.predictions.csv"
        labels = list(result.per_label)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["Path", *labels, *[f"{lab} probability" for lab in labels]])
        for path, values, probs in result.predictions:
            w.writerow([path, *["" if math.isnan(v) else f"{v:.1f}" for v in values], *[f"{p:.9g}" for p in probs]])
        atomic_write_text(paths["predictions"], buf.getvalue())
    atomic_write_text(paths["markdown"], md)
    return paths


# ============================================================================ CLI handlers


def _info() -> dict[str, Any]:
    from pertvl import __version__

    return {"pertvl_version": __version__, "command": " ".join(["pertvl", *sys.argv[1:]])}


# CLI defaults that depend on the mode: (epochs, head_lr) for end-to-end fine-tuning and for a frozen
# encoder. A linear probe on precomputed features costs little per epoch and needs more, larger steps.
FINETUNE_DEFAULTS = {"nli": (3, 1e-3), "chexpert": (5, 1e-3)}
PROBE_DEFAULTS = (30, 1e-2)


def _settings(args, task: str) -> FitSettings:
    frozen = bool(args.freeze_encoder or args.export)
    epochs, head_lr = PROBE_DEFAULTS if frozen else FINETUNE_DEFAULTS[task]
    return FitSettings(epochs=args.epochs or epochs, lr=args.lr, head_lr=args.head_lr or head_lr,
                       batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                       dropout=args.dropout, seed=args.seed, device=args.device, precision=args.precision,
                       workers=getattr(args, "workers", 0), freeze_encoder=frozen)


def nli_protocol(args) -> str:
    """"train/dev/test", "train/test" or "cv" from the CLI arguments; ValueError for a bad mix."""
    cv = getattr(args, "cv", None)
    if cv is not None:
        if args.dev or args.test:
            raise ValueError("--cv K cross-validates on --train alone; drop --dev/--test (or drop --cv for the "
                             "train/dev/test or train/test protocol)")
        return "cv"
    if not args.test:
        raise ValueError("give --test JSONL (train/test or train/dev/test protocol) or --cv K (cross-validation "
                         "on --train)")
    return "train/dev/test" if args.dev else "train/test"


def nli_cli_main(args) -> int:
    """`pertvl finetune nli`."""
    try:
        protocol = nli_protocol(args)
        if args.export and not args.freeze_encoder:
            print("note: --export holds no torch weights: the ONNX encoder stays frozen and a linear probe "
                  "is trained on its embeddings (fine-tuning needs --run)", flush=True)
        common = dict(run=args.run, text_model=args.text_model, export=args.export,
                      settings=_settings(args, "nli"), max_length=args.max_length, info=_info())
        if protocol == "cv":
            data = read_nli(args.train)
            print(data.describe(), flush=True)
            print(f"protocol: {args.cv}-fold cross-validation on {data.path} (label-stratified, seed {args.seed}; "
                  "last epoch of each fold)", flush=True)

            def on_fold(k: int, train: NliFile, test: NliFile) -> None:
                print(f"fold {k}/{args.cv}: train {len(train.examples)} ("
                      + ", ".join(f"{lab} {n}" for lab, n in train.label_counts().items()) + f"), test "
                      f"{len(test.examples)} (" + ", ".join(f"{lab} {n}" for lab, n in test.label_counts().items())
                      + ")", flush=True)

            result: NliResult | NliCvResult = cross_validate_nli(data, args.cv, seed=args.seed, on_fold=on_fold,
                                                                 **common)
        else:
            train = read_nli(args.train)
            dev = read_nli(args.dev) if args.dev else None
            test = read_nli(args.test)
            for f in (train, dev, test):
                if f is not None:
                    print(f.describe(), flush=True)
            print(f"protocol: {protocol}" + (" (best dev epoch)" if dev else " (last epoch; no dev set)"), flush=True)
            result = finetune_nli(train, dev, test, **common)
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune nli: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, args.name or "nli")
    if isinstance(result, NliCvResult):
        print(f"NLI {args.cv}-fold CV: accuracy {100 * result.mean_accuracy:.1f}% ± {100 * result.std_accuracy:.1f} "
              f"(per fold: {', '.join(f'{100 * a:.1f}%' for a in result.fold_accuracies)}); pooled out-of-fold "
              f"accuracy {100 * result.pooled.accuracy:.1f}% (macro F1 {result.pooled.macro_f1:.3f})")
    else:
        dev_part = (f"dev accuracy {100 * result.dev.accuracy:.1f}% (macro F1 {result.dev.macro_f1:.3f}), "
                    if result.dev is not None else "")
        print(f"NLI: {dev_part}test accuracy {100 * result.test.accuracy:.1f}% (macro F1 "
              f"{result.test.macro_f1:.3f}); " + (f"best epoch {result.best_epoch}" if result.dev is not None
                                                  else f"last epoch {result.best_epoch}"))
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0


def chexpert_cli_main(args) -> int:
    """`pertvl finetune chexpert`."""
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    try:
        data = prepare_chexpert(args.csv, args.images, valid_csv=args.valid_csv, labels=labels,
                                uncertain=args.uncertain, blank=args.blank, frontal_only=args.frontal_only,
                                test_fraction=args.test_fraction, seed=args.seed, group_pattern=args.group_pattern)
        s = data.summary
        print(f"CheXpert: {s['train_rows']} train / {s['test_rows']} test rows ({s['split']['method']}); left out: "
              f"{_skips(s['rows_skipped'])}; images missing: {s['images_missing']}", flush=True)
        result = finetune_chexpert(data, args.images, run=args.run, export=args.export, image_size=args.image_size,
                                   settings=_settings(args, "chexpert"), info=_info())
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune chexpert: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, args.name or "chexpert")
    scores = ", ".join(f"{k} AUROC {_num(v.auroc)} acc {_num(v.accuracy, True)}" for k, v in result.per_label.items())
    print(f"CheXpert: {scores}; mean AUROC {_num(result.mean_auroc)}; images undecodable "
          f"{result.data['images_undecodable']}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0
