"""`pertvl train`: parser only (the engine lives in pertvl/train/engine.py and is imported lazily)."""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler, positive_int

# Through the evaluation layer (by name: train/ does not import evaluate/), which takes the run
# folder's lock on rank 0 and hands train.eval_every's evaluation to the engine (pertvl.train.engine).
_train = lazy_handler("pertvl.evaluate.in_training", "train_cli_main")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain the dual encoder with DeepSpeed (any launcher: python, torchrun, deepspeed, srun)",
        description="Train the dual encoder (L = L_global + alpha L_local + beta L_pert) on the shards with "
        "DeepSpeed, checkpointing for exact resume; the final encoders go to RUN_DIR/final. The config file "
        "feeds the defaults, --set and the flags override it (docs/TRAINING.md). Exit codes: 0 trained; 2 a "
        "user error (one line `pertvl: error: ...`: a bad config key or value, a missing file or folder, "
        "damaged shards, a run folder in use); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint "
        "(preempted, a time limit): re-run with --resume latest; 70 stalled (no optimizer step within the "
        "stall limit; stacks in the log): re-run with --resume latest from the last checkpoint; 143 a stop "
        "signal not answered within train.stop_grace_s; 1 an internal error (with its traceback).",
    )
    p.add_argument("--config", help="run config YAML (sections data/model/loss/train/wandb), or the name of a "
                   "bundled one (demo, openi_paper, cxr_bert); its relative paths are read from its folder")
    p.add_argument("--shards", help="shard folder (data.shards)")
    p.add_argument("--out", help="run folder (train.out)")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON, or the name of a bundled one from ds_configs/, e.g. "
                   "cpu_zero1_bf16 (train.deepspeed_config)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (train.max_steps; default: epochs)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shard order, shuffling, augmentation")
    p.add_argument("--resume", help="'latest' (a no-op without a checkpoint yet) or a checkpoint path")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (metrics.jsonl and console only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (value parsed as YAML); repeatable, e.g. "
                   "--set loss.preset=convirt")
    # The deepspeed launcher passes --local_rank; it may land after the subcommand.
    p.add_argument("--local_rank", "--local-rank", dest="train_local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.set_defaults(handler=_train)
