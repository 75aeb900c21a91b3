"""Ingest, perturbation and packing rates on a generated corpus in the MIMIC-CXR-JPG layout.

    python bench/bench_mimic.py            # 50,000 studies; 2,000 reports perturbed; 1,000 pairs packed
    python bench/bench_mimic.py --quick    # 5,000 / 500 / 300

Targets (2 cores): ingest of 50,000 studies <= 60 s, perturbation >= 1,000 reports/s (word soup
and phantom report sentences), packing >= 300 pairs/s at 224 px; exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Timed

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


def _sentence_reports(n: int, seed: int = 0) -> list[str]:
    """Report-style findings from the phantom generator's sentence templates."""
    from pertvl.data.phantom.findings import sample_findings
    from pertvl.data.phantom.language import write_report

    rng = np.random.default_rng(seed)
    return [write_report(sample_findings(rng), rng) for _ in range(n)]


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

        with Timed() as ingest:
            result = ingest_mimic_cxr(root)
        assert result.summary["pairs_written"] == args.studies, result.summary

        sub = Path(tmp) / "sub"
        write_pairs(sub / "pairs.jsonl", result.pairs[: max(args.perturb, args.pack)])
        # The steady rate: spaCy's pipeline is loaded by a first, small call, as it is once per run;
        # the timed calls are the corpus (the worker processes start inside them).
        perturber = Perturber()
        perturber.perturb_many([p.text for p in result.pairs[:16]])
        corpora = {"perturb (word soup)": [p.text for p in result.pairs[: args.perturb]],
                   "perturb (report sentences)": _sentence_reports(args.perturb)}
        timed: dict[str, tuple[int, Timed]] = {}
        for name, texts in corpora.items():
            with Timed() as t:
                perturber.perturb_many(texts, workers=args.workers)
            timed[name] = (len(texts), t)
        perturb_pairs_file(sub / "pairs.jsonl", sub / "perturbations.jsonl", perturber=perturber, workers=args.workers)

        write_pairs(sub / "pack.jsonl", result.pairs[: args.pack])
        with Timed() as t:
            pack(sub / "pack.jsonl", sub / "perturbations.jsonl", sub / "shards", images_root=root, image_size=224,
                 maxcount=256, workers=args.workers)  # fmt: skip
        timed["pack"] = (args.pack, t)

    sents = [s for r in corpora["perturb (report sentences)"] for s in r.split(". ")]
    print(f"tree: {args.studies} studies, {2 * args.studies} images in the MIMIC-CXR-JPG layout, written in "
          f"{write_s:.1f} s; report sentences: {len(sents)} sentences, {len(set(sents))} distinct")
    rows = [("ingest", args.studies, ingest, "studies/s", args.studies / 60.0, FULL_STUDIES, 1)]
    rows += [(name, n, t, "reports/s", 1000.0, FULL_STUDIES, args.workers)
             for name, (n, t) in timed.items() if name != "pack"]
    rows += [("pack", *timed["pack"], "pairs/s", 300.0, FULL_FRONTAL_PAIRS, args.workers)]
    ok = True
    for name, n, t, unit, target, full, procs in rows:
        need = full / HOUR_S / CORES
        rate = n / t.wall
        passed = rate >= target
        ok &= passed
        print(f"{name:26s} {rate:7.0f} {unit} in {procs} process(es); 2-core target {target:.0f} -> "
              f"{'PASS' if passed else 'MISS'} ({rate / target:.2f}x); full corpus in 1 h on {CORES} cores needs "
              f"{need:.1f} {unit} per core ({rate / procs / need:.0f}x that per core here); "
              f"{t.cpu:.1f} CPU s = {n / max(t.cpu, 1e-9):.0f} per CPU-second; load {t.load:.1f}")  # fmt: skip
    print(f"ingest of {args.studies} studies took {ingest.wall:.1f} s (target for 50,000: 60 s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
