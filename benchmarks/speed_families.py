"""Token-reduction speed on the vision encoders of other model libraries, at 224 (random weights: speed only).

Rows, all timed in one interleaved run per model and batch size: dense; the ideal row (the same schedule applied by
plain truncation, zero overhead: the physical limit); GTP, ToMe and EViT at the budget; IdleViT at the budget's
schedule for models with a cls token. Reported as in ``speed_deit.py``: GMACs, images/s, the speed-up over dense
and the share of the ideal truncation's gain that each method keeps.

Models (built from their libraries' own configs, random weights, no download):

* ``hf-clip-b16``: transformers ``CLIPVisionModel``, ViT-B/16 at 224, ``attn_implementation="sdpa"``;
* ``open-clip-b16``: ``open_clip.create_model("ViT-B-16").visual``;
* ``hf-dinov2-s14``: transformers ``Dinov2Model``, ViT-S/14 at 224 (16x16 patches), SDPA.

    python benchmarks/speed_families.py --batch-sizes 32 1
    python benchmarks/speed_families.py --memory   # peak memory of one batch-32 forward, CLIP tower
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import torch

import leanvit
from leanvit.analysis import compare_throughput, count_macs, threads_phrase

from common import add_threads, fmt, ideal_truncation, median_and_best, parse_args, share_of_ideal, table, write

MODELS = ("hf-clip-b16", "open-clip-b16", "hf-dinov2-s14")
METHOD_ROWS = ("gtp", "tome", "evit", "idle")


def build(name: str) -> torch.nn.Module:
    """One dense encoder in eval mode (random weights)."""
    torch.manual_seed(0)
    if name == "hf-clip-b16":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16)
        return CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    if name == "open-clip-b16":
        import open_clip

        return open_clip.create_model("ViT-B-16").visual.eval()
    if name == "hf-dinov2-s14":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                           image_size=224)
        return Dinov2Model._from_config(cfg, attn_implementation="sdpa").eval()
    raise SystemExit(f"unknown model {name}; choose from {', '.join(MODELS)}")


def rows_of(dense: torch.nn.Module, budget: float) -> dict[str, torch.nn.Module]:
    """dense, the ideal truncation of GTP's schedule, and each method at ``budget`` (idle where it applies)."""
    models = {"dense": dense}
    gtp = leanvit.patch(copy.deepcopy(dense), "gtp", budget=budget)
    models["ideal (truncate)"] = ideal_truncation(dense, gtp)
    models["gtp"] = gtp
    for method in METHOD_ROWS[1:]:
        try:
            models[method] = leanvit.patch(copy.deepcopy(dense), method, budget=budget)
        except leanvit.LeanvitError as e:  # a method refused on this family: reported, not timed
            print(f"{method}: {e}", file=sys.stderr)
    return models


def _one_forward(name: str, method: str, budget: float, batch: int, threads: int) -> None:
    """Child process: build the row's model, warm up at batch 2, then one batch-``batch`` forward; print the peak
    resident memory before and after (KiB, ``ru_maxrss``)."""
    import resource

    torch.set_num_threads(threads)
    dense = build(name)
    model = dense if method == "dense" else rows_of(dense, budget)[method]
    size = leanvit.reduce.adapters.find_adapter(model).input_size(model)
    with torch.no_grad():
        model(torch.randn(2, *size))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model(torch.randn(batch, *size))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))


def memory(args: argparse.Namespace) -> None:
    """Peak resident memory of one forward per row, each in a fresh process: the increase of the process's peak
    RSS over a batch-2 warm-up (the weights, the libraries and the allocator's pools are already there), which is
    what the forward's activations add on CPU, where no allocator keeps its own peak."""
    rows = []
    for method in ("dense", "ideal (truncate)", *METHOD_ROWS):
        cmd = [sys.executable, __file__, "--child", "hf-clip-b16", method, str(args.budget), str(args.memory_batch),
               str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"model": "hf-clip-b16", "method": method, "batch": args.memory_batch,
                     "increase_mib": (r["after_kib"] - r["before_kib"]) / 1024})
    dense = next(r["increase_mib"] for r in rows if r["method"] == "dense")
    md = [f"Peak resident memory added by one batch-{args.memory_batch} inference forward over a batch-2 warm-up "
          f"(fresh process per row, `ru_maxrss`), budget {args.budget}, {threads_phrase(args.threads)}.\n",
          *table(["model", "method", "batch", "MiB over warm-up", "vs dense"],
                 ([r["model"], r["method"], r["batch"], f"{r['increase_mib']:.0f}",
                   f"{r['increase_mib'] / dense:.2f}"] for r in rows))]
    write(args.name + "_memory", {"rows": rows, "args": vars(args)}, "\n".join(md))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, method, budget, batch, threads = sys.argv[2:7]
        _one_forward(name, method, float(budget), int(batch), int(threads))
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--budget", type=float, default=0.74)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    add_threads(p)
    # one run per visit, many rounds: on a shared host, consecutive runs of one model share its slow phases
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--memory", action="store_true", help="measure peak memory (CLIP tower) instead of speed")
    p.add_argument("--memory-batch", type=int, default=32)
    p.add_argument("--name", default="speed_families")
    args = parse_args(p)
    if args.memory:
        memory(args)
        return
    rows = []
    for name in args.models:
        dense = build(name)
        models = rows_of(dense, args.budget)
        size = leanvit.reduce.adapters.find_adapter(dense).input_size(dense)
        macs = {k: count_macs(m, size).macs for k, m in models.items()}
        for bs in args.batch_sizes:
            runs = args.runs if bs > 1 else args.runs * 10  # batch 1 is short and noisy: time more runs
            reps = compare_throughput(models, input_size=size, batch_size=bs, warmup=2, runs=runs,
                                      rounds=args.rounds, reports=True)
            med, best = median_and_best(reps, bs)
            ideal, ideal_best = med["ideal (truncate)"] / med["dense"], best["ideal (truncate)"] / best["dense"]
            for k, m in models.items():
                red = leanvit.get_reducer(m)
                rows.append({"model": name, "batch": bs, "method": k, "gmacs": macs[k] / 1e9,
                             "macs_ratio": macs[k] / macs["dense"], "images_per_s": med[k],
                             "speedup": med[k] / med["dense"],
                             "efficiency": None if k == "dense" else share_of_ideal(med[k] / med["dense"], ideal),
                             "efficiency_best": None if k == "dense" else share_of_ideal(best[k] / best["dense"],
                                                                                          ideal_best),
                             "schedule": red.schedule if red else []})
            print(f"{name} batch {bs}: " + ", ".join(f"{k} {med[k] / med['dense']:.2f}x" for k in models),
                  file=sys.stderr)
    md = [f"Budget {args.budget} of dense MACs; {threads_phrase(args.threads)}; eager; {args.rounds} interleaved "
          f"rounds of {args.runs} runs (x10 at batch 1). *Efficiency* = (speed-up - 1) / (ideal speed-up - 1), "
          "from the median run and from the best run.\n",
          *table(["model", "batch", "method", "GMACs", "MACs %", "img/s (median)", "speed-up", "efficiency",
                  "efficiency (best run)", "schedule"],
                 ([r["model"], r["batch"], r["method"], f"{r['gmacs']:.2f}", f"{100 * r['macs_ratio']:.1f}",
                   f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}", fmt(r["efficiency"]),
                   fmt(r["efficiency_best"]), r["schedule"]] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
