"""The distillation table on Fashion-MNIST: the reference teachers into the reference student, one run per method.

    python benchmarks/distill_fmnist.py --threads 2 --variants none proj pefd --seeds 0 1   # two seeds
    python benchmarks/distill_fmnist.py --threads 2 --variants kd kd-proj pefd-cnn          # one seed
    python benchmarks/distill_fmnist.py --threads 2 --epochs 3 --limit 20000 \\
        --variants pefd-1 pefd-2 pefd pefd-4                                               # the n sweep, shorter
    python benchmarks/distill_fmnist.py --limit 256 --eval-limit 256 --epochs 1 --runs /tmp/distill   # a check
    python benchmarks/distill_fmnist.py --runs benchmarks/logs/distill_fmnist    # the table from the committed records

Every run is ``leanvit distill -c configs/fmnist_student.yaml --teacher T --method M ... -o RUNS/FOLDER --resume``
in its own folder, named after the variant, the seed and the schedule (``pefd_s1``, ``pefd-4_s0_e3_n20000``), so
a stopped script continues where it stopped, a shorter schedule never resumes into a full run, and a finished run
(one with ``model.safetensors``) is not trained again: delete its folder to train it anew. Runs of one seed and
schedule train on the same batches, so the first to run fills ``RUNS/teacher_cache`` with the teacher's outputs
and the others read them (``leanvit distill --teacher-cache``, exact by construction: keyed by the batch's content),
which halves the step time of a distillation run on this machine (``distill_cost.py``). ``none`` at seed 0 on
the full recipe is the shipped student ``leanvit_vit_fm_student`` (trained with ``leanvit train`` on the same recipe
and seed; its best validation epoch is its last), not trained again. Each run is analysed once (``leanvit
analyze``, saved as ``analyze.json`` and ``analyze_best.json`` in its folder): test top-1 of the last epoch, test
top-1 of the epoch with the best validation top-1 (``best.safetensors``), ECE, train-test gap and linear CKA to
its teacher (the ViT teacher for ``none``).

The table (``results/NAME.{json,md}``; NAME defaults to ``distill_fmnist`` plus the schedule) has a row per
variant with every finished run of that schedule found under ``--runs``, whichever invocation trained it; the
teachers' own figures come first.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import ROOT, add_threads, parse_args, run_leanvit, table, write

STUDENT = "leanvit_vit_fm_student"
TEACHER = "leanvit_vit_fm_teacher"
CNN_TEACHER = "leanvit_resnet_fm_teacher"
# variant -> (leanvit distill options, teacher); none trains on the labels alone (the reference student's recipe)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "none": (["--method", "none"], TEACHER),
    "kd": (["--method", "kd"], TEACHER),
    "kd-proj": (["--method", "kd-proj"], TEACHER),
    "proj": (["--method", "proj"], TEACHER),
    "pefd-1": (["--method", "pefd", "--projectors", "1"], TEACHER),
    "pefd-2": (["--method", "pefd", "--projectors", "2"], TEACHER),
    "pefd": (["--method", "pefd", "--projectors", "3"], TEACHER),
    "pefd-4": (["--method", "pefd", "--projectors", "4"], TEACHER),
    "pefd-norelu": (["--method", "pefd", "--projectors", "3", "--no-projector-relu"], TEACHER),
    # cross-architecture: the CNN teacher (configs/fmnist_cnn_teacher.yaml) into the ViT student
    "pefd-cnn": (["--method", "pefd", "--projectors", "3"], CNN_TEACHER),
}


# what a finished run keeps when its weights are not kept (benchmarks/logs/distill_fmnist/): the table reads these
# (analyze_best.json only where the best validation epoch is not the last one)
RECORDS = ("log.json", "analyze.json", "analyze_best.json")


def schedule_suffix(args: argparse.Namespace) -> str:
    """``""`` for the recipe's schedule, else ``_e<epochs>`` and/or ``_n<training images>``."""
    return (f"_e{args.epochs}" if args.epochs else "") + (f"_n{args.limit}" if args.limit else "")


def _folder(variant: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.runs) / f"{variant}_s{seed}{schedule_suffix(args)}"


