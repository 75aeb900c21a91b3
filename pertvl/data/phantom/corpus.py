"""The corpus writer: `pertvl data phantom` (images, pairs.jsonl, labels.csv, summary.json, NLI files,
preview), in parallel and byte-reproducible. See pertvl.data.phantom for the files and conventions."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pertvl import __version__
from pertvl.data.phantom.findings import (
    CHEXPERT_OF_TYPE,
    FINDING_TYPES,
    MODELED_LABELS,
    NLI_LABELS,
    Finding,
    chexpert_labels,
    sample_findings,
)
from pertvl.data.phantom.language import compose_report, make_nli_items
from pertvl.data.phantom.render import MAX_SIZE, MIN_SIZE, PNG_COMPRESS_LEVEL, encode_png, render_phantom
from pertvl.data.records import SPLITS, Pair, assign_splits, split_counts, write_pairs
from pertvl.files import atomic_write_bytes, atomic_write_text, write_json

log = logging.getLogger(__name__)

GENERATOR_VERSION = "pertvl-phantom/1"

CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices")

NLI_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}


def phantom_id(seed: int, index: int) -> str:
    """The pair id (and PNG stem) of phantom `index` of corpus `seed`; key-safe (no dots)."""
    return f"phantom-s{seed}-{index:06d}"


@dataclass(frozen=True)
class _Made:
    index: int
    findings: list[dict[str, Any]]
    text: str
    nli: list[dict[str, str]]
    render_s: float
    write_s: float


def render_ref(seed: int, index: int, size: int) -> dict[str, Any]:
    """What re-creates a phantom's rendering generator and pixel grid (extra["render"] of its pair):
    pertvl.data.phantom.grounding reads it to draw the findings' masks."""
    return {"generator": GENERATOR_VERSION, "seed": seed, "index": index, "size": size}


