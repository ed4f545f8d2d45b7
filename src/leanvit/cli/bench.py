"""``leanvit bench``: GMACs, throughput and batch-1 latency of a model, dense or patched with a token-reduction method.

Weights do not change the cost, so timm models are built without pretrained weights (nothing is downloaded);
leanvit reference models load their shipped weights when present, ``hf:PATH`` its folder's and ``open_clip:ARCH``
its ``--weights`` (random weights without). Timings depend on the machine and its load:
compare methods within one run of the Python API (``leanvit.analysis.compare_throughput``) on a shared machine.
``--compile`` times the model after ``torch.compile`` (compilation happens in the untimed warm-up): at batch 1 on
CPU it removes most of the per-op overhead a token reducer's bookkeeping adds. ``--runtime onnxruntime`` times the
model's ONNX export (checked against PyTorch first) on ONNX Runtime's CPU provider, ``--quantize int8`` with its
linear layers in int8; the MACs are the PyTorch model's (the same graph).

``--batch-sizes 1,2,4,...`` prints where token reduction pays instead: each method's speed-up over the dense model
at every batch size, timed interleaved with it, and the smallest batch from which it is faster, in every runtime of
``--runtime`` (comma-separated: pytorch, compiled, onnxruntime). The methods: the ``--method`` given, else the patch
the model comes with, else every method at ``--budget`` (default 0.74).

Which patch runs follows eval's rule: ``--method dense`` is the unpatched model, no ``--method`` the model as it
comes (the patch its ``--weights`` records, else the one it is created with), and "% of dense" is always relative
to the unpatched model's MACs.
"""
from __future__ import annotations

import argparse
import datetime

from ..analysis.machine import machine_info
from .arguments import add_deploy_args, add_model_args, add_reduction_args, add_runtime_args, batch_sizes
from .build import (adapt_run_record, build_model_from_args, check_method, check_model_name, resolve_device,
                    settle_patch, setup_runtime)
