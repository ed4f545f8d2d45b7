"""Options shared by the CLI verbs: YAML config files as argparse defaults, validated numbers, model, data, device
and output arguments.

Every check here runs before a model or a dataset is loaded, so bad input costs no work and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from ..io import to_json_safe, write_json  # noqa: F401  (re-exported for the verbs)
from ..errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one :class:`ConfigError` line (``leanvit: error: ...``, exit 2)
    instead of printing the usage block; sub-parsers inherit the class."""

    def error(self, message: str):  # noqa: D102
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            what: str = "") -> Callable[[Any], Any]:
    """An argparse ``type`` (also applied to YAML config values) for an int or float within bounds."""

    def parse(value: Any):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise argparse.ArgumentTypeError(f"expected {what or ('an integer' if kind is int else 'a number')}, "
                                             f"got '{value}'")
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what or ('an integer' if kind is int else 'a number')}, "
                                             f"got '{value}'") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{value}'")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low:g}, got {v:g}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {v:g}")
        return v

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
fraction = _number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]")
nonneg_float = _number(float, 0.0)
positive_float = _number(float, 0.0, low_open=True)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML",
                   help="YAML file whose keys set this command's defaults; flags given on the command line win")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _check_config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value checked (and converted) the way argparse checks the same option on the command line."""
    if value is None:
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got '{value}'")
        return value
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else None
        if items is None:
            raise ConfigError(f"{key} must be a list, got '{value}'")
        return [_check_config_value(_Scalar(action), key, v) for v in items]
    if action.type is not None:
        if action.type is str:
            value = str(value)
        else:
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, action.choices))}, got '{value}'")
    return value


class _Scalar:
    """The per-item view of a list-valued action (its type and choices, no nargs)."""

    def __init__(self, action: argparse.Action):
        self.type, self.choices, self.nargs = action.type, action.choices, None


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: first to find the verb and ``--config``, then with the YAML's keys as the verb's defaults
    (timm's train.py pattern). Unknown keys and values of the wrong type are errors, not silently ignored."""
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
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    sub = _subparser(parser, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in actions and k != "command")
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}"
                          + "".join(_key_hint(k, actions) for k in unknown))
    try:
        values = {k: _check_config_value(actions[k], k, v) for k, v in values.items() if k in actions}
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def _key_hint(key: str, actions: dict[str, argparse.Action]) -> str:
    """'; for X use Y' when an unknown config key is a flag's spelling rather than its key."""
    for action in actions.values():
        flags = {s.lstrip("-").replace("-", "_") for s in action.option_strings}
        if key in flags:
            if isinstance(action, argparse._StoreFalseAction):
                return f"; for {key} write '{action.dest}: false'"
            if isinstance(action, argparse._StoreTrueAction):
                return f"; for {key} write '{action.dest}: true'"
            return f"; for {key} write '{action.dest}: ...'"
    close = difflib.get_close_matches(key, list(actions), n=1)
    return f"; did you mean '{close[0]}' for {key}?" if close else ""


# Evaluation batch size: on a 2-core CPU small batches keep each block's activations in cache. `leanvit eval` of the
# reference teacher on the 10,000 test images took 59 s at batch 256 and 44 s at 64; the 13 variants of `leanvit
# compare` on 1,280 images took 48 s at batch 32, 51 s at 64 and 57 s at 128 (2026-11-26).
EVAL_BATCH_SIZE = 32

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
                   help="weights to load: safetensors, leanvit checkpoint or torch state dict (read without "
                        "running code: files that need pickled objects are refused)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="do not load the model's pretrained / shipped weights")
    p.add_argument("--num-classes", type=positive_int, default=None, help="override the classifier size")


def add_data_args(p: argparse.ArgumentParser, split: str = "test", batch_size: int = 256) -> None:
    p.add_argument("--data", "-d", default="fmnist",
                   help="fmnist[:PATH] | imagefolder:PATH | synthetic[:N] (default: %(default)s)")
    p.add_argument("--split", default=split, choices=("train", "val", "trainval", "test"),
                   help="data split (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N images")
    p.add_argument("--batch-size", "-b", type=positive_int, default=batch_size,
                   help="images per batch (default: %(default)s)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader worker processes")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: check every file first, skip the unreadable ones and list them "
                        "(default: stop at the first with an error naming it)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress output")


def add_reduction_args(p: argparse.ArgumentParser, method: bool = True) -> None:
    """``--method`` (choices and help from the registry ``leanvit.reduce.METHODS``), ``--r``, ``--budget``,
    ``--keep`` and ``-O`` for the verbs that patch one method."""
    from ..reduce import METHODS, method_help

    if method:
        p.add_argument("--method", default="dense", metavar="METHOD",
                       help=f"token reduction, one of dense, {', '.join(METHODS)} (default: %(default)s): "
                            f"{method_help()}")
    p.add_argument("--r", type=nonneg_int, default=None, help="tokens removed per block")
    p.add_argument("--budget", type=fraction, default=None, help="fraction of dense MACs to keep, e.g. 0.74")
    keeps = "; ".join(f"{m}: {cls.keep_help}" for m, cls in METHODS.items() if "keep" in cls.amounts)
    p.add_argument("--keep", type=fraction, default=None,
                   help=f"keep rate of methods with their own schedule ({keeps})")
    p.add_argument("--option", "-O", action="append", default=[], metavar="OPT=VALUE",
                   help="method option, repeatable (e.g. -O alpha=0.2 -O graph=spatial)")


