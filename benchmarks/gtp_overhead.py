"""Share of GTP's own work in the forward time, from a torch.profiler trace.

GTP's code is labelled with ``record_function``: ``leanvit.gtp.graph`` (building the token graph, once per
forward), ``leanvit.attn.score`` (scores, computed inside the attention while each slice of the map is in cache),
``leanvit.gtp.select`` (top-k), ``leanvit.gtp.propagate`` (propagation and bookkeeping), and
``leanvit.attn.explicit`` (attention computed with explicit probabilities, which GTP needs for its scores, instead
of fused SDPA). The extra cost of explicit attention is estimated against the same blocks with SDPA by timing the
ideal truncation with the same schedule in the same run.

    python benchmarks/gtp_overhead.py --models deit_small_patch16_224 leanvit_vit_fm_teacher --budget 0.74
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import leanvit
from leanvit.analysis import threads_phrase
from leanvit.analysis.macs import default_input_size

from common import add_threads, ideal_truncation, parse_args, table, write

LABELS = ("leanvit.gtp.graph", "leanvit.attn.score", "leanvit.gtp.select", "leanvit.gtp.propagate",
          "leanvit.attn.explicit")
OWN = LABELS[:4]


def profile_model(model: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[float, dict[str, float]]:
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / reps  # ms per forward
    regions = {e.key: e.cpu_time_total / 1e3 / reps for e in events if e.key in LABELS}
    return total, regions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "leanvit_vit_fm_teacher"])
    p.add_argument("--budget", type=float, default=0.74)
    p.add_argument("--batch-size", type=int, default=32)
    add_threads(p)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--graph", default="mixed", help="GTP graph (the paper's recommended one by default)")
    p.add_argument("--name", default="gtp_overhead")
    args = parse_args(p)
    rows = []
    for name in args.models:
        dense = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(args.batch_size, *default_input_size(dense))
        gtp = leanvit.patch(copy.deepcopy(dense), "gtp", budget=args.budget, graph=args.graph)
        ideal = ideal_truncation(dense, gtp)
        t_gtp, regions = profile_model(gtp, x, args.reps)
        t_ideal, _ = profile_model(ideal, x, args.reps)
        row = {"model": name, "batch": args.batch_size, "gtp_ms": t_gtp, "ideal_ms": t_ideal,
               **{k.split(".")[-1] + "_ms": regions.get(k, 0.0) for k in LABELS}}
        own = sum(regions.get(k, 0.0) for k in OWN)
        row["own_share"] = own / t_gtp
        row["attn_explicit_share"] = regions.get(LABELS[-1], 0.0) / t_gtp
        row["gap_share"] = (t_gtp - t_ideal) / t_gtp
        rows.append(row)
    md = ["Per-forward profile (self CPU time summed over ops), GTP at budget "
          f"{args.budget}, batch {args.batch_size}, {threads_phrase(args.threads)}. "
          "*GTP's own work* = graph + score + select + propagate; *gap to ideal* = (GTP time - ideal truncation "
          "time) / GTP time, which also contains the extra cost of explicit attention over SDPA.\n",
          *table(["model", "GTP ms", "ideal ms", "graph ms", "score ms", "select ms", "propagate ms", "GTP's own work",
                  "explicit attention (whole region, incl. score)", "gap to ideal"],
                 ([r["model"], f"{r['gtp_ms']:.1f}", f"{r['ideal_ms']:.1f}", f"{r['graph_ms']:.2f}",
                   f"{r['score_ms']:.2f}", f"{r['select_ms']:.2f}", f"{r['propagate_ms']:.2f}",
                   f"{100 * r['own_share']:.1f}%", f"{100 * r['attn_explicit_share']:.1f}%",
                   f"{100 * r['gap_share']:.1f}%"] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
