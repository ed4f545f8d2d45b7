"""leanvit's ToMe side by side with facebookresearch/ToMe's own timm patch (CPU, eager): the same output, then the
speed of both in one interleaved run.

The authors' code is not a dependency: give the path of a checkout of https://github.com/facebookresearch/ToMe
(fetched for the comparison, outside this repository, never committed); without one, or where it does not import,
its rows are skipped and the reason is printed. Both patches run on copies of one timm DeiT (random weights) at the
same ``r`` per block, with proportional attention (both defaults).

1. Same output: in float64, at ``--check-batch`` images, the largest absolute difference between the two patched
   models' logits (and final features); the target is 1e-6.
2. Speed at ``--batch-size`` in float32: the dense model, the ideal truncation of ToMe's schedule (the same token
   counts with nothing computed to choose them), leanvit's ToMe and the authors' ToMe, timed interleaved
   (``compare_throughput``); images/s, speed-up over dense, the share of the ideal's gain, and leanvit's speed over
   the authors' from the median run and from the best run (on a shared machine, the least disturbed one).

    python benchmarks/tome_authors.py --tome-repo /tmp/ToMe --threads 2
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import timm
import torch

import leanvit
from leanvit.analysis import compare_throughput, threads_phrase

from common import add_threads, fmt, ideal_truncation, median_and_best, parse_args, share_of_ideal, table, write


def authors_patch(repo: str | None):
    """The authors' ``tome.patch.timm`` from the checkout at ``repo``, or ``(None, reason)``."""
    if not repo:
        return None, "no --tome-repo given"
    path = Path(repo).expanduser().resolve()
    if not (path / "tome" / "patch" / "timm.py").is_file():
        return None, f"{path} is not a checkout of facebookresearch/ToMe (no tome/patch/timm.py)"
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("tome.patch").timm, None
    except Exception as e:  # their package imports what it needs (numpy, PIL, tqdm): say what is missing
        return None, f"the checkout at {path} does not import: {type(e).__name__}: {e}"


def patched(dense: torch.nn.Module, r: int, apply) -> dict[str, torch.nn.Module]:
    """leanvit's ToMe, its ideal truncation and, with ``apply``, the authors' ToMe, on copies of ``dense``."""
    ours = leanvit.patch(copy.deepcopy(dense), "tome", r=r)
    models = {"dense": dense, "ideal (truncate)": ideal_truncation(dense, ours), "tome (leanvit)": ours}
    if apply is not None:
        theirs = copy.deepcopy(dense)
        apply(theirs)  # prop_attn=True, as leanvit's default
        theirs.r = r
        models["tome (authors)"] = theirs
    return models


def same_output(model_name: str, r: int, batch: int, apply) -> dict[str, float]:
    """Largest absolute differences between the two patches' logits and final features, in float64."""
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).double().eval()
    models = patched(dense, r, apply)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    with torch.inference_mode():
        for k in ("tome (leanvit)", "tome (authors)"):
            m = models[k]
            feats = []
            # the final features through a hook on the final norm: the authors' patch resets its per-forward state
            # in forward() only, so forward_features cannot be called on its own there
            hook = m.norm.register_forward_hook(lambda mod, inp, o: feats.append(o))
            out[k] = (m(x), feats[0])
            hook.remove()
    (lo, fo), (lt, ft) = out["tome (leanvit)"], out["tome (authors)"]
    return {"logits": (lo - lt).abs().max().item(), "features": (fo - ft).abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tome-repo", default=None, help="path to a checkout of facebookresearch/ToMe")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--check-batch", type=int, default=4, help="images of the float64 output check")
    add_threads(p)
    p.add_argument("--warmup", type=int, default=2)
    # one run per visit, many rounds: on a shared host, consecutive runs of one model share its slow phases
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--name", default="tome_authors")
    args = parse_args(p)
    apply, why = authors_patch(args.tome_repo)
    if apply is None:
        print(f"skipping the authors' rows: {why}", flush=True)
    diff = same_output(args.model, args.r, args.check_batch, apply) if apply is not None else None
    if diff is not None:
        print(f"float64 max |difference|: logits {diff['logits']:.2e}, features {diff['features']:.2e}", flush=True)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    models = patched(dense, args.r, apply)
    reps = compare_throughput(models, batch_size=args.batch_size, warmup=args.warmup, runs=args.runs,
                              rounds=args.rounds, reports=True)
    med, best = median_and_best(reps, args.batch_size)
    rows = []
    for k in models:
        sp, sp_best = med[k] / med["dense"], best[k] / best["dense"]
        ideal, ideal_best = (med["ideal (truncate)"] / med["dense"], best["ideal (truncate)"] / best["dense"])
        dense = k == "dense"
        rows.append({"variant": k, "images_per_s": med[k], "speedup": sp,
                     "share": None if dense else share_of_ideal(sp, ideal), "images_per_s_best": best[k],
                     "speedup_best": sp_best, "share_best": None if dense else share_of_ideal(sp_best, ideal_best)})
    sched = leanvit.get_reducer(models["tome (leanvit)"]).schedule
    md = [f"{args.model}, random weights, r={args.r} per block ({sched}), proportional attention, batch "
          f"{args.batch_size}, float32, eager, {threads_phrase(args.threads)}; {args.rounds} interleaved rounds of "
          f"{args.runs} runs. *Share* = (speed-up - 1) / (ideal speed-up - 1). Authors' code: "
          + (f"`{Path(args.tome_repo).name}` checkout of facebookresearch/ToMe." if apply is not None
             else f"skipped ({why}).") + "\n",
          *table(["variant", "img/s (median)", "speed-up", "share", "img/s (best run)", "speed-up (best run)",
                  "share (best run)"],
                 ([r["variant"], f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}", fmt(r["share"]),
                   f"{r['images_per_s_best']:.1f}", f"{r['speedup_best']:.3f}", fmt(r["share_best"])]
                  for r in rows))]
    if apply is not None:
        ratio, ratio_best = (med["tome (leanvit)"] / med["tome (authors)"],
                             best["tome (leanvit)"] / best["tome (authors)"])
        md.append(f"\nleanvit's ToMe at {ratio:.3f}x the authors' speed (median), {ratio_best:.3f}x (best run); "
                  f"target 1.1x: {'met' if ratio >= 1.1 else 'missed'} (median). Same output in float64 "
                  f"({args.check_batch} images): max |logits difference| {diff['logits']:.1e}, features "
                  f"{diff['features']:.1e}; target 1e-6: {'met' if max(diff.values()) <= 1e-6 else 'missed'}.")
    write(args.name, {"rows": rows, "args": vars(args), "same_output": diff, "skipped": why},
          "\n".join(md))


if __name__ == "__main__":
    main()
