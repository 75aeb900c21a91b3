"""The `pertvl` command: subcommands only, no logic.

Each area of the package registers its own subcommands in a light `cli` module that imports
nothing heavy (no torch) at parse time; the handlers import their implementation lazily so
`pertvl --help` stays fast.

Plugins (pertvl.registry): `pertvl --plugin MODULE[:FUNCTION] ...` and PERTVL_PLUGINS=MODULE,...
are imported before the parser is built, so a plugin's perturbation types, loss terms and
evaluations are there for every subcommand (an evaluation's own `pertvl eval NAME` included).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE[:FUNCTION]",
                        help="import a module (dotted name or .py path) that registers perturbation types, "
                        "loss terms or evaluations, and call FUNCTION; repeatable; also PERTVL_PLUGINS=A,B "
                        "(inherited by the processes pertvl starts)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def load_plugins_from(argv: list[str] | None) -> list[str]:
    """Import the plugins of `--plugin` (in argv) and PERTVL_PLUGINS, and export them to children."""
    from pertvl.registry import PLUGINS_ENV, export_plugins, load_plugins, plugin_specs

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    specs = plugin_specs(known.plugin)
    export_plugins(specs)
    return load_plugins(plugin_specs(os.environ.get(PLUGINS_ENV), specs))


def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins_from(argv)
    except ValueError as e:
        print(f"pertvl: {e}", file=sys.stderr)
        return 2
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
