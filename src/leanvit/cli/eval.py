"""``leanvit eval``: top-1 / top-5 of a model (optionally patched with a token-reduction method) on a dataset."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (add_config_arg, add_data_args, add_model_args, add_runtime_args, build_model_from_args,
                     parse_options, resolve_device, setup_runtime)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model's accuracy on a dataset", description=__doc__)
    add_config_arg(p)
    add_model_args(p)
    add_data_args(p, split="test")
    p.add_argument("--method", default="dense", help="token reduction: dense, gtp, tome, evit (default: dense)")
    p.add_argument("--r", type=int, default=None, help="tokens removed per block")
    p.add_argument("--budget", type=float, default=None, help="fraction of dense MACs to keep")
    p.add_argument("--option", "-O", action="append", default=[], metavar="OPT=VALUE",
                   help="method option, repeatable (e.g. -O alpha=0.2 -O graph=spatial)")
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..data import build_dataset
    from ..engine import evaluate

    setup_runtime(args)
    device = resolve_device(args)
    model = build_model_from_args(args).to(device)
    extra = {}
    if args.method != "dense":
        from .. import get_reducer, patch
        from ..errors import ConfigError

        opts = parse_options(args.option)
        if args.r is None and args.budget is None:
            raise ConfigError(f"--method {args.method} needs --r or --budget")
        patch(model, args.method, r=args.r, budget=args.budget, **opts)
        red = get_reducer(model)
        extra = {"method": args.method, "schedule": red.schedule, **{k: v for k, v in red.report.items()
                                                                      if isinstance(v, (int, float, str))}}
    ds = build_dataset(args.data, args.split, model, train=False, limit=args.limit)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    res = evaluate(model, loader, device, progress=args.progress)
    row = {"model": args.model, "data": args.data, "split": args.split, **extra, **res.as_dict()}
    if extra:
        print(f"{args.method}: schedule {extra['schedule']}" + (f", {extra['achieved']:.3f} of dense MACs"
                                                                  if "achieved" in extra else ""))
    print(f"{args.model} on {args.data} ({args.split}, {res.n} images): top-1 {res.top1:.2f}%  "
          f"top-5 {res.top5:.2f}%  loss {res.loss:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0
