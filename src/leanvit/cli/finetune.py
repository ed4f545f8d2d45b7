"""``leanvit finetune``: fine-tune a dense model with a token reduction patched in, with IdleViT's recipe.

    leanvit finetune leanvit_vit_fm_teacher --method evit --keep 0.7 -o runs/evit07 --resume

MODEL starts from its pretrained (zoo) weights, or from ``--weights FILE``, and is patched with
``leanvit.patch(model, METHOD, keep=... | budget=... | r=..., **options)`` before training. An unpatched frozen copy
of it is the teacher of self-distillation (KL on the logits + MSE of L2-normalised pre-logits features); a method
whose reducer records ``cut_inputs`` (``idle``) adds the token cut loss. The cls token and the position embedding
are frozen and an EMA of the weights is kept (OUTPUT/model_ema.safetensors). OUTPUT/config.yaml records the patch
(``patch: {method, keep | budget | r, options}``), and resuming with another patch, other loss weights, other
frozen parameters or other starting weights (the teacher's) is refused.

A model that is created patched (``leanvit_vit_fm_teacher_idle70`` and the other fine-tuned zoo models) is
fine-tuned from its weights with its patch replaced by METHOD, and its teacher is the same weights unpatched (the
dense model): the run says so. A timm model's pretrained weights are downloaded from the hub only with --download
(or give them with --weights FILE).

Every option of ``leanvit train`` works here (``-c config.yaml``, ``--resume``, torchrun); its defaults are the
recipe's (authors' code: github.com/Ackesnal/IdleViT, main.py and the README's training command):

  --epochs 30            README --epochs 30
  --lr 2e-5              for a global batch of 128. The authors run --lr 1e-5 per 512 images (main.py scales it
                         linearly: 4e-5 at their 2 x 1024), 1/50 of DeiT's pre-training rate (5e-4 per 512); the
                         same 1/50 of the 1e-3 at batch 128 that trained leanvit's reference models is 2e-5.
  --min-lr 2e-6          lr / 10, as the README's --min-lr 1e-6 against --lr 1e-5
  --warmup-epochs 0      main.py --warmup-epochs 0 (cosine from the first step)
  --weight-decay 0.05    main.py; no decay on biases, norms and tokens (as main.py's parameter groups)
  --ema-decay 0.99994    main.py's 0.99996 averages over 25,000 steps, 1.33 x their run (30 epochs of ImageNet at
                         batch 2048: 18,750 steps); 0.99994 (16,667 steps) keeps that ratio for 30 epochs of
                         Fashion-MNIST's 55,000 training images at batch 128 (12,870 steps)
  --clip-grad 0          main.py --clip-grad None (no clipping)
  --label-smoothing 0.1  main.py --smoothing 0.1 (DeiT)
  --mixup 0 --cutmix 0   the authors use DeiT's 0.8 / 1.0, the augmentation DeiT was pre-trained with; leanvit's
                         reference models were trained without it, so it is off (add --mixup 0.8 --cutmix 1.0 for
                         a DeiT checkpoint)
  --frozen cls_token pos_embed   main.py leaves both out of the optimiser
  --sd-logits-weight 10 --sd-features-weight 1000   README --distillw 10; losses.py weighs features 100 x that
  --token-cut-weight 20  main.py --cutw 20, divided by the number of idle layers (idle only)
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..finetune import FEATURES_WEIGHT, LOGITS_WEIGHT, TOKEN_CUT_WEIGHT
from .arguments import add_reduction_args, add_runtime_args
from .methods import check_method_args, reduction_amount
from .parsing import add_config_arg, nonneg_float
from .train import add_train_options, run_training

if TYPE_CHECKING:
    from torch import nn

    from ..engine.losses import LossTerm

# the recipe's training defaults; the module docstring gives the origin of each
RECIPE_DEFAULTS: dict[str, Any] = dict(
    epochs=30, lr=2e-5, min_lr=2e-6, warmup_epochs=0.0, weight_decay=0.05, ema_decay=0.99994, clip_grad=0.0,
    label_smoothing=0.1, mixup=0.0, cutmix=0.0, frozen=["cls_token", "pos_embed"])


def _patch_record(value: Any) -> dict:
    """``patch`` is written by finetune from --method / --keep / -O; a YAML config may hold it (a run's own
    config.yaml), where it is ignored and written anew; the command line may not set it."""
    if isinstance(value, dict):
        return value
    raise argparse.ArgumentTypeError("is recorded from --method, --keep/--budget/--r and -O; do not set it")


def _fixed_classes(value: Any) -> None:
    raise argparse.ArgumentTypeError("finetune keeps the model's classifier (its dense copy is the teacher)")


def add_parser(sub) -> argparse.ArgumentParser:
    from ..reduce import METHODS

    p = sub.add_parser("finetune", help="fine-tune a patched model with self-distillation from its dense self "
                                        "(IdleViT's recipe; resumable, torchrun)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="dense timm or leanvit model to fine-tune, from its pretrained weights (default: the "
                        "shipped reference teacher)")
    p.add_argument("--weights", default=None, help="start from these weights instead of the model's pretrained")
    p.add_argument("--method", default=None, help=f"token reduction to patch in: {', '.join(METHODS)}")
    add_reduction_args(p, method=False)
    p.add_argument("--sd-logits-weight", type=nonneg_float, default=LOGITS_WEIGHT,
                   help="weight of KL from the dense model's logits (default: %(default)s)")
    p.add_argument("--sd-features-weight", type=nonneg_float, default=FEATURES_WEIGHT,
                   help="weight of MSE from the dense model's normalised features (default: %(default)s)")
    p.add_argument("--token-cut-weight", type=nonneg_float, default=TOKEN_CUT_WEIGHT,
                   help="weight of the token cut loss, methods that idle tokens only (default: %(default)s)")
    p.add_argument("--patch", type=_patch_record, default=None, help=argparse.SUPPRESS)
    # read by the model builder; null in a run's config.yaml, refused on the command line
    p.add_argument("--num-classes", type=_fixed_classes, default=None, help=argparse.SUPPRESS)
    add_train_options(p)
    add_runtime_args(p)
    p.set_defaults(func=run, pretrained=True, **RECIPE_DEFAULTS)
    return p


def _check_method(args: argparse.Namespace) -> dict[str, Any]:
    """``--method`` with its amount and ``-O`` options, checked before any work; returns the options."""
    from ..reduce import METHODS

    choices = ", ".join(METHODS)
    if args.method is None:
        raise ConfigError(f"give the token reduction to fine-tune with: --method ({choices})")
    if args.method == "dense":
        raise ConfigError(f"finetune trains a patched model; pick a --method ({choices}), or use `leanvit train` "
                          f"for the dense model")
    if args.method not in METHODS:
        raise ConfigError(f"unknown method '{args.method}'; this leanvit can fine-tune {choices}")
    return check_method_args(args)


def run(args: argparse.Namespace) -> int:
    options = _check_method(args)
    info: dict[str, Any] = {}

    def losses(args: argparse.Namespace, model: nn.Module) -> tuple[list[LossTerm], nn.Module, float]:
        return _patch_and_terms(args, model, options, info)

    return run_training(args, losses, run_info=info)


def _patch_and_terms(args: argparse.Namespace, model: nn.Module, options: dict[str, Any], info: dict[str, Any]
                     ) -> tuple[list[LossTerm], nn.Module, float]:
    """Keep a frozen dense copy of ``model`` as the teacher, patch ``model``, record the patch in ``args``
    (config.yaml) and ``info`` (the checkpoint's run information), and build the recipe's loss terms."""
    import copy

    from .. import get_reducer, patch, unpatch
    from ..engine import init_distributed
    from ..engine.losses import TokenCutTerm
    from ..finetune import finetune_terms

    teacher = copy.deepcopy(model)
    created = get_reducer(teacher)
    if created is not None:
        # a model created patched (a fine-tuned zoo model): its dense self is the teacher, not its patched self
        unpatch(teacher)
    # the amount may come as --keep or as -O keep=... (check_method_args allows one of them)
    amount = {**reduction_amount(args), **{k: v for k, v in options.items() if k in ("r", "budget", "keep")}}
    patch(model, args.method, **reduction_amount(args), **options)
    record = {"method": args.method, **amount, "options": get_reducer(model).options()}
    args.patch = info["patch"] = record
    terms = finetune_terms(model, token_cut_weight=args.token_cut_weight, logits_weight=args.sd_logits_weight,
                           features_weight=args.sd_features_weight)
    # the loss and the teacher's weights (the starting weights) are part of the run's identity: a resume with other
    # values is refused, naming the setting (the patch is compared as run_info["patch"])
    info["loss"] = {"sd_logits_weight": args.sd_logits_weight, "sd_features_weight": args.sd_features_weight,
                    "weights": args.weights}
    if any(isinstance(t, TokenCutTerm) for t in terms):
        info["loss"]["token_cut_weight"] = args.token_cut_weight
    if init_distributed(args.device).is_main:
        if created is not None:
            was = ", ".join(f"{k}={created.report[k]}" for k in ("r", "budget", "keep") if k in created.report)
            print(f"finetune: {args.model} is created patched ({created.name}{', ' if was else ''}{was}); its "
                  f"teacher is the same weights unpatched (dense), and {args.method} replaces its patch")
        parts = ", ".join(f"{t.name} {t.weight:g}" for t in terms)
        if args.token_cut_weight > 0 and not any(isinstance(t, TokenCutTerm) for t in terms):
            parts += f" (no token cut: {args.method} idles no tokens)"
        given = ", ".join(f"{k}={v}" for k, v in {**amount, **record["options"]}.items())
        print(f"finetune: {args.model} patched with {args.method} ({given}); loss: ce 1, {parts}")
    return terms, teacher, 1.0
