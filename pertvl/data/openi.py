"""Open-I (Indiana University chest X-ray collection) ingestion: three layouts -> pairs.jsonl.

- ``xml``: the NLM release, a folder of ecgen-radiology ``<n>.xml`` files (or the folder above its
  ``ecgen-radiology/``), parsed with defusedxml (entity declarations refused). Study id from
  ``<uId id="CXR1">``, text from ``<AbstractText Label="FINDINGS|IMPRESSION">``, one pair per
  ``<parentImage id=...>`` with image file ``id + ".png"``.
- ``kaggle``: ``indiana_reports.csv`` joined on uid with ``indiana_projections.csv``. Study and pair ids
  are the NLM release's (``CXR<uid>``, ``CXR<file stem>``), so both layouts give the same study split.
- ``r2gen``: ``annotation.json`` = ``{"train"|"val"|"test": [{id, report, image_path[], split}]}``;
  ``report`` is the findings, the list a study sits in its given split.

Projection: per image in the Kaggle layout; for XML looked up by file name in ``--projections`` if
given; R2Gen's renamed images carry none ("unknown"). Text: `normalize_report` only; a pair whose
section is empty is skipped as ``empty_text``.

Counting (`Tally`): report records not read are skipped at report level (`REPORT_LEVEL_REASONS`),
image entries read (``images_read``) become a pair or are skipped at image level, so
``pairs_written + sum(skipped_by_level["image"]) == images_read`` and
``pairs_written + sum(skipped) == considered == images_read + sum(skipped_by_level["report"])``.
``summary["text_overlap"]``: held-out pairs and texts identical to a training report (overlap.py).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from pertvl.data.overlap import text_overlap
from pertvl.data.records import (
    DEFAULT_SPLIT_FRACTIONS,
    PROJECTIONS,
    SPLITS,
    IngestResult,
    Pair,
    assign_paper_split,
    assign_splits,
    split_counts,
    write_json,
    write_pairs,
)
from pertvl.data.text import normalize_report

log = logging.getLogger(__name__)

LAYOUTS = ("xml", "kaggle", "r2gen")
SECTIONS = ("findings", "impression", "both")
SPLIT_MODES = ("study", "paper", "given")
PAPER_N_TRAIN = 6000  # the paper's row-order split: 6,000 train, the remaining 469 test
ACCEPTED_LAYOUTS = ("accepted layouts: xml (a folder of NLM ecgen-radiology *.xml files), kaggle "
                    "(indiana_reports.csv, with indiana_projections.csv), r2gen (annotation.json holding "
                    "train/val/test lists)")
REPORT_LEVEL_REASONS = ("unreadable_record", "duplicate_record", "no_images")
MAX_EXAMPLES = 20  # problem records named per reason in summary.json (all are in the log)

_UID = re.compile(r"[0-9]+")
_CXR_UID = re.compile(r"^CXR([0-9]+)(?:_|$)")
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_REPORT_COLUMNS = ("uid", "findings", "impression")
_PROJECTION_COLUMNS = ("uid", "filename", "projection")


class OpenIError(ValueError):
    """An input that cannot be ingested at all (wrong layout, missing file, bad option)."""


@dataclass
class _Image:
    id: str
    rel_path: str  # path of the image file relative to --images
    projection: str  # Frontal | Lateral | unknown


@dataclass
class _Report:
    study_id: str
    name: str  # how log messages name the record (file, CSV line, JSON entry)
    findings: str | None
    impression: str | None
    images: list[_Image]
    extra: dict[str, Any] = field(default_factory=dict)
    split: str | None = None  # the split the layout gives (R2Gen only)


@dataclass
class Tally:
    """Counts of what was read and why records were skipped (see the module docstring)."""

    reports_read: int = 0
    reports_with_text: int = 0
    images_read: int = 0
    skipped: dict[str, Counter] = field(default_factory=lambda: {"report": Counter(), "image": Counter()})
    examples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, record: str, detail: str = "", *, level: int = logging.WARNING) -> None:
        kind = "report" if reason in REPORT_LEVEL_REASONS else "image"
        self.skipped[kind][reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"record": record, "detail": detail})
        log.log(level, "skipped %s (%s)%s", record, reason, f": {detail}" if detail else "")

    def skip_image_entry(self, reason: str, record: str, detail: str = "", *, level: int = logging.WARNING) -> None:
        """Count an image entry that a reader rejects before it reaches a report."""
        self.images_read += 1
        self.skip(reason, record, detail, level=level)


def detect_layout(reports: str | os.PathLike, fmt: str = "auto") -> tuple[str, Path]:
    """(layout, path) of `reports`: the folder holding the XML files for xml, `reports` itself
    otherwise; `fmt` "auto" detects. OpenIError, listing the accepted layouts, when it is none."""
    if fmt not in ("auto", *LAYOUTS):
        raise OpenIError(f"unknown --format {fmt!r}; expected auto or one of {', '.join(LAYOUTS)}")
    path = Path(reports)
    if not path.exists():
        raise OpenIError(f"--reports {path} does not exist; {ACCEPTED_LAYOUTS}")
    if path.is_dir():
        folder = _xml_folder(path)
        if folder is not None and fmt in ("auto", "xml"):
            return "xml", folder
        if fmt in ("kaggle", "r2gen"):
            raise OpenIError(f"--format {fmt} needs a file, {path} is a folder; {ACCEPTED_LAYOUTS}")
        raise OpenIError(f"{path} is a folder without *.xml report files (nor an ecgen-radiology/ folder "
                         f"of them), not an Open-I layout; {ACCEPTED_LAYOUTS}")
    suffix = path.suffix.lower()
    if fmt == "kaggle" or (fmt == "auto" and suffix == ".csv"):
        _csv_header(path, _REPORT_COLUMNS)  # raises naming the file if it is not a reports CSV
        return "kaggle", path
    if fmt == "r2gen" or (fmt == "auto" and suffix == ".json"):
        _load_r2gen(path)  # raises naming the file if it is not an R2Gen annotation
        return "r2gen", path
    raise OpenIError(f"{path} is not an Open-I layout"
                     f"{' (--format xml needs a folder)' if fmt == 'xml' else ''}; {ACCEPTED_LAYOUTS}")


def _xml_folder(path: Path) -> Path | None:
    for folder in (path, path / "ecgen-radiology"):
        if folder.is_dir() and any(f.is_file() for f in folder.glob("*.xml")):
            return folder
    return None


def _xml_problem(data: bytes) -> str | None:
    """Why an XML file's bytes are not text in the encoding it declares (UTF-8 by default), or None."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM: expat decodes it
        return None
    m = _XML_ENCODING.match(data)
    encoding = m.group(1).decode("ascii") if m else "utf-8"
    try:
        data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except LookupError:
        return f"declares unknown encoding {encoding!r}"
    except UnicodeDecodeError as e:
        return (f"not {encoding} text: byte 0x{data[e.start]:02x} at offset {e.start} "
                f"cannot be decoded ({e.reason})")
    return None


