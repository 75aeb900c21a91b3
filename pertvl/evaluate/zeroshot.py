"""Zero-shot classification from prompt pairs, AUROC per label.

An image's score for a label is cos(image, positive) − cos(image, negative), averaged over the
label's prompt pairs. AUROC per label over the images whose label is exactly 0 or 1 (others counted
as skipped); a one-class label has AUROC null and is left out of the mean. Labels match the
samples' `labels` keys case-insensitively by name or alias; prompts pass through clean_text.
The data: a shard split, or a CheXpert CSV read by `pertvl finetune chexpert`'s reader with its
test-cell rule (docs/FINETUNE.md). JSON schema "pertvl-zeroshot/1" (ZeroShotResult.to_json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.text import clean_text
from pertvl.evaluate.encoder import Encoder, ImageBatcher, embed_texts_unique, l2_normalize
from pertvl.evaluate.evaluation import Evaluation, JsonResult, MetricInfo, Suite, add_chexpert_image_arguments
from pertvl.evaluate.report import md_table
from pertvl.evaluate.stats import auroc

log = logging.getLogger(__name__)

SCHEMA = "pertvl-zeroshot/1"


@dataclass(frozen=True)
class LabelPrompts:
    """Prompt pairs for one label. `label` is the name reported; `aliases` are other names the
    label may have in the data (matched case-insensitively, like `label`)."""

    label: str
    pairs: tuple[tuple[str, str], ...]
    aliases: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (self.label, *self.aliases)


# CheXpert header names; the phantom's labels.csv uses the same header.
DEFAULT_PROMPTS: tuple[LabelPrompts, ...] = (
    LabelPrompts("Pleural Effusion", (("pleural effusion", "no pleural effusion"),), ("Effusion",)),
    LabelPrompts("Pneumothorax", (("pneumothorax", "no pneumothorax"),)),
    LabelPrompts("Consolidation", (("consolidation", "no consolidation"),)),
    LabelPrompts("Cardiomegaly",
                 (("cardiomegaly", "no cardiomegaly"), ("enlarged heart", "normal heart size")),
                 ("Enlarged Heart",)),
    LabelPrompts("Lung Lesion", (("nodule", "no nodule"),), ("Nodule", "Lung Nodule")),
    LabelPrompts("Atelectasis", (("atelectasis", "no atelectasis"),)),
    LabelPrompts("Edema", (("edema", "no edema"), ("pulmonary edema", "no pulmonary edema")), ("Pulmonary Edema",)),
)


@dataclass
class LabelAUROC:
    auroc: float | None
    n_pos: int
    n_neg: int
    n_skipped: int = 0  # images with this label uncertain / NaN / not 0-1
    prompts: list[list[str]] = field(default_factory=list)


@dataclass
class ZeroShotResult(JsonResult):
    """Its JSON is these fields, "schema" first; mean_auroc (over the labels with a defined AUROC) and
    labels_defined follow from per_label."""

    SCHEMAS, WHAT = (SCHEMA,), "zero-shot"

    per_label: dict[str, LabelAUROC]
    mean_auroc: float | None = field(init=False)
    labels_defined: int = field(init=False)
    images: int
    unprompted_labels: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        vals = [v.auroc for v in self.per_label.values() if v.auroc is not None]
        self.mean_auroc = float(np.mean(vals)) if vals else None
        self.labels_defined = len(vals)

    def markdown(self, name: str) -> str:
        rows = [[label, "undefined (one class)" if v.auroc is None else f"{v.auroc:.3f}", str(v.n_pos),
                 str(v.n_neg), str(v.n_skipped), "; ".join(f'"{p}" vs "{n}"' for p, n in v.prompts)]
                for label, v in self.per_label.items()]
        mean = self.mean_auroc
        return (
            f"# Zero-shot classification: {name}\n\n"
            + md_table(["label", "AUROC", "positives", "negatives", "uncertain/unknown", "prompts"], rows, "lrrrrl")
            + f"\nMean AUROC over defined labels: {'—' if mean is None else f'{mean:.3f}'}; {self.images} images.\n"
        )

    def metrics(self) -> dict[str, float | None]:
        return {"zeroshot/mean_auroc": self.mean_auroc}

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        label = "Zero-shot mean AUROC" if key == "zeroshot/mean_auroc" else key
        return MetricInfo(label, percent=False, order=(0,) if key == "zeroshot/mean_auroc" else (1, key),
                          chance=0.5, summary=key == "zeroshot/mean_auroc")

    def headline(self) -> str:
        mean = self.mean_auroc
        return (f"zero-shot mean AUROC {'n/a' if mean is None else f'{mean:.3f}'} over "
                f"{self.labels_defined} labels, {self.images} images")


def normalize_prompts(prompts: Any) -> tuple[LabelPrompts, ...]:
    """LabelPrompts, or {label: (pos, neg) | [(pos, neg), ...]}, with every prompt cleaned; ValueError for
    a label without a pair or a prompt that cleans to an empty or identical text."""
    if isinstance(prompts, Mapping):
        items = []
        for label, pairs in prompts.items():
            if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
                pairs = (pairs,)
            items.append(LabelPrompts(str(label), tuple(tuple(p) for p in pairs)))
        prompts = items
    out = []
    for lp in prompts:
        if not lp.pairs:
            raise ValueError(f"label {lp.label!r} has no prompt pair")
        pairs = []
        for pair in lp.pairs:
            if len(pair) != 2:
                raise ValueError(f"label {lp.label!r}: expected (positive, negative) prompts, got {pair!r}")
            pos, neg = clean_text(pair[0]), clean_text(pair[1])
            if not pos or not neg or pos == neg:
                raise ValueError(f"label {lp.label!r}: prompts {pair!r} clean to empty or identical texts")
            pairs.append((pos, neg))
        out.append(LabelPrompts(lp.label, tuple(pairs), tuple(lp.aliases)))
    return tuple(out)


def _target(value: Any) -> int | None:
    """1/0 for a definite label, None for uncertain (−1), NaN, missing or anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        if value == 1:
            return 1
        if value == 0:
            return 0
    return None


