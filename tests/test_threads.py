"""One patched model serving several forwards at once: threads sharing the model, and ``nn.DataParallel``-style
replicas (module copies whose ``__dict__`` shares the reducer object). Every forward must give the output, trace
and counters of the same forward run alone: per-forward reducer state lives in a per-thread copy of the reducer
(:meth:`~leanvit.reduce.base.TokenReducer.for_thread`), so no forward reads or overwrites another's.

The models are tiny (96 px, depth 3, random weights) and run on one torch thread; the interpreter's switch interval
is shortened while the threads run so that they interleave inside every forward, not only between forwards.
"""
from __future__ import annotations

import copy
import pickle
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable

import pytest
import timm
import torch
from conftest import image, make, run
from torch import nn

import leanvit
from leanvit.reduce import METHODS, get_reducer, is_patched
from leanvit.reduce.adapters.base import attached_reducer

ITERS = 20


def _amount(method: str) -> dict[str, Any]:
    return dict(keep=0.7) if method == "idle" else dict(r=2)


def _patched(method: str, **options: Any) -> nn.Module:
    model = make("deit", img_size=96, depth=3)  # evit and idle need the cls token
    return leanvit.patch(model, method, **_amount(method), **options)


def _batches() -> list[torch.Tensor]:
    # different contents and batch sizes: a forward reading another's state fails on the shapes or the values
    return [image(96, batch=2, seed=1), image(96, batch=3, seed=2)]


@contextmanager
def _fast_switching():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _race(workers: list[Callable[[], Any]], main: Callable[[], Any] | None = None) -> list[Any]:
    """Run every worker in a thread of its own (and ``main``, if given, in this thread), all started together by a
    barrier; return their results in order (``main``'s last) and re-raise the first error any of them raised."""
    n = len(workers) + (main is not None)
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def call(k: int, fn: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results[k] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=call, args=(k, fn)) for k, fn in enumerate(workers)]
    with _fast_switching():
        for t in threads:
            t.start()
        if main is not None:
            call(n - 1, main)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def _loop(model: nn.Module, x: torch.Tensor, after: Callable[[], Any] | None = None) -> Callable[[], Any]:
    """A worker: ``ITERS`` forwards of ``x``; returns every output and what ``after`` reads after the last one."""
    def work():
        outs = [run(model, x) for _ in range(ITERS)]
        return outs, (after() if after is not None else None)
    return work


def _assert_outputs(outs: list[torch.Tensor], ref: torch.Tensor) -> None:
    for k, out in enumerate(outs):
        assert out.shape == ref.shape and torch.allclose(out, ref, rtol=0, atol=1e-6), \
            f"forward {k}: {(out - ref).abs().max() if out.shape == ref.shape else out.shape}"


def _assert_trace(log: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]]) -> None:
    assert len(log) == len(ref) > 0
    for step, want in zip(log, ref):
        assert step.keys() == want.keys()
        for key, value in want.items():
            got = step[key]
            assert got.shape == value.shape, (key, got.shape, value.shape)
            if value.is_floating_point():
                assert torch.allclose(got, value, rtol=0, atol=1e-6), key
            else:
                assert torch.equal(got, value), key


