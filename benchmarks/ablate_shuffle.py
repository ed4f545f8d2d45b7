"""Ablation of the channel-shuffle ViT's design on Fashion-MNIST: every registered ``leanvit_shuffle_fm_*`` variant
and its vanilla partner, trained with the reference student's recipe, in one table with MACs and parameters.

Each model trains in its own run folder with ``leanvit train -c configs/fmnist_student.yaml --resume`` (one
process per run), so the script can be stopped at any time and re-run with the same flags to continue where it
stopped: finished runs are skipped, an interrupted one resumes from its ``last.pt``. The run folders are named
after the schedule (epochs and limits), so a shorter trial never resumes into a real run. The table
(``results/<name>.md`` and ``.json``) gives per model its design, GMACs, parameters, MACs against its partner,
the last epoch's validation top-1 (held-out split) and the test top-1 of the last epoch's weights.

    # the real ablation: the student's recipe and schedule (10 epochs; about 40 min per model on 2 cores)
    python benchmarks/ablate_shuffle.py --threads 2
    # a shorter schedule, or a subset of variants
    python benchmarks/ablate_shuffle.py --epochs 3 --variants leanvit_shuffle_fm_student leanvit_shuffle_fm_pos_none
    # the final comparison: the chosen design on the full recipe, two seeds, against the shipped student
    python benchmarks/ablate_shuffle.py --threads 2 --variants NAME --seeds 0 1 --partner-seeds 0 --name shuffle_final

On the full recipe the reference student's seed 0 is not trained again: its shipped run (log, test accuracy) in
``src/leanvit/zoo/runs/leanvit_vit_fm_student`` is that run.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import timm

from leanvit.analysis import count_macs
from leanvit.models import SHUFFLE_ARCHS, ShuffleArch

from common import ROOT, add_threads, fmt, parse_args, run_leanvit, table, write

FM_VARIANTS = [n for n, a in SHUFFLE_ARCHS.items() if a.geometry == "fm"]


def design(arch: ShuffleArch | None) -> str:
    """A short description of a variant's block options (``vanilla`` for a partner)."""
    if arch is None:
        return "vanilla"
    mlp = (f"shared x{arch.mlp_ratio:g}" if arch.mlp_mode == "shared" else
           f"grouped x{arch.mlp_ratio:g}/x{arch.idle_mlp_ratio:g}")
    return (f"C={arch.embed_dim} a={arch.attn_dim} shuffle={arch.shuffle} mlp={mlp}"
            + (" alternate" if arch.alternate else ""))


def finished_epochs(run: Path) -> int:
    log = run / "log.json"
    rows = json.loads(log.read_text()) if log.is_file() else []
    return rows[-1]["epoch"] if rows else 0


def shipped_run(name: str, seed: int, args: argparse.Namespace) -> Path | None:
    """The zoo's run folder when ``name`` at ``seed`` on this schedule is a shipped model's own training run (the
    reference student: the default recipe, full schedule, seed 0), so that it is not trained again."""
    import yaml

    from leanvit.zoo import RUNS_DIR, has_weights

    run = RUNS_DIR / name
    if not has_weights(name) or args.limit or args.limit_val or args.limit_test or args.data != "fmnist":
        return None
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    recipe = yaml.safe_load(args.config.read_text())
    same = all(cfg.get(k) == v for k, v in recipe.items() if k not in ("output", "threads"))
    return run if same and cfg.get("seed") == seed and cfg.get("epochs") == args.epochs else None


def train_and_test(name: str, run: Path, seed: int, args: argparse.Namespace) -> dict:
    """Train ``name`` in ``run`` (resuming), evaluate its last weights on the test split; the run's results."""
    shipped = shipped_run(name, seed, args)
    if shipped is not None:  # its log and its test accuracy, measured by scripts/export_zoo.py with leanvit eval
        log = json.loads((shipped / "log.json").read_text())
        test = json.loads((shipped / "eval.json").read_text())["top1"]
        return {"val_top1": log[-1].get("val_top1"), "test_top1": test, "epochs": log[-1]["epoch"], "shipped": True}
    common = ["--data", args.data, "--threads", str(args.threads), "--no-progress"]
    if finished_epochs(run) < args.epochs:
        limits = [f for flag, v in (("--limit", args.limit), ("--limit-val", args.limit_val)) if v
                  for f in (flag, str(v))]
        run_leanvit("train", "-c", str(args.config), "--model", name, "-o", str(run), "--resume",
                    "--epochs", str(args.epochs), "--seed", str(seed), *limits, *common)
    test = run / "test.json"
    weights = run / "model.safetensors"
    # a run's records in benchmarks/logs/ablate_shuffle/ keep its log and test.json but not its weights
    if not test.is_file() or (weights.is_file() and test.stat().st_mtime < weights.stat().st_mtime):
        limit = ["--limit", str(args.limit_test)] if args.limit_test else []
        run_leanvit("eval", "--model", name, "--weights", str(weights), "--split", "test", "--json", str(test),
                    *limit, *common)
    log = json.loads((run / "log.json").read_text())
    return {"val_top1": log[-1].get("val_top1"), "test_top1": json.loads(test.read_text())["top1"],
            "epochs": log[-1]["epoch"]}


