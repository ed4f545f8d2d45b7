"""The house: every CLI verb is offered (none hidden by a failed import), and the registries and adapters are
the only places that name methods and model families."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from leanvit.cli.main import VERBS, build_parser

ALL_VERBS = {"train", "eval", "list-models", "bench", "compare", "tune", "vis", "distill", "finetune", "analyze",
             "export"}


def test_every_verb_is_offered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == ALL_VERBS and len(VERBS) == len(ALL_VERBS)


def test_a_verb_that_fails_to_import_is_an_error_not_a_missing_choice():
    """Before: `cli/main.py` caught ImportError and the verb vanished ("invalid choice"); now the import error
    surfaces with its traceback."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "leanvit.cli.analyze":
                    raise ImportError("simulated bug in leanvit.cli.analyze")
        sys.meta_path.insert(0, Broken())
        from leanvit.cli.main import main
        main(["analyze", "--help"])
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "simulated bug in leanvit.cli.analyze" in res.stderr
    assert "invalid choice" not in res.stderr


def test_a_required_option_may_come_from_the_config(tmp_path):
    """``-o`` of the training verbs was required on the command line even when the YAML gave ``output``."""
    from leanvit.cli.parsing import parse_with_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {tmp_path / 'run'}\nepochs: 1\n")
    args = parse_with_config(build_parser(), ["train", "-c", str(cfg)])
    assert args.output == str(tmp_path / "run") and args.epochs == 1
    import pytest

    from leanvit.errors import ConfigError

    with pytest.raises(ConfigError, match="required"):
        parse_with_config(build_parser(), ["train"])


def test_suite_collects_under_importlib_mode():
    """Test modules import shared helpers from conftest only (never from each other), which works in every
    pytest import mode; a test module importing another breaks under ``--import-mode=importlib``."""
    import pathlib
    import re

    tests = pathlib.Path(__file__).parent
    stems = {p.stem for p in tests.glob("test_*.py")}
    for path in tests.glob("*.py"):
        for name in re.findall(r"^\s*(?:from|import) (test_\w+)", path.read_text(), flags=re.M):
            assert name not in stems, f"{path.name} imports from {name}.py: move the helper to conftest.py"
