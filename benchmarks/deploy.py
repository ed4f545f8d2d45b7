"""Deploying a token-reduced ViT: ONNX Runtime speed, int8 on top, and the batch size from which reduction pays.

Three parts (``--parts``), each a BENCHMARKS.md section and a results file:

* ``deit`` (``deploy_deit``): DeiT-S at 224 with random weights (speed does not depend on them), batch 32 and 1:
  dense, every method at budget 0.74 and the ideal truncation of each one's token counts, in PyTorch eager, in ONNX
  Runtime float32 and in ONNX Runtime int8 (dynamic, the library's choice; and static, calibrated, for dense and
  GTP, to justify the choice). All rows of a batch size are timed in one interleaved run. Reported: images/s
  (median), speed-up over the dense model of the same runtime, the share of its ideal truncation's gain a method
  keeps in that runtime ((speed-up - 1) / (ideal - 1)), and the speed-up over PyTorch's dense float32 model.
* ``teacher`` (``deploy_teacher``): the shipped teacher on the Fashion-MNIST test set, in ONNX Runtime: top-1 (all
  images, and the first 2,000) and images/s at batch 32 of dense, GTP, ToMe and EViT at budget 0.74 (options as
  tuned on the held-out split, ``benchmarks/results/tune_gtp.json``), each in float32 and int8 (dynamic), plus
  static int8 for dense and GTP.
* ``breakeven`` (``deploy_breakeven``): DeiT-S, speed-up over dense at batch sizes 1 to 64 of every method at 0.74
  in PyTorch eager, ``torch.compile`` and ONNX Runtime float32, and the smallest batch from which each is faster
  (:mod:`leanvit.export.breakeven`; the same table as ``leanvit bench --batch-sizes``).

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/deploy.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import leanvit
from leanvit.analysis import break_even_batch, compare_throughput, count_macs, sweep_throughput, threads_phrase
from leanvit.export import OrtModel, build_onnx, quantize_int8
from leanvit.export.quantize import _quiet_root_logger

from common import (add_threads, fmt, ideal_truncation, median_and_best, parse_args, share_of_ideal, table,
                    tuned_options, write)


# ------------------------------------------------------------------------------------------------ static int8
def quantize_static_int8(data: bytes, batches: list[np.ndarray]) -> bytes:
    """ONNX Runtime's static (calibrated) quantization of the same linear layers as the library's dynamic one
    (weights int8 per channel, activations uint8 per tensor with scales from ``batches``, QDQ format): the
    alternative the library's choice is measured against."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        with _quiet_root_logger():  # its advice to pre-process, as in the library's int8
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            extra_options={"MatMulConstBOnly": True})
        return dst.read_bytes()


_EXPORTS: dict[str, tuple[bytes, dict]] = {}  # name -> (ONNX model, its export record): parts share exports


def exported(name: str, model) -> tuple[bytes, dict]:
    """The model's checked float32 ONNX export (once per process and name) and its record."""
    if name not in _EXPORTS:
        t0 = time.perf_counter()
        data, report = build_onnx(model, name=name)
        _EXPORTS[name] = data, {"export_s": time.perf_counter() - t0, "max_abs_diff": report.max_abs_diff,
                                "nodes": report.nodes, "bytes": report.size_bytes}
        print(f"exported {name}: {_EXPORTS[name][1]}", flush=True)
    return _EXPORTS[name]


def runtimes_of(name: str, model, calib: list[np.ndarray] | None, static: bool, log: dict) -> dict[str, object]:
    """``{runtime label: runnable}``: the model's checked ONNX export (float32), int8 (dynamic) and, with
    ``static``, static int8; the export time and check go to ``log``."""
    data, log[name] = exported(name, model)
    cfg = getattr(model, "pretrained_cfg", None)
    out = {"ort fp32": OrtModel(data, pretrained_cfg=cfg),
           "ort int8": OrtModel(quantize_int8(data), pretrained_cfg=cfg, quantize="int8")}
    if static:
        out["ort int8 static"] = OrtModel(quantize_static_int8(data, calib), pretrained_cfg=cfg, quantize="int8")
    return out


