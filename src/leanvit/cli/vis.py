"""``leanvit vis``: for one image, per block, what each method did to every token: kept, propagated (GTP, and into
which neighbours), merged (ToMe, EViT's fused token), removed, idle or re-activated (IdleViT), as one PNG grid:
one row per method, one column per block (numbered from 1, as ``leanvit analyze`` and the README count them), and
a legend of the colours and marks under the maps."""
from __future__ import annotations

import argparse

from .arguments import add_data_args, add_model_args, add_runtime_args
from .build import build_model_from_args, check_model_name, resolve_device, setup_runtime
from .methods import parse_options
from .outputs import check_output_file
from .parsing import add_config_arg, fraction, nonneg_int


def add_parser(sub) -> argparse.ArgumentParser:
    from ..reduce import METHODS

    p = sub.add_parser("vis", help="draw per-block token maps of token-reduction methods for one image",
                       description=__doc__)
    add_config_arg(p)
    add_model_args(p)
    add_data_args(p, split="test")
    p.add_argument("--index", type=nonneg_int, default=0, help="image index in the split (default: 0)")
    p.add_argument("--methods", default="gtp,tome,evit",
                   help=f"comma-separated methods ({', '.join(m for m in METHODS if m != 'truncate')}) or labels "
                        f"(-O LABEL.method=METHOD) (default: %(default)s)")
    p.add_argument("--budget", type=fraction, default=0.6, help="fraction of dense MACs to keep (default: 0.6)")
    p.add_argument("--keep", type=fraction, default=None,
                   help="keep rate instead of --budget (and --r), for the methods that have one (evit, idle)")
    p.add_argument("--r", type=nonneg_int, default=None,
                   help="tokens removed per block instead of --budget, for the methods that take r (not idle)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="METHOD.OPT=VALUE",
                   help="method option, repeatable (e.g. -O gtp.alpha=0.2)")
    p.add_argument("--output", "-o", default="token_maps.png", help="image file to write (PNG, PDF, SVG, ...)")
    add_runtime_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from ..data import build_dataset
    from ..errors import ConfigError
    from ..reduce import METHODS, get_reducer, inspect_vit, patch
    from ..reduce.registry import own_schedule, resolve_method
    from ..vis import plot_token_maps

    # everything the user typed is checked before the model or the data is loaded
    check_model_name(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods needs at least one method, e.g. gtp,tome,evit")
    if "dense" in methods:
        raise ConfigError("vis draws what token reduction does to the tokens; 'dense' has nothing to draw (drop it "
                          "from --methods)")
    options = parse_options(args.option, per_method=True)
    for m in options:
        if m not in methods:
            raise ConfigError(f"option given for '{m}', which is not among --methods {','.join(methods)}")
    resolved = {m: resolve_method(m, options) for m in methods}
    check_output_file(args.output, "--output", plot=True)
    device = resolve_device(args)
    setup_runtime(args)
    model = build_model_from_args(args).to(device).eval()
    ds = build_dataset(args.data, args.split, model, train=False, limit=args.limit,
                       skip_bad=args.skip_bad_images, progress=args.progress)
    if args.index >= len(ds):
        raise ConfigError(f"--index {args.index} is outside the {len(ds)} images of {args.data} ({args.split})")
    image, label = ds[args.index]
    info = inspect_vit(model)
    traces, preds = {}, {}
    for name, (method, opts) in resolved.items():
        variant = copy.deepcopy(model)
        if own_schedule(opts):
            amount = {}
        elif args.keep is not None and "keep" in METHODS[method].amounts:
            amount = {"keep": args.keep}
        elif args.r is not None and "r" in METHODS[method].amounts:
            amount = {"r": args.r}
        else:
            amount = {"budget": args.budget}
        patch(variant, method, trace=True, **amount, **opts)
        with torch.no_grad():
            logits = variant(image.unsqueeze(0).to(device))
        preds[name] = int(logits.argmax(-1))
        traces[name] = [{k: v.cpu() for k, v in step.items()} for step in get_reducer(variant).trace_log]
    classes = getattr(ds, "classes", None)
    name_of = (lambda i: classes[i]) if classes else str
    title = f"{args.model}, image {args.index} (label {name_of(label)})"
    if getattr(model, "num_classes", 0):  # a model without a head (a CLIP image tower) gives features, not classes
        title += "; predictions: " + ", ".join(f"{m} {name_of(p)}" for m, p in preds.items())
    plot_token_maps(image, traces, info.grid, args.output, title=title)
    print(f"token maps written to {args.output}")
    return 0
