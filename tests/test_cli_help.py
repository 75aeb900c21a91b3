"""`pertvl ... --help`: every option described with its default, one example per subcommand."""

from __future__ import annotations

import argparse
import shlex

import pytest

from pertvl.cli import EXAMPLES, HelpFormatter, all_parsers, build_parser

PARSER = build_parser()
LEAVES = [p for p in all_parsers(PARSER) if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


def _documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))]


@pytest.mark.parametrize("parser", list(all_parsers(PARSER)), ids=lambda p: p.prog)
def test_every_option_has_a_description_and_its_default(parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()  # also checks that every help string formats
    assert isinstance(parser._get_formatter(), HelpFormatter)  # the one that prints defaults
    for action in _documented(parser):
        assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.default not in (None, False, True, [], argparse.SUPPRESS):
            shown = HelpFormatter(parser.prog)._get_help_string(action) % {"default": action.default}
            assert "default" in shown.lower() or str(action.default) in shown, (
                f"{parser.prog} {action.option_strings[0]}: default {action.default!r} not shown")
            assert " ".join(shown.split()[:3]) in " ".join(text.split())  # and printed by --help

@pytest.mark.parametrize("parser", LEAVES, ids=lambda p: p.prog)
def test_every_subcommand_shows_an_example_that_parses(parser: argparse.ArgumentParser) -> None:
    key = parser.prog.removeprefix("pertvl").strip()
    assert key in EXAMPLES, f"{parser.prog}: no example"
    assert f"example:\n  {EXAMPLES[key]}" in parser.format_help()
    argv = shlex.split(EXAMPLES[key])
    assert argv[0] == "pertvl" and " ".join(argv[1:]).startswith(key)
    build_parser().parse_args(argv[1:])  # the example is a valid command line (SystemExit otherwise)


def test_no_example_for_a_subcommand_that_does_not_exist() -> None:
    assert set(EXAMPLES) == {p.prog.removeprefix("pertvl").strip() for p in LEAVES}
