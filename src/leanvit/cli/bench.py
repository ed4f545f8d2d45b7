"""``leanvit bench``: GMACs, throughput and batch-1 latency of a model, dense or patched with a token-reduction method.

Weights do not change the cost, so timm models are built without pretrained weights (nothing is downloaded);
leanvit reference models load their shipped weights when present. Timings depend on the machine and its load:
compare methods within one run of the Python API (``leanvit.analysis.compare_throughput``) on a shared machine.
``--compile`` times the model after ``torch.compile`` (compilation happens in the untimed warm-up): at batch 1 on
CPU it removes most of the per-op overhead a token reducer's bookkeeping adds.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from ..analysis.machine import machine_info
from ..errors import ConfigError
from .common import (add_config_arg, add_model_args, add_runtime_args, build_model_from_args, parse_options,
                     resolve_device, setup_runtime)

METHODS = ("dense", "gtp", "tome", "evit", "truncate")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure a model's GMACs, throughput and latency", description=__doc__)
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--pretrained", dest="pretrained", action="store_true",
                   help="load pretrained weights (default: only for leanvit_* models with shipped weights)")
    # None = decide from the model name in run(); --no-pretrained / --pretrained force it
    p.set_defaults(pretrained=None)
    p.add_argument("--method", default="dense", choices=METHODS,
                   help="token reduction method to patch in (default: %(default)s)")
    p.add_argument("--r", type=int, default=None, help="tokens removed / merged per block (method's schedule)")
    p.add_argument("--budget", type=float, default=None, help="fraction of the dense MACs to keep, e.g. 0.74")
    p.add_argument("--option", "-O", action="append", default=[], metavar="OPT=VALUE",
                   help="method option, repeatable (e.g. -O score=cls -O graph=spatial)")
    p.add_argument("--compile", action="store_true", help="time the model after torch.compile")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="batch size for throughput (default: %(default)s)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import count_macs, measure_latency, measure_throughput
    from ..analysis.macs import default_input_size
    from ..zoo import has_weights

    for name, value, low in (("--batch-size", args.batch_size, 1), ("--runs", args.runs, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    if args.method == "dense" and (args.r is not None or args.budget is not None):
        raise ConfigError("--r and --budget set a token reduction schedule; pick a --method other than dense")
    if args.model is None:
        from .common import default_model

        args.model = default_model()
    if args.pretrained is None:
        args.pretrained = args.model.startswith("leanvit_") and has_weights(args.model)
    setup_runtime(args)
    device = resolve_device(args)
    model = build_model_from_args(args).to(device).eval()
    opts = parse_options(args.option)
    if args.method != "dense":
        from .. import patch

        patch(model, args.method, r=args.r, budget=args.budget, **opts)
    elif opts:
        raise ConfigError("-O sets options of a token reduction method; pick a --method other than dense")

    macs = count_macs(model, device=device)
    size = default_input_size(model)
    timed = torch.compile(model) if args.compile else model
    tp = measure_throughput(timed, size, batch_size=args.batch_size, warmup=args.warmup, runs=args.runs,
                            device=device)
    lat = measure_latency(timed, size, warmup=args.warmup, runs=args.runs, device=device)
    row = {
        "model": args.model,
        "method": args.method,
        "r": args.r,
        "budget": args.budget,
        "options": opts,
        "compiled": bool(args.compile),
        "gmacs": macs.gmacs,
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
    schedule = ", ".join(f"{k}={v}" for k, v in (("r", args.r), ("budget", args.budget)) if v is not None)
    print(f"model        {args.model}")
    print(f"method       {args.method}{f' ({schedule})' if schedule else ''}"
          f"{' ' + str(opts) if opts else ''}{' [torch.compile]' if args.compile else ''}")
    print(f"GMACs        {macs.gmacs:.3f}")
    print(f"images/s     {tp.images_per_s:.1f}  (batch {args.batch_size}, median of {args.runs} runs)")
    print(f"latency      {lat:.2f} ms  (batch 1)")
    print(f"threads      {tp.threads}  on {device}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0
