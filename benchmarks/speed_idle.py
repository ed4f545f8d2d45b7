"""CPU speed of IdleViT against EViT on DeiT-S at 224 (random weights: speed does not depend on them).

All rows are timed in one interleaved run per batch size (``leanvit.analysis.compare_throughput``): the dense
model; for each keep rate, IdleViT and EViT and each one's zero-overhead ideal, the truncation that runs every
block on the same token counts with nothing computed to choose them (IdleViT's blocks compute their selected
tokens in attention and MLP alike: truncation before the attention, ``point="attn"``; EViT removes tokens after a
block's attention: truncation there). Reported: GMACs, images/s at batch 32, batch-1 latency, the speed-up over
dense, and the share of its ideal's gain that each method keeps, ``(speed-up - 1) / (ideal speed-up - 1)``
(``common.share_of_ideal``; targets: IdleViT at least as fast as EViT at equal keep, and at least 0.9 of its ideal
at batch 32).

    python benchmarks/speed_idle.py --threads 2
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import leanvit
from leanvit.analysis import compare_throughput, count_macs, threads_phrase

from common import add_threads, fmt, ideal_truncation, parse_args, share_of_ideal, table, write


def variants(model_name: str, keeps: list[float]) -> dict[str, torch.nn.Module]:
    dense = timm.create_model(model_name, pretrained=False).eval()
    out = {"dense": dense}
    for keep in keeps:
        idle = leanvit.patch(copy.deepcopy(dense), "idle", keep=keep)
        out[f"ideal-idle-{keep}"] = ideal_truncation(dense, idle)  # idling's token counts: truncation before attn
        out[f"idle-{keep}"] = idle
        evit = leanvit.patch(copy.deepcopy(dense), "evit", keep=keep)
        out[f"ideal-evit-{keep}"] = ideal_truncation(dense, evit)
        out[f"evit-{keep}"] = evit
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--batch-size", type=int, default=32)
    add_threads(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=4, help="timed runs per model and round at --batch-size")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per model and round at batch 1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="speed_idle")
    args = parse_args(p)
    models = variants(args.model, args.keeps)
    gmacs = {name: count_macs(m).gmacs for name, m in models.items()}
    batch = compare_throughput(models, batch_size=args.batch_size, warmup=args.warmup, runs=args.runs,
                               rounds=args.rounds, reports=True)
    single = compare_throughput(models, batch_size=1, warmup=args.warmup, runs=args.latency_runs,
                                rounds=args.rounds, reports=True)
    base_ips, base_lat = batch["dense"].images_per_s, single["dense"].latency_ms
    rows = []
    for name in models:
        row = {"variant": name, "gmacs": gmacs[name], "images_per_s": batch[name].images_per_s,
               "latency_ms": single[name].latency_ms, "speedup": batch[name].images_per_s / base_ips,
               "latency_speedup": base_lat / single[name].latency_ms}
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        if r["variant"].startswith(("idle-", "evit-")):
            ideal = by["ideal-" + r["variant"]]
            r["of_ideal"] = share_of_ideal(r["speedup"], ideal["speedup"])
            r["latency_of_ideal"] = share_of_ideal(r["latency_speedup"], ideal["latency_speedup"])
    md = [f"{args.model}, random weights, {threads_phrase(args.threads)}, eval, fp32; "
          f"batch {args.batch_size}: median of {args.rounds} interleaved rounds x {args.runs} runs; "
          f"batch 1: median of {args.rounds} x {args.latency_runs} runs. Speed-up over dense; "
          "'of ideal' = (speed-up - 1) / (the ideal truncation's speed-up - 1): the share of its ideal's gain that "
          "a method keeps.\n",
          *table(["variant", "GMACs", f"images/s b{args.batch_size}", "speed-up", "of ideal", "b1 latency ms",
                  "b1 speed-up", "b1 of ideal"],
                 ([r["variant"], f"{r['gmacs']:.3f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}",
                   fmt(r.get("of_ideal"), ".3f"), f"{r['latency_ms']:.1f}", f"{r['latency_speedup']:.3f}",
                   fmt(r.get("latency_of_ideal"), ".3f")] for r in rows))]
    for keep in args.keeps:
        i, e = by[f"idle-{keep}"], by[f"evit-{keep}"]
        md.append(f"\nkeep {keep}: IdleViT / EViT throughput {i['images_per_s'] / e['images_per_s']:.3f} at batch "
                  f"{args.batch_size}, {e['latency_ms'] / i['latency_ms']:.3f} at batch 1.")
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
