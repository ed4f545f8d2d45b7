"""Recipes: a token-reduction patch as a small YAML file that a user can ship (``leanvit tune`` writes them).

A recipe holds what makes the patch (the method, its per-block schedule and its options) and the geometry of the
model it was made for (depth, token grid, prefix and image tokens), and carries beside them what was measured when
it was made (held-out and test accuracy, speed-up, runtime, batch, machine, library versions), which applying it
ignores. ``leanvit.patch(model, recipe="recipe.yaml")`` and ``--recipe FILE`` of the CLI verbs apply it:

* the schedule is applied as it is written, block by block (``r=[...]``; for a method that counts idle tokens and
  takes no ``r=``, as per-block keep ratios, ``keep=[...]``), so a recipe gives exactly the patch it was made from,
  whatever this version of leanvit would solve for the budget it was tuned at; the patched schedule is checked
  against the recipe's and a difference is refused;
* a model of another geometry (another depth, grid or number of prefix tokens) is refused: a per-block schedule
  only means something on the model it was tuned on. The model's *name* is not checked (the same weights may be
  created under another name, or from a timm model of the same shape); the CLI names both when they differ.

The file is plain YAML read with ``yaml.safe_load`` (no tags, no code); keys other than the ones below are kept on a
round trip and never read.

Example::

    format: leanvit-recipe/1
    method: tome
    schedule: [26, 25, 25, 25, 25, 25]
    schedule_counts: removed
    options: {prop_attn: true}
    model: {name: leanvit_vit_fm_teacher, depth: 6, grid: [14, 14], prefix_tokens: 1, image_tokens: 196}
    heldout: {top1: 89.62, dense_top1: 89.96, ...}
    speed: {speedup: 1.52, runtime: eager, batch: 32, ...}
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write_text
from .adapters import find_adapter, get_reducer
from .base import TokenReducer
from .registry import METHODS, check_options, method_options
from .types import ViTInfo

FORMAT = "leanvit-recipe/1"
# the keys applying a recipe reads; everything else in the file is the record of how it was made
_CORE = ("format", "method", "schedule", "schedule_counts", "options", "model")
# the model geometry a schedule depends on, as written in the file, and how it is read from the model
_GEOMETRY = {"depth": lambda i: i.depth, "grid": lambda i: list(i.grid), "prefix_tokens": lambda i: i.num_prefix,
             "image_tokens": lambda i: i.num_image}
# options that only switch diagnostics on (they do not change the output): never written to a recipe
_DIAGNOSTIC_OPTIONS = ("trace", "stats")


@dataclass
class Recipe:
    """A token-reduction patch and the model geometry it fits.

    Attributes:
        method: a key of :data:`~leanvit.reduce.METHODS`.
        schedule: the reducer's per-block schedule (what it counts: ``schedule_counts``).
        options: the method's options (only the ones its constructor declares).
        model: ``name`` (as given when the recipe was made, may be None), ``weights`` (the weights file, if any) and
            the geometry: ``depth``, ``grid``, ``prefix_tokens``, ``image_tokens``.
        schedule_counts: ``removed`` (image tokens removed after block i's attention) or ``idle`` (image tokens not
            computed in block i).
        record: everything else in the file (measurements, versions, machine), kept as read.
        source: the file it was read from (None for one made in memory).
    """

    method: str
    schedule: list[int]
    options: dict[str, Any]
    model: dict[str, Any]
    schedule_counts: str = "removed"
    record: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The file's content: the core keys first, then the record."""
        core = {"format": FORMAT, "method": self.method, "schedule": list(self.schedule),
                "schedule_counts": self.schedule_counts, "options": dict(self.options), "model": dict(self.model)}
        return {**core, **{k: v for k, v in self.record.items() if k not in core}}

    def words(self) -> str:
        """The patch in a few words: ``tome, schedule [26, 25, ...]``."""
        return f"{self.method}, schedule {list(self.schedule)}"


