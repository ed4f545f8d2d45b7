"""``leanvit distill``: train a student from a frozen teacher with one of leanvit's distillation methods.

Every option of ``leanvit train`` works here (resume, torchrun, ``-c config.yaml``; the config's ``model`` key is
the student), so ``-c configs/fmnist_student.yaml`` trains the reference student's recipe with a teacher:

    leanvit distill -c configs/fmnist_student.yaml --teacher leanvit_vit_fm_teacher --method pefd --projectors 3 \\
        -o runs/pefd --resume

Projectors are saved in OUTPUT/last.pt with the optimiser; OUTPUT/model.safetensors holds the student alone.

The method and every setting of its loss (--distill-weight, --ce-weight, --kd-temperature, --projectors,
--no-projector-relu, the teacher and its weights) are part of the run: --resume with another value is refused.
A teacher's pretrained weights are loaded offline (leanvit's models) or given with --teacher-weights FILE; a timm
teacher's hub weights are downloaded only with --download.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .arguments import add_model_args, add_runtime_args
from .parsing import add_config_arg
from .train import add_train_options, check_teacher, create_teacher, run_training

if TYPE_CHECKING:
    from torch import nn

    from ..engine.losses import LossTerm


def add_parser(sub) -> argparse.ArgumentParser:
    from ..distill import METHODS

    methods = "; ".join(f"{m.name}: {m.describe()}" for m in METHODS.values())
    p = sub.add_parser("distill", help="train a student from a frozen teacher (PEFD, KD, ...; resumable, torchrun)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    add_model_args(p, model="leanvit_vit_fm_student")
    p.add_argument("--student", dest="model", metavar="MODEL",
                   help="the student to train: the same option as --model (default: leanvit_vit_fm_student)")
    p.add_argument("--teacher", default=None, help="frozen teacher model name (any timm or leanvit classifier)")
    p.add_argument("--teacher-weights", default=None, help="weights of the teacher (default: its pretrained)")
    p.add_argument("--method", default="pefd", help=f"distillation method (default: %(default)s). {methods}")
    p.add_argument("--projectors", type=int, default=None, help="number of projectors in PEFD's ensemble")
    p.add_argument("--no-projector-relu", dest="projector_relu", action="store_false", default=None,
                   help="PEFD projectors without ReLU (a ViT teacher's features are signed; see leanvit.distill)")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the distillation term (default: the method's)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight of cross-entropy on the labels (default: the method's)")
    p.add_argument("--kd-temperature", type=float, default=None, help="KD softmax temperature (default: the method's)")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the teacher's outputs in DIR and reuse them in later runs that train on the same "
                        "batches (same seed, data and recipe: a method sweep); stored by the batch's content, so a "
                        "different batch always runs the teacher")
    add_train_options(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The method's options from the flags (None: the method's default)."""
    return {"weight": args.distill_weight, "temperature": args.kd_temperature, "projectors": args.projectors,
            "relu": args.projector_relu}


# the config.yaml key (and flag) of each method option, to name it when a resume is refused
_OPTION_KEYS = {"weight": "distill_weight", "temperature": "kd_temperature", "projectors": "projectors",
                "relu": "projector_relu"}


def run(args: argparse.Namespace) -> int:
    from ..distill import check_options

    # the method, its options and the teacher (name, weights) are checked before any model or data is loaded (the
    # student, data and output by run_training)
    ce_weight, resolved = check_options(args.method, args.teacher is not None, args.ce_weight, **_options(args))
    if args.teacher is not None:
        check_teacher(args)
    if args.teacher_cache is not None:
        from ..errors import ConfigError
        from .outputs import check_output_dir

        if args.teacher is None:
            raise ConfigError(f"--teacher-cache keeps a teacher's outputs, and method '{args.method}' has no teacher")
        # the cache is first written at the first checkpoint or epoch end: a folder that cannot be created or
        # written must be refused now, not after that work
        check_output_dir(args.teacher_cache, "--teacher-cache")
    # the loss, resolved (a method's default stands for itself), is part of the run's identity: a resume with
    # another value is refused, naming it
    loss = {"ce_weight": ce_weight, **{_OPTION_KEYS.get(k, k): v for k, v in resolved.items()},
            "teacher_weights": args.teacher_weights}
    return run_training(args, _losses, run_info={"teacher": args.teacher, "method": args.method, "loss": loss})


def _losses(args: argparse.Namespace, model: nn.Module) -> tuple[list[LossTerm], nn.Module | None, float]:
    from ..distill import build_terms
    from ..engine import init_distributed

    teacher = None
    if args.teacher:
        teacher = create_teacher(args, model)  # refused in one line if it cannot read the student's input
    d = build_terms(args.method, model, teacher, args.ce_weight, **_options(args))
    if init_distributed(args.device).is_main:
        n_proj = sum(p.numel() for t in d.terms for p in t.parameters())
        opts = ", ".join(f"{k}={v}" for k, v in d.options.items())
        print(f"distill: {args.method} ({opts}{', ' if opts else ''}ce_weight={d.ce_weight:g}) from "
              f"{args.teacher or 'no teacher'} into {args.model}; {n_proj:,} projector parameters")
    return d.terms, teacher, d.ce_weight