def _shipped(variant: str, seed: int, args: argparse.Namespace) -> bool:
    return variant == "none" and seed == 0 and not schedule_suffix(args)


def _eval_limits(args: argparse.Namespace) -> list[str]:
    if args.eval_limit:
        return ["--limit", str(args.eval_limit), "--limit-train", str(args.eval_limit)]
    return ["--limit-train", str(args.train_limit)] if args.train_limit else []


def best_is_last(log: list[dict]) -> bool:
    """The last epoch has the best validation top-1 (strictly: best.safetensors keeps the first of equals)."""
    return all(r["val_top1"] < log[-1]["val_top1"] for r in log[:-1])


def _finished(out: Path) -> bool:
    """A finished run: its final weights, or the records the table reads (``--runs benchmarks/logs/distill_fmnist``)."""
    if (out / "model.safetensors").is_file():
        return True
    if not all((out / n).is_file() for n in RECORDS[:2]):
        return False
    return (out / RECORDS[2]).is_file() or best_is_last(json.loads((out / "log.json").read_text()))


def train(variant: str, seed: int, args: argparse.Namespace) -> None:
    out = _folder(variant, seed, args)
    if _shipped(variant, seed, args) or _finished(out):
        return
    options, teacher = VARIANTS[variant]
    teacher_args = [] if variant == "none" else ["--teacher", teacher]
    if variant != "none" and args.teacher_cache.lower() != "none":
        teacher_args += ["--teacher-cache", args.teacher_cache]
    limits = (["--limit", str(args.limit)] if args.limit else []) + (
        ["--limit-val", str(args.eval_limit)] if args.eval_limit else [])
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    run_leanvit("distill", "-c", str(ROOT / "configs" / "fmnist_student.yaml"), *teacher_args, *options,
                "--seed", str(seed), "--threads", str(args.threads), "--no-progress", *limits, *epochs,
                "-o", str(out), "--resume")


def analyse(variant: str, seed: int, args: argparse.Namespace) -> dict | None:
    """The run's row, analysing its weights first where that was not done yet; None if it has not finished."""
    out = _folder(variant, seed, args)
    teacher = VARIANTS[variant][1]
    if _shipped(variant, seed, args):  # the shipped student: its own weights, log and command
        from leanvit.zoo import RUNS_DIR, weight_file

        out.mkdir(parents=True, exist_ok=True)
        weights = {"analyze.json": weight_file(STUDENT)}
        log = json.loads((RUNS_DIR / STUDENT / "log.json").read_text())
    elif _finished(out):
        weights = {"analyze.json": str(out / "model.safetensors"), "analyze_best.json": str(out / "best.safetensors")}
        log = json.loads((out / "log.json").read_text())
    else:
        return None
    if len(weights) == 2 and best_is_last(log):  # best.safetensors holds the last epoch's weights: one analysis
        del weights["analyze_best.json"]
    for name, w in weights.items():
        if not (out / name).is_file() or (Path(w).is_file() and (out / name).stat().st_mtime < Path(w).stat().st_mtime):
            run_leanvit("analyze", "-m", STUDENT, "--weights", w, "--teacher", teacher, "--threads",
                        str(args.threads), "--no-progress", *_eval_limits(args), "--json", str(out / name))
    last = json.loads((out / "analyze.json").read_text())
    # the shipped student's best validation epoch is its last (checked here), so both columns are its weights
    best = json.loads((out / "analyze_best.json").read_text()) if "analyze_best.json" in weights else None
    if best is None and max(r["val_top1"] for r in log) != log[-1]["val_top1"]:
        raise RuntimeError(f"{STUDENT}'s best validation epoch is not its last: the best-epoch column needs them")
    return {"variant": variant, "seed": seed, "teacher": teacher, "options": " ".join(VARIANTS[variant][0]),
            "epochs": len(log), "test_top1_last": last["top1"], "test_top1_best": (best or last)["top1"],
            "val_top1_best": max(r.get("val_top1", float("nan")) for r in log), "ece": last["ece"],
            "gap": last.get("gap"), "cka": last["cka"], "shipped": _shipped(variant, seed, args), "folder": str(out)}


