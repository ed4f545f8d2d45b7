"""Models, data loaders and devices from the parsed arguments, with readable errors; the one rule of eval, bench
and compare for which token-reduction patch runs; run records (a training run's config.yaml) read as configs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import build_dataset
from ..errors import CheckpointError, ConfigError, DataError, UnsupportedModelError
from ..io import read_record
from ..models import create_model
from ..models.external import VERBS as EXTERNAL_VERBS, check_labels, create_external, external_info, is_external
from ..models.factory import check_model_name as check
from .arguments import DEFAULT_MODEL

def setup_runtime(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def build_model_from_args(args: argparse.Namespace, evaluated: bool = False, **kwargs: Any):
    """The model of ``--model``, ``--weights``, ``--no-pretrained`` and ``--num-classes``.

    Args:
        evaluated: the verb measures the model's accuracy (eval, compare): a ``--num-classes`` other than the size
            of the head its weights bring is refused, since the new head would be untrained (random) and its
            accuracy meaningless; only the training verbs make a new head. A model of another library (``hf:``,
            ``open_clip:``) without a classification head is refused too; the notes of where its preprocessing
            came from are printed.
    """
    if args.model is None:
        args.model = DEFAULT_MODEL
    if is_external(args.model):
        model = create_external(args.model, pretrained=args.pretrained, weights=args.weights, logits=evaluated,
                                num_classes=args.num_classes, **kwargs)
        for line in external_info(model).notes:
            note(line)
        return model
    if args.num_classes is not None and evaluated and not args.weights and args.pretrained:
        # the head comes from the pretrained weights: build without the override and compare
        model = create_model(args.model, pretrained=True, **kwargs)
        head = getattr(model, "num_classes", None)
        if head != args.num_classes:
            raise ConfigError(
                f"--num-classes {args.num_classes}: the pretrained head of {args.model} has {head} outputs, and a "
                f"head of {args.num_classes} would be untrained (random), so its accuracy would mean nothing; only "
                f"the training verbs (leanvit train, leanvit distill) give a model a new head: train one with "
                f"--num-classes {args.num_classes} and pass its weights with --weights")
        return model
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, pretrained=args.pretrained, weights=args.weights, **kwargs)


def check_model_name(args: argparse.Namespace) -> None:
    """Fail on an unknown model name before anything else is loaded (``hf:`` / ``open_clip:`` names: in the verbs
    that take them, with their library installed). A ``--recipe`` is read and checked here too, and names the
    model when ``--model`` is not given."""
    if getattr(args, "recipe", None):
        from ..reduce.recipe import read_recipe

        args.recipe_read = read_recipe(args.recipe)
        made_for = args.recipe_read.model.get("name")
        if args.model is None and made_for:
            args.model = made_for
    if args.model is not None:
        verb = getattr(args, "command", None)
        if is_external(args.model) and verb is not None and verb not in EXTERNAL_VERBS:
            raise ConfigError(f"leanvit {verb} takes timm and leanvit models; {args.model.split(':')[0]}: models "
                              f"run in {', '.join(EXTERNAL_VERBS)}")
        check(args.model)


def build_loader(args: argparse.Namespace, model, split: str | None = None, train: bool = False,
                 limit: int | None = None, batch_size: int | None = None):
    """The data loader of ``--data`` for ``model``: transforms from the model's config, class count checked
    against its head, unreadable images named (or skipped with ``--skip-bad-images``)."""
    try:
        ds = build_dataset(args.data, split or args.split, model, train=train,
                           limit=args.limit if limit is None else limit,
                           skip_bad=getattr(args, "skip_bad_images", False), progress=getattr(args, "progress", True))
    except DataError as e:
        # the data module's hint suits the training verbs; here a new head would be evaluated untrained
        if train or _TRAIN_HEAD_HINT not in str(e):
            raise
        how = ("give a model of that library fine-tuned on these classes" if external_info(model) is not None else
               "train one with --num-classes (leanvit train, leanvit distill) and pass its weights with --weights")
        raise DataError(str(e).split(_TRAIN_HEAD_HINT)[0].rstrip(". ") + f". Evaluating needs a model trained on "
                        f"these classes: {how}, or use data with the model's classes") from None
    base = getattr(ds, "dataset", ds)  # a Subset (--limit): its dataset has the class names
    check_labels(model, getattr(base, "classes", None))  # hf: a head that names its labels, in the folders' order
    return DataLoader(ds, batch_size=batch_size or args.batch_size, shuffle=False, num_workers=args.workers)


# the start of the hint of leanvit.data's class-count check, which asks for --num-classes: right for the training
# verbs, a random head for the verbs that evaluate (which replace it)
_TRAIN_HEAD_HINT = "Give --num-classes"


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


# ------------------------------------------------------------------------------------------- which patch runs
# eval, bench and compare follow one rule (settle_patch):
#   --method dense   the unpatched model: a model created patched (leanvit_vit_fm_teacher_idle70) is unpatched;
#   no --method      the model as it comes: the patch its --weights file records (leanvit finetune writes it in
#                    model.safetensors' metadata), else the patch it is created with, else none; a note says so;
#   --method METHOD  that patch, replacing any the model comes with (a note names the one replaced);
#   --recipe FILE    the recipe's patch (leanvit tune), exactly, replacing any the model comes with; not with
#                    --method, --r, --budget, --keep or -O (compare's -O still set its other methods).
# The JSON records the method and schedule that ran and where the patch came from (patch_source).


def check_method(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`~leanvit.cli.methods.check_method_args`, with no ``--method`` (the model as it comes) checked as
    ``dense``: a schedule or ``-O`` without a method is refused. Returns the ``-O`` options."""
    from .methods import check_method_args

    if getattr(args, "recipe", None):
        given = [f"--{k}" for k in ("method", "r", "budget", "keep") if getattr(args, k, None) is not None]
        given += ["-O"] if args.option else []
        if given:
            raise ConfigError(f"--recipe sets the patch (its method, per-block schedule and options); drop "
                              f"{' and '.join(given)}")
    if args.method is None:
        return check_method_args(argparse.Namespace(**{**vars(args), "method": "dense"}))
    return check_method_args(args)


