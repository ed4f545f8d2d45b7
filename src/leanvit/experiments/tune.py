"""The search behind ``leanvit tune``: the fastest token-reduction configuration within an accuracy drop
(``max_drop``), or the most accurate one at least as fast as a speed-up (``target_speedup``).

What is searched. Each *arm* is a method with one setting of its options (GTP's graph, alpha, score and orphans,
ToMe's proportional attention, EViT's fuse; :data:`DEFAULT_SPACE`); the methods are the training-free ones
(:data:`TRAINING_FREE`) and, on a model that comes patched with another method (a model fine-tuned with its patch,
such as ``leanvit_vit_fm_teacher_idle70``, or weights whose file records the patch they were fine-tuned with), that
method too: a method that needs fine-tuning is searched only on weights fine-tuned for it. An arm's knob is its
budget ``b``, the share of dense MACs its token counts keep: the method's own solver turns ``b`` into a per-block
schedule (token counts only: the method's own work is not counted, so ``b`` is a position along the method's
schedules, and the MACs of the result are counted separately), and the schedule is applied block by block, exactly
as a recipe applies it (:mod:`leanvit.reduce.recipe`).

How it is measured. Accuracy is top-1 on a held-out split carved from the training data (never the test split),
its images taken in an order shuffled with ``seed``; a configuration is evaluated on the first ``n`` of them and
extended when more are needed, so no image is evaluated twice for one configuration. Speed is images/s at the
runtime and batch asked for, timed on this machine interleaved with the dense model (the rounds rotate the order,
:func:`leanvit.analysis.compare_throughput`) and reported as the ratio to it. The test split is read once, after the
choice, for the chosen configuration and the dense model (one pass).

The search, one progress line per stage:

1. *dense*: the dense model on the whole held-out split.
2. *budget per method* (each method's first option values): bisection on ``b`` over ``[min_budget, 1]`` for the
   boundary of the constraint, to ``tol``: with ``max_drop`` the smallest budget whose drop is within it, with
   ``target_speedup`` the largest budget at least that fast. Accuracy decisions race: a configuration is evaluated
   on 1/16 of the split, then on twice as many images, and the decision is taken as soon as its drop (paired,
   image by image against dense) is more than :data:`RACE_Z` standard errors from the limit, so only the
   configurations near the limit read the whole split. Speed decisions are one short interleaved timing each.
3. *options per method*: for the methods whose stage-2 boundary is within reach of the best method's (with
   ``max_drop`` at least :data:`PRUNE_SPEED` times its speed-up, timed together; with ``target_speedup`` within
   :data:`PRUNE_POINTS` of its top-1), successive halving of the option grid at the budget stage 2 found (with
   ``max_drop`` whose boundary is no reduction at all, the largest budget that failed): every setting on a slice of
   the split, the more accurate half on twice as many images, and so on until one is left.
4. *budget per winner*: a winner other than stage 2's options has its boundary searched again, galloping from
   stage 2's budget in steps that double and then bisecting.
5. *choice*: the boundary of every arm, read on the whole split (a boundary that the whole split puts outside the
   limit gives way to the arm's next budget), is timed with the dense model in one interleaved run; with
   ``max_drop`` the fastest wins (it must be faster than dense), with ``target_speedup`` the most accurate of those
   that reach the speed-up in that run (each arm also sends its next faster budget, in case its boundary misses).
6. *test*: the chosen configuration and the dense model, once, on the test split.

What it assumes, and where it can miss the best point:

* accuracy falls, and speed rises, as an arm's budget falls (bisection sees only the boundary; a configuration
  whose accuracy dips and recovers below it is not found), and the boundary is found to ``tol`` in budget;
* a raced decision is the one the whole split would give: one that is more than :data:`RACE_Z` standard errors
  from the limit on a slice is reversed by the whole split rarely (about 1% of such decisions at 2.5);
* options are ranked by accuracy at one budget and equal token counts: a setting that wins at stage 2's budget but
  not at its own boundary, or one that is cheaper per token (GTP's ``cls`` score keeps fused attention) and would
  win at equal *speed*, can be missed; successive halving drops a setting on a small slice of images for good; a
  method left out of stage 3 whose other settings would have overtaken the best method is missed;
* speed is noisy on a shared machine: the stage-2 and stage-4 speed decisions use short timings; the choice is
  re-timed in one run, but the measured speed-up of a recipe holds for this machine, runtime and batch only.

Cost: dominated by evaluating the held-out split; on the shipped teacher with its 5,000 held-out images, about one
whole-split pass of dense, a few per method near each boundary, and four slices' worth per option grid.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, DataLoader

from ..errors import ConfigError, UnsupportedModelError
from ..export import as_runtime, check_runtime
from ..progress import track
from ..ops.schedule import block_macs
from ..reduce import METHODS, get_reducer, patch, unpatch
from ..reduce.adapters import find_adapter
from ..reduce.recipe import Recipe, recipe_of, schedule_amount
from ..reduce.registry import check_options

# The option grid searched per method (the first value of each option is the setting stage 2 starts from: the
# settings chosen on the teacher's held-out split, BENCHMARKS.md "GTP settings chosen on the held-out split" and
# "GTP that loses no removed token"). GTP's grid spans the paper's DeiT alpha (0.1-0.4) and the teacher's (1.5).
DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    "gtp": {"graph": ["semantic", "mixed"], "alpha": [1.5, 0.3], "orphans": ["merge", "drop"],
            "score": ["mixed", "cls"]},
    "tome": {"prop_attn": [True, False]},
    "evit": {"fuse": ["mean", "sum", None]},
    "idle": {},
}
# methods that need no training: searched on any model (others only on weights fine-tuned with them)
TRAINING_FREE = ("gtp", "tome", "evit")
# a raced accuracy decision is taken when the drop is this many standard errors from the limit (two-sided ~1%)
RACE_Z = 2.5
FIRST_SLICE = 16  # racing and successive halving start on 1/16 of the held-out split
# Which methods have their options searched (stage 3): with max_drop those whose boundary runs at least PRUNE_SPEED
# times as fast as the fastest method's, with target_speedup those within PRUNE_POINTS top-1 of the most accurate.
# The grids' first values are the settings chosen on the teacher's held-out split, and the other settings moved
# GTP's held-out top-1 at one budget by about a point there (BENCHMARKS.md, "GTP settings chosen on the held-out
# split", "GTP that loses no removed token"): a method further behind is not expected to catch up on options alone.
PRUNE_SPEED = 0.85
PRUNE_POINTS = 1.5


@dataclass
class Trial:
    """One configuration tried: an arm (method and options) at a budget, with what was measured of it.

    ``top1`` and ``drop`` are on the first ``images`` held-out images (the whole split when ``images`` equals the
    split's size); ``drop`` is dense top-1 on the same images minus ``top1``, in points. ``speedup`` is images/s
    over the dense model's in the same interleaved run (NaN: not timed).
    """

    method: str
    options: dict[str, Any]
    budget: float
    schedule: list[int]
    schedule_counts: str
    stage: str
    macs_fraction: float = float("nan")
    images: int = 0
    top1: float = float("nan")
    drop: float = float("nan")
    speedup: float = float("nan")
    images_per_s: float = float("nan")
    dense_images_per_s: float = float("nan")
    verdict: bool | None = None  # the constraint's decision on this trial (None: not decided)

    @property
    def key(self) -> tuple:
        return _key(self.method, self.options, self.schedule)

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})@{self.budget:.3f}" if opts else f"{self.method}@{self.budget:.3f}"

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["label"] = self.label
        return d


def _key(method: str, options: dict[str, Any], schedule: Sequence[int]) -> tuple:
    return method, tuple(sorted(options.items())), tuple(int(s) for s in schedule)


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        met: whether the chosen configuration meets the constraint (False: nothing tried does; ``chosen`` is None
            and ``best`` is the configuration closest to it).
        chosen: the chosen trial (held-out figures on the whole split, speed-up from the final timing).
        best: the chosen trial, or where nothing meets the constraint the best one found (the smallest drop, or the
            fastest).
        message: one line saying what was found (or why nothing was).
        trials: every configuration tried, in the order tried.
        dense: the dense model's figures: ``heldout_top1``, ``images``, ``images_per_s`` (final timing),
            ``test_top1`` and ``test_images`` (when a test split was given).
        test: the chosen configuration's test figures (``top1``, ``images``), None without a test split or a choice.
        stages: seconds per stage, in order.
        settings: the constraint, runtime, batch, device and search settings the search ran with.
        model: the chosen configuration as a patched model (sharing the dense model's weights), None without one.
    """

    met: bool
    chosen: Trial | None
    best: Trial | None
    message: str
    trials: list[Trial]
    dense: dict[str, Any]
    test: dict[str, Any] | None
    stages: dict[str, float]
    settings: dict[str, Any]
    model: nn.Module | None = field(default=None, repr=False)

    def recipe(self, name: str | None = None, weights: str | None = None, **record: Any) -> Recipe:
        """The chosen configuration as a :class:`~leanvit.reduce.recipe.Recipe`, with what was measured of it."""
        if self.chosen is None or self.model is None:
            raise ConfigError(f"no configuration to write: {self.message}")
        c = self.chosen
        heldout = {"top1": round(c.top1, 4), "dense_top1": round(self.dense["heldout_top1"], 4),
                   "drop": round(c.drop, 4), "images": c.images, **record.pop("heldout", {})}
        rec: dict[str, Any] = {
            "budget": round(c.budget, 4), "macs_fraction": round(c.macs_fraction, 4),
            "constraint": {k: self.settings[k] for k in ("max_drop", "target_speedup") if self.settings[k] is not None},
            "heldout": heldout}
        if self.test is not None:
            rec["test"] = {"top1": round(self.test["top1"], 4), "dense_top1": round(self.dense["test_top1"], 4),
                           "images": self.test["images"], **record.pop("test", {})}
        rec["speed"] = {"speedup": round(c.speedup, 4), "images_per_s": round(c.images_per_s, 2),
                        "dense_images_per_s": round(c.dense_images_per_s, 2),
                        **{k: self.settings[k] for k in ("runtime", "amp", "batch", "device", "threads")}}
        rec.update(record)
        return recipe_of(self.model, name=name, weights=weights, **rec)

    def as_dict(self) -> dict[str, Any]:
        return {"met": self.met, "message": self.message, "chosen": self.chosen.as_dict() if self.chosen else None,
                "best": self.best.as_dict() if self.best else None, "dense": self.dense, "test": self.test,
                "stages": self.stages, "settings": self.settings, "trials": [t.as_dict() for t in self.trials]}


# ------------------------------------------------------------------------------------------------ the search space
def search_space(model: nn.Module, methods: Sequence[str] | None = None,
                 space: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, list[Any]]]:
    """The option grid per method that :func:`tune` searches on ``model`` (as it comes: a patched model adds its
    own method). ``space`` replaces option lists of :data:`DEFAULT_SPACE` (a single value fixes the option).

    Raises:
        ConfigError: a method that is unknown, or needs fine-tuning and the model is not fine-tuned with it; an
            option value the method refuses.
    """
    shipped = get_reducer(model)
    allowed = list(TRAINING_FREE) + ([shipped.name] if shipped is not None and shipped.name not in TRAINING_FREE
                                     else [])
    chosen = list(methods) if methods is not None else allowed
    if not chosen:
        raise ConfigError("give at least one method to search")
    for m in chosen:
        if m not in METHODS:
            raise ConfigError(f"unknown method '{m}'; tune searches {', '.join(allowed)}")
        if m not in allowed:
            raise ConfigError(
                f"'{m}' is not training-free: tune searches it only on weights fine-tuned with it, that is a model "
                f"that comes patched with it (a zoo model such as leanvit_vit_fm_teacher_idle70, or --weights of a "
                f"`leanvit finetune --method {m}` run); this model comes "
                + (f"patched with '{shipped.name}'" if shipped is not None else "unpatched")
                + f". Searchable here: {', '.join(allowed)}")
    for m in (space or {}):
        if m not in chosen:
            raise ConfigError(f"options given for '{m}', which is not searched ({', '.join(chosen)})")
    out: dict[str, dict[str, list[Any]]] = {}
    for m in chosen:
        grid = {k: list(v) for k, v in DEFAULT_SPACE.get(m, {}).items()}
        for opt, values in (space or {}).get(m, {}).items():
            grid[opt] = list(values) if isinstance(values, (list, tuple)) else [values]
            if not grid[opt]:
                raise ConfigError(f"option '{m}.{opt}' has no value to search")
        for opt, values in grid.items():
            for v in values:
                check_options(m, {opt: v})  # unknown options and values of the wrong type fail here
        out[m] = grid
    _check_values(model, out)
    return out