def evaluate_zeroshot(encoder: Encoder, samples: Iterable[Any], prompts: Any = DEFAULT_PROMPTS,
                      batch_size: int = 32) -> ZeroShotResult:
    """Zero-shot AUROC per label over shard samples with `meta["labels"]` ({name: 1.0/0.0/-1.0/NaN});
    only images with at least one definite label are embedded."""
    prompts = normalize_prompts(prompts)
    lookup = {name.lower(): i for i, lp in enumerate(prompts) for name in lp.names()}
    batcher = ImageBatcher(encoder, batch_size)
    skipped: Counter = Counter()
    targets: list[list[int | None]] = []
    uncertain = Counter()
    seen_labels: set[str] = set()
    unprompted: set[str] = set()
    for sample in samples:
        labels = sample.meta.get("labels")
        if not labels:
            skipped["no_labels"] += 1
            continue
        row: list[int | None] = [None] * len(prompts)
        for key, value in labels.items():
            i = lookup.get(str(key).lower())
            if i is None:
                unprompted.add(str(key))
                continue
            seen_labels.add(prompts[i].label)
            row[i] = _target(value)
            if row[i] is None:
                uncertain[i] += 1
        if all(t is None for t in row):
            skipped["no_definite_label"] += 1
            continue
        batcher.add(sample)
        targets.append(row)
    image_emb = batcher.finish()
    texts = [t for lp in prompts for pair in lp.pairs for t in pair]
    index, text_emb = embed_texts_unique(encoder, texts, batch_size)
    per_label: dict[str, LabelAUROC] = {}
    if targets:
        if image_emb.shape[1] != text_emb.shape[1]:
            raise ValueError(f"image embeddings have width {image_emb.shape[1]}, text embeddings {text_emb.shape[1]}")
        img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
    for i, lp in enumerate(prompts):
        col = [(r, t[i]) for r, t in enumerate(targets) if t[i] is not None]
        if lp.label not in seen_labels:
            continue  # the data do not have this label at all: nothing to report
        rows = np.array([r for r, _ in col], dtype=np.int64)
        y = np.array([t for _, t in col], dtype=np.int64)
        if rows.size:
            score = np.mean([img[rows] @ txt[index[p]] - img[rows] @ txt[index[n]] for p, n in lp.pairs], axis=0)
            value = auroc(score, y)
        else:
            value = None
        per_label[lp.label] = LabelAUROC(auroc=value, n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()),
                                         n_skipped=uncertain[i], prompts=[list(p) for p in lp.pairs])
    return ZeroShotResult(per_label=per_label, images=len(targets), unprompted_labels=sorted(unprompted),
                          skipped=dict(skipped))