# ------------------------------------------------------------------------------------------------ part: deit
def deit_models(name: str, budget: float) -> dict[str, torch.nn.Module]:
    """Dense, every method at ``budget`` and each method's ideal truncation: the same token counts dropped with
    nothing computed to choose them (``common.ideal_truncation``), one model per schedule, named after the methods
    that share it (at 0.74 on DeiT-S, GTP removes one token more in block 1 than ToMe and EViT)."""
    torch.manual_seed(0)  # the same random weights in every part (their exports are shared)
    dense = timm.create_model(name, pretrained=False).eval()
    methods = {m: leanvit.patch(copy.deepcopy(dense), m, budget=budget) for m in METHODS}
    models = {"dense": dense}
    for m in METHODS:
        row = ideal_name(m, methods)
        if row not in models:
            models[row] = ideal_truncation(dense, methods[m])
    return {**models, **methods}


METHODS = ("gtp", "tome", "evit", "idle")


def ideal_name(method: str, models: dict[str, torch.nn.Module]) -> str:
    """The row name of ``method``'s ideal truncation in :func:`deit_models`: ``ideal (...)`` with every method of
    ``models`` whose token counts are the same (IdleViT's are computed tokens, truncated before the attention)."""
    def key(m: str) -> tuple:
        return m == "idle", tuple(leanvit.get_reducer(models[m]).schedule)

    return f"ideal ({', '.join(m for m in METHODS if m in models and key(m) == key(method))})"


def part_deit(args) -> None:
    models = deit_models(args.model, args.budget)
    macs = {k: count_macs(m).macs for k, m in models.items()}
    # the calibrator holds every intermediate tensor of every batch (the attention maps too): few, small batches
    calib = [np.random.default_rng(i).standard_normal((4, 3, 224, 224)).astype(np.float32) for i in range(2)]
    log: dict = {}
    variants: dict[tuple[str, str], object] = {}
    for k, m in models.items():
        variants[(k, "pytorch")] = m
        for rt, runner in runtimes_of(k, m, calib, static=k in ("dense", "gtp"), log=log).items():
            variants[(k, rt)] = runner
    rows = []
    for bs in (32, 1):
        runs = args.runs if bs > 1 else args.runs * 10  # batch 1 is short and noisy: more runs
        named = {f"{k} | {rt}": v for (k, rt), v in variants.items()}
        reps = compare_throughput(named, input_size=(3, 224, 224), batch_size=bs, warmup=2, runs=runs,
                                  rounds=args.rounds, reports=True, progress=True)
        med, best = median_and_best(reps, bs)
        for (k, rt) in variants:
            key = f"{k} | {rt}"
            red = leanvit.get_reducer(models[k])
            row = {"batch": bs, "method": k, "runtime": rt, "gmacs": macs[k] / 1e9,
                   "macs_ratio": macs[k] / macs["dense"], "schedule": red.schedule if red else []}
            for stat, ips in (("", med), ("_best", best)):
                speed = ips[key] / ips[f"dense | {rt}"]
                ideal = ideal_name(k, models) if k in METHODS else None
                eff = (None if ideal is None or f"{ideal} | {rt}" not in ips
                       else share_of_ideal(speed, ips[f"{ideal} | {rt}"] / ips[f"dense | {rt}"]))
                row.update({f"images_per_s{stat}": ips[key], f"speedup{stat}": speed, f"efficiency{stat}": eff,
                            f"vs_pytorch_dense{stat}": ips[key] / ips["dense | pytorch"]})
            rows.append(row)
    md = [f"{args.model} (random weights), budget {args.budget} of dense MACs, {threads_phrase(args.threads)}; "
          f"every row of a batch size timed in one interleaved run of {args.rounds} rounds of {args.runs} runs (x10 "
          "at batch 1), median. *Speed-up*: over the dense model in the same runtime; *efficiency*: (speed-up - 1) / "
          "(ideal speed-up - 1) in the same runtime, the share of its ideal truncation's gain a method keeps (the "
          "row `ideal (...)` that names it: the same token counts dropped with nothing computed to choose them; "
          "IdleViT's truncated before the attention); *vs PyTorch dense*: "
          "over the dense float32 model in PyTorch eager. *ort int8*: the linear layers in int8 by ONNX Runtime's "
          "dynamic quantization (the library's `--quantize int8`); *ort int8 static*: calibrated on 8 random "
          "images, QDQ, for comparison. The last three columns are the same from each model's best run (on a "
          "shared host interference only adds time, so the best run is the least disturbed one).\n",
          *table(["batch", "method", "runtime", "GMACs", "MACs %", "img/s", "speed-up", "efficiency",
                  "vs PyTorch dense", "speed-up (best)", "efficiency (best)", "vs PyTorch dense (best)"],
                 ([r["batch"], r["method"], r["runtime"], f"{r['gmacs']:.2f}", f"{100 * r['macs_ratio']:.1f}",
                   f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}", fmt(r["efficiency"]),
                   f"{r['vs_pytorch_dense']:.2f}", f"{r['speedup_best']:.3f}", fmt(r["efficiency_best"]),
                   f"{r['vs_pytorch_dense_best']:.2f}"] for r in rows)),
          "", "Schedules (image tokens removed after each block's attention; idle: idle in each block): "
          + "; ".join(f"{k} {leanvit.get_reducer(m).schedule}" for k, m in models.items()
                      if leanvit.get_reducer(m) is not None) + ".",
          "", "Export (float32, checked against PyTorch at batch 1 and 3 before use):", "",
          *table(["model", "export s", "max abs diff", "ONNX nodes", "MB"],
                 ([k, f"{v['export_s']:.0f}", f"{v['max_abs_diff']:.1e}", v["nodes"], f"{v['bytes'] / 1e6:.1f}"]
                  for k, v in log.items()))]
    write(f"{args.name}_deit", {"rows": rows, "export": log, "args": vars(args)}, "\n".join(md))


