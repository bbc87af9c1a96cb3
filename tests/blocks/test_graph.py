import math

import pytest
import torch

from blockyard.blocks import GraphAttention, GraphAttentionOutput, add_self_loops, segment_softmax


def naive_gat(conv, x, edge_index):
    """GATConv written out in float64: loop over targets, heads and each target's incoming edges.

    x (N, C_in). Returns (output, edges used as a list of (j, i), alpha as a list of per-edge lists).
    """
    with torch.no_grad():
        return _naive_gat(conv, x, edge_index)


def _naive_gat(conv, x, edge_index):
    n = x.shape[0]
    heads, c = conv.heads, conv.out_dim
    h = (x.double() @ conv.lin.weight.double().T).view(n, heads, c)
    a_src, a_dst = conv.att_src.double()[0], conv.att_dst.double()[0]
    edges = [tuple(e) for e in edge_index.T.tolist()]
    if conv.add_self_loops:
        edges = [(j, i) for j, i in edges if j != i] + [(i, i) for i in range(n)]
    out = torch.zeros(n, heads, c, dtype=torch.float64)
    alpha = [[0.0] * heads for _ in edges]
    for i in range(n):
        incoming = [k for k, (_, t) in enumerate(edges) if t == i]
        for hd in range(heads):
            scores = []
            for k in incoming:
                j = edges[k][0]
                s = float(h[j, hd] @ a_src[hd] + h[i, hd] @ a_dst[hd])
                scores.append(s if s > 0 else conv.negative_slope * s)
            if not scores:
                continue
            top = max(scores)
            w = [math.exp(s - top) for s in scores]
            total = sum(w)
            for k, wk in zip(incoming, w):
                alpha[k][hd] = wk / total
                out[i, hd] += wk / total * h[edges[k][0], hd]
    out = out.reshape(n, heads * c) if conv.concat else out.mean(dim=1)
    if conv.bias is not None:
        out = out + conv.bias.double()
    return out, edges, alpha


def random_edges(n, e, generator, self_loops=0):
    """``e`` distinct directed non-loop edges plus ``self_loops`` distinct (i, i) edges, shuffled."""
    pairs = [(j, i) for j in range(n) for i in range(n) if j != i]
    pick = torch.randperm(len(pairs), generator=generator)[:e].tolist()
    chosen = [pairs[p] for p in pick]
    chosen += [(i, i) for i in torch.randperm(n, generator=generator)[:self_loops].tolist()]
    chosen = [chosen[p] for p in torch.randperm(len(chosen), generator=generator).tolist()]
    return torch.tensor(chosen, dtype=torch.long).T.reshape(2, -1)


def randomised(conv, generator):
    """Non-trivial bias (zero at init) so the reference check covers it."""
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_(generator=generator)
    return conv.eval()


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("loops", [True, False])
def test_matches_naive_reference(heads, concat, loops):
    g = torch.Generator().manual_seed(heads * 10 + concat * 2 + loops)
    n = 9
    # 2 existing self loops; node 8 has no incoming edge at all (isolated target).
    edge_index = random_edges(8, 20, g, self_loops=2)
    conv = randomised(GraphAttention(5, 4, heads=heads, concat=concat, add_self_loops=loops), g)
    x = torch.randn(n, 5, generator=g)
    res = conv(x, edge_index, return_attention=True)
    assert isinstance(res, GraphAttentionOutput)
    ref, edges, alpha = naive_gat(conv, x, edge_index)
    torch.testing.assert_close(res.output.double(), ref, rtol=0, atol=1e-5)
    assert [tuple(e) for e in res.edge_index_used.T.tolist()] == edges
    torch.testing.assert_close(res.alpha.double(), torch.tensor(alpha, dtype=torch.float64).view(-1, heads),
                               rtol=0, atol=1e-6)
    assert res.output.shape == (n, heads * 4 if concat else 4)


