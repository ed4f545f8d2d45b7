"""The helpers every benchmark script shares (benchmarks/common.py): the share of the ideal speed-up, markdown tables,
the --threads option, the ideal-truncation row, and the strict, atomic results writer."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make

import leanvit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


# ------------------------------------------------------------------ share of the ideal speed-up


@pytest.mark.parametrize("speedup, ideal, share", [
    (1.3, 1.4, 0.75),   # keeps three quarters of the ideal's 40% gain
    (1.4, 1.4, 1.0),    # as fast as the ideal
    (1.0, 1.4, 0.0),    # no faster than dense
    (0.9, 1.5, -0.2),   # slower than dense
    (2.2, 2.0, 1.2),    # faster than the ideal (noise)
])
def test_share_of_ideal_is_the_share_of_the_gain(speedup, ideal, share):
    assert common.share_of_ideal(speedup, ideal) == pytest.approx(share)


def test_share_of_ideal_is_not_the_ratio_of_speeds():
    assert common.share_of_ideal(1.3, 1.4) != pytest.approx(1.3 / 1.4)


@pytest.mark.parametrize("ideal", [1.0, 0.95])
def test_share_of_ideal_is_none_without_an_ideal_gain(ideal):
    assert common.share_of_ideal(1.2, ideal) is None


# ------------------------------------------------------------------ markdown


def test_table_lines():
    assert common.table(["model", "img/s", "of ideal"], [["a", "12.5", common.fmt(0.75, ".3f")],
                                                          ["b", 3, common.fmt(None, ".3f")]]) == [
        "| model | img/s | of ideal |",
        "|---|---|---|",
        "| a | 12.5 | 0.750 |",
        "| b | 3 |  |",
    ]
    assert common.table(["x"], []) == ["| x |", "|---|"]
    assert common.table(["x", "y"], (r for r in [(1, 2)]))[-1] == "| 1 | 2 |"  # any iterable of rows


def test_fmt():
    assert common.fmt(0.12345) == "0.12"
    assert common.fmt(1.5, "+.1f") == "+1.5"
    assert common.fmt(None) == ""
    assert common.fmt(None, ".2f", "-") == "-"


# ------------------------------------------------------------------ --threads, timings


def test_threads_option_sets_torch_threads():
    p = argparse.ArgumentParser()
    common.add_threads(p)
    assert common.parse_args(p, ["--threads", "3"]).threads == 3
    assert torch.get_num_threads() == 3  # the autouse fixture restores the count
    assert common.parse_args(p, []).threads == 2
    assert torch.get_num_threads() == 2


def test_parse_args_without_threads_leaves_torch_alone():
    before = torch.get_num_threads()
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="x")
    assert common.parse_args(p, []).name == "x"
    assert torch.get_num_threads() == before


def test_median_and_best():
    reports = {"dense": SimpleNamespace(images_per_s=10.0, times_s=[0.4, 0.2, 0.25]),
               "gtp": SimpleNamespace(images_per_s=12.0, times_s=[0.1, 0.4])}
    median, best = common.median_and_best(reports, batch_size=4)
    assert median == {"dense": 10.0, "gtp": 12.0}
    assert best == {"dense": pytest.approx(20.0), "gtp": pytest.approx(40.0)}


# ------------------------------------------------------------------ the ideal row


def test_ideal_truncation_takes_the_methods_schedule():
    dense = make("deit", depth=4, img_size=96)
    gtp = leanvit.patch(make("deit", depth=4, img_size=96), "gtp", r=3)
    ideal = common.ideal_truncation(dense, gtp)
    red = leanvit.get_reducer(ideal)
    assert red.name == "truncate" and red.point == "mlp"
    assert red.schedule == leanvit.get_reducer(gtp).schedule
    assert leanvit.get_reducer(dense) is None  # a copy is patched, not the dense model


def test_ideal_truncation_of_idling_truncates_before_attention():
    dense = make("deit", depth=4, img_size=96)
    idle = leanvit.patch(make("deit", depth=4, img_size=96), "idle", keep=0.5)
    red = leanvit.get_reducer(common.ideal_truncation(dense, idle))
    n = idle.patch_embed.num_patches
    computed = [n - s for s in leanvit.get_reducer(idle).schedule]
    assert red.point == "attn"
    assert [n - sum(red.schedule[: i + 1]) for i in range(len(computed))] == computed


# ------------------------------------------------------------------ running leanvit, writing results


def test_run_leanvit(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(common.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    common.run_leanvit("eval", "--json", "x.json")
    (cmd, kw), = calls
    assert cmd == [sys.executable, "-m", "leanvit.cli.main", "eval", "--json", "x.json"]
    assert kw == {"cwd": common.ROOT, "check": True}
    assert capsys.readouterr().out == "$ leanvit eval --json x.json\n"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "today", lambda: "2026-01-01 00:00 UTC")
    return tmp_path / "results"


def test_write_is_strict_json(results):
    data = {"rows": [{"speedup": 1.25, "of_ideal": math.nan, "ms": math.inf, "low": -math.inf}],
            "shape": (2, 3), "path": Path("/tmp/x"), "n": None, "ok": True}
    common.write("bench", data, "| a |\n|---|\n| 1 |\n")
    text = (results / "bench.json").read_text()

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    loaded = json.loads(text, parse_constant=refuse)  # NaN / Infinity would be refused here
    assert loaded == {"rows": [{"speedup": 1.25, "of_ideal": None, "ms": None, "low": None}],
                      "shape": [2, 3], "path": "/tmp/x", "n": None, "ok": True}
    md = (results / "bench.md").read_text()
    assert md.startswith("_Command_: `python ")
    assert "_Date_: 2026-01-01 00:00 UTC\n\n| a |\n|---|\n| 1 |\n" in md
    assert sorted(p.name for p in results.iterdir()) == ["bench.json", "bench.md"]  # no temporary files left


def test_write_is_atomic(results, monkeypatch):
    """A write that fails before its rename leaves the previous file whole and no temporary file."""
    import leanvit.io

    common.write("bench", {"v": 1}, "old")
    before = {p.name: p.read_text() for p in results.iterdir()}

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(leanvit.io.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        common.write("bench", {"v": 2}, "new")
    assert {p.name: p.read_text() for p in results.iterdir()} == before


# ------------------------------------------------------------------ every script at least parses
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_script_compiles(script):
    """A benchmark is run by hand, rarely: a syntax error would otherwise be found by whoever reruns it next."""
    source = (ROOT / "benchmarks" / script).read_text()
    compile(source, script, "exec")