# ------------------------------------------------------------------------------------------------ part: teacher
def part_teacher(args) -> None:
    from torch.utils.data import DataLoader

    from leanvit.data import build_dataset
    from leanvit.engine.evaluate import evaluate_many

    name = "leanvit_vit_fm_teacher"
    dense = leanvit.create_model(name, pretrained=True).eval()
    tuned = tuned_options()
    models = {"dense": dense}
    for m in ("gtp", "tome", "evit"):
        models[m] = leanvit.patch(copy.deepcopy(dense), m, budget=args.budget, **tuned.get(m, {}))
    macs = {k: count_macs(m).macs for k, m in models.items()}
    calib_ds = build_dataset("fmnist", "train", dense, limit=64)  # the calibrator holds every intermediate tensor
    calib_loader = DataLoader(calib_ds, batch_size=16)
    calib = [x.numpy() for x, _ in calib_loader]
    log: dict = {}
    variants = {}
    for k, m in models.items():
        for rt, runner in runtimes_of(f"teacher {k}", m, calib, static=k in ("dense", "gtp"), log=log).items():
            variants[f"{k} | {rt}"] = runner
    test = build_dataset("fmnist", "test", dense, limit=args.limit)
    loader = DataLoader(test, batch_size=args.eval_batch)
    res = evaluate_many(variants, loader, keep_logits=True, progress=True, desc="evaluating in ONNX Runtime")
    speed = compare_throughput(variants, batch_size=32, warmup=2, runs=args.runs, rounds=args.rounds, progress=True)
    rows = []
    for key, r in res.items():
        k, rt = key.split(" | ")
        first = min(2000, r.n)
        top1_2k = 100.0 * float((r.logits[:first].topk(1).indices[:, 0] == r.targets[:first]).float().mean())
        rows.append({"method": k, "runtime": rt, "macs_ratio": macs[k] / macs["dense"], "top1": r.top1,
                     "top1_first_2000": top1_2k, "images": r.n, "images_per_s": speed[key],
                     "speedup": speed[key] / speed["dense | ort fp32"],
                     "options": leanvit.get_reducer(models[k]).options() if k != "dense" else {}})
    by = {(r["method"], r["runtime"]): r for r in rows}
    for r in rows:  # int8 against float32 of the same method
        fp = by[(r["method"], "ort fp32")]
        r["top1_vs_fp32"] = r["top1"] - fp["top1"]
        r["top1_first_2000_vs_fp32"] = r["top1_first_2000"] - fp["top1_first_2000"]
    md = [f"The shipped teacher ({name}) on the Fashion-MNIST test set ({rows[0]['images']} images), every row in "
          f"ONNX Runtime (CPU provider, {threads_phrase(args.threads)}); budget {args.budget}, method options as "
          "tuned on the held-out split. Top-1 over all images and over the first 2,000 (the issue's int8 "
          "criterion: within 0.5 points of float32); images/s at batch 32, all rows timed in one interleaved run "
          f"of {args.rounds} rounds of {args.runs} runs (median), speed-up over dense float32 in ONNX Runtime. "
          "*int8*: dynamic (the library's); *int8 static*: calibrated on 64 training images, QDQ.\n",
          *table(["method", "runtime", "MACs %", "top-1 %", "vs fp32", "top-1 % (first 2,000)", "vs fp32",
                  "img/s", "speed-up"],
                 ([r["method"], r["runtime"], f"{100 * r['macs_ratio']:.1f}", f"{r['top1']:.2f}",
                   f"{r['top1_vs_fp32']:+.2f}", f"{r['top1_first_2000']:.2f}", f"{r['top1_first_2000_vs_fp32']:+.2f}",
                   f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}"] for r in rows))]
    write(f"{args.name}_teacher", {"rows": rows, "export": log, "args": vars(args)}, "\n".join(md))


# ------------------------------------------------------------------------------------------------ part: breakeven
def part_breakeven(args) -> None:
    models = deit_models(args.model, args.budget)
    gtp_ideal = ideal_name("gtp", models)
    truncate = models[gtp_ideal]  # GTP's token counts
    models = {k: v for k, v in models.items() if not k.startswith("ideal")}
    models["truncate (ideal)"] = truncate
    macs = {k: count_macs(m).macs for k, m in models.items()}
    runtimes = {}
    for rt in args.runtimes:
        if rt == "pytorch":
            runtimes[rt] = models
        elif rt == "compiled":
            # the forward code is shared by every model and dynamo counts recompilations per code object: room for
            # one graph per model and batch size, so that none silently falls back to eager
            n = len(models) * (len(args.batch_sizes) + 1) + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, n)
            runtimes[rt] = {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
        else:
            runtimes[rt] = {k: OrtModel(exported(gtp_ideal if k == "truncate (ideal)" else k, m)[0],
                                        pretrained_cfg=m.pretrained_cfg) for k, m in models.items()}
    rows = []
    for rt, runners in runtimes.items():
        sweep = sweep_throughput(runners, args.batch_sizes, input_size=(3, 224, 224), warmup=1,
                                 runs=args.sweep_runs, rounds=args.sweep_rounds, progress=True)
        for k in runners:
            ips = {b: sweep[b][k].images_per_s for b in sweep}
            speed = {b: ips[b] / sweep[b]["dense"].images_per_s for b in sweep}
            best = {b: min(sweep[b]["dense"].times_s) / min(sweep[b][k].times_s) for b in sweep}
            rows.append({"runtime": rt, "method": k, "macs_ratio": macs[k] / macs["dense"], "images_per_s": ips,
                         "speedup": speed, "break_even": None if k == "dense" else break_even_batch(speed),
                         "speedup_best": best, "break_even_best": None if k == "dense" else break_even_batch(best)})
        print(f"{rt} done", flush=True)
    sizes = list(args.batch_sizes)
    md = [f"{args.model} (random weights), every method at budget {args.budget}, {threads_phrase(args.threads)}; "
          f"at each batch size the runtime's models are timed in one interleaved run of {args.sweep_rounds} rounds "
          f"of {args.sweep_runs} runs (median). Cells: speed-up over the dense model of the same runtime (dense: its img/s). "
          "*Faster from*: the smallest batch size from which the method is faster than dense at that and every "
          "larger batch size measured. *compiled*: `torch.compile(fullgraph=True)` with torch's default shape "
          "handling (a static graph for the first batch size, then one with a dynamic batch), compiled in the "
          "untimed warm-up.\n",
          *table(["runtime", "method", "MACs %", *(f"b{b}" for b in sizes), "faster from", "faster from (best runs)"],
                 ([r["runtime"], r["method"], f"{100 * r['macs_ratio']:.1f}",
                   *((f"{r['images_per_s'][b]:.1f}/s" if r["method"] == "dense" else f"{r['speedup'][b]:.2f}")
                     for b in sizes),
                   *(("-" if r["method"] == "dense" else (f"batch {r[key]}" if r[key] else "never"))
                     for key in ("break_even", "break_even_best"))]
                  for r in rows))]
    write(f"{args.name}_breakeven", {"rows": rows, "args": vars(args)}, "\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["deit", "breakeven", "teacher"],
                   choices=["deit", "teacher", "breakeven"])
    p.add_argument("--model", default="deit_small_patch16_224", help="the timm ViT of the deit and breakeven parts")
    p.add_argument("--budget", type=float, default=0.74)
    add_threads(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="teacher: first N test images (default: all)")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--sweep-runs", type=int, default=2, help="breakeven: timed runs per model, batch and round")
    p.add_argument("--sweep-rounds", type=int, default=2, help="breakeven: interleaved rounds per batch size")
    p.add_argument("--runtimes", nargs="+", default=["pytorch", "compiled", "onnxruntime"],
                   choices=["pytorch", "compiled", "onnxruntime"])
    p.add_argument("--name", default="deploy")
    args = parse_args(p)
    parts = {"deit": part_deit, "teacher": part_teacher, "breakeven": part_breakeven}
    for part in args.parts:
        parts[part](args)


if __name__ == "__main__":
    main()
