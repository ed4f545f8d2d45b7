"""`leanvit tune` on the shipped teacher and student: the configuration it chooses at --max-drop 0.5 and 1.0
(PyTorch eager, batch 32), and beside it every method at the README's defaults set to the same measured speed.

For each model and drop: `leanvit.experiments.tune.tune` (what the CLI runs, same defaults) on the 5,000 held-out
Fashion-MNIST training images, the test split read once for the choice; its wall and CPU time. Then each method at
the README's options (the ones `make demo` runs: benchmarks/results/tune_gtp.json) is tuned for speed alone: the
most accurate budget at least as fast as the tuned configuration (`tune(..., target_speedup=<the tuned speed-up>)`
with that one method and its options fixed), read on the test split the same way. Last, the tuned configuration,
the methods at their budgets and dense are timed in one interleaved run, whose speed-ups the table shows.

Target (issue 24): the tuned configuration is at least as accurate on the test split as every README-default method
at equal or higher speed, on both models.

    python benchmarks/tune_models.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import re
import time

from torch.utils.data import DataLoader

import leanvit
from leanvit.analysis import compare_throughput, threads_phrase
from leanvit.engine import evaluate
from leanvit.data import build_dataset
from leanvit.experiments.tune import DEFAULT_SPACE, tune
from leanvit.reduce.registry import method_options

from common import ROOT, add_threads, fmt, parse_args, table, tuned_options, write

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


def readme_at_speed(name: str, method: str, options: dict, speedup: float, batch: int, limit: int | None = None
                    ) -> dict:
    """The README-default method at the largest budget that is at least ``speedup`` fast."""
    model = leanvit.create_model(name, pretrained=True).eval()
    heldout = build_dataset("fmnist", "val", model, limit=limit)
    # every option the search would vary, fixed: the README's value, else the method's own default
    declared = method_options(method)
    fixed = {opt: [options.get(opt, declared[opt].default)] for opt in DEFAULT_SPACE[method]}
    res = tune(model, heldout, None, target_speedup=max(speedup, 1.0 + 1e-6), methods=[method],
               space={method: fixed}, batch=batch, progress=False, log=lambda s: None)
    out = {"method": method, "options": options, "met": res.met, "message": res.message}
    if res.met:
        c = res.chosen
        # the test split, once, for this configuration (dense's test top-1 is the tuned run's)
        loader = DataLoader(build_dataset("fmnist", "test", model, limit=limit), batch_size=32)
        test_top1 = evaluate(res.model, loader, progress=False).top1
        out.update(budget=c.budget, schedule=c.schedule, heldout_top1=c.top1, test_top1=test_top1,
                   speedup_search=c.speedup, macs_fraction=c.macs_fraction, _model=res.model)
    elif res.best is not None:
        out.update(fastest=res.best.speedup)
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
    args = parse_args(p)
    readme = tuned_options()
    readme = {m: {k: v for k, v in readme.get(m, {}).items()} for m in README_METHODS}
    runs = []
    for name in args.models:
        for drop in args.drops:
            print(f"== {name} --max-drop {drop}", flush=True)
            run = tuned_run(name, drop, args.batch, [], args.limit)
            run["readme"] = []
            if run["met"]:
                s = run["chosen"]["speedup"]
                for m in README_METHODS:
                    print(f"-- {m} at README defaults, at least {s:.2f}x", flush=True)
                    run["readme"].append(readme_at_speed(name, m, readme[m], s, args.batch, args.limit))
                # one interleaved run: dense, the tuned configuration and every method at its budget
                dense = leanvit.create_model(name, pretrained=True).eval()
                models = {"dense": dense, "tuned": run.pop("_model")}
                models.update({r["method"]: r.pop("_model") for r in run["readme"] if "_model" in r})
                speed = compare_throughput(models, batch_size=args.batch, warmup=3, runs=5, rounds=3)
                run["same_run_speedup"] = {k: v / speed["dense"] for k, v in speed.items()}
            runs.append(run)
    md = report(runs, readme, args)
    write(args.name, {"runs": runs, "readme_options": readme, "args": vars(args)}, md)
    if args.limit is None:
        section(args.name)


def report(runs: list[dict], readme: dict, args) -> str:
    opts = "; ".join(f"{m}: {o or 'defaults'}" for m, o in readme.items())
    lines = [f"Fashion-MNIST: held-out split `val` (5,000 training images the shipped models never trained on), test "
             f"split 10,000 images read once per configuration; PyTorch eager, timing batch {args.batch}, "
             f"{threads_phrase(args.threads)}. README defaults: {opts}. *Speed-up*: from one interleaved run of "
             f"dense, the tuned configuration and the README methods at their budgets (the search's own final "
             f"timing in brackets). *Tuning*: wall time of the search (CPU seconds of the process, both threads, and "
             f"the load average before and after: the machine is shared).", ""]
    rows = []
    for r in runs:
        if not r["met"]:
            rows.append([r["model"], f"{r['max_drop']:g}", "not met: " + r["message"], "", "", "", "", ""])
            continue
        c, rec = r["chosen"], r["recipe"]
        same = r.get("same_run_speedup", {})
        tuned_cfg = (f"{c['method']} {', '.join(f'{k}={v}' for k, v in rec['options'].items())}; "
                     f"schedule {c['schedule']}")
        rows.append([r["model"], f"{r['max_drop']:g}", f"**tuned**: {tuned_cfg}",
                     f"{c['top1']:.2f} ({c['top1'] - r['dense']['heldout_top1']:+.2f})",
                     f"{r['test']['top1']:.2f} ({r['test']['top1'] - r['dense']['test_top1']:+.2f})",
                     f"{fmt(same.get('tuned'))}x ({c['speedup']:.2f}x)",
                     f"{100 * c['macs_fraction']:.1f}",
                     f"{r['wall_s'] / 60:.1f} min ({r['cpu_s']:.0f} CPU s; load {r['load_before']} / "
                     f"{r['load_after']})"])
        for m in r["readme"]:
            if not m["met"]:
                fastest = f" (fastest {m['fastest']:.2f}x)" if m.get("fastest") else ""
                rows.append(["", "", f"{m['method']} (README) cannot reach {c['speedup']:.2f}x{fastest}", "", "",
                             "", "", ""])
                continue
            rows.append(["", "", f"{m['method']} (README) at budget {m['budget']:.3f}, schedule {m['schedule']}",
                         f"{m['heldout_top1']:.2f}", f"{m['test_top1']:.2f}",
                         f"{fmt(same.get(m['method']))}x ({m['speedup_search']:.2f}x)",
                         f"{100 * m['macs_fraction']:.1f}", ""])
    lines += table(["model", "max drop", "configuration", "held-out top-1 (vs dense)", "test top-1 (vs dense)",
                    "speed-up", "MACs %", "tuning"], rows)
    dense = {r["model"]: r["dense"] for r in runs if "test_top1" in r["dense"]}
    lines += ["", "Dense: " + "; ".join(f"{m} held-out {d['heldout_top1']:.2f}%, test {d['test_top1']:.2f}%"
                                        for m, d in dense.items()) + ".", "", "Target (issue 24):"]
    for r in runs:
        if not r["met"]:
            lines.append(f"* {r['model']} --max-drop {r['max_drop']:g}: no configuration: missed")
            continue
        t = r["test"]["top1"]
        beaten = [m for m in r["readme"] if m["met"] and m["test_top1"] > t + 1e-9]
        best = max((m for m in r["readme"] if m["met"]), key=lambda m: m["test_top1"], default=None)
        vs = f"best README method at that speed {best['method']} {best['test_top1']:.2f}" if best else \
            "no README method reaches that speed"
        lines.append(f"* {r['model']} --max-drop {r['max_drop']:g}: tuned {t:.2f} vs {vs}: "
                     + ("missed (" + ", ".join(f"{m['method']} {m['test_top1']:.2f}" for m in beaten) + ")"
                        if beaten else "met")
                     + f"; tuning {r['wall_s'] / 60:.1f} min"
                     + (" (within 10 min)" if r["wall_s"] <= 600 else " (over 10 min)"))
    return "\n".join(lines)


def section(name: str) -> None:
    """Put this script's section at the end of BENCHMARKS.md (replacing an earlier run of it), from
    results/tune_models.md as `write` made it (command, machine, date first)."""
    from leanvit.io import atomic_write_text

    from common import RESULTS

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