def _check_values(model: nn.Module, grids: dict[str, dict[str, list[Any]]]) -> None:
    """Every option value is one the method's constructor takes on this model (ranges, choices), checked by
    patching a copy with a one-token schedule; a method that refuses the model itself is left to the search, which
    leaves it out and says so."""
    probe = unpatch(_sharing_copy(model))
    info = find_adapter(probe).inspect(probe)
    schedule = [1] + [0] * (info.depth - 1)
    try:
        for m, grid in grids.items():
            amount = schedule_amount(m, schedule, info)
            try:
                patch(probe, m, **amount)
            except (ConfigError, UnsupportedModelError):
                continue
            for opt, values in grid.items():
                for v in values:
                    try:
                        patch(probe, m, **amount, **{opt: v})
                    except ConfigError as e:
                        raise ConfigError(f"option {m}.{opt}={v!r}: {e}") from None
    finally:
        unpatch(probe)


def _grid(options: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every setting of an option grid, the first values first (that setting is the arm's default)."""
    names = list(options)
    return [dict(zip(names, values)) for values in itertools.product(*(options[n] for n in names))]


# ------------------------------------------------------------------------------------------------ measuring
def _sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its parameters and buffers (patching swaps classes of the copy's
    modules only), so that many variants of a large model fit in memory."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class _Speed:
    """Images/s of models timed interleaved with the dense model at one runtime and batch: bench's runtimes
    (:func:`leanvit.export.as_runtime`: ``pytorch``, ``compiled``, ``onnxruntime``), each model compiled or exported
    once and kept."""

    def __init__(self, runtime: str, batch: int, amp: str | None, device: torch.device,
                 measure: Callable[[dict[str, nn.Module], int, int, int], dict[str, float]] | None,
                 input_size: tuple[int, int, int] | None = None):
        self.runtime, self.batch, self.amp, self.device = runtime, batch, amp, device
        self.input_size = input_size
        self.measure = measure
        self._compiled: dict[Any, nn.Module] = {}

    def _prepare(self, key: Any, model: nn.Module) -> nn.Module:
        if self.runtime == "pytorch":
            return model
        if key not in self._compiled:  # compiled, or exported to ONNX and checked against PyTorch (bench's runtimes)
            self._compiled[key] = as_runtime(model, self.runtime, name=f"tune-{len(self._compiled)}")
        return self._compiled[key]

    def __call__(self, models: dict[Any, nn.Module], warmup: int, runs: int, rounds: int) -> dict[Any, float]:
        """images/s per key; ``models`` includes the dense model under the key ``"dense"``."""
        names = {k: f"m{i}" for i, k in enumerate(models)}
        prepared = {names[k]: self._prepare(k, m) for k, m in models.items()}
        if self.measure is not None:
            speed = self.measure(prepared, warmup, runs, rounds)
        else:
            from ..analysis import compare_throughput

            speed = compare_throughput(prepared, self.input_size, batch_size=self.batch, warmup=warmup, runs=runs,
                                       rounds=rounds, device=self.device, amp=self.amp)
        return {k: float(speed[names[k]]) for k in models}


class _Search:
    """The state of one search: the dense model, the held-out split's order, every trial and its predictions."""

    def __init__(self, model: nn.Module, heldout: Dataset, max_drop: float | None, target_speedup: float | None,
                 speed: _Speed, seed: int, min_budget: float, tol: float, eval_batch: int, workers: int,
                 device: torch.device, quick: tuple[int, int, int], final: tuple[int, int, int], time_all: bool,
                 progress: bool, log: Callable[[str], None]):
        from ..analysis import count_macs, default_input_size

        self.dense = model
        self.heldout = heldout
        self.max_drop, self.target = max_drop, target_speedup
        self.speed = speed
        self.min_budget, self.tol = min_budget, tol
        self.eval_batch, self.workers, self.device = eval_batch, workers, device
        self.quick, self.final, self.time_all = quick, final, time_all
        self.progress, self.log = progress, log
        self.n = len(heldout)
        self.order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))  # the split's order
        self.trials: dict[tuple, Trial] = {}
        self.correct: dict[tuple, torch.Tensor] = {}  # key -> (images,) bool, in self.order
        self._schedules: dict[tuple, tuple[list[int], str] | None] = {}
        self._floors: dict[tuple, float | None] = {}
        adapter = find_adapter(model)
        self.info = adapter.inspect(model)
        # one input size for every model timed (an exported model's own config may not know the patch embedding's)
        self.input_size = adapter.input_size(model) or default_input_size(model)
        self.dense_macs = count_macs(model, self.input_size, device=device).macs
        # the MACs outside the blocks, which a schedule does not change (what the budget solver is given)
        self.other_macs = self.dense_macs - block_macs(self.info.blocks, [0] * self.info.depth, self.info.num_prefix,
                                                       self.info.num_image)
        self._variants: dict[tuple, nn.Module] = {}  # the last few patched variants, by trial key
        self.dense_correct = torch.zeros(0, dtype=torch.bool)
        self.dense_speed = float("nan")

    # ------------------------------------------------------------------ configurations
    def _patched(self, method: str, options: dict[str, Any], **amount: Any) -> nn.Module:
        return patch(_sharing_copy(self.dense), method, **amount, **options)

    def schedule(self, method: str, options: dict[str, Any], budget: float) -> tuple[list[int], str] | None:
        """The schedule the method's own solver gives for ``budget`` from token counts (as ``patch(budget=...,
        measure=False)`` solves it, without building a model), or None where it cannot reach the budget."""
        k = (method, tuple(sorted(options.items())), round(budget, 6))
        if k not in self._schedules:
            cls = METHODS[method]
            try:
                schedule = cls.schedule_for_budget(budget, self.info, self.other_macs, options)
                cls.check_schedule(schedule, self.info, options)
                self._schedules[k] = ([int(v) for v in schedule], cls.schedule_counts)
            except ConfigError:
                self._schedules[k] = None
        return self._schedules[k]

    def floor(self, method: str, options: dict[str, Any]) -> float | None:
        """The lowest budget searched for the arm: ``min_budget``, or where the method cannot reach it on this model
        the smallest budget it reaches (to ``tol``); None where it cannot patch the model at all."""
        k = (method, tuple(sorted(options.items())))
        if k not in self._floors:
            one = schedule_amount(method, [1] + [0] * (self.info.depth - 1), self.info)
            try:  # the method may refuse the model whatever the budget (EViT without a cls token)
                patch(self.dense, method, **one, **options)
            except (ConfigError, UnsupportedModelError):
                self._floors[k] = None
                return None
            finally:
                unpatch(self.dense)
            lo, hi = self.min_budget, 1.0
            if self.schedule(method, options, lo) is not None:
                hi = lo
            while hi - lo > self.tol:  # bisection on whether the solver reaches the budget
                mid = round((lo + hi) / 2, 4)
                if self.schedule(method, options, mid) is None:
                    lo = mid
                else:
                    hi = mid
            self._floors[k] = hi
        return self._floors[k]

    def trial(self, method: str, options: dict[str, Any], budget: float, stage: str) -> Trial | None:
        """The trial of an arm at ``budget`` (the same trial for every budget that gives its schedule), or None
        where the budget cannot be reached."""
        budget = round(budget, 4)
        got = self.schedule(method, options, budget)
        if got is None:
            return None
        schedule, counts = got
        k = _key(method, options, schedule)
        if k not in self.trials:
            t = Trial(method, dict(options), budget, schedule, counts, stage)
            self.trials[k] = t
            self.correct[k] = torch.zeros(0, dtype=torch.bool)
        return self.trials[k]

    def variant(self, t: Trial) -> nn.Module:
        """The trial's patched model, its schedule given block by block (as a recipe gives it); the last few are
        kept."""
        if not any(t.schedule):
            return self.dense
        if t.key not in self._variants:
            if len(self._variants) >= 4:
                self._variants.pop(next(iter(self._variants)))
            amount = schedule_amount(t.method, t.schedule, self.info)
            self._variants[t.key] = self._patched(t.method, t.options, **amount)
        return self._variants[t.key]

    @contextlib.contextmanager
    def patched(self, t: Trial):
        """The dense model patched with the trial in place for the duration (evaluation runs one model at a time;
        a patched copy per evaluation would cost more than a small model's slice of images), unpatched after."""
        amount = schedule_amount(t.method, t.schedule, self.info)
        patch(self.dense, t.method, **amount, **t.options)
        try:
            yield self.dense
        finally:
            unpatch(self.dense)

    def count(self, t: Trial) -> None:
        """The trial's MACs as counted (the method's own work included), as a share of dense."""
        from ..analysis import count_macs

        if math.isnan(t.macs_fraction):
            t.macs_fraction = count_macs(self.variant(t), self.input_size, device=self.device).macs / self.dense_macs

    # ------------------------------------------------------------------ accuracy
    def _predict(self, model: nn.Module, start: int, stop: int) -> torch.Tensor:
        from ..engine.evaluate import evaluate_many

        idx = self.order[start:stop].tolist()
        loader = DataLoader(Subset(self.heldout, idx), batch_size=self.eval_batch, shuffle=False,
                            num_workers=self.workers)
        res = evaluate_many({"m": model}, loader, self.device, keep_logits=True, progress=False)["m"]
        return res.logits.argmax(-1).eq(res.targets).cpu()

    def evaluate_dense(self) -> None:
        self.dense_correct = self._predict(self.dense, 0, self.n)

    def extend(self, t: Trial, n: int) -> None:
        """Evaluate ``t`` on the first ``n`` held-out images (only those it has not seen)."""
        n = min(n, self.n)
        have = self.correct[t.key]
        if have.numel() < n:
            if any(t.schedule):
                with self.patched(t) as model:
                    new = self._predict(model, have.numel(), n)
            else:  # no token reduced: the dense model's predictions
                new = self.dense_correct[have.numel():n]
            have = self.correct[t.key] = torch.cat([have, new])
        t.images = have.numel()
        t.top1 = 100.0 * have.float().mean().item()
        t.drop = 100.0 * self.dense_correct[:t.images].float().mean().item() - t.top1

    def slices(self, start: int = 0) -> list[int]:
        """Image counts of the racing rungs: 1/16 of the split, doubling to the whole, those above ``start``."""
        n, out = max(1, self.n // FIRST_SLICE), []
        while n < self.n:
            out.append(n)
            n *= 2
        return [m for m in out if m > start] + [self.n]

    def within_drop(self, t: Trial) -> bool:
        """Whether ``t`` drops at most ``max_drop`` points below dense on the held-out split, raced: decided on the
        first slice whose drop is more than RACE_Z standard errors from the limit, else on the whole split."""
        for n in self.slices():
            self.extend(t, n)
            if n >= self.n:
                return t.drop <= self.max_drop + 1e-9
            d = self.dense_correct[:n].float() - self.correct[t.key][:n].float()  # (n,) in {-1, 0, 1}
            # a floor of one image on the variance keeps a slice where dense and variant agree everywhere honest
            se = 100.0 * math.sqrt(max(d.var(unbiased=False).item(), 1.0 / n) / n)
            if t.drop - RACE_Z * se > self.max_drop:
                return False
            if t.drop + RACE_Z * se <= self.max_drop:
                return True
        return t.drop <= self.max_drop + 1e-9  # pragma: no cover - the last slice is the whole split

    # ------------------------------------------------------------------ speed
    def time(self, trials: Sequence[Trial], final: bool = False, careful: bool = False) -> None:
        """Time ``trials`` interleaved with the dense model and set their speed-ups: quickly, in chunks of 8 per run
        (for the plot and the speed decisions of the bisection), or all in one run, ``careful``ly (the choice of the
        methods refined) or with the ``final`` run counts (the choice)."""
        warmup, runs, rounds = self.final if final else ((1, 3, 3) if careful else self.quick)
        chunk = len(trials) if (final or careful) else 8
        for i in range(0, len(trials), chunk):
            part = list(trials[i:i + chunk])
            models: dict[Any, nn.Module] = {"dense": self.dense}
            models.update({t.key: self.variant(t) for t in part})
            speed = self.speed(models, warmup, runs, rounds)
            for t in part:
                t.images_per_s, t.dense_images_per_s = speed[t.key], speed["dense"]
                t.speedup = speed[t.key] / speed["dense"]
            if final:
                self.dense_speed = speed["dense"]

    def time_untimed(self) -> None:
        if self.time_all:
            todo = [t for t in self.trials.values() if math.isnan(t.speedup)]
            if todo:
                self.time(todo)

    def fast_enough(self, t: Trial) -> bool:
        if not any(t.schedule):
            return False
        if math.isnan(t.speedup):
            self.time([t])
        return t.speedup >= self.target

    # ------------------------------------------------------------------ the constraint
    def ok(self, t: Trial | None) -> bool:
        """The constraint's decision on ``t`` (None, a budget the arm cannot reach, fails it); cached on the trial."""
        if t is None:
            return False
        if t.verdict is None:
            if self.max_drop is not None:
                t.verdict = True if not any(t.schedule) else self.within_drop(t)
            else:
                t.verdict = self.fast_enough(t)
        return t.verdict

    def bisect(self, arm: tuple[str, dict[str, Any]], good: float, bad: float, stage: str) -> tuple[float, float]:
        """Bisection between a budget that meets the constraint (``good``) and one that does not (``bad``), to
        ``tol``; returns the final pair."""
        method, options = arm
        while abs(good - bad) > self.tol:
            mid = round((good + bad) / 2, 4)
            if mid in (good, bad):
                break
            if self.ok(self.trial(method, options, mid, stage)):
                good = mid
            else:
                bad = mid
        return good, bad

    def boundary(self, arm: tuple[str, dict[str, Any]], stage: str, start: float | None = None
                 ) -> tuple[float | None, float | None]:
        """The budget at the arm's boundary: ``(good, bad)``, the budget nearest the limit that meets the constraint
        and its neighbour beyond it (within ``tol``); ``good`` None when no budget in ``[floor, 1]`` meets it.

        With ``max_drop`` good lies above the boundary (1.0, no reduction, always meets it); with ``target_speedup``
        below it (1.0 never does). Without ``start``, the far end (the arm's lowest budget) is checked first, then
        bisected; from ``start`` the search gallops (steps of 2 tol, doubling) to a bracket, then bisects.
        """
        method, options = arm
        lo = self.floor(method, options) or 1.0
        drop_mode = self.max_drop is not None
        if start is None:
            t_lo = self.trial(method, options, lo, stage)
            if drop_mode:
                if self.ok(t_lo):
                    return lo, None
                return self.bisect(arm, 1.0, lo, stage)
            if not self.ok(t_lo):
                return None, lo
            return self.bisect(arm, lo, 1.0, stage)
        # the direction in which budgets approach the limit while the constraint holds: down for max_drop (faster,
        # less accurate), up for target_speedup (more accurate, slower)
        d = -1.0 if drop_mode else 1.0
        good: float | None
        bad: float | None
        start = min(max(round(start, 4), lo), 1.0)
        step = 2 * self.tol
        if self.ok(self.trial(method, options, start, stage)):
            good, bad = start, None
            while bad is None:  # gallop toward the limit while the constraint holds
                probe = min(max(round(good + d * step, 4), lo), 1.0)
                if probe == good:
                    return good, None  # the arm's end: its lowest budget
                if self.ok(self.trial(method, options, probe, stage)):
                    good, step = probe, step * 2
                else:
                    bad = probe
        else:
            good, bad = None, start
            while good is None:  # gallop back until the constraint holds
                probe = min(max(round(bad - d * step, 4), lo), 1.0)
                if probe == bad:
                    return None, bad  # the arm's end: nothing meets the constraint
                if self.ok(self.trial(method, options, probe, stage)):
                    good = probe
                else:
                    bad, step = probe, step * 2
        return self.bisect(arm, good, bad, stage)


# ------------------------------------------------------------------------------------------------ the entry point
def tune(model: nn.Module, heldout: Dataset, test: Dataset | Callable[[], Dataset] | None = None, *,
         max_drop: float | None = None, target_speedup: float | None = None, methods: Sequence[str] | None = None,
         space: dict[str, dict[str, Any]] | None = None, runtime: str = "pytorch", amp: str | None = None,
         batch: int = 32, device: str | torch.device = "cpu", seed: int = 0, min_budget: float = 0.2,
         tol: float = 0.02, eval_batch: int = 32, workers: int = 0, bench_runs: int = 5,
         time_all: bool | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
         measure_speed: Callable[[dict[str, nn.Module], int, int, int], dict[str, float]] | None = None
         ) -> TuneResult:
    """Search token-reduction methods, their options and budgets for the configuration that best meets one
    constraint on ``model`` (as it comes; left unchanged): the strategy, what it assumes and where it can miss are
    in this module's docstring.

    Args:
        model: the model to tune; one that comes patched (fine-tuned with its patch) is tuned from its weights
            unpatched ("dense"), and its own method joins the search.
        heldout: the held-out split carved from the training data; selection reads nothing else.
        test: the test split (or a function that builds it), read once after the choice; None skips it.
        max_drop: the most top-1 points the configuration may lose against dense on ``heldout`` (fastest wins).
        target_speedup: the least speed-up over dense, measured (most accurate wins). Give exactly one of the two.
        methods, space: the methods searched (default: the training-free ones plus the model's own patch) and
            option lists replacing :data:`DEFAULT_SPACE`'s (``{"gtp": {"alpha": [0.5, 1.5]}}``).
        runtime: how the configurations are timed, bench's runtimes: ``pytorch`` (eager), ``compiled``
            (``torch.compile(fullgraph=True)``) or ``onnxruntime`` (exported to ONNX, float32, checked against
            PyTorch), one compilation or export per timed configuration; accuracy is evaluated in PyTorch, whose
            outputs the other two reproduce. amp: ``fp16``/``bf16`` autocast for timing (PyTorch runtimes);
            batch: the timing batch size.
        seed: the order of the held-out images (the slices the search reads first).
        min_budget, tol: the lowest budget searched and the bisection's resolution.
        eval_batch, workers: evaluation batch size and data-loader workers.
        bench_runs: timed runs per model and round in the final timing (3 rounds).
        time_all: also time every configuration tried, for the accuracy-vs-speed plot (default: with the
            ``pytorch`` runtime only, where it is cheap).
        progress: progress lines, one set per stage (stderr); log: where the stage results go (default: stderr
            when ``progress``).
        measure_speed: replaces the wall-clock timing: ``(models, warmup, runs, rounds) -> images/s`` per name
            (tests use a deterministic one).

    Raises:
        ConfigError: no or both constraints, a bad runtime or setting, a method that needs fine-tuning on a model
            not fine-tuned with it.
    """
    if (max_drop is None) == (target_speedup is None):
        raise ConfigError("give one constraint: max_drop (top-1 points below dense) or target_speedup")
    if max_drop is not None and (not math.isfinite(max_drop) or max_drop < 0):
        raise ConfigError(f"max_drop must be a number of top-1 points >= 0, got {max_drop}")
    if target_speedup is not None and (not math.isfinite(target_speedup) or target_speedup <= 1.0):
        raise ConfigError(f"target_speedup must be above 1 (a speed-up over dense), got {target_speedup}")
    check_runtime(runtime, device=device)  # unknown runtimes, ONNX Runtime off the CPU or without its packages
    if amp is not None and runtime == "onnxruntime":
        raise ConfigError(f"amp {amp} is PyTorch's autocast; ONNX Runtime runs the exported float32 graph")
    if not 0.0 < min_budget < 1.0 or not 0.0 < tol < 0.5:
        raise ConfigError(f"min_budget must be in (0, 1) and tol in (0, 0.5), got {min_budget} and {tol}")
    if len(heldout) == 0:
        raise ConfigError("the held-out split is empty")
    grids = search_space(model, methods, space)
    device = torch.device(device)
    say = log if log is not None else ((lambda s: print(f"tune: {s}", file=sys.stderr, flush=True)) if progress
                                       else (lambda s: None))
    cuda = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda):  # timing draws random inputs: the caller's RNG is left as it was
        return _tune(model, heldout, test, max_drop, target_speedup, grids, runtime, amp, batch, device, seed,
                     min_budget, tol, eval_batch, workers, bench_runs,
                     runtime == "pytorch" if time_all is None else time_all, progress, say, measure_speed)


