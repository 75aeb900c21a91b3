"""The `pertvl` command: subcommands only, no logic. Each area registers its subcommands in a light
`cli` module; handlers import their implementation lazily, so `pertvl --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Callable

from pertvl import __version__
from pertvl.errors import UserError

DEBUG_ENV = "PERTVL_DEBUG"

# Area modules, in the order data flows. Each defines `register(subparsers)`.
_COMMAND_MODULES = (
    "pertvl.data.cli",
    "pertvl.train.cli",
    "pertvl.export.cli",
    "pertvl.evaluate.cli",
    "pertvl.evaluate.embed_cli",
    "pertvl.demo_cli",
)


def lazy_handler(module: str, function: str, lock_out: bool = False) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler that imports `module` only when the subcommand runs (keeps --help fast);
    with `lock_out`, wrapped by `with_out_lock`."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    handler.__name__ = f"{module}.{function}"
    return with_out_lock(handler) if lock_out else handler


def with_out_lock(handler: Callable[[argparse.Namespace], int], beside: bool = False) -> Callable[[argparse.Namespace], int]:
    """`handler` holding the write lock of its --out folder while it runs (pertvl.files.lock_folder);
    `beside`: the lock file sits next to the folder (.NAME.lock), for a command that creates it."""

    def locked(args: argparse.Namespace) -> int:
        from pathlib import Path

        from pertvl.files import LOCK_NAME, lock_folder

        out = Path(args.out)
        folder, name = (out.parent, f".{out.name}.lock") if beside else (out, LOCK_NAME)
        with lock_folder(folder, " ".join(["pertvl", *sys.argv[1:]]), name=name, remove=beside):
            return handler(args)

    locked.__name__ = getattr(handler, "__name__", "handler")
    return locked


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (batch sizes, steps, workers)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# One example per subcommand, shown at the end of its --help (keyed by the words after `pertvl`).
EXAMPLES = {
    "data openi": "pertvl data openi --reports indiana_reports.csv --projections indiana_projections.csv "
                  "--images images/ --out data/openi",
    "data mimic-cxr": "pertvl data mimic-cxr --root mimic-cxr-jpg/2.0.0 --out data/mimic --section findings",
    "data csv": "pertvl data csv --table my_reports.csv --images /data/xrays --out data/mine",
    "data phantom": "pertvl data phantom --n 1000 --size 224 --out data/phantoms --preview",
    "data twins": "pertvl data twins --corpus data/phantoms --out data/twins --shards shards/twins",
    "perturb": "pertvl perturb --pairs data/mine/pairs.jsonl --out data/mine/perturbations.jsonl --workers 2",
    "pack": "pertvl pack --pairs data/mine/pairs.jsonl --perturbations data/mine/perturbations.jsonl "
            "--out shards/mine --image-size 224",
    "shards verify": "pertvl shards verify shards/mine",
    "shards merge": "pertvl shards merge shards/mine",
    "train": "pertvl train --config configs/demo.yaml --shards shards/mine --out runs/mine",
    "export": "pertvl export --run runs/mine --out export/mine --quantize int8",
    "finetune nli": "pertvl finetune nli --export export/mine --train nli_train.jsonl --dev nli_dev.jsonl "
                    "--test nli_test.jsonl --out results/nli",
    "finetune chexpert": "pertvl finetune chexpert --export export/mine --csv CheXpert-v1.0-small/train.csv "
                         "--images . --out results/chexpert",
    "ablate": "pertvl ablate --config configs/demo.yaml --shards shards/demo --presets full,convirt --seeds 0,1 "
              "--out runs/ablate",
    "eval structure": "pertvl eval structure --export export/mine --shards shards/mine --out results/eval",
    "eval structure-local": "pertvl eval structure-local --export export/mine --shards shards/mine --out results/eval",
    "eval retrieval": "pertvl eval retrieval --export export/mine --shards shards/mine --out results/eval",
    "eval zeroshot": "pertvl eval zeroshot --export export/mine --shards shards/mine --out results/eval",
    "eval text-structure": "pertvl eval text-structure --export export/mine --reports indiana_reports.csv "
                           "--out results/eval",
    "eval grounding": "pertvl eval grounding --export export/demo --shards shards/demo --out results/eval",
    "eval twins": "pertvl eval twins --export export/demo --shards shards/demo --out results/eval",
    "embed": "pertvl embed --export export/demo --images chest.png --texts 'Small left pleural effusion.' "
             "--out emb/",
    "similarity": "pertvl similarity --export export/demo --images a.png b.png --texts 'No effusion.' "
                  "'Left effusion.'",
    "demo": "pertvl demo --n 1000 --nproc 2",
    "report curves": "pertvl report curves full=runs/full convirt=runs/convirt --out results/curves",
}


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already states it; keeps the example's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = isinstance(action, (argparse._StoreConstAction, argparse._CountAction))  # store_true/false too
        if (not action.option_strings or flag or default in (None, [], argparse.SUPPRESS) or "default" in text.lower()
                or str(default) in text or (isinstance(default, float) and f"{default:g}" in text)):
            return text
        return text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return textwrap.indent(text, indent)
        return super()._fill_text(text, width, indent)


def all_parsers(parser: argparse.ArgumentParser):
    """The parser and every sub-parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pertvl",
        description="Pretrain, export and evaluate biomedical vision-language encoders "
        "with multi-scale contrastive learning and perturbed report discrimination.",
    )
    parser.add_argument("--version", action="version", version=f"pertvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error too (also {DEBUG_ENV}=1)")
    # `deepspeed --module pertvl train ...` runs `python -m pertvl --local_rank=N train ...`:
    # accept it here (pertvl.train.launch.detect_dist_env reads it as argv_local_rank).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in all_parsers(parser):
        p.formatter_class = HelpFormatter
        example = EXAMPLES.get(p.prog.removeprefix("pertvl").strip())
        if example:
            p.epilog = "example:\n  " + example
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a UserError becomes one line `pertvl: error: ...` and its exit code (the
    traceback too with --debug or PERTVL_DEBUG=1); any other exception keeps its traceback."""
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return int(args.handler(args) or 0)
    except UserError as e:
        if getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print("pertvl: error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)  # one line
        return e.exit_code


def run() -> None:
    """The process entry (the `pertvl` script, `python -m pertvl`): main, then exit without the
    collector's last pass over every object of torch, transformers and DeepSpeed (~3 s at each
    exit). Files, loggers, W&B and loader workers are closed by then (their context managers and
    atexit hooks), so the pass would only free memory that the exit returns anyway."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
