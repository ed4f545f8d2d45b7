"""Choose GTP's alpha and graph (and EViT's fuse) on the held-out split, never on the test set.

Alpha is tuned on the mixed graph (the paper's recommended one), then the spatial and semantic graphs are tried at
that alpha, and alpha is tuned again on the other graph if one of them wins.

Fashion-MNIST's last 5,000 training images (`--split val`) were not used to train the reference models. The
setting with the best mean top-1 over the budgets is written to results/tune_gtp.json, which
benchmarks/compare_fmnist.py then uses on the test set.

    python benchmarks/tune_gtp.py --model leanvit_vit_fm_teacher
"""
from __future__ import annotations

import argparse
import copy
import statistics

import leanvit
from leanvit.engine import evaluate

from common import add_threads, parse_args, reference_eval, table, write


def score(model, method, budgets, loader, **opts) -> list[float]:
    accs = []
    for b in budgets:
        m = leanvit.patch(copy.deepcopy(model), method, budget=b, **opts)
        accs.append(evaluate(m, loader, progress=False).top1)
    return accs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.74, 0.6, 0.5])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0, 3.0])
    add_threads(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--name", default="tune_gtp")
    args = parse_args(p)
    name, model, loader = reference_eval(args.model, "val", args.limit)
    dense = evaluate(model, loader, progress=False).top1
    results = []

    def trial(method: str, **opts) -> None:
        accs = score(model, method, args.budgets, loader, **opts)
        results.append({"method": method, "options": opts, "top1": accs, "mean": statistics.fmean(accs)})
        print(results[-1])

    def best_gtp() -> dict:
        return max((r for r in results if r["method"] == "gtp"), key=lambda r: r["mean"])["options"]

    for alpha in args.alphas:
        trial("gtp", alpha=alpha, graph="mixed")
    best_alpha = best_gtp()["alpha"]
    for graph in ("spatial", "semantic"):
        trial("gtp", alpha=best_alpha, graph=graph)
    # alpha was chosen on the mixed graph: when another graph wins, tune alpha again on that graph
    graph = best_gtp()["graph"]
    if graph != "mixed":
        for alpha in args.alphas:
            if alpha != best_alpha:
                trial("gtp", alpha=alpha, graph=graph)
    for fuse in ("mean", "sum"):
        trial("evit", fuse=fuse)
    trial("tome")
    chosen = {m: max((r for r in results if r["method"] == m), key=lambda r: r["mean"])["options"]
              for m in ("gtp", "evit", "tome")}
    md = [f"Model `{name}`, held-out split (val, {len(loader.dataset)} images), dense top-1 {dense:.2f}%. "
          f"Top-1 % at budgets {', '.join(str(b) for b in args.budgets)}; the best mean is chosen.\n",
          *table(["method", "options", *(f"top-1 @{b}" for b in args.budgets), "mean"],
                 ([r["method"], ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults",
                   *(f"{a:.2f}" for a in r["top1"]), f"{r['mean']:.2f}"] for r in results))]
    md.append("\nChosen: " + "; ".join(f"{m}: {o or 'defaults'}" for m, o in chosen.items()))
    write(args.name, {"model": name, "dense_top1": dense, "results": results, "chosen": chosen,
                      "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
