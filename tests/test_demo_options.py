"""`make demo` takes its method options from the tuning result file, not from a hand-copied list."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_options  # noqa: E402


def test_flags_follow_the_tuning_file(tmp_path):
    f = tmp_path / "tune.json"
    f.write_text(json.dumps({"chosen": {"gtp": {"alpha": 0.7, "graph": "spatial"}, "tome": {}, "other": {"x": 1}}}))
    assert demo_options.flags(f) == ["-O", "gtp.alpha=0.7", "-O", "gtp.graph=spatial"]
    assert demo_options.flags(tmp_path / "missing.json") == []


def test_makefile_demo_uses_the_script_and_its_flags_parse():
    assert "scripts/demo_options.py" in (ROOT / "Makefile").read_text()
    from leanvit.cli.main import build_parser
    from leanvit.cli.methods import parse_options

    args = build_parser().parse_args(["compare", *demo_options.flags()])
    chosen = json.loads(demo_options.TUNED.read_text())["chosen"]
    assert parse_options(args.option, per_method=True) == {m: o for m, o in chosen.items() if o and m != "other"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_options.py")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == demo_options.flags()