def note(text: str) -> None:
    """One ``note: ...`` line on stderr (stdout keeps the results)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def _words(method: str, amounts: dict[str, Any]) -> str:
    """``idle, keep 0.7``: a patch in a few words."""
    given = ", ".join(f"{k} {v}" for k, v in amounts.items() if v is not None)
    return f"{method}, {given}" if given else method


def reducer_words(red) -> str:
    """The patch a reducer runs, in a few words (``idle, keep 0.7``; ``tome, schedule [4, 4]``)."""
    amounts = {k: red.report.get(k) for k in ("keep", "budget") if red.report.get(k) is not None}
    return _words(red.name, amounts or {"schedule": list(red.schedule)})


def weights_patch(path: str | Path) -> dict[str, Any] | None:
    """The token-reduction patch a weights file records, ``{"method", "keep" | "budget" | "r", "options"}``, or
    None: the ``patch`` entry of a safetensors file's metadata (``leanvit finetune``'s model.safetensors and
    model_ema.safetensors) or of a leanvit checkpoint's ``run_info`` (its last.pt). Read after the weights were
    loaded, so the file is known to be readable."""
    from ..reduce.registry import AMOUNTS

    try:
        record = read_record(path, "patch")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("method"), str)
            and isinstance(record.get("options", {}), dict)):
        raise ConfigError(f"weights file {path} records a patch leanvit cannot read: {record!r}")
    return {"method": record["method"], **{k: record[k] for k in AMOUNTS if record.get(k) is not None},
            "options": dict(record.get("options") or {})}


def _patch(model, method: str, amounts: dict[str, Any], options: dict[str, Any]) -> None:
    from .. import patch

    patch(model, method, **amounts, **options)


def as_shipped(args: argparse.Namespace, model) -> tuple[str, str] | None:
    """Put ``model`` in the state it comes in: patched as its ``--weights`` file records (replacing the patch it
    was created with; a model that cannot take the patch is refused), else as created. Returns where the patch came
    from (``"weights"`` or ``"model"``) and the patch in a few words, or None for an unpatched model. With
    ``--recipe`` the recipe's patch replaces both (``"recipe"``)."""
    from .. import get_reducer
    from ..reduce.registry import AMOUNTS

    if getattr(args, "recipe", None):
        return _apply_recipe(args, model)
    record = weights_patch(args.weights) if getattr(args, "weights", None) else None
    if record is not None:
        amounts = {k: record[k] for k in AMOUNTS if k in record}
        words = _words(record["method"], amounts)
        try:
            _patch(model, record["method"], amounts, record["options"])
        except (ConfigError, UnsupportedModelError) as e:
            raise ConfigError(f"weights file {args.weights} records the patch it was fine-tuned with ({words}), "
                              f"which {args.model} cannot take: {e}") from None
        return "weights", words
    red = get_reducer(model)
    return ("model", reducer_words(red)) if red is not None else None


