"""Accuracy, MACs and CPU throughput of the shipped reference models (the BENCHMARKS.md table).

    python benchmarks/reference_models.py --threads 2
"""
from __future__ import annotations

import argparse

from torch.utils.data import DataLoader

import leanvit
from leanvit.analysis import compare_throughput, count_macs, measure_latency, threads_phrase
from leanvit.data import build_dataset
from leanvit.engine import evaluate
from leanvit.zoo import has_weights

from common import add_threads, parse_args, table, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=leanvit.list_models())
    add_threads(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name", default="reference_models")
    args = parse_args(p)
    models = {n: leanvit.create_model(n, pretrained=True).eval() for n in args.models if has_weights(n)}
    if not models:
        raise SystemExit("no reference model has shipped weights yet")
    speed = compare_throughput(models, batch_size=args.batch_size, warmup=2, runs=10, rounds=3)
    rows = []
    for name, model in models.items():
        ds = build_dataset("fmnist", "test", model)
        res = evaluate(model, DataLoader(ds, batch_size=256), progress=False)
        rows.append({"model": name, "top1": res.top1, "top5": res.top5, "gmacs": count_macs(model).gmacs,
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "images_per_s": speed[name], "latency_ms_b1": measure_latency(model, runs=20)})
    md = [f"Fashion-MNIST test set (10,000 images); throughput at batch {args.batch_size} (median of 3 interleaved "
          f"rounds x 10 runs), batch-1 latency median of 20 runs; {threads_phrase(args.threads)}.\n",
          *table(["model", "top-1 %", "top-5 %", "GMACs", "params (M)", "images/s", "batch-1 latency (ms)"],
                 ([r["model"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['gmacs']:.4f}", f"{r['params_m']:.2f}",
                   f"{r['images_per_s']:.0f}", f"{r['latency_ms_b1']:.2f}"] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
