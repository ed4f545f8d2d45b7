"""Pure tensor ops behind token reduction: graphs, scores, top-k, sparsification, matching, schedules."""
from __future__ import annotations

import pytest
import torch

from leanvit.errors import ConfigError
from leanvit.ops.graph import build_graph, normalize_adjacency, semantic_adjacency, spatial_adjacency
from leanvit.ops.merge import bipartite_soft_matching, merge_weighted
from leanvit.ops.schedule import BlockShape, block_macs, check_schedule, parse_schedule, solve_budget
from leanvit.ops.select import attention_score, gather_tokens, sparsify_attention, split_topk


# ----------------------------------------------------------------------------------------------------- graphs
def test_spatial_adjacency_3x3():
    a = spatial_adjacency((3, 3))
    assert a.shape == (9, 9)
    deg = a.sum(1)
    # corners 0, 2, 6, 8 have 3 neighbours; edges 1, 3, 5, 7 have 5; the centre has 8
    assert deg.tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    assert torch.equal(a, a.T)
    assert torch.all(a.diagonal() == 0)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    # 0 (row 0, col 0) touches 1, 3, 4 only
    assert torch.nonzero(a[0]).flatten().tolist() == [1, 3, 4]


def test_spatial_adjacency_rectangular_grid():
    a = spatial_adjacency((2, 4))  # 2 rows, 4 columns, row-major
    assert a.shape == (8, 8)
    assert torch.nonzero(a[0]).flatten().tolist() == [1, 4, 5]
    assert torch.nonzero(a[3]).flatten().tolist() == [2, 6, 7]
    assert a.sum(1).tolist() == [3, 5, 5, 3, 3, 5, 5, 3]


def test_semantic_adjacency_picks_most_similar():
    # token i's most similar tokens are known by construction: directions at angles 0, 10, 20, ... degrees
    angles = torch.tensor([0.0, 10.0, 25.0, 45.0, 70.0, 100.0, 135.0]) * torch.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=-1)[None] * torch.tensor([1.0, 3, 0.5, 2, 1, 4, 1])[None, :, None]
    k = 2
    adj = semantic_adjacency(x, k)
    assert adj.shape == (1, 7, 7)
    assert torch.all(adj.sum(-1) == k)
    assert torch.all(adj[0].diagonal() == 0)
    n = len(angles)
    for i in range(n):
        dist = (angles - angles[i]).abs()
        dist[i] = float("inf")
        expected = set(dist.argsort()[:k].tolist())
        assert set(torch.nonzero(adj[0, i]).flatten().tolist()) == expected, i
    # scaling a token does not change cosine neighbours
    assert torch.equal(semantic_adjacency(x * 7.0, k), adj)
    # k is capped at N - 1
    assert torch.all(semantic_adjacency(x, 50).sum(-1) == n - 1)


def test_normalize_adjacency_by_hand():
    a = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
    n = normalize_adjacency(a)
    deg = a.sum(1)
    d = torch.diag(deg.rsqrt())
    assert torch.allclose(n, d @ a @ d, atol=1e-7)
    assert torch.allclose(n, n.T)
    assert n[0, 1].item() == pytest.approx(1 / (2 * 3) ** 0.5)
    # an isolated node keeps a zero row and column (no NaN)
    iso = torch.zeros(3, 3)
    iso[0, 1] = iso[1, 0] = 1
    ni = normalize_adjacency(iso)
    assert torch.isfinite(ni).all() and ni[2].abs().sum() == 0 and ni[:, 2].abs().sum() == 0
    # batched
    nb = normalize_adjacency(torch.stack([a, a]))
    assert torch.allclose(nb[1], n)


def test_build_graph_kinds():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    sp = build_graph(x, (3, 3), "spatial")
    assert sp.shape == (2, 9, 9)
    assert torch.allclose(sp[0], normalize_adjacency(spatial_adjacency((3, 3))))
    se = build_graph(x, (3, 3), "semantic", k=3)
    assert torch.allclose(se, normalize_adjacency(semantic_adjacency(x, 3)))
    mixed = build_graph(x, (3, 3), "mixed", k=3)
    union = ((spatial_adjacency((3, 3))[None] + semantic_adjacency(x, 3)) > 0).float()
    assert torch.allclose(mixed, normalize_adjacency(union))
    # the union has at least the edges of each part
    assert torch.all((mixed > 0) >= (sp > 0)) and torch.all((mixed > 0) >= (se > 0))
    with pytest.raises(ValueError):
        build_graph(x, (3, 3), "nope")
    with pytest.raises(ValueError):
        build_graph(x, (2, 4), "spatial")