def test_duplicate_edges_each_count_in_the_softmax():
    g = torch.Generator().manual_seed(12)
    conv = randomised(GraphAttention(3, 2, heads=2), g)
    edge_index = torch.tensor([[0, 0, 1, 2, 2, 2], [1, 1, 2, 1, 1, 0]])
    x = torch.randn(3, 3, generator=g)
    res = conv(x, edge_index, return_attention=True)
    ref, _, alpha = naive_gat(conv, x, edge_index)
    torch.testing.assert_close(res.output.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.alpha.double(), torch.tensor(alpha, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.alpha[0], res.alpha[1])  # the two copies of 0 -> 1 weigh the same
    dedup = conv(x, edge_index[:, 1:])
    assert not torch.allclose(dedup[1], res.output[1])  # ... and together they weigh more than one


def test_isolated_node_gets_bias_only_and_finite_grads():
    g = torch.Generator().manual_seed(1)
    conv = randomised(GraphAttention(3, 2, heads=2, add_self_loops=False), g)
    edge_index = torch.tensor([[0, 1], [1, 0]])  # node 2 and 3 receive nothing
    x = torch.randn(2, 4, 3, requires_grad=True)
    out = conv(x, edge_index)
    torch.testing.assert_close(out[:, 2:], conv.bias.detach().expand(2, 2, 4), rtol=0, atol=0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.att_src.grad).all()
    assert x.grad[:, 2:].abs().sum() == 0  # isolated and unreferenced nodes influence nothing
    # An empty graph gives the bias everywhere (self loops off) or a per-node projection (on).
    empty = torch.zeros(2, 0, dtype=torch.long)
    torch.testing.assert_close(conv(x, empty), conv.bias.detach().expand(2, 4, 4), rtol=0, atol=0)
    conv.add_self_loops = True
    torch.testing.assert_close(conv(x, empty), conv.lin(x) + conv.bias.detach())


def test_batched_equals_per_sample():
    g = torch.Generator().manual_seed(2)
    conv = randomised(GraphAttention(6, 5, heads=3), g)
    edge_index = random_edges(12, 40, g, self_loops=3)
    x = torch.randn(4, 12, 6, generator=g)
    res = conv(x, edge_index, return_attention=True)
    assert res.output.shape == (4, 12, 15) and res.alpha.shape == (4, 40 + 12, 3)
    for b in range(4):
        one = conv(x[b], edge_index, return_attention=True)
        torch.testing.assert_close(res.output[b], one.output, rtol=0, atol=1e-6)
        torch.testing.assert_close(res.alpha[b], one.alpha, rtol=0, atol=1e-7)
        assert torch.equal(res.edge_index_used, one.edge_index_used)


def test_attention_sums_to_one_per_target_and_is_stable_for_huge_logits():
    g = torch.Generator().manual_seed(3)
    conv = randomised(GraphAttention(4, 3, heads=2), g)
    with torch.no_grad():  # logits of order 1e4: a softmax without the per-target max overflows
        conv.att_src.mul_(1e4)
        conv.att_dst.mul_(1e4)
    edge_index = random_edges(10, 30, g)
    res = conv(torch.randn(3, 10, 4, generator=g), edge_index, return_attention=True)
    assert torch.isfinite(res.output).all()
    sums = torch.zeros(3, 10, 2).index_add_(1, res.edge_index_used[1], res.alpha)
    torch.testing.assert_close(sums, torch.ones(3, 10, 2))
    assert ((res.alpha >= 0) & (res.alpha <= 1)).all()


def test_permutation_equivariance_and_edge_order_invariance():
    g = torch.Generator().manual_seed(4)
    conv = randomised(GraphAttention(4, 3, heads=2, concat=False), g)
    edge_index = random_edges(8, 20, g, self_loops=2)
    x = torch.randn(2, 8, 4, generator=g)
    out = conv(x, edge_index)
    perm = torch.randperm(8, generator=g)
    inv = torch.argsort(perm)  # node perm[k] becomes node k
    torch.testing.assert_close(conv(x[:, perm], inv[edge_index]), out[:, perm])
    shuffled = edge_index[:, torch.randperm(edge_index.shape[1], generator=g)]
    torch.testing.assert_close(conv(x, shuffled), out)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    conv = randomised(GraphAttention(3, 2, heads=2, dtype=torch.float64), g)
    edge_index = torch.tensor([[0, 1, 2, 3, 1, 2], [1, 2, 0, 0, 1, 3]])  # one existing loop (1, 1)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    names = [name for name, _ in conv.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in conv.parameters())

    def f(x, *ps):
        return torch.func.functional_call(conv, dict(zip(names, ps)), (x, edge_index))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_parameters_and_init_follow_pyg():
    conv = GraphAttention(16, 8, heads=4)
    shapes = {name: tuple(p.shape) for name, p in conv.named_parameters()}
    assert shapes == {"lin.weight": (32, 16), "att_src": (1, 4, 8), "att_dst": (1, 4, 8), "bias": (32,)}
    assert conv.lin.bias is None and (conv.bias == 0).all()
    assert GraphAttention(16, 8, heads=4, concat=False).bias.shape == (8,)
    assert GraphAttention(16, 8, bias=False).bias is None
    big = GraphAttention(200, 50, heads=8)
    for p, fan in [(big.lin.weight, 200 + 400), (big.att_src, 8 + 50), (big.att_dst, 8 + 50)]:
        bound = math.sqrt(6.0 / fan)  # glorot over the last two dims, as PyG's inits.glorot
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    a = GraphAttention(4, 3, heads=2)
    b = GraphAttention(4, 3, heads=2)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_attention_dropout_training_only_and_seeded():
    g = torch.Generator().manual_seed(8)
    conv = randomised(GraphAttention(4, 3, heads=2, dropout=0.5), g)
    edge_index = random_edges(10, 30, g)
    x = torch.randn(2, 10, 4, generator=g)
    clean = conv(x, edge_index, return_attention=True)
    conv.train()
    r1 = conv(x, edge_index, return_attention=True, generator=torch.Generator().manual_seed(0))
    r2 = conv(x, edge_index, return_attention=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r1.output, r2.output, rtol=0, atol=0)
    dropped = r1.alpha == 0
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(r1.alpha[~dropped], 2 * clean.alpha[~dropped])
    assert not torch.allclose(r1.output, clean.output)
    conv.eval()
    torch.testing.assert_close(conv(x, edge_index), clean.output, rtol=0, atol=0)


def test_add_self_loops_helper_follows_pyg_order():
    edge_index = torch.tensor([[0, 2, 1, 2], [1, 2, 0, 2]])
    expected = torch.tensor([[0, 1, 0, 1, 2], [1, 0, 0, 1, 2]])
    assert torch.equal(add_self_loops(edge_index, 3), expected)


def test_segment_softmax_matches_per_segment_softmax():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 2, generator=g, dtype=torch.float64) * 50
    index = torch.tensor([2, 0, 2, 2, 0, 4, 0])
    out = segment_softmax(logits, index, 5, dim=1)
    for s in range(5):
        sel = index == s
        if sel.any():
            torch.testing.assert_close(out[:, sel], logits[:, sel].softmax(dim=1))
    all_masked = segment_softmax(torch.full((3,), float("-inf")), torch.tensor([0, 0, 1]), 2)
    assert torch.equal(all_masked, torch.zeros(3))
    half = segment_softmax(logits.to(torch.bfloat16), index, 5, dim=1)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"index: expected shape \(7,\)"):
        segment_softmax(logits, index[:-1], 5, dim=1)


