"""The reducer interface that every token-reduction method implements, and the state it keeps per forward pass.

A reducer is a plain object attached to the patched blocks (not an ``nn.Module``: it owns no parameters, so the
state dict of a patched model is the original one). Block 0 calls :meth:`TokenReducer.begin` at the start of
every forward pass (``forward``, ``forward_features`` and ``forward_intermediates`` alike), then each block calls
:meth:`TokenReducer.reduce` between its attention and its MLP.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .compat import AttnOut, ViTInfo


class TokenReducer:
    """Base class: removes ``schedule[i]`` image tokens after block i's attention.

    Args:
        info: the model description from :func:`~leanvit.reduce.compat.inspect_vit`.
        schedule: image tokens removed per block.
        prop_attn: proportional attention, ``+ log(size_j)`` on the attention logits (ToMe, GTP token size).
        theta: attention sparsification keep ratio (GTP; 1 = off).
        trace: record which original patches every token stands for after each block (for ``leanvit vis``);
            costs a ``(B, N, N)`` tensor per block, so keep it off for timing.
    """

    name: ClassVar[str] = "base"
    max_fraction: ClassVar[float] = 1.0  # largest share of a block's image tokens one block may remove
    tracks_sizes: ClassVar[bool] = False

    def __init__(self, info: ViTInfo, schedule: list[int], prop_attn: bool = False, theta: float = 1.0,
                 trace: bool = False):
        if not 0.0 < theta <= 1.0:
            raise ConfigError(f"theta (attention keep ratio) must be in (0, 1], got {theta}")
        self.info = info
        self.schedule = list(schedule)
        self.prop_attn = bool(prop_attn)
        self.theta = float(theta)
        self.trace = bool(trace)
        self.report: dict[str, Any] = {}
        self._size: torch.Tensor | None = None  # (B, N) token sizes incl. prefix, None = all ones
        self.source: torch.Tensor | None = None  # (B, N_img, N_img_orig) bool, when tracing
        self.trace_log: list[dict[str, torch.Tensor]] = []

    # --------------------------------------------------------------- hooks used by ReducingBlock
    def begin(self, x: torch.Tensor) -> None:
        """Reset per-forward state; ``x`` (B, N, C) is the input of block 0 (all tokens)."""
        self._size = None
        self.trace_log = []
        if self.trace:
            B, n = x.shape[0], self.info.num_image
            self.source = torch.eye(n, dtype=torch.bool, device=x.device).expand(B, n, n).clone()

    def size_bias(self) -> torch.Tensor | None:
        if self.prop_attn and self._size is not None:
            return self._size.log()
        return None

    def current_sizes(self) -> torch.Tensor | None:
        return self._size

    def needs_probs(self, i: int) -> bool:
        return False

    def score_fn(self, i: int):
        """A function from block i's attention probabilities ``(b, H, N, N)`` to token scores ``(b, N_img)``, or
        None. Cheaper than :meth:`needs_probs` when only a score is needed: the map is never held whole."""
        return None

    def needs_keys(self, i: int) -> bool:
        return False

    def needs_cls_probs(self, i: int) -> bool:
        return False

    def reduce(self, i: int, x: torch.Tensor, attn: AttnOut) -> torch.Tensor:
        r = self.schedule[i]
        if r == 0:
            return x
        x = self._reduce(i, x, attn, r)
        if self.trace:
            self.trace_log.append({"block": torch.tensor(i), "source": self.source.clone(), **self._trace_extra})
        return x

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        raise NotImplementedError

    _trace_extra: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------- diagnostics
    def set_stats(self, on: bool) -> None:
        """Turn a method's diagnostic counters on or off (and zero them); no-op for methods without any."""

    def reset_stats(self) -> None:
        """Zero the diagnostic counters (e.g. after a forward that was not an evaluation)."""

    def stats_summary(self) -> dict[str, float]:
        """The diagnostic counters since the last reset (GTP: lost tokens); empty when off or not supported."""
        return {}

    # --------------------------------------------------------------- helpers for subclasses
    def _sizes_or_ones(self, x: torch.Tensor) -> torch.Tensor:
        if self._size is None:
            return torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
        return self._size

    def options(self) -> dict[str, Any]:
        """The method's options, for reports."""
        return {"prop_attn": self.prop_attn, "theta": self.theta}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}(schedule={self.schedule}, {opts})"

    # attributes that only live for one forward pass; not pickled or deep-copied with a model
    _per_forward: ClassVar[tuple[str, ...]] = ("_size", "source", "trace_log", "_trace_extra")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._per_forward}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._size, self.source, self.trace_log = None, None, []