def _streams(seed: int, index: int) -> list[np.random.Generator]:
    """The independent generators of phantom `index`: findings, pixels, report, NLI."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed, spawn_key=(index,)).spawn(4)]


def _make_range(task: tuple[int, int, int, int, str, bool]) -> list[_Made]:
    """Worker: render, encode and write phantoms start..stop-1; return their records."""
    seed, start, stop, size, images_dir, nli = task
    out = []
    for i in range(start, stop):
        t0 = time.perf_counter()
        r_find, r_pix, r_text, r_nli = _streams(seed, i)
        findings = sample_findings(r_find)
        img = render_phantom(findings, size, r_pix)
        sentences = compose_report(findings, r_text)
        png = encode_png(img)
        t1 = time.perf_counter()
        pid = phantom_id(seed, i)
        atomic_write_bytes(Path(images_dir) / f"{pid}.png", png)
        items = [it.to_json() for it in make_nli_items(sentences, findings, r_nli, pid)] if nli else []
        out.append(_Made(i, [f.to_json() for f in findings], " ".join(s.text for s in sentences), items,
                         t1 - t0, time.perf_counter() - t1))
    return out


def _validate(n: int, seed: int, size: int, workers: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive number of phantoms, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size must be {MIN_SIZE}..{MAX_SIZE} pixels, got {size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers!r}")


def _labels_csv(pairs: Sequence[Pair]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CHEXPERT_COLUMNS)
    for p in pairs:
        labels = p.labels or {}
        row = {"Path": p.image, "Sex": "", "Age": "", "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
        row.update({name: f"{labels[name]:.1f}" if name in labels else "" for name in CHEXPERT_COLUMNS[5:]})
        w.writerow([row[c] for c in CHEXPERT_COLUMNS])
    return buf.getvalue()


def _preview_indices(made: Sequence[_Made], k: int = 16) -> list[int]:
    """Up to k phantoms for the contact sheet: a normal one and one showing each finding type first."""
    chosen: list[int] = []
    for want in ([], *([t] for t in FINDING_TYPES)):
        chosen += [m.index for m in made if [f["type"] for f in m.findings] == want][:1]
    chosen += [m.index for m in made if m.index not in chosen]
    return chosen[:k]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return [*lines, cur] if cur else lines


def write_preview(out: Path, made: Sequence[_Made], seed: int, tile: int = 224, cols: int = 4) -> Path:
    """A contact sheet (preview.png): a grid of phantoms, each captioned with its true findings."""
    idx = _preview_indices(made)
    by_index = {m.index: m for m in made}
    font = ImageFont.load_default()
    cap_h = 40
    rows = math.ceil(len(idx) / cols)
    ncols = min(cols, len(idx))
    sheet = Image.new("L", (ncols * tile, rows * (tile + cap_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(idx):
        r, c = divmod(j, cols)
        x0, y0 = c * tile, r * (tile + cap_h)
        with Image.open(out / "images" / f"{phantom_id(seed, i)}.png") as im:
            sheet.paste(im.convert("L").resize((tile, tile), Image.Resampling.LANCZOS), (x0, y0))
        fs = [Finding.from_json(f) for f in by_index[i].findings]
        caption = f"#{i}: " + ("; ".join(f.caption() for f in fs) if fs else "normal")
        for li, line in enumerate(_wrap(draw, caption, font, tile - 6)[:3]):
            draw.text((x0 + 3, y0 + tile + 2 + 12 * li), line, fill=0, font=font)
    path = out / "preview.png"
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    atomic_write_bytes(path, buf.getvalue())
    return path


def generate_phantoms(n: int, seed: int, size: int, out: str | os.PathLike, workers: int = 1,
                      nli: bool = False, preview: bool = False) -> dict[str, Any]:
    """Generate the phantom corpus into `out` (files: pertvl.data.phantom) and return its summary.

    n phantoms, one frontal image and report each (study = image); phantom i uses
    SeedSequence(seed, spawn_key=(i,)); the output does not depend on `workers`. `nli`: also
    nli_{train,dev,test}.jsonl; `preview`: also preview.png.
    """
    _validate(n, seed, size, workers)
    t_start = time.perf_counter()
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(64, math.ceil(n / (workers * 4))))
    tasks = [(seed, a, min(a + chunk, n), size, str(images), nli) for a in range(0, n, chunk)]
    made: list[_Made] = []
    step = max(1, len(tasks) // 10)

    def collect(results: Any) -> None:
        for j, batch in enumerate(results, 1):
            made.extend(batch)
            if j % step == 0 or j == len(tasks):
                log.info("phantoms: %d/%d rendered", len(made), n)

    if workers == 1:
        collect(_make_range(t) for t in tasks)
    else:
        # spawn: safe even when the caller has threads (torch) running; outputs are identical.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            collect(ex.map(_make_range, tasks))
    t_render = time.perf_counter()

    pairs = []
    for m in made:
        pid = phantom_id(seed, m.index)
        fs = [Finding.from_json(f) for f in m.findings]
        pairs.append(Pair(id=pid, study_id=pid, image=f"images/{pid}.png", projection="Frontal", text=m.text,
                          labels=chexpert_labels(fs), source="phantom",
                          extra={"findings": m.findings, "render": render_ref(seed, m.index, size)}))
    assign_splits(pairs, seed=seed)
    write_pairs(out / "pairs.jsonl", pairs)
    atomic_write_text(out / "labels.csv", _labels_csv(pairs))

    nli_counts: dict[str, Any] | None = None
    if nli:
        per: dict[str, list[dict[str, str]]] = {name: [] for name in NLI_SPLIT_NAMES.values()}
        for m, p in zip(made, pairs, strict=True):
            per[NLI_SPLIT_NAMES[p.split]].extend(m.nli)
        for name, items in per.items():
            atomic_write_text(out / f"nli_{name}.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n"
                                                                 for it in items))
        nli_counts = {name: {"items": len(items), **{lab: sum(it["gold_label"] == lab for it in items)
                                                     for lab in NLI_LABELS}} for name, items in per.items()}
    if preview:
        write_preview(out, made, seed)

    t_end = time.perf_counter()
    summary = _summary(pairs, made, seed, size, workers, nli_counts, preview,
                       {"render_s": round(t_render - t_start, 3), "total_s": round(t_end - t_start, 3)})
    write_json(out / "summary.json", summary)
    return summary


def _summary(pairs: Sequence[Pair], made: Sequence[_Made], seed: int, size: int, workers: int,
             nli_counts: dict[str, Any] | None, preview: bool, wall: dict[str, float]) -> dict[str, Any]:
    findings_split: dict[str, Counter] = {s: Counter() for s in SPLITS}
    labels_split: dict[str, Counter] = {s: Counter() for s in SPLITS}
    n_findings = Counter()
    for p, m in zip(pairs, made, strict=True):
        findings_split[p.split].update(f["type"] for f in m.findings)
        labels_split[p.split].update(k for k, v in (p.labels or {}).items() if v == 1.0)
        n_findings[str(len(m.findings))] += 1
    total_f = sum(findings_split.values(), Counter())
    total_l = sum(labels_split.values(), Counter())
    words = [len(p.text.split()) for p in pairs]
    n = len(pairs)
    return {
        "source": "phantom",
        "generator_version": GENERATOR_VERSION,
        "pertvl_version": __version__,
        "seed": seed,
        "n": n,
        "image_size": size,
        "reports_read": n,
        "pairs_written": n,
        "skipped": {},
        "splits": split_counts(pairs),
        "findings": {t: total_f.get(t, 0) for t in FINDING_TYPES},
        "findings_per_split": {s: {t: c.get(t, 0) for t in FINDING_TYPES} for s, c in findings_split.items()},
        "labels": {name: total_l.get(name, 0) for name in MODELED_LABELS},
        "labels_per_split": {s: {name: c.get(name, 0) for name in MODELED_LABELS} for s, c in labels_split.items()},
        "findings_per_image": {k: n_findings.get(k, 0) for k in ("0", "1", "2", "3")},
        "report_words": {"min": min(words), "median": statistics.median(words), "max": max(words)},
        "nli": nli_counts,
        "preview": "preview.png" if preview else None,
        "files": {"images": "images", "pairs": "pairs.jsonl", "labels_csv": "labels.csv"},
        "image_convention": "PA; the patient's left is on the image right",
        "label_columns_modeled": list(MODELED_LABELS),
        "chexpert_of_finding": CHEXPERT_OF_TYPE,
        "workers": workers,
        "timings": {**wall, "render_cpu_s": round(sum(m.render_s for m in made), 3),
                    "write_s": round(sum(m.write_s for m in made), 3),
                    "phantoms_per_s": round(n / max(wall["total_s"], 1e-9), 1)},
    }


def cli_main(args: argparse.Namespace) -> int:
    """`pertvl data phantom`: generate the corpus and print where it is."""
    try:
        summary = generate_phantoms(n=args.n, seed=args.seed, size=args.size, out=args.out,
                                    workers=args.workers, nli=args.nli, preview=args.preview)
    except ValueError as e:
        print(f"pertvl data phantom: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pertvl data phantom: error: cannot write the corpus to {args.out}: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    if getattr(args, "layout", "pertvl") == "mimic-cxr":
        from pertvl.data.mimic import phantoms_to_mimic_tree

        tree = phantoms_to_mimic_tree(out, out / "mimic-cxr-jpg")
        print(f"MIMIC-CXR-JPG layout of the same phantoms in {tree} (read it with "
              f"`pertvl data mimic-cxr --root {tree}`)")  # fmt: skip
    f = summary["findings"]
    print(f"wrote {summary['pairs_written']} phantoms ({args.size} px) to {out}: "
          f"splits {summary['splits']}, normal {summary['labels']['No Finding']}, "
          + ", ".join(f"{t} {c}" for t, c in f.items()))
    print(f"  {summary['timings']['phantoms_per_s']} phantoms/s with {args.workers} worker(s); "
          f"pairs.jsonl, labels.csv, summary.json"
          + (", nli_{train,dev,test}.jsonl" if args.nli else "") + (", preview.png" if args.preview else ""))
    return 0
