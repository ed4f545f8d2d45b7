"""``leanvit eval``: top-1 / top-5 of a model (optionally patched with a token-reduction method) on a dataset."""
from __future__ import annotations

import argparse

from .arguments import add_data_args, add_model_args, add_reduction_args, add_runtime_args, EVAL_BATCH_SIZE
from .build import build_loader, build_model_from_args, check_model_name, resolve_device, setup_runtime
from .methods import check_method_args, reduction_amount
from .outputs import check_output_file
from .parsing import add_config_arg
from ..io import write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model's accuracy on a dataset", description=__doc__)
    add_config_arg(p)
    add_model_args(p)
    add_data_args(p, split="test", batch_size=EVAL_BATCH_SIZE)
    add_reduction_args(p)
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import evaluate

    # everything the user typed is checked before the model or the data is loaded
    check_model_name(args)
    opts = check_method_args(args)
    check_output_file(args.json, "--json")
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args).to(device)
    extra, red = {}, None
    if args.method != "dense":
        from .. import get_reducer, patch

        patch(model, args.method, **reduction_amount(args), **opts)
        red = get_reducer(model)
        red.set_stats(True)
        extra = {"method": args.method, "schedule": red.schedule, "schedule_counts": red.schedule_counts, "options": red.options(),
                 **{k: v for k, v in red.report.items() if isinstance(v, (int, float, str))}}
    loader = build_loader(args, model)
    res = evaluate(model, loader, device, progress=args.progress)
    if red is not None:
        extra.update(red.stats_summary())
    row = {"model": args.model, "data": args.data, "split": args.split, **extra, **res.as_dict()}
    if red is not None:
        print(f"{args.method}: image tokens {red.schedule_counts} per block {red.schedule}" + (f", {extra['achieved']:.3f} of dense MACs"
                                                          if "achieved" in extra else "")
              + (f", {100 * extra['lost_token_fraction']:.1f}% of removed tokens lost (no kept neighbour)"
                 if "lost_token_fraction" in extra else ""))
    print(f"{args.model} on {args.data} ({args.split}, {res.n} images): top-1 {res.top1:.2f}%  "
          f"top-5 {res.top5:.2f}%  loss {res.loss:.4f}")
    if args.json:
        write_json(args.json, row)
    return 0
