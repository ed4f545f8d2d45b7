"""Wall time of the README's main job (`make demo`), phase by phase, with its output sent to a pipe as in CI.

    python benchmarks/demo_time.py

Runs `make demo` once (its progress goes to a pipe, so it prints a few lines per phase), then reports the wall time,
the time of each phase from those lines, the number of output lines, the top-1 column it printed, and the arithmetic
the evaluation phase had to do: the MACs of every variant summed over the 10,000 test images.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import time

from common import ROOT, table, write

# fp32 peak of the 2-core VM used for this project: 2 cores x 2.6 GHz x 32 FLOP per cycle (two 256-bit FMA pipes,
# AMD Zen 4 as `lscpu` reports: avx512 with avx512_bf16); an estimate from the data sheet, not a measurement
PEAK_GFLOPS = 2 * 2.6 * 32


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    t0 = time.perf_counter()
    proc = subprocess.run(["make", "-s", "demo"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"make demo failed:\n{proc.stdout}\n{proc.stderr}")
    lines = (proc.stdout + proc.stderr).splitlines()
    phases = {m.group(1): float(m.group(2)) for line in lines
              if (m := re.match(r"(.+?): done in ([\d.]+) s", line))}
    result = json.loads((ROOT / "results" / "compare.json").read_text())
    rows, images = result["rows"], result["meta"]["images"]
    gmacs = sum(r["gmacs"] for r in rows)
    eval_s = next((s for p, s in phases.items() if p.startswith("evaluating")), float("nan"))
    tflop = 2 * gmacs * images / 1e3
    data = {"wall_s": wall, "phases_s": phases, "output_lines": len(lines), "variants": len(rows),
            "images": images, "sum_gmacs_per_image": gmacs, "eval_tflop": tflop,
            "eval_gflops_achieved": tflop * 1e3 / eval_s, "peak_gflops_estimate": PEAK_GFLOPS,
            "eval_s_at_peak": tflop * 1e3 / PEAK_GFLOPS,
            "top1": {f"{r['method']}@{r['budget']:.2f}": r["top1"] for r in rows}}
    md = [f"`make demo` (`leanvit compare` on the shipped teacher, {len(rows)} variants, {images:,} test images, "
          f"output to a pipe): **{wall / 60:.1f} min** wall, {len(lines)} lines of output.", "",
          *table(["phase", "seconds"], ([p, f"{s:.1f}"] for p, s in phases.items()))]
    md += ["", f"The evaluation phase computes {gmacs:.3f} GMACs per image over all variants, {tflop:.1f} TFLOP for "
           f"the test set: {data['eval_gflops_achieved']:.0f} GFLOP/s achieved. At this CPU's fp32 peak (about "
           f"{PEAK_GFLOPS:.0f} GFLOP/s: 2 cores x 2.6 GHz x 32 FLOP per cycle) the same arithmetic would still take "
           f"{data['eval_s_at_peak']:.0f} s.", "",
           "Top-1 printed: " + ", ".join(f"{k} {v:.2f}" for k, v in data["top1"].items()) + "."]
    write("demo_time", data, "\n".join(md))


if __name__ == "__main__":
    main()