def teacher_row(name: str, args: argparse.Namespace) -> dict:
    limit = f"_l{args.eval_limit}" if args.eval_limit else f"_t{args.train_limit}" if args.train_limit else ""
    out = Path(args.runs) / f"teacher_{name}{limit}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_leanvit("analyze", "-m", name, "--threads", str(args.threads), "--no-progress", *_eval_limits(args),
                    "--json", str(out))
    res = json.loads(out.read_text())
    return {"model": name, "top1": res["top1"], "ece": res["ece"], "gap": res.get("gap")}


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _variant_cells(v: str, rs: list[dict]) -> list[str]:
    """A variant's table row over its runs (mean ± std over seeds)."""
    seeds = ", ".join(f"{r['seed']}{' (shipped)' if r['shipped'] else ''}" for r in rs)
    return [v, f"`{rs[0]['teacher']}`", f"`{rs[0]['options']}`", seeds, _mean_std([r["test_top1_last"] for r in rs]),
            _mean_std([r["test_top1_best"] for r in rs]), _mean_std([100 * r["ece"] for r in rs]),
            _mean_std([r["gap"] for r in rs]), _mean_std([r["cka"] for r in rs], 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=[], choices=list(VARIANTS), help="variants to train now")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "distill_fmnist"), help="folder of the run folders")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 10 epochs (a shorter schedule)")
    p.add_argument("--limit", type=int, default=None, help="training images per epoch (default: all 55,000)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="validation, test and train-gap images (a quick check; default: all)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training images whose top-1 gives the train-test gap (default: all 55,000)")
    add_threads(p)
    p.add_argument("--teacher-cache", default=None,
                   help="folder of the teachers' outputs shared by the runs (default: RUNS/teacher_cache; 'none' "
                        "runs the teacher in every step)")
    p.add_argument("--name", default=None, help="results/NAME.{md,json} (default: distill_fmnist + the schedule)")
    args = parse_args(p)  # sets the runs' thread count here too, which the results' header reports
    args.teacher_cache = args.teacher_cache or str(Path(args.runs) / "teacher_cache")
    for v in args.variants:
        for s in args.seeds:
            train(v, s, args)
    rows = [r for v in VARIANTS for s in range(10) if (r := analyse(v, s, args)) is not None]
    teachers = [teacher_row(t, args) for t in dict.fromkeys(VARIANTS[r["variant"]][1] for r in rows)]
    schedule = "; ".join(filter(None, [f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}" if args.epochs else "",
                                        f"{args.limit} training images per epoch" if args.limit else "",
                                        f"{args.eval_limit} images per evaluation split" if args.eval_limit else "",
                                        f"train top-1 of the gap on the first {args.train_limit} training images"
                                        if args.train_limit and not args.eval_limit else ""]))
    md = [f"Teachers into `{STUDENT}` under the student's recipe (`configs/fmnist_student.yaml`"
          f"{'; ' + schedule if schedule else ', 10 epochs'}) plus the distillation term. Every finished run under "
          f"the runs folder for this schedule is a row (mean ± std over seeds). Test top-1 (%) of the last epoch "
          f"and of the epoch with the best validation top-1; ECE (15 bins), train-test gap (train top-1 minus test "
          f"top-1) and linear CKA of the pre-logits features to the row's teacher (the ViT teacher for `none`), all "
          f"of the last epoch.\n",
          *table(["teacher", "test top-1", "ECE %", "gap (points)"],
                 ([f"`{t['model']}`", f"{t['top1']:.2f}", f"{100 * t['ece']:.2f}", f"{t['gap']:.2f}"]
                  for t in teachers)),
          "",
          *table(["variant", "teacher", "options", "seeds", "test top-1 last", "test top-1 best-val epoch", "ECE %",
                  "gap (points)", "CKA"],
                 (_variant_cells(v, rs) for v in VARIANTS if (rs := [r for r in rows if r["variant"] == v])))]
    write(args.name or f"distill_fmnist{schedule_suffix(args)}", {"rows": rows, "teachers": teachers,
                                                                  "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