# ----------------------------------------------------------------------------------------------------- scores
def _hand_attention() -> torch.Tensor:
    """(B=1, H=2, N=4) with one prefix token; rows need not be normalised for the score arithmetic."""
    h0 = torch.tensor([[0.10, 0.20, 0.30, 0.40],
                       [0.50, 0.10, 0.20, 0.20],
                       [0.25, 0.25, 0.40, 0.10],
                       [0.10, 0.60, 0.00, 0.30]])
    h1 = torch.tensor([[0.70, 0.10, 0.10, 0.10],
                       [0.05, 0.80, 0.05, 0.10],
                       [0.30, 0.30, 0.20, 0.20],
                       [0.40, 0.20, 0.20, 0.20]])
    return torch.stack([h0, h1])[None]


def test_attention_score_by_hand():
    attn = _hand_attention()
    heads = attn[0]
    mixed, mixed_mean, colsum, diag = [], [], [], []
    for j in (1, 2, 3):  # image tokens
        d = [float(heads[h, j, j]) for h in range(2)]
        c = [float(sum(heads[h, i, j] for i in range(4))) for h in range(2)]
        mixed.append(max(d) * max(c))
        mixed_mean.append(sum(d) / 2 * sum(c) / 2)
        colsum.append(max(c))
        diag.append(max(d))
    for kind, exp in (("mixed", mixed), ("mixed_mean", mixed_mean), ("colsum", colsum), ("diag", diag)):
        got = attention_score(attn, 1, kind)
        assert got.shape == (1, 3)
        assert torch.allclose(got[0], torch.tensor(exp), atol=1e-6), kind
    # concrete value: token 1 diag max = 0.8, column sums 1.15 / 1.4 -> 0.8 * 1.4
    assert attention_score(attn, 1, "mixed")[0, 0].item() == pytest.approx(0.8 * 1.4)
    cls = attention_score(attn, 1, "cls")
    assert torch.allclose(cls[0], torch.tensor([(0.2 + 0.1) / 2, (0.3 + 0.1) / 2, (0.4 + 0.1) / 2]))
    with pytest.raises(ValueError):
        attention_score(attn, 1, "cls", has_cls=False)
    with pytest.raises(ValueError):
        attention_score(attn, 1, "nope")
    r = attention_score(attn, 1, "random")
    assert r.shape == (1, 3)
    # no prefix: every token is an image token
    assert attention_score(attn, 0, "diag").shape == (1, 4)


def test_split_topk():
    torch.manual_seed(0)
    score = torch.randn(3, 11)
    kept, removed = split_topk(score, 4)
    assert kept.shape == (3, 7) and removed.shape == (3, 4)
    for b in range(3):
        k, r = kept[b].tolist(), removed[b].tolist()
        assert k == sorted(k)
        assert not set(k) & set(r)
        assert set(k) | set(r) == set(range(11))
        assert score[b, r].max() < score[b, k].min()
    kept0, removed0 = split_topk(score, 0)
    assert removed0.shape == (3, 0) and torch.equal(kept0, torch.arange(11).expand(3, -1))
    x = torch.randn(3, 11, 2)
    assert torch.equal(gather_tokens(x, kept)[1], x[1, kept[1]])
    assert torch.equal(gather_tokens(score, kept)[2], score[2, kept[2]])


