"""What an adapter is, the registry of adapters, and the patching steps every adapter shares.

An adapter knows one family of models: how to recognise it, describe it for the reducers (:class:`ViTInfo`), and
swap in and out the classes whose forward calls the reducer. The methods never see the family: they receive a
:class:`ViTInfo` and the attention building blocks of :mod:`leanvit.reduce.attention`. Adding a family is one new
module with a :class:`ModelAdapter` subclass decorated with :func:`register_adapter`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, ClassVar

import torch
from torch import nn

from ...analysis.macs import count_macs
from ...errors import ConfigError, UnsupportedModelError
from ...ops.schedule import block_macs, tokens_macs
from ..base import TokenReducer
from ..types import ViTInfo

REDUCER_ATTR = "_leanvit_reducer"
# set while a forward runs on images alone with no mask from the caller (an export): the attention masks a model
# builds for itself are then all-visible (see :func:`images_only`)
_IMAGES_ONLY = contextvars.ContextVar("leanvit_images_only", default=False)


@contextlib.contextmanager
def images_only():
    """Declare that the forwards inside are called on images alone, the caller passing no attention mask (what
    :func:`leanvit.export.export_onnx` does). transformers builds an all-visible mask for a mask-free call and,
    under ``torch.export``, cannot check its values, so it passes the mask to every layer instead of dropping it;
    inside this context a reducing layer knows that mask hides nothing and runs without it."""
    token = _IMAGES_ONLY.set(True)
    try:
        yield
    finally:
        _IMAGES_ONLY.reset(token)


def builtin_mask_only() -> bool:
    """Whether an attention mask a layer receives is one its model built for a mask-free call (see
    :func:`images_only`): true only while exporting inside that context."""
    return _IMAGES_ONLY.get() and torch.compiler.is_exporting()

ADAPTERS: list["ModelAdapter"] = []


def register_adapter(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
    """Class decorator: make ``cls`` one of the adapters :func:`find_adapter` asks, in registration order."""
    ADAPTERS.append(cls())
    return cls


def find_adapter(model: nn.Module) -> "ModelAdapter":
    """The adapter that claims ``model``; :class:`UnsupportedModelError` naming the supported families if none."""
    for adapter in ADAPTERS:
        if adapter.claims(model):
            return adapter
    families = "; ".join(a.describes for a in ADAPTERS)
    raise UnsupportedModelError(f"leanvit cannot patch {type(model).__name__}: it is not a timm VisionTransformer "
                                f"or another model family leanvit has an adapter for. Supported: {families}")


def get_reducer(model: nn.Module) -> TokenReducer | None:
    """The reducer of a patched model as the calling thread sees it (its ``schedule``, ``report``, ``trace_log``),
    or None.

    That is :meth:`TokenReducer.for_thread` of the reducer attached to the model: the attached reducer itself in the
    thread that patched (or unpickled, or deep-copied) the model, and in any other thread that thread's own copy,
    so ``trace_log``, ``cut_inputs`` and ``stats_summary()`` read the calling thread's last forward even while other
    threads run the model. The configuration (``schedule``, ``info``, the options) is the same object in all.
    """
    red = attached_reducer(model)
    return None if red is None else red.for_thread()


def attached_reducer(model: nn.Module) -> TokenReducer | None:
    """The reducer object attached to the model and its blocks, shared by every thread (for patching; forwards
    and readers of their state use :func:`get_reducer`)."""
    return model.__dict__.get(REDUCER_ATTR)


def is_patched(model: nn.Module) -> bool:
    return REDUCER_ATTR in model.__dict__


class ModelAdapter:
    """One family of models. Subclasses set ``describes`` and implement :meth:`claims`, :meth:`inspect`,
    :meth:`apply` and :meth:`remove`; :meth:`patch` (schedules from ``r``/``keep``/``budget``, the budget solved
    against measured MACs) is shared and may be overridden by a family whose reducers differ."""

    describes: ClassVar[str] = ""

    def claims(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def inspect(self, model: nn.Module) -> ViTInfo:
        """Check the model and describe it; raise :class:`UnsupportedModelError` naming what is not understood."""
        raise NotImplementedError

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        """Attach ``reducer`` (``model.__dict__[REDUCER_ATTR]``; its :meth:`TokenReducer.shared` one, never a
        thread's copy) and swap the classes; :meth:`remove` undoes it."""
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError

    def default_restore(self, model: nn.Module) -> bool:
        """Whether a patch gives the token grid back when ``restore`` is not given (feature wrappers do)."""
        return False

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """``(C, H, W)`` the model's MACs are counted at (None: :func:`~leanvit.analysis.macs.count_macs`' default,
        read from a timm model's pretrained config)."""
        return None

    # ------------------------------------------------------------------------------------- shared patching
    def patch(self, model: nn.Module, cls: type[TokenReducer], r: Any, budget: float | None, keep: Any,
              measure: bool, options: dict[str, Any], restore: bool = False) -> nn.Module:
        info = self.inspect(model)
        method = cls.name
        report: dict[str, Any] = {"method": method}
        if restore:  # set on the reducer before it is applied (budget= runs the patched model)
            report["restore"] = True
        if budget is not None:
            if "budget" not in cls.amounts:
                raise ConfigError(f"'{method}' does not take budget=; give "
                                  f"{' or '.join(a + '=' for a in cls.amounts)}")
            return self._patch_budget(model, cls, info, budget, measure, options, report)
        if keep is not None:
            schedule = cls.schedule_from_keep(keep, info, options)
            report.update(keep=keep)
        else:
            schedule = cls.schedule_from_r(r, info, options)
        reducer = build_reducer(cls, info, schedule, options)
        reducer.report.update(report, schedule=schedule, schedule_counts=cls.schedule_counts)
        reducer.restore = bool(report.get("restore"))
        self.apply(model, reducer)
        return model

    def _patch_budget(self, model: nn.Module, cls: type[TokenReducer], info: ViTInfo, budget: float, measure: bool,
                      options: dict[str, Any], report: dict[str, Any]) -> nn.Module:
        size = self.input_size(model)
        dense = int(count_macs(model, size).macs)
        other = dense - block_macs(info.blocks, [0] * info.depth, info.num_prefix, info.num_image)
        report.update(budget=budget, dense_macs=dense)
        target = budget
        # the schedule is solved from token counts; the method's own work (graph, matching, propagation) costs
        # MACs too, so tighten the target until the measured MACs of the patched model fit the budget
        for _ in range(8):
            try:
                schedule = cls.schedule_for_budget(target, info, other, options)
            except ConfigError:
                if target == budget:
                    raise
                # a target tightened for the method's own work failed: name the budget the caller gave
                raise ConfigError(f"budget {budget} cannot be reached by removing tokens once the work of "
                                  f"'{cls.name}' itself is counted; use a larger budget") from None
            reducer = build_reducer(cls, info, schedule, options)
            reducer.report.update(report, schedule=schedule, schedule_counts=cls.schedule_counts)
            reducer.restore = bool(report.get("restore"))
            self.apply(model, reducer)
            if not measure:
                return model
            reached = int(count_macs(model, size).macs)
            reducer.reset_stats()  # the counting forward is not an evaluation
            reducer.report.update(macs=reached, achieved=reached / dense)
            if reached <= budget * dense or target <= 0.05:
                return model
            self.remove(model)
            # the method's own MACs on top of the token-count model; aim that much lower
            analytic = (tokens_macs(info.blocks, reducer.block_tokens()) + other) / dense
            target = min(target - 1e-4, budget - (reached / dense - analytic))
        # every try was removed again: never hand back a silently unpatched model
        raise ConfigError(f"'{cls.name}' could not reach budget {budget}: its own work keeps the measured MACs above "
                          f"the target; use a larger budget or r=")


def build_reducer(cls: type[TokenReducer], info: ViTInfo, schedule: list[int], options: dict[str, Any]
                  ) -> TokenReducer:
    cls.check_schedule(schedule, info, options)
    return cls(info, schedule, **options)


def block_reducer(block: nn.Module, x: torch.Tensor) -> TokenReducer:
    """The reducer a patched block runs with, in every adapter: the calling thread's (every block, not just block
    0: the state of this forward is the calling thread's, see :class:`TokenReducer`), started at block 0 on the
    tokens ``x`` ``(B, N, C)``. A reducing schedule was solved for the model's native token count (its MACs hold only
    there), so another count is refused; a schedule that removes nothing is size-agnostic."""
    red = block._leanvit_reducer.for_thread()
    if block._leanvit_index == 0:
        n_img = x.shape[1] - red.info.num_prefix
        if n_img != red.info.num_image and red.reducing:
            raise UnsupportedModelError(
                f"the input gives {n_img} image tokens but the patch was set up for the model's "
                f"{red.info.grid[0]}x{red.info.grid[1]} grid ({red.info.num_image} tokens); token reduction "
                f"needs images of the model's native size (or patch with r=0)")
        red.training = block.training
        red.begin(x)
    return red
