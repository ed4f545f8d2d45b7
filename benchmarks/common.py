"""Shared helpers for benchmark scripts: the ``--threads`` option, the ideal-truncation row and the share of its
speed-up that a method keeps, interleaved timings, markdown tables, running the ``leanvit`` command, and writing
results (strict JSON + a markdown fragment, both atomically)."""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    from leanvit.analysis import machine_summary

    return machine_summary()


def command() -> str:
    """The command as run from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return "python " + shlex.join([str(script), *sys.argv[1:]])


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- the --threads option -------------------------------------------------------------------------------------


def add_threads(parser: argparse.ArgumentParser, default: int = 2) -> None:
    """Add ``--threads N``: torch's intra-op CPU threads for this process (and, in scripts that start ``leanvit``
    processes, for those); :func:`parse_args` applies it."""
    parser.add_argument("--threads", type=int, default=default,
                        help="torch CPU threads, which the results' header reports (default: %(default)s)")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then ``torch.set_num_threads(args.threads)`` where the parser has
    ``--threads`` (:func:`add_threads`): the count every timing runs on and the results' header reports."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


# --- the ideal row and the share of its speed-up ---------------------------------------------------------------


def ideal_truncation(dense, reduced):
    """The zero-overhead ideal of ``reduced`` (a patched copy of ``dense``): a fresh copy of ``dense`` patched with
    ``truncate`` on the same token counts, which drops tokens with nothing computed to choose them (the physical
    limit of the method's speed-up).

    The schedule is ``reduced``'s reducer's: tokens removed after each block's attention for the removing methods
    (GTP, ToMe, EViT), where ``truncate`` drops them by default; for ``idle`` (IdleViT), whose block ``i`` computes
    ``N - schedule[i]`` image tokens in attention and MLP alike, the drops between those counts, truncated before
    the attention (``point="attn"``).
    """
    import leanvit

    red = leanvit.get_reducer(reduced)
    if red.name == "idle":
        n = reduced.patch_embed.num_patches
        computed = [n - s for s in red.schedule]
        drops = [a - b for a, b in zip([n] + computed[:-1], computed)]
        return leanvit.patch(copy.deepcopy(dense), "truncate", r=drops, point="attn")
    return leanvit.patch(copy.deepcopy(dense), "truncate", r=red.schedule)


def share_of_ideal(speedup: float, ideal: float) -> float | None:
    """The share of the ideal speed-up's *gain* that a method keeps: ``(speedup - 1) / (ideal - 1)``.

    ``speedup`` and ``ideal`` are the method's and its ideal truncation's (:func:`ideal_truncation`) speed-ups over
    the same dense model, from the same interleaved run (images/s over the dense model's, or the dense model's
    latency over the model's). 1 means as fast as the ideal, 0 as slow as the dense model, below 0 slower than it;
    above 1 is faster than the ideal (noise, or a method whose tokens cost less than truncation's). It is not
    ``speedup / ideal``, which reads close to 1 whenever both speed-ups are small. None where the ideal gains
    nothing (``ideal <= 1``): there is no gain to share.
    """
    gain = ideal - 1
    if gain <= 0:
        return None
    return (speedup - 1) / gain


def median_and_best(reports: dict, batch_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Two statistics of the same timed runs (``compare_throughput(..., reports=True)``), name -> images/s: the
    median, and the best run (on a shared machine interference only ever adds time, so the best run is the least
    disturbed one)."""
    median = {k: r.images_per_s for k, r in reports.items()}
    best = {k: batch_size / min(r.times_s) for k, r in reports.items()}
    return median, best


# --- markdown -------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", missing: str = "") -> str:
    """``format(value, spec)``, or ``missing`` where the value is None (an empty cell)."""
    return missing if value is None else format(value, spec)


def table_row(cells: Iterable[Any]) -> str:
    """One markdown table row: ``| a | b |`` (each cell as ``str``)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[Any], rows: Iterable[Iterable[Any]]) -> list[str]:
    """The lines of a markdown table: the header, the separator, then one line per row of cells."""
    return [table_row(header), "|" + "---|" * len(header), *(table_row(r) for r in rows)]


# --- running leanvit, writing results ---------------------------------------------------------------------------


def run_leanvit(*argv: str) -> None:
    """Run ``leanvit ARGV`` in its own process from the repository root, echoing the command; a failed run stops
    the script (``CalledProcessError`` with its exit status)."""
    print("$ leanvit " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "leanvit.cli.main", *argv], cwd=ROOT, check=True)


def _plain(obj: Any) -> Any:
    """Containers and JSON scalars as they are, anything else (paths, numpy integers, ...) as ``str``."""
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return str(obj)


def write(name: str, data: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` (strict JSON: NaN and infinities as null, other objects as their ``str``) and
    ``results/<name>.md`` (a BENCHMARKS.md section), each atomically: a run stopped at any moment leaves the
    previous file or the new one, never a torn one."""
    from leanvit.io import atomic_write_text, write_json

    write_json(RESULTS / f"{name}.json", _plain(data))
    header = f"_Command_: `{command()}`  \n_Machine_: {machine()}  \n_Date_: {today()}\n\n"
    atomic_write_text(RESULTS / f"{name}.md", header + markdown.strip() + "\n")
    print(markdown)


def reference_eval(model: str | None, split: str, limit: int | None = None, batch_size: int = 256):
    """``(name, model, loader)``: a shipped reference model (default: the README's) and a Fashion-MNIST split."""
    from torch.utils.data import DataLoader

    import leanvit
    from leanvit.cli.arguments import DEFAULT_MODEL
    from leanvit.data import build_dataset

    name = model or DEFAULT_MODEL
    net = leanvit.create_model(name, pretrained=True).eval()
    return name, net, DataLoader(build_dataset("fmnist", split, net, limit=limit), batch_size=batch_size)


def tuned_options() -> dict:
    """Method options chosen on the held-out split by benchmarks/tune_gtp.py (empty if it has not run)."""
    path = RESULTS / "tune_gtp.json"
    return json.loads(path.read_text())["chosen"] if path.is_file() else {}
