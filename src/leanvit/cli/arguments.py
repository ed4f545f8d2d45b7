"""The argument groups the verbs share: model, data, runtime and token-reduction options."""
from __future__ import annotations

import argparse

from ..reduce import METHODS, method_help
from .parsing import fraction, nonneg_int, positive_int

# Evaluation batch size: on a 2-core CPU small batches keep each block's activations in cache. Host-dependent,
# chosen by timing `leanvit eval` and `leanvit compare` on the project's 2-core AMD EPYC host (BENCHMARKS.md,
# "Design measurements behind code defaults").
EVAL_BATCH_SIZE = 32


# the embedded default: the shipped reference teacher
DEFAULT_MODEL = "leanvit_vit_fm_teacher"


def add_model_args(p: argparse.ArgumentParser, model: str | None = None) -> None:
    p.add_argument("--model", "-m", default=model,
                   help=f"timm or leanvit model name (default: {DEFAULT_MODEL}, the shipped reference teacher; "
                        "`leanvit list-models`); in eval, bench, compare and vis also hf:PATH (a transformers "
                        "save_pretrained folder or hub name) or open_clip:ARCH with --weights FILE")
    p.add_argument("--weights", default=None,
                   help="weights to load: safetensors, leanvit checkpoint or torch state dict (read without "
                        "running code: files that need pickled objects are refused); for open_clip:ARCH the whole "
                        "CLIP model's")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="do not load the model's pretrained / shipped weights")
    p.add_argument("--num-classes", type=positive_int, default=None, help="override the classifier size")
    if p.prog.split()[-1] in RECIPE_VERBS:
        p.add_argument("--recipe", default=None, metavar="FILE",
                       help="patch the model with a recipe `leanvit tune` wrote (its method, per-block schedule and "
                            "options, exactly); the model defaults to the recipe's, and a recipe made for a model of "
                            "another depth, grid or prefix tokens is refused")


# the verbs that run a model as it comes and so take --recipe (cli/build.py applies it when it builds the model);
# the training verbs and tune make their own patch, and vis patches each of its --methods
RECIPE_VERBS = ("eval", "bench", "compare", "export")


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
    if method:
        p.add_argument("--method", default=None, metavar="METHOD",
                       help=f"token reduction, one of dense, {', '.join(METHODS)} (default: the model as it comes; "
                            f"dense: unpatched): {method_help()}")
    p.add_argument("--r", type=nonneg_int, default=None, help="tokens removed per block")
    p.add_argument("--budget", type=fraction, default=None, help="fraction of dense MACs to keep, e.g. 0.74")
    keeps = "; ".join(f"{m}: {cls.keep_help}" for m, cls in METHODS.items() if "keep" in cls.amounts)
    p.add_argument("--keep", type=fraction, default=None,
                   help=f"keep rate of methods with their own schedule ({keeps})")
    p.add_argument("--option", "-O", action="append", default=[], metavar="OPT=VALUE",
                   help="method option, repeatable (e.g. -O alpha=0.2 -O graph=spatial)")


def _runtimes(text: str) -> list[str]:
    from ..export.runtime import RUNTIMES

    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(RUNTIMES)}, comma-separated")
    for n in names:
        if n not in RUNTIMES:
            raise argparse.ArgumentTypeError(f"unknown runtime '{n}'; choose from {', '.join(RUNTIMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a runtime is named twice in '{text}'")
    return names


def batch_sizes(text: str) -> list[int]:
    """``1,2,4,8``: distinct positive batch sizes, in increasing order."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes, e.g. 1,2,4,8,16,32,64")
    values = [positive_int(t) for t in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a batch size is given twice in '{text}'")
    return sorted(values)


def add_deploy_args(p: argparse.ArgumentParser, several: bool = False, compiled: bool = False) -> None:
    """``--runtime`` (what runs the model: PyTorch, or ONNX Runtime's CPU provider on the model's ONNX export) and
    ``--quantize`` (int8 in ONNX Runtime) for eval, bench, compare; with ``several`` (bench's ``--batch-sizes``
    table) a comma-separated list; ``compiled`` offers ``torch.compile`` as a runtime."""
    from ..export.quantize import QUANTIZE

    choices = "pytorch, compiled, onnxruntime" if compiled else "pytorch, onnxruntime"
    p.add_argument("--runtime", type=_runtimes if several else str, default=None,
                   **({} if several else {"choices": choices.split(", ")}),
                   help=f"what runs the model{', comma-separated with --batch-sizes' if several else ''}: {choices} "
                        "(default: pytorch, eager; onnxruntime: the model's ONNX export, checked against PyTorch, on "
                        "ONNX Runtime's CPU provider; needs leanvit[onnx])")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="with --runtime onnxruntime: the linear layers in int8 (ONNX Runtime dynamic quantization)")
