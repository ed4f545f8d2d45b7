"""GTP: graph-based token propagation (Xu et al., "GTP-ViT", WACV 2024). Training-free.

After each block's attention, the image tokens that score lowest pass their features along a token graph to their
kept neighbours, ``x_kept += alpha * A_hat[kept, removed] @ x_removed``, and are removed; the MLP and later blocks
run on the kept tokens. The graph (spatial 8-neighbourhood, semantic k-NN, or their union) is built once per
forward from the tokens entering block 0 and restricted to the kept tokens after every block.

Where we differ from the authors' code (Ackesnal/GTP-ViT): the graph is built on the input's device (theirs is
hard-coded to CUDA); a block with nothing to remove is a no-op (theirs drops every token for P = 0); no debug file
is written during propagation; distillation and register tokens are prefix tokens and never propagated; tokens
lost because they had no kept neighbour are counted in ``report["lost_tokens"]`` instead of logged to a file.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.profiler import record_function

from ..errors import ConfigError
from ..ops.graph import GRAPHS, build_graph
from ..ops.select import SCORES, attention_score, cls_score, gather_tokens, split_topk
from .base import TokenReducer
from .compat import AttnOut, ViTInfo


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
        stats: count removed tokens that had no kept neighbour (their features are lost) in
            ``report["lost_tokens"]`` / ``report["removed_tokens"]``, summed over the forwards since the last
            :meth:`set_stats` / :meth:`reset_stats` (a few extra ops per block, so off by default; the keys are absent
            from the report while it is off). ``leanvit eval`` and ``leanvit compare`` turn it on for their
            evaluation only; the MACs-counting forward of ``budget=`` is not counted.
    """

    name = "gtp"
    tracks_sizes = True
    _per_forward = TokenReducer._per_forward + ("graph", "index", "_batch", "_prefix_rows", "_graph_flat",
                                                "_graph_rows")

    def __init__(self, info: ViTInfo, schedule: list[int], graph: str = "mixed", k: int = 8, score: str = "mixed",
                 alpha: float = 0.1, prop_attn: bool = True, theta: float = 1.0, stats: bool = False,
                 trace: bool = False):
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
        self.graph_kind, self.k, self.score, self.alpha = graph, int(k), score, float(alpha)
        self.graph: torch.Tensor | None = None  # (B, N0, N0) normalised graph over the original image tokens
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

    def options(self) -> dict[str, Any]:
        return {"graph": self.graph_kind, "k": self.k, "score": self.score, "alpha": self.alpha,
                **super().options()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.graph = self.index = None

    def begin(self, x: torch.Tensor) -> None:
        super().begin(x)
        self.graph = self.index = self._graph_flat = None
        if any(self.schedule):
            P = self.info.num_prefix
            B = x.shape[0]
            with record_function("leanvit.gtp.graph"):
                self.graph = build_graph(x[:, P:].detach(), self.info.grid, self.graph_kind, self.k)
            N0 = self.graph.shape[1]
            # the graph read as a flat vector, and the flat offset of each image's first row in it: a graph shared
            # by the batch (spatial: batch stride 0) is read in place, every image from the same rows
            shared = self.graph.stride(0) == 0
            self._graph_flat = (self.graph[0] if shared else self.graph).reshape(-1)
            self._batch = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            self._graph_rows = torch.zeros_like(self._batch) if shared else self._batch * (N0 * N0)
            # original position of every current image token: the graph restricted to the kept tokens is
            # graph[index][:, index], so it is never copied, only indexed
            self.index = torch.arange(self.info.num_image, device=x.device).expand(B, -1)
            self._prefix_rows = torch.arange(P, device=x.device).expand(B, P)  # (B, P)

    def score_fn(self, i: int):
        if self.schedule[i] == 0 or self.score in ("random", "cls"):
            return None
        return self._score

    def needs_cls_probs(self, i: int) -> bool:
        # the cls score needs one attention row, computed beside fused attention: no explicit attention map
        return self.score == "cls" and self.schedule[i] > 0

    def _score(self, probs: torch.Tensor) -> torch.Tensor:
        return attention_score(probs, self.info.num_prefix, self.score, self.info.has_cls)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        P = self.info.num_prefix
        with record_function("leanvit.gtp.select"):
            if self.score == "random":
                score = torch.rand(x.shape[0], x.shape[1] - P, device=x.device)
            elif self.score == "cls":
                score = cls_score(attn.cls_probs, P)  # (B, N), one attention row computed beside fused attention
            else:
                score = attn.score  # (B, N), computed beside the attention (attention_forward's score_fn)
            kept, removed = split_topk(score, r)  # (B, K), (B, r) positions among current image tokens
        with record_function("leanvit.gtp.propagate"):
            return self._propagate(x, kept, removed, P)

    def _propagate(self, x: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, P: int) -> torch.Tensor:
        # Written for few kernel launches: this runs in every block, and at batch 1 launch overhead is the cost.
        B, N, C = x.shape
        N0 = self.graph.shape[1]
        base = self._batch * N  # row offset of each image in the flattened (B * N, C) tokens
        rows_keep = (torch.cat([self._prefix_rows, kept + P], dim=1) + base).view(-1)  # prefix + kept tokens
        rows_rm = (removed + (P + base)).view(-1)
        kept_orig, removed_orig = self.index.gather(1, kept), self.index.gather(1, removed)
        # A_hat[kept, removed], read from the original graph (the restricted graph is never built)
        w = self._graph_flat.take(torch.add(self._graph_rows, kept_orig, alpha=N0).unsqueeze(-1)
                                  + removed_orig.unsqueeze(1))
        xf = x.reshape(B * N, C)
        out = xf.index_select(0, rows_keep).view(B, -1, C)
        out[:, P:].baddbmm_(w, xf.index_select(0, rows_rm).view(B, -1, C), alpha=self.alpha)
        if self.prop_attn:
            sf = self._sizes_or_ones(x).reshape(B * N, 1)
            size = sf.index_select(0, rows_keep).view(B, -1, 1)
            size[:, P:].baddbmm_(w, sf.index_select(0, rows_rm).view(B, -1, 1), alpha=self.alpha)
            self._size = size.view(B, -1)
        self.index = kept_orig
        if self.stats:
            self.report["lost_tokens"] += (w.sum(1) == 0).sum()  # a tensor: no device sync in the forward
            self.report["removed_tokens"] += removed.numel()
        if self.trace:
            self._trace_extra = {"kept": kept, "removed": removed, "weights": w.detach(),
                                 "removed_source": gather_tokens(self.source.float(), removed).bool()}
            self.source = gather_tokens(self.source.float(), kept).bool()
        return out