def model_geometry(model: nn.Module) -> dict[str, Any]:
    """The geometry a schedule depends on, as a recipe writes it (``depth``, ``grid``, ``prefix_tokens``,
    ``image_tokens``). Raises UnsupportedModelError for a model no adapter knows."""
    info = find_adapter(model).inspect(model)
    return {k: get(info) for k, get in _GEOMETRY.items()}


def _recipe_options(red: TokenReducer) -> dict[str, Any]:
    """The reducer's options that its constructor declares (``options()`` also reports some a method does not take,
    e.g. ``theta`` of ToMe), without the diagnostic switches."""
    declared = method_options(red.name)
    return {k: v for k, v in red.options().items() if k in declared and k not in _DIAGNOSTIC_OPTIONS}


def recipe_of(model: nn.Module, name: str | None = None, weights: str | None = None, **record: Any) -> Recipe:
    """The recipe of a patched model: its reducer's method, schedule and options, the model's geometry, and
    ``record`` (any measurements to keep beside them, written as given).

    Raises:
        ConfigError: the model is not patched.
    """
    red = get_reducer(model)
    if red is None:
        raise ConfigError("the model is not patched: a recipe records a token-reduction patch (leanvit.patch first)")
    return Recipe(method=red.name, schedule=[int(s) for s in red.schedule], options=_recipe_options(red),
                  model={"name": name, "weights": weights, **model_geometry(model)},
                  schedule_counts=red.schedule_counts, record=dict(record))


