"""``leanvit train``: train or fine-tune a model; resumable; runs under torchrun for multi-process training."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError
from .arguments import DEFAULT_MODEL, add_data_args, add_model_args, add_runtime_args
from .build import build_model_from_args, check_model_name, resolve_device, setup_runtime
from .outputs import check_run_dir, save_resolved
from .parsing import add_config_arg, nonneg_float, nonneg_int, positive_float, positive_int

if TYPE_CHECKING:
    from torch import nn

    from ..engine.losses import LossTerm

    # build_losses(args, model) -> (loss terms, teacher or None, cross-entropy weight)
    LossBuilder = Callable[[argparse.Namespace, nn.Module], tuple[list[LossTerm], nn.Module | None, float]]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train or fine-tune a model (resumable; use torchrun for several processes)",
                       description=__doc__)
    add_config_arg(p)
    add_model_args(p, model="leanvit_vit_fm_teacher")
    add_train_options(p)
    p.add_argument("--teacher", default=None, help="frozen teacher model name for distillation")
    p.add_argument("--teacher-weights", default=None, help="weights of the teacher (default: its pretrained)")
    p.add_argument("--kd-weight", type=nonneg_float, default=0.0,
                   help="weight of Hinton logit distillation (0 = off)")
    p.add_argument("--kd-temperature", type=positive_float, default=4.0)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def add_download_arg(p: argparse.ArgumentParser) -> None:
    """``--download``: the verbs that load pretrained weights fetch a timm model's from the hub only when asked."""
    p.add_argument("--download", action="store_true",
                   help="let timm download pretrained weights that do not ship with leanvit (a timm model's, from "
                        "the Hugging Face hub); without it such a model needs --weights / --teacher-weights FILE")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of every training verb (``train``, ``distill``) besides the model's and the runtime's: starting
    weights, data, run folder and resume, schedule, regularisation, seed and frozen parameters."""
    p.set_defaults(pretrained=False)
    p.add_argument("--pretrained", dest="pretrained", action="store_true",
                   help="start from the model's pretrained weights (fine-tuning)")
    add_data_args(p, split="train")
    p.set_defaults(batch_size=128)
    p.add_argument("--val-split", default="val", help="held-out split evaluated every epoch ('none' to skip)")
    p.add_argument("--limit-val", type=positive_int, default=None)
    p.add_argument("--output", "-o", required=True, help="run folder (checkpoints, logs, weights)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt if it exists")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate for the global batch")
    p.add_argument("--min-lr", type=nonneg_float, default=1e-5)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.05)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=1.0)
    p.add_argument("--label-smoothing", type=nonneg_float, default=0.1)
    p.add_argument("--mixup", type=nonneg_float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=nonneg_float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--ema-decay", type=nonneg_float, default=0.0, help="EMA of weights (0 = off, e.g. 0.999)")
    p.add_argument("--clip-grad", type=nonneg_float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--drop-path", type=nonneg_float, default=None, help="stochastic depth rate")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frozen", nargs="*", default=[], help="parameter name prefixes to freeze (e.g. cls_token)")
    p.add_argument("--checkpoint-steps", type=nonneg_int, default=100,
                   help="also write the resumable checkpoint every N steps within an epoch, so that a stopped run "
                        "loses at most N steps (0: at epoch ends only; default: %(default)s)")
    add_download_arg(p)


def run(args: argparse.Namespace) -> int:
    # the teacher is checked before any model or data is loaded (the student, data and output by run_training)
    if args.kd_weight > 0 and not args.teacher:
        raise ConfigError("--kd-weight needs --teacher")
    info: dict[str, Any] = {}
    if args.teacher:
        check_teacher(args)
        info["teacher"] = args.teacher  # recorded only when given: a run without one may not gain one on resume
    if args.kd_weight > 0:
        # what the loss is made of, part of the run's identity (a resume with other values is refused)
        info["loss"] = {"kd_weight": args.kd_weight, "kd_temperature": args.kd_temperature,
                        "teacher_weights": args.teacher_weights}
    return run_training(args, _kd_losses, run_info=info)


def check_teacher(args: argparse.Namespace) -> None:
    """``--teacher`` and ``--teacher-weights`` before any work: a model timm knows, and weights that can be loaded
    here (a file that exists, or pretrained weights that ship with leanvit or that ``--download`` may fetch)."""
    from ..models.factory import check_model_name as check_name, check_pretrained

    check_name(args.teacher)
    if args.teacher_weights is not None:
        if not Path(args.teacher_weights).is_file():
            raise ConfigError(f"--teacher-weights {args.teacher_weights} does not exist")
    else:
        check_pretrained(args.teacher, download=args.download, weights_flag="--teacher-weights", no_pretrained=None)


def create_teacher(args: argparse.Namespace, model: nn.Module, model_role: str = "student",
                   context: str = "which it sees during training") -> nn.Module:
    """The teacher of ``--teacher`` / ``--teacher-weights``, checked to read ``model``'s input (one check for every
    verb: :func:`leanvit.models.factory.check_reads_input`)."""
    from ..models import create_model
    from ..models.factory import check_reads_input

    teacher = create_model(args.teacher, pretrained=args.teacher_weights is None, weights=args.teacher_weights,
                           download=args.download, weights_flag="--teacher-weights", no_pretrained=None)
    check_reads_input(teacher, model, model_role=model_role, context=context)
    return teacher


def _kd_losses(args: argparse.Namespace, model: nn.Module) -> tuple[list[LossTerm], nn.Module | None, float]:
    """``--teacher`` and ``--kd-weight``: Hinton logit distillation added to cross-entropy."""
    from ..engine.losses import LogitKDTerm
    from ..models.factory import check_reads_input

    teacher, terms = None, []
    if args.teacher:
        teacher = create_teacher(args, model)
    if args.kd_weight > 0:
        (_, k_s), (_, k_t) = check_reads_input(teacher, model)
        if k_s != k_t:
            raise ConfigError(f"--kd-weight compares logits, but the student has {k_s} classes and the teacher {k_t}")
        terms.append(LogitKDTerm(args.kd_weight, args.kd_temperature))
    return terms, teacher, 1.0


def check_weights(args: argparse.Namespace) -> None:
    """The model's starting weights before any work: a ``--weights`` file that exists, or pretrained weights that
    can be loaded here (:func:`leanvit.models.factory.check_pretrained`)."""
    from ..models.factory import check_pretrained

    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise ConfigError(f"--weights {args.weights} does not exist")
    elif args.pretrained:
        # train and distill start from pretrained weights only with --pretrained; finetune always does
        no_pretrained = "leave out --pretrained" if args.command in ("train", "distill") else None
        check_pretrained(args.model or DEFAULT_MODEL, download=args.download, no_pretrained=no_pretrained)


@contextlib.contextmanager
def _quiet_one_step_cosine():
    """Silence timm's "Cosine annealing scheduler will have no effect" warning while the trainer builds its
    scheduler. timm logs it whenever the cosine spans a single step (``t_initial == 1``), which leanvit's schedule
    does on purpose for runs of one step after warm-up (smoke runs, tests): the step then ends at ``min_lr`` as it
    should, so the line is noise. Only that message of that logger is filtered, and only here."""
    logger = logging.getLogger("timm.scheduler.cosine_lr")

    def keep(record: logging.LogRecord) -> bool:
        return "will have no effect on the learning rate" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def check_run_folder(args: argparse.Namespace) -> Path:
    """``--output`` before any work: a folder the run can create and write, with no folder where it writes a file,
    and not a finished or stopped run unless ``--resume`` (the trainer would refuse it only once the model and data
    are built)."""
    out = check_run_dir(args.output, "--output")
    last = out / "last.pt"  # leanvit.engine.Trainer.last_path
    if last.exists() and not args.resume:
        raise ConfigError(f"{last} exists; pass --resume to continue it or choose another --output")
    return out


def run_training(args: argparse.Namespace, build_losses: LossBuilder, run_info: dict[str, Any] | None = None) -> int:
    """Build the model, data and :class:`~leanvit.engine.Trainer` from ``args`` (:func:`add_train_options` plus
    the model and runtime options), resume or start the run, and train.

    Args:
        build_losses: ``build_losses(args, model)`` is called once the model and data are built and returns
            ``(loss_terms, teacher or None, ce_weight)``.
        run_info: entries added to the run information saved in the checkpoint (e.g. the distillation method).
    """
    import torch

    from ..data import build_dataset
    from ..io import atomic_write_text
    from ..engine import Trainer, TrainConfig, init_distributed

    # what the user typed is checked before the model or the data is loaded
    check_model_name(args)
    check_weights(args)
    check_run_folder(args)
    resolve_device(args)
    setup_runtime(args)
    dist = init_distributed(args.device)
    # the initial weights follow --seed (torch seeds its generator randomly in each new process), so a run and
    # its restart from scratch, or two runs with the same command, start from the same model
    torch.manual_seed(args.seed)
    kwargs = {"drop_path_rate": args.drop_path} if args.drop_path is not None else {}
    model = build_model_from_args(args, **kwargs)
    train_set = build_dataset(args.data, args.split, model, train=True, limit=args.limit,
                              skip_bad=args.skip_bad_images, progress=args.progress)
    val_set = None
    if args.val_split and args.val_split.lower() != "none":
        val_set = build_dataset(args.data, args.val_split, model, train=False, limit=args.limit_val,
                                skip_bad=args.skip_bad_images, progress=args.progress)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix needs an even batch size, got {args.batch_size}")
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, ema_decay=args.ema_decay, clip_grad=args.clip_grad or None,
        amp=args.amp, seed=args.seed, workers=args.workers, frozen=tuple(args.frozen), progress=args.progress,
        checkpoint_steps=args.checkpoint_steps)
    terms, teacher, ce_weight = build_losses(args, model)
    out = Path(args.output)
    # run_info is the run's identity: a resume with another model, data, teacher, method, patch, loss setting
    # ("loss", from the verb) or training set ("settings") is refused by Trainer.resume, naming the setting
    run_info = {"model": args.model, "data": args.data, "split": args.split, **(run_info or {}),
                "settings": {"limit": args.limit, "drop_path": args.drop_path, "num_classes": args.num_classes},
                "command": "leanvit " + shlex.join(sys.argv[1:])}
    with _quiet_one_step_cosine():
        trainer = Trainer(model, train_set, val_set, cfg, out, loss_terms=terms, teacher=teacher,
                          ce_weight=ce_weight, run_info=run_info, dist=dist,
                          teacher_cache=getattr(args, "teacher_cache", None))
    try:
        resumed = args.resume and trainer.resume()
    except RuntimeError as e:  # torch's load_state_dict: the checkpoint's loss terms (projectors) differ from these
        if "state_dict" not in str(e):
            raise
        # a checkpoint that does not record its loss settings (older leanvit): the shapes tell, not which setting
        raise ConfigError(f"cannot resume {trainer.last_path}: its loss terms differ from this command's (their "
                          f"parameters have other names or shapes); resume with the method and options it was "
                          f"started with, or choose another --output") from None
    if resumed:
        if dist.is_main:
            print(f"resumed {trainer.last_path} at epoch {trainer.epoch}, step {trainer.step}")
    elif trainer.last_path.exists():
        raise ConfigError(f"{trainer.last_path} exists; pass --resume to continue it or choose another --output")
    # a finished run resumed has nothing to do: its records keep describing the command that trained it
    if dist.is_main and trainer.epoch < cfg.epochs:
        save_resolved(args, out / "config.yaml")
        atomic_write_text(out / "command.txt", run_info["command"] + "\n")
    result = trainer.fit()
    if dist.is_main and result.history:
        print(json.dumps(result.history[-1]))
    return 0
