"""Benchmark: one spaCy parse per report vs. one parse per perturbation type, side by side.

    python bench/bench_perturb.py [--reports indiana_reports.csv] [--quick] [--workers N]

Outputs must be identical; targets: the whole corpus in under 10 s one-parse, naive/one-parse
>= 5x; exit 1 when missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import OPENI, load_findings

from pertvl.data.perturb import PerturbationRecord, Perturber, perturb_tagged
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.text import clean_text

CORPUS_TARGET_S = 10.0
RATIO_TARGET = 5.0


def naive(perturber: Perturber, texts: list[str], batch_size: int, workers: int) -> list[PerturbationRecord]:
    """Parse every text once per type; merge the nine single-type results into one record each."""
    merged = [PerturbationRecord(text=t, perturbations={}, unavailable={}, seed=perturber.seed) for t in texts]
    for ptype in PERTURBATION_TYPES:
        analyzed = perturber.analyze(texts, batch_size=batch_size, workers=workers)
        for rec, text, a in zip(merged, texts, analyzed, strict=True):
            one = perturb_tagged(text, a.pos, seed=perturber.seed, types=(ptype,), lexicon=perturber.lexicon,
                                 negated=a.negated, fixed=a.fixed)
            if ptype in one.perturbations:
                rec.perturbations[ptype] = one.perturbations[ptype]
            else:
                rec.unavailable[ptype] = one.unavailable[ptype]
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=Path, default=OPENI, help="Open-I indiana_reports.csv")
    ap.add_argument("--quick", action="store_true", help="first 300 distinct texts only (ratio target only)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.reports.is_file():
        print(f"bench_perturb: {args.reports} not found (set PERTVL_OPENI_DIR or --reports)", file=sys.stderr)
        return 2

    findings = load_findings(args.reports)
    texts = [t for t in dict.fromkeys(clean_text(f) for f in findings) if t]
    if args.quick:
        texts = texts[:300]
    t0 = time.perf_counter()
    perturber = Perturber()
    load_s = time.perf_counter() - t0
    perturber.tag(texts[:64], batch_size=args.batch_size)  # warm-up: first calls allocate

    t0 = time.perf_counter()
    one = perturber.perturb_many(texts, batch_size=args.batch_size, workers=args.workers)
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nine = naive(perturber, texts, args.batch_size, args.workers)
    naive_s = time.perf_counter() - t0
    same = [r.to_json() for r in one] == [r.to_json() for r in nine]
    ratio = naive_s / one_s

    print(f"corpus: {len(findings)} Open-I findings -> {len(texts)} distinct cleaned texts"
          f"{' (--quick subset)' if args.quick else ''}; spaCy pipeline {perturber.spacy_model} "
          f"{perturber.nlp.pipe_names}, batch {args.batch_size}, workers {args.workers}; load {load_s:.2f} s")
    print(f"one parse per report (9 types from it) : {one_s:7.2f} s  ({len(texts) / one_s:6.0f} texts/s)")
    print(f"one parse per perturbation type (9x)   : {naive_s:7.2f} s  ({len(texts) / naive_s:6.0f} texts/s)")
    print(f"ratio naive / one-parse                : {ratio:7.2f}x  (target >= {RATIO_TARGET:.0f}x)")
    print(f"identical outputs                      : {same}")
    ok = same and ratio >= RATIO_TARGET
    if not args.quick:
        print(f"whole corpus, one-parse                : {one_s:7.2f} s  (target < {CORPUS_TARGET_S:.0f} s)")
        ok = ok and one_s < CORPUS_TARGET_S
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
