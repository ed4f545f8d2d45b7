"""Compile time of every token-reduction method against the dense model, and where it goes.

Each model is compiled twice, each time in a fresh Python process: *cold*, with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` in a new temporary folder), so no row reuses another's kernels; then *warm*, a second
process on the cache the first one filled (what a user pays from the second run on). Each process first compiles
a tiny unrelated function so that importing and warming up inductor is not charged to the model. Reported for
each model: the wall time of ``torch.compile(model, fullgraph=True)`` plus its first call, cold and warm, the
number of kernels inductor generated, the number of graphs (one means no graph break), and dynamo's breakdown of
the cold time (C++ compilation of the kernels, inductor's code generation and scheduling, dynamo's tracing).

    python benchmarks/compile_time.py --models deit_small_patch16_224 --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from leanvit.analysis import threads_phrase

from common import add_threads, ideal_truncation, parse_args, table, write

METHODS = {"dense": None, "ideal (truncate)": ("truncate", {}), "gtp": ("gtp", {}),
           "gtp (cls score)": ("gtp", {"score": "cls"}), "tome": ("tome", {}), "evit": ("evit", {}),
           "idle": ("idle", {})}


def child(args: argparse.Namespace) -> None:
    """One model in this process: compile, time, count; print one JSON line."""
    import copy
    import time

    import timm
    import torch
    import torch._inductor.config as ind_config
    from torch._inductor import metrics

    import leanvit

    ind_config.cpp_wrapper = args.cpp_wrapper
    # pay inductor's import and first-use cost outside the measurement
    torch.compile(lambda t: torch.relu(t) + 1, fullgraph=True)(torch.randn(8))
    torch._dynamo.reset()
    metrics.reset()

    kw = {"depth": args.depth} if args.depth else {}
    dense = timm.create_model(args.model, pretrained=False, **kw).eval()
    label = args.method
    if METHODS[label] is None:
        model = dense
    else:
        gtp = leanvit.patch(copy.deepcopy(dense), "gtp", budget=args.budget)
        sched = leanvit.get_reducer(gtp).schedule
        method, opts = METHODS[label]
        if method == "idle":
            model = leanvit.patch(dense, "idle", budget=args.budget, **opts)
        elif method == "truncate":
            model = ideal_truncation(dense, gtp)
        else:
            model = leanvit.patch(dense, method, r=sched, **opts)
    x = torch.randn(args.batch_size, 3, 224, 224)
    graphs = []

    def backend(gm, example_inputs):  # counts graphs, then hands over to inductor
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    seconds = time.perf_counter() - t0
    phases = {}
    for line in torch._dynamo.utils.compile_times(repr="str").splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 2:
            try:
                phases[parts[0]] = sum(float(v) for v in parts[1].split(","))
            except ValueError:
                pass
    print(json.dumps({"method": label, "compile_s": seconds, "graphs": len(graphs),
                      "kernels": metrics.generated_kernel_count, "phases": phases}))


def _cells(r: dict, rows: list[dict]) -> list:
    """A table row: times, their ratios to the dense model's, dynamo's breakdown of the cold time, counts."""
    dense = next(d for d in rows if d["model"] == r["model"] and d["method"] == "dense")
    ph = r["phases"]
    codegen = ph.get("GraphLowering.compile_to_module,", 0) - ph.get("PyCodeCache.load_by_key_path,", 0) + \
        ph.get("GraphLowering.run,", 0)
    return [r["model"], r["method"], f"{r['compile_s']:.1f}", f"{r['compile_s'] / dense['compile_s']:.2f}",
            f"{r['warm_compile_s']:.1f}", f"{r['warm_compile_s'] / dense['warm_compile_s']:.2f}",
            f"{ph.get('PyCodeCache.load_by_key_path,', 0):.1f}", f"{codegen:.1f}",
            f"{ph.get('bytecode_tracing,', 0):.1f}", r["graphs"], r["kernels"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--depth", type=int, default=None, help="truncate the timm model to this many blocks")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.74)
    add_threads(p)
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="inductor's cpp_wrapper mode: the whole graph and its kernels in one C++ module")
    p.add_argument("--name", default="compile_time")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = parse_args(p)
    if args.child:
        child(args)
        return
    rows = []
    for name in args.models:
        for label in args.methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", name, "--method", label,
                   "--batch-size", str(args.batch_size), "--budget", str(args.budget),
                   "--threads", str(args.threads)] + (["--depth", str(args.depth)] if args.depth else []) + (
                ["--cpp-wrapper"] if args.cpp_wrapper else [])
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
                runs = []
                for _ in ("cold", "warm"):
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{name} / {label} failed:\n{out.stderr[-3000:]}")
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = {"model": name, **runs[0], "warm_compile_s": runs[1]["compile_s"]}
            print(row, flush=True)
            rows.append(row)
    md = [f"Each model compiled with `torch.compile(fullgraph=True)` (default mode, CPU inductor"
          f"{', cpp_wrapper' if args.cpp_wrapper else ''}) in a fresh process with an empty kernel cache (*cold*), "
          f"then again in a second process on the cache the first one filled (*warm*), "
          f"`TORCHINDUCTOR_COMPILE_THREADS=1`; batch {args.batch_size}, "
          f"{threads_phrase(args.threads)}, budget {args.budget} of dense MACs (every reducer on GTP's schedule; "
          f"idle on its own keep rule at the same budget){f', first {args.depth} blocks' if args.depth else ''}. "
          "*Compile* = compile call plus first forward; *ratio* = over the dense model's; *C++*, *codegen*, "
          "*trace*: dynamo's breakdown of the cold time (compiling the generated kernels, inductor's lowering, "
          "scheduling and code generation, dynamo's bytecode tracing).\n",
          *table(["model", "method", "cold s", "ratio", "warm s", "ratio", "C++ s", "codegen s", "trace s", "graphs",
                  "kernels"], (_cells(r, rows) for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