# ----------------------------------------------------------------------------------------------------- sparsify
def test_sparsify_attention():
    torch.manual_seed(0)
    attn = torch.randn(2, 3, 6, 6).softmax(-1)
    assert sparsify_attention(attn, 1.0) is attn
    out = sparsify_attention(attn, 0.5)
    assert out.shape == attn.shape
    k = int(0.5 * 36)
    for b in range(2):
        for h in range(3):
            a, o = attn[b, h].flatten(), out[b, h].flatten()
            zeroed = (o == 0) & (a != 0)
            n_zero = int(zeroed.sum())
            assert k - 1 <= n_zero <= k, n_zero  # about half of the entries of each head
            # the largest are kept unchanged (no renormalisation), the zeroed ones are the smallest
            assert torch.equal(o[~zeroed], a[~zeroed])
            assert a[zeroed].max() < a[~zeroed].min()
            assert set(torch.nonzero(~zeroed).flatten().tolist()) == set(a.topk(36 - n_zero).indices.tolist())
    # rows are not renormalised: row sums drop below 1
    assert torch.all(out.sum(-1) <= attn.sum(-1) + 1e-6)
    assert (out.sum(-1) < 0.999).any()


# ----------------------------------------------------------------------------------------------------- merging
def test_bipartite_merge_conserves_mass_and_size():
    torch.manual_seed(0)
    B, N, C = 2, 10, 4
    x = torch.randn(B, N, C)
    size = torch.rand(B, N, 1) + 0.5
    merge = bipartite_soft_matching(torch.randn(B, N, 8), 3)
    xm, sm = merge_weighted(merge, x, size)
    assert xm.shape == (B, N - 3, C) and sm.shape == (B, N - 3, 1)
    assert torch.allclose((xm * sm).sum(1), (x * size).sum(1), atol=1e-5)
    assert torch.allclose(sm.sum(1), size.sum(1), atol=1e-6)


