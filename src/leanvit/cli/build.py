"""Models, data loaders and devices from the parsed arguments, with readable errors."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import ConfigError
from torch.utils.data import DataLoader

from ..data import build_dataset
from ..models import create_model
from ..models.factory import check_model_name as check
from .arguments import DEFAULT_MODEL

def setup_runtime(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def build_model_from_args(args: argparse.Namespace, **kwargs: Any):
    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, pretrained=args.pretrained, weights=args.weights, **kwargs)


def check_model_name(args: argparse.Namespace) -> None:
    """Fail on an unknown model name before anything else is loaded."""
    if args.model is not None:
        check(args.model)


def build_loader(args: argparse.Namespace, model, split: str | None = None, train: bool = False,
                 limit: int | None = None, batch_size: int | None = None):
    """The data loader of ``--data`` for ``model``: transforms from the model's config, class count checked
    against its head, unreadable images named (or skipped with ``--skip-bad-images``)."""
    ds = build_dataset(args.data, split or args.split, model, train=train,
                       limit=args.limit if limit is None else limit,
                       skip_bad=getattr(args, "skip_bad_images", False), progress=getattr(args, "progress", True))
    return DataLoader(ds, batch_size=batch_size or args.batch_size, shuffle=False, num_workers=args.workers)


def resolve_device(args: argparse.Namespace):
    """``--device`` as a ``torch.device``, checked to exist on this machine (default: cuda if available)."""
    spec = getattr(args, "device", None)
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{spec}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                              f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {spec}: leanvit runs on cpu, cuda or mps")
    return dev
