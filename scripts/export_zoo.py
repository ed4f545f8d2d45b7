"""Copy a finished training run into the package zoo: weights (safetensors), config, command, log, test accuracy.

    python scripts/export_zoo.py runs/leanvit_vit_fm_student leanvit_vit_fm_student
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path, help="run folder written by leanvit train, distill or finetune")
    p.add_argument("name", help="registered model name (leanvit_...)")
    p.add_argument("--weights", default="model.safetensors", help="file in the run folder to ship")
    args = p.parse_args()
    from leanvit.zoo import RUNS_DIR, WEIGHTS_DIR

    src = args.run / args.weights
    if not src.is_file():
        print(f"{src} does not exist: has the run finished?", file=sys.stderr)
        return 2
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    dest_run = RUNS_DIR / args.name
    dest_run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, WEIGHTS_DIR / f"{args.name}.safetensors")
    for f in ("config.yaml", "command.txt", "log.csv", "log.json"):
        if (args.run / f).is_file():
            shutil.copyfile(args.run / f, dest_run / f)
    for f in ("config.yaml", "command.txt"):  # paths relative to the checkout, as a user would type them
        if (dest_run / f).is_file():
            (dest_run / f).write_text((dest_run / f).read_text().replace(f"{ROOT}/", ""))
    # the accuracy the shipped file gives, measured by the CLI users will run (on the whole test set, and on its
    # first 1,000 images, which the test suite re-checks)
    for extra, name in (([], "eval.json"), (["--limit", "1000"], "eval_1000.json")):
        out = subprocess.run([sys.executable, "-m", "leanvit.cli.main", "eval", "--model", args.name, "--no-progress",
                              *extra, "--json", str(dest_run / name)], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip())
        if out.returncode:
            return out.returncode
    print(json.loads((dest_run / "eval.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
