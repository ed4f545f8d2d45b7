"""``leanvit train``: train or fine-tune a model; resumable; runs under torchrun for multi-process training."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import (add_config_arg, add_data_args, add_model_args, add_runtime_args, build_model_from_args,
                     save_resolved, setup_runtime)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train or fine-tune a model (resumable; use torchrun for several processes)",
                       description=__doc__)
    add_config_arg(p)
    add_model_args(p, model="leanvit_vit_fm_teacher")
    p.set_defaults(pretrained=False)
    p.add_argument("--pretrained", dest="pretrained", action="store_true",
                   help="start from the model's pretrained weights (fine-tuning)")
    add_data_args(p, split="train")
    p.set_defaults(batch_size=128)
    p.add_argument("--val-split", default="val", help="held-out split evaluated every epoch ('none' to skip)")
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--output", "-o", required=True, help="run folder (checkpoints, logs, weights)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt if it exists")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate for the global batch")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights (0 = off, e.g. 0.999)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frozen", nargs="*", default=[], help="parameter name prefixes to freeze (e.g. cls_token)")
    p.add_argument("--teacher", default=None, help="frozen teacher model name for distillation")
    p.add_argument("--teacher-weights", default=None, help="weights of the teacher (default: its pretrained)")
    p.add_argument("--kd-weight", type=float, default=0.0, help="weight of Hinton logit distillation (0 = off)")
    p.add_argument("--kd-temperature", type=float, default=4.0)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import build_dataset
    from ..engine import LogitKDTerm, Trainer, TrainConfig, init_distributed
    from ..models import create_model

    setup_runtime(args)
    dist = init_distributed(args.device)
    # the initial weights follow --seed (torch seeds its generator randomly in each new process), so a run and
    # its restart from scratch, or two runs with the same command, start from the same model
    torch.manual_seed(args.seed)
    kwargs = {"drop_path_rate": args.drop_path} if args.drop_path is not None else {}
    model = build_model_from_args(args, **kwargs)
    train_set = build_dataset(args.data, args.split, model, train=True, limit=args.limit)
    val_set = None
    if args.val_split and args.val_split.lower() != "none":
        val_set = build_dataset(args.data, args.val_split, model, train=False, limit=args.limit_val)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix needs an even batch size, got {args.batch_size}")
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, ema_decay=args.ema_decay, clip_grad=args.clip_grad or None,
        amp=args.amp, seed=args.seed, workers=args.workers, frozen=tuple(args.frozen), progress=args.progress)
    teacher, terms = None, []
    if args.teacher:
        teacher = create_model(args.teacher, pretrained=args.teacher_weights is None, weights=args.teacher_weights)
    if args.kd_weight > 0:
        if teacher is None:
            raise ConfigError("--kd-weight needs --teacher")
        terms.append(LogitKDTerm(args.kd_weight, args.kd_temperature))
    out = Path(args.output)
    run_info = {"model": args.model, "data": args.data, "split": args.split,
                "command": "leanvit " + shlex.join(sys.argv[1:])}
    trainer = Trainer(model, train_set, val_set, cfg, out, loss_terms=terms, teacher=teacher, run_info=run_info,
                      dist=dist)
    if args.resume and trainer.resume():
        if dist.is_main:
            print(f"resumed {trainer.last_path} at epoch {trainer.epoch}, step {trainer.step}")
    elif trainer.last_path.exists():
        raise ConfigError(f"{trainer.last_path} exists; pass --resume to continue it or choose another --output")
    if dist.is_main:
        save_resolved(args, out / "config.yaml")
        (out / "command.txt").write_text(run_info["command"] + "\n")
    result = trainer.fit()
    if dist.is_main and result.history:
        print(json.dumps(result.history[-1]))
    return 0
