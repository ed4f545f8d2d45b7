"""GTP selection-score ablation on the held-out split (the paper's Table: which tokens to propagate).

    python benchmarks/ablate_gtp_score.py --budgets 0.74 0.6 --alpha 0.4 --graph spatial
"""
from __future__ import annotations

import argparse
import copy

import torch

import leanvit
from leanvit.engine import evaluate
from leanvit.ops.select import SCORES

from common import reference_eval, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.74, 0.6])
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--graph", default="spatial")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="gtp_scores")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name, model, loader = reference_eval(args.model, "val", args.limit)
    dense = evaluate(model, loader, progress=False).top1
    rows = []
    for score in SCORES:
        accs = []
        for b in args.budgets:
            torch.manual_seed(0)
            m = leanvit.patch(copy.deepcopy(model), "gtp", budget=b, score=score, alpha=args.alpha,
                              graph=args.graph)
            accs.append(evaluate(m, loader, progress=False).top1)
        rows.append({"score": score, "top1": accs})
        print(rows[-1])
    md = [f"Model `{name}`, held-out split ({len(loader.dataset)} images), dense top-1 {dense:.2f}%; GTP with "
          f"alpha={args.alpha}, graph={args.graph}; `random` uses seed 0.\n",
          "| score | " + " | ".join(f"top-1 @{b}" for b in args.budgets) + " |",
          "|---|" + "---|" * len(args.budgets)]
    md += [f"| {r['score']} | " + " | ".join(f"{a:.2f}" for a in r["top1"]) + " |" for r in rows]
    write(args.name, {"model": name, "dense_top1": dense, "rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