def test_bipartite_r_capped_and_identity():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 3)
    merge = bipartite_soft_matching(torch.randn(2, 7, 5), 100)
    assert merge(x, "sum").shape == (2, 7 - 7 // 2, 3)
    merge0 = bipartite_soft_matching(torch.randn(2, 7, 5), 0)
    assert merge0(x, "sum") is x
    xm, sm = merge_weighted(merge0, x, torch.ones(2, 7, 1))
    assert torch.equal(xm, x) and torch.all(sm == 1)


def test_bipartite_merges_identical_tokens():
    # tokens 2 (set A) and 5 (set B) are identical; every other pair is orthogonal -> r=1 merges exactly them
    N, D = 6, 6
    metric = torch.eye(N, D)[None].clone()
    metric[0, 5] = metric[0, 2]
    x = torch.arange(N * 3, dtype=torch.float32).reshape(1, N, 3)
    x[0, 5] = x[0, 2]
    merge = bipartite_soft_matching(metric, 1)
    xm, sm = merge_weighted(merge, x, torch.ones(1, N, 1))
    assert xm.shape == (1, N - 1, 3)
    assert sorted(sm.flatten().tolist()) == [1, 1, 1, 1, 2]
    merged = xm[0, sm[0, :, 0] == 2]
    assert torch.equal(merged[0], x[0, 2])
    # all the other tokens survive unchanged
    rest = {tuple(v.tolist()) for v in xm[0, sm[0, :, 0] == 1]}
    assert rest == {tuple(x[0, i].tolist()) for i in (0, 1, 3, 4)}
    # amax merge of provenance
    src = torch.eye(N)[None]
    m = merge(src, "amax")
    assert m.shape == (1, N - 1, N)
    assert sorted(m.sum(-1).flatten().tolist()) == [1, 1, 1, 1, 2]
    assert torch.all(m.sum(1) == 1)


# ----------------------------------------------------------------------------------------------------- schedules
def _tome_parse_r(num_layers: int, r: int, inflect: float) -> list[int]:
    """ToMe's own parse_r for the (r, inflection) form (facebookresearch/ToMe, tome/utils.py)."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def test_parse_schedule_forms():
    assert parse_schedule(3, 4) == [3, 3, 3, 3]
    assert parse_schedule(0, 2) == [0, 0]
    assert parse_schedule([1, 2], 4) == [1, 2, 0, 0]
    assert parse_schedule([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    assert parse_schedule((4, 0.0), 5) == [4, 4, 4, 4, 4]
    # inflection -1: ToMe's "decreasing schedule", more removal early
    dec = parse_schedule((4, -1.0), 5)
    assert dec == [8, 6, 4, 2, 0] and dec == sorted(dec, reverse=True)
    inc = parse_schedule((4, 1.0), 5)
    assert inc == [0, 2, 4, 6, 8]
    for r, infl, depth in ((5, 0.5, 4), (7, -0.3, 12), (13, 0.25, 12), (3, 0.7, 6), (8, 0.0, 12)):
        assert parse_schedule((r, infl), depth) == _tome_parse_r(depth, r, infl), (r, infl, depth)
    for bad in (-1, [1, -2], (3, 1.5), "3", 2.5, True):
        with pytest.raises(ConfigError):
            parse_schedule(bad, 4)
    with pytest.raises(ConfigError):
        parse_schedule([1, 1, 1, 1, 1], 4)


def test_check_schedule():
    assert check_schedule([2, 2, 2], 10) == [10, 8, 6, 4]
    with pytest.raises(ConfigError, match="block 2"):
        check_schedule([4, 4, 4], 10)  # 2 left at block 2
    with pytest.raises(ConfigError, match="block 0"):
        check_schedule([10], 10)  # nothing would be left
    assert check_schedule([9], 10) == [10, 1]
    with pytest.raises(ConfigError, match="block 0"):
        check_schedule([6], 10, max_fraction=0.5)
    assert check_schedule([5, 2], 10, max_fraction=0.5) == [10, 5, 3]


SHAPES = [BlockShape(32, 32, 2 * 32 * 128)] * 4


def _family(depth: int, num_image: int, max_fraction: float):
    for r in range(num_image):
        for k in range(depth):
            s = [r + 1] * k + [r] * (depth - k)
            try:
                check_schedule(s, num_image, max_fraction)
            except ConfigError:
                continue
            yield s


@pytest.mark.parametrize("budget", [0.95, 0.85, 0.72, 0.6, 0.55])
def test_solve_budget_brute_force(budget):
    P, N, other = 1, 36, 50_000
    dense = block_macs(SHAPES, [0] * 4, P, N) + other
    sched = solve_budget(budget, SHAPES, P, N, other, max_fraction=0.5)
    check_schedule(sched, N, 0.5)
    macs = block_macs(SHAPES, sched, P, N) + other
    assert macs <= budget * dense
    # no near-constant schedule (the family solve_budget searches) fits with more MACs
    fitting = [block_macs(SHAPES, s, P, N) + other for s in _family(4, N, 0.5)]
    fitting = [m for m in fitting if m <= budget * dense]
    if not fitting:
        # shallow model, low budget: the fractional fallback, still close to the target
        assert max(sched) - min(sched) > 1 and macs > (budget - 0.03) * dense
        return
    assert macs == max(fitting)
    # every near-constant schedule with more MACs than the answer exceeds the target
    for s in _family(4, N, 0.5):
        m = block_macs(SHAPES, s, P, N) + other
        if m > macs:
            assert m > budget * dense, s


def test_solve_budget_edges():
    P, N, other = 1, 36, 50_000
    assert solve_budget(1.0, SHAPES, P, N, other) == [0, 0, 0, 0]
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ConfigError):
            solve_budget(bad, SHAPES, P, N, other)
    with pytest.raises(ConfigError, match="cannot be reached"):
        solve_budget(0.05, SHAPES, P, N, other)
    # a shallow model reaches a low budget with the fractional fallback, still within the cap
    low = solve_budget(0.45, SHAPES, P, N, other, max_fraction=0.5)
    check_schedule(low, N, 0.5)
    assert block_macs(SHAPES, low, P, N) + other <= 0.45 * (block_macs(SHAPES, [0] * 4, P, N) + other)


def test_block_macs_counts_attention_and_mlp():
    s = BlockShape(8, 8, 100)
    assert s.attn_macs(3) == 3 * 8 * 24 + 3 * 8 * 8 + 2 * 9 * 8
    assert s.mlp_macs(3) == 300
    # removing tokens after the attention lowers only the MLP of that block, and both parts of later blocks
    full = block_macs([s, s], [0, 0], 1, 4)
    assert full - block_macs([s, s], [1, 0], 1, 4) == s.mlp_macs(5) - s.mlp_macs(4) + s.attn_macs(5) - s.attn_macs(4) \
        + s.mlp_macs(5) - s.mlp_macs(4)