def _cells(r: dict) -> list:
    """A table row: design, cost, accuracy (mean ± std over seeds), against the partner."""
    test = f"{r['test_top1']:.2f}" + (f" ± {r['test_std']:.2f}" if r["test_std"] is not None else "")
    test += " (shipped)" if any(x.get("shipped") for x in r["runs"]) else ""
    return [r["axis"], r["model"], r["design"], f"{r['macs'] / 1e9:.4f}", f"{r['params'] / 1e6:.3f}",
            f"{100 * r['macs_vs_partner']:.1f}%", fmt(r["val_top1"], ".2f", "-"), test, f"{r['test_vs_partner']:+.2f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=FM_VARIANTS, choices=FM_VARIANTS, metavar="NAME",
                   help="channel-shuffle variants (default: all Fashion-MNIST ones); partners are added")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "fmnist_student.yaml",
                   help="the training recipe (default: the reference student's)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (the student's recipe: 10)")
    p.add_argument("--limit", type=int, default=None, help="training images per run (default: all)")
    p.add_argument("--limit-val", type=int, default=None, help="held-out images evaluated per epoch (default: all)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--data", default="fmnist", help="leanvit --data (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds per model (mean and spread in the table; seed 0's folder has no seed suffix)")
    p.add_argument("--partner-seeds", type=int, nargs="+", default=None,
                   help="seeds of the vanilla partners (default: --seeds). On the full recipe the reference "
                        "student's seed 0 is the shipped model, not trained again")
    add_threads(p)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablate_shuffle", help="parent of the run folders")
    p.add_argument("--name", default="ablate_shuffle", help="results/<name>.md and .json")
    args = parse_args(p)

    partners = list(dict.fromkeys(SHUFFLE_ARCHS[v].partner for v in args.variants))
    schedule = f"e{args.epochs}" + "".join(f"_{k}{v}" for k, v in (("l", args.limit), ("v", args.limit_val)) if v)
    rows = []
    for name in partners + args.variants:
        arch = SHUFFLE_ARCHS.get(name)
        model = timm.create_model(name)
        seeds = args.seeds if arch or args.partner_seeds is None else args.partner_seeds
        runs = [train_and_test(name, args.runs / schedule / (name + (f"_s{s}" if s else "")), s, args)
                for s in seeds]
        tests = [r["test_top1"] for r in runs]
        rows.append({"model": name, "axis": arch.axis if arch else "partner", "design": design(arch),
                     "partner": arch.partner if arch else None, "macs": count_macs(model).macs,
                     "params": sum(q.numel() for q in model.parameters()), "runs": runs,
                     "val_top1": statistics.fmean(r["val_top1"] for r in runs) if runs[0]["val_top1"] is not None
                     else None, "test_top1": statistics.fmean(tests),
                     "test_std": statistics.stdev(tests) if len(tests) > 1 else None})
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        partner = by_name.get(r["partner"])
        r["macs_vs_partner"] = r["macs"] / partner["macs"] if partner else 1.0
        r["test_vs_partner"] = r["test_top1"] - partner["test_top1"] if partner else 0.0

    data = f"{args.data}, {args.limit or 'all'} training images" + (f", {args.limit_val} held-out" if args.limit_val
                                                                     else "")
    md = [f"Recipe `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}` for "
          f"{args.epochs} epochs ({data}), seeds {', '.join(map(str, args.seeds))} (mean ± std where several); "
          f"top-1 of the last epoch's weights (val: held-out split, test: {args.limit_test or 'all 10,000'} test "
          f"images). MACs per image at 28x28.\n",
          *table(["axis", "model", "design", "GMACs", "params (M)", "MACs vs partner", "val top-1 %", "test top-1 %",
                  "test vs partner"], map(_cells, rows))]
    write(args.name, {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, "\n".join(md))


if __name__ == "__main__":
    main()
