"""``leanvit analyze``: a model's accuracy gap, calibration and, against a teacher, feature similarity.

Figures: top-1 on the test split and on the train split (no augmentation) and their gap; expected calibration
error (15 equal-width bins, torchmetrics) with a reliability diagram; with ``--teacher``, linear CKA between the
model's and the teacher's pre-logits features (the features PEFD distils) and between every pair of their blocks
(each block's output averaged over its patch tokens), drawn as a heatmap. The teacher sees the model's input: one
that cannot read it (another channel count or image size) is refused before any data is read, as by distill.
``--limit N`` bounds every split read (the test split and the train split of the gap; ``--limit-train`` sets the
latter alone), and N must be at least 10 (see --limit). A timm model's or teacher's hub weights are downloaded only
with --download.

    leanvit analyze -m leanvit_vit_fm_student --weights runs/pefd/model.safetensors --teacher leanvit_vit_fm_teacher \\
        --json analysis.json --reliability-plot reliability.png --cka-plot cka.png
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .arguments import DEFAULT_MODEL, add_data_args, add_model_args, add_runtime_args
from .build import build_model_from_args, check_model_name, resolve_device, setup_runtime
from .outputs import check_output_file
from .parsing import add_config_arg, positive_int
from .train import add_download_arg
from ..io import write_json

# Fewest images analyze reads from a split. Linear CKA compares the two models' centred Gram matrices over the n
# images, of rank n - 1 at most: any two models score 1.0 on 2 images, and on a few images CKA is biased towards
# 1 whatever the models; ECE and top-1 of n images move by 100/n points per image. 10 keeps the figures meaningful
# (a quick look; the published figures use the whole split).
MIN_IMAGES = 10
_WHY_MIN = (f"analyze needs at least {MIN_IMAGES} images per split: linear CKA of 2 images is 1.0 for any two "
            f"models and biased towards 1 on a few, and top-1 and ECE of n images move by 100/n points per image")

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="train-test gap, calibration (ECE, reliability diagram), CKA to a teacher",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--teacher", default=None, help="model whose features are compared with the model's (CKA)")
    p.add_argument("--teacher-weights", default=None, help="weights of the teacher (default: its pretrained)")
    add_data_args(p, split="test")
    limit = next(a for a in p._actions if a.dest == "limit")
    limit.help = (f"use only the first N images of every split read: the --split and the --train-split of the gap "
                  f"(N >= {MIN_IMAGES}: fewer make CKA and ECE meaningless)")
    p.add_argument("--train-split", default="train", choices=("train", "val", "trainval", "test", "none"),
                   help="split whose top-1 gives the train-test gap ('none' to skip; default: %(default)s)")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help=f"use only the first N images of the train split (default: --limit; N >= {MIN_IMAGES})")
    p.add_argument("--bins", type=positive_int, default=15, help="confidence bins of the ECE (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--reliability-plot", default=None, metavar="FILE", help="reliability diagram (.png, .pdf, ...)")
    p.add_argument("--cka-plot", default=None, metavar="FILE", help="per-block CKA heatmap (needs --teacher)")
    add_download_arg(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading a model or data."""
    from ..models.factory import check_pretrained
    from .train import check_teacher

    if args.cka_plot and not args.teacher:
        raise ConfigError("--cka-plot compares with a teacher; pass --teacher")
    for flag, n in (("--limit", args.limit), ("--limit-train", args.limit_train)):
        if n is not None and n < MIN_IMAGES:
            raise ConfigError(f"{flag} {n}: {_WHY_MIN}")
    check_output_file(args.json, "--json")
    check_output_file(args.reliability_plot, "--reliability-plot", plot=True)
    check_output_file(args.cka_plot, "--cka-plot", plot=True)
    check_model_name(args)
    if args.weights is None and args.pretrained:
        check_pretrained(args.model or DEFAULT_MODEL, download=args.download)
    if args.teacher is not None:
        check_teacher(args)
    resolve_device(args)


