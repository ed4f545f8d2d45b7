"""Every path a verb writes during or after its work is checked before the work starts.

A path that is only checked when it is written costs the whole run: ``leanvit distill --teacher-cache /proc/x``
trained an epoch and died in the cache flush with a traceback, leaving a run folder that a resume could not finish
either. So each verb x each of its output flags is pointed at a place that cannot be written (under ``/proc``,
where nothing can be created even as root, and under a regular file) and must answer with one line naming the flag,
exit status 2, before a model or a dataset is built, and with nothing written (no ``command.txt``).

"Before a model or a dataset is built" is observed, not timed: the builders are replaced, in every namespace the
CLI reaches them through, by stubs that record the call and stop the run.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

STUDENT = "leanvit_vit_fm_student"
TEACHER = "leanvit_vit_fm_teacher"
PROC = Path("/proc/leanvit-test")
DATA = ["--data", "synthetic:8"]
RUNTIME = ["--no-progress", "--device", "cpu"]

# verb -> arguments that get the verb past its other checks (the train verbs' own -o is added where it is not the
# flag under test)
SETUP = {
    "eval": ["-m", STUDENT, *DATA, *RUNTIME],
    "bench": ["-m", STUDENT, *RUNTIME],
    "compare": ["-m", STUDENT, *DATA, *RUNTIME],
    "tune": ["-m", STUDENT, *DATA, "--max-drop", "1", *RUNTIME],
    "export": ["-m", STUDENT, "--method", "tome", "--r", "2"],
    "vis": ["-m", STUDENT, *DATA, *RUNTIME],
    "analyze": ["-m", STUDENT, "--teacher", TEACHER, *DATA, *RUNTIME],
    "train": ["-m", STUDENT, *DATA, *RUNTIME],
    "finetune": [TEACHER, "--method", "tome", "--r", "2", *DATA, *RUNTIME],
    "distill": ["--teacher", TEACHER, "--method", "kd", *DATA, *RUNTIME],
}
TRAIN_VERBS = ("train", "finetune", "distill")
# verbs whose --output is required on the command line, with what it is given where it is not the flag under test
REQUIRED_OUTPUT = {"train": "run", "finetune": "run", "distill": "run", "export": "m.onnx"}

# every output flag of every verb: (verb, flag as typed, flag as named in the error, file name it gets)
OUTPUTS = [
    ("eval", "--json", "--json", "x.json"),
    ("bench", "--json", "--json", "x.json"),
    ("compare", "--json", "--json", "x.json"),
    ("compare", "--plot", "--plot", "x.png"),
    ("tune", "-o", "--output", "r.yaml"),
    ("tune", "--json", "--json", "x.json"),
    ("tune", "--plot", "--plot", "x.png"),
    ("export", "-o", "--output", "m.onnx"),
    ("export", "--json", "--json", "x.json"),
    ("vis", "-o", "--output", "maps.png"),
    ("vis", "--output", "--output", "maps.png"),
    ("analyze", "--json", "--json", "x.json"),
    ("analyze", "--reliability-plot", "--reliability-plot", "r.png"),
    ("analyze", "--cka-plot", "--cka-plot", "cka.png"),
    ("train", "-o", "--output", "run"),
    ("finetune", "-o", "--output", "run"),
    ("distill", "-o", "--output", "run"),
    ("distill", "--teacher-cache", "--teacher-cache", "cache"),
]


class WorkStarted(RuntimeError):
    """Raised by the stubbed builders: the run got past its checks into real work."""


@pytest.fixture
def no_work(monkeypatch) -> list[str]:
    """Replace the model and dataset builders, wherever the CLI looks them up, by stubs that record the call and
    stop the run; returns the list of calls."""
    import leanvit.cli.build
    import leanvit.data
    import leanvit.models

    calls: list[str] = []

    def stub(name: str):
        def builder(*args, **kwargs):
            calls.append(name)
            raise WorkStarted(f"{name} was called before the output paths were refused")

        return builder

    for module in (leanvit.data, leanvit.cli.build):
        monkeypatch.setattr(module, "build_dataset", stub("build_dataset"))
    for module in (leanvit.models, leanvit.cli.build):
        monkeypatch.setattr(module, "create_model", stub("create_model"))
    return calls


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder holding a regular file ``afile``; the current folder during the test."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _expect_refused(run_cli, argv: list[str], fragment: str, work: Path, calls: list[str]) -> str:
    """Run ``argv`` and assert: exit 2, one error line holding ``fragment``, no traceback, no model or data built,
    nothing written in ``work``. Returns the error line."""
    before = _snapshot(work)
    try:
        code, _, err = run_cli(*argv)
    except WorkStarted as e:
        pytest.fail(f"leanvit {' '.join(map(str, argv))}: work started before the check ({e})")
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("leanvit: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert calls == [], f"built {calls} before refusing"
    after = _snapshot(work)
    assert after == before, f"wrote {sorted(after - before)}"
    records = [f for name in ("command.txt", "config.yaml") for f in work.rglob(name) if f.is_file()]
    assert not records, f"the refused run left {records}"
    return lines[0]


def _argv(verb: str, typed: str, value: Path, work: Path) -> list[str]:
    argv = [verb, *SETUP[verb], typed, str(value)]
    if verb in REQUIRED_OUTPUT and typed not in ("-o", "--output"):
        argv += ["-o", str(work / REQUIRED_OUTPUT[verb])]
    return argv


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
@pytest.mark.parametrize("verb, typed, named, name", OUTPUTS, ids=[f"{v}{t}" for v, t, _, _ in OUTPUTS])
def test_unwritable_output_is_refused_before_work(run_cli, no_work, work, where, verb, typed, named, name):
    value = PROC / "sub" / name if where == "proc" else work / "afile" / name
    line = _expect_refused(run_cli, _argv(verb, typed, value, work), named, work, no_work)
    assert f"{named} {value}" in line
    assert ("cannot write in /proc" in line) if where == "proc" else ("is a file, not a folder" in line)


# the train verbs' --output is required on the command line (a config file cannot stand in for it)
FROM_CONFIG = [o for o in OUTPUTS if not (o[0] in REQUIRED_OUTPUT and o[2] == "--output")]


@pytest.mark.parametrize("verb, typed, named, name", FROM_CONFIG, ids=[f"{v}{t}" for v, t, _, _ in FROM_CONFIG])
def test_unwritable_output_from_a_config_file_is_refused(run_cli, no_work, work, verb, typed, named, name):
    """The same flag set by ``-c config.yaml`` is checked the same way, and named by its flag."""
    key = named.lstrip("-").replace("-", "_")
    (work / "cfg.yaml").write_text(f"{key}: {PROC / name}\n")
    argv = [verb, "-c", str(work / "cfg.yaml"), *SETUP[verb]]
    if verb in REQUIRED_OUTPUT:
        argv += ["-o", str(work / REQUIRED_OUTPUT[verb])]
    _expect_refused(run_cli, argv, f"{named} {PROC / name}: cannot write in /proc", work, no_work)


@pytest.mark.parametrize("verb", TRAIN_VERBS)
@pytest.mark.parametrize("inside", ["last.pt", "log.csv", "log.json", "model.safetensors", "config.yaml",
                                    "command.txt"])
def test_run_folder_holding_a_folder_where_a_file_goes_is_refused(run_cli, no_work, work, verb, inside):
    """The trainer writes ``last.pt``, ``log.csv``, ... in the run folder by renaming a temporary file over them; a
    folder in the way would fail that rename at the first checkpoint, after the work."""
    run = work / "run"
    (run / inside).mkdir(parents=True)
    _expect_refused(run_cli, [verb, *SETUP[verb], "-o", str(run)], f"--output {run}: {run / inside} is a "
                    "folder", work, no_work)


@pytest.mark.parametrize("verb", TRAIN_VERBS)
def test_run_folder_with_a_checkpoint_needs_resume_before_work(run_cli, no_work, work, verb):
    """A run folder that holds ``last.pt`` is refused without ``--resume`` before the model and data are built
    (not after: the answer does not depend on them)."""
    run = work / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    _expect_refused(run_cli, [verb, *SETUP[verb], "-o", str(run)], "exists; pass --resume", work, no_work)


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_teacher_cache_is_checked_on_resume_too(run_cli, no_work, work, where):
    """The reported case: a bad --teacher-cache is refused before work whether the run starts or resumes."""
    cache = PROC / "x" if where == "proc" else work / "afile" / "cache"
    argv = ["distill", *SETUP["distill"], "-o", str(work / "run"), "--teacher-cache", str(cache)]
    _expect_refused(run_cli, argv, f"--teacher-cache {cache}", work, no_work)
    _expect_refused(run_cli, [*argv, "--resume"], f"--teacher-cache {cache}", work, no_work)


def test_matrix_covers_every_output_flag():
    """Every option that names a path the verb writes (by the CLI's naming: output, json, *plot, *cache, *dir,
    *file) is in OUTPUTS, so a new output flag cannot go unchecked unnoticed."""
    from leanvit.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    pattern = re.compile(r"^(output|json|plot)$|_(output|json|plot|cache|dir|file)$")
    found = set()
    for verb, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and pattern.search(action.dest):
                found.add((verb, max(action.option_strings, key=len)))
    covered = {(verb, named) for verb, _, named, _ in OUTPUTS}
    assert found == covered