from .export import settle_runtime
from .methods import reduction_amount
from .outputs import check_output_file
from .parsing import add_config_arg, nonneg_int, positive_int
from ..io import write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure a model's GMACs, throughput and latency", description=__doc__)
    add_config_arg(p)
    p.adapt_config = adapt_run_record  # a training run's config.yaml: its model, head and data (cli/build.py)
    add_model_args(p)
    p.add_argument("--pretrained", dest="pretrained", action="store_true",
                   help="load pretrained weights (default: only for leanvit_* models with shipped weights)")
    # None = decide from the model name in run(); --no-pretrained / --pretrained force it
    p.set_defaults(pretrained=None)
    add_reduction_args(p)
    p.set_defaults(method=None)  # no --method: the model as it comes (eval's rule, see the module docstring)
    p.add_argument("--compile", action="store_true", help="time the model after torch.compile (fullgraph)")
    p.add_argument("--amp", choices=("fp16", "bf16"), default=None,
                   help="time under torch.autocast in this dtype (default: full precision)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=32,
                   help="batch size for throughput (default: %(default)s)")
    p.add_argument("--runs", type=positive_int, default=10, help="timed runs (default: %(default)s)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed warm-up runs (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    add_deploy_args(p, several=True, compiled=True)
    p.add_argument("--batch-sizes", type=batch_sizes, default=None, metavar="B1,B2,...",
                   help="the break-even table: speed-up over dense at each batch size (e.g. 1,2,4,8,16,32,64), per "
                        "method and runtime, and the batch from which each method is faster")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from .. import get_reducer, unpatch
    from ..analysis import count_macs, measure_latency, measure_throughput
    from ..analysis.macs import default_input_size
    from ..export import as_runtime
    from ..models.external import is_external
    from ..zoo import has_weights

    # everything the user typed is checked before the model is built
    sweep_budget = None
    if args.batch_sizes and args.method is None and args.budget is not None:  # every method at this budget
        sweep_budget, args.budget = args.budget, None
    check_model_name(args)
    opts = check_method(args)
    check_output_file(args.json, "--json")
    runtimes = settle_runtime(args, several=bool(args.batch_sizes))
    if args.model is None:
        from .arguments import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    if args.pretrained is None and not is_external(args.model):  # hf:/open_clip: load the weights they name
        args.pretrained = args.model.startswith("leanvit_") and has_weights(args.model)
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args).eval()
    source = settle_patch(args, model, opts)
    model = model.to(device)
    red = get_reducer(model)
    # "% of dense" is of the unpatched model, also for a model that comes patched
    dense_macs = count_macs(unpatch(copy.deepcopy(model)) if red is not None else model, device=device)
    macs = count_macs(model, device=device) if red is not None else dense_macs
    method = red.name if red is not None else "dense"
    if args.batch_sizes:
        return _break_even(args, model, runtimes, device, dense_macs, sweep_budget)
    size = default_input_size(model)
    runtime = runtimes[0]
    timed = as_runtime(model, runtime, args.quantize, name=args.model)
    tp = measure_throughput(timed, size, batch_size=args.batch_size, warmup=args.warmup, runs=args.runs,
                            device=device, amp=args.amp)
    lat = measure_latency(timed, size, warmup=args.warmup, runs=args.runs, device=device, amp=args.amp)
    schedule = list(red.schedule) if red is not None else []
    row = {
        "model": args.model,
        "method": method,
        "patch_source": source,
        "r": args.r if args.r is not None else opts.get("r"),
        "budget": red.report.get("budget") if red is not None else None,
        "keep": red.report.get("keep") if red is not None else None,
        "options": red.options() if red is not None else {},
        "schedule": schedule,
        "schedule_counts": red.schedule_counts if red is not None else "removed",
        "compiled": runtime == "compiled",
        "runtime": runtime,
        "quantize": args.quantize,
        "amp": args.amp,
        "gmacs": macs.gmacs,
        "dense_gmacs": dense_macs.gmacs,
        "macs_fraction": macs.macs / dense_macs.macs,
        "images_per_s": tp.images_per_s,
        "latency_ms_b1": lat,
        "batch_size": args.batch_size,
        "runs": args.runs,
        "warmup": args.warmup,
        "threads": tp.threads,
        "device": str(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
    }
    amount = ", ".join(f"{k}={v}" for k, v in reduction_amount(args).items())
    if source in ("model", "weights"):
        amount = ", ".join([*(f"{k}={row[k]}" for k in ("keep", "budget") if row[k] is not None),
                            "as the model comes" if source == "model" else "as --weights records"])
    where = {"pytorch": "", "compiled": " [torch.compile]",
             "onnxruntime": f" [onnxruntime, {args.quantize or 'float32'}]"}[runtime]
    print(f"model        {args.model}")
    print(f"method       {method}{f' ({amount})' if amount else ''}"
          f"{' ' + str(opts) if opts else ''}{where}"
          f"{f' [autocast {args.amp}]' if args.amp else ''}")
    if red is not None:
        print(f"schedule     {schedule}  (image tokens {red.schedule_counts} per block)")
    print(f"GMACs        {macs.gmacs:.3f}  ({100 * row['macs_fraction']:.1f}% of dense {dense_macs.gmacs:.3f})")
    print(f"images/s     {tp.images_per_s:.1f}  (batch {args.batch_size}, median of {args.runs} runs)")
    print(f"latency      {lat:.2f} ms  (batch 1)")
    print(f"threads      {tp.threads}  on {device}")
    if args.json:
        write_json(args.json, row)
    return 0


def _break_even(args: argparse.Namespace, model, runtimes: list[str], device, dense_macs, budget: float | None) -> int:
    """``--batch-sizes``: the break-even table of the method(s) against the unpatched model (module docstring)."""
    import copy

    from .. import get_reducer, patch, unpatch
    from ..analysis import count_macs, machine_summary
    from ..errors import ConfigError, UnsupportedModelError
    from ..export.breakeven import break_even_table, format_break_even
    from ..reduce import METHODS
    from .build import note

    red = get_reducer(model)
    dense = unpatch(copy.deepcopy(model)) if red is not None else model
    if red is not None:
        variants = {red.name: model}
    else:
        budget = 0.74 if budget is None else budget
        note(f"no --method: every method at budget {budget:g} of the dense MACs")
        variants = {}
        for m in METHODS:
            try:
                variants[m] = patch(copy.deepcopy(dense), m, budget=budget)
            except (ConfigError, UnsupportedModelError) as e:  # a method that cannot reach it or refuses the model
                note(f"{m} is left out: {e}")
    fractions = {k: count_macs(v, device=device).macs / dense_macs.macs for k, v in variants.items()}
    rows = break_even_table(dense, variants, args.batch_sizes, runtimes, fractions, args.quantize,
                            warmup=args.warmup, runs=args.runs, rounds=3, progress=args.progress,
                            threads=args.threads, device=device)
    print(f"{args.model} on {device}, {machine_summary(device)}; median of 3 interleaved rounds of {args.runs} runs "
          f"at each batch size")
    print(format_break_even(rows))
    if args.json:
        write_json(args.json, {"model": args.model, "batch_sizes": args.batch_sizes, "runtimes": runtimes,
                               "quantize": args.quantize, "runs": args.runs, "rounds": 3, "warmup": args.warmup,
                               "schedules": {k: list(get_reducer(v).schedule) for k, v in variants.items()},
                               "rows": [r.as_dict() for r in rows], "device": str(device),
                               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                               "machine": machine_info(device)})
    return 0