@pytest.mark.parametrize(("edge_index", "match"), [
    (torch.tensor([[0, 1], [1, 2]], dtype=torch.int32),
     r"edge_index: expected an int64.*torch.int32 of shape \(2, 2\)"),
    (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), r"edge_index: expected an int64.*torch.float32"),
    (torch.tensor([[0, 1, 2]]), r"edge_index: expected .*\(2, E\).*got torch.int64 of shape \(1, 3\)"),
    (torch.tensor([0, 1]), r"edge_index: .*got torch.int64 of shape \(2,\)"),
    (torch.tensor([[0, 1], [1, 5]]), r"edge_index: expected node indices in \[0, 5\).*\[0, 5\] in shape \(2, 2\)"),
    (torch.tensor([[0, -1], [1, 2]]), r"edge_index: expected node indices in \[0, 5\).*\[-1, 2\]"),
])
def test_rejects_bad_edge_index(edge_index, match):
    conv = GraphAttention(3, 2)
    with pytest.raises(ValueError, match=match):
        conv(torch.randn(2, 5, 3), edge_index)
    with pytest.raises(ValueError, match="edge_index"):
        add_self_loops(edge_index, 5)


@pytest.mark.parametrize("shape", [(2, 5, 4), (5,), (1, 2, 5, 3)])
def test_rejects_bad_x(shape):
    with pytest.raises(ValueError, match=r"x: expected \(B, N, 3\) or \(N, 3\), got"):
        GraphAttention(3, 2)(torch.randn(*shape), torch.tensor([[0], [1]]))