def _read_xml_report(path: Path, projection_of: dict[str, str], tally: Tally) -> _Report | None:
    """Parse one ecgen-radiology file; count it as unreadable (naming the file) when it cannot be."""
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as e:
        tally.skip("unreadable_record", name, f"cannot read {path}: {e.strerror or e}")
        return None
    problem = _xml_problem(data)
    if problem is not None:
        tally.skip("unreadable_record", name, f"{path}: {problem}")
        return None
    try:
        root = SafeET.fromstring(data)
    except DefusedXmlException as e:
        tally.skip("unreadable_record", name,
                   f"{path}: refused: {type(e).__name__} (XML entity/DTD declarations can expand "
                   f"without bound, e.g. 'billion laughs'; the NLM files have none): {e}")
        return None
    except SafeET.ParseError as e:
        tally.skip("unreadable_record", name, f"{path}: malformed XML: {e}")
        return None

    uid_el = root.find(".//uId")
    study_id = (uid_el.get("id") or "").strip() if uid_el is not None else ""
    if not study_id:
        tally.skip("unreadable_record", name, f'{path}: no <uId id="..."> element with a study id')
        return None
    sections: dict[str, list[str]] = {"FINDINGS": [], "IMPRESSION": []}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        if label in sections:
            sections[label].append("".join(el.itertext()))
    images: list[_Image] = []
    for i, el in enumerate(root.iter("parentImage")):
        image_id = (el.get("id") or "").strip()
        if not image_id:  # an image-level problem: the report goes on
            tally.skip_image_entry("unreadable_image_record", f"{name} parentImage #{i + 1}", "no id attribute")
            continue
        images.append(_Image(image_id, image_id + ".png", _xml_projection(image_id, projection_of)))
    m = _CXR_UID.match(study_id)
    findings, impression = (" ".join(sections[k]) if sections[k] else None for k in sections)
    return _Report(study_id, name, findings, impression, images, {"uid": m.group(1)} if m else {})


