"""``leanvit list-models``: the registered reference models (or any timm pattern) and whether weights ship."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list-models", help="list leanvit reference models (or timm models matching a pattern)")
    p.add_argument("pattern", nargs="?", default="leanvit_*", help="timm wildcard (default: %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..models import list_models
    from ..zoo import has_weights

    names = list_models(args.pattern)
    if not names:
        hint = "" if any(c in args.pattern for c in "*?[") else f"; for a partial name try '*{args.pattern}*'"
        raise ConfigError(f"no model matches '{args.pattern}'{hint} (leanvit models: `leanvit list-models`, "
                          f"every timm model: `leanvit list-models '*'`)")
    for name in names:
        tag = ""
        if name.startswith("leanvit_"):
            tag = "  (shipped weights)" if has_weights(name) else "  (no weights yet)"
        print(name + tag)
    return 0
