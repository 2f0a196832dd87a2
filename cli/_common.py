"""What every command shares: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from mpnet.errors import UserError


PROGRAMS = {"pretrain": "pretrain-mpnet", "preprocess": "preprocess-mpnet", "finetune": "finetune-mpnet",
            "compare": "compare-mpnet-backends", "benchmark": "benchmark-mpnet", "convert": "convert-mpnet"}


def command(main):
    """Wrap a CLI main(): UserError and friends -> 'NAME: error: message' on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # From the defining file, so `python -m mpnet_cli.X` says the same as the installed command.
        module = Path(main.__code__.co_filename).stem
        name = PROGRAMS.get(module, module)
        try:
            return main(argv)
        except UserError as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None):
    """Flags and SECTION.KEY=VALUE overrides in any order (argparse's intermixed parsing)."""
    return parser.parse_intermixed_args(dashed_flags(parser, argv))


def dashed_flags(parser: argparse.ArgumentParser, argv=None) -> list[str]:
    """argv with each flag spelled with underscores, as HF Trainer scripts spell them (--output_dir), turned into
    the command's dashed flag (--output-dir) when it has one; anything else is left to argparse."""
    known = _option_strings(parser)

    def dashed(word: str) -> str:
        flag, sep, value = word.partition("=")
        if not flag.startswith("--") or "_" not in flag:
            return word
        spelled = "--" + flag[2:].replace("_", "-")
        return spelled + sep + value if spelled in known else word

    return [dashed(str(word)) for word in (sys.argv[1:] if argv is None else argv)]


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    known = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known |= _option_strings(sub)
    return known


def overrides_from(args, flags: dict) -> dict:
    """The nested overrides of a run: SECTION.KEY=VALUE arguments and the flags that were given; a flag and an
    override of the same key must agree (config.add_flags)."""
    from mpnet.training.config import add_flags, parse_overrides

    return add_flags(parse_overrides(args.overrides), flags)


OVERRIDES_HELP = ("config overrides, e.g. optim.lr=1e-4; allowed anywhere among the flags (one that sets the same "
                  "key as a flag must agree with it, else the command stops)")


# argparse types shared by the commands: comma-separated lists, checked where they are parsed


def text_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one comma-separated value")
    return values


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def name_list(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {bad or '(empty)'}; choose from {', '.join(choices)}")
        return values

    return parse
