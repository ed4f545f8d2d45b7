"""Options shared by the CLI verbs: YAML config files as argparse defaults, model and data arguments."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML",
                   help="YAML file whose keys set this command's defaults; flags given on the command line win")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: first to find the verb and ``--config``, then with the YAML's keys as the verb's defaults
    (timm's train.py pattern). Unknown keys are an error, not silently ignored."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    known = {a.dest for a in sub._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    sub.set_defaults(**values)
    return parser.parse_args(argv)


# the embedded default: the reference teacher, or the student while the teacher's weights are not shipped yet
DEFAULT_MODELS = ("leanvit_vit_fm_teacher", "leanvit_vit_fm_student")


def default_model() -> str:
    from ..zoo import has_weights

    return next((m for m in DEFAULT_MODELS if has_weights(m)), DEFAULT_MODELS[0])


def add_model_args(p: argparse.ArgumentParser, model: str | None = None) -> None:
    p.add_argument("--model", "-m", default=model,
                   help="timm or leanvit model name (default: the shipped reference teacher, or the student if "
                        "only the student ships; `leanvit list-models`)")
    p.add_argument("--weights", default=None,
                   help="weights to load: safetensors, leanvit checkpoint or torch state dict")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="do not load the model's pretrained / shipped weights")
    p.add_argument("--num-classes", type=int, default=None, help="override the classifier size")


def add_data_args(p: argparse.ArgumentParser, split: str = "test") -> None:
    p.add_argument("--data", "-d", default="fmnist",
                   help="fmnist[:PATH] | imagefolder:PATH | synthetic[:N] (default: %(default)s)")
    p.add_argument("--split", default=split, help="data split: train, val, trainval or test (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--batch-size", "-b", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def setup_runtime(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def build_model_from_args(args: argparse.Namespace, **kwargs: Any):
    from ..models import create_model

    if args.model is None:
        args.model = default_model()
        if args.model != DEFAULT_MODELS[0]:
            print(f"note: {DEFAULT_MODELS[0]} has no shipped weights yet; using {args.model}")
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, pretrained=args.pretrained, weights=args.weights, **kwargs)


def save_resolved(args: argparse.Namespace, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in vars(args).items() if k not in ("func", "config")}
    path.write_text(yaml.safe_dump(values, sort_keys=True))


def parse_options(items: list[str], per_method: bool = False) -> dict[str, Any]:
    """``OPT=VALUE`` items (values parsed as YAML: numbers, booleans, null) into a dict.

    With ``per_method`` the items are ``METHOD.OPT=VALUE`` and the result is ``{method: {opt: value}}``.
    """
    out: dict[str, Any] = {}
    form = "METHOD.OPTION=VALUE (e.g. gtp.alpha=0.2)" if per_method else "OPTION=VALUE (e.g. alpha=0.2)"
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        method, dot, opt = key.partition(".")
        if not sep or not key or (per_method and not (dot and method and opt)):
            raise ConfigError(f"option must look like {form}, got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"cannot read the value of option '{item}'") from None
        if per_method:
            out.setdefault(method.strip(), {})[opt.strip()] = parsed
        else:
            out[key] = parsed
    return out


def resolve_device(args: argparse.Namespace):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
