"""Evaluation during training (train.eval_every): `pertvl eval`'s evaluations on the model in training.

`make_evaluator` builds what the engine calls on rank 0 every train.eval_every steps with an
eval-mode fp32 copy of the encoders: each of train.eval_tasks runs as `pertvl eval NAME --run …
--shards data.shards --split train.eval_split [--limit train.eval_limit]` would, writes
RUN_DIR/eval/step{N}/NAME.json and returns the flat metrics under "eval/".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pertvl.config import RunConfig
from pertvl.errors import ConfigError

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


def eval_task_names() -> list[str]:
    """The names train.eval_tasks accepts: the evaluations of shard samples that take an image encoder."""
    from pertvl.evaluate.catalog import EVALUATIONS

    return [e.name for e in EVALUATIONS.values() if e.shards and not e.text_only]


def check_tasks(tasks: list[str]) -> None:
    """Raises ValueError naming the unknown or repeated names of train.eval_tasks."""
    known = eval_task_names()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"train.eval_tasks: unknown evaluation(s) {unknown}; choose from {', '.join(known)}")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ConfigError(f"train.eval_tasks must name each evaluation once, got {tasks}")


def task_options(name: str, shards: str, split: str, limit: int | None, batch_size: int) -> argparse.Namespace:
    """The options `pertvl eval NAME` would pass: the evaluation's own defaults and the shard source."""
    from pertvl.evaluate.catalog import EVALUATIONS

    parser = argparse.ArgumentParser(add_help=False)
    EVALUATIONS[name].add_arguments(parser)
    options = parser.parse_args([])
    options.__dict__.update(shards=shards, split=split, limit=limit, batch_size=batch_size, run=None, export=None)
    return options


def task_data(name: str, options: argparse.Namespace, limit: int | None) -> Iterable[Any]:
    """The samples `pertvl eval NAME` reads: the evaluation's own source first (twins: SHARDS/twins),
    else the shard split (its first `limit`)."""
    from pertvl.data.shards import iter_samples
    from pertvl.evaluate.catalog import EVALUATIONS

    evaluation = EVALUATIONS[name]
    data = evaluation.load(options) if evaluation.load is not None else None
    return data if data is not None else itertools.islice(iter_samples(options.shards, options.split), limit)


def make_evaluator(config: RunConfig, batch_size: int = 64) -> Callable[[Any, int], dict[str, Any]] | None:
    """The evaluation of `config` (None when train.eval_every is 0): evaluate(model, step) -> flat
    metrics under "eval/". Unknown task names fail here, before any training."""
    train = config.train
    if train.eval_every <= 0:
        return None
    check_tasks(train.eval_tasks)
    from pertvl.evaluate.catalog import EVALUATIONS
    from pertvl.evaluate.torch_encoder import TorchEncoder
    from pertvl.files import write_json

    run_dir, shards, split = Path(train.out), config.data.shards, train.eval_split
    # Data an evaluation lacks (a split, twin shards without it) fails now, not an hour into the run.
    for name in train.eval_tasks:
        if next(iter(task_data(name, task_options(name, shards, split, 1, batch_size), 1)), None) is None:
            raise ConfigError(f"train.eval_tasks: {name} finds no {split!r} samples in {shards} (train.eval_split)")

    def evaluate(model: Any, step: int) -> dict[str, Any]:
        encoder = TorchEncoder(model, device=next(model.parameters()).device, batch_size=batch_size)
        metrics: dict[str, Any] = {}
        for name in train.eval_tasks:
            evaluation = EVALUATIONS[name]
            options = task_options(name, shards, split, train.eval_limit, batch_size)
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI's remarks; the JSON holds the numbers
                result = evaluation.run(encoder, task_data(name, options, train.eval_limit), options)
            result.info = {"encoder": "torch (in training)", "run": str(run_dir), "step": step, "shards": str(shards),
                           "split": split, **({"limit": train.eval_limit} if train.eval_limit else {}), **result.info}
            (run_dir / EVAL_DIR / f"step{step:08d}").mkdir(parents=True, exist_ok=True)
            write_json(run_dir / EVAL_DIR / f"step{step:08d}" / f"{evaluation.key}.json", result.to_json())
            metrics.update({f"eval/{k}": v for k, v in result.metrics().items()})
            log.info("step %d eval %s: %s", step, name, result.headline())
        return metrics

    return evaluate


def train_cli_main(args: argparse.Namespace) -> int:
    """`pertvl train`: the config checked, the run folder locked on rank 0 (before torch and DeepSpeed
    load), then the engine's cli_main with train.eval_every's evaluation."""
    from pertvl.config import load_config
    from pertvl.files import lock_folder
    from pertvl.train.launch import detect_dist_env

    local_rank = args.train_local_rank if args.train_local_rank is not None else getattr(args, "local_rank", None)
    cfg = load_config(args.config, args.overrides)  # a bad key or value: refused before anything starts
    lock = None
    if detect_dist_env(argv_local_rank=local_rank).rank == 0:
        lock = lock_folder(args.out or cfg["train"]["out"], " ".join(["pertvl", *sys.argv[1:]]))
    from pertvl.train.engine import cli_main

    return cli_main(args, make_evaluator=make_evaluator, lock=lock)