def _xml_projection(image_id: str, projection_of: dict[str, str]) -> str:
    """Projection of an NLM image from the Kaggle projections table, by file name; else unknown."""
    if not projection_of:
        return "unknown"
    stem = image_id[3:] if image_id.startswith("CXR") else image_id
    stems = [stem]
    # CXR1's NLM images alone carry an extra "1_" (CXR1_1_IM-0001-3001 is 1_IM-0001-3001.dcm.png).
    m = re.fullmatch(r"([0-9]+)_[0-9]+_(IM-.+)", stem)
    if m:
        stems.append(f"{m.group(1)}_{m.group(2)}")
    for key in [f"{s}{ext}" for s in stems for ext in (".dcm.png", ".png")] + [f"{image_id}.png"]:
        if key in projection_of:
            return projection_of[key]
    return "unknown"


def _iter_xml(folder: Path, projections: Path | None, tally: Tally) -> Iterator[_Report]:
    projection_of: dict[str, str] = {}
    if projections is not None:
        for _line, row, problem in _csv_rows(projections, _PROJECTION_COLUMNS):
            if problem is None and (row.get("filename") or "").strip():
                projection_of[row["filename"].strip()] = _projection_name(row.get("projection"))
        log.info("projections of the XML images looked up by file name in %s (%d files)",
                 projections, len(projection_of))
    # 2.xml before 10.xml: the output follows the release's numbering
    files = sorted((f for f in folder.glob("*.xml") if f.is_file()),
                   key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"([0-9]+)", f.name)])
    from tqdm import tqdm  # a bar on a terminal: large folders take a while

    for path in tqdm(files, desc="openi xml", unit="file", disable=None, leave=False):
        report = _read_xml_report(path, projection_of, tally)
        if report is not None:
            yield report


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str], str | None]]:
    """(line number, row, problem or None) of each data row of a CSV file. Non-UTF-8 bytes make only
    their own row unreadable (surrogateescape); OpenIError when the file or its header is unusable."""
    with _open_csv(path) as f:
        reader = csv.DictReader(f)
        header = _check_header(path, reader.fieldnames, required)
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            if None in row:
                yield line, row, f"{len(header) + len(row[None])} fields, the header has {len(header)}"
                continue
            bad = next((k for k, v in row.items()
                        if v is not None and any("\udc80" <= ch <= "\udcff" for ch in v)), None)
            if bad is not None:
                yield line, row, f"column {bad!r} holds bytes that are not UTF-8"
                continue
            yield line, {k: (v if v is not None else "") for k, v in row.items()}, None


def _open_csv(path: Path) -> Any:
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise OpenIError(f"cannot read {path}: {e.strerror or e}") from e