def _tune(model, heldout, test, max_drop, target, grids, runtime, amp, batch, device, seed, min_budget, tol,
          eval_batch, workers, bench_runs, time_all, progress, say, measure_speed) -> TuneResult:
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    # a copy of the caller's model, unpatched (a model that comes patched is tuned from its weights), which the
    # search patches in place to evaluate one configuration at a time
    dense = unpatch(copy.deepcopy(model)).to(device).eval()
    speed = _Speed(runtime, batch, amp, device, measure_speed)
    s = _Search(dense, heldout, max_drop, target, speed, seed, min_budget, tol, eval_batch, workers, device,
                quick=(1, 2, 2), final=(3, bench_runs, 3), time_all=time_all, progress=progress, log=say)
    speed.input_size = s.input_size
    limit = f"drop <= {max_drop:g} points" if max_drop is not None else f"speed-up >= {target:g}x"
    arms0 = {m: (m, _grid(g)[0]) for m, g in grids.items()}

    def stage(name: str, total: int):
        return track(total=total, desc=f"tune {len(stages) + 1}/6 {name}", enabled=progress)

    # 1. dense on the whole held-out split
    t0 = time.perf_counter()
    bar = stage("dense on the held-out split", 1)
    s.evaluate_dense()
    bar.update()
    bar.close()
    dense_top1 = 100.0 * s.dense_correct.float().mean().item()
    stages["dense"] = time.perf_counter() - t0
    say(f"dense held-out top-1 {dense_top1:.2f}% on {s.n} images; searching {', '.join(grids)} for {limit}")

    # 2. each method's boundary with its first option values
    t0 = time.perf_counter()
    found: dict[str, tuple[float | None, float | None]] = {}
    bar = stage("budget per method (first options)", len(arms0))
    for m, arm in arms0.items():
        if s.floor(*arm) is None:
            say(f"{m}: cannot patch this model; left out")
            bar.update()
            continue
        found[m] = s.boundary(arm, "budget")
        bar.update()
    bar.close()
    s.time_untimed()
    stages["budget"] = time.perf_counter() - t0
    say("boundaries: " + "; ".join(f"{m} {_words(s, arms0[m], b)}" for m, b in found.items()))
    if not found:
        raise UnsupportedModelError("none of the searched methods can patch this model")

    reachable = {m: b for m, b in found.items() if b[0] is not None}
    if target is not None and not reachable:
        return _finish_unmet(s, model, dense_top1, test, stages, t_start, grids, runtime, amp, batch, device, seed,
                             min_budget, tol, max_drop, target, say, progress)

    # 3. successive halving of the option grid at its stage-2 budget, for the methods within reach of the best
    t0 = time.perf_counter()
    contenders = _contenders(s, {m: (arms0[m], b) for m, b in reachable.items()}, say)
    winners: dict[str, dict[str, Any]] = {}
    probe_budget: dict[str, float] = {}
    bar = stage("options per method (successive halving)", len(contenders))
    for m in contenders:
        good, bad = found[m]
        # at the boundary; with max_drop a boundary of no reduction ranks the options where the default just failed
        b = good if (target is not None or good < 1.0 or bad is None) else bad
        probe_budget[m] = b
        winners[m] = _halve(s, m, _grid(grids[m]), b)
        bar.update()
    bar.close()
    s.time_untimed()
    stages["options"] = time.perf_counter() - t0
    say("options: " + "; ".join(f"{m} {_opts(o)}" for m, o in winners.items()))

    # 4. the boundary of every winner whose options differ from stage 2's
    t0 = time.perf_counter()
    arms: dict[str, tuple[tuple[str, dict[str, Any]], tuple[float | None, float | None]]] = {}
    bar = stage("budget per winner", len(winners))
    for m, opts in winners.items():
        if opts == arms0[m][1]:
            arms[m] = ((m, opts), found[m])
        else:
            arms[m] = ((m, opts), s.boundary((m, opts), "refine", start=probe_budget[m]))
        bar.update()
    bar.close()
    s.time_untimed()
    stages["refine"] = time.perf_counter() - t0
    say("boundaries: " + "; ".join(f"{m} {_opts(a[1])} {_words(s, a, b)}" for m, (a, b) in arms.items()))

    # 5. the choice: every arm's boundary on the whole split, timed together with dense
    t0 = time.perf_counter()
    bar = stage("choice (whole split, final timing)", 2)
    # every method's stage-2 arm, and the winners whose options differ (a winner was ranked at one budget only)
    final_arms = [arms0[m] for m in reachable] + [a for m, (a, _) in arms.items() if a != arms0[m]]
    finalists = _finalists(s, final_arms)
    for t in finalists:
        s.count(t)
    bar.update()
    if finalists:
        s.time(finalists, final=True)
    bar.update()
    bar.close()
    stages["choice"] = time.perf_counter() - t0
    chosen = _choose(s, finalists)
    dense_info: dict[str, Any] = {"heldout_top1": dense_top1, "images": s.n, "images_per_s": s.dense_speed}
    if chosen is None:
        return _finish_unmet(s, model, dense_top1, test, stages, t_start, grids, runtime, amp, batch, device, seed,
                             min_budget, tol, max_drop, target, say, progress, dense_info)

    # 6. the test split, once, for the chosen configuration (and dense, in the same pass)
    t0 = time.perf_counter()
    variant = s.variant(chosen)
    test_fig = None
    if test is not None:
        from ..engine.evaluate import evaluate_many

        bar = stage("test split (chosen and dense, once)", 1)
        ds = test() if callable(test) and not isinstance(test, Dataset) else test
        loader = DataLoader(ds, batch_size=eval_batch, shuffle=False, num_workers=workers)
        res = evaluate_many({"chosen": variant, "dense": s.dense}, loader, device, progress=False)
        bar.update()
        bar.close()
        test_fig = {"top1": res["chosen"].top1, "images": res["chosen"].n}
        dense_info.update(test_top1=res["dense"].top1, test_images=res["dense"].n)
    stages["test"] = time.perf_counter() - t0
    stages["total"] = time.perf_counter() - t_start
    msg = (f"{chosen.label}: held-out top-1 {chosen.top1:.2f}% (dense {dense_top1:.2f}%, drop {chosen.drop:.2f}), "
           f"speed-up {chosen.speedup:.2f}x ({runtime}, batch {batch})"
           + (f"; test top-1 {test_fig['top1']:.2f}% (dense {dense_info['test_top1']:.2f}%)" if test_fig else ""))
    say(f"chosen {msg}")
    settings = _settings(grids, runtime, amp, batch, device, seed, min_budget, tol, max_drop, target, s.n)
    return TuneResult(True, chosen, chosen, msg, list(s.trials.values()), dense_info, test_fig, stages, settings,
                      variant)


