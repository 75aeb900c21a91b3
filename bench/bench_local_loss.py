"""Benchmark P1: batched local_attentive_loss vs GLoRIA's per-caption loop, forward + backward.

    python bench/bench_local_loss.py [--quick] [--reps N] [--batch 32 --words 97 --grid 14 --dim 768]

Each variant in a fresh subprocess: peak memory above its size before the first pass, the best of
--reps passes after a warm-up. Targets: batched SPEEDUP_TARGETS[CPU vendor]x faster, a peak no
higher, losses equal to 1e-4 relative; exit 1 otherwise (docs/PERFORMANCE.md "P1 per machine").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import alternate

# by /proc/cpuinfo's vendor_id: the loop is much cheaper on AMD EPYC; unknown vendors get the stricter one
SPEEDUP_TARGETS = {"GenuineIntel": 3.0, "AuthenticAMD": 2.0}
SPEEDUP_TARGET = 3.0


def cpu_info() -> tuple[str, str]:
    """(model name, vendor id) from /proc/cpuinfo; ("unknown", "") elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    info: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in lines):
        info.setdefault(key.strip(), value.strip())
    return info.get("model name", "unknown"), info.get("vendor_id", "")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(variant: str, b: int, w: int, grid: int, d: int, reps: int, flush_denormal: bool = False) -> dict:
    import torch

    if flush_denormal:
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    # The model's layouts: conv features [B, D, h, w] and word features [B, W, D].
    img = torch.randn(b, d, grid, grid, requires_grad=True)
    words = torch.randn(b, w, d, requires_grad=True)
    lens = [w] * b
    mask = torch.ones(b, w, dtype=torch.bool)

    if variant == "loop":
        from tests.gloria_reference import gloria_local_loss  # GLoRIA's per-caption loop, the tests' oracle

        def run():
            loss0, loss1, _ = gloria_local_loss(img, words.transpose(1, 2), lens)
            return loss0 + loss1  # GLoRIA adds the two directions (pertvl's default reduction "sum")
    else:
        from pertvl.losses import local_attentive_loss

        def run():
            return local_attentive_loss(img.flatten(2).transpose(1, 2), words, mask)

    def step():
        img.grad = words.grad = None
        loss = run()
        loss.backward()
        return float(loss.detach())

    base = _rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    _, times, cpu = alternate({variant: lambda i: step()}, 0, reps)  # --quick (no reps): the warm-up pass
    return {"variant": variant, "loss": loss, "peak_bytes": peak, "first_s": first,
            "times_s": times[variant] or [first], "cpu_s": cpu[variant] or [first_cpu],
            "threads": torch.get_num_threads()}


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--words", str(args.words),
           "--grid", str(args.grid), "--dim", str(args.dim), "--reps", str(args.reps)]
    if args.flush_denormal:
        cmd.append("--flush-denormal")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="time the first pass only (the loop takes ~1 min)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions after the warm-up (default 3)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--words", type=int, default=97)
    ap.add_argument("--grid", type=int, default=14, help="regions = grid × grid")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) in both workers")
    ap.add_argument("--worker", choices=["loop", "batched"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 0 if args.quick else 3
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.words, args.grid, args.dim, args.reps,
                                args.flush_denormal)))
        return 0

    reps = f"{args.reps} timed rep(s) after a warm-up" if args.reps else "the first pass timed"
    print(f"P1 local_attentive_loss fwd+bwd: B={args.batch} W={args.words} M={args.grid ** 2} D={args.dim}, "
          f"{reps}, each variant in a fresh process")
    model, vendor = cpu_info()
    target = SPEEDUP_TARGETS.get(vendor, SPEEDUP_TARGET)
    res = {v: run_variant(v, args) for v in ("loop", "batched")}
    print(f"  machine: {model} ({vendor or 'vendor unknown'}), {os.cpu_count()} CPUs, torch threads "
          f"{res['loop']['threads']}, flush denormals {'on' if args.flush_denormal else 'off'}, load average "
          f"{os.getloadavg()[0]:.2f}")
    for v, r in res.items():
        print(f"  {v:8s} best {min(r['times_s']):8.3f} s, median {statistics.median(r['times_s']):8.3f} s  (runs {', '.join(f'{t:.3f}' for t in r['times_s'])}; "
              f"warm-up {r['first_s']:.3f} s)  process CPU {min(r['cpu_s']):8.3f} s  "
              f"peak +{r['peak_bytes'] / 2**20:8.1f} MiB  loss {r['loss']:.6f}")
    t_loop, t_ours = (min(res[v]["times_s"]) for v in ("loop", "batched"))
    ratio = t_loop / t_ours
    mem_ratio = res["batched"]["peak_bytes"] / max(1, res["loop"]["peak_bytes"])
    rel = abs(res["loop"]["loss"] - res["batched"]["loss"]) / abs(res["loop"]["loss"])
    cpu_ratio = min(res["loop"]["cpu_s"]) / max(1e-9, min(res["batched"]["cpu_s"]))
    print(f"  P1 on {model}, {res['loop']['threads']} thread(s): speed-up loop/batched = {ratio:.2f}x wall "
          f"(target on {vendor or 'this machine'} >= {target}x), {cpu_ratio:.2f}x process CPU; "
          f"peak memory batched/loop = {mem_ratio:.2f} (target <= 1); loss relative difference {rel:.1e}")
    ok = ratio >= target and mem_ratio <= 1.0 and rel <= 1e-4
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