def _check_header(path: Path, fieldnames: Any, required: tuple[str, ...]) -> list[str]:
    header = [h.strip() for h in (fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise OpenIError(f"{path}: header {header or '(empty file)'} lacks column(s) {missing}; "
                         f"not the Kaggle layout ({ACCEPTED_LAYOUTS})")
    return header


def _csv_header(path: Path, required: tuple[str, ...]) -> list[str]:
    """The stripped header of a CSV file; OpenIError naming the file if it lacks `required`."""
    with _open_csv(path) as f:
        return _check_header(path, next(csv.reader(f), None), required)


def _projection_name(value: str | None) -> str:
    v = (value or "").strip().lower()
    return {"frontal": "Frontal", "lateral": "Lateral"}.get(v, "unknown")


def _kaggle_image_id(uid: str, filename: str) -> str:
    """The NLM release's image id: CXR<file stem> ("2_IM-0652-1001.dcm.png" -> "CXR2_IM-0652-1001")."""
    stem = PurePosixPath(filename.replace("\\", "/")).name
    for suffix in (".png", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return f"CXR{stem}" if stem.startswith(f"{uid}_") else f"CXR{uid}_{stem}"


def _iter_kaggle(reports: Path, projections: Path, tally: Tally) -> Iterator[_Report]:
    by_uid: dict[str, _Report] = {}
    for line, row, problem in _csv_rows(reports, _REPORT_COLUMNS):
        uid = (row.get("uid") or "").strip()
        name = f"{reports.name} line {line}" + (f" (uid {uid!r})" if uid else "")
        if problem is not None:
            tally.skip("unreadable_record", name, problem)
        elif not uid:
            tally.skip("unreadable_record", name, "missing uid")
        elif not _UID.fullmatch(uid):
            tally.skip("unreadable_record", name, "invalid uid: expected a non-negative integer")
        elif uid in by_uid:
            tally.skip("duplicate_record", name, f"uid {uid} already read from {by_uid[uid].name}")
        else:
            by_uid[uid] = _Report(f"CXR{uid}", name, row.get("findings"), row.get("impression"), [],
                                  {"uid": uid})
    for line, row, problem in _csv_rows(projections, _PROJECTION_COLUMNS):
        uid = (row.get("uid") or "").strip()
        filename = (row.get("filename") or "").strip()
        name = f"{projections.name} line {line}" + (f" ({filename})" if filename else "")
        if problem is None and not _UID.fullmatch(uid):
            problem = "missing uid" if not uid else "invalid uid: expected a non-negative integer"
        if problem is None and not filename:
            problem = "missing filename"
        if problem is not None:
            tally.skip_image_entry("unreadable_image_record", name, problem)
        elif uid not in by_uid:
            tally.skip_image_entry("no_report", name, f"uid {uid} matches no report read from {reports.name}",
                       level=logging.DEBUG)
        else:
            image = _Image(_kaggle_image_id(uid, filename), filename, _projection_name(row.get("projection")))
            by_uid[uid].images.append(image)  # counted in images_read by _build_pairs
    yield from by_uid.values()


def _load_r2gen(path: Path) -> dict[str, list[Any]]:
    """Load an R2Gen annotation; raise OpenIError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise OpenIError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise OpenIError(f"{path}: not UTF-8 text (byte offset {e.start}); {ACCEPTED_LAYOUTS}") from e
    except json.JSONDecodeError as e:
        raise OpenIError(f"{path}: not JSON ({e}); {ACCEPTED_LAYOUTS}") from e
    if not isinstance(data, dict) or not any(isinstance(data.get(s), list) for s in SPLITS):
        raise OpenIError(f"{path}: JSON without train/val/test lists, not an R2Gen annotation; "
                         f"{ACCEPTED_LAYOUTS}")
    bad = [s for s in SPLITS if s in data and not isinstance(data[s], list)]
    if bad:
        raise OpenIError(f"{path}: {bad} must be lists of studies")
    return data


def _iter_r2gen(path: Path, tally: Tally) -> Iterator[_Report]:
    data = _load_r2gen(path)
    seen: dict[str, str] = {}
    for split in SPLITS:
        for i, entry in enumerate(data.get(split) or []):
            name = f"{path.name} {split}[{i}]"
            if not isinstance(entry, dict):
                tally.skip("unreadable_record", name, f"expected an object, got {type(entry).__name__}")
                continue
            study_id, report, paths = entry.get("id"), entry.get("report"), entry.get("image_path")
            if isinstance(study_id, str) and study_id.strip():
                study_id = study_id.strip()
                name += f" (id {study_id!r})"
            problem = ("missing id" if not (isinstance(study_id, str) and study_id)
                       else "missing or non-text report" if not isinstance(report, str)
                       else "image_path is not a list" if not isinstance(paths, list) else None)
            if problem is not None:
                tally.skip("unreadable_record", name, problem)
                continue
            if study_id in seen:
                tally.skip("duplicate_record", name, f"id already read from {seen[study_id]}")
                continue
            seen[study_id] = name
            images = []
            for j, p in enumerate(paths):
                if not isinstance(p, str) or not p.strip():
                    tally.skip_image_entry("unreadable_image_record", f"{name} image_path[{j}]",
                                           "not a file path")
                    continue
                rel = p.strip().replace("\\", "/")
                image_id = str(PurePosixPath(rel).with_suffix("")).replace("/", "_")
                if not image_id.startswith(study_id):
                    image_id = f"{study_id}_{image_id}"
                images.append(_Image(image_id, rel, "unknown"))
            m = _CXR_UID.match(study_id)
            yield _Report(study_id=study_id, name=name, findings=report, impression=None,
                          images=images, extra={"uid": m.group(1)} if m else {}, split=split)


def _section_text(report: _Report, section: str, drop_deid: bool) -> str:
    findings = normalize_report(report.findings, drop_deid=drop_deid)
    impression = normalize_report(report.impression, drop_deid=drop_deid)
    if section == "findings":
        return findings
    if section == "impression":
        return impression
    return " ".join(t for t in (findings, impression) if t)


def _build_pairs(reports: Iterator[_Report], *, layout: str, section: str, images_dir: Path | None,
                 check_images: bool, drop_deid: bool, tally: Tally) -> list[Pair]:
    pairs: list[Pair] = []
    seen_images: dict[str, str] = {}
    seen_studies: dict[str, str] = {}
    for report in reports:
        if report.study_id in seen_studies:  # e.g. two XML files with the same uId
            tally.skip("duplicate_record", report.name,
                       f"study {report.study_id} already read from {seen_studies[report.study_id]}")
            continue
        seen_studies[report.study_id] = report.name
        tally.reports_read += 1
        text = _section_text(report, section, drop_deid)
        tally.reports_with_text += bool(text)
        if not report.images:
            tally.skip("no_images", report.name, "the report lists no image", level=logging.INFO)
            continue
        for image in report.images:
            tally.images_read += 1
            record = f"{report.name} image {image.id}"
            if image.id in seen_images:
                tally.skip("duplicate_image", record, f"image id already used by {seen_images[image.id]}")
                continue
            seen_images[image.id] = report.name
            if not text:
                tally.skip("empty_text", record, f"empty {section}", level=logging.DEBUG)
                continue
            path = images_dir / image.rel_path if images_dir is not None else Path(image.rel_path)
            if check_images and not path.is_file():
                tally.skip("missing_image", record, f"no file {path}", level=logging.DEBUG)
                continue
            stored = path.as_posix() if images_dir is not None else image.rel_path
            pairs.append(Pair(image.id, report.study_id, stored, image.projection, text,
                              split=report.split or "train", source=f"openi-{layout}",
                              extra=dict(report.extra)))
    return pairs


def ingest_openi(reports: str | os.PathLike, projections: str | os.PathLike | None = None, fmt: str = "auto",
                 images: str | os.PathLike | None = None, text_only: bool = False, section: str = "findings",
                 split: str | None = None,
                 split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                 drop_deid: bool = False, seed: int = 0) -> IngestResult:
    """Read an Open-I release in any of its three layouts into pairs with splits assigned (the options
    are `pertvl data openi`'s; `projections` is looked for beside `reports` for kaggle; Pair.image is the
    absolute path under `images`, the layout's path without it; `split` None: "given" for r2gen, else
    "study"). OpenIError when the input is not a layout or an option does not fit it."""
    if section not in SECTIONS:
        raise OpenIError(f"unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
    if split is not None and split not in SPLIT_MODES:
        raise OpenIError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_MODES)}")
    try:
        assign_splits([], tuple(split_fractions), seed)  # validates the fractions only
    except (ValueError, TypeError) as e:
        raise OpenIError(str(e)) from e
    if images is None and not text_only:
        raise OpenIError("pass --images DIR (the folder with the image files, each is checked to exist) "
                         "or --text-only (write the pairs without checking the images)")
    images_dir = Path(images).resolve() if images is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise OpenIError(f"--images {images} is not a folder")

    layout, source = detect_layout(reports, fmt)
    split = split or ("given" if layout == "r2gen" else "study")
    if split == "given" and layout != "r2gen":
        raise OpenIError(f"the {layout} layout gives no split; use --split study or --split paper")
    if layout == "r2gen" and section != "findings":
        raise OpenIError(f"the r2gen layout holds only the findings (its `report`); --section {section} "
                         "needs the xml or kaggle layout")
    projections_path = _projections_path(layout, source, projections)

    tally = Tally()
    if layout == "xml":
        records = _iter_xml(source, projections_path, tally)
    elif layout == "kaggle":
        records = _iter_kaggle(source, projections_path, tally)
    else:
        records = _iter_r2gen(source, tally)
    pairs = _build_pairs(records, layout=layout, section=section, images_dir=images_dir,
                         check_images=not text_only, drop_deid=drop_deid, tally=tally)

    if split == "study":
        assign_splits(pairs, tuple(split_fractions), seed)
    elif split == "paper":
        if len(pairs) <= PAPER_N_TRAIN:
            log.warning("paper split: only %d pairs, so the test split is empty (the paper had 6,469)",
                        len(pairs))
        assign_paper_split(pairs, PAPER_N_TRAIN)

    summary = _summary(pairs, tally, layout=layout, section=section, split=split, inputs={
        "reports": str(Path(reports).resolve()),
        "xml_folder": str(source.resolve()) if layout == "xml" else None,
        "projections": str(projections_path.resolve()) if projections_path else None,
        "images": str(images_dir) if images_dir else None,
        "format": fmt,
        "text_only": text_only,
        "drop_deid": drop_deid,
        "split": split,
        "split_fractions": list(split_fractions) if split == "study" else None,
        "seed": seed,
    })
    return IngestResult(pairs, summary)


def _projections_path(layout: str, source: Path, projections: str | os.PathLike | None) -> Path | None:
    """The projections table to use (header checked), or None; OpenIError when it does not fit."""
    if projections is not None:
        path = Path(projections)
        if layout == "r2gen":
            raise OpenIError("--projections does not apply to the r2gen layout (its images carry no "
                             "file names that a projections table could match)")
        if not path.is_file():
            raise OpenIError(f"--projections {path} is not a file")
    elif layout == "kaggle":
        path = source.parent / "indiana_projections.csv"
        if not path.is_file():
            raise OpenIError(f"the kaggle layout needs --projections indiana_projections.csv (uid, filename, "
                             f"projection); none given and {path} does not exist")
    else:
        return None
    _csv_header(path, _PROJECTION_COLUMNS)
    return path


def _summary(pairs: list[Pair], tally: Tally, *, layout: str, section: str, split: str,
             inputs: dict[str, Any]) -> dict[str, Any]:
    by_level = {k: dict(sorted(v.items())) for k, v in tally.skipped.items()}
    skipped = dict(sorted((tally.skipped["report"] + tally.skipped["image"]).items()))
    studies = {s: len({p.study_id for p in pairs if p.split == s}) for s in SPLITS}
    projections = Counter(p.projection for p in pairs)
    summary = {
        "layout": layout,
        "section": section,
        "split": split,
        "reports_read": tally.reports_read,
        "reports_with_text": tally.reports_with_text,
        "images_read": tally.images_read,
        "pairs_written": len(pairs),
        "skipped": skipped,
        "skipped_by_level": by_level,
        "considered": tally.images_read + sum(tally.skipped["report"].values()),
        "splits": split_counts(pairs),
        "studies": studies,
        "projections": {p: projections.get(p, 0) for p in PROJECTIONS},
        "text_normalization": "whitespace collapsed; de-identification token "
        + ("XXXX removed" if inputs["drop_deid"] else "XXXX kept"),
        "inputs": inputs,
        "skipped_examples": {r: tally.examples[r] for r in sorted(tally.examples)},
        "text_overlap": text_overlap(pairs),
    }
    if len(pairs) + sum(skipped.values()) != summary["considered"]:  # a bug in this module, never the input
        raise RuntimeError(f"Open-I counts do not reconcile: {summary}")
    return summary


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise OpenIError(f"--split-fractions must be three comma-separated numbers train,val,test; got {text!r}")
    return values  # type: ignore[return-value]


def cli_main(args: Any) -> int:
    """`pertvl data openi`: OUT/pairs.jsonl and OUT/summary.json; 2 when the input cannot be ingested."""
    try:
        result = ingest_openi(args.reports, projections=args.projections, fmt=args.format, images=args.images,
                              text_only=args.text_only, section=args.section, split=args.split,
                              split_fractions=_parse_fractions(args.split_fractions),
                              drop_deid=args.drop_deid, seed=args.seed)
    except OpenIError as e:
        log.error("pertvl data openi: %s", e)
        return 2
    out = Path(args.out)
    write_pairs(out / "pairs.jsonl", result.pairs)
    write_json(out / "summary.json", result.summary)
    s = result.summary
    print("held-out text seen in training: " + "; ".join(
        f"{split} {o['pairs_in_train']} of {o['pairs']} pairs ({o['texts_in_train']} of {o['texts']} distinct "
        "cleaned texts)" for split, o in s["text_overlap"].items()))
    log.info("openi %s -> %s: reports_read=%d images_read=%d pairs_written=%d skipped=%s splits=%s "
             "studies=%s projections=%s", s["layout"], out, s["reports_read"], s["images_read"],
             s["pairs_written"], s["skipped"], s["splits"], s["studies"], s["projections"])
    return 0
