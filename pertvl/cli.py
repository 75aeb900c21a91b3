"""The `pertvl` command: subcommands only, no logic.

Each area of the package registers its own subcommands in a light `cli` module that imports
nothing heavy (no torch) at parse time; the handlers import their implementation lazily so
`pertvl --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from pertvl import __version__

# Area modules, in the order data flows. Each defines `register(subparsers)`.
_COMMAND_MODULES = (
    "pertvl.data.cli",
    "pertvl.train.cli",
    "pertvl.export.cli",
    "pertvl.evaluate.cli",
    "pertvl.evaluate.embed_cli",
    "pertvl.demo_cli",
)


def lazy_handler(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler that imports `module` only when the subcommand runs (keeps --help fast)."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    handler.__name__ = f"{module}.{function}"
    return handler


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (batch sizes, steps, workers)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pertvl",
        description="Pretrain, export and evaluate biomedical vision-language encoders "
        "with multi-scale contrastive learning and perturbed report discrimination.",
    )
    parser.add_argument("--version", action="version", version=f"pertvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # `deepspeed --module pertvl train ...` runs `python -m pertvl --local_rank=N train ...`:
    # accept it here (pertvl.train.launch.detect_dist_env reads it as argv_local_rank).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
