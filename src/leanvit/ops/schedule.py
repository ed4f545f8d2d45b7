"""Token-reduction schedules: how many image tokens each block removes, the tokens each block computes, and
solving a schedule for a MACs budget.

Every removing method (GTP, ToMe, EViT, the ideal truncation) takes the same schedule, so methods compared at one
budget run with exactly the same number of tokens in every block. Every method, idling included, describes its
work per block as :class:`BlockTokens`, which :func:`tokens_macs` costs, so all methods are costed by one model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError

ScheduleSpec = int | Sequence[int] | tuple[int, float]


def parse_schedule(r: ScheduleSpec, depth: int) -> list[int]:
    """Expand ``r`` into one count per block.

    Forms (as in ToMe):
        ``int``: the same number of tokens removed after every block's attention.
        ``list``: one count per block; a shorter list is padded with zeros. (Any 2-tuple is read as
            ``(r, inflection)``, as in ToMe; give per-block schedules as lists.)
        ``(r, inflection)``: ToMe's linear schedule with mean ``r``; ``inflection`` in [-1, 1] moves removal towards
            late (+) or early (-) blocks (-1 is ToMe's "decreasing schedule"): block i removes
            ``int(r_min + (r_max - r_min) * i / (depth - 1))`` tokens with ``r_min = int(r * (1 - inflection))``,
            ``r_max = 2r - r_min``, as in ToMe's ``parse_r``.

    The counts are not capped here; :func:`cap_schedule` caps the ``int`` and ``(r, inflection)`` forms per block
    as ToMe does, while a per-block list (:func:`per_block`) is the user's exact request and is checked strictly by
    :func:`check_schedule`.
    """
    if isinstance(r, bool):
        raise ConfigError(f"r must be an int, a per-block list or an (r, inflection) tuple, got {r!r}")
    if isinstance(r, int):
        sched = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2:
        base, inflection = int(r[0]), float(r[1])
        if not -1.0 <= inflection <= 1.0:
            raise ConfigError(f"inflection must be in [-1, 1], got {inflection}")
        lo = int(base * (1.0 - inflection))  # rounded first, as ToMe does, so the mean stays r
        hi = 2 * base - lo
        step = (hi - lo) / max(depth - 1, 1)
        sched = [int(lo + step * i) for i in range(depth)]
    elif isinstance(r, (list, tuple)):
        if len(r) > depth:
            raise ConfigError(f"schedule has {len(r)} entries but the model has {depth} blocks")
        sched = [int(v) for v in r] + [0] * (depth - len(r))
    else:
        raise ConfigError(f"r must be an int, a per-block list or an (r, inflection) tuple, got {r!r}")
    if any(v < 0 for v in sched):
        raise ConfigError(f"token counts to remove must be >= 0, got {sched}")
    return sched


def per_block(r: ScheduleSpec) -> bool:
    """Whether ``r`` is an explicit per-block schedule (a list, or a tuple that is not ``(r, inflection)``)."""
    return isinstance(r, (list, tuple)) and not (isinstance(r, tuple) and len(r) == 2)


def cap_schedule(sched: Sequence[int], num_image_tokens: int, min_left: int = 1) -> list[int]:
    """Cap every block's removal at half the image tokens that reach it, as ToMe caps ``r`` per block.

    ToMe (facebookresearch/ToMe, ``tome/merge.py``, ``bipartite_soft_matching``) caps ``r`` at
    ``(tokens - protected tokens) // 2`` in every block, so an ``r`` too large for late blocks (``r=16`` on
    DeiT-B's 196 tokens: 20 reach block 11) removes what is there to remove instead of failing. Here the same rule
    is applied to the schedule before building, so the schedule a patch reports is the one that runs, for every
    method. ``min_left`` is the fewest image tokens a block must leave (EViT's fused token needs one more).
    """
    out, n = [], num_image_tokens
    for r in sched:
        r = max(0, min(int(r), n // 2, n - min_left))
        out.append(r)
        n -= r
    return out


def check_schedule(sched: Sequence[int], num_image_tokens: int, max_fraction: float = 1.0) -> list[int]:
    """Token counts entering each block; raises ConfigError if the schedule removes more tokens than exist.

    ``max_fraction`` caps each block's removal at that fraction of its image tokens (0.5 for bipartite matching).
    Returns the image-token counts *before* each block, plus the final count (length ``depth + 1``).
    """
    counts = [num_image_tokens]
    for i, r in enumerate(sched):
        n = counts[-1]
        if r > int(n * max_fraction) or n - r < 1:
            limit = min(int(n * max_fraction), n - 1)
            raise ConfigError(
                f"block {i} cannot remove {r} tokens: only {n} image tokens reach it (at most {limit} can be removed "
                f"there); lower r or the budget")
        counts.append(n - r)
    return counts


@dataclass(frozen=True)
class BlockTokens:
    """The tokens one block computes (prefix tokens included).

    Attributes:
        attn: tokens whose queries, keys and values are computed and that attend to each other.
        mlp: tokens entering the MLP (fewer than ``attn`` when a method removes tokens after the attention).
        keys: tokens whose keys only are computed on top of ``attn`` (IdleViT scores idle tokens by their key).
    """

    attn: int
    mlp: int
    keys: int = 0


def removal_tokens(sched: Sequence[int], num_prefix: int, num_image: int) -> list[BlockTokens]:
    """:class:`BlockTokens` of a removal schedule: block i attends over the tokens that reach it and removes
    ``sched[i]`` of them before its MLP."""
    out, n = [], num_image
    for r in sched:
        out.append(BlockTokens(attn=n + num_prefix, mlp=n - r + num_prefix))
        n -= r
    return out


@dataclass(frozen=True)
class BlockShape:
    """What decides one block's MACs: width, attention width and the MLP's MACs per token."""

    dim: int
    attn_dim: int
    mlp_per_token: int

    def attn_macs(self, n: int) -> int:
        # qkv + proj linear layers, plus q @ k^T and attn @ v
        return n * self.dim * 3 * self.attn_dim + n * self.attn_dim * self.dim + 2 * n * n * self.attn_dim

    def mlp_macs(self, n: int) -> int:
        return n * self.mlp_per_token

    def macs(self, tokens: BlockTokens) -> int:
        """Analytic MACs of the block computing ``tokens`` (keys of idle tokens: one third of qkv for each)."""
        return self.attn_macs(tokens.attn) + tokens.keys * self.dim * self.attn_dim + self.mlp_macs(tokens.mlp)


def tokens_macs(shapes: Sequence[BlockShape], tokens: Sequence[BlockTokens]) -> int:
    """Analytic MACs of the blocks computing ``tokens`` (one entry per block)."""
    return sum(shape.macs(t) for shape, t in zip(shapes, tokens))


def block_macs(shapes: Sequence[BlockShape], sched: Sequence[int], num_prefix: int, num_image: int) -> int:
    """Analytic MACs of the blocks when block i removes ``sched[i]`` tokens between its attention and its MLP."""
    return tokens_macs(shapes, removal_tokens(sched, num_prefix, num_image))


def solve_budget(budget: float, shapes: Sequence[BlockShape], num_prefix: int, num_image: int, other_macs: int,
                 max_fraction: float = 0.5) -> list[int]:
    """The schedule whose MACs are the largest that do not exceed ``budget`` x dense MACs.

    Candidates are near-constant schedules ``[r + 1] * k + [r] * (depth - k)`` (removing earlier is cheaper), the
    form papers use, refined by ``k`` so that the budget is met closely on shallow models too. ``other_macs`` is
    the cost outside the blocks (patch embedding, head), which token reduction does not change.
    """
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget is the fraction of dense MACs to keep and must be in (0, 1], got {budget}")
    depth = len(shapes)
    dense = block_macs(shapes, [0] * depth, num_prefix, num_image) + other_macs
    target = budget * dense

    def fits(sched: list[int]) -> bool:
        return block_macs(shapes, sched, num_prefix, num_image) + other_macs <= target

    # 1) near-constant schedules, cheapest last: [r]*d, [r+1]+[r]*(d-1), ..., [r+1]*d
    r = 0
    while r <= num_image:
        feasible = False
        for k in range(depth):
            sched = [r + 1] * k + [r] * (depth - k)
            try:
                check_schedule(sched, num_image, max_fraction)
            except ConfigError:
                continue
            feasible = True
            if fits(sched):
                return sched
        if not feasible:
            break
        r += 1
    # 2) shallow models cannot reach low budgets with a constant r (late blocks run out of tokens): remove a fixed
    #    fraction f of the remaining image tokens in every block instead, f in steps of 1/1000
    for step in range(1, 1001):
        f = max_fraction * step / 1000
        sched, n = [], num_image
        for _ in range(depth):
            cut = min(int(n * f), n - 1)
            sched.append(cut)
            n -= cut
        if fits(sched):
            return sched
    raise ConfigError(
        f"budget {budget} cannot be reached by removing tokens (at most {max_fraction:.0%} of a block's image tokens "
        f"per block); use a larger budget")