def _words(s: _Search, arm: tuple[str, dict[str, Any]], b: tuple[float | None, float | None]) -> str:
    good, _ = b
    if good is None:
        return "none meets it"
    t = s.trial(*arm, good, "")
    if t is None or not any(t.schedule):
        return "no reduction meets it"
    return f"budget {good:.3f}, schedule {t.schedule}" + (f", drop {t.drop:.2f} on {t.images} images"
                                                          if s.max_drop is not None else f", {t.speedup:.2f}x")


def _opts(o: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in o.items()) + ")" if o else "(defaults)"


def _contenders(s: _Search, boundaries: dict[str, tuple[tuple[str, dict[str, Any]], tuple[float | None, float | None]]],
                say: Callable[[str], None]) -> list[str]:
    """The methods whose stage-2 boundary is within reach of the best method's, which go on to the option search:
    with ``max_drop`` those at least :data:`PRUNE_SPEED` times as fast as the fastest boundary (timed together with
    dense), with ``target_speedup`` those within :data:`PRUNE_POINTS` of the most accurate (on the whole split). The
    others keep their stage-2 boundary, which still competes in the choice."""
    trials = {m: s.trial(*arm, good, "budget") for m, (arm, (good, _)) in boundaries.items() if good is not None}
    if len(trials) < 2:
        return list(trials)
    if s.max_drop is not None:
        reducing = [t for t in trials.values() if any(t.schedule)]
        if reducing:
            s.time(reducing, careful=True)
        speed = {m: (t.speedup if any(t.schedule) else 1.0) for m, t in trials.items()}
        best = max(speed.values())
        keep = [m for m, v in speed.items() if v >= PRUNE_SPEED * best]
        why = {m: f"{speed[m]:.2f}x at its boundary against {best:.2f}x" for m in trials if m not in keep}
    else:
        for t in trials.values():
            s.extend(t, s.n)
        best = max(t.top1 for t in trials.values())
        keep = [m for m, t in trials.items() if t.top1 >= best - PRUNE_POINTS]
        why = {m: f"top-1 {trials[m].top1:.2f}% at its boundary against {best:.2f}%" for m in trials if m not in keep}
    if why:
        say("options not searched for " + "; ".join(f"{m} ({w})" for m, w in why.items()))
    return keep


