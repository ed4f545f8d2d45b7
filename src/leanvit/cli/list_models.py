"""``leanvit list-models``: the registered reference models (or any timm pattern) and whether weights ship."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list-models", help="list leanvit reference models (or timm models matching a pattern)")
    p.add_argument("pattern", nargs="?", default="leanvit_*", help="timm wildcard (default: %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..models import list_models
    from ..zoo import has_weights

    for name in list_models(args.pattern):
        tag = ""
        if name.startswith("leanvit_"):
            tag = "  (shipped weights)" if has_weights(name) else "  (no weights yet)"
        print(name + tag)
    return 0
