"""Your own data: a CSV or JSONL table of image paths and reports -> pairs.jsonl + summary.json.

Columns (CSV header or JSONL keys; docs/DATA.md): `image` and `report` required; optional `study`,
`subject`, `split` (train | val | test; validate/valid/dev read as val), `view` (PA/AP/frontal ->
Frontal, LATERAL/LL -> Lateral), `id` (default: the image path as written), and CheXpert label names
(1 / 0 / -1 uncertain / blank, handled as in `pertvl data mimic-cxr`).

A given split column is kept. Without one, whole groups go to train/val/test (assign_splits), a
group being the subject, else the study, else the image alone (the summary then says so), so no
patient's report is both trained on and tested. A row that cannot become a pair is skipped under
its reason (SKIP_REASONS, checked in that order) and named by file and line; counts reconcile:
pairs_written + sum(skipped) == considered (every data row).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pertvl.data.mimic import CHEXPERT_LABELS, split_labels
from pertvl.data.overlap import describe_overlap, text_overlap
from pertvl.data.records import (
    DEFAULT_SPLIT_FRACTIONS,
    PROJECTIONS,
    SPLITS,
    IngestResult,
    Pair,
    SkipTally,
    assign_splits,
    split_counts,
    write_json,
    write_pairs,
)
from pertvl.data.text import normalize_report

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl")
REQUIRED_COLUMNS = ("image", "report")
SKIP_REASONS = ("unreadable_row", "no_image", "empty_report", "bad_split", "bad_label", "duplicate_image",
                "missing_image")  # fmt: skip
_SPLIT_NAMES = {"train": "train", "val": "val", "validate": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test"}  # fmt: skip
_FRONTAL, _LATERAL = {"PA", "AP", "FRONTAL"}, {"LATERAL", "LL", "LAT"}


class TableError(ValueError):
    """A table that cannot be ingested at all (missing file, no image/report column, bad option)."""


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in ("auto", *FORMATS):
        raise TableError(f"--format must be auto, csv or jsonl, got {fmt!r}")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise TableError(f"{path}: cannot tell the format from the suffix {suffix!r}; name it .csv or .jsonl, "
                     "or pass --format csv|jsonl")


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield (line number, row or None, why it is unreadable) for every data row of the table."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise TableError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        try:
            if fmt == "jsonl":
                yield from _jsonl_rows(path, f)
            else:
                yield from _csv_rows(path, f)
        except UnicodeDecodeError as e:
            raise TableError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path, f) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, f"not JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(row, dict):
            yield lineno, None, f"a JSON {type(row).__name__}, not an object"
            continue
        yield lineno, row, ""


def _csv_rows(path: Path, f) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(f, dialect=dialect, restkey="__extra__")
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TableError(f"{path}: no {' and no '.join(repr(c) for c in missing)} column in the header "
                         f"{header}; the table needs 'image' (path) and 'report' (text) columns (docs/DATA.md)")
    reader.fieldnames = header
    for row in reader:
        if row.get("__extra__"):
            yield reader.line_num, None, f"{len(header) + len(row['__extra__'])} fields, the header has {len(header)}"
            continue
        yield reader.line_num, row, ""


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _projection(view: str) -> str:
    v = view.upper()
    return "Frontal" if v in _FRONTAL else "Lateral" if v in _LATERAL else "unknown"


def _pair(row: dict[str, Any], where: str, images: Path, columns: set[str], text_only: bool,
          seen: set[str], tally: SkipTally) -> Pair | None:
    """One row as a Pair, or None after counting why it is skipped (SKIP_REASONS, in order)."""
    image, text = _text(row.get("image")), normalize_report(_text(row.get("report")))
    split_raw = _text(row.get("split"))
    split = _SPLIT_NAMES.get(split_raw.lower()) if split_raw else None
    certain, uncertain, bad = split_labels((n, _text(row.get(n))) for n in CHEXPERT_LABELS)
    pair_id = _text(row.get("id")) or image
    if not image:
        return tally.skip("no_image", where, "the image column is empty")
    if not text:
        return tally.skip("empty_report", where, f"{image}: the report is empty")
    if split is None and "split" in columns:
        return tally.skip("bad_split", where, f"{image}: split {split_raw!r} is not train, val or test")
    if bad is not None:
        value = _text(row.get(bad))
        return tally.skip("bad_label", where, f"{image}: label {bad} = {value!r} is not 1, 0, -1 or blank")
    if pair_id in seen:
        return tally.skip("duplicate_image", where, f"id {pair_id!r} is on an earlier row")
    path = Path(image) if Path(image).is_absolute() else images / image
    if not text_only and not path.is_file():
        return tally.skip("missing_image", where, f"{path}: no such file")
    seen.add(pair_id)
    study, subject, view = _text(row.get("study")), _text(row.get("subject")), _text(row.get("view"))
    extra: dict[str, Any] = {k: v for k, v in (("subject_id", subject), ("view", view)) if v}
    if uncertain:
        extra["uncertain_labels"] = uncertain
    has_labels = not columns.isdisjoint(CHEXPERT_LABELS)
    return Pair(id=pair_id, study_id=study or pair_id, image=str(path.resolve()),
                projection=_projection(view), text=text, split=split or "train",
                labels=certain if has_labels else None, source="table", extra=extra)


def ingest_table(table: str | os.PathLike, *, images: str | os.PathLike | None = None, fmt: str = "auto",
                 text_only: bool = False, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                 seed: int = 0) -> IngestResult:
    """Read a CSV / JSONL table of images and reports into pairs (see the module docstring);
    TableError when the table is missing, unreadable, or lacks the image/report columns."""
    path = Path(table)
    if not path.is_file():
        raise TableError(f"{path}: no such file (the table: CSV or JSONL, one row per image; docs/DATA.md)")
    fmt = detect_format(path, fmt)
    images_root = Path(images) if images else path.parent
    if not text_only and not images_root.is_dir():
        raise TableError(f"--images {images_root}: no such folder")
    rows = list(_rows(path, fmt))
    columns = {k.strip() for _, row, _ in rows if row for k in row}
    if rows and fmt == "jsonl" and not set(REQUIRED_COLUMNS) <= columns:
        raise TableError(f"{path}: no row has {' or '.join(c for c in REQUIRED_COLUMNS if c not in columns)!r}; "
                         "every row needs 'image' (path) and 'report' (text) keys (docs/DATA.md)")
    tally, seen, pairs = SkipTally(logger=log), set(), []
    for lineno, row, problem in rows:
        where = f"{path.name} line {lineno}"
        if row is None:
            tally.skip("unreadable_row", where, problem)
            continue
        pair = _pair({k.strip(): v for k, v in row.items()}, where, images_root, columns, text_only, seen, tally)
        if pair is not None:
            pairs.append(pair)
    group_by = "subject" if "subject" in columns else "study" if "study" in columns else "image"
    if "split" not in columns:
        group = {"subject": lambda p: p.extra.get("subject_id") or p.study_id,
                 "study": lambda p: p.study_id, "image": lambda p: p.id}[group_by]
        assign_splits(pairs, fractions, seed, group=group)
    summary = _summary(path, fmt, images_root, text_only, columns, group_by, len(rows), pairs, tally, seed)
    if len(pairs) + sum(summary["skipped"].values()) != len(rows):  # a bug here, never the input
        raise RuntimeError(f"table counts do not reconcile: {summary}")
    return IngestResult(pairs, summary)


def _summary(path: Path, fmt: str, images_root: Path, text_only: bool, columns: set[str], group_by: str,
             considered: int, pairs: list[Pair], tally: SkipTally, seed: int) -> dict[str, Any]:
    projections = Counter(p.projection for p in pairs)
    given = "split" in columns
    return {
        "layout": f"table ({fmt})",
        "split": "given" if given else f"by {group_by}, seed {seed}",
        "split_group": None if given else group_by,
        "columns": sorted(columns),
        "label_columns": [c for c in CHEXPERT_LABELS if c in columns],
        "considered": considered,
        "pairs_written": len(pairs),
        "skipped": {r: tally.skipped[r] for r in SKIP_REASONS if tally.skipped[r]},
        "splits": split_counts(pairs),
        "studies": {s: len({p.study_id for p in pairs if p.split == s}) for s in SPLITS},
        "projections": {p: projections.get(p, 0) for p in PROJECTIONS},
        "text_normalization": "whitespace collapsed",
        "text_overlap": text_overlap(pairs),
        "inputs": {"table": str(path), "images": str(images_root), "text_only": text_only},
        "skipped_examples": {r: tally.examples[r] for r in SKIP_REASONS if r in tally.examples},
    }


def cli_main(args: Any) -> int:
    """`pertvl data csv`: ingest, then write OUT/pairs.jsonl and OUT/summary.json (2 on bad input)."""
    try:
        fractions = tuple(float(x) for x in args.split_fractions.split(","))
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
            raise ValueError
    except ValueError:
        print(f"pertvl: error: --split-fractions {args.split_fractions!r}: expected three numbers "
              "train,val,test >= 0 summing to 1", file=sys.stderr)
        return 2
    try:
        result = ingest_table(args.table, images=args.images, fmt=args.format, text_only=args.text_only,
                              fractions=fractions, seed=args.seed)  # type: ignore[arg-type]
    except TableError as e:
        print(f"pertvl: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_pairs(out / "pairs.jsonl", result.pairs)
    write_json(out / "summary.json", result.summary)
    s = result.summary
    print(f"{args.table} -> {out / 'pairs.jsonl'}: {s['pairs_written']} pairs of {s['considered']} rows; "
          f"splits {s['splits']} ({s['split']})")
    if s["split_group"] == "image":
        print("  note: the table has no study or subject column, so the split is by image: the views of one "
              "study may land in both train and test")
    print(f"  held-out text also in train: {describe_overlap(s['text_overlap'])}")
    for reason, n in s["skipped"].items():
        print(f"  skipped {n} ({reason}), e.g. {s['skipped_examples'][reason][0]}")
    print(f"next: pertvl perturb --pairs {out / 'pairs.jsonl'} --out {out / 'perturbations.jsonl'}")
    return 0
