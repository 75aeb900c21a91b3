"""CheXpert fine-tuning (Table II): the label CSV, its policies (uncertain, blank), the patient split, the image rows and the fine-tune or probe.

See pertvl.evaluate.finetune for the protocol."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.image import ImageReadError, read_image
from pertvl.evaluate.evaluation import Finetune, JsonResult, MetricInfo
from pertvl.evaluate.finetune.fit import (
    MAX_LISTED_PROBLEMS,
    EpochLog,
    FitSettings,
    autocast,
    feature_loader,
    fit,
    fit_settings,
    format_number,
    format_skips,
    linear_head,
    param_groups,
    seeded_generator,
    standardize,
)
from pertvl.evaluate.report import md_table, pct, print_paths, run_info, write_result
from pertvl.evaluate.stats import auroc
from pertvl.evaluate.torch_encoder import pick_device
from pertvl.files import atomic_write_text
from pertvl.train.rundir import RunDir

log = logging.getLogger(__name__)

CHEXPERT_SCHEMA = "pertvl-finetune-chexpert/1"
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
PAPER_CHEXPERT_LABELS = ("Consolidation", "Pleural Effusion")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore", "u-mix")
UNCERTAIN_NAMES = {"zeros": "U-Zeros", "ones": "U-Ones", "ignore": "U-Ignore",
                   "u-mix": "U-mix (U-Ones for Edema and Atelectasis, U-Zeros otherwise)"}
U_MIX_ONES = ("Edema", "Atelectasis")  # the labels "u-mix" maps uncertain to 1; U-Zeros for the others
BLANK_POLICIES = ("zero", "mask")
VIEW_COLUMN = "Frontal/Lateral"

# The patient folder of CheXpert ("…/patient00001/study1/…") or MIMIC-CXR ("…/p10/p10000032/s5…/…").
DEFAULT_GROUP_PATTERN = r"(?:^|/)(patient\d+|p\d{8})(?=/)"


@dataclass
class ChexpertRow:
    path: str  # as written in the CSV (relative to --images)
    view: str  # the Frontal/Lateral cell ("" when the column is absent)
    group: str  # patient (or the path itself when no patient folder is in it)
    values: tuple[float, ...]  # per chosen label: 1.0, 0.0, -1.0 (uncertain) or nan (blank)
    where: str  # "file:line"


@dataclass
class ChexpertTable:
    path: str
    labels: tuple[str, ...]
    rows: list[ChexpertRow]
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def group_of(path: str, pattern: re.Pattern[str]) -> str:
    """The split group of an image path: the first capture of `pattern` (the patient folder), else the
    path itself (no grouping visible: each image is its own group)."""
    m = pattern.search(path.replace("\\", "/"))
    return m.group(1) if m else path


def read_chexpert_csv(path: str | os.PathLike, labels: Sequence[str] = PAPER_CHEXPERT_LABELS,
                      frontal_only: bool = True, group_pattern: str = DEFAULT_GROUP_PATTERN) -> ChexpertTable:
    """The rows of a CheXpert-format CSV for `labels` (frontal views only by default), grouped by patient
    (`group_pattern`'s first capture). Bad rows are skipped, counted and named (file:line).
    FileNotFoundError / ValueError: a missing file or column."""
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


def chexpert_targets(values: np.ndarray, uncertain: str = "zeros", blank: str = "zero",
                     labels: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets, loss mask) float32 [N, L] from label values [N, L] (1, 0, -1 uncertain, nan blank, as
    read_chexpert_csv keeps them) under the `uncertain` policy (zeros, ones, ignore, u-mix: needs the column
    `labels`) and the `blank` policy (zero, mask), both checked by prepare_chexpert."""
    values = np.asarray(values, dtype=np.float64)
    known = ~np.isnan(values)
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
    """Seeded train/test split by group, bool [N] (True = test): the sorted distinct groups permuted by
    default_rng(seed), the first round(test_fraction × G) (1 to G − 1) tested."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction: expected a number in (0, 1), got {test_fraction}")
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError(f"need at least 2 patients/images to split into train and test, got {len(distinct)}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = min(max(1, round(test_fraction * len(distinct))), len(distinct) - 1)
    test_groups = {distinct[i] for i in order[:n_test]}
    return np.array([g in test_groups for g in groups], dtype=bool)


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
    """AUROC and accuracy per label of probs [N, L] against test values [N, L] (1, 0, -1 uncertain, nan
    blank): 1/0 scored, blanks as negatives under blank "zero" (excluded under "mask"), uncertain never."""
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
            blank_negatives=int(is_blank.sum()) if blank == "zero" else 0)
    return out


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


@dataclass
class ChexpertResult(JsonResult):
    SCHEMAS, WHAT = (CHEXPERT_SCHEMA,), "CheXpert fine-tune"

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
        return mean_defined(s.auroc for s in self.per_label.values())

    @property
    def mean_accuracy(self) -> float | None:
        return mean_defined(s.accuracy for s in self.per_label.values())

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "history": [asdict(h) for h in self.history],
                "test": {"per_label": {k: asdict(v) for k, v in self.per_label.items()},
                         "mean_auroc": self.mean_auroc, "mean_accuracy": self.mean_accuracy}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChexpertResult:
        """Read NAME.json back (the per-item predictions live in NAME.predictions.csv, not here)."""
        return super().from_json({**d, "per_label": d["test"]["per_label"]} if d.get("schema") == CHEXPERT_SCHEMA else d)

    def markdown(self, name: str) -> str:
        rows = [[name, format_number(s.auroc), pct(s.accuracy), str(s.n), str(s.n_pos), str(s.n_neg),
                 str(s.blank_negatives), f"{s.excluded_uncertain} / {s.excluded_blank}"]
                for name, s in self.per_label.items()]
        rows.append(["**mean**", format_number(self.mean_auroc), pct(self.mean_accuracy), "", "", "", "", ""])
        d = self.data
        return "\n".join([
            f"# CheXpert fine-tuning: {name}", "",
            f"Encoder: {self.info.get('encoder')} ({self.info.get('mode')}); {self.settings['epochs']} epochs, "
            f"{self.settings['image_size']} px; uncertain policy {UNCERTAIN_NAMES[d['uncertain_policy']]}; "
            f"blank cells: {'negative (0)' if d.get('blank_policy', 'zero') == 'zero' else 'masked'}; "
            f"{'frontal views only' if d['frontal_only'] else 'all views'}.", "",
            md_table(["label", "AUROC", "accuracy", "n", "positives", "negatives", "of which blank",
                      "excluded (uncertain / blank)"], rows),
            f"Split: {d['split']['method']}. Train rows {d['train_rows']}, test rows {d['test_rows']} "
            f"({d['test_images_scored']} test images scored). Rows left out: {format_skips(d['rows_skipped'])}. Images "
            f"missing: {d['images_missing']}, undecodable: {d['images_undecodable']}.",
            "",
            "Accuracy at probability 0.5; 1/0 test labels are scored"
            + (", blank cells as negatives." if d.get("blank_policy", "zero") == "zero" else "; blank cells are not."),
        ]) + "\n"

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        """NAME.predictions.csv: Path, per label the test value and the predicted probability."""
        path = Path(out_dir) / f"{name}.predictions.csv"
        labels = list(self.per_label)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["Path", *labels, *[f"{lab} probability" for lab in labels]])
        for image, values, probs in self.predictions:
            w.writerow([image, *["" if math.isnan(v) else f"{v:.1f}" for v in values], *[f"{p:.9g}" for p in probs]])
        atomic_write_text(path, buf.getvalue())
        return {"predictions": path}

    def metrics(self) -> dict[str, float | None]:
        """"chexpert/LABEL/accuracy", "chexpert/LABEL/auroc" per label, and their means."""
        out: dict[str, float | None] = {}
        for name, s in self.per_label.items():
            out[f"chexpert/{name}/accuracy"] = s.accuracy
            out[f"chexpert/{name}/auroc"] = s.auroc
        out["chexpert/mean_accuracy"] = self.mean_accuracy
        out["chexpert/mean_auroc"] = self.mean_auroc
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        """Table II's layout: per label accuracy then AUROC, then the averages; all in the summary."""
        metric = key.split("/", 1)[1]
        label, _, kind = metric.rpartition("/")
        if not label:  # mean_accuracy / mean_auroc
            label, kind = "Avg", metric.removeprefix("mean_")
        order = (1,) if label == "Avg" else (0, CHEXPERT_LABELS.index(label) if label in CHEXPERT_LABELS else 99, label)
        if kind == "auroc":
            return MetricInfo(f"{label} AUROC", percent=False, order=(*order, 1), chance=0.5, summary=True)
        return MetricInfo(f"{label} accuracy", order=(*order, 0), summary=True)


@dataclass
class ChexpertData:
    labels: tuple[str, ...]
    train: list[ChexpertRow]
    test: list[ChexpertRow]
    train_targets: np.ndarray  # [N, L] float32 (policy applied)
    train_mask: np.ndarray  # [N, L] float32 (1 = in the loss)
    test_values: np.ndarray  # [M, L] 1 / 0 / -1 / nan: only 1/0 are scored
    summary: dict[str, Any]


def prepare_chexpert(csv_path: str | os.PathLike, images: str | os.PathLike, *,
                     valid_csv: str | os.PathLike | None = None,
                     labels: Sequence[str] = PAPER_CHEXPERT_LABELS, uncertain: str = "zeros",
                     frontal_only: bool = True, test_fraction: float = 0.2, seed: int = 0,
                     group_pattern: str = DEFAULT_GROUP_PATTERN, blank: str = "zero",
                     split_from: str | os.PathLike | None = None) -> ChexpertData:
    """Read the CSV(s), split them (valid_csv as given; split_from as a pairs.jsonl splits the images; else
    by patient, seeded), drop rows whose image is missing (counted, named), and apply the label policies."""
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
    if valid_csv is not None and split_from is not None:
        raise ValueError("give one of valid_csv (--valid-csv) and split_from (--split-from), not both")
    table = read_chexpert_csv(csv_path, labels, frontal_only, group_pattern)
    tables = [table]
    if valid_csv is not None:
        tables.append(read_chexpert_csv(valid_csv, labels, frontal_only, group_pattern))
        train_rows, test_rows = table.rows, tables[1].rows
        split = {"method": "given", "valid_csv": str(valid_csv)}
    else:
        if split_from is not None:
            is_test = split_as_pairs(table.rows, root, split_from)
            outside = [r for r, t in zip(table.rows, is_test, strict=True) if t is None]
            if outside:  # counted and named like the other skipped rows
                table.skipped["image not in the pairs file"] = len(outside)
                room = max(0, MAX_LISTED_PROBLEMS - len(table.problems))
                table.problems += [f"{r.where}: image not in {split_from}" for r in outside[:room]]
        else:
            is_test = split_by_group([r.group for r in table.rows], test_fraction, seed)
        train_rows = [r for r, t in zip(table.rows, is_test, strict=True) if t is not None and not t]
        test_rows = [r for r, t in zip(table.rows, is_test, strict=True) if t]
        split = ({"method": "as the pairs file splits the images: train -> train; val, test -> test",
                  "split_from": str(split_from)} if split_from is not None else
                 {"method": "seeded split by patient (Path prefix; else per image)", "test_fraction": test_fraction,
                  "seed": seed, "groups": len({r.group for r in table.rows}),
                  "test_groups": len({r.group for r in test_rows}), "group_pattern": group_pattern})
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
    summary = {"csv": [t.path for t in tables], "images": str(root), "labels": list(labels),
               "frontal_only": frontal_only, "uncertain_policy": uncertain, "blank_policy": blank,
               "split": split, "rows_read": sum(t.rows_read for t in tables),
               "rows_skipped": dict(sum((Counter(t.skipped) for t in tables), Counter())),
               "row_problems": [p for t in tables for p in t.problems][:MAX_LISTED_PROBLEMS],
               "images_missing": len(missing), "image_problems": missing[:MAX_LISTED_PROBLEMS],
               "train_rows": len(kept["train"]), "test_rows": len(kept["test"]),
               "train_label_counts": _label_counts(_values(kept["train"], labels), labels),
               "test_label_counts": _label_counts(_values(kept["test"], labels), labels)}
    return ChexpertData(tuple(labels), kept["train"], kept["test"], targets, mask,
                        _values(kept["test"], labels), summary)


def split_as_pairs(rows: Sequence[ChexpertRow], images: Path, pairs: str | os.PathLike) -> list[bool | None]:
    """Per row: False when the pairs file puts its image in the train split, True in val or test, None
    when no pair has it (matched by resolved path)."""
    from pertvl.data.records import read_pairs

    pairs = Path(pairs)
    if not pairs.is_file():
        raise FileNotFoundError(f"{pairs}: no such pairs file (--split-from)")
    split_of = {(pairs.parent / p.image).resolve(): p.split for p in read_pairs(pairs)}
    flags: list[bool | None] = []
    for r in rows:
        split = split_of.get((images / r.path).resolve())
        flags.append(None if split is None else split != "train")
    return flags


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
            return i, read_image(self.root / row.path, self.size), ""
        except (FileNotFoundError, ImageReadError) as e:
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
    data: ChexpertData, images: str | os.PathLike, *, run: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None, image_size: int | None = None,
    settings: FitSettings | None = None, info: dict[str, Any] | None = None) -> ChexpertResult:
    """Fine-tune (or probe) the image encoder of `run`, or probe the `export` (always frozen), on the
    training rows and score the test rows: AUROC and accuracy per label and their means."""
    import torch

    if (run is None) == (export is None):
        raise ValueError("give exactly one of run / export")
    settings = settings or FitSettings(epochs=5, lr=1e-4)
    root = Path(images)
    info = dict(info or {})
    if export is not None:
        settings = dataclasses.replace(settings, freeze_encoder=True)
    device = pick_device(settings.device)
    generator = seeded_generator(settings.seed)
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
        run_dir = RunDir(run)
        dual, path = run_dir.load_model()
        size = image_size or run_dir.image_size() or 224
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
        head = linear_head(int(feats["train"][1].shape[1]), n_labels, settings.dropout).to(device)
        module = head
        tr_idx, tr_x = feats["train"]
        loader = feature_loader(tr_x, tr_idx, batch_size=settings.batch_size, shuffle=True, generator=generator)

        def step(batch):
            x, idx = batch
            if not idx.numel() or not mask[idx].any():
                return None
            return masked_bce(head(x.to(device)), idx)

        def predict() -> tuple[np.ndarray, np.ndarray]:
            te_idx, te_x = feats["test"]
            with torch.inference_mode():
                return te_idx.numpy(), torch.sigmoid(head(te_x.to(device)).float()).cpu().numpy()

        groups = param_groups([], head.parameters(), settings)
    else:
        in_dim = int(backbone.backbone.config.hidden_sizes[-1])
        head = linear_head(in_dim, n_labels, settings.dropout).to(device)
        module = torch.nn.ModuleDict({"backbone": backbone.backbone, "head": head})
        loader = image_loader(data.train, shuffle=True, gen=generator)

        def step(batch):
            idx, imgs, bad = batch
            problems.add(bad)
            if imgs is None or not mask[idx].any():
                return None
            return masked_bce(head(encode(imgs)), idx)

        def predict() -> tuple[np.ndarray, np.ndarray]:
            idx, probs = _features(image_loader(data.test), lambda imgs: torch.sigmoid(head(encode(imgs)).float()),
                                   problems, device, settings, "test ")
            return idx.numpy(), probs.numpy()

        groups = param_groups(backbone.backbone.parameters(), head.parameters(), settings)

    history, _ = fit(module, groups, loader, step, settings, device)
    test_idx, probs = predict()
    blank = data.summary["blank_policy"]
    per_label = multilabel_scores(probs, data.test_values[test_idx], data.labels, blank)
    summary = dict(data.summary)
    summary["images_undecodable"] = len(problems.items)
    summary["image_problems"] = (summary["image_problems"] + list(problems.items))[:MAX_LISTED_PROBLEMS]
    summary["test_images_scored"] = int(len(test_idx))
    settings_json = {**asdict(settings), "device": str(device), "image_size": size,
                     "selection": "last epoch", "threshold": 0.5,
                     "scored": ("1/0 test labels and blanks as negatives; uncertain excluded" if blank == "zero"
                                else "definite test labels only (1/0); uncertain and blank excluded")}
    predictions = [(data.test[i].path, data.test[i].values, tuple(float(x) for x in p))
                   for i, p in zip(test_idx.tolist(), probs, strict=True)]
    return ChexpertResult(per_label, history, summary, settings_json, info, predictions)


