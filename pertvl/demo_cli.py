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
    p.add_argument("--n", type=int, default=1000, help="phantoms to generate (default 1000)")
    p.add_argument("--image-size", type=int, default=128, help="phantom and shard image size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of training")
    p.add_argument("--antonyms", default="paper",
                   help="antonym rule of the perturb stage: paper (default; WordNet's adjective antonyms) or "
                   "reviewed (the radiology table); see `pertvl perturb --help`")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (default 2)")
    p.add_argument("--max-steps", type=int, help="override the config's training steps")
    p.add_argument("--shards", default="shards/demo", help="shard folder to write")
    p.add_argument("--run", default="runs/demo", help="run folder (checkpoints, metrics, report/)")
    p.add_argument("--export", default="export/demo", help="ONNX export folder to write")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.set_defaults(handler=_demo)
