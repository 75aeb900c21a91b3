"""Phantom corpus generation speed: phantoms/s at 224 px with 1 and 2 worker processes.

    python bench/bench_phantom.py            # 1,000 phantoms per run
    python bench/bench_phantom.py --quick    # 200 phantoms per run

Exits 1 when the one-worker run projects to 60 s or more for 1,000 phantoms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pertvl.data.phantom import generate_phantoms

TARGET_S_PER_1000 = 60.0


def _run(n: int, size: int, workers: int, root: Path) -> tuple[float, float]:
    """Generate n phantoms; return (wall seconds, CPU seconds of this process)."""
    out = root / f"w{workers}"
    c0, t0 = time.process_time(), time.perf_counter()
    generate_phantoms(n, seed=0, size=size, out=out, workers=workers)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="200 phantoms per run")
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.n
    with tempfile.TemporaryDirectory() as tmp:
        wall1, cpu1 = _run(n, args.size, 1, Path(tmp))
        wall2, _ = _run(n, args.size, 2, Path(tmp))
    rate1, rate2 = n / wall1, n / wall2
    per_1000 = 1000 / rate1
    print(f"phantom corpus, {n} phantoms at {args.size} px (findings + render + report + PNG + files)")
    print(f"  1 worker : {rate1:7.1f} phantoms/s  wall {wall1:6.2f} s  cpu {cpu1:6.2f} s "
          f"({1000 * cpu1 / n:.1f} ms cpu/phantom)")
    print(f"  2 workers: {rate2:7.1f} phantoms/s  wall {wall2:6.2f} s")
    print(f"  2 workers / 1 worker speed-up: {rate2 / rate1:.2f}x")
    print(f"  1,000 phantoms on one core: {per_1000:.1f} s wall ({cpu1 * 1000 / n:.1f} s cpu); "
          f"target < {TARGET_S_PER_1000:.0f} s -> {'OK' if per_1000 < TARGET_S_PER_1000 else 'MISSED'}")
    return 0 if per_1000 < TARGET_S_PER_1000 else 1


if __name__ == "__main__":
    sys.exit(main())
