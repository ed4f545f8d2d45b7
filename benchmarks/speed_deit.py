"""Token-reduction speed on DeiT-S / DeiT-B at 224 (weights do not matter for speed).

Rows, all timed in one interleaved run per model and batch size: dense; the ideal row (the same schedule applied
by plain truncation, zero overhead: the physical limit); GTP; GTP with the cls score (runs on fused attention,
no explicit attention map); ToMe; EViT; IdleViT at the keep rate its budget gives, with its own ideal row (the
truncation that computes its token counts: before the attention). Reported: GMACs, images/s, speed-up over dense,
and the share of its ideal row's gain that each method keeps ("efficiency"). Every table names the host (processor,
cores, L2 and L3 as the host reports them) and the slice of the attention map that GTP's explicit CPU attention
computes at a time there (:mod:`leanvit.ops.host`), since CPU speed-ups depend on both.

With ``--compile`` every model (dense and ideal included) is wrapped in ``torch.compile`` first, which removes the
per-op dispatch cost that dominates a reducer's bookkeeping at batch 1 on CPU; compilation happens in the untimed
warm-up runs.

    python benchmarks/speed_deit.py --models deit_small_patch16_224 deit_base_patch16_224 --budget 0.74
    python benchmarks/speed_deit.py --models deit_small_patch16_224 --compile --name speed_deit_compiled
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import leanvit
from leanvit.analysis import compare_throughput, count_macs, threads_phrase
from leanvit.analysis.macs import default_input_size
from leanvit.ops import host

from common import add_threads, fmt, ideal_truncation, median_and_best, parse_args, share_of_ideal, table, write


IDEAL_OF = {"idle": "ideal (idle)"}  # a method whose token counts are not GTP's schedule has an ideal row of its own


def _efficiency(speed: dict[str, float], k: str) -> float | None:
    """The share of its ideal row's gain that row ``k`` keeps (None for the dense row)."""
    if k == "dense":
        return None
    ideal = IDEAL_OF.get(k, k if k.startswith("ideal") else "ideal (truncate)")
    return share_of_ideal(speed[k] / speed["dense"], speed[ideal] / speed["dense"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    p.add_argument("--budget", type=float, default=0.74)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    add_threads(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (all rows)")
    p.add_argument("--name", default="speed_deit")
    args = parse_args(p)
    rows = []
    for name in args.models:
        dense = timm.create_model(name, pretrained=False).eval()
        models = {"dense": dense}
        gtp = leanvit.patch(copy.deepcopy(dense), "gtp", budget=args.budget)
        sched = leanvit.get_reducer(gtp).report["schedule"]
        models["ideal (truncate)"] = ideal_truncation(dense, gtp)
        models["gtp"] = gtp
        models["gtp (cls score)"] = leanvit.patch(copy.deepcopy(dense), "gtp", r=sched, score="cls")
        models["tome"] = leanvit.patch(copy.deepcopy(dense), "tome", budget=args.budget)
        models["evit"] = leanvit.patch(copy.deepcopy(dense), "evit", budget=args.budget)
        idle = leanvit.patch(copy.deepcopy(dense), "idle", budget=args.budget)
        models["ideal (idle)"] = ideal_truncation(dense, idle)
        models["idle"] = idle
        macs = {k: count_macs(m).macs for k, m in models.items()}
        # dynamic=False: one static graph per batch size (a second batch size would otherwise recompile the
        # model with a dynamic batch dimension, which can be slower than a static graph)
        timed = ({k: torch.compile(m, dynamic=False, fullgraph=True) for k, m in models.items()}
                 if args.compile else models)
        if args.compile:
            # every row shares the same forward code (timm's and leanvit's), and dynamo counts recompilations per
            # code object: past its limit (8) it would silently run the remaining rows eagerly
            n = len(models) * len(args.batch_sizes) + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, n)
        for bs in args.batch_sizes:
            runs = args.runs if bs > 1 else args.runs * 10  # batch 1 is short and noisy: time more runs
            reps = compare_throughput(timed, input_size=default_input_size(dense), batch_size=bs, warmup=2,
                                      runs=runs, rounds=args.rounds, reports=True)
            med, best = median_and_best(reps, bs)
            for k, m in models.items():
                red = leanvit.get_reducer(m)
                rows.append({"model": name, "batch": bs, "method": k, "gmacs": macs[k] / 1e9,
                             "macs_ratio": macs[k] / macs["dense"], "images_per_s": med[k],
                             "speedup": med[k] / med["dense"], "efficiency": _efficiency(med, k),
                             "images_per_s_best": best[k], "speedup_best": best[k] / best["dense"],
                             "efficiency_best": _efficiency(best, k), "schedule": red.schedule if red else []})
    mode = "every model torch.compile-d (default mode, fullgraph=True, dynamic=False); " if args.compile else "eager; "
    chunk = host.format_bytes(host.probs_chunk_bytes(args.threads))
    md = [f"Host: {host.describe().summary()}; explicit attention computed {chunk} of the map at a time "
          f"(`python -m leanvit.ops`). Budget {args.budget} of dense MACs; {threads_phrase(args.threads)}; {mode}"
          f"{args.rounds} interleaved rounds of {args.runs} runs (x10 at batch 1). *Efficiency* = (speed-up - 1) / "
          "(ideal speed-up - 1): the share of the ideal truncation's gain that a method keeps (IdleViT: of its own "
          "ideal row's); from the median run and from the best run of each model.\n",
          *table(["model", "batch", "method", "GMACs", "MACs %", "img/s (median)", "speed-up", "efficiency",
                  "speed-up (best run)", "efficiency (best run)", "schedule"],
                 ([r["model"], r["batch"], r["method"], f"{r['gmacs']:.2f}", f"{100 * r['macs_ratio']:.1f}",
                   f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}", fmt(r["efficiency"]), f"{r['speedup_best']:.3f}",
                   fmt(r["efficiency_best"]), r["schedule"]] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
