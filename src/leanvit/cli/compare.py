"""``leanvit compare``: dense vs GTP vs ToMe vs EViT at equal MACs budgets; table, JSON and Pareto plot.

Defaults run the README's main job: the shipped reference teacher on the Fashion-MNIST test set.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path

from ..errors import ConfigError
from .common import (add_config_arg, add_data_args, add_model_args, add_runtime_args, build_model_from_args,
                     parse_options, resolve_device, setup_runtime)


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare token-reduction methods at equal MACs budgets", description=__doc__)
    add_config_arg(p)
    add_model_args(p)
    add_data_args(p, split="test")
    p.add_argument("--methods", type=_names, default=["dense", "gtp", "tome", "evit"],
                   help="comma-separated methods or labels (default: dense,gtp,tome,evit); a label runs a method "
                        "with other options beside it, e.g. --methods dense,gtp,gtp-cls -O gtp-cls.method=gtp "
                        "-O gtp-cls.score=cls")
    p.add_argument("--budgets", type=_floats, default=[0.9, 0.74, 0.6, 0.5],
                   help="fractions of dense MACs to keep (default: 0.9,0.74,0.6,0.5)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="METHOD.OPT=VALUE",
                   help="method option, repeatable (e.g. -O gtp.alpha=0.2 -O evit.fuse=sum)")
    p.add_argument("--seeds", type=int, default=3, help="repetitions where selection is random (default: 3)")
    p.add_argument("--bench-batch", type=int, default=32, help="batch size for the throughput column")
    p.add_argument("--bench-runs", type=int, default=5, help="timed runs per round (0 skips timing)")
    p.add_argument("--no-accuracy", action="store_true", help="skip evaluation (MACs and speed only)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-GMACs plot (PNG/PDF/SVG)")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ..data import build_dataset
    from ..reduce.compare import format_table, resolve_method, run_comparison
    from ..vis import plot_pareto

    setup_runtime(args)
    device = resolve_device(args)
    options = parse_options(args.option, per_method=True)
    for m in options:
        if m not in args.methods:
            raise ConfigError(f"option given for '{m}', which is not among --methods {','.join(args.methods)}")
    for m in args.methods:
        if m != "dense":
            resolve_method(m, options)  # unknown names fail here, before the model and data are loaded
    model = build_model_from_args(args).to(device).eval()
    loader = None
    if not args.no_accuracy:
        ds = build_dataset(args.data, args.split, model, train=False, limit=args.limit)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    rows = run_comparison(model, loader, args.methods, args.budgets, options, seeds=args.seeds,
                          bench_batch=args.bench_batch, bench_runs=args.bench_runs, device=device,
                          progress=args.progress)
    n = len(loader.dataset) if loader is not None else 0
    print(f"{args.model} on {args.data} ({args.split}, {n} images), {device}, {torch.get_num_threads()} threads, "
          f"throughput at batch {args.bench_batch}")
    print(format_table(rows))
    meta = {"model": args.model, "data": args.data, "split": args.split, "images": n, "device": str(device),
            "threads": torch.get_num_threads(), "bench_batch": args.bench_batch, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    dicts = [{**r.as_dict(), "model": args.model} for r in rows]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": dicts}, indent=1))
    if args.plot:
        if loader is None:
            raise ConfigError("--plot needs accuracy; drop --no-accuracy")
        plot_pareto(dicts, args.plot, title=f"{args.model} on {args.data} {args.split}")
        print(f"plot written to {args.plot}")
    return 0
