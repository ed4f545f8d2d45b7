"""`leanvit tune` on the shipped teacher and student: the configuration it chooses at --max-drop 0.5 and 1.0
(PyTorch eager, batch 32), and beside it every method at the README's defaults set to the same measured speed.

For each model and drop: `leanvit.experiments.tune.tune` (what the CLI runs, same defaults) on the 5,000 held-out
Fashion-MNIST training images, the test split read once for the choice; its wall and CPU time. Then each method at
the README's options (the ones `make demo` runs: benchmarks/results/tune_gtp.json) at every budget from 0.95 down
to 0.35 is timed in one interleaved run with the tuned model and dense, and the largest budget at least as fast as
the tuned model (in that run) is read on the test split.

Target (issue 24): the tuned configuration is at least as accurate on the test split as every README-default method
at equal or higher speed, on both models.

    python benchmarks/tune_models.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time

from torch.utils.data import DataLoader

import leanvit
from leanvit.analysis import compare_throughput, threads_phrase
from leanvit.engine import evaluate
from leanvit.data import build_dataset
from leanvit.experiments.tune import tune
from leanvit.io import write_json

from common import RESULTS, ROOT, add_threads, parse_args, table, tuned_options, write

TITLE = "Tuned configurations (`leanvit tune`)"
INTRO = ("`leanvit tune` on the shipped models: the fastest configuration within a top-1 drop on the held-out split, "
         "the test split read once for it; beside it each method at the README's defaults set to the same measured "
         "speed. Script: `benchmarks/tune_models.py`.")
README_METHODS = ("gtp", "tome", "evit")


def _load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def tuned_run(name: str, max_drop: float, batch: int, log: list[str], limit: int | None = None) -> dict:
    model = leanvit.create_model(name, pretrained=True).eval()
    heldout = build_dataset("fmnist", "val", model, limit=limit)
    test = build_dataset("fmnist", "test", model, limit=limit)
    load0, wall0, cpu0 = _load(), time.perf_counter(), time.process_time()
    res = tune(model, heldout, test, max_drop=max_drop, batch=batch, log=lambda s: log.append(s) or print(s))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    out = {"model": name, "max_drop": max_drop, "met": res.met, "message": res.message, "wall_s": wall,
           "cpu_s": cpu, "load_before": load0, "load_after": _load(), "stages_s": res.stages,
           "dense": res.dense, "trials": len(res.trials), "result": res.as_dict()}
    if res.met:
        out["recipe"] = res.recipe(name=name).as_dict()
        out["chosen"] = res.chosen.as_dict()
        out["test"] = res.test
        out["_model"] = res.model
    return out


LADDER = [round(0.95 - 0.05 * i, 2) for i in range(13)]  # README budgets tried: 0.95 down to 0.35


def monotone(speed: dict[float, float]) -> dict[float, float]:
    """The least-squares fit of a method's speed-ups over its budgets that never rises with the budget (pool
    adjacent violators): one noisy timing on the shared machine does not decide which budget matches a speed."""
    budgets = sorted(speed)  # ascending: the fitted speed-up must not increase along it
    blocks: list[list[float]] = []  # [mean, weight] per pooled block
    for b in budgets:
        blocks.append([speed[b], 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]]
    fitted = [m for m, w in blocks for _ in range(int(w))]
    return dict(zip(budgets, fitted))


def readme_at_speed(name: str, tuned_model, readme: dict, batch: int, limit: int | None = None) -> dict:
    """Each README-default method at the largest budget of :data:`LADDER` that runs at least as fast as the tuned
    model, all timed in one interleaved run with the tuned and the dense model; then that budget on the test split.

    The budgets are held to measured MACs as ``leanvit compare`` holds them (``patch(budget=...)``)."""
    dense = leanvit.create_model(name, pretrained=True).eval()
    models = {"dense": dense, "tuned": tuned_model}
    for m in README_METHODS:
        for b in LADDER:
            try:
                models[(m, b)] = leanvit.patch(copy.deepcopy(dense), m, budget=b, **readme[m])
            except leanvit.ConfigError:  # a budget the method cannot reach on this model
                continue
    speed = compare_throughput(models, batch_size=batch, warmup=2, runs=3, rounds=3)
    ratio = {k: v / speed["dense"] for k, v in speed.items()}
    target = ratio["tuned"]
    loader = DataLoader(build_dataset("fmnist", "test", dense, limit=limit), batch_size=32)
    out = {"tuned_speedup": target, "dense_images_per_s": speed["dense"], "methods": []}
    for m in README_METHODS:
        ladder = {b: ratio[(m, b)] for b in LADDER if (m, b) in ratio}
        fitted = monotone(ladder)
        fast = [b for b, r in fitted.items() if r >= target]
        row = {"method": m, "options": readme[m], "ladder": {str(b): r for b, r in ladder.items()},
               "fitted": {str(b): r for b, r in fitted.items()}}
        if not fast:
            row.update(met=False, fastest=max(ladder.values()) if ladder else None)
        else:
            b = max(fast)
            red = leanvit.get_reducer(models[(m, b)])
            row.update(met=True, budget=b, schedule=list(red.schedule), speedup=ladder[b], fitted_speedup=fitted[b],
                       macs_fraction=red.report.get("achieved", float("nan")),
                       test_top1=evaluate(models[(m, b)], loader, progress=False).top1)
        out["methods"].append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["leanvit_vit_fm_teacher", "leanvit_vit_fm_student"])
    p.add_argument("--drops", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, default=None,
                   help="first N images of each split (a quick check; BENCHMARKS.md is then left alone)")
    add_threads(p)
    p.add_argument("--name", default="tune_models")
    p.add_argument("--resume", action="store_true", help="keep the runs a stopped run of this script finished")
    args = parse_args(p)
    readme = tuned_options()
    readme = {m: {k: v for k, v in readme.get(m, {}).items()} for m in README_METHODS}
    # every finished (model, drop) is kept in results/<name>.partial.json, so that a run stopped by the shared
    # machine (a process killed for memory) goes on where it stopped with --resume
    partial = RESULTS / f"{args.name}.partial.json"
    done = json.loads(partial.read_text())["runs"] if args.resume and partial.is_file() else []
    runs = []
    for name in args.models:
        for drop in args.drops:
            old = next((r for r in done if r["model"] == name and r["max_drop"] == drop), None)
            if old is not None:
                print(f"== {name} --max-drop {drop}: done before, kept", flush=True)
                runs.append(old)
                continue
            print(f"== {name} --max-drop {drop}", flush=True)
            run = tuned_run(name, drop, args.batch, [], args.limit)
            if run["met"]:
                print("-- README methods at the same speed (one interleaved run)", flush=True)
                run["readme"] = readme_at_speed(name, run.pop("_model"), readme, args.batch, args.limit)
            runs.append(run)
            write_json(partial, {"runs": runs})
    md = report(runs, readme, args)
    write(args.name, {"runs": runs, "readme_options": readme, "ladder": LADDER, "args": vars(args)}, md)
    if args.limit is None:
        section(args.name)


def report(runs: list[dict], readme: dict, args) -> str:
    opts = "; ".join(f"{m}: {o or 'defaults'}" for m, o in readme.items())
    lines = [f"Fashion-MNIST: held-out split `val` (5,000 training images the shipped models never trained on), test "
             f"split 10,000 images, read once per configuration; PyTorch eager, timing batch {args.batch}, "
             f"{threads_phrase(args.threads)}. README defaults: {opts}, each at the largest budget of "
             f"{LADDER[0]}, {LADDER[1]}, ..., {LADDER[-1]} (MACs held as `leanvit compare` holds them) that runs at "
             f"least as fast as the tuned configuration (by the method's speed-ups over its budgets fitted to fall "
             f"as the budget rises, against timing noise). *Speed-up*: from one interleaved run of dense, the tuned "
             f"configuration and every README method at every budget (the search's own final timing in brackets). "
             f"*Tuning*: wall time of the search (CPU seconds of the process, both threads, and the load averages "
             f"before and after: the machine is shared).", ""]
    rows = []
    for r in runs:
        if not r["met"]:
            rows.append([r["model"], f"{r['max_drop']:g}", "not met: " + r["message"], "", "", "", "", ""])
            continue
        c, rec, rm = r["chosen"], r["recipe"], r["readme"]
        cfg = f"{c['method']} {', '.join(f'{k}={v}' for k, v in rec['options'].items())}; schedule {c['schedule']}"
        rows.append([r["model"], f"{r['max_drop']:g}", f"**tuned**: {cfg}",
                     f"{c['top1']:.2f} ({c['top1'] - r['dense']['heldout_top1']:+.2f})",
                     f"{r['test']['top1']:.2f} ({r['test']['top1'] - r['dense']['test_top1']:+.2f})",
                     f"{rm['tuned_speedup']:.2f}x ({c['speedup']:.2f}x)", f"{100 * c['macs_fraction']:.1f}",
                     f"{r['wall_s'] / 60:.1f} min ({r['cpu_s']:.0f} CPU s; load {r['load_before']} / "
                     f"{r['load_after']})"])
        for m in rm["methods"]:
            if not m["met"]:
                fastest = f" (fastest {m['fastest']:.2f}x)" if m.get("fastest") is not None else ""
                rows.append(["", "", f"{m['method']} (README) reaches {rm['tuned_speedup']:.2f}x at no budget down "
                                     f"to {LADDER[-1]}{fastest}", "", "", "", "", ""])
                continue
            rows.append(["", "", f"{m['method']} (README) at budget {m['budget']:.2f}, schedule {m['schedule']}", "",
                         f"{m['test_top1']:.2f} ({m['test_top1'] - r['dense']['test_top1']:+.2f})",
                         f"{m['speedup']:.2f}x", f"{100 * m['macs_fraction']:.1f}", ""])
    lines += table(["model", "max drop", "configuration", "held-out top-1 (vs dense)", "test top-1 (vs dense)",
                    "speed-up", "MACs %", "tuning"], rows)
    dense = {r["model"]: r["dense"] for r in runs if "test_top1" in r["dense"]}
    lines += ["", "Dense: " + "; ".join(f"{m} held-out {d['heldout_top1']:.2f}%, test {d['test_top1']:.2f}%"
                                        for m, d in dense.items()) + ".", "", "Targets (issue 24):"]
    for r in runs:
        if not r["met"]:
            lines.append(f"* {r['model']} --max-drop {r['max_drop']:g}: no configuration: missed")
            continue
        t = r["test"]["top1"]
        ran = [m for m in r["readme"]["methods"] if m["met"]]
        beaten = [m for m in ran if m["test_top1"] > t + 1e-9]
        best = max(ran, key=lambda m: m["test_top1"], default=None)
        vs = (f"the best README method at that speed, {best['method']}, {best['test_top1']:.2f}" if best else
              "no README method reaches that speed")
        lines.append(f"* {r['model']} --max-drop {r['max_drop']:g}: tuned {t:.2f} on the test split vs {vs}: "
                     + ("missed (" + ", ".join(f"{m['method']} {m['test_top1']:.2f}" for m in beaten) + ")"
                        if beaten else "met")
                     + f"; tuning {r['wall_s'] / 60:.1f} min wall"
                     + (" (within 10 min)" if r["wall_s"] <= 600 else " (over 10 min on the shared machine)"))
    return "\n".join(lines)


def section(name: str) -> None:
    """Put this script's section at the end of BENCHMARKS.md (replacing an earlier run of it), from
    results/tune_models.md as `write` made it (command, machine, date first)."""
    from leanvit.io import atomic_write_text

    body = (RESULTS / f"{name}.md").read_text().strip()
    text = (ROOT / "BENCHMARKS.md").read_text()
    block = f"## {TITLE}\n\n{INTRO}\n\n{body}\n"
    head = f"## {TITLE}\n"
    if head in text:
        start = text.index(head)
        nxt = re.search(r"^## ", text[start + len(head):], flags=re.M)
        end = start + len(head) + nxt.start() if nxt else len(text)
        text = text[:start] + block + ("\n" + text[end:] if nxt else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(ROOT / "BENCHMARKS.md", text)


if __name__ == "__main__":
    main()
