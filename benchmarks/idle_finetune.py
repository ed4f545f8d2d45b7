"""IdleViT against EViT on the reference teacher, with and without fine-tuning (issue: IdleViT accuracy table).

    python benchmarks/idle_finetune.py --threads 2                  # the table (6 fine-tuning runs)
    python benchmarks/idle_finetune.py --limit 256 --epochs 1 --runs /tmp/idle --name idle_trial   # a check

Every run is ``leanvit finetune leanvit_vit_fm_teacher --method M --keep K --epochs E --seed S --ema-decay D
-o RUNS/M-K_sS --resume`` (the IdleViT recipe of ``leanvit finetune``, shortened to ``--epochs``; the EMA decay
is scaled to the run's length as the authors' is to theirs: it averages over 1.33 x the run's steps), so a stopped
script continues where it stopped and a finished run (one with ``model.safetensors``) is not trained again. Each
variant is evaluated on the test split without fine-tuning (the shipped dense weights, patched) and after it (the
last epoch's weights and their EMA), and the dense model once. The table goes to ``results/NAME.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from common import ROOT, add_threads, parse_args, run_leanvit, table, write

MODEL = "leanvit_vit_fm_teacher"
TRAIN_IMAGES = 55_000  # Fashion-MNIST's training split in leanvit (60,000 less the 5,000 validation images)
# variant -> (method, keep); seeds per variant from --seeds (keep 0.5: the issue asks for two)
VARIANTS = {"idle-0.7": ("idle", 0.7), "idle-0.5": ("idle", 0.5), "evit-0.5": ("evit", 0.5), "evit-0.7": ("evit", 0.7)}
SEEDS = {"idle-0.7": 1, "idle-0.5": 2, "evit-0.7": 1, "evit-0.5": 2}


def _eval(out: Path, args: argparse.Namespace, *argv: str) -> dict:
    if not out.is_file():
        limit = ["--limit", str(args.limit)] if args.limit else []
        run_leanvit("eval", "-m", MODEL, *argv, "--threads", str(args.threads), "--no-progress", *limit,
                    "--json", str(out))
    return json.loads(out.read_text())


def _macs_share(method: str | None, keep: float | None) -> float:
    """The patched model's counted MACs over the dense model's (one batch-1 forward each)."""
    import leanvit
    from leanvit.analysis import count_macs

    model = leanvit.create_model(MODEL, pretrained=False).eval()
    dense = count_macs(model).macs
    if method is None:
        return 1.0
    leanvit.patch(model, method, keep=keep)
    return count_macs(model).macs / dense


def _ema_decay(epochs: int, batch: int, limit: int | None) -> float:
    steps = epochs * math.ceil((limit or TRAIN_IMAGES) / batch)
    return 1.0 - 1.0 / (1.33 * steps)


def _finetune(v: str, seed: int, runs: Path, decay: float, args: argparse.Namespace) -> None:
    method, keep = VARIANTS[v]
    out = runs / f"{v}_s{seed}"
    if (out / "model.safetensors").is_file():  # finished
        return
    limits = ["--limit", str(args.limit), "--limit-val", str(args.limit)] if args.limit else []
    run_leanvit("finetune", MODEL, "--method", method, "--keep", str(keep), "--epochs", str(args.epochs),
                "--seed", str(seed), "--batch-size", str(args.batch_size), "--ema-decay", f"{decay:.6f}",
                "--threads", str(args.threads), "--no-progress", *limits, "-o", str(out), "--resume")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default: 1)")
    p.add_argument("--batch-size", type=int, default=128)
    add_threads(p)
    p.add_argument("--limit", type=int, default=None, help="images per split (a quick check)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "idle_finetune"))
    p.add_argument("--eval-only", action="store_true", help="evaluate finished runs; train nothing")
    p.add_argument("--name", default="idle_finetune")
    args = parse_args(p)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    decay = _ema_decay(args.epochs, args.batch_size, args.limit)
    if not args.eval_only:  # every variant's first seed before any second seed: a stopped script has one of each
        for seed in range(max(SEEDS[v] for v in variants)):
            for v in variants:
                if seed < SEEDS[v]:
                    _finetune(v, seed, runs, decay, args)
    rows = [{"variant": "dense", "finetuned": "-", "top1": _eval(runs / "eval_dense.json", args)["top1"]}]
    for v in variants:
        method, keep = VARIANTS[v]
        amount = ["--method", method, "--keep", str(keep)]
        base = _eval(runs / f"eval_{v}_nofinetune.json", args, *amount)
        share = _macs_share(method, keep)
        rows.append({"variant": v, "finetuned": "no", "top1": base["top1"], "macs_share": share,
                     "schedule": base.get("schedule")})
        finals, emas = [], []
        for seed in range(SEEDS[v]):
            out = runs / f"{v}_s{seed}"
            if not (out / "model.safetensors").is_file():
                continue
            finals.append(_eval(out / "eval_last.json", args, "--weights", str(out / "model.safetensors"),
                                *amount)["top1"])
            if (out / "model_ema.safetensors").is_file():
                emas.append(_eval(out / "eval_ema.json", args, "--weights", str(out / "model_ema.safetensors"),
                                  *amount)["top1"])
        for kind, vals in (("last epoch", finals), ("EMA", emas)):
            if vals:
                rows.append({"variant": v, "finetuned": f"{args.epochs} ep, {kind}", "macs_share": share,
                             "top1": statistics.mean(vals),
                             "top1_std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "seeds": len(vals),
                             "per_seed": vals})
    dense = rows[0]["top1"]
    for r in rows:
        r["vs_dense"] = r["top1"] - dense
    lines = table(["variant", "fine-tuned", "test top-1 (%)", "vs dense", "seeds", "share of dense MACs"],
                  ([r["variant"], r["finetuned"],
                    f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if r.get("top1_std") else ""),
                    f"{r['vs_dense']:+.2f}", r.get("seeds", 1), f"{r.get('macs_share', 1.0):.3f}"] for r in rows))
    write(args.name, {"rows": rows, "epochs": args.epochs, "ema_decay": decay}, "\n".join(lines) + "\n\n" + (
        f"{MODEL} on the Fashion-MNIST test split ({args.limit or 10000} images). Fine-tuning: `leanvit finetune` "
        f"(IdleViT's recipe: self-distillation from the frozen dense model, cls token and position embedding frozen, "
        f"EMA, token-cut loss for idle), shortened to {args.epochs} epoch(s) at batch {args.batch_size}, EMA decay "
        f"{decay:.6f}. Idle and EViT share their stages, from 1/4, 1/2 and 3/4 of the depth on (the 6-block teacher: "
        f"block 3, block 4, blocks 5-6; DeiT: blocks 4-6, 7-9, 10-12 of 12)."))


if __name__ == "__main__":
    main()
