"""``leanvit export``: a model, dense or patched with a token-reduction method, to one ONNX file with a dynamic batch
axis, checked with onnx.checker and against PyTorch in ONNX Runtime before it is written; ``--quantize int8``
quantizes its linear layers (ONNX Runtime dynamic quantization). Needs the extra ``leanvit[onnx]``.

Which patch is exported follows eval's rule: ``--method dense`` is the unpatched model, no ``--method`` the model as
it comes (the patch its ``--weights`` records, else the one it is created with), ``--method METHOD`` (with ``--r``,
``--budget`` or ``--keep``) or ``--recipe FILE`` that patch. Every block's token count is fixed by the schedule, so
only the batch axis is dynamic. The file is written atomically: a failed export leaves nothing at ``--output``.

    leanvit export --model leanvit_vit_fm_teacher --method gtp --budget 0.74 -o teacher_gtp.onnx
    leanvit export --model deit_small_patch16_224 --no-pretrained --method tome --r 8 -o deit_tome.onnx --quantize int8
"""
from __future__ import annotations

import argparse

from .arguments import add_model_args, add_reduction_args
from .build import (adapt_run_record, build_model_from_args, check_method, check_model_name, settle_patch,
                    setup_runtime)
from .outputs import check_output_file
from .parsing import add_config_arg, positive_int
from ..io import write_json


def add_parser(sub) -> argparse.ArgumentParser:
    from ..export.quantize import QUANTIZE

    p = sub.add_parser("export", help="export a model (dense or token-reduced) to ONNX", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.adapt_config = adapt_run_record  # a training run's config.yaml: its model, head and data (cli/build.py)
    add_model_args(p)
    add_reduction_args(p)
    p.set_defaults(method=None)  # no --method: the model as it comes (eval's rule)
    p.add_argument("--output", "-o", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="the linear layers in int8 (ONNX Runtime dynamic quantization; checked in float32 first)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: torch's exporter's)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing ONNX Runtime's output with PyTorch's before writing (onnx.checker still runs)")
    p.add_argument("--json", default=None, help="write what was exported to this JSON file")
    p.add_argument("--threads", type=positive_int, default=None, help="torch and ONNX Runtime threads")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import get_reducer
    from ..export import export_onnx, require

    # everything the user typed is checked before the model is built
    require(what="leanvit export")
    check_model_name(args)
    opts = check_method(args)
    check_output_file(args.output, "--output")
    check_output_file(args.json, "--json")
    setup_runtime(args)
    model = build_model_from_args(args).eval()
    source = settle_patch(args, model, opts)
    red = get_reducer(model)
    report = export_onnx(model, args.output, quantize=args.quantize, check=args.check, opset=args.opset,
                         name=args.model, threads=args.threads)
    C, H, W = report.input_size
    method = report.method
    if red is not None:
        amount = ", ".join(f"{k} {red.report[k]}" for k in ("keep", "budget") if red.report.get(k) is not None)
        method += f" ({amount})" if amount else ""
    print(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, {report.nodes} nodes"
          f"{', linear layers in int8' if report.quantize else ''})")
    print(f"model        {report.model}, {method}" + (f", schedule {report.schedule}" if report.schedule else ""))
    print(f"input        images: (batch, {C}, {H}, {W}) float32, batch dynamic -> logits")
    if report.max_abs_diff is not None:
        print(f"checked      ONNX Runtime against PyTorch at batch 1 and 3: max |diff| {report.max_abs_diff:.2g} "
              f"(float32{', before quantizing' if report.quantize else ''})")
    if args.json:
        write_json(args.json, {**report.as_dict(), "patch_source": source})
    return 0


def settle_runtime(args: argparse.Namespace, several: bool = False) -> list[str]:
    """The runtimes of ``--runtime`` (``--compile`` is ``compiled``) for eval, bench and compare, checked with
    ``--quantize``, ``--amp`` and the device before any work; ONNX Runtime runs on the CPU, so it makes ``--device``
    default to cpu. Returns the runtimes (one unless ``several``)."""
    from ..errors import ConfigError
    from ..export import check_runtime

    given = args.runtime
    runtimes = list(given) if isinstance(given, (list, tuple)) else [given or "pytorch"]
    if getattr(args, "compile", False):
        if given is not None and runtimes != ["compiled"]:
            raise ConfigError(f"--compile is --runtime compiled; drop it or --runtime {','.join(runtimes)}")
        runtimes = ["compiled"]
    if len(runtimes) > 1 and not several:
        raise ConfigError(f"--runtime {','.join(runtimes)}: several runtimes need --batch-sizes (the break-even "
                          f"table); give one runtime")
    if args.quantize is not None and "onnxruntime" not in runtimes:
        raise ConfigError(f"--quantize {args.quantize} quantizes an ONNX Runtime graph; add --runtime onnxruntime")
    if "onnxruntime" in runtimes:
        if getattr(args, "amp", None):
            raise ConfigError(f"--amp {args.amp} is PyTorch's autocast; ONNX Runtime runs the exported float32 "
                              f"graph (--quantize int8 for int8)")
        if getattr(args, "device", None) is None:
            args.device = "cpu"
    for rt in runtimes:
        check_runtime(rt, args.quantize if rt == "onnxruntime" else None,
                      args.device if rt == "onnxruntime" else None)
    return runtimes
