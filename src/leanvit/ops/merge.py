"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023), as pure tensor functions.

All tokens, prefix tokens included, are split alternately into sets A (even positions) and B (odd positions), as
in the authors' code (facebookresearch/ToMe, ``tome/merge.py``, ``bipartite_soft_matching``). The first
``protected`` tokens (cls, dist, registers) keep their places in the alternation but are never matched: a
protected A token merges into nothing and no token merges into a protected B token. Every other A token finds its
most cosine-similar unprotected B token, and the ``r`` most similar pairs are merged into their B token. Matching
returns a ``merge`` function so that features, sizes and provenance are merged with one shared assignment.
"""
from __future__ import annotations

from typing import Callable

import torch

from .select import ascending, batch_rows, descending_order, flat_rows, take_rows

Merge = Callable[..., torch.Tensor]


class _Identity:
    """The plan of a matching that merges nothing."""

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        return x

    def sources(self, T: int, B: int, device: torch.device) -> torch.Tensor:
        return torch.arange(T, device=device).expand(B, T)

    destinations = sources


class BipartiteMerge:
    """A planned bipartite merge: call it on ``(B, T, C)`` to merge (see :func:`bipartite_soft_matching`); its
    :meth:`sources` and :meth:`destinations` say where every token went (for token positions and grid restores)."""

    def __init__(self, protected: int, pa: int, pb: int, r: int, unm: torch.Tensor, src: torch.Tensor,
                 dst: torch.Tensor):
        self.protected, self.pa, self.pb, self.r = protected, pa, pb, r
        # (B, Na - r) unmerged A tokens, (B, r) merged A tokens, (B, r) their destinations among the unprotected
        # B tokens
        self.unm, self.src, self.dst = unm, src, dst

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        pa, pb, r = self.pa, self.pb, self.r
        xa, xb = x[:, 2 * pa::2], x[:, 2 * pb + 1::2]  # (B, Na, C), (B, Nb, C): the unprotected tokens of each set
        n, na, c = xa.shape
        unm = xa.gather(1, self.unm[..., None].expand(n, na - r, c))  # (B, Na - r, C)
        src = xa.gather(1, self.src[..., None].expand(n, r, c))  # (B, r, C)
        xb = xb.scatter_reduce(1, self.dst[..., None].expand(n, r, c), src, reduce=mode)  # (B, Nb, C)
        return torch.cat([x[:, :self.protected], unm, xb], dim=1)  # (B, T - r, C)

    def weighted(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average merge of ``x (B, T, C)`` with sizes ``size (B, T, 1)``: ``(B, T - r, C)`` and the
        summed sizes ``(B, T - r, 1)``, the tokens in the order of ``self(x)``.

        What differs from ToMe's ``merge_wavg`` (``merge(x * size) / merge(size)``), and why: ToMe scales every
        token by its size, gathers the unmerged A tokens with an index expanded over the channels (slow on CPU),
        scatters the merged ones into a copy of the B tokens and concatenates: about five passes over ``x`` per
        block. Here the output is one row gather of ``x`` (every token that stays, in output order), and only the
        rows that merged tokens land in are changed, by ``sum_j s_j (x_j - x_b) / (s_b + sum_j s_j)``, which is
        ToMe's ``(s_b x_b + sum_j s_j x_j) / (s_b + sum_j s_j)`` up to rounding: the rest of the work touches ``r``
        rows, not the ``T / 2`` B tokens. A token that takes no other keeps ``x`` itself, where ToMe computes
        ``(s x) / s``: equal up to one rounding."""
        if torch.compiler.is_exporting():
            return self._weighted_exported(x, size)
        B, T, C = x.shape
        n = T - self.r
        first_b = self._first_b(T)
        keep = flat_rows(self.sources(T, B, x.device), T)  # (B * n) input rows of the output tokens
        src = flat_rows(2 * (self.pa + self.src), T)  # (B * r) input rows merged away
        dst_in = flat_rows(2 * (self.pb + self.dst) + 1, T)  # (B * r) input rows of their destinations
        dst = flat_rows(first_b + self.dst, n)  # (B * r) output rows of their destinations
        s_in, x_in = size.reshape(B * T, 1), x.reshape(B * T, C)
        s_src = s_in.index_select(0, src)  # (B * r, 1)
        s_new = s_in.index_select(0, keep).index_add_(0, dst, s_src)  # (B * n, 1) summed sizes
        out = x_in.index_select(0, keep)  # (B * n, C)
        x_b = x_in.index_select(0, dst_in)  # (B * r, C) the destinations before merging
        # x_b + sum_j s_j (x_j - x_b) / (s_b + sum_j s_j), which is ToMe's average: one index_add of the r merged
        # tokens, which sums a destination's sources (and their gradients) however many there are
        out.index_add_(0, dst, (x_in.index_select(0, src) - x_b) * (s_src / s_new.index_select(0, dst)))
        return out.view(B, n, C), s_new.view(B, n, 1)

    def _weighted_exported(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`weighted` as exported (inference only): no scatter into the output. ONNX Runtime runs a scatter as
        a copy of the whole tensor it writes into (slower than the gather that made it), so the merged rows are
        appended to the input rows and the output is one gather from them, whose index points each destination at
        its merged row. ``same`` ``(B, r, r)`` says which merged tokens share a destination; its products with the
        merged tokens give each the sum over its destination's sources (the same sums as ToMe's, in another order:
        rounding), so a destination that several of them name gets the same row from each."""
        B, T, C = x.shape
        r = self.r
        first_b = self._first_b(T)
        j = self.dst
        s_in, x_in = size.reshape(B * T, 1), x.reshape(B * T, C)
        src = batch_rows(2 * (self.pa + self.src), T)  # (B, r) input rows merged away
        dst_in = batch_rows(2 * (self.pb + j) + 1, T)  # (B, r) input rows of their destinations
        s_src, s_b = take_rows(s_in, src), take_rows(s_in, dst_in)  # (B, r, 1)
        same = (j[:, :, None] == j[:, None, :]).to(x.dtype)
        s_tot = s_b + same @ s_src  # (B, r, 1) each destination's summed size
        x_tot = take_rows(x_in, dst_in) * s_b + same @ (take_rows(x_in, src) * s_src)  # (B, r, C)
        # the output's input rows, each destination's replaced by its merged row (appended after the B * T rows)
        merged = B * T + torch.arange(B * r, device=x.device).view(B, r)
        rows = batch_rows(self.sources(T, B, x.device), T).scatter(1, first_b + j, merged)  # (B, T - r)
        out = take_rows(torch.cat([x_in, (x_tot / s_tot).view(B * r, C)]), rows)
        return out, take_rows(torch.cat([s_in, s_tot.view(B * r, 1)]), rows)

    def _first_b(self, T: int) -> int:
        """The output position of the first unprotected B token (after the protected and the unmerged A tokens)."""
        return self.protected + len(range(2 * self.pa, T, 2)) - self.r

    def sources(self, T: int, B: int, device: torch.device) -> torch.Tensor:
        """``(B, T - r)``: the position among the ``T`` input tokens of each output token (a merged token is its
        B-set destination, which it continues)."""
        a = 2 * (self.pa + self.unm)  # (B, Na - r) input positions of the unmerged A tokens
        b = torch.arange(2 * self.pb + 1, T, 2, device=device).expand(B, -1)  # (B, Nb) the B tokens
        return torch.cat([torch.arange(self.protected, device=device).expand(B, -1), a, b], dim=1)

    def destinations(self, T: int, B: int, device: torch.device) -> torch.Tensor:
        """``(B, T)``: the output token each input token's features went to (itself, or its merge destination)."""
        P, pa, pb = self.protected, self.pa, self.pb
        na = len(range(2 * pa, T, 2))
        nb = len(range(2 * pb + 1, T, 2))
        first_b = self._first_b(T)
        dest_a = torch.empty(B, na, dtype=torch.long, device=device)
        dest_a.scatter_(1, self.unm, torch.arange(P, first_b, device=device).expand(B, -1))
        dest_a.scatter_(1, self.src, self.dst + first_b)
        out = torch.empty(B, T, dtype=torch.long, device=device)
        out[:, :P] = torch.arange(P, device=device)
        out[:, 2 * pa::2] = dest_a
        out[:, 2 * pb + 1::2] = torch.arange(first_b, first_b + nb, device=device)
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0, keep_order: bool = False) -> Merge:
    """Plan merging ``r`` tokens away.

    Args:
        metric: token descriptors ``(B, T, D)`` of all tokens, prefix tokens first (ToMe: the keys averaged over
            heads); compared by cosine similarity.
        r: tokens to remove; capped at ``(T - protected) // 2`` as in ToMe, so that the unprotected tokens of
            either set always suffice.
        protected: the first ``protected`` tokens are never merged (ToMe protects its cls token, at A[0], and its
            dist token, at B[0]).
        keep_order: put the unmerged A tokens back in their original order (ToMe does when there is a cls token,
            so that the next block's alternation sees the tokens in the same order); otherwise they stay in the
            order of their best match, most similar first, as in ToMe without a cls token.

    Returns:
        a :class:`BipartiteMerge`, ``merge(x, mode)`` mapping ``(B, T, C)`` to ``(B, T - r, C)``: the protected
        tokens in their order, then the unmerged A tokens, then every B token; ``mode`` is ``"sum"`` (for
        size-weighted averages: merge ``x * size`` and ``size`` with sum, then divide) or ``"amax"`` (provenance).
    """
    T = metric.shape[1]
    r = min(r, (T - protected) // 2)
    if r <= 0:
        return _Identity()
    pa, pb = (protected + 1) // 2, protected // 2  # protected tokens in A (positions 0, 2, ..) and in B (1, 3, ..)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, T, D)
        # (B, Na, D), (B, Nb, D): the unprotected tokens of each set (one slice each: one graph node exported)
        a, b = m[:, 2 * pa::2], m[:, 2 * pb + 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarity
        best_val, best_b = scores.max(dim=-1)  # (B, Na): every A token's most similar B token
        order = descending_order(best_val, -1)  # (B, Na), most similar first
        unm = order[:, r:]  # (B, Na - r) A tokens that stay
        src = order[:, :r]  # (B, r) A tokens merged away
        dst = best_b.gather(1, src)  # (B, r) their B partners
        if keep_order:
            unm = ascending(unm, 1)  # (B, Na - r) in original order
    return BipartiteMerge(protected, pa, pb, r, unm, src, dst)


def merge_weighted(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x (B, T, C)`` with token sizes ``size (B, T, 1)``; sizes are summed.

    A :class:`BipartiteMerge` does it with :meth:`BipartiteMerge.weighted`, which rewrites only the merged rows;
    any other plan (the identity) as ToMe writes it, ``merge(x * size) / merge(size)``."""
    if isinstance(merge, BipartiteMerge):
        return merge.weighted(x, size)
    x = merge(x * size, "sum")  # (B, T - r, C)
    size = merge(size, "sum")  # (B, T - r, 1)
    return x / size, size