def _halve(s: _Search, method: str, settings: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """Successive halving of ``settings`` at ``budget``: all on a slice of the held-out split, the more accurate half
    (ties: the earlier setting) on twice as many images, until one is left."""
    alive = [(o, t) for o in settings if (t := s.trial(method, o, budget, "options")) is not None]
    if not alive:
        return settings[0]
    rungs = max(0, math.ceil(math.log2(len(alive))))
    n = max(1, s.n // 2 ** rungs) if rungs else s.n
    while len(alive) > 1:
        for _, t in alive:
            s.extend(t, n)
        ranked = sorted(range(len(alive)), key=lambda i: (-alive[i][1].top1, i))
        alive = [alive[i] for i in sorted(ranked[:math.ceil(len(alive) / 2)])]
        n = min(2 * n, s.n)
    return alive[0][0]


def _finalists(s: _Search, arms: list[tuple[str, dict[str, Any]]]) -> list[Trial]:
    """Per arm, the configuration nearest the limit that holds on the whole split: with ``max_drop`` the lowest
    budget whose drop the whole split keeps within it; with ``target_speedup`` the highest budget found fast enough,
    and the next one (for the final timing to choose from, should the first miss the speed-up there)."""
    out: list[Trial] = []
    for method, opts in arms:
        mine = [t for t in s.trials.values() if t.method == method and t.options == opts and any(t.schedule)
                and t.verdict]
        if s.max_drop is not None:
            for t in sorted(mine, key=lambda t: t.budget):
                s.extend(t, s.n)
                if t.drop <= s.max_drop + 1e-9:
                    out.append(t)
                    break
                t.verdict = False  # a raced decision the whole split reverses
        else:
            for t in sorted(mine, key=lambda t: -t.budget)[:2]:
                s.extend(t, s.n)
                out.append(t)
    return out


def _choose(s: _Search, finalists: list[Trial]) -> Trial | None:
    if s.max_drop is not None:
        fast = [t for t in finalists if t.speedup > 1.0]
        return max(fast, key=lambda t: (t.speedup, t.top1)) if fast else None
    fast = [t for t in finalists if t.speedup >= s.target]
    return max(fast, key=lambda t: (t.top1, t.speedup)) if fast else None


def _settings(grids, runtime, amp, batch, device, seed, min_budget, tol, max_drop, target, n) -> dict[str, Any]:
    return {"max_drop": max_drop, "target_speedup": target, "runtime": runtime, "amp": amp, "batch": batch,
            "device": str(device), "threads": torch.get_num_threads(), "seed": seed, "min_budget": min_budget,
            "tol": tol, "heldout_images": n, "space": grids, "race_z": RACE_Z}


def _finish_unmet(s: _Search, model, dense_top1, test, stages, t_start, grids, runtime, amp, batch, device, seed,
                  min_budget, tol, max_drop, target, say, progress, dense_info=None) -> TuneResult:
    """Nothing meets the constraint: the message and the best configuration found (no test split read)."""
    s.time_untimed()
    tried = [t for t in s.trials.values() if any(t.schedule)]
    best = None
    if target is not None:
        timed = [t for t in tried if not math.isnan(t.speedup)]
        best = max(timed, key=lambda t: t.speedup) if timed else None
        if best is not None:
            s.extend(best, s.n)
        what = (f"no configuration reaches a {target:g}x speed-up over dense on this machine ({runtime}, batch "
                f"{batch}, min budget {min_budget:g})")
        if best is not None:
            what += (f"; the fastest found: {best.label}, {best.speedup:.2f}x, held-out top-1 {best.top1:.2f}% "
                     f"(dense {dense_top1:.2f}%)")
    else:
        full = [t for t in tried if t.images == s.n] or tried
        best = min(full, key=lambda t: (t.drop, -t.budget)) if full else None
        within = [t for t in tried if t.verdict and t.images == s.n]
        if within:
            what = (f"no configuration within {max_drop:g} points of dense runs faster than dense on this machine "
                    f"({runtime}, batch {batch})")
        else:
            what = f"no token reduction keeps the held-out top-1 within {max_drop:g} points of dense"
        if best is not None:
            sp = f", speed-up {best.speedup:.2f}x" if not math.isnan(best.speedup) else ""
            what += (f"; the closest found: {best.label}, held-out top-1 {best.top1:.2f}% (dense {dense_top1:.2f}%, "
                     f"drop {best.drop:.2f} on {best.images} images){sp}")
    if best is not None:
        s.count(best)
    stages["total"] = time.perf_counter() - t_start
    say(what)
    dense_info = dense_info or {"heldout_top1": dense_top1, "images": s.n, "images_per_s": s.dense_speed}
    settings = _settings(grids, runtime, amp, batch, device, seed, min_budget, tol, max_drop, target, s.n)
    return TuneResult(False, None, best, what, list(s.trials.values()), dense_info, None, stages, settings, None)
