"""CPU speed of channel-shuffle ViTs against their vanilla partners (weights do not matter for speed).

Each shuffle model and its partner are timed in one interleaved run (``leanvit.analysis.compare_throughput``) per
batch size: throughput at batch 32 and latency at batch 1. Reported: GMACs, images/s and batch-1 latency of both,
and the shuffle model's speed as a fraction of its partner's (the target is at least 0.95), by the median of all
timed runs and by the best run (the least disturbed on a shared machine).

    python benchmarks/speed_shuffle.py --threads 2
    python benchmarks/speed_shuffle.py --models leanvit_shuffle_fm_student leanvit_shuffle_fm_mlp_shared --runs 5
"""
from __future__ import annotations

import argparse

import timm

from leanvit.analysis import compare_throughput, count_macs, threads_phrase
from leanvit.models import SHUFFLE_ARCHS

from common import add_threads, median_and_best, parse_args, table, write

DEFAULT_MODELS = ["leanvit_shuffle_fm_student", "leanvit_shuffle_fm_mlp_grouped", "leanvit_shuffle_nano_patch16_224",
                  "leanvit_shuffle_tiny_patch16_224", "leanvit_shuffle_tiny_grouped_patch16_224"]


def time_pair(shuffle: str, partner: str, batch_size: int, args: argparse.Namespace) -> dict[str, dict]:
    """Interleaved timings of the two models at one batch size: name -> median and best images/s, latency."""
    models = {name: timm.create_model(name).eval() for name in (partner, shuffle)}
    runs = args.runs if batch_size > 1 else args.latency_runs
    reports = compare_throughput(models, batch_size=batch_size, warmup=args.warmup, runs=runs, rounds=args.rounds,
                                 reports=True)
    median, best = median_and_best(reports, batch_size)
    return {name: {"images_per_s": median[name], "best_images_per_s": best[name], "latency_ms": r.latency_ms}
            for name, r in reports.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(SHUFFLE_ARCHS), metavar="NAME",
                   help="channel-shuffle models, each timed against its partner (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    add_threads(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10, help="timed runs per model and round at --batch-size")
    p.add_argument("--latency-runs", type=int, default=50, help="timed runs per model and round at batch 1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="speed_shuffle")
    args = parse_args(p)
    rows = []
    for name in args.models:
        partner = SHUFFLE_ARCHS[name].partner
        batch = time_pair(name, partner, args.batch_size, args)
        single = time_pair(name, partner, 1, args)
        row = {"model": name, "partner": partner}
        for key, model in (("shuffle", name), ("partner", partner)):
            row[f"{key}_gmacs"] = count_macs(timm.create_model(model)).gmacs
            row[f"{key}_images_per_s"] = batch[model]["images_per_s"]
            row[f"{key}_best_images_per_s"] = batch[model]["best_images_per_s"]
            row[f"{key}_latency_ms"] = single[model]["latency_ms"]
        row["speed_ratio"] = batch[name]["images_per_s"] / batch[partner]["images_per_s"]
        row["best_speed_ratio"] = batch[name]["best_images_per_s"] / batch[partner]["best_images_per_s"]
        row["latency_speed_ratio"] = single[partner]["latency_ms"] / single[name]["latency_ms"]
        rows.append(row)
        print(row, flush=True)
    md = [f"{threads_phrase(args.threads)}; batch {args.batch_size}: median (and best) of "
          f"{args.rounds} interleaved rounds x {args.runs} runs; batch 1: median of {args.rounds} x "
          f"{args.latency_runs} runs. Speed = shuffle / partner images/s (latency: partner / shuffle).\n",
          *table(["model", "partner", "GMACs (shuffle / partner)", f"images/s b{args.batch_size} (shuffle / partner)",
                  "speed (median)", "speed (best run)", "b1 latency ms (shuffle / partner)", "b1 speed"],
                 ([r["model"], r["partner"], f"{r['shuffle_gmacs']:.4f} / {r['partner_gmacs']:.4f}",
                   f"{r['shuffle_images_per_s']:.0f} / {r['partner_images_per_s']:.0f}", f"{r['speed_ratio']:.3f}",
                   f"{r['best_speed_ratio']:.3f}", f"{r['shuffle_latency_ms']:.2f} / {r['partner_latency_ms']:.2f}",
                   f"{r['latency_speed_ratio']:.3f}"] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
