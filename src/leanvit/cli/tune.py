"""``leanvit tune``: the fastest token-reduction configuration within an accuracy drop, or the most accurate one at a
speed-up, on this machine; written as a recipe the other verbs apply (``--recipe``).

    leanvit tune leanvit_vit_fm_teacher --data fmnist --max-drop 0.5          # top-1 points below dense, held out
    leanvit tune leanvit_vit_fm_teacher --data fmnist --target-speedup 1.4    # at least 1.4x dense's images/s
    leanvit eval --recipe tuned.yaml                                          # the tuned model on the test split

Selection reads only the held-out split (``--heldout-split``, default ``val``: for Fashion-MNIST the last 5,000
training images, which the shipped models never trained on; for an image folder its val/ folder or a seeded 10% of
its training images); the test split is read once, after the choice, for the chosen configuration and dense.
Speed is measured here, at ``--runtime`` and ``--bench-batch``, interleaved with the dense model. The search (bisection
on each method's MACs budget, successive halving of its option grid; ``leanvit.experiments.tune`` says what it
assumes and where it can miss) prints a line per stage.

It writes the recipe (``-o``, YAML: method, per-block schedule, options, and the held-out and test top-1, speed-up,
runtime, batch, machine and versions it was measured with), every configuration tried (``--json``) and their
accuracy against speed with the chosen one marked (``--plot``). When nothing meets the constraint it says so, names
the best configuration found and writes no recipe (exit status 1).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .arguments import EVAL_BATCH_SIZE, add_model_args, add_runtime_args
from .build import as_shipped, build_model_from_args, check_model_name, note, resolve_device, setup_runtime
from .methods import parse_options
from .outputs import check_output_file
from .parsing import add_config_arg, fraction, nonneg_float, nonneg_int, positive_float, positive_int
from ..io import write_json

_SPLITS = ("train", "val", "trainval", "test")


def _names(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated method names, e.g. gtp,tome")
    return names


def add_parser(sub) -> argparse.ArgumentParser:
    from ..experiments.tune import DEFAULT_SPACE, TRAINING_FREE
    from ..export import RUNTIMES

    p = sub.add_parser("tune", help="find the fastest token reduction within an accuracy drop (or the most accurate "
                                    "at a speed-up) and write it as a recipe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="the model to tune (or --model)")
    add_model_args(p)
    p.add_argument("--data", "-d", default="fmnist",
                   help="fmnist[:PATH] | imagefolder:PATH | synthetic[:N] (default: %(default)s)")
    p.add_argument("--heldout-split", default="val", choices=_SPLITS,
                   help="the split carved from the training data that selection reads (default: %(default)s)")
    p.add_argument("--test-split", default="test", choices=_SPLITS,
                   help="the split read once, for the chosen configuration (default: %(default)s)")
    p.add_argument("--no-test", action="store_true", help="do not read a test split")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N held-out images")
    p.add_argument("--batch-size", "-b", type=positive_int, default=EVAL_BATCH_SIZE,
                   help="evaluation batch size (default: %(default)s)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader worker processes")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: skip unreadable images (listed) instead of stopping at the first")
    p.add_argument("--max-drop", type=nonneg_float, default=None, metavar="POINTS",
                   help="the most held-out top-1 points the configuration may lose against dense; the fastest wins")
    p.add_argument("--target-speedup", type=positive_float, default=None, metavar="X",
                   help="the least measured speed-up over dense (above 1); the most accurate wins")
    p.add_argument("--runtime", default="pytorch", choices=RUNTIMES,
                   help="how the configurations run when timed, as in bench: pytorch (eager), compiled "
                        "(torch.compile(fullgraph=True)) or onnxruntime (exported to ONNX, float32, on the CPU); one "
                        "compilation or export per timed configuration; accuracy is evaluated in PyTorch, whose "
                        "outputs the others reproduce (default: %(default)s)")
    p.add_argument("--amp", choices=("fp16", "bf16"), default=None,
                   help="time under torch.autocast in this dtype (pytorch and compiled runtimes)")
    p.add_argument("--bench-batch", type=positive_int, default=32, help="batch size of the timing (default: 32)")
    p.add_argument("--bench-runs", type=positive_int, default=5,
                   help="timed runs per model and round in the final timing, 3 rounds (default: %(default)s)")
    shipped = ", ".join(m for m in DEFAULT_SPACE if m not in TRAINING_FREE)
    p.add_argument("--methods", type=_names, default=None,
                   help=f"methods to search (default: {', '.join(TRAINING_FREE)}, and on a model fine-tuned with a "
                        f"patch ({shipped}: a zoo *_idle* model, or --weights that record it) that method too)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="METHOD.OPT=VALUE",
                   help="the values of an option to search, replacing the default grid: one value fixes it, a "
                        "list searches them (-O gtp.alpha=[0.5,1.5] -O tome.prop_attn=true)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="order of the held-out images (default: 0)")
    p.add_argument("--min-budget", type=fraction, default=0.2,
                   help="lowest MACs budget searched (default: %(default)s)")
    p.add_argument("--tol", type=fraction, default=0.02, help="budget resolution of the bisection (default: 0.02)")
    p.add_argument("--output", "-o", default="tuned.yaml", help="the recipe to write (default: %(default)s)")
    p.add_argument("--json", default=None, help="every configuration tried (default: the recipe's name + .json)")
    p.add_argument("--plot", default=None,
                   help="accuracy against speed of every configuration tried (default: the recipe's name + .png)")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _outputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    out = check_output_file(args.output, "--output")
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--output {out}: a recipe is a YAML file; give a name ending in .yaml")
    json_path = Path(args.json) if args.json else out.with_name(out.stem + ".json")
    plot_path = Path(args.plot) if args.plot else out.with_name(out.stem + ".png")
    check_output_file(json_path, "--json")
    check_output_file(plot_path, "--plot", plot=True)
    if len({out.resolve(), json_path.resolve(), plot_path.resolve()}) < 3:
        raise ConfigError(f"--output, --json and --plot must be three files, got {out}, {json_path}, {plot_path}")
    return out, json_path, plot_path


def _space(items: list[str]) -> dict[str, dict[str, Any]]:
    """``-O METHOD.OPT=VALUE`` as option lists (a YAML list searches its values, a scalar fixes the option)."""
    space = parse_options(items, per_method=True)
    return {m: {k: (v if isinstance(v, list) else [v]) for k, v in opts.items()} for m, opts in space.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import machine_info, threads_phrase
    from ..data import build_dataset
    from ..experiments.tune import search_space, tune
    from ..reduce.recipe import write_recipe
    from ..vis.tune import plot_tune

    # everything the user typed is checked before the model or the data is loaded
    if args.model_arg is not None:
        if args.model is not None and args.model != args.model_arg:
            raise ConfigError(f"the model is given twice: {args.model_arg} and --model {args.model}")
        args.model = args.model_arg
    check_model_name(args)
    if (args.max_drop is None) == (args.target_speedup is None):
        raise ConfigError("give one constraint: --max-drop POINTS (top-1 below dense on the held-out split) or "
                          "--target-speedup X (measured speed-up over dense)")
    if args.target_speedup is not None and args.target_speedup <= 1.0:
        raise ConfigError(f"--target-speedup must be above 1 (a speed-up over dense), got {args.target_speedup:g}")
    if not args.no_test and args.heldout_split == args.test_split:
        raise ConfigError(f"--heldout-split and --test-split are both '{args.test_split}': selection must not read "
                          f"the split it is reported on")
    space = _space(args.option)
    out, json_path, plot_path = _outputs(args)
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args, evaluated=True).eval()
    shipped = as_shipped(args, model)  # the patch its --weights record (or it is created with) joins the search
    if shipped is not None:
        note(f"{args.model} comes with a patch ({shipped[1]}, from its {shipped[0]}): tuned from its weights "
             f"unpatched, and that method joins the search")
    search_space(model, args.methods, space)  # methods and option values checked before any data is read
    heldout = build_dataset(args.data, args.heldout_split, model, limit=args.limit, skip_bad=args.skip_bad_images,
                            progress=args.progress)
    if str(args.data).split(":")[0].strip().lower() == "synthetic":
        note("synthetic data are random images with random labels, the same in every split: their top-1 is chance "
             "level and tells the configurations apart by noise only (a smoke test, not a tuning)")
    test = None
    if not args.no_test:
        try:
            test = build_dataset(args.data, args.test_split, model, skip_bad=args.skip_bad_images,
                                 progress=args.progress)
        except DataError as e:
            raise DataError(f"{e} (or give --no-test)") from None
        _check_disjoint(heldout, test, args)
    t0 = _dt.datetime.now(_dt.timezone.utc)
    result = tune(model.to(device), heldout, test, max_drop=args.max_drop, target_speedup=args.target_speedup,
                  methods=args.methods, space=space, runtime=args.runtime, amp=args.amp, batch=args.bench_batch,
                  device=device, seed=args.seed, min_budget=args.min_budget, tol=args.tol,
                  eval_batch=args.batch_size, workers=args.workers, bench_runs=args.bench_runs,
                  progress=args.progress)
    import timm

    from .. import __version__

    versions = {"leanvit": __version__, "timm": timm.__version__, "torch": torch.__version__}
    machine = machine_info(device)
    meta = {"model": args.model, "weights": args.weights, "data": args.data, "heldout_split": args.heldout_split,
            "test_split": None if args.no_test else args.test_split, "date": t0.isoformat(timespec="seconds"),
            "machine": machine, "versions": versions, "seconds": round(result.stages.get("total", 0.0), 1)}
    write_json(json_path, {"meta": meta, **result.as_dict()})
    plot_tune(result, plot_path, title=f"{args.model} on {args.data} ({args.heldout_split}), {args.runtime}, batch "
                                       f"{args.bench_batch}, {threads_phrase()}")
    where = f"trials written to {json_path}, plot to {plot_path}"
    if not result.met:
        print(f"{args.model}: {result.message}")
        print(where)
        print("leanvit: no recipe written: nothing tried meets the constraint", file=sys.stderr)
        return 1
    rec = result.recipe(name=args.model, weights=args.weights,
                        heldout={"data": args.data, "split": args.heldout_split},
                        **({"test": {"split": args.test_split}} if test is not None else {}),
                        tuned={"date": meta["date"], "seconds": meta["seconds"], "seed": args.seed},
                        machine=machine, versions=versions)
    write_recipe(rec, out)
    c = result.chosen
    print(f"{args.model}: {c.method} {_opts(c.options)}, schedule {c.schedule} ({c.schedule_counts} per block), "
          f"{100 * c.macs_fraction:.1f}% of dense MACs")
    line = f"held-out top-1 {c.top1:.2f}% (dense {result.dense['heldout_top1']:.2f}%, {c.images} images)"
    if result.test is not None:
        line += (f"   test top-1 {result.test['top1']:.2f}% (dense {result.dense['test_top1']:.2f}%, "
                 f"{result.test['images']} images)")
    print(line)
    print(f"speed-up {c.speedup:.2f}x ({c.images_per_s:.1f} vs {c.dense_images_per_s:.1f} images/s, {args.runtime}, "
          f"batch {args.bench_batch}, {device}, {threads_phrase()}); tuned in {meta['seconds']:.0f} s")
    print(f"recipe written to {out} (leanvit eval --recipe {out}); {where}")
    return 0


def _opts(options: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "(defaults)"


def _check_disjoint(heldout, test, args: argparse.Namespace) -> None:
    """Refuse a held-out split that shares images with the test split (an image folder whose val/ folder is also
    its test split, when it has no test/ folder): selection would read the images it is reported on."""
    def paths(ds) -> set[str]:
        base = getattr(ds, "dataset", ds)
        return {s[0] for s in getattr(base, "samples", [])}

    shared = paths(heldout) & paths(test)
    if shared:
        raise DataError(f"{args.data}: the {args.heldout_split} and {args.test_split} splits share {len(shared)} "
                        f"images (an image folder without a test/ folder tests on val/): give the folder a test/ "
                        f"folder, or hold out part of its training images with --heldout-split val after moving "
                        f"val/ to test/")
