"""Benchmark: `pertvl train` with the demo configuration on 1 and 2 ranks, and its loader.

    python bench/bench_train.py [--quick] [--config configs/demo.yaml] [--shards DIR] [--steps N]

Training: N optimizer steps on 1 rank and on 2 (torchrun); over the steps after the first two, the
median samples/s and the share of step time spent blocked on next(batch). Loader: rank 0's stream
(of 2) iterated alone, against what one rank's step consumes. Target: the loader delivers >= 5x
that; exit 1 when missed. Shards: --shards, else shards/demo, else a phantom corpus (1,000 at
128 px; 256 with --quick) built into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, build_shards, demo_stream, epochs

from pertvl.train.launch import free_port

TARGET = 5.0


def run_training(nproc: int, config: str, shards: Path, steps: int, out: Path) -> dict:
    """`pertvl train` on `nproc` ranks; returns the steady-state numbers from metrics.jsonl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    args = ["train", "--config", config, "--shards", str(shards), "--out", str(out), "--max-steps", str(steps),
            "--no-wandb", "--set", "train.checkpoint_every=0", "--set", "train.log_every=1"]  # fmt: skip
    port = str(free_port())
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "pertvl", *args]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training on {nproc} rank(s) failed ({proc.returncode}); log: {log}\n"
                         + log.read_text(errors="replace")[-3000:])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] if len(rows) > 3 else rows
    step_time = sum(r["perf/step_time_s"] for r in steady)
    return {
        "nproc": nproc,
        "wall_s": wall,
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in steady),
        "step_time_s": statistics.median(r["perf/step_time_s"] for r in steady),
        "data_wait_frac": sum(r["perf/data_wait_s"] for r in steady) / step_time,
        "loss_first": rows[0]["loss/total"],
        "loss_last": rows[-1]["loss/total"],
    }


def loader_throughput(config: str, shards: Path, batches: int) -> tuple[float, int]:
    """Samples/s of rank 0's stream (world size 2) iterated alone; returns (rate, samples per step)."""
    from transformers import AutoTokenizer

    from pertvl.config import load_config
    from pertvl.model.text import default_text_model
    from pertvl.train.launch import load_ds_config

    cfg = load_config(config, [f"data.shards={shards}"])
    ds = load_ds_config(REPO / cfg["train"]["deepspeed_config"], micro_batch=cfg["train"]["micro_batch"],
                        grad_accum=cfg["train"]["grad_accum"])  # fmt: skip
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"].get("text_name_or_path") or default_text_model())
    stream = demo_stream(cfg, shards, tokenizer, micro, int(cfg["data"]["num_workers"]))
    it = epochs(stream)
    next(it)  # the first batch includes starting the workers: not counted
    t0, total = time.perf_counter(), 0
    while total < batches * micro:
        total += len(next(it))
    return total / (time.perf_counter() - t0), micro * accum


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller corpus")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shards", help="shard folder (default: shards/demo, else a generated corpus)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default 12; 6 with --quick)")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 12)
    tmp = Path(tempfile.mkdtemp(prefix="pertvl-bench-train-"))
    try:
        if args.shards:
            shards = Path(args.shards)
        elif (REPO / "shards" / "demo" / "manifest.json").is_file():
            shards = REPO / "shards" / "demo"
        else:
            n = 256 if args.quick else 1000
            print(f"building {n} phantoms at 128 px into {tmp} ...", flush=True)
            shards = build_shards(tmp / "shards", n, size=128, maxcount=32, workers=2)
        print(f"config {args.config}, shards {shards}, {steps} steps per run, load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)  # fmt: skip
        results = [run_training(n, args.config, shards, steps, tmp / f"run{n}") for n in (1, 2)]
        loader_rate, per_step = loader_throughput(args.config, shards, batches=8 if args.quick else 24)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{'ranks':>5} {'samples/s':>10} {'step s':>8} {'data wait':>10} {'loss first→last':>18} {'wall s':>7}")
    for r in results:
        print(f"{r['nproc']:>5} {r['samples_per_s']:>10.2f} {r['step_time_s']:>8.2f} {r['data_wait_frac']:>9.1%} "
              f"{r['loss_first']:>8.3f}→{r['loss_last']:<8.3f} {r['wall_s']:>7.1f}")  # fmt: skip
    one, two = results
    print(f"2-rank / 1-rank training throughput: {two['samples_per_s'] / one['samples_per_s']:.2f}x")
    consumed = per_step / two["step_time_s"]  # samples/s one rank's step takes from its loader
    ratio = loader_rate / consumed
    print(f"loader alone (rank 0 of 2): {loader_rate:.1f} samples/s; one rank's step consumes {consumed:.1f} "
          f"samples/s; loader / consumption = {ratio:.1f}x (target >= {TARGET:g}x)")  # fmt: skip
    if ratio < TARGET:
        print("TARGET MISSED: the loader would starve the training step", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
