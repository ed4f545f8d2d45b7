"""GTP: graph-based token propagation (Xu et al., "GTP-ViT", WACV 2024). Training-free.

After each block's attention, the image tokens that score lowest pass their features along a token graph to their
kept neighbours, ``x_kept += alpha * A_hat[kept, removed] @ x_removed``, and are removed; the MLP and later blocks
run on the kept tokens. The graph (spatial 8-neighbourhood, semantic k-NN, or their union) is built once per
forward from the tokens entering block 0 and restricted to the kept tokens after every block.

Where we differ from the authors' code (Ackesnal/GTP-ViT): the graph is built on the input's device (theirs is
hard-coded to CUDA); a block with nothing to remove is a no-op (theirs drops every token for P = 0); no debug file
is written during propagation; distillation and register tokens are prefix tokens and never propagated; tokens
lost because they had no kept neighbour are counted in ``report["lost_tokens"]`` instead of logged to a file.

Beyond the paper, ``orphans`` chooses what happens to such a token (an orphan). As published (``drop``) its features
and size are lost; on small models, whose low-scoring tokens resemble each other and are removed neighbourhood by
neighbourhood, that is a large share of the removed tokens (BENCHMARKS.md). ``nearest`` and ``merge`` keep every
removed token's information: the orphan goes to its most cosine-similar kept token, by a fallback edge or by a merge.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.graph import GRAPHS, build_graph, fallback_edges, spatial_adjacency
from ..ops.fused_score import FUSABLE, fused_score
from ..ops.select import SCORES, cls_score, combine_scores, diag_colsum, gather_tokens, split_topk, take_rows
from . import attention
from .attention import label
from .base import TokenReducer
from .registry import register_method
from .types import AttnOut, ViTInfo

ORPHANS = ("drop", "nearest", "merge")
SCORE_PATHS = ("auto", "fused", "explicit")


@register_method
class GTPReducer(TokenReducer):
    """Graph-based token propagation.

    Args:
        graph: ``mixed`` (spatial + semantic, recommended), ``spatial`` or ``semantic``.
        k: neighbours per token in the semantic graph.
        score: selection score, ``mixed`` (diagonal x column sum, max over heads; recommended), ``mixed_mean``,
            ``cls``, ``colsum``, ``diag`` or ``random``. ``cls`` and ``random`` keep fused attention (SDPA); the
            others need the attention map, computed explicitly (slower on CPU, see BENCHMARKS.md).
        alpha: propagation coefficient (the paper's DeiT settings use 0.1-0.4).
        prop_attn: token sizes with proportional attention (recommended).
        theta: attention sparsification keep ratio (1 = off).
        orphans: what becomes of a removed token with no kept neighbour in the (restricted) graph, an orphan:

            * ``drop`` (the paper): nothing reaches a kept token; its features and size are lost.
            * ``nearest``: a fallback edge joins it to its most cosine-similar kept token (on the tokens at the
              reduction point), weighted like its strongest edge in the graph (its largest entry of ``A_hat``:
              ``1/k`` on the semantic graph), and it is propagated along that edge like any other, ``alpha``
              and token size included. Pure graph propagation with one edge more per orphan.
            * ``merge``: after propagation it is merged into its most similar kept token as ToMe merges, by a
              size-weighted average, its size added whole (sizes of 1 without ``prop_attn``).

            Cost, per reducing block and image: ``r * K * C`` MACs for the similarity of the ``r`` removed to the
            ``K`` kept tokens, counted in the MACs a budget is held to (a fraction of a percent of the dense MACs;
            figures in BENCHMARKS.md, "Design measurements behind code defaults"), ``merge`` as much again for the
            merge itself; a dozen small kernels, and for ``nearest`` one pass over the graph per forward. No host sync
            and fixed shapes, so the forward still compiles as one graph. The default is ``drop``, the paper's
            rule, so that ``gtp`` stays the published method; ``benchmarks/gtp_nolost.py`` measures the others.
        score_path: how the attention scores (``mixed``, ``mixed_mean``, ``colsum``, ``diag``) are computed, to the
            same values: ``fused``, the attention on the fused kernel and the score from its own pass over the
            queries and keys, never writing the attention map (:mod:`leanvit.ops.fused_score`; Triton kernels on
            CUDA); ``explicit``, the attention map computed explicitly (a slice of the batch at a time on CPU) and
            scored; ``auto`` (default), fused on CUDA and explicit on CPU, where it is faster (see that module's
            docs). With ``theta < 1`` the map is always explicit.
        stats: count removed tokens whose features reached no kept token (lost; with ``drop``, the orphans) in
            ``report["lost_tokens"]`` / ``report["removed_tokens"]``, summed over the forwards since the last
            :meth:`set_stats` / :meth:`reset_stats` (a few extra ops per block, so off by default; the keys are absent
            from the report while it is off). ``leanvit eval`` and ``leanvit compare`` turn it on for their
            evaluation only; the MACs-counting forward of ``budget=`` is not counted.
    """

    name = "gtp"
    display = "GTP"
    score_path = "auto"  # class defaults for reducers pickled before these options existed
    _cuda = False
    _seed: int | None = None  # score="random": the seed of the reducer's own generator (None: torch's global RNG)
    _generator: torch.Generator | None = None
    summary = "graph-based token propagation (training-free)"
    style = ("tab:red", "o")
    _per_forward = TokenReducer._per_forward + ("graph", "index", "_batch", "_prefix_rows", "_graph_flat",
                                                "_graph_rows", "_edge", "_generator")

    def __init__(self, info: ViTInfo, schedule: list[int], graph: str = "mixed", k: int = 8, score: str = "mixed",
                 alpha: float = 0.1, prop_attn: bool = True, theta: float = 1.0, orphans: str = "drop",
                 score_path: str = "auto", stats: bool = False, trace: bool = False):
        super().__init__(info, schedule, prop_attn=prop_attn, theta=theta, trace=trace)
        self.stats = bool(stats)
        if graph not in GRAPHS:
            raise ConfigError(f"unknown GTP graph '{graph}'; choose one of {', '.join(GRAPHS)}")
        if score not in SCORES:
            raise ConfigError(f"unknown GTP score '{score}'; choose one of {', '.join(SCORES)}")
        if score == "cls" and not info.has_cls:
            raise ConfigError("GTP score 'cls' needs a model with a cls token")
        if k < 1:
            raise ConfigError(f"semantic graph needs k >= 1 neighbours, got {k}")
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        if orphans not in ORPHANS:
            raise ConfigError(f"unknown GTP orphans '{orphans}'; choose one of {', '.join(ORPHANS)}")
        if score_path not in SCORE_PATHS:
            raise ConfigError(f"unknown GTP score_path '{score_path}'; choose one of {', '.join(SCORE_PATHS)}")
        self.score_path = score_path
        self._cuda = False  # whether the current forward runs on CUDA (set by begin)
        self.graph_kind, self.k, self.score, self.alpha, self.orphans = graph, int(k), score, float(alpha), orphans
        self.graph: torch.Tensor | None = None  # (B, N0, N0) normalised graph over the original image tokens
        # the grid's adjacency, built here so that a compiled forward reads it instead of building it
        self._spatial = None if graph == "semantic" else spatial_adjacency(info.grid)
        self.index: torch.Tensor | None = None  # (B, N) original positions of the current image tokens
        self.reset_stats()

    def set_stats(self, on: bool) -> None:
        self.stats = bool(on)
        self.reset_stats()

    def reset_stats(self) -> None:
        if self.stats:
            self.report.update(lost_tokens=0, removed_tokens=0)
        else:
            self.report.pop("lost_tokens", None)
            self.report.pop("removed_tokens", None)

    def stats_summary(self) -> dict[str, float]:
        if not self.stats:
            return {}
        removed = int(self.report["removed_tokens"])
        return {"lost_tokens": int(self.report["lost_tokens"]), "removed_tokens": removed,
                "lost_token_fraction": float(self.report["lost_tokens"]) / max(removed, 1)}

    def seed(self, seed: int | torch.Generator | None) -> None:
        """Draw the random scores of ``score="random"`` from a generator of the reducer's own instead of torch's
        global RNG, for every forward after this call: an int seeds one (made on the device of the next forward;
        it draws what the global RNG draws after ``torch.manual_seed(seed)`` on that device), a
        :class:`torch.Generator` is drawn from as given (on the forward's device), None goes back to the global RNG
        (the default).

        So that library code (``leanvit compare`` evaluating one pass per seed) repeats a random selection without
        reseeding the caller's global RNG. The generator is not pickled or deep-copied with the model: a copy
        seeded with an int starts that seed's stream afresh, one given a generator draws from the global RNG.
        """
        if isinstance(seed, torch.Generator):
            self._seed, self._generator = None, seed
        else:
            self._seed, self._generator = (None if seed is None else int(seed)), None

    def _random_generator(self, device: torch.device) -> torch.Generator | None:
        gen = self._generator
        if self._seed is not None and (gen is None or gen.device != device):
            gen = self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return gen

    def options(self) -> dict[str, Any]:
        return {"graph": self.graph_kind, "k": self.k, "score": self.score, "alpha": self.alpha,
                "orphans": self.orphans, "score_path": self.score_path, **super().options()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.graph = self.index = None

    def begin(self, x: torch.Tensor) -> None:
        super().begin(x)
        self._cuda = x.is_cuda
        self.graph = self.index = self._graph_flat = self._edge = None
        if any(self.schedule):
            P = self.info.num_prefix
            B = x.shape[0]
            with label("leanvit.gtp.graph"):
                self.graph = build_graph(x[:, P:].detach(), self.info.grid, self.graph_kind, self.k,
                                         spatial=self._spatial_on(x.device))
            N0 = self.graph.shape[1]
            # the graph read as a flat vector, and the flat offset of each image's first row in it: a graph shared
            # by the batch (spatial: batch stride 0) is read in place, every image from the same rows (``[:1]``,
            # not ``[0]``: an empty batch has no image 0, and then reads nothing)
            shared = self.graph.stride(0) == 0
            self._graph_flat = (self.graph[:1] if shared else self.graph).reshape(-1)
            self._batch = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            self._graph_rows = torch.zeros_like(self._batch) if shared else self._batch * (N0 * N0)
            # original position of every current image token: the graph restricted to the kept tokens is
            # graph[index][:, index], so it is never copied, only indexed
            self.index = torch.arange(self.info.num_image, device=x.device).expand(B, -1)
            self._prefix_rows = torch.arange(P, device=x.device).expand(B, P)  # (B, P)
            if self.orphans == "nearest":
                # each token's strongest edge, the weight of its fallback edge should it become an orphan
                self._edge = self.graph[:1].amax(-1).expand(B, -1) if shared else self.graph.amax(-1)  # (B, N0)

    def _spatial_on(self, device: torch.device) -> torch.Tensor | None:
        """The grid's 0/1 adjacency on ``device``, built once (never inside a compiled forward)."""
        if self.graph_kind == "semantic":
            return None
        if self._spatial is None or self._spatial.device != device:
            self._spatial = spatial_adjacency(self.info.grid, device)
        return self._spatial

    def attend(self, i: int, attn: nn.Module, x: torch.Tensor) -> AttnOut:
        """Block i's attention and, in a reducing block, the score that selects the tokens to propagate.

        The cls score needs one attention row, computed beside fused attention (no map). The attention scores need
        the map's diagonal and column sums: from fused attention plus an exact score pass over the queries and keys
        (``score_path`` "fused", the default on CUDA), as one cache-blocked op in a compiled CPU forward, or from
        the map computed explicitly a slice at a time and scored (eager CPU)."""
        reducing = self.schedule[i] > 0
        if not reducing or self.score == "random":
            return attention.dense(attn, x, self.size_bias(), self.theta)
        h = attention.heads(attn, x, self.size_bias())
        if self.score == "cls":
            out, probs, _ = attention.explicit(h, self.theta, keep_probs=True) if self.theta < 1.0 \
                else (attention.fused(h), None, None)
            return AttnOut(attention.output(h, out), cls_probs=attention.cls_row(h, probs))
        if self.theta >= 1.0 and (self.score_path == "fused" or (self.score_path == "auto" and self._cuda)):
            out = attention.fused(h)
            with label("leanvit.attn.score"):
                score = fused_score(h.q, h.k, h.size_bias, attn.scale, self.info.num_prefix, self.score)
        elif self.score in FUSABLE and attention.stats_op_applies(h, self.theta):
            out, score = attention.explicit_stats(h, self._score_stats)
        else:
            # per slice of the map only its diagonal and column sums, combined into the score once for the whole
            # batch: two reductions per slice instead of the score's half-dozen small ops (the same values: the
            # maxima and products of the same numbers)
            out, _, stats = attention.explicit(h, self.theta, diag_colsum)  # stats (B, 2, H, N)
            score = combine_scores(stats[:, 0], stats[:, 1], self.info.num_prefix, self.score)
        return AttnOut(attention.output(h, out), score=score)

    def _score_stats(self, diag: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return combine_scores(diag, col, self.info.num_prefix, self.score)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        attn.x = None  # the block has added it to the residual: not held through the MLP (memory above dense)
        P = self.info.num_prefix
        with label("leanvit.gtp.select"):
            if self.score == "random":
                gen = self._random_generator(x.device)
                shape = (x.shape[0], x.shape[1] - P)
                # no generator argument unless seeded: the compiled forward stays as it was
                score = torch.rand(shape, device=x.device) if gen is None else torch.rand(shape, device=x.device,
                                                                                        generator=gen)
            elif self.score == "cls":
                score = cls_score(attn.cls_probs, P)  # (B, N), one attention row computed beside fused attention
            else:
                score = attn.score  # (B, N), computed beside the attention (attention.explicit's score)
            kept, removed = split_topk(score, r)  # (B, K), (B, r) positions among current image tokens
        with label("leanvit.gtp.propagate"):
            return self._propagate(x, kept, removed, P)

    def _propagate(self, x: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, P: int) -> torch.Tensor:
        # Written for few kernel launches: this runs in every block, and at batch 1 launch overhead is the cost.
        B, N, C = x.shape
        N0 = self.graph.shape[1]
        K, r = kept.shape[1], removed.shape[1]  # views take these sizes, not -1, which an empty batch leaves open
        base = self._batch * N  # row offset of each image in the flattened (B * N, C) tokens
        rows_keep = torch.cat([self._prefix_rows, kept + P], dim=1) + base  # (B, P + K) prefix + kept tokens
        rows_rm = removed + (P + base)  # (B, r)
        kept_orig, removed_orig = self.index.gather(1, kept), self.index.gather(1, removed)
        # A_hat[kept, removed], read from the original graph (the restricted graph is never built)
        # (``gather`` on the flat graph, not ``take`` or ``index_select``: ONNX writes those as GatherND and Gather,
        # which ONNX Runtime runs a copy call per value, about 1 ms a block on DeiT-S at batch 32; ``gather`` becomes
        # GatherElements, a fifth of that)
        edge = torch.add(self._graph_rows, kept_orig, alpha=N0).unsqueeze(-1) + removed_orig.unsqueeze(1)
        w = torch.gather(self._graph_flat, 0, edge.view(-1)).view(B, K, r)
        xf = x.reshape(B * N, C)
        out = take_rows(xf, rows_keep)  # (B, P + K, C)
        x_rm = take_rows(xf, rows_rm)  # (B, r, C)
        fallback = orphan = None
        if self.orphans != "drop":
            # merge: a 0/1 assignment of each orphan to its kept token; nearest: edges weighted like the graph's
            weight = torch.ones_like(w[:, 0]) if self.orphans == "merge" else self._edge.gather(1, removed_orig)
            fallback, orphan = fallback_edges(w, out[:, P:], x_rm, weight)  # (B, K, r), (B, r)
            if self.orphans == "nearest":
                w.add_(fallback)
        # exported, on every row of ``out`` with zero edges for the prefix rows (they add nothing), not on the view
        # ``out[:, P:]``: an in-place write into a slice exports as a scatter, which ONNX Runtime runs as a copy of
        # the whole tensor and two transposes (about 1 ms a block on DeiT-S at batch 32); eager, on the view (no
        # product of zeros, which the MACs would count)
        exporting = torch.compiler.is_exporting()
        whole = P > 0 and exporting
        target, w_all = (out, torch.nn.functional.pad(w, (0, 0, P, 0))) if whole else (out[:, P:], w)
        alpha = self.alpha
        if exporting:  # alpha on the (B, K, r) weights once: torch writes baddbmm's alpha as a Mul of each product
            w_all, alpha = w_all * alpha, 1.0
        target.baddbmm_(w_all, x_rm, alpha=alpha)
        if self.prop_attn or self.orphans == "merge":
            sf = self._sizes_or_ones(x).reshape(B * N, 1)
            size = take_rows(sf, rows_keep)  # (B, P + K, 1)
            s_rm = take_rows(sf, rows_rm)  # (B, r, 1)
            if self.prop_attn:
                (size if whole else size[:, P:]).baddbmm_(w_all, s_rm, alpha=alpha)
            if self.orphans == "merge":
                # x_k <- (s_k x_k + sum_j s_j x_j) / (s_k + sum_j s_j) over the orphans j merged into k
                s_kept = size[:, P:]  # (B, K, 1)
                merged = torch.baddbmm(s_kept, fallback, s_rm)  # (B, K, 1)
                out[:, P:].mul_(s_kept).baddbmm_(fallback, s_rm * x_rm).div_(merged)
                s_kept.copy_(merged)
            if self.prop_attn:
                self._size = size.view(B, P + K)
        self.index = kept_orig
        if self.tracking:  # a removed token's patches go where its strongest edge took its features, or nowhere
            taken = w + fallback if self.orphans == "merge" else w  # (B, K, r)
            best, to = taken.max(1)  # (B, r)
            dests = torch.empty(B, N - P, dtype=torch.long, device=x.device)
            dests.scatter_(1, kept, torch.arange(K, device=x.device).expand(B, K))
            dests.scatter_(1, removed, torch.where(best > 0, to, -1))
            self._moved(x, kept, dests)
        if self.stats or self.trace:
            edges = w + fallback if self.orphans == "merge" else w  # (B, K, r) every edge a removed token took
        if self.stats:
            self.report["lost_tokens"] += (edges.sum(1) == 0).sum()  # a tensor: no device sync in the forward
            self.report["removed_tokens"] += removed.numel()
        if self.trace:
            removed_source = gather_tokens(self.source.float(), removed).bool()  # (B, r, N_orig)
            self._trace_extra = {"kept": kept, "removed": removed, "weights": edges.detach(),
                                 "removed_source": removed_source}
            if orphan is not None:
                self._trace_extra["fallback"] = orphan  # (B, r) removed tokens whose edge is a fallback edge
            # a removed token's patches are propagated where it has an edge to a kept token, lost otherwise
            self._passed = (removed_source & (edges.sum(1) > 0)[..., None]).any(1)
            self.source = gather_tokens(self.source.float(), kept).bool()
        return out