def test_rejects_edge_index_on_other_device():
    with pytest.raises(ValueError, match="edge_index: expected a tensor on cpu"):
        GraphAttention(3, 2)(torch.randn(5, 3), torch.zeros(2, 1, dtype=torch.long, device="meta"))


def test_bf16_autocast_softmax_in_float32():
    g = torch.Generator().manual_seed(10)
    conv = randomised(GraphAttention(8, 4, heads=3), g)
    edge_index = random_edges(16, 60, g, self_loops=4)
    x = torch.randn(2, 16, 8, generator=g)
    ref = conv(x, edge_index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = conv(x, edge_index, return_attention=True)
    assert res.output.dtype == torch.bfloat16 and res.alpha.dtype == torch.float32
    sums = torch.zeros(2, 16, 3).index_add_(1, res.edge_index_used[1], res.alpha)
    torch.testing.assert_close(sums, torch.ones(2, 16, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.output.float(), ref, rtol=0.05, atol=0.05)


def test_compiles():
    g = torch.Generator().manual_seed(11)
    conv = randomised(GraphAttention(4, 3, heads=2), g)
    edge_index = random_edges(10, 30, g, self_loops=2)
    x = torch.randn(2, 10, 4, generator=g)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, edge_index), conv(x, edge_index))


def test_a_shared_edge_index_is_range_checked_once_until_it_changes(monkeypatch):
    import blockyard.blocks.graph as graph_mod

    calls = []
    real = graph_mod._check_edge_index
    monkeypatch.setattr(graph_mod, "_check_edge_index", lambda *a, **k: (calls.append(1), real(*a, **k)))
    layer = GraphAttention(4, 3)
    x = torch.randn(2, 5, 4)
    edges = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    for _ in range(3):
        layer(x, edges)
    assert len(calls) == 1  # one host sync for a graph reused every call
    edges[1, 3] = 7  # modified in place: checked again, and the bad index is caught
    with pytest.raises(ValueError, match="edge_index"):
        layer(x, edges)
    layer(x, edges.clone().clamp_(max=4))  # a new tensor: checked
    layer(x[:, :4], torch.tensor([[0, 1], [1, 2]]))
    assert len(calls) == 4
    import copy
    import pickle

    clone = pickle.loads(pickle.dumps(layer))  # the cached weak reference is not pickled
    torch.testing.assert_close(clone(x, edges.clamp(max=4)), layer(x, edges.clamp(max=4)))
    copy.deepcopy(layer)
