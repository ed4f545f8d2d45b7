"""The reducer contract that every token-reduction method implements, and the state it keeps per forward pass.

A reducer is a plain object attached to the patched blocks (not an ``nn.Module``: it owns no parameters, so the
state dict of a patched model is the original one). A patched block ``i`` runs, around its own modules:

1. ``x = reducer.before_attn(i, x)`` (block 0 first calls :meth:`TokenReducer.begin`, at the start of every
   forward pass: ``forward``, ``forward_features`` and ``forward_intermediates`` alike);
2. ``attn = reducer.attend(i, block.attn, norm1(x))``: the method composes its attention from the building blocks
   of :mod:`leanvit.reduce.attention` (fused or explicit attention, a score of the map, the cls row, the keys, a
   size bias, a subset of the tokens) and returns an :class:`AttnOut` whose ``x`` is the attention's output and
   whose other fields carry what its :meth:`TokenReducer.reduce` reads;
3. the attention residual; when the attention computed a subset (``AttnOut.index``), only on those tokens;
4. ``x = reducer.reduce(i, x, attn)``, between attention and MLP (removal, merging, propagation);
5. the MLP residual, gated by the selection mask on a masked path;
6. ``x = reducer.after_mlp(i, x)``, and after the last block ``x = reducer.end(x)``.

Every hook but :meth:`TokenReducer.reduce` defaults to a no-op. A method that removes tokens also says where each
token went (:meth:`TokenReducer._moved`): which earlier token every remaining token continues, and which remaining
token took each removed token's features. From that the base class keeps, only when asked, every token's grid
position for rotary attention (``ViTInfo.rotary``) and every patch's owner for :meth:`TokenReducer.restore_grid`. A method also says what each block computes
(:meth:`TokenReducer.block_tokens`, which the MACs solver and ``tokens_per_block`` use), how it turns ``r=``,
``budget=`` and ``keep=`` into its schedule, and, when tracing, what happened to every patch in every block
(:data:`TOKEN_STATES`), which is all ``leanvit vis`` draws from. A new method is one new file with a
:class:`TokenReducer` subclass, decorated with :func:`leanvit.reduce.registry.register_method`.

The hooks keep their per-forward state on the reducer, one object shared by the model and its blocks; a forward
that runs while another is under way (threads serving one model, ``nn.DataParallel`` replicas) therefore runs on a
per-thread copy of it (:meth:`TokenReducer.for_thread`), which the patched blocks fetch in every block.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.schedule import (BlockTokens, cap_schedule, check_schedule, parse_schedule, per_block, removal_tokens,
                            solve_budget)
from . import attention
from .types import KEPT, MERGED, PROPAGATED, REMOVED, AttnOut, ViTInfo


class TokenReducer:
    """Base class of every method: by default removes ``schedule[i]`` image tokens after block i's attention.

    Args:
        info: the model description from the model's adapter (:mod:`leanvit.reduce.adapters`).
        schedule: the method's per-block schedule (removing methods: image tokens removed after block i's
            attention; idling: image tokens idle in block i). ``any(schedule)`` is true when the patch reduces.
        prop_attn: proportional attention, ``+ log(size_j)`` on the attention logits (ToMe, GTP token size).
        theta: attention sparsification keep ratio (GTP; 1 = off).
        trace: record what happened to every patch in every reducing block (:data:`TOKEN_STATES`) in
            ``trace_log`` (for ``leanvit vis``); costs a ``(B, N, N)`` tensor per block, so keep it off for timing.

    Class attributes a method sets: ``name`` (its key in ``METHODS``), ``display`` and ``summary`` (CLI help and
    plot labels), ``style`` (plot colour and marker), ``amounts`` (which of ``r``, ``budget``, ``keep`` it
    takes), ``max_fraction`` (largest share of a block's image tokens one block may remove),
    ``keeps_all_tokens`` (the output has every token, so ``forward_intermediates`` can be reshaped to NCHW),
    ``selects_subsets`` (blocks compute a selected subset of the tokens in attention and MLP; block kinds whose
    attention and MLP see different channels refuse it).

    Threads. The hooks keep a forward's state on the reducer (``_per_forward``: token sizes, the trace, a method's
    graph or selection, ``cut_inputs``), and one reducer serves every block, so two forwards at once would read and
    overwrite each other's: threads serving one model, and ``nn.DataParallel``, whose replicas share the reducer
    through their blocks' ``__dict__``. Every patched block therefore runs the reducer :meth:`for_thread` returns:
    the reducer itself in the thread that created (or unpickled, or deep-copied) it, and in any other thread a
    shallow copy of its own, made at that thread's first forward, which shares the configuration (``schedule``,
    ``info``, the options; read-only while forwards run) and has its own per-forward state and its own ``report``
    (diagnostic counters start at zero). ``get_reducer(model)`` returns the same object, so ``trace_log``,
    ``cut_inputs`` and :meth:`stats_summary` read the calling thread's last forward; a configuration change made
    after a thread's copy exists (``set_stats``, an attribute) reaches only the object it was made on. Patching
    and unpatching always handle the shared reducer (:meth:`shared`). A compiled forward (``torch.compile``) uses
    the reducer itself in every thread, since dynamo must not trace the thread machinery: one compiled model is not
    supported in several threads at once (compile one per thread, or serve from one thread).
    """

    name: ClassVar[str] = "base"
    display: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    style: ClassVar[tuple[str | None, str]] = (None, "o")
    amounts: ClassVar[tuple[str, ...]] = ("r", "budget")
    keep_help: ClassVar[str] = ""  # what keep= means, for methods that take it
    max_fraction: ClassVar[float] = 1.0
    keeps_all_tokens: ClassVar[bool] = False
    selects_subsets: ClassVar[bool] = False
    records_cut_inputs: ClassVar[bool] = False  # training forwards record ``cut_inputs`` for the token cut loss
    # what ``schedule[i]`` counts: image tokens "removed" after block i's attention (GTP, ToMe, EViT, truncate), or
    # image tokens "idle" in block i (IdleViT: not computed there, still present); shown with every schedule
    schedule_counts: ClassVar[str] = "removed"
    training: bool = False  # the patched model's mode in the current forward (set at block 0)

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
        self._state: torch.Tensor | None = None  # (B, N_img_orig) uint8 TOKEN_STATES code, when tracing
        self.trace_log: list[dict[str, torch.Tensor]] = []
        self.restore = False  # give the whole token grid back at the end (``patch(..., restore=True)``)
        self._bind_thread()

    # --------------------------------------------------------------- schedules (class methods: before building)
    @classmethod
    def schedule_from_r(cls, r: Any, info: ViTInfo, options: dict[str, Any]) -> list[int]:
        """The schedule of ``r=`` (an int, a per-block list or ToMe's ``(r, inflection)``).

        An int and ``(r, inflection)`` are capped per block at half the image tokens that reach the block (ToMe's
        rule, :func:`~leanvit.ops.schedule.cap_schedule`), the same for every method, so ``r=16`` runs on DeiT-B;
        the capped schedule is the one reported and run. A per-block list is taken as given and checked strictly.
        """
        if "r" not in cls.amounts:
            raise ConfigError(f"'{cls.name}' does not take r=; give {' or '.join(a + '=' for a in cls.amounts)}")
        sched = parse_schedule(r, info.depth)
        if per_block(r):
            return sched
        return cap_schedule(sched, info.num_image, cls.min_image_tokens(options))

    @classmethod
    def min_image_tokens(cls, options: dict[str, Any]) -> int:
        """The fewest image tokens a reducing block may leave (EViT's fused token needs one more)."""
        return 1

    @classmethod
    def schedule_from_keep(cls, keep: Any, info: ViTInfo, options: dict[str, Any]) -> list[int]:
        """The schedule of the method's own keep rate ``keep=`` (methods that have one)."""
        raise ConfigError(f"'{cls.name}' does not take keep=; give {' or '.join(a + '=' for a in cls.amounts)}")

    @classmethod
    def schedule_for_budget(cls, target: float, info: ViTInfo, other_macs: int, options: dict[str, Any]
                            ) -> list[int]:
        """The schedule whose analytic MACs (:meth:`block_tokens` costed) are the largest within ``target`` of the
        dense MACs; ``other_macs`` is the cost outside the blocks."""
        return solve_budget(target, info.blocks, info.num_prefix, info.num_image, other_macs, max_fraction=0.5)

    @classmethod
    def check_schedule(cls, schedule: list[int], info: ViTInfo, options: dict[str, Any]) -> None:
        """Raise ConfigError if the schedule cannot run on the model."""
        check_schedule(schedule, info.num_image, cls.max_fraction)

    @classmethod
    def schedule_tokens(cls, schedule: list[int], info: ViTInfo) -> list[BlockTokens]:
        """What each block computes under ``schedule`` (prefix tokens included)."""
        return removal_tokens(schedule, info.num_prefix, info.num_image)

    def block_tokens(self) -> list[BlockTokens]:
        """What each block of the patched model computes: the MACs solver and ``tokens_per_block`` use it."""
        return type(self).schedule_tokens(self.schedule, self.info)

    @property
    def reducing(self) -> bool:
        """Whether the patch changes anything (a zero schedule is the unpatched model)."""
        return any(self.schedule)

    @property
    def tracks_sizes(self) -> bool:
        """Whether a forward leaves token sizes (:meth:`current_sizes`), which size-weighted pooling reads."""
        return self.reducing and self.prop_attn

    # --------------------------------------------------------------- hooks called by the patched blocks
    def begin(self, x: torch.Tensor) -> None:
        """Reset per-forward state; ``x`` (B, N, C) is the input of block 0 (all tokens)."""
        self._size = None
        self.trace_log = []
        self._positions = self._holder = self._frozen = None  # None: no token has moved yet
        self._holders: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if self.trace:
            B, n = x.shape[0], self.info.num_image
            self.source = torch.eye(n, dtype=torch.bool, device=x.device).expand(B, n, n).clone()
            self._state = torch.full((B, n), KEPT, dtype=torch.uint8, device=x.device)

    def attend(self, i: int, attn: nn.Module, x: torch.Tensor) -> AttnOut:
        """Block i's attention on its normalised input ``x`` ``(B, N, C)``, composed from
        :mod:`leanvit.reduce.attention` (default: the whole attention with the size bias and the sparsification)."""
        return attention.dense(attn, x, self.size_bias(), self.theta)

    def before_attn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's input, before its attention (default: unchanged)."""
        return x

    def reduce(self, i: int, x: torch.Tensor, attn: AttnOut) -> torch.Tensor:
        """Between block i's attention residual and its MLP: remove, merge or propagate ``schedule[i]`` tokens."""
        r = self.schedule[i]
        if r == 0:
            return x
        if self.trace:
            self._trace_extra, self._passed = {}, None
        x = self._reduce(i, x, attn, r)
        if self.trace:
            self._trace_step(i, self._passed)
        self._record_owner(i)
        return x

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        raise NotImplementedError

    def after_mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's output, after its MLP residual (default: unchanged)."""
        return x

    def end(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output, before the final norm (default: unchanged; the whole grid with ``restore``).

        A method that overrides it calls ``super().end(x)`` last."""
        return self.restore_grid(x) if self.restore else x

    # --------------------------------------------------------------- where tokens went
    @property
    def tracking(self) -> bool:
        """Whether :meth:`_moved` keeps positions (rotary attention) or owners (``restore``)."""
        return self.info.rotary or self.restore

    def _moved(self, x: torch.Tensor, sources: torch.Tensor, dests: torch.Tensor) -> None:
        """Record a reduction of block i's image tokens (call only when :attr:`tracking`).

        Args:
            x: the tokens ``(B, P + n, C)`` before the reduction (prefix first); a patch whose features reach no
                token keeps its value here (:meth:`restore_grid`).
            sources: ``(B, m)`` for each image token after the reduction, the image token before it that it
                continues (its position), or -1 for a new token (EViT's fused token: no grid position).
            dests: ``(B, n)`` for each image token before the reduction, the image token after it that took its
                features (itself when kept, its merge destination, the fused token, GTP's strongest edge), or -1.
        """
        P, B = self.info.num_prefix, x.shape[0]
        if self.info.rotary:
            n = x.shape[1] - P
            pos = self._positions
            pos = pos[:, P:] if pos is not None else torch.arange(n, device=x.device).expand(B, n)
            img = torch.where(sources >= 0, pos.gather(1, sources.clamp_min(0)), self.info.num_image)
            self._positions = torch.cat([self._prefix_positions(B, x.device), img], dim=1)
        if self.restore:
            owner = self._holder
            if owner is None:  # every patch still owns its token
                owner = torch.arange(self.info.num_image, device=x.device).expand(B, -1)
            held = owner >= 0  # (B, N0) patches whose features are in a token
            at = owner.clamp_min(0)
            new = torch.where(held, dests.gather(1, at), -1)
            lost = held & (new < 0)  # (B, N0) lose their token in this block: keep their value here
            frozen = self._frozen if self._frozen is not None else x.new_zeros(B, self.info.num_image, x.shape[2])
            self._frozen = torch.where(lost[..., None], x[:, P:].gather(1, at[..., None].expand_as(frozen)), frozen)
            self._holder = new

    def _prefix_positions(self, B: int, device: torch.device) -> torch.Tensor:
        return torch.full((B, self.info.num_prefix), self.info.num_image, dtype=torch.long, device=device)

    def token_positions(self) -> torch.Tensor | None:
        """``(B, P + n)``: the grid position (row-major index into the input's patch grid) of every current token in
        this forward, ``info.num_image`` for a token without one (prefix tokens, EViT's fused token); None while no
        token has moved (prefix tokens, then the grid in order). Kept only for models with rotary attention.

        ToMe's merged token keeps its destination's position, GTP's and EViT's kept tokens their own."""
        return self._positions

    def _record_owner(self, i: int) -> None:
        """Keep the owner map of block i's output (after a reduction) for restoring it later
        (``forward_intermediates``); later blocks that reduce nothing share it."""
        if self.restore and self._holder is not None:
            self._holders[i] = (self._holder, self._frozen)

    def _owner_at(self, block: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        done = [i for i in self._holders if i <= block]
        return self._holders[max(done)] if done else (None, None)

    def restore_grid(self, x: torch.Tensor, block: int | None = None, norm: Any = None) -> torch.Tensor:
        """The whole token grid of ``x`` ``(B, P + n, C)`` (the last block's output, or block ``block``'s):
        ``(B, P + N0, C)`` in the input grid's order, every patch taking the features of the token that holds it
        (ToMe: its merge destination; GTP: the kept token its strongest edge reached; EViT: the fused token) and a
        patch whose features reached no token (GTP's orphans as published, EViT without fusing, truncation) its
        own value when it was removed (``norm``, if given, is applied to those values, as it was to ``x``).
        Needs ``restore`` on (``patch(..., restore=True)``)."""
        P = self.info.num_prefix
        return torch.cat([x[:, :P], self.restore_image(x[:, P:], block, norm)], dim=1)

    def restore_image(self, x: torch.Tensor, block: int | None = None, norm: Any = None) -> torch.Tensor:
        """:meth:`restore_grid` of the image tokens ``x`` ``(B, n, C)`` alone (no prefix tokens): ``(B, N0, C)``."""
        if not self.restore:
            raise ConfigError("restoring the token grid needs the patch made with restore=True")
        owner, frozen = (self._holder, self._frozen) if block is None else self._owner_at(block)
        if owner is None or x.shape[1] == self.info.num_image:  # nothing moved (or already restored)
            return x
        out = x.gather(1, owner.clamp_min(0)[..., None].expand(-1, -1, x.shape[2]))  # (B, N0, C)
        if frozen is not None:
            stale = frozen if norm is None else norm(frozen)
            out = torch.where((owner < 0)[..., None], stale.to(out.dtype), out)
        return out

    def size_bias(self) -> torch.Tensor | None:
        if self.prop_attn and self._size is not None:
            return self._size.log()
        return None

    def current_sizes(self) -> torch.Tensor | None:
        return self._size

    # --------------------------------------------------------------- tracing
    _trace_extra: dict[str, torch.Tensor] = {}
    _passed: torch.Tensor | None = None  # (B, N_img_orig) patches whose features a removal passed on
    # where tokens went in this forward (see _moved); class defaults until the first forward
    _positions: torch.Tensor | None = None
    _holder: torch.Tensor | None = None
    _frozen: torch.Tensor | None = None
    _holders: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _trace_step(self, i: int, passed: torch.Tensor | None, computed: int | None = None) -> None:
        """Append block i's trace record from ``self.source`` (updated by the method) and the previous states.

        A patch that still belongs to a token is ``kept`` or ``merged`` (its token stands for several patches);
        one that lost its token in this block is ``propagated`` where ``passed`` (its features reached a kept
        token; None: all did) and ``removed`` otherwise; a patch removed earlier keeps its state.
        """
        src = self.source  # (B, N_cur, N_orig)
        owned = src.any(1)
        group = (src.float() * src.sum(-1, keepdim=True).float()).amax(1)  # size of the token owning each patch
        prev = self._state
        newly = ~owned & (prev != PROPAGATED) & (prev != REMOVED)
        gone = torch.full_like(prev, PROPAGATED)
        if passed is not None:
            gone = torch.where(passed, gone, torch.full_like(prev, REMOVED))
        state = torch.where(owned, torch.where(group > 1, MERGED, KEPT).to(prev.dtype), prev)
        self._state = torch.where(newly, gone, state)
        tokens = torch.tensor(src.shape[1] if computed is None else computed)
        self.trace_log.append({"block": torch.tensor(i), "tokens": tokens, "source": src.clone(),
                               "state": self._state.clone(), **self._trace_extra})

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

    # --------------------------------------------------------------- threads
    _origin: TokenReducer | None = None  # on a thread's copy: the shared reducer it was copied from

    def _bind_thread(self) -> None:
        """Make the calling thread the one that uses this reducer itself, with no thread copies yet (at
        construction and unpickling; a subclass that does not call ``TokenReducer.__init__`` calls this)."""
        self._thread_lock = threading.Lock()
        self._threads: dict[int, tuple[threading.Thread, TokenReducer]] = {}
        self._origin = None
        self._owner = threading.get_ident()  # last: for_thread takes a reducer with an owner as fully bound

    def for_thread(self) -> TokenReducer:
        """The reducer the calling thread's forward must use: this one in the thread that owns it, else the
        thread's own shallow copy (made once per thread, see the class docs); this one while compiling."""
        if torch.compiler.is_compiling():  # before any thread machinery, which dynamo must not trace
            return self
        ident = threading.get_ident()
        owner = self.__dict__.get("_owner")
        if owner is None:  # a subclass that skipped TokenReducer.__init__: the first thread to run it owns it
            with _BIND_LOCK:
                if "_owner" not in self.__dict__:
                    self._bind_thread()
            owner = self._owner
        if ident == owner:
            return self
        thread = threading.current_thread()
        entry = self._threads.get(ident)
        if entry is not None and entry[0] is thread:  # a thread id can be reused once its thread has ended
            return entry[1]
        with self._thread_lock:
            local = copy.copy(self)  # __getstate__/__setstate__: shared configuration, fresh per-forward state
            local.report = dict(self.report)
            local.reset_stats()  # its counters count its own forwards
            local._origin = self
            # copies of ended threads go (nn.DataParallel starts new threads for every forward); the dict is
            # replaced, never changed in place, so threads reading it without the lock see a whole one
            live = {k: v for k, v in self._threads.items() if v[0].is_alive() and k != ident}
            self._threads = {**live, ident: (thread, local)}
        return local

    def shared(self) -> TokenReducer:
        """The reducer attached to the model: this one, or for a thread's copy the reducer it was copied from.

        Patching attaches and detaches this one, so that a thread's copy never becomes the model's reducer.
        """
        return self if self._origin is None else self._origin

    # --------------------------------------------------------------- pickling and copying
    # attributes that only live for one forward pass; not pickled or deep-copied with a model
    _per_forward: ClassVar[tuple[str, ...]] = ("_size", "source", "_state", "trace_log", "_trace_extra", "_passed",
                                               "_positions", "_holder", "_frozen", "_holders")
    # the calling thread's bookkeeping (a lock cannot be pickled); a copy is bound to the thread that makes it
    _per_thread: ClassVar[tuple[str, ...]] = ("_owner", "_thread_lock", "_threads", "_origin")

    def __getstate__(self) -> dict[str, Any]:
        skip = self._per_forward + self._per_thread
        # a snapshot first: another thread's forward may add attributes while this one copies
        return {k: v for k, v in self.__dict__.copy().items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._size, self.source, self._state, self.trace_log = None, None, None, []
        self.__dict__.setdefault("restore", False)  # pickled before restore existed
        self._bind_thread()


_BIND_LOCK = threading.Lock()  # binds reducers whose subclass skipped TokenReducer.__init__ (see for_thread)
