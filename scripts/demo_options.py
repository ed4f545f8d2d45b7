"""Print the method options that `make demo` passes to `leanvit compare`: the ones chosen on the held-out split by
benchmarks/tune_gtp.py (benchmarks/results/tune_gtp.json, "chosen"), as -O METHOD.OPTION=VALUE flags, so that the
demo runs what the tuning chose instead of a hand-copied list. Methods the demo does not run are left out."""
from __future__ import annotations

import json
import sys
from pathlib import Path

TUNED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tune_gtp.json"
DEMO_METHODS = ("gtp", "tome", "evit")  # `leanvit compare`'s default methods besides dense


def flags(path: Path = TUNED) -> list[str]:
    chosen = json.loads(path.read_text())["chosen"] if path.is_file() else {}
    out = []
    for method in DEMO_METHODS:
        for option, value in sorted(chosen.get(method, {}).items()):
            out += ["-O", f"{method}.{option}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


if __name__ == "__main__":
    sys.stdout.write(" ".join(flags()) + "\n")
