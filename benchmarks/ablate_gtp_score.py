"""GTP selection-score ablation on the held-out split (the paper's Table: which tokens to propagate), with two
diagnostics that explain the ranking on Fashion-MNIST:

* *object removed*: the share of the image's object patches (patches that are not pure black background) that are
  gone by the last block. Random selection removes the same share of object and background patches; a score that
  recognises unimportant tokens should remove background first and so fewer object patches.
* *lost*: the share of removed tokens that had no kept neighbour in the graph, whose features are dropped
  instead of propagated.

    python benchmarks/ablate_gtp_score.py --budgets 0.74 0.6 --alpha 0.4 --graph spatial
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import leanvit
from leanvit.engine import evaluate
from leanvit.ops.select import SCORES

from common import add_threads, parse_args, reference_eval, table, tuned_options, write


def object_patches(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, N)`` bool: the grid cell holds at least one pixel above the image's background (its minimum)."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    cells = F.adaptive_max_pool2d((images - low).amax(1, keepdim=True), grid)  # (B, 1, gh, gw)
    return (cells > 1e-3).flatten(1)


@torch.no_grad()
def diagnose(model, loader, grid) -> dict[str, float]:
    """Top-1 with the stats above, from the reducer's trace of which original patches each block removed."""
    red = leanvit.get_reducer(model)
    correct = n = obj_removed = obj_total = 0
    for images, targets in loader:
        logits = model(images)
        correct += (logits.argmax(1) == targets).sum().item()
        n += targets.numel()
        obj = object_patches(images, grid)
        gone = torch.zeros_like(obj)
        for step in red.trace_log:
            gone |= step["removed_source"].any(1)
        obj_removed += (gone & obj).sum().item()
        obj_total += obj.sum().item()
    removed = float(red.report["removed_tokens"])
    return {"top1": 100.0 * correct / n, "object_removed": 100.0 * obj_removed / obj_total,
            "lost": 100.0 * float(red.report["lost_tokens"]) / removed if removed else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.74, 0.6])
    p.add_argument("--alpha", type=float, default=None, help="default: the tuned value in results/tune_gtp.json")
    p.add_argument("--graph", default=None, help="default: the tuned graph in results/tune_gtp.json")
    p.add_argument("--limit", type=int, default=None)
    add_threads(p)
    p.add_argument("--name", default="gtp_scores")
    args = parse_args(p)
    tuned = tuned_options().get("gtp", {})
    alpha = args.alpha if args.alpha is not None else tuned.get("alpha", 0.1)
    graph = args.graph or tuned.get("graph", "mixed")
    name, model, loader = reference_eval(args.model, "val", args.limit)
    dense = evaluate(model, loader, progress=False).top1
    grid = tuple(model.patch_embed.grid_size)
    rows = []
    for score in SCORES:
        row = {"score": score, "top1": [], "object_removed": [], "lost": []}
        for b in args.budgets:
            torch.manual_seed(0)
            m = leanvit.patch(copy.deepcopy(model), "gtp", budget=b, score=score, alpha=alpha, graph=graph,
                              stats=True, trace=True)
            for key, value in diagnose(m, loader, grid).items():
                row[key].append(value)
        rows.append(row)
        print(row)
    cols = [f"{what} @{b}" for b in args.budgets for what in ("top-1", "object removed %", "lost %")]
    md = [f"Model `{name}`, held-out split ({len(loader.dataset)} images), dense top-1 {dense:.2f}%; GTP with "
          f"alpha={alpha}, graph={graph}; `random` uses seed 0. *Object removed*: share of the non-background "
          f"patches removed by the last block. *Lost*: share of removed tokens with no kept graph neighbour.\n",
          *table(["score", *cols],
                 ([r["score"], *(f"{r[k][i]:.2f}" for i in range(len(args.budgets))
                                 for k in ("top1", "object_removed", "lost"))] for r in rows))]
    write(args.name, {"model": name, "dense_top1": dense, "alpha": alpha, "graph": graph, "rows": rows,
                      "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