def _apply_recipe(args: argparse.Namespace, model) -> tuple[str, str]:
    """Patch ``model`` with ``--recipe`` (read by :func:`check_model_name`), replacing any patch it comes with; the
    notes name what differs from what the recipe was made on (its figures describe that model and weights)."""
    from ..reduce import get_reducer, patch
    from ..reduce.recipe import read_recipe

    rec = getattr(args, "recipe_read", None) or read_recipe(args.recipe)
    red = get_reducer(model)
    record = weights_patch(args.weights) if getattr(args, "weights", None) else None
    patch(model, recipe=rec)  # a model of another geometry is refused here, before any note
    if red is not None or record is not None:
        what = f"the patch {args.weights} records" if record is not None else f"the patch {args.model} comes with"
        note(f"--recipe {args.recipe} replaces {what}")
    made_for, weights = rec.model.get("name"), rec.model.get("weights")
    if made_for and made_for != args.model:
        note(f"recipe {args.recipe} was tuned on {made_for}; applied to {args.model} (same depth, grid and prefix "
             f"tokens), whose accuracy its figures do not describe")
    elif weights != getattr(args, "weights", None):
        note(f"recipe {args.recipe} was tuned on {args.model} with weights {weights or 'as shipped'}; these are "
             f"{args.weights or 'as shipped'}")
    return "recipe", rec.words()


def shipped_phrase(args: argparse.Namespace, shipped: tuple[str, str]) -> str:
    """``weights file F records the patch it was fine-tuned with (idle, keep 0.7)`` or ``M comes patched (...)``."""
    source, words = shipped
    if source == "recipe":
        return f"--recipe {args.recipe} patches {args.model} ({words})"
    if source == "weights":
        return f"weights file {args.weights} records the patch it was fine-tuned with ({words})"
    return f"{args.model} comes patched ({words})"


def settle_patch(args: argparse.Namespace, model, opts: dict[str, Any]) -> str | None:
    """Apply the rule above for eval and bench (``args.method`` None: as shipped); returns where the patch that
    runs came from: ``"recipe"``, ``"weights"``, ``"model"``, ``"--method"``, or None when the model runs
    unpatched."""
    from .. import get_reducer, unpatch
    from ..reduce.registry import AMOUNTS
    from .methods import reduction_amount

    method = args.method
    if method is None:
        shipped = as_shipped(args, model)
        if shipped is None:
            return None
        if shipped[0] == "recipe":
            note(shipped_phrase(args, shipped))
            return shipped[0]
        how = "with that patch" if shipped[0] == "weights" else "as shipped"
        note(f"{shipped_phrase(args, shipped)}; running it {how}; --method dense runs it unpatched")
        return shipped[0]
    # an explicit --method: the recorded patch is not applied, only named (a model that cannot take it may still
    # run dense or another method)
    record = weights_patch(args.weights) if getattr(args, "weights", None) else None
    red = get_reducer(model)
    if record is not None:
        shipped = ("weights", _words(record["method"], {k: record[k] for k in AMOUNTS if k in record}))
    else:
        shipped = ("model", reducer_words(red)) if red is not None else None
    if shipped is not None:
        note(f"{shipped_phrase(args, shipped)}; --method {method} "
             + ("runs it unpatched" if method == "dense" else "replaces that patch"))
    if method == "dense":
        unpatch(model)
        return None
    _patch(model, method, reduction_amount(args), opts)
    return "--method"


# ------------------------------------------------------------------------------------------- run records as configs
# the verbs that write a run record: OUTPUT/config.yaml, every option of the run and its `command` (save_resolved)
TRAINING_VERBS = ("train", "finetune", "distill")
# what a run record says about the model the run made: its name, its head and the data it learned; the other keys
# are the run's own settings (its split, batch size, epochs, starting weights, distillation method, ...)
RUN_RECORD_KEYS = ("model", "num_classes", "data")


def adapt_run_record(path: str | Path, values: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """How eval, bench and compare read ``-c FILE`` (the verbs set it as their parser's ``adapt_config``, which
    ``parse_with_config`` calls before it checks the keys).

    The rule: a file whose ``command`` key names a training verb (train, finetune, distill) is that run's record,
    its ``config.yaml`` as ``save_resolved`` writes it (every option of the run, and ``command``, the verb that
    wrote it; a config written by hand has no ``command``). Of a run record the keys that describe the model the run
    made are taken (``model``, ``num_classes``, ``data``) and every other key is ignored, with one note that names
    them: they are that run's settings, and the ones these verbs also have mean something else there (``split:
    train``, the training batch size, ``method`` of distill, ``weights`` the run started from). The patch the run
    fine-tuned with travels with its weights (``--weights OUTPUT/model.safetensors`` records it). Any other file is
    returned as it is: an unknown key stays an error."""
    verb = values.get("command")
    if verb not in TRAINING_VERBS:
        return values
    taken = {k: values[k] for k in RUN_RECORD_KEYS if k in values and k in known}
    ignored = sorted(k for k in values if k not in taken and k != "command")
    weights = f"; its weights: --weights {Path(str(values['output'])) / 'model.safetensors'}" \
        if values.get("output") else ""
    note(f"config file {path} is the record of a `leanvit {verb}` run: taking its {', '.join(taken) or 'nothing'}, "
         f"ignoring its {len(ignored)} other keys ({', '.join(ignored)}){weights}")
    return taken
