"""Text-only structure check on Open-I reports (no images).

For each report with FINDINGS and IMPRESSION: anchor = the impression, candidates = the findings
and their valid perturbations, scored by the text encoder alone, with pertvl.evaluate.structure's
rules ("images" count reports; a report whose impression equals its findings is skipped). The text
counterfactuals (cf_laterality, cf_negation) of the findings as written are extra per-type rows,
not candidates of the overall accuracy. Reports: the Kaggle layout's indiana_reports.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pertvl.cli import positive_int
from pertvl.data.counterfactual import TEXT_COUNTERFACTUAL_TYPES
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.text import clean_text
from pertvl.evaluate.encoder import TextEncoder, embed_texts_unique
from pertvl.evaluate.evaluation import Evaluation
from pertvl.evaluate.structure import (
    CandidateCounts,
    GlobalScorer,
    accuracy_stats,
    add_structure_arguments,
    candidate_scores,
    embed_after,
    requested_types,
    summarize,
    valid_perturbations,
)
from pertvl.evaluate.structure_result import TEXT_SCHEMA as SCHEMA
from pertvl.evaluate.structure_result import StructureResult

REQUIRED_COLUMNS = ("uid", "findings", "impression")


@dataclass
class ReportSections:
    findings: list[str]
    impressions: list[str]
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    raw_findings: list[str] = field(default_factory=list)  # the findings as written (the text rules need them)

    def __len__(self) -> int:
        return len(self.findings)


def read_report_sections(path: str | os.PathLike, limit: int | None = None) -> ReportSections:
    """The reports of indiana_reports.csv with both findings and impression (at most `limit`), cleaned.
    Raises ValueError naming the file when a required column is absent."""
    findings: list[str] = []
    impressions: list[str] = []
    raw: list[str] = []
    skipped: Counter = Counter()
    rows = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not an indiana_reports.csv: column(s) {missing} missing (header {reader.fieldnames})")
        for row in reader:
            if limit is not None and len(findings) >= limit:
                break
            rows += 1
            fnd, imp = clean_text(row["findings"]), clean_text(row["impression"])
            if not fnd and not imp:
                skipped["no_findings_no_impression"] += 1
            elif not fnd:
                skipped["no_findings"] += 1
            elif not imp:
                skipped["no_impression"] += 1
            else:
                findings.append(fnd)
                impressions.append(imp)
                raw.append(row["findings"])
    return ReportSections(findings, impressions, rows, dict(skipped), raw)


def perturb_findings(sections: ReportSections, perturber: Any, **perturb_kwargs: Any) -> list[tuple[str, Any]]:
    """[(impression, perturbation record of its findings)] in report order, each distinct findings text
    perturbed once by `perturber.perturb_many`."""
    distinct = list(dict.fromkeys(sections.findings))
    by_text = dict(zip(distinct, perturber.perturb_many(distinct, **perturb_kwargs), strict=True))
    return [(imp, by_text[fnd]) for imp, fnd in zip(sections.impressions, sections.findings, strict=True)]


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def evaluate_text_structure(
    encoder: TextEncoder, records: Iterable[tuple[str, Any]], types: Sequence[str] = PERTURBATION_TYPES,
    bootstrap: int = 1000, seed: int = 0, batch_size: int = 32, info: Mapping[str, Any] | None = None,
    counterfactuals: Sequence[Any] | None = None) -> StructureResult:
    """Score each report's findings against their perturbations, anchored on its impression.

    `records`: (clean impression, findings record with text, perturbations, unavailable); optional
    `counterfactuals` (one per record) as in text_counterfactual_record. Returns a
    StructureResult with schema "pertvl-text-structure/3"."""
    types = requested_types(types)
    counts = CandidateCounts()
    skipped: Counter = Counter()
    anchors: list[str] = []
    originals: list[str] = []
    candidates: list[list[str | None]] = []
    records = list(records)
    if counterfactuals is not None and len(counterfactuals) != len(records):
        raise ValueError(f"got {len(counterfactuals)} counterfactual records for {len(records)} records")
    cf_types = TEXT_COUNTERFACTUAL_TYPES
    cf_counts = CandidateCounts()
    cf_candidates: list[list[str | None]] = []
    for r, (impression, record) in enumerate(records):
        text = (_field(record, "text") or "").strip()
        impression = (impression or "").strip()
        if not impression:
            skipped["empty_impression"] += 1
            continue
        if not text:
            skipped["empty_findings"] += 1
            continue
        if impression.split() == text.split():
            # The anchor would be its own candidate (cosine 1): nothing is measured.
            skipped["impression_equals_findings"] += 1
            continue
        anchors.append(impression)
        originals.append(text)
        candidates.append(
            valid_perturbations(text, _field(record, "perturbations"), _field(record, "unavailable"), types, counts)
        )
        if counterfactuals is not None:
            cf = counterfactuals[r]
            cf_candidates.append(valid_perturbations(text, _field(cf, "counterfactuals"), _field(cf, "unavailable"),
                                                     cf_types, cf_counts))
    all_texts = anchors + originals + [c for row in candidates for c in row if c is not None]
    index, text_emb = embed_texts_unique(encoder, all_texts, batch_size)
    anchor_emb = text_emb[[index[a] for a in anchors]] if anchors else text_emb[:0]
    scores = candidate_scores(anchor_emb, index, GlobalScorer(text_emb), originals, candidates, len(types))
    result = summarize(scores, types, counts, skipped=skipped, bootstrap=bootstrap, seed=seed, schema=SCHEMA,
                       info=info)
    if counterfactuals is not None:
        # Embedded after the others, in calls of their own: the perturbation numbers stay as without.
        index, text_emb = embed_after(encoder, index, text_emb,
                                      [c for row in cf_candidates for c in row if c is not None], batch_size)
        cf_scores = candidate_scores(anchor_emb, index, GlobalScorer(text_emb), originals, cf_candidates,
                                     len(cf_types))
        result.per_type.update(accuracy_stats(cf_scores, cf_types, cf_counts, bootstrap, seed)[1])
    return result


@dataclass
class TextStructureData:
    sections: ReportSections
    records: list[tuple[str, Any]]
    counterfactuals: list[Any] | None = None  # text_counterfactual_record of each report's findings


def load(options: argparse.Namespace) -> TextStructureData:
    """Read --reports, perturb the findings (spaCy, --perturb-seed; the --types asked for)."""
    from pertvl.data.perturb import Perturber

    sections = read_report_sections(options.reports, limit=options.limit)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(sections.skipped.items())) or "none"
    print(f"{options.reports}: {len(sections)} reports with findings and impression ({sections.rows_read} read; "
          f"left out: {skipped})")
    perturber = Perturber(seed=options.perturb_seed)
    records = perturb_findings(sections, perturber, progress=True)
    cfs = None
    if not options.no_counterfactuals:
        from pertvl.data.counterfactual import text_counterfactual_record

        by_raw: dict[str, Any] = {}
        cfs = [by_raw.setdefault(raw, text_counterfactual_record(raw)) for raw in sections.raw_findings]
        made = Counter(t for raw, rec in by_raw.items() for t in rec.counterfactuals)
        print(f"text counterfactuals of {len(by_raw)} distinct findings: "
              + ", ".join(f"{t} {made[t]}" for t in TEXT_COUNTERFACTUAL_TYPES))
    return TextStructureData(sections, records, cfs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reports", required=True, metavar="CSV", help="the Kaggle layout's indiana_reports.csv")
    p.add_argument("--perturb-seed", type=int, default=0, help="seed of the perturbations (default 0)")
    p.add_argument("--limit", type=positive_int, help="use only the first N reports with both sections")
    p.add_argument("--no-counterfactuals", action="store_true",
                   help="leave out the text counterfactual rows (cf_laterality, cf_negation)")
    add_structure_arguments(p)


def run(encoder: TextEncoder, data: TextStructureData, options: argparse.Namespace) -> StructureResult:
    sections = data.sections
    info = {"reports": str(options.reports), "rows_read": sections.rows_read, "rows_left_out": sections.skipped,
            "perturb_seed": options.perturb_seed}
    return evaluate_text_structure(encoder, data.records, types=options.types, bootstrap=options.bootstrap,
                                   seed=options.seed, batch_size=options.batch_size, info=info,
                                   counterfactuals=data.counterfactuals)


EVALUATION = Evaluation(
    name="text-structure",
    help="text-only structure check on Open-I: impression vs findings and their perturbations",
    description="For each report with both sections: anchor = impression, candidates = findings and "
    "its valid perturbations, scored by the text encoder alone.",
    add_arguments=add_arguments, run=run, result_type=StructureResult, schemas=(SCHEMA,),
    title="Text-only structure (impression → findings)", shards=False, load=load, text_only=True)
