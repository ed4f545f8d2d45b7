"""Shared helpers for benchmark scripts: machine description and writing results (JSON + markdown fragment)."""
from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    from leanvit.analysis import machine_summary

    return machine_summary()


def command() -> str:
    """The command as run from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return "python " + shlex.join([str(script), *sys.argv[1:]])


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write(name: str, data: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a BENCHMARKS.md section)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    header = f"_Command_: `{command()}`  \n_Machine_: {machine()}  \n_Date_: {today()}\n\n"
    (RESULTS / f"{name}.md").write_text(header + markdown.strip() + "\n")
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