def _dp_replica(model: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` makes (CUDA only), on CPU: every module replicated by
    ``_replicate_for_data_parallel`` (a new module whose ``__dict__`` is a shallow copy, so patched blocks share
    the reducer object), holding the original parameters where ``replicate`` puts the broadcast copies."""
    replica = model._replicate_for_data_parallel()
    replica._parameters = dict(model._parameters)
    for name, child in model._modules.items():
        replica._modules[name] = None if child is None else _dp_replica(child)
    return replica


# ======================================================================================== threads, one model
@pytest.mark.parametrize("method", list(METHODS))
def test_threads_share_one_patched_model(method):
    model = _patched(method)
    xs = _batches()
    refs = [run(model, x) for x in xs]
    results = _race([_loop(model, x) for x in xs])
    for (outs, _), ref in zip(results, refs):
        _assert_outputs(outs, ref)
    # and the thread that patched the model joins in: it keeps the reducer itself, the others their copies
    results = _race([_loop(model, xs[1])], main=_loop(model, xs[0]))
    _assert_outputs(results[0][0], refs[1])
    _assert_outputs(results[1][0], refs[0])


@pytest.mark.parametrize("method", ["gtp", "tome", "evit", "idle"])
def test_threads_read_their_own_trace(method):
    model = _patched(method, trace=True)
    xs = _batches()
    refs, traces = [], []
    for x in xs:
        refs.append(run(model, x))
        traces.append(get_reducer(model).trace_log)
    results = _race([_loop(model, x, lambda: get_reducer(model).trace_log) for x in xs])
    for (outs, log), ref, trace in zip(results, refs, traces):
        _assert_outputs(outs, ref)
        _assert_trace(log, trace)


def test_idle_training_forwards_record_their_own_cut_inputs():
    # the token-cut loss reads get_reducer(model).cut_inputs after the forward, in the thread that ran it
    model = _patched("idle").train()
    xs = _batches()
    refs, cuts = [], []
    for x in xs:
        refs.append(run(model, x))
        cuts.append(get_reducer(model).cut_inputs)
    results = _race([_loop(model, x, lambda: get_reducer(model).cut_inputs) for x in xs])
    for (outs, cut), ref, want in zip(results, refs, cuts):
        _assert_outputs(outs, ref)
        _assert_trace(cut, want)


def test_gtp_counters_are_per_thread():
    model = _patched("gtp", stats=True)
    owner = get_reducer(model)
    xs = _batches()
    results = _race([_loop(model, x, lambda: get_reducer(model).stats_summary()) for x in xs])
    for (_, summary), x in zip(results, xs):
        assert summary["removed_tokens"] == ITERS * x.shape[0] * sum(owner.schedule)
    assert owner.stats_summary()["removed_tokens"] == 0  # the patching thread ran no forward


def test_thread_copies_are_per_thread_and_share_the_configuration():
    model = _patched("gtp", trace=True)
    owner = get_reducer(model)
    assert owner.for_thread() is owner and attached_reducer(model) is owner

    def mine():
        red = get_reducer(model)
        return red, red.for_thread(), get_reducer(model)

    (a, a2, a3), (b, _, _) = _race([mine, mine])
    assert a is a2 is a3 and a is not owner and b is not owner and a is not b
    assert a.schedule is owner.schedule and a.info is owner.info and a.options() == owner.options()
    assert a.report is not owner.report and a.report["schedule"] == owner.report["schedule"]
    assert all(blk._leanvit_reducer is owner for blk in model.blocks)  # the blocks keep the shared reducer
    # a model pickled or deep-copied from another thread pickles the shared reducer, not a thread copy
    clone = _race([lambda: pickle.loads(pickle.dumps(model))])[0]
    shared = attached_reducer(clone)
    assert shared.shared() is shared and all(blk._leanvit_reducer is shared for blk in clone.blocks)
    assert get_reducer(clone) is not shared  # the clone belongs to the thread that unpickled it
    x = _batches()[0]
    assert torch.equal(run(clone, x), run(model, x))
    _assert_trace(get_reducer(clone).trace_log, get_reducer(model).trace_log)
    assert a.shared() is owner and get_reducer(clone).shared() is shared


def test_patch_and_unpatch_from_another_thread():
    # re-patching and unpatching handle the reducer attached to the model, never a thread's copy
    model = _patched("tome")
    x = _batches()[0]
    ref = run(model, x)

    def repatch():
        run(model, x)
        leanvit.patch(model, "gtp", r=2)
        return get_reducer(model)

    red = _race([repatch])[0]
    owner = attached_reducer(model)
    assert owner.name == "gtp" and red.name == "gtp"
    assert all(blk._leanvit_reducer is owner for blk in model.blocks)

    def failed_repatch():
        run(model, x)
        with pytest.raises(leanvit.errors.ConfigError):
            leanvit.patch(model, "tome", r=[40, 0, 0])  # more tokens than the model has: the gtp patch stays

    _race([failed_repatch])
    assert attached_reducer(model) is owner and all(blk._leanvit_reducer is owner for blk in model.blocks)
    leanvit.patch(model, "tome", r=2)
    assert torch.equal(run(model, x), ref)
    _race([lambda: leanvit.unpatch(model)])
    assert not is_patched(model)


# ======================================================================================== DataParallel-style
@pytest.mark.parametrize("method", list(METHODS))
def test_module_copies_sharing_the_reducer(method):
    model = _patched(method)
    xs = _batches()
    refs = [run(model, x) for x in xs]
    shallow = copy.copy(model)  # shares the reducer object (and every block) with ``model``
    assert get_reducer(shallow) is get_reducer(model)
    results = _race([_loop(shallow, xs[1])], main=_loop(model, xs[0]))
    _assert_outputs(results[0][0], refs[1])
    _assert_outputs(results[1][0], refs[0])
    # nn.DataParallel's replicas: every block a new module sharing the reducer, each replica in its own thread
    replicas = [_dp_replica(model) for _ in xs]
    assert all(r.blocks[i]._leanvit_reducer is get_reducer(model) for r in replicas for i in range(3))
    results = _race([_loop(r, x) for r, x in zip(replicas, xs)])
    for (outs, _), ref in zip(results, refs):
        _assert_outputs(outs, ref)


def test_pyramid_idle_threads():
    # PVT v2: the pyramid reducer (which builds itself without TokenReducer.__init__) gets per-thread copies too
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10, embed_dims=(16, 32, 48, 64),
                              num_heads=(1, 2, 3, 4), depths=(1, 2, 2, 1)).eval()
    leanvit.patch(model, "idle", keep=0.5)
    owner = attached_reducer(model)
    xs = [image(64, batch=2, seed=1), image(64, batch=3, seed=2)]
    refs = [run(model, x) for x in xs]
    results = _race([_loop(model, x, lambda: get_reducer(model)) for x in xs])
    for (outs, red), ref in zip(results, refs):
        _assert_outputs(outs, ref)
        assert red is not owner and red.shared() is owner and red.keep_ratios == owner.keep_ratios


def test_a_reducer_whose_subclass_skipped_the_base_init_is_bound_at_its_first_forward():
    from leanvit.reduce.base import TokenReducer

    class Bare(TokenReducer):
        def __init__(self):  # sets what it needs, not TokenReducer.__init__
            self.schedule, self.report = [0], {}

    red = Bare()
    assert red.for_thread() is red  # the first thread to run it owns it
    seen = []
    t = threading.Thread(target=lambda: seen.append(red.for_thread()))
    t.start()
    t.join()
    assert seen[0] is not red and seen[0].shared() is red
