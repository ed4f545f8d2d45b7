"""The distillation table on Fashion-MNIST: the reference teacher into the reference student, one run per method.

    python benchmarks/distill_fmnist.py --threads 2        # the table: 7 runs of the student's 10-epoch recipe
    python benchmarks/distill_fmnist.py --limit 256 --epochs 1 --runs /tmp/distill --name distill_trial   # a check

Every run is ``leanvit distill -c configs/fmnist_student.yaml --teacher leanvit_vit_fm_teacher --method M ...
-o RUNS/VARIANT_sSEED --resume`` in its own folder, so a stopped script continues where it stopped and a finished
run (one with ``model.safetensors``) is not trained again: delete its folder to train it anew. Each run is then
analysed once (``leanvit analyze``, saved as ``analyze.json`` and ``analyze_best.json`` in its folder): test top-1
of the last epoch, test top-1 of the epoch with the best validation top-1 (``best.safetensors``), ECE, train-test
gap and linear CKA to the teacher. The table goes to ``results/NAME.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import write

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "leanvit_vit_fm_teacher"
# variant -> leanvit distill options; none trains on the labels alone (the reference student's recipe)
VARIANTS = {
    "none": ["--method", "none"],
    "kd": ["--method", "kd"],
    "kd-proj": ["--method", "kd-proj"],
    "proj": ["--method", "proj"],
    "pefd-1": ["--method", "pefd", "--projectors", "1"],
    "pefd": ["--method", "pefd", "--projectors", "3"],
    "pefd-norelu": ["--method", "pefd", "--projectors", "3", "--no-projector-relu"],
}


def _leanvit(*argv: str) -> None:
    cmd = [sys.executable, "-m", "leanvit.cli.main", *argv]
    print("$ leanvit " + " ".join(argv), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _run(variant: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.runs) / f"{variant}_s{seed}"
    teacher = [] if variant == "none" else ["--teacher", TEACHER]
    limits = ["--limit", str(args.limit), "--limit-val", str(args.limit)] if args.limit else []
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    if not (out / "model.safetensors").is_file():  # written when a run has finished
        _leanvit("distill", "-c", str(ROOT / "configs" / "fmnist_student.yaml"), *teacher, *VARIANTS[variant],
                 "--seed", str(seed), "--threads", str(args.threads), "--no-progress", *limits, *epochs,
                 "-o", str(out), "--resume")
    test_limit = ["--limit", str(args.limit), "--limit-train", str(args.limit)] if args.limit else []
    for weights, name in (("model.safetensors", "analyze.json"), ("best.safetensors", "analyze_best.json")):
        if not (out / name).is_file() or (out / name).stat().st_mtime < (out / weights).stat().st_mtime:
            _leanvit("analyze", "-m", "leanvit_vit_fm_student", "--weights", str(out / weights), "--teacher", TEACHER,
                     "--threads", str(args.threads), "--no-progress", *test_limit, "--json", str(out / name))
    last, best = (json.loads((out / n).read_text()) for n in ("analyze.json", "analyze_best.json"))
    log = json.loads((out / "log.json").read_text())
    return {"variant": variant, "seed": seed, "options": " ".join(VARIANTS[variant]), "epochs": len(log),
            "test_top1_last": last["top1"], "test_top1_best": best["top1"],
            "val_top1_best": max(r.get("val_top1", float("nan")) for r in log), "ece": last["ece"],
            "gap": last.get("gap"), "cka": last["cka"], "folder": str(out)}


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "distill_fmnist"), help="folder of the run folders")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (a quick check)")
    p.add_argument("--limit", type=int, default=None, help="images per split (a quick check)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="distill_fmnist")
    args = p.parse_args()
    rows = [_run(v, s, args) for v in args.variants for s in args.seeds]
    md = [f"{TEACHER} -> leanvit_vit_fm_student, recipe configs/fmnist_student.yaml"
          f"{f' with {args.epochs} epochs' if args.epochs else ''}"
          f"{f', {args.limit} images per split' if args.limit else ''}; seeds {args.seeds}. Test top-1 (%) of the "
          f"last epoch and of the epoch with the best validation top-1; ECE (15 bins), train-test gap and linear CKA "
          f"of the pre-logits features to the teacher, all of the last epoch.\n",
          "| variant | options | test top-1 last | test top-1 best-val epoch | ECE % | gap (points) | CKA |",
          "|---|---|---|---|---|---|---|"]
    for v in args.variants:
        rs = [r for r in rows if r["variant"] == v]
        md.append(f"| {v} | `{rs[0]['options']}` | {_mean_std([r['test_top1_last'] for r in rs])} | "
                  f"{_mean_std([r['test_top1_best'] for r in rs])} | {_mean_std([100 * r['ece'] for r in rs])} | "
                  f"{_mean_std([r['gap'] for r in rs])} | {_mean_std([r['cka'] for r in rs], 3)} |")
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
