"""``leanvit compare``: dense vs GTP vs ToMe vs EViT at equal MACs budgets; table, JSON and Pareto plot.

Defaults run the README's main job: the shipped reference teacher on the Fashion-MNIST test set.

A cell a method cannot run (a budget it cannot reach on this model, a model it refuses) is a row with ``-`` figures
and why (``"error"`` in the JSON, left out of the plot); the other cells run. ``dense`` is always the unpatched model;
a model that comes patched (created so, or patched as its ``--weights`` file records) adds a row ``METHOD-shipped``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform

from ..errors import ConfigError
from .arguments import add_data_args, add_deploy_args, add_model_args, add_runtime_args, EVAL_BATCH_SIZE
from .build import (adapt_run_record, as_shipped, build_loader, build_model_from_args, check_model_name, note,
                    resolve_device, setup_runtime, shipped_phrase)
from .export import settle_runtime
from .methods import parse_options
from .outputs import check_output_file
from .parsing import add_config_arg, fraction, nonneg_int, positive_int
from ..io import write_json


def _floats(text: str) -> list[float]:
    values = [t for t in str(text).split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated fractions, e.g. 0.9,0.74")
    return [fraction(t) for t in values]


def _names(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated method names, e.g. dense,gtp,tome")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is named twice in '{text}'")
    return names


def add_parser(sub) -> argparse.ArgumentParser:
    from ..reduce import METHODS

    p = sub.add_parser("compare", help="compare token-reduction methods at equal MACs budgets", description=__doc__)
    add_config_arg(p)
    p.adapt_config = adapt_run_record  # a training run's config.yaml: its model, head and data (cli/build.py)
    add_model_args(p)
    add_data_args(p, split="test", batch_size=EVAL_BATCH_SIZE)
    p.add_argument("--methods", type=_names, default=["dense", "gtp", "tome", "evit"],
                   help=f"comma-separated methods ({', '.join(['dense', *METHODS])}) or labels (default: "
                        "dense,gtp,tome,evit); a label runs a method "
                        "with other options beside it, e.g. --methods dense,gtp,gtp-cls -O gtp-cls.method=gtp "
                        "-O gtp-cls.score=cls; a label with a keep or r option runs once at that schedule "
                        "(-O evit-k.method=evit -O evit-k.keep=0.7)")
    p.add_argument("--budgets", type=_floats, default=[0.9, 0.74, 0.6, 0.5],
                   help="fractions of dense MACs to keep (default: 0.9,0.74,0.6,0.5)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="METHOD.OPT=VALUE",
                   help="method option, repeatable (e.g. -O gtp.alpha=0.2 -O evit.fuse=sum)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="repetitions where selection is random (default: 3)")
    p.add_argument("--bench-batch", type=positive_int, default=32, help="batch size for the throughput column")
    p.add_argument("--bench-runs", type=nonneg_int, default=3,
                   help="timed runs per model and round, 3 rounds (default: 3; 0 skips timing)")
    p.add_argument("--compile", action="store_true",
                   help="time every variant after torch.compile(fullgraph=True) (accuracy is evaluated eagerly)")
    p.add_argument("--amp", choices=("fp16", "bf16"), default=None,
                   help="time under torch.autocast in this dtype (accuracy is evaluated in full precision)")
    p.add_argument("--no-accuracy", action="store_true", help="skip evaluation (MACs and speed only)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-GMACs plot (PNG/PDF/SVG)")
    add_deploy_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import threads_phrase
    from ..experiments.compare import format_table, run_comparison
    from ..reduce.registry import resolve_method
    from ..vis import plot_pareto

    # everything the user typed is checked before the model or the data is loaded
    check_model_name(args)
    options = parse_options(args.option, per_method=True)
    for m in options:
        if m not in args.methods:
            raise ConfigError(f"option given for '{m}', which is not among --methods {','.join(args.methods)}")
    for m in args.methods:
        if m != "dense":
            resolve_method(m, options)  # unknown names and ill-typed options fail here
    if args.plot and args.no_accuracy:
        raise ConfigError("--plot needs accuracy; drop --no-accuracy")
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot", plot=True)
    runtime = settle_runtime(args)[0]
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args, evaluated=not args.no_accuracy).eval()
    shipped = as_shipped(args, model)
    if shipped is not None:
        from .. import get_reducer

        note(f"{shipped_phrase(args, shipped)}; it runs as row {get_reducer(model).name}-shipped, and dense runs it "
             f"unpatched")
    model = model.to(device)
    loader = None if args.no_accuracy else build_loader(args, model)
    rows = run_comparison(model, loader, args.methods, args.budgets, options, seeds=args.seeds,
                          bench_batch=args.bench_batch, bench_runs=args.bench_runs, device=device,
                          progress=args.progress, compile=args.compile, amp=args.amp, runtime=runtime,
                          quantize=args.quantize)
    n = len(loader.dataset) if loader is not None else 0
    where = "" if runtime == "pytorch" else f", {runtime} {args.quantize or 'float32'}"
    print(f"{args.model} on {args.data} ({args.split}, {n} images), {device}{where}, {threads_phrase()}, "
          f"throughput at batch {args.bench_batch}")
    print(format_table(rows))
    skipped = [r for r in rows if r.error is not None]
    if skipped:
        # a label with its own schedule (keep or r) has no budget (NaN)
        cells = ", ".join(r.method if math.isnan(r.budget) else f"{r.method}@{r.budget:g}" for r in skipped)
        print(f"{len(skipped)} of {len(rows)} cells not run: {cells}")
    meta = {"model": args.model, "data": args.data, "split": args.split, "images": n, "device": str(device),
            "threads": torch.get_num_threads(), "bench_batch": args.bench_batch, "torch": torch.__version__,
            "runtime": runtime, "quantize": args.quantize,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            # the patch the model comes with (its row is METHOD-shipped): "weights" or "model", in a few words
            "patch_source": shipped[0] if shipped else None, "shipped_patch": shipped[1] if shipped else None}
    dicts = [{**r.as_dict(), "model": args.model} for r in rows]
    if args.json:
        write_json(args.json, {"meta": meta, "rows": dicts})
        print(f"rows written to {args.json}")
    if args.plot:
        ran = [d for d in dicts if d.get("error") is None]  # a cell that did not run has no point
        plot_pareto(ran, args.plot, title=f"{args.model} on {args.data} {args.split}")
        print(f"plot written to {args.plot}")
    return 0