def _fail(where: str, why: str) -> ConfigError:
    return ConfigError(f"recipe {where}: {why}")


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """A :class:`Recipe` from the mapping a recipe file holds, every core key checked (``source`` names the file in
    errors)."""
    where = source or "(in memory)"
    if not isinstance(data, dict):
        raise _fail(where, "must hold a mapping of key: value (is it a leanvit recipe?)")
    if data.get("format") != FORMAT:
        got = data.get("format")
        raise _fail(where, f"format is {got!r}, this leanvit reads '{FORMAT}'" if got is not None else
                    f"has no 'format: {FORMAT}' line; is it a leanvit recipe (written by leanvit tune)?")
    missing = [k for k in _CORE if k not in data]
    if missing:
        raise _fail(where, f"has no {', '.join(missing)}")
    method = data["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise _fail(where, f"method {method!r} is not one of {', '.join(METHODS)}")
    schedule = data["schedule"]
    if not (isinstance(schedule, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in schedule)):
        raise _fail(where, f"schedule must be a list of token counts >= 0, one per block, got {schedule!r}")
    options = data["options"] if data["options"] is not None else {}
    if not isinstance(options, dict):
        raise _fail(where, f"options must be a mapping, got {options!r}")
    try:
        options = check_options(method, options)
    except ConfigError as e:
        raise _fail(where, str(e)) from None
    model = data["model"]
    if not isinstance(model, dict) or any(k not in model for k in _GEOMETRY):
        raise _fail(where, f"model must give the geometry the schedule was made for ({', '.join(_GEOMETRY)})")
    counts = data["schedule_counts"]
    if counts != METHODS[method].schedule_counts:
        raise _fail(where, f"schedule_counts is {counts!r}, but a '{method}' schedule counts "
                           f"'{METHODS[method].schedule_counts}' tokens")
    record = {k: v for k, v in data.items() if k not in _CORE}
    return Recipe(method=method, schedule=list(schedule), options=options, model=dict(model),
                  schedule_counts=counts, record=record, source=source)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file (:class:`ConfigError` naming the file for anything that is not a recipe)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise _fail(str(p), f"is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(str(p), f"cannot be read: {e}") from None
    return recipe_from_dict(data, source=str(p))


def write_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write ``recipe`` as YAML, atomically, with a comment that says how to apply it; returns the path."""
    p = Path(path)
    head = ("# leanvit recipe: apply with leanvit.patch(model, recipe=\"" + p.name + "\") or --recipe "
            + p.name + "\n# method, schedule, schedule_counts, options and model are applied; the rest records how "
              "it was made\n")
    body = yaml.safe_dump(_plain(recipe.as_dict()), sort_keys=False, default_flow_style=None, width=120)
    atomic_write_text(p, head + body)
    return p


def _plain(obj: Any) -> Any:
    """What safe YAML writes: mappings, lists and plain scalars (a ``str`` subclass such as ``torch.__version__``,
    a tuple, a numpy number become their plain form); anything else is refused rather than written as a tag."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bool):
        return bool(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _plain(obj.item())
    if isinstance(obj, (int, float)):
        return float(obj) if isinstance(obj, float) else int(obj)
    raise ConfigError(f"a recipe holds plain values (numbers, strings, lists, mappings); got {type(obj).__name__}")


def as_recipe(recipe: Recipe | dict | str | os.PathLike) -> Recipe:
    """A :class:`Recipe` from a recipe, the mapping of one, or a file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return read_recipe(recipe)
    raise ConfigError(f"recipe must be a file path, a Recipe or its mapping, got {type(recipe).__name__}")


def _geometry_words(geo: dict[str, Any]) -> str:
    grid = geo.get("grid")
    grid = f"{grid[0]}x{grid[1]}" if isinstance(grid, (list, tuple)) and len(grid) == 2 else str(grid)
    prefix = geo.get("prefix_tokens")
    return f"depth {geo.get('depth')}, grid {grid}, {prefix} prefix token{'' if prefix == 1 else 's'}"


def check_recipe(recipe: Recipe, model: nn.Module) -> ViTInfo:
    """Refuse a recipe made for a model of another geometry; returns the model's :class:`ViTInfo`."""
    info = find_adapter(model).inspect(model)
    have = {k: get(info) for k, get in _GEOMETRY.items()}
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.model.items() if k in _GEOMETRY}
    if have != want:
        made = recipe.model.get("name") or "another model"
        raise ConfigError(
            f"recipe {recipe.source or '(in memory)'} was made for {made} ({_geometry_words(want)}) and this model "
            f"({type(model).__name__}) has {_geometry_words(have)}: a recipe's per-block schedule only fits the "
            f"model it was tuned on; run leanvit tune on this model")
    if len(recipe.schedule) != info.depth:
        raise _fail(recipe.source or "(in memory)", f"schedule has {len(recipe.schedule)} entries for a model of "
                                                    f"depth {info.depth}")
    return info


def schedule_amount(method: str, schedule: list[int], info: ViTInfo) -> dict[str, Any]:
    """The ``r=`` or ``keep=`` that gives ``schedule`` block by block: the schedule itself for a method that takes
    ``r=``; for one that counts idle tokens and takes only ``keep=``, the per-block share of image tokens each block
    computes (``(N - idle) / N``, which the method turns back into the same counts)."""
    cls = METHODS[method]
    if "r" in cls.amounts:
        return {"r": [int(s) for s in schedule]}
    if "keep" in cls.amounts and cls.schedule_counts == "idle":
        n = info.num_image
        return {"keep": [(n - s) / n for s in schedule]}
    raise ConfigError(f"'{method}' takes neither a per-block r= nor per-block keep ratios, so its schedule cannot be "
                      f"given block by block")


def recipe_amount(recipe: Recipe, info: ViTInfo) -> dict[str, Any]:
    """The ``r=`` or ``keep=`` that gives the recipe's schedule block by block (:func:`schedule_amount`)."""
    return schedule_amount(recipe.method, recipe.schedule, info)


def check_applied(recipe: Recipe, red: TokenReducer | None) -> None:
    """The patch that was applied must run the recipe's schedule exactly."""
    if red is None or list(red.schedule) != list(recipe.schedule):
        got = None if red is None else list(red.schedule)
        raise ConfigError(f"recipe {recipe.source or '(in memory)'}: '{recipe.method}' ran schedule {got} instead of "
                          f"the recipe's {list(recipe.schedule)}")
