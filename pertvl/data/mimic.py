"""MIMIC-CXR-JPG (v2.0.0 / v2.1.0 layout) → pairs.jsonl + summary.json, read as distributed.

Reads, without unpacking: ROOT/mimic-cxr-2.0.0-{split,metadata}.csv.gz, optionally the CheXpert or
NegBio label CSV, the images ROOT/files/p{NN}/p{subject}/s{study}/{dicom}.jpg and the reports
files/p{NN}/p{subject}/s{study}.txt from a folder or mimic-cxr-reports.zip. Writes `pertvl data openi`'s
contract: one pair per image of a selected view whose study has the chosen section; `image` relative to
ROOT. Sections are split at capitalised headers ending in a colon; "___" is MIMIC's de-identification
mark (`--drop-deid`); the official split is kept (validate → val). Certain labels (1.0/0.0) go to
`labels`, uncertain (-1.0) ones to `extra["uncertain_labels"]`, blank ones are left out.
Counts reconcile: pairs_written + sum(skipped) == considered (every image row of the split file).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertvl.data.records import PROJECTIONS, SPLITS, IngestResult, Pair, SkipTally, split_counts, write_pairs
from pertvl.data.text import normalize_report
from pertvl.files import write_json

log = logging.getLogger(__name__)

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
LABEL_FILES = ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-negbio.csv.gz")
REPORTS_ZIP = "mimic-cxr-reports.zip"
CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
                   "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices")  # fmt: skip
SECTIONS = ("findings", "impression", "both", "findings-else-impression")
_SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
_FRONTAL, _LATERAL = {"PA", "AP"}, {"LATERAL", "LL"}
# A section header: capitals (and spaces, '/', '&') ending with a colon, at the start of a line.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&]*[A-Z]):", re.MULTILINE)
_DEID = re.compile(r"_{3,}")

SKIP_REASONS = ("no_metadata", "view_not_selected", "missing_image", "missing_report", "unreadable_report",
                "no_section", "empty_section")


class MimicError(ValueError):
    """An input that cannot be ingested at all (missing file, wrong header, bad option)."""


def split_sections(report: str) -> dict[str, str]:
    """{lower-case header: its text} of a MIMIC report (text before the first header under "");
    "FINDINGS AND IMPRESSION:" counts as both."""
    report = report.replace("\r\n", "\n").replace("\r", "\n")
    heads = list(_HEADER.finditer(report))
    out: dict[str, str] = {}
    if not heads or heads[0].start() > 0:
        out[""] = report[: heads[0].start() if heads else len(report)].strip()
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(report)
        name = m.group(1).strip().lower()
        body = report[m.end() : end].strip()
        out[name] = f"{out[name]} {body}".strip() if name in out else body
    if "findings and impression" in out:
        for name in ("findings", "impression"):
            out.setdefault(name, out["findings and impression"])
    return out


def report_section(report: str, section: str) -> str | None:
    """The chosen section's text (whitespace as written), "" when present but empty, None when absent."""
    if section not in SECTIONS:
        raise MimicError(f"--section must be one of {', '.join(SECTIONS)}, got {section!r}")
    parts = split_sections(report)
    findings, impression = parts.get("findings"), parts.get("impression")
    if section == "findings":
        return findings
    if section == "impression":
        return impression
    if section == "findings-else-impression":
        return findings if findings else impression
    present = [t for t in (findings, impression) if t is not None]
    return " ".join(t for t in present if t) if present else None


class _Reports:
    """Report text by (subject_id, study_id) from a folder or MIMIC-CXR's reports zip."""

    def __init__(self, source: Path):
        self.source = source
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}
        if source.is_file():
            try:
                self._zip = zipfile.ZipFile(source)
            except zipfile.BadZipFile as e:
                raise MimicError(f"{source}: not a zip file ({e}); pass the reports folder or {REPORTS_ZIP}") from e
            # Index by the study-relative path, whatever folder prefix the archive uses.
            for name in self._zip.namelist():
                if name.endswith(".txt"):
                    self._names[self._key(name)] = name
        elif not source.is_dir():
            raise MimicError(f"{source}: no such reports folder or zip")
        else:
            self._base = source / "files" if (source / "files").is_dir() else source

    @staticmethod
    def _key(path: str) -> str:
        parts = path.replace("\\", "/").split("/")
        return "/".join(parts[-3:])  # pNN/pSUBJECT/sSTUDY.txt

    @staticmethod
    def relative(subject: str, study: str) -> str:
        return f"p{subject[:2]}/p{subject}/s{study}.txt"

    def read(self, subject: str, study: str) -> bytes | None:
        rel = self.relative(subject, study)
        if self._zip is not None:
            name = self._names.get(rel)
            return self._zip.read(name) if name is not None else None
        try:
            return (self._base / rel).read_bytes()
        except FileNotFoundError:
            return None


