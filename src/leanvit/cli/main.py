"""The ``leanvit`` command: one verb per task (train, eval, bench, list-models, ...)."""
from __future__ import annotations

import argparse
import sys

from ..errors import LeanvitError


def build_parser() -> argparse.ArgumentParser:
    from . import eval as eval_cmd, list_models, train

    from .common import ArgumentParser

    parser = ArgumentParser(prog="leanvit", description="Make Vision Transformers cheap to run.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"leanvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (train, eval_cmd, list_models):
        mod.add_parser(sub)
    for name in ("bench", "compare", "vis", "distill", "finetune", "analyze"):
        try:
            mod = __import__(f"leanvit.cli.{name}", fromlist=["add_parser"])
        except ImportError:  # a verb whose module is missing is simply not offered
            continue
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
    from .common import parse_with_config

    parser = build_parser()
    try:
        # the sub-command's own parser handles --config; find it from the first positional argument
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parse_with_config(parser, argv)
        import leanvit  # noqa: F401  (registers models)

        return int(args.func(args) or 0)
    except LeanvitError as e:
        print(f"leanvit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