def reduction_amount(args: argparse.Namespace) -> dict[str, Any]:
    """``{"r": ...}``, ``{"budget": ...}`` or ``{"keep": ...}`` from the flags; at most one may be given."""
    given = {k: getattr(args, k) for k in ("r", "budget", "keep") if getattr(args, k, None) is not None}
    if len(given) > 1:
        raise ConfigError(f"give one of --r, --budget or --keep, not {' and '.join('--' + k for k in given)}")
    return given


def check_method_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate ``--method`` with its schedule and ``-O`` options before any work; returns the parsed options.

    ``dense`` with a schedule or options is refused (it would silently evaluate the unreduced model)."""
    from ..reduce import METHODS, check_options

    opts = parse_options(args.option)
    amount = reduction_amount(args)
    if args.method == "dense":
        if amount or opts:
            flags = [f"--{k}" for k in amount] + (["-O"] if opts else [])
            raise ConfigError(f"{', '.join(flags)} set{'s' if len(flags) == 1 else ''} a token reduction; pick a "
                              f"--method ({', '.join(METHODS)}) or drop {' and '.join(flags)}")
        return opts
    if args.method not in METHODS:
        raise ConfigError(f"unknown method '{args.method}'; choose one of dense, {', '.join(METHODS)}")
    given = [f"--{k}" for k in amount] + [f"-O {k}" for k in ("r", "budget", "keep") if k in opts]
    if len(given) > 1:
        raise ConfigError(f"give one of --r, --budget or --keep, not {' and '.join(given)}")
    if not given:
        raise ConfigError(f"--method {args.method} needs --r, --budget or --keep")
    check_options(args.method, {**opts, **amount})
    return opts


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


def check_model_name(args: argparse.Namespace) -> None:
    """Fail on an unknown model name before anything else is loaded."""
    from ..models.factory import check_model_name as check

    if args.model is not None:
        check(args.model)


def build_loader(args: argparse.Namespace, model, split: str | None = None, train: bool = False,
                 limit: int | None = None, batch_size: int | None = None):
    """The data loader of ``--data`` for ``model``: transforms from the model's config, class count checked
    against its head, unreadable images named (or skipped with ``--skip-bad-images``)."""
    from torch.utils.data import DataLoader

    from ..data import build_dataset

    ds = build_dataset(args.data, split or args.split, model, train=train,
                       limit=args.limit if limit is None else limit,
                       skip_bad=getattr(args, "skip_bad_images", False), progress=getattr(args, "progress", True))
    return DataLoader(ds, batch_size=batch_size or args.batch_size, shuffle=False, num_workers=args.workers)


def save_resolved(args: argparse.Namespace, path: Path) -> None:
    from ..io import atomic_write_text

    values = {k: v for k, v in vars(args).items() if k not in ("func", "config")}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=True))


def parse_options(items: list[str], per_method: bool = False) -> dict[str, Any]:
    """``OPT=VALUE`` items (values parsed as YAML: numbers, booleans, null) into a dict.

    With ``per_method`` the items are ``METHOD.OPT=VALUE`` and the result is ``{method: {opt: value}}``.
    Types are checked against the method's declared options by :func:`leanvit.reduce.check_options`.
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
    """``--device`` as a ``torch.device``, checked to exist on this machine (default: cuda if available)."""
    import torch

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


# ------------------------------------------------------------------------------------------- output paths
def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    """The deepest existing folder on the way to ``folder`` must be a folder we can create files in."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {target}: {existing} is a file, not a folder")
    try:  # os.access is not enough: /proc and read-only mounts pass it as root
        fd, probe = tempfile.mkstemp(prefix=".leanvit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {target}: cannot write in {existing} ({e.strerror or e})") from None


def plot_formats() -> dict[str, str]:
    """File extensions matplotlib can write (``png``, ``pdf``, ``svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def check_output_file(path: str | os.PathLike | None, flag: str, plot: bool = False) -> Path | None:
    """Check an output file before any work: not a folder, in a folder we can write, a plot format matplotlib
    writes. Returns the path (None stays None)."""
    if path is None:
        return None
    p = Path(path)
    if str(path).strip() == "" or p.name in ("", ".", ".."):
        raise ConfigError(f"{flag} needs a file name, got '{path}'")
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file name")
    if plot:
        fmt = p.suffix.lower().lstrip(".")
        formats = plot_formats()
        if fmt not in formats:
            raise ConfigError(f"{flag} {p}: cannot write plots as '{fmt or 'no extension'}'; use a file name ending "
                              f"in one of {', '.join('.' + f for f in sorted(formats))}")
    _writable_folder(p.parent, flag, p)
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check an output folder before any work: not a file, and creatable / writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file; give a folder")
    _writable_folder(p, flag, p)
    return p
