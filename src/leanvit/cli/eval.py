"""``leanvit eval``: top-1 / top-5 of a model (optionally patched with a token-reduction method) on a dataset.

Which patch runs (the rule of eval, bench and compare): ``--method dense`` runs the model unpatched, also one that
comes patched; with no ``--method`` the model runs as it comes (the patch its ``--weights`` file records, else the
one it is created with, e.g. ``leanvit_vit_fm_teacher_idle70``), and a note says so; ``--method METHOD`` replaces
any patch. The JSON records the method and schedule that ran and where the patch came from (``patch_source``).
``--num-classes`` other than the head the weights bring is refused: a new head would be untrained.
"""
from __future__ import annotations

import argparse

from .arguments import (add_data_args, add_deploy_args, add_model_args, add_reduction_args, add_runtime_args,
                        EVAL_BATCH_SIZE)
from .build import (adapt_run_record, build_loader, build_model_from_args, check_method, check_model_name,
                    resolve_device, settle_patch, setup_runtime)
from .export import settle_runtime
from .outputs import check_output_file
from .parsing import add_config_arg
from ..io import write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model's accuracy on a dataset", description=__doc__)
    add_config_arg(p)
    p.adapt_config = adapt_run_record  # a training run's config.yaml: its model, head and data (cli/build.py)
    add_model_args(p)
    add_data_args(p, split="test", batch_size=EVAL_BATCH_SIZE)
    add_reduction_args(p)
    p.set_defaults(method=None)  # no --method: the model as it comes (see the module docstring)
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    add_deploy_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import evaluate
    from .. import get_reducer

    # everything the user typed is checked before the model or the data is loaded
    check_model_name(args)
    opts = check_method(args)
    check_output_file(args.json, "--json")
    runtime = settle_runtime(args)[0]
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args, evaluated=True)
    source = settle_patch(args, model, opts)
    model = model.to(device)
    red = get_reducer(model)
    extra = {"method": red.name if red is not None else "dense", "patch_source": source,
             "schedule": list(red.schedule) if red is not None else [],
             "schedule_counts": red.schedule_counts if red is not None else "removed",
             "options": red.options() if red is not None else {}}
    extra.update(runtime=runtime, quantize=args.quantize)
    if red is not None:
        red.set_stats(runtime == "pytorch")  # the lost-token counters run in the PyTorch forward only
        extra.update({k: v for k, v in red.report.items() if isinstance(v, (int, float, str)) and k not in extra})
    loader = build_loader(args, model)
    net = model
    if runtime != "pytorch":
        from ..export import as_runtime

        net = as_runtime(model.eval(), runtime, args.quantize, name=args.model)
    res = evaluate(net, loader, device, progress=args.progress)
    if red is not None:
        extra.update(red.stats_summary())
    row = {"model": args.model, "data": args.data, "split": args.split, **extra, **res.as_dict()}
    if red is not None:
        print(f"{red.name}: image tokens {red.schedule_counts} per block {red.schedule}"
              + (f", {extra['achieved']:.3f} of dense MACs" if "achieved" in extra else "")
              + (f", {100 * extra['lost_token_fraction']:.1f}% of removed tokens lost (no kept neighbour)"
                 if "lost_token_fraction" in extra else ""))
    where = "" if runtime == "pytorch" else f" [{runtime}{' ' + args.quantize if args.quantize else ''}]"
    print(f"{args.model}{where} on {args.data} ({args.split}, {res.n} images): top-1 {res.top1:.2f}%  "
          f"top-5 {res.top5:.2f}%  loss {res.loss:.4f}")
    if args.json:
        write_json(args.json, row)
    return 0