def _read_csv_gz(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a (gzipped) CSV as dicts, with their line number; the header must hold `required`."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        handle = opener(path, "rt", encoding="utf-8", newline="")
    except OSError as e:
        raise MimicError(f"{path}: cannot open ({e})") from e
    with handle:
        try:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise MimicError(f"{path}: cannot read ({e})") from e
        if missing:
            raise MimicError(f"{path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        try:
            yield from enumerate(reader, start=2)
        except (OSError, EOFError, gzip.BadGzipFile, csv.Error) as e:
            raise MimicError(f"{path}: unreadable after line {reader.line_num} ({e})") from e


def _labels(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    table = {}
    for _, row in _read_csv_gz(path, ("subject_id", "study_id")):
        table[(row["subject_id"], row["study_id"])] = {k: row.get(k, "") for k in CHEXPERT_LABELS if k in row}
    return table


def split_labels(values: Iterable[tuple[str, str]]) -> tuple[dict[str, float], list[str], str | None]:
    """(certain 1.0/0.0 labels, names labelled -1 (uncertain), the first name whose value is not 1, 0, -1 or
    blank) of (CheXpert label name, text) pairs; a blank label is not mentioned."""
    certain, uncertain = {}, []
    for name, value in values:
        v = value.strip()
        if not v:
            continue
        try:
            x = float(v)
        except ValueError:
            return certain, uncertain, name
        if x == -1.0:
            uncertain.append(name)
        elif x in (0.0, 1.0):
            certain[name] = x
        else:
            return certain, uncertain, name
    return certain, uncertain, None


def _projection(view: str) -> str:
    v = view.strip().upper()
    return "Frontal" if v in _FRONTAL else "Lateral" if v in _LATERAL else "unknown"


def ingest_mimic_cxr(root: str | os.PathLike, reports: str | os.PathLike | None = None, *,
                     section: str = "findings", views: Sequence[str] = ("PA", "AP"),
                     labels: str | os.PathLike | None = None, text_only: bool = False,
                     drop_deid: bool = False) -> IngestResult:
    """Join split, metadata, (labels,) images and reports into pairs (see the module docstring).

    `reports`: folder or zip (default: ROOT/mimic-cxr-reports.zip when present, else ROOT); `views`:
    ViewPosition values to keep; `labels`: a label CSV(.gz) (default: the first of LABEL_FILES in ROOT;
    "" for none). MimicError for a missing file or column, a bad option or an unreadable table.
    """
    root = Path(root)
    if section not in SECTIONS:
        raise MimicError(f"--section must be one of {', '.join(SECTIONS)}, got {section!r}")
    for name in (SPLIT_FILE, METADATA_FILE):
        if not (root / name).is_file():
            raise MimicError(f"{root / name}: not found (the MIMIC-CXR-JPG root holds {SPLIT_FILE} and {METADATA_FILE})")
    if reports is None:
        reports = root / REPORTS_ZIP if (root / REPORTS_ZIP).is_file() else root
    report_source = _Reports(Path(reports))
    label_path = None
    if labels is None:
        label_path = next((root / n for n in LABEL_FILES if (root / n).is_file()), None)
    elif str(labels):
        label_path = Path(labels)
        if not label_path.is_file():
            raise MimicError(f"{label_path}: label file not found")
    keep_views = {v.strip().upper() for v in views if v.strip()}
    if not keep_views:
        raise MimicError("--views selects no view")

    metadata = {row["dicom_id"]: row for _, row in _read_csv_gz(
        root / METADATA_FILE, ("dicom_id", "subject_id", "study_id", "ViewPosition"))}  # fmt: skip
    label_table = _labels(label_path) if label_path else None

    rows = []
    for line, row in _read_csv_gz(root / SPLIT_FILE, ("dicom_id", "study_id", "subject_id", "split")):
        split = _SPLIT_NAMES.get(row["split"].strip())
        if split is None:
            raise MimicError(f"{root / SPLIT_FILE} line {line}: split {row['split']!r} is not train, validate or test")
        rows.append((row["subject_id"], row["study_id"], row["dicom_id"], split))
    rows.sort()

    tally = SkipTally(limit=5)
    pairs: list[Pair] = []
    texts: dict[tuple[str, str], tuple[str | None, str]] = {}  # study -> (text or None, skip reason)
    reports_read = 0
    for subject, study, dicom, split in rows:
        record = f"subject {subject} study {study} image {dicom}"
        meta = metadata.get(dicom)
        if meta is None:
            tally.skip("no_metadata", record)
            continue
        view = (meta.get("ViewPosition") or "").strip().upper()
        if view not in keep_views:
            tally.skip("view_not_selected", record, view or "(empty)")
            continue
        rel_image = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        if not text_only and not (root / rel_image).is_file():
            tally.skip("missing_image", record, rel_image)
            continue
        key = (subject, study)
        if key not in texts:
            raw = report_source.read(subject, study)
            if raw is None:
                texts[key] = (None, "missing_report")
            else:
                reports_read += 1
                try:
                    body = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    texts[key] = (None, "unreadable_report")
                    log.warning("%s: report %s is not UTF-8 (%s)", record, _Reports.relative(subject, study), e)
                else:
                    chosen = report_section(body, section)
                    if chosen is not None and drop_deid:
                        chosen = _DEID.sub(" ", chosen)
                    text = normalize_report(chosen) if chosen is not None else None
                    texts[key] = (text or None, "no_section" if chosen is None else "empty_section")
        text, reason = texts[key]
        if text is None:
            tally.skip(reason, record, _Reports.relative(subject, study))
            continue
        label_row = label_table.get(key) if label_table is not None else None
        certain, uncertain, bad = split_labels((label_row or {}).items())
        if bad is not None:
            raise MimicError(f"{label_path} subject {subject} study {study}: label {bad} = {label_row[bad]!r} "
                             "is not 1.0, 0.0, -1.0 or blank")
        extra: dict[str, Any] = {"subject_id": subject, "view": view}
        for k in ("StudyDate", "StudyTime", "Rows", "Columns"):
            if meta.get(k):
                extra[k] = meta[k]
        if uncertain:
            extra["uncertain_labels"] = sorted(uncertain)
        if label_table is not None and label_row is None:
            extra["labels_missing"] = True
        pairs.append(Pair(id=dicom, study_id=study, image=rel_image, projection=_projection(view), text=text,
                          split=split, labels=certain if label_row is not None else None,
                          source="mimic-cxr", extra=extra))  # fmt: skip

    projections = Counter(p.projection for p in pairs)
    summary = {
        "layout": "mimic-cxr-jpg",
        "section": section,
        "split": "official",
        "views": sorted(keep_views),
        "considered": len(rows),
        "reports_read": reports_read,
        "studies_read": len({(s, t) for s, t, _, _ in rows}),
        "pairs_written": len(pairs),
        "skipped": {r: tally.skipped[r] for r in SKIP_REASONS if tally.skipped[r]},
        "splits": split_counts(pairs),
        "studies": {s: len({p.study_id for p in pairs if p.split == s}) for s in SPLITS},
        "projections": {p: projections.get(p, 0) for p in PROJECTIONS},
        "labels": str(label_path) if label_path else None,
        "text_normalization": "whitespace collapsed; de-identification mark " + ("___ removed" if drop_deid else "___ kept"),
        "inputs": {"root": str(root), "reports": str(reports), "text_only": text_only},
        "skipped_examples": {r: tally.examples[r] for r in sorted(tally.examples)},
    }
    if len(pairs) + sum(summary["skipped"].values()) != len(rows):  # a bug here, never the input
        raise RuntimeError(f"MIMIC-CXR counts do not reconcile: {summary}")
    return IngestResult(pairs, summary)


def cli_main(args: Any) -> int:
    """`pertvl data mimic-cxr`: ingest, then write OUT/pairs.jsonl and OUT/summary.json (2 on bad input)."""
    try:
        result = ingest_mimic_cxr(
            args.root, args.reports, section=args.section, views=args.views.split(","), labels=args.labels,
            text_only=args.text_only, drop_deid=args.drop_deid)  # fmt: skip
    except MimicError as e:
        log.error("pertvl data mimic-cxr: %s", e)
        return 2
    out = Path(args.out)
    write_pairs(out / "pairs.jsonl", result.pairs)
    write_json(out / "summary.json", result.summary)
    s = result.summary
    log.info("mimic-cxr %s -> %s: considered=%d pairs_written=%d skipped=%s splits=%s studies=%s",
             args.root, out, s["considered"], s["pairs_written"], s["skipped"], s["splits"], s["studies"])  # fmt: skip
    return 0


def _gz_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:  # fast: a test/bench fixture
        f.write(buf.getvalue())


def mimic_report_text(findings: str, impression: str | None = None, *, indication: str = "___M with cough") -> str:
    """A report in MIMIC-CXR's sectioned format (headers in capitals ending with a colon)."""
    parts = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", "",
             f" INDICATION:  {indication}", "", " TECHNIQUE:  Chest PA and lateral", "", " COMPARISON:  None.", "",
             " FINDINGS:", "", f" {findings}", ""]  # fmt: skip
    if impression:
        parts += [" IMPRESSION:", "", f" {impression}", ""]
    return "\n".join(parts)


@dataclass(frozen=True)
class TreeStudy:
    """One study of a generated MIMIC-CXR-JPG tree."""

    subject_id: str
    study_id: str
    split: str  # train | validate | test
    report: str | None  # the .txt content (None: no report file)
    images: tuple[tuple[str, str, bytes | None], ...]  # (dicom_id, ViewPosition, JPEG bytes or None: not on disk)
    labels: dict[str, str] = field(default_factory=dict)  # CheXpert label -> "1.0" / "0.0" / "-1.0" / ""


def write_mimic_tree(root: str | os.PathLike, studies: Sequence[TreeStudy], *,
                     reports_zip: bool = False) -> Path:
    """Write `studies` in the MIMIC-CXR-JPG v2 layout under `root` (CSV.gz tables, files/ tree,
    reports as .txt files or mimic-cxr-reports.zip); returns root."""
    root = Path(root)
    split_rows, meta_rows, label_rows = [], [], []
    root.mkdir(parents=True, exist_ok=True)
    archive = zipfile.ZipFile(root / REPORTS_ZIP, "w", zipfile.ZIP_STORED) if reports_zip else None
    try:
        for st in studies:
            folder = root / "files" / f"p{st.subject_id[:2]}" / f"p{st.subject_id}"
            if st.report is not None:
                rel = f"files/p{st.subject_id[:2]}/p{st.subject_id}/s{st.study_id}.txt"
                if archive is not None:
                    archive.writestr(rel, st.report.encode("utf-8"))
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes(st.report.encode("utf-8"))
            for dicom, view, jpeg in st.images:
                split_rows.append((dicom, st.study_id, st.subject_id, st.split))
                meta_rows.append((dicom, st.subject_id, st.study_id, "CHEST (PA AND LAT)", view, 3056, 2544,
                                  "21800506", "213014.531", "Chest 2 Views", "postero-anterior", "Erect"))  # fmt: skip
                if jpeg is not None:
                    (folder / f"s{st.study_id}").mkdir(parents=True, exist_ok=True)
                    (folder / f"s{st.study_id}" / f"{dicom}.jpg").write_bytes(jpeg)
            label_rows.append((st.subject_id, st.study_id, *(st.labels.get(k, "") for k in CHEXPERT_LABELS)))
    finally:
        if archive is not None:
            archive.close()
    _gz_csv(root / SPLIT_FILE, ("dicom_id", "study_id", "subject_id", "split"), split_rows)
    _gz_csv(root / METADATA_FILE, ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                   "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                                   "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                                   "PatientOrientationCodeSequence_CodeMeaning"), meta_rows)  # fmt: skip
    _gz_csv(root / LABEL_FILES[0], ("subject_id", "study_id", *CHEXPERT_LABELS), label_rows)
    return root


def phantoms_to_mimic_tree(corpus: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite a phantom corpus as a MIMIC-CXR-JPG tree (one study per phantom: a PA JPEG, its
    report as the FINDINGS section, its labels and split; reports zipped), which `pertvl data
    mimic-cxr` reads back to the same texts, labels and splits."""
    from PIL import Image

    from pertvl.data.records import read_pairs

    corpus = Path(corpus)
    to_official = {v: k for k, v in _SPLIT_NAMES.items()}
    studies = []
    for i, pair in enumerate(read_pairs(corpus / "pairs.jsonl")):
        buf = io.BytesIO()
        Image.open(corpus / pair.image).convert("L").save(buf, format="JPEG", quality=95)
        subject, study = f"1{i // 3:07d}", f"5{i:07d}"  # a few studies per subject, as in MIMIC
        labels = {k: f"{v:.1f}" for k, v in (pair.labels or {}).items() if k in CHEXPERT_LABELS}
        studies.append(TreeStudy(subject, study, to_official.get(pair.split, pair.split),
                                 mimic_report_text(pair.text, indication="___ year old with dyspnea"),
                                 ((f"{pair.id.replace('.', '-')}", "PA", buf.getvalue()),), labels))  # fmt: skip
    return write_mimic_tree(out, studies, reports_zip=True)
