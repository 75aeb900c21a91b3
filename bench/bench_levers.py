"""Benchmark: the demo's training step with each speed lever, alternating with the baseline.

    python bench/bench_levers.py [--quick] [--config configs/demo.yaml] [--shards DIR] [--reps N]
                                 [--variants baseline,compile_text,channels_last,all] [--profile NAME]

One rank's share of the demo's training step, dropout on (the config's micro-batch of the demo
shards, rank 0 of 2, the demo model under DeepSpeed with the config's JSON on a world of one): every
variant its own engine from the same seed, stepping the same batches; timed rounds alternate
baseline, lever, baseline, …
Prints per variant pairs/s (best, median), the ratio to the baseline, CPU s/step, the warm-up
time and the largest relative loss difference from the baseline (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

import torch
from common import REPO, alternate, demo_stream, epochs

# variant → the levers it turns on ({} = baseline); the names are the config keys' values
VARIANTS: dict[str, dict[str, str | bool]] = {
    "baseline": {},
    "compile_text": {"compile": "text"},
    "compile_all": {"compile": "all"},
    "channels_last": {"channels_last": True},
    "attention_fp32": {"attention_fp32": True},
    "frozen_eval": {"frozen_text_dropout": False},  # a model key: changes training (no frozen-layer dropout)
}


class Variant:
    """One DeepSpeed engine of the demo model with some levers on."""

    def __init__(self, name: str, cfg: dict, ds_config: dict, levers: dict) -> None:
        import deepspeed

        from pertvl.losses import PretrainLoss
        from pertvl.model import create_model
        from pertvl.train.engine import seed_everything
        from pertvl.train.speed import apply_levers

        self.name = name
        seed_everything(0)
        model = create_model({**cfg["model"], **{k: v for k, v in levers.items() if k == "frozen_text_dropout"}})
        apply_levers(model, compile=str(levers.get("compile", "off")), channels_last=bool(levers.get("channels_last")),
                     attention_fp32=bool(levers.get("attention_fp32")))
        self.loss_fn = PretrainLoss(cfg["loss"])
        self.kwargs = self.loss_fn.model_kwargs()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=float(cfg["train"]["lr"]), momentum=float(cfg["train"]["momentum"]))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        self.engine.train()  # the training step, dropout on: from_pretrained leaves the text model in eval mode
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else None
        self.losses: list[float] = []

    def step(self, batch, seed: int) -> None:
        torch.manual_seed(seed)  # same dropout masks in every variant
        batch = batch.to("cpu", image_dtype=self.dtype)
        out = self.engine(batch, **self.kwargs)
        loss = self.loss_fn(out).total
        self.engine.backward(loss)
        self.engine.step()
        self.losses.append(float(loss.detach()))


def init_single_rank() -> None:
    import deepspeed

    from pertvl.train.launch import free_port

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed rounds after 2 warm-up steps")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--shards", help="default: data.shards of the config (shards/demo)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3, 2 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 8, 2 with --quick)")
    ap.add_argument("--variants", default="baseline,compile_text,channels_last",
                    help=f"comma-separated, baseline first; known: {', '.join(VARIANTS)}; "
                         "'all' = every lever of the listed variants together")
    ap.add_argument("--profile", help="print torch.profiler's top ops of one step of this variant")
    ap.add_argument("--set", action="append", default=[], help="config override section.key=value")
    args = ap.parse_args(argv)

    from pertvl.config import load_config
    from pertvl.train.launch import load_ds_config

    cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config, args.set)
    shards = Path(args.shards or cfg["data"]["shards"])
    if not shards.is_absolute():
        shards = REPO / shards
    ds = load_ds_config(REPO / cfg["train"]["deepspeed_config"], micro_batch=cfg["train"]["micro_batch"],
                        grad_accum=1, world_size=1)  # fmt: skip
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    reps = args.reps or (2 if args.quick else 8)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    table = dict(VARIANTS)
    if "all" in names:
        table["all"] = {k: v for n in names if n in VARIANTS for k, v in VARIANTS[n].items()}
    unknown = [n for n in names if n not in table]
    if unknown or names[0] != "baseline":
        ap.error(f"--variants: baseline first, then some of {', '.join(table)}; got {names}")

    init_single_rank()
    variants = [Variant(n, cfg, ds, table[n]) for n in names]
    stream = demo_stream(cfg, shards, variants[0].engine.module.tokenizer, int(cfg["train"]["micro_batch"]), 0)
    batches = list(itertools.islice(epochs(stream), warmup + reps))  # the first micro-batches of rank 0 of 2
    texts = [len(b) + int(b.pert_valid.sum()) for b in batches]
    print(f"config {args.config}, shards {shards}: micro-batch {cfg['train']['micro_batch']} pairs "
          f"({statistics.mean(texts):.0f} texts) per step, {warmup} warm-up + {reps} timed steps per variant; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)  # fmt: skip
    steps = {v.name: lambda i, v=v: v.step(batches[i], i) for v in variants}
    warm, wall, cpu = alternate(steps, warmup, reps)  # the warm-up includes compilation
    for name, seconds in warm.items():
        print(f"  {name}: warm-up {seconds:.1f} s", flush=True)
    if args.profile:
        profile(next(v for v in variants if v.name == args.profile), batches[-1], len(batches))

    base = variants[0]
    micro = int(cfg["train"]["micro_batch"])
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':14s} {'pairs/s best':>12s} {'median':>8s} {'ratio best':>10s} {'median':>7s} "
          f"{'CPU s/step':>10s} {'ratio':>6s} {'warm-up s':>9s} {'max rel Δloss':>13s}")
    n = warmup + reps  # the profiled step, if any, is not compared
    t0, c0 = wall[base.name], cpu[base.name]
    for v in variants:
        rel = max(abs(a - b) / abs(b) for a, b in zip(v.losses[:n], base.losses[:n], strict=True))
        t, c = wall[v.name], cpu[v.name]
        med, cpu_med = statistics.median(t), statistics.median(c)
        print(f"{v.name:14s} {micro / min(t):12.2f} {micro / med:8.2f} {min(t0) / min(t):10.2f} "
              f"{statistics.median(t0) / med:7.2f} {cpu_med:10.2f} {statistics.median(c0) / cpu_med:6.2f} "
              f"{warm[v.name]:9.1f} {rel:13.1e}")  # fmt: skip
    return 0


def profile(variant: Variant, batch, seed: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(batch, seed)
    print(f"\ntorch.profiler, one step of {variant.name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    sys.exit(main())
