"""The reducer contract, checked for every registered method: a new method is tested by registering it.

For each method in :data:`leanvit.reduce.METHODS` (its amounts say how to ask for no reduction and for some):
zero reduction gives the unpatched output on every timm variant (or a clear refusal, never a different output),
a real reduction changes the output and stays finite, the patched model pickles and deep-copies, unpatch restores
it exactly, it compiles as one graph, ``budget=`` is met when the method takes it, and ``trace=True`` records what
``leanvit vis`` draws.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import VARIANTS, image, make, run

import leanvit
from leanvit.errors import LeanvitError
from leanvit.reduce import METHODS, get_reducer, is_patched
from leanvit.reduce.types import TOKEN_STATES


def _zero(method: str) -> dict:
    return {"r": 0} if "r" in METHODS[method].amounts else {"keep": 1.0}


def _some(method: str) -> dict:
    return {"r": 2} if "r" in METHODS[method].amounts else {"keep": 0.7}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_reduction_is_the_unpatched_model(method, variant):
    model = make(variant)
    x = image()
    ref = run(model, x)
    try:
        leanvit.patch(model, method, **_zero(method))
    except LeanvitError as e:  # a method may refuse a model it cannot serve, with a reason, before any change
        assert variant != "deit" and str(e) and not is_patched(model)
        return
    assert torch.allclose(run(model, x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_reduction_pickle_copy_unpatch(method):
    model = make("deit", img_size=96, depth=3)
    x = image(96)
    ref = run(model, x)
    cls, block_cls = type(model), [type(b) for b in model.blocks]
    leanvit.patch(model, method, **_some(method))
    out = run(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert get_reducer(clone).schedule == get_reducer(model).schedule
        assert torch.equal(run(clone, x), out)
    leanvit.unpatch(model)
    assert type(model) is cls and [type(b) for b in model.blocks] == block_cls and not is_patched(model)
    assert torch.equal(run(model, x), ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_compiles_as_one_graph(method):
    model = leanvit.patch(make("deit", img_size=96, depth=3), method, **_some(method))
    x = image(96)
    eager = run(model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(out, eager, atol=1e-5)


@pytest.mark.parametrize("method", [m for m, cls in METHODS.items() if "budget" in cls.amounts])
def test_budget_is_met(method):
    model = leanvit.patch(make("deit", img_size=96, depth=4), method, budget=0.75)
    report = get_reducer(model).report
    assert get_reducer(model).reducing and report["achieved"] <= 0.75 and report["macs"] < report["dense_macs"]


@pytest.mark.parametrize("method", list(METHODS))
def test_trace_records_what_vis_draws(method):
    model = leanvit.patch(make("deit", img_size=96, depth=3), method, trace=True, **_some(method))
    x = image(96)
    run(model, x)
    log = get_reducer(model).trace_log
    assert log, "a reducing patch with trace=True records at least one block"
    n = 36  # 6x6 patches at 96 px
    for entry in log:
        assert {"block", "tokens", "source", "state"} <= set(entry)
        assert entry["state"].shape == (2, n) and int(entry["state"].max()) < len(TOKEN_STATES)
        assert entry["source"].shape[0] == 2 and entry["source"].shape[-1] == n


def test_truncate_before_attention_traces_once_per_block():
    model = leanvit.patch(make("deit", img_size=96, depth=3), "truncate", r=[2, 0, 3], point="attn", trace=True)
    run(model, image(96))
    log = get_reducer(model).trace_log
    assert [int(e["block"]) for e in log] == [0, 2] and [int(e["tokens"]) for e in log] == [34, 31]


@pytest.mark.parametrize("method", list(METHODS))
def test_schedule_says_what_it_counts(method):
    """``schedule`` counts removed tokens for removing methods and idle tokens for idling: named apart."""
    from leanvit.experiments.compare import CompareRow, format_table

    red = get_reducer(leanvit.patch(make("deit", img_size=96, depth=3), method, **_some(method)))
    assert red.report["schedule_counts"] == red.schedule_counts == ("idle" if red.selects_subsets else "removed")
    row = CompareRow(method=method, budget=1.0, schedule=red.schedule, gmacs=0.1, top1=50.0,
                     schedule_counts=red.schedule_counts)
    assert format_table([row]).splitlines()[-1].endswith(("idle " if red.schedule_counts == "idle" else "")
                                                         + str(red.schedule))
