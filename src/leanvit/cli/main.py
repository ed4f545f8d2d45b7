"""The ``leanvit`` command: one verb per task (train, eval, bench, list-models, ...)."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import LeanvitError
from . import analyze, bench, compare, distill, eval as eval_cmd, export, finetune, list_models, train, tune, vis
from .parsing import ArgumentParser, parse_with_config

# every verb, in the order of `leanvit --help`. Each is imported unconditionally: a verb whose module fails to
# import is a bug to see as a traceback, not a verb to hide ("invalid choice"); a verb that needs an optional
# extra imports it when it runs and says which package to install.
VERBS = (train, eval_cmd, list_models, bench, compare, tune, vis, distill, finetune, analyze, export)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="leanvit", description="Make Vision Transformers cheap to run.")
    parser.add_argument("--version", action="version", version=f"leanvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in VERBS:
        mod.add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str:
    """The message of an error as one line. An error raised in a data-loader worker arrives with the worker's
    traceback in its message; its last line is the original message."""
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # the sub-command's own parser handles --config; find it from the first positional argument
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parse_with_config(parser, argv)
        return int(args.func(args) or 0)
    except LeanvitError as e:
        print(f"leanvit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
