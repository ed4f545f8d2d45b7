"""The README's comparison: dense / GTP / ToMe / EViT on the shipped reference model, Fashion-MNIST test set.

Method options come from results/tune_gtp.json (chosen on the held-out split) when it exists; otherwise each
method's defaults. Writes results/compare_fmnist.{json,md} and docs/compare_fmnist.png.

    python benchmarks/compare_fmnist.py --threads 2
"""
from __future__ import annotations

import argparse

from leanvit.analysis import threads_phrase
from leanvit.experiments.compare import format_table, run_comparison
from leanvit.vis import plot_pareto

from common import ROOT, add_threads, parse_args, reference_eval, tuned_options, write

DOCS = ROOT / "docs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.74, 0.6, 0.5])
    add_threads(p)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="compare_fmnist")
    args = parse_args(p)
    name, model, loader = reference_eval(args.model, "test")
    options = tuned_options()
    gtp = {k: v for k, v in options.get("gtp", {}).items() if k != "score"}
    # two GTP variants beside the recommended score, same graph and alpha: the cls score (runs on fused attention)
    # and random selection over three seeds (the paper's selection-score ablation)
    options["gtp-cls"] = {"method": "gtp", **gtp, "score": "cls"}
    options["gtp-random"] = {"method": "gtp", **gtp, "score": "random"}
    methods = ["dense", "gtp", "tome", "evit", "gtp-cls", "gtp-random"]
    rows = run_comparison(model, loader, methods, args.budgets, options, seeds=args.seeds, bench_batch=32,
                          bench_runs=5, progress=False)
    table = format_table(rows)
    DOCS.mkdir(exist_ok=True)
    plot_pareto([r.as_dict() for r in rows], DOCS / "compare_fmnist.png",
                title=f"{name}, Fashion-MNIST test, no fine-tuning")
    opts = "; ".join(f"{m}: {o}" for m, o in options.items())
    md = (f"Model `{name}`, 10,000 test images, options {opts}; throughput at batch 32, "
          f"{threads_phrase(args.threads)}. "
          f"`gtp-cls` selects by cls attention (fused attention, no explicit map); `gtp-random` ranks tokens at "
          f"random (mean ± std over {args.seeds} seeds); all rows timed in one interleaved run.\n\n"
          f"```\n{table}\n```\n\n"
          f"![accuracy vs GMACs](docs/compare_fmnist.png)")
    write(args.name, {"model": name, "options": options, "rows": [r.as_dict() for r in rows]}, md)
    # token maps of the three methods for one test image, for the README
    from leanvit.cli.main import main as cli

    opts = [a for m, o in options.items() if m in ("gtp", "tome", "evit") for k, v in o.items()
            for a in ("-O", f"{m}.{k}={v}")]
    cli(["vis", "--model", name, "--index", "0", "--budget", "0.6", "-o", str(DOCS / "token_maps.png"),
         "--no-progress", *opts])


if __name__ == "__main__":
    main()