def _features(loader, encode, problems: ImageProblems, device, settings: FitSettings, which: str = ""):
    """(row indices [N'], encode(images) [N', D]) of every decodable image, without gradients; ValueError
    naming the image root, the row count and the first problem when no image of the set decodes."""
    import torch

    idx_all, feats = [], []
    with torch.inference_mode(), autocast(device, settings.precision):
        for idx, imgs, bad in loader:
            problems.add(bad)
            if imgs is not None:
                idx_all.append(idx)
                feats.append(encode(imgs).float().cpu())
    if not feats:
        first = next(iter(problems.items), "none recorded")
        raise ValueError(f"{loader.dataset.root}: no {which}image could be decoded ({len(loader.dataset)} rows; "
                         f"first problem: {first})")
    return torch.cat(idx_all), torch.cat(feats)


def chexpert_cli_main(args) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    try:
        data = prepare_chexpert(args.csv, args.images, valid_csv=args.valid_csv, labels=labels,
                                uncertain=args.uncertain, blank=args.blank, frontal_only=args.frontal_only,
                                test_fraction=args.test_fraction, seed=args.seed, group_pattern=args.group_pattern,
                                split_from=args.split_from)
        s = data.summary
        print(f"CheXpert: {s['train_rows']} train / {s['test_rows']} test rows ({s['split']['method']}); left out: "
              f"{format_skips(s['rows_skipped'])}; images missing: {s['images_missing']}", flush=True)
        result = finetune_chexpert(data, args.images, run=args.run, export=args.export, image_size=args.image_size,
                                   settings=fit_settings(args, "chexpert"), info=run_info())
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune chexpert: {e}", file=sys.stderr)
        return 2
    paths = write_result(result, args.out, args.name or "chexpert")
    scores = ", ".join(f"{k} AUROC {format_number(v.auroc)} acc {pct(v.accuracy)}" for k, v in result.per_label.items())
    print(f"CheXpert: {scores}; mean AUROC {format_number(result.mean_auroc)}; images undecodable "
          f"{result.data['images_undecodable']}")
    print_paths(paths)
    return 0


FINETUNE = Finetune("chexpert", "chexpert", "Table II: CheXpert-style fine-tuning of the image tower", ChexpertResult,
                    (CHEXPERT_SCHEMA,))
