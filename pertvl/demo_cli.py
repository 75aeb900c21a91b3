"""`pertvl demo`: parser only (the main job lives in pertvl/demo.py)."""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler

_demo = lazy_handler("pertvl.demo", "cli_main")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job, offline: phantoms -> perturb -> pack -> train (DeepSpeed, 2 ranks) -> ONNX -> eval -> report",
        description="Run the whole pipeline on the embedded synthetic corpus. Stages whose outputs are "
        "complete are skipped on re-run (--force re-runs everything).",
    )
    p.add_argument("--config", default="configs/demo.yaml", help="training config (default configs/demo.yaml)")
    p.add_argument("--long", action="store_true",
                   help="5,000 phantoms, 1,000 steps (~50 min on 2 cores; docs/results/learning-curve), in "
                   "runs/, shards/ and export/demo-long unless given")
    p.add_argument("--n", type=int, help="phantoms to generate (default 1000; 5000 with --long)")
    p.add_argument("--image-size", type=int, default=128, help="phantom and shard image size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of training")
    p.add_argument("--antonyms", default="paper",
                   help="antonym rule of the perturb stage: paper (default; WordNet's adjective antonyms) or "
                   "reviewed (the radiology table); see `pertvl perturb --help`")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (default 2)")
    p.add_argument("--max-steps", type=int, help="override the config's training steps (1000 with --long)")
    p.add_argument("--shards", help="shard folder to write (default shards/demo)")
    p.add_argument("--run", help="run folder (checkpoints, metrics, report/; default runs/demo)")
    p.add_argument("--export", help="ONNX export folder to write (default export/demo)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.set_defaults(handler=_demo)
