"""GPU speed of every token-reduction method on DeiT-S, DeiT-B and ViT-L/16, eager and compiled (random weights:
speed does not depend on them).

    python benchmarks/speed_gpu.py                       # the table (a few minutes on one H100/H200)
    python benchmarks/speed_gpu.py --device cpu --quick  # a check of the script on CPU (tiny shapes)

For each (model, batch, r) all rows are timed in one interleaved run (``leanvit.analysis.compare_throughput``,
fp16 autocast, eval, inference mode): dense, the ideal truncation (the same token counts with no selection cost),
GTP with its mixed score (``score_path="auto"``: fused attention and the Triton score pass on CUDA), GTP with the
cls score, ToMe and EViT. Reported: images/s and the speed-up over dense; with ``--compile``, the same rows after
``torch.compile(fullgraph=True)`` (default mode) for the settings in ``COMPILED``, with each model's compile time
(the first call). Results go to ``results/NAME.{json,md}`` with the card's name.
"""
from __future__ import annotations

import argparse
import copy
import time

import timm
import torch

import leanvit
from leanvit.analysis import compare_throughput

from common import table, write

# (timm model, batch, r): the settings of the table
SETTINGS = [("deit_small_patch16_224", 256, 8), ("deit_small_patch16_224", 256, 13),
            ("deit_small_patch16_224", 1024, 13), ("deit_base_patch16_224", 256, 8),
            ("deit_base_patch16_224", 256, 13), ("vit_large_patch16_224", 128, 7)]
COMPILED = [("deit_small_patch16_224", 256, 13), ("deit_base_patch16_224", 256, 13)]
QUICK = [("deit_tiny_patch16_224", 4, 8)]
METHODS = {"ideal": ("truncate", {}), "gtp": ("gtp", {}), "gtp-cls": ("gtp", {"score": "cls"}),
           "tome": ("tome", {}), "evit": ("evit", {})}


def variants(name: str, r: int, depth: int | None) -> dict[str, torch.nn.Module]:
    kw = {"depth": depth} if depth else {}
    dense = timm.create_model(name, pretrained=False, **kw).eval()
    out = {"dense": dense}
    for label, (method, opts) in METHODS.items():
        out[label] = leanvit.patch(copy.deepcopy(dense), method, r=r, **opts)
    return out


def run_setting(name: str, batch: int, r: int, args: argparse.Namespace, compiled: bool) -> dict:
    models = variants(name, r, 4 if args.quick else None)
    device = torch.device(args.device)
    models = {k: m.to(device) for k, m in models.items()}
    compile_s = {}
    if compiled:
        x = torch.randn(batch, 3, 224, 224, device=device)
        for k in list(models):
            torch._dynamo.reset()
            models[k] = torch.compile(models[k], fullgraph=True)
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                models[k](x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_s[k] = time.perf_counter() - t0
    speed = compare_throughput(models, batch_size=batch, warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                               device=device, amp="fp16" if args.amp else None)
    row = {"model": name, "batch": batch, "r": r, "compiled": compiled,
           "schedule": leanvit.get_reducer(getattr(models["tome"], "_orig_mod", models["tome"])).schedule,
           **{f"{k}_images_per_s": v for k, v in speed.items()},
           **{f"{k}_speedup": v / speed["dense"] for k, v in speed.items()},
           **{f"{k}_compile_s": v for k, v in compile_s.items()}}
    print(row, flush=True)
    return row


def _cells(row: dict, labels: list[str]) -> list[str]:
    """A table row: the setting, each method's speed-up over dense, the compile times of the compiled rows."""
    short = row["model"].replace("_patch16_224", "").replace("deit_small", "DeiT-S").replace(
        "deit_base", "DeiT-B").replace("vit_large", "ViT-L/16").replace("deit_tiny", "DeiT-Ti")
    comp = (f"{row['dense_compile_s']:.0f} / {row['gtp_compile_s']:.0f} / {row['tome_compile_s']:.0f}"
            if row["compiled"] else "")
    return [f"{short}, {row['batch']}, r={row['r']}", "yes" if row["compiled"] else "no",
            *(f"{row[f'{k}_speedup']:.3f}" for k in labels), comp]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a 4-block DeiT-Tiny at batch 4 (checks the script)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager rows only")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of fp16 autocast")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="speed_gpu")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --quick to check the script")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    settings = QUICK if args.quick else SETTINGS
    rows = [run_setting(n, b, r, args, False) for n, b, r in settings]
    if args.compile:
        rows += [run_setting(n, b, r, args, True) for n, b, r in (QUICK if args.quick else COMPILED)]
    labels = ["ideal", *[k for k in METHODS if k != "ideal"]]
    md = [f"{card}, torch {torch.__version__}, timm {timm.__version__}, {'fp16 autocast' if args.amp else 'fp32'}, "
          f"eval, random weights; {args.rounds} interleaved rounds of {args.runs} forwards, median. Speed-up over "
          f"the dense model at the same batch (and the same compilation).\n",
          *table(["model, batch, r", "compiled", *labels, "compile s (dense / gtp / tome)"],
                 (_cells(row, labels) for row in rows))]
    write(args.name, {"card": card, "rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