@dataclass
class ChexpertSource:
    """The rows of a CheXpert CSV (read by the fine-tune's reader) and the folder its Path column is
    relative to; `samples(size)` reads the images when the encoder's size is known."""

    table: Any  # pertvl.evaluate.finetune.chexpert.ChexpertTable
    images: Path
    blank: str  # "zero": a blank cell is a negative; "mask": not scored
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of unreadable images

    def samples(self, size: int) -> Iterator[Any]:
        from pertvl.data.image import ImageReadError, read_image
        from pertvl.data.shards.reading import Sample

        for row in self.table.rows:
            try:
                image = read_image(self.images / row.path, size)
            except (FileNotFoundError, ImageReadError) as e:
                self.problems.append(f"{row.where}: {e}")
                log.warning("skipped: %s", self.problems[-1])
                continue
            labels = {name: 0.0 if math.isnan(v) and self.blank == "zero" else v
                      for name, v in zip(self.table.labels, row.values, strict=True)}
            yield Sample(row.path, image, {"labels": labels})

    def info(self, size: int) -> dict[str, Any]:
        from pertvl.evaluate.finetune.fit import MAX_LISTED_PROBLEMS

        t = self.table
        return {"chexpert": {
            "csv": t.path, "images": str(self.images), "image_size": size, "blank_policy": self.blank,
            "uncertain": "never scored", "rows_read": t.rows_read, "rows_kept": len(t.rows),
            "rows_skipped": dict(t.skipped), "row_problems": list(t.problems),
            "image_problems": self.problems[:MAX_LISTED_PROBLEMS]}}


def load_chexpert(options: argparse.Namespace) -> ChexpertSource | None:
    """--chexpert-csv/--images as the data of `pertvl eval zeroshot`; None without --chexpert-csv."""
    if not getattr(options, "chexpert_csv", None):
        return None
    if getattr(options, "shards", None):
        raise SystemExit("pertvl eval zeroshot: give --shards or --chexpert-csv, not both")
    if not options.images:
        raise SystemExit("pertvl eval zeroshot: --chexpert-csv needs --images ROOT (the folder its Path column "
                         "is relative to)")
    from pertvl.evaluate.finetune.chexpert import CHEXPERT_LABELS, read_chexpert_csv

    root = Path(options.images)
    if not root.is_dir():
        raise SystemExit(f"{root}: image root folder not found")
    try:
        table = read_chexpert_csv(options.chexpert_csv, CHEXPERT_LABELS, options.frontal_only)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return ChexpertSource(table, root, options.blank)


def _image_size(encoder: Encoder, options: argparse.Namespace) -> int:
    """--image-size, else the encoder's (an export's), else the run's training size, else 224."""
    if getattr(options, "image_size", None):
        return options.image_size
    if getattr(encoder, "image_size", None):
        return int(encoder.image_size)
    if getattr(options, "run", None):
        from pertvl.train.rundir import RunDir

        return RunDir(options.run).image_size() or 224
    return 224


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", metavar="JSON",
                   help='JSON file {label: [positive, negative] or [[pos, neg], ...]} (default: built-in prompts)')
    g = p.add_argument_group("a CheXpert CSV instead of --shards (read as `pertvl finetune chexpert` reads it)")
    g.add_argument("--chexpert-csv", metavar="CSV", help="CheXpert-v1.0[-small] train.csv / valid.csv (or any "
                   "CSV with Path, Frontal/Lateral and the 14 label columns)")
    g.add_argument("--images", metavar="ROOT", help="folder the CSV's Path column is relative to")
    add_chexpert_image_arguments(g)


def run(encoder: Encoder, data: Iterable[Any] | ChexpertSource, options: argparse.Namespace) -> ZeroShotResult:
    """`pertvl eval zeroshot`: `evaluate_zeroshot` with the built-in prompts or --prompts, on shard
    samples or on a CheXpert CSV (`load_chexpert`)."""
    prompts: Any = DEFAULT_PROMPTS
    if options.prompts:
        with open(options.prompts, encoding="utf-8") as f:
            try:
                prompts = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{options.prompts}: not JSON: {e}") from None
        if not isinstance(prompts, dict):
            raise SystemExit(f"{options.prompts}: expected {{label: [positive, negative]}}")
    if isinstance(data, ChexpertSource):
        size = _image_size(encoder, options)
        result = evaluate_zeroshot(encoder, data.samples(size), prompts=prompts, batch_size=options.batch_size)
        if data.problems:
            result.skipped["unreadable_image"] = len(data.problems)
        result.info.update(data.info(size))
        return result
    return evaluate_zeroshot(encoder, data, prompts=prompts, batch_size=options.batch_size)


EVALUATION = Evaluation(
    name="zeroshot", help="zero-shot classification from prompt pairs, AUROC per label",
    description='Score = cos(image, "finding") - cos(image, "no finding") per label; AUROC over '
    "images with a definite 0/1 label, from a shard split (--shards) or a CheXpert CSV (--chexpert-csv).",
    add_arguments=add_arguments, run=run, result_type=ZeroShotResult, schemas=(SCHEMA,), load=load_chexpert,
    title="Zero-shot classification", suites=frozenset({Suite.DEMO, Suite.ABLATE}))