def _collect(models: list[nn.Module], loader: DataLoader, device: torch.device, blocks: bool,
             progress: bool) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """One pass over ``loader`` through every model: per model ``{"logits", "features"[, "blocks"]}`` (CPU)."""
    import torch

    from ..models.features import block_features, pooled_features
    from ..progress import track

    out: list[dict[str, list]] = [{"logits": [], "features": [], "blocks": []} for _ in models]
    targets = []
    with torch.no_grad():
        for images, y in track(loader, desc="analyze", enabled=progress):
            images = images.to(device)
            for model, acc in zip(models, out):
                if blocks:
                    per_block, features, logits = block_features(model, images)
                    acc["blocks"].append([b.float().cpu() for b in per_block])
                else:
                    features, logits = pooled_features(model, images)
                acc["features"].append(features.float().cpu())
                acc["logits"].append(logits.float().cpu())
            targets.append(y)
    result = []
    for acc in out:
        r = {"logits": torch.cat(acc["logits"]), "features": torch.cat(acc["features"])}
        if blocks:
            r["blocks"] = [torch.cat(parts) for parts in zip(*acc["blocks"])]
        result.append(r)
    return result, torch.cat(targets)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..analysis import calibration, cka_matrix, linear_cka
    from ..data import build_dataset
    from ..engine import evaluate
    from ..vis import plot_cka, plot_reliability
    from .train import create_teacher

    _check_args(args)
    setup_runtime(args)
    device = resolve_device(args)
    model = build_model_from_args(args, evaluated=True).to(device).eval()
    models = [model]
    if args.teacher:
        # before any data is read: the teacher must read the model's input (the check distill makes)
        teacher = create_teacher(args, model, model_role="model", context="which analyze feeds it")
        models.append(teacher.to(device).eval())
    test = build_dataset(args.data, args.split, model, train=False, limit=args.limit, skip_bad=args.skip_bad_images,
                         progress=args.progress)
    if len(test) < MIN_IMAGES:
        raise ConfigError(f"{args.data} ({args.split}) has {len(test)} images; {_WHY_MIN}")
    train = None
    if args.train_split != "none":
        # --limit bounds every split read (a quick look must not run the 55,000 training images)
        limit = args.limit_train if args.limit_train is not None else args.limit
        train = build_dataset(args.data, args.train_split, model, train=False, limit=limit,
                              skip_bad=args.skip_bad_images, progress=args.progress)
        if len(train) < MIN_IMAGES:
            raise ConfigError(f"{args.data} ({args.train_split}) has {len(train)} images; {_WHY_MIN}")
    outputs, targets = _collect(models, DataLoader(test, batch_size=args.batch_size, num_workers=args.workers),
                                device, blocks=args.teacher is not None, progress=args.progress)
    s = outputs[0]
    top1 = 100.0 * s["logits"].argmax(1).eq(targets).double().mean().item()
    cal = calibration(s["logits"], targets, args.bins)
    row: dict[str, Any] = {"model": args.model, "teacher": args.teacher, "data": args.data, "split": args.split,
                           "n": len(targets), "top1": top1, "ece": cal.ece, "bins": args.bins}
    print(f"{args.model} on {args.data} ({args.split}, {len(targets)} images): top-1 {top1:.2f}%  "
          f"ECE {100 * cal.ece:.2f}% ({args.bins} bins)")
    if train is not None:
        res = evaluate(model, DataLoader(train, batch_size=args.batch_size, num_workers=args.workers), device,
                       progress=args.progress, desc="train split")
        row.update(train_split=args.train_split, train_n=res.n, train_top1=res.top1, gap=res.top1 - top1)
        print(f"{args.train_split} top-1 {res.top1:.2f}% ({res.n} images, no augmentation): train-test gap "
              f"{res.top1 - top1:+.2f} points")
    if args.teacher:
        t = outputs[1]
        t_top1 = 100.0 * t["logits"].argmax(1).eq(targets).double().mean().item()
        t_cal = calibration(t["logits"], targets, args.bins)
        matrix = cka_matrix(s["blocks"], t["blocks"])
        row.update(teacher_top1=t_top1, teacher_ece=t_cal.ece, cka=linear_cka(s["features"], t["features"]),
                   cka_blocks=matrix)
        print(f"teacher {args.teacher}: top-1 {t_top1:.2f}%  ECE {100 * t_cal.ece:.2f}%")
        print(f"linear CKA of the pre-logits features: {row['cka']:.4f}")
        print(f"linear CKA per block (rows: {args.model} blocks 1-{len(matrix)}, columns: {args.teacher} blocks "
              f"1-{len(matrix[0])}):")
        for r in matrix:
            print("  " + " ".join(f"{v:.2f}" for v in r))
        if args.cka_plot:
            plot_cka(matrix, args.cka_plot, row_label=f"{args.model} block", col_label=f"{args.teacher} block",
                     title=f"linear CKA on {args.split} ({len(targets)} images)")
            print(f"wrote {args.cka_plot}")
    row["calibration"] = cal.as_dict()
    if args.reliability_plot:
        plot_reliability(cal, args.reliability_plot, title=f"{args.model} on {args.split}")
        print(f"wrote {args.reliability_plot}")
    if args.json:
        write_json(args.json, row)
    return 0
