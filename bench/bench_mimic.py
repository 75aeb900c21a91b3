"""MIMIC-CXR-sized data preparation: ingest, perturbation and packing rates on a generated corpus of
the real MIMIC-CXR-JPG layout, each against its target and against the rate the full corpus needs.

    python bench/bench_mimic.py            # 50,000 studies (2 views each) ingested; 2,000 reports
                                           # perturbed; 1,000 pairs packed at 224 px
    python bench/bench_mimic.py --quick    # 5,000 / 500 / 300

The tree (pertvl.data.mimic.write_mimic_tree): split/metadata/CheXpert CSV.gz files, a PA and a
LATERAL JPEG per study (1024 x 1024 radiograph-like images, a few distinct ones reused: ingest only
checks that files exist, packing decodes and resizes them), sectioned reports in
mimic-cxr-reports.zip. Targets (2 cores): ingest of 50,000 studies <= 60 s, perturbation >= 1,000
reports/s, packing >= 300 pairs/s at 224 px. "Full corpus in an hour on 16 cores" needs 227,835
studies ingested, 227,835 reports perturbed and ~243,000 frontal pairs packed per hour, i.e. per
core: 4.0 studies/s, 4.0 reports/s, 4.2 pairs/s. Exits 1 when a 2-core target is missed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL_STUDIES, FULL_FRONTAL_PAIRS, HOUR_S, CORES = 227_835, 243_000, 3600.0, 16
WORDS = ("the lungs are clear there is no pleural effusion or pneumothorax heart size is normal mild "
         "cardiomegaly small left right lower lobe opacity atelectasis consolidation stable degenerative "
         "changes of the thoracic spine increased interstitial markings").split()  # fmt: skip


def _jpegs(k: int, side: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for _ in range(k):
        lungs = sum(np.exp(-(((x - 0.5 - s * 0.2) / 0.13) ** 2 + ((y - 0.45) / 0.3) ** 2)) for s in (-1, 1))
        img = 180 - 110 * lungs + 10 * np.sin(y * 90 + rng.random()) + rng.normal(0, 6, (side, side))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _report(rng: np.random.Generator) -> tuple[str, str]:
    findings = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 45)))) + "."
    return findings, " ".join(rng.choice(WORDS, size=8)) + "."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--studies", type=int, default=50_000)
    ap.add_argument("--perturb", type=int, default=2_000, help="reports to perturb")
    ap.add_argument("--pack", type=int, default=1_000, help="pairs to pack")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.studies, args.perturb, args.pack = 5_000, 500, 300

    from pertvl.data.mimic import TreeStudy, ingest_mimic_cxr, mimic_report_text, write_mimic_tree
    from pertvl.data.perturb import Perturber, perturb_pairs_file
    from pertvl.data.records import write_pairs
    from pertvl.data.shards import pack

    rng = np.random.default_rng(0)
    images = _jpegs(8, 1024)
    splits = ("train",) * 18 + ("validate", "test")
    studies = []
    for i in range(args.studies):
        findings, impression = _report(rng)
        studies.append(TreeStudy(f"1{i:07d}", f"5{i:07d}", splits[i % 20], mimic_report_text(findings, impression),
                                 ((f"{i:08d}-pa", "PA", images[i % 8]), (f"{i:08d}-lat", "LATERAL", images[(i + 3) % 8])),
                                 {"No Finding": "1.0" if i % 3 == 0 else ""}))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_mimic_") as tmp:
        root = Path(tmp) / "mimic"
        t0 = time.perf_counter()
        write_mimic_tree(root, studies, reports_zip=True)
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        result = ingest_mimic_cxr(root)
        ingest_s = time.perf_counter() - t0
        assert result.summary["pairs_written"] == args.studies, result.summary

        sub = Path(tmp) / "sub"
        write_pairs(sub / "pairs.jsonl", result.pairs[: max(args.perturb, args.pack)])
        # The steady rate: spaCy's pipeline is loaded (and the worker processes started) by a first,
        # small call, as it is once per run; the timed call is the corpus.
        perturber = Perturber()
        perturber.perturb_many([p.text for p in result.pairs[:16]], workers=args.workers)
        texts = [p.text for p in result.pairs[: max(args.perturb, args.pack)]]
        t0 = time.perf_counter()
        perturber.perturb_many(texts, workers=args.workers)
        perturb_s = time.perf_counter() - t0
        n_perturbed = len(texts)
        perturb_pairs_file(sub / "pairs.jsonl", sub / "perturbations.jsonl", perturber=perturber, workers=args.workers)

        write_pairs(sub / "pack.jsonl", result.pairs[: args.pack])
        t0 = time.perf_counter()
        pack(sub / "pack.jsonl", sub / "perturbations.jsonl", sub / "shards", images_root=root, image_size=224,
             maxcount=256, workers=args.workers)  # fmt: skip
        pack_s = time.perf_counter() - t0

    rates = {
        "ingest": (args.studies / ingest_s, "studies/s", args.studies / 60.0, FULL_STUDIES),
        "perturb": (n_perturbed / perturb_s, "reports/s", 1000.0, FULL_STUDIES),
        "pack": (args.pack / pack_s, "pairs/s", 300.0, FULL_FRONTAL_PAIRS),
    }
    print(f"tree: {args.studies} studies, {2 * args.studies} images in the MIMIC-CXR-JPG layout, written in {write_s:.1f} s")
    ok = True
    for name, (rate, unit, target, full) in rates.items():
        need = full / HOUR_S / CORES
        passed = rate >= target
        ok &= passed
        print(f"{name:8s} {rate:9.0f} {unit} on {args.workers} workers; 2-core target {target:.0f} -> "
              f"{'PASS' if passed else 'MISS'} ({rate / target:.2f}x); full corpus in 1 h on {CORES} cores needs "
              f"{need:.1f} {unit} per core ({rate / args.workers / need:.0f}x that per core here)")  # fmt: skip
    print(f"ingest of {args.studies} studies took {ingest_s:.1f} s (target for 50,000: 60 s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
