import math

import pytest
import torch
from torch import nn

from blockyard.blocks import KeyGate, MixtureOfExperts, MoEOutput, SoftGate, TopKGate
from blockyard.losses import switch_balance_loss

E, D, OUT = 4, 6, 3


class Expert(nn.Module):
    """A small non-linear expert that records the rows it was called on."""

    def __init__(self, in_dim=D, out_shape=(OUT,)):
        super().__init__()
        self.out_shape = out_shape
        self.a = nn.Linear(in_dim, 5)
        self.b = nn.Linear(5, math.prod(out_shape))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return self.b(torch.tanh(self.a(x))).view(x.shape[0], *self.out_shape)


def make_gate(kind, k=2):
    if kind == "key":
        return KeyGate(10, E)
    if kind == "soft":
        return SoftGate(D, E)
    return TopKGate(D, E, k=k)


def reference_weights(gate, x, key):
    """The routing rule, row by row, from the gate's definition (not its code)."""
    weights = torch.zeros(x.shape[0], E)
    for b in range(x.shape[0]):
        if isinstance(gate, KeyGate):
            weights[b, int(gate.table[key[b]])] = 1.0
            continue
        logits = gate.router(x[b]).double()
        if isinstance(gate, SoftGate):
            weights[b] = (logits.exp() / logits.exp().sum()).float()
            continue
        logits = logits.detach()
        order = sorted(range(E), key=lambda e: -float(logits[e]))[: gate.k]
        denom = sum(math.exp(float(logits[e])) for e in order)
        for e in order:
            weights[b, e] = math.exp(float(logits[e])) / denom
    return weights


def reference_output(moe, x, weights):
    """Naive loop over rows and experts: y_b = sum_e w_be * f_e(x_b)."""
    rows = []
    for b in range(x.shape[0]):
        acc = 0.0
        for e, expert in enumerate(moe.experts):
            if weights[b, e] != 0:
                acc = acc + weights[b, e] * expert(x[b:b + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("out_shape", [(OUT,), (2, 3)])
@pytest.mark.parametrize("kind", ["key", "soft", "topk"])
def test_output_matches_naive_reference(kind, out_shape):
    moe = MixtureOfExperts([Expert(out_shape=out_shape) for _ in range(E)], make_gate(kind))
    x, key = torch.randn(9, D), torch.randint(0, 10, (9,))
    out = moe(x, key=key)
    assert isinstance(out, MoEOutput) and out.output.shape == (9, *out_shape)
    weights = reference_weights(moe.gate, x, key)
    torch.testing.assert_close(out.weights, weights)
    torch.testing.assert_close(out.output, reference_output(moe, x, weights))


@pytest.mark.parametrize("kind", ["key", "topk"])
def test_only_selected_experts_receive_their_rows_in_one_call(kind):
    experts = [Expert() for _ in range(E)]
    moe = MixtureOfExperts(experts, make_gate(kind))
    x = torch.randn(16, D)
    key = torch.tensor([0, 2, 4, 6] * 4)  # KeyGate: experts 0 and 2 only
    out = moe(x, key=key)
    for e, expert in enumerate(experts):
        rows = out.weights[:, e].nonzero().flatten()
        if rows.numel() == 0:
            assert expert.calls == []  # never called, not even on an empty batch
        else:
            assert len(expert.calls) == 1  # one call per expert: no loop over the batch
            torch.testing.assert_close(expert.calls[0], x[rows], rtol=0, atol=0)
    total_rows = sum(c[0].shape[0] for c in (ex.calls for ex in experts) if c)
    assert total_rows == (16 if kind == "key" else 32)
    if kind == "key":
        assert experts[1].calls == [] and experts[3].calls == []


def test_unselected_experts_get_no_grad_and_selected_do():
    experts = [Expert() for _ in range(E)]
    moe = MixtureOfExperts(experts, KeyGate(4, E))
    moe(torch.randn(8, D), key=torch.tensor([0, 2] * 4)).output.sum().backward()
    for e in (1, 3):
        assert all(p.grad is None or not p.grad.any() for p in experts[e].parameters())
    for e in (0, 2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts[e].parameters())


def test_topk_grad_reaches_router_and_only_routed_experts():
    torch.manual_seed(3)
    experts = [Expert() for _ in range(E)]
    moe = MixtureOfExperts(experts, TopKGate(D, E, k=1))
    x = torch.randn(3, D)
    out = moe(x)
    out.output.square().sum().backward()
    used = set(out.weights.nonzero()[:, 1].tolist())
    assert len(used) < E  # 3 rows, k=1: at least one expert idle
    for e, expert in enumerate(experts):
        got = [p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()]
        assert all(got) if e in used else not any(got)
    assert moe.gate.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,k", [("key", 1), ("soft", E), ("topk", 1), ("topk", 2), ("topk", 3), ("topk", E)])
def test_weights_sum_to_one_with_zeros_exactly_where_unselected(kind, k):
    gate = make_gate(kind, k=k)
    g = gate(torch.randn(32, D), key=torch.randint(0, 10, (32,)))
    torch.testing.assert_close(g.weights.sum(-1), torch.ones(32))
    assert torch.equal(g.weights != 0, g.selected)
    assert (g.selected.sum(-1) == k).all()
    assert torch.equal(g.weights.gather(1, g.indices) != 0, torch.ones_like(g.indices, dtype=torch.bool))
    assert g.aux_loss.shape == () and g.aux_loss.dtype == torch.float32


def test_top1_is_hard_but_router_still_learns():
    x = torch.randn(16, D)
    gate = TopKGate(D, E, k=1)
    g = gate(x)
    assert torch.equal(g.weights, g.selected.float())  # value exactly one-hot
    (g.weights * torch.randn(16, E)).sum().backward()
    assert gate.router.weight.grad.abs().sum() > 0  # straight-through softmax gradient
    plain = TopKGate(D, E, k=1, top1_grad=False)
    p = plain(x)
    (p.weights * torch.randn(16, E)).sum().backward()
    # renormalised top-1 weight is identically 1: no router gradient (Megatron-LM #894)
    assert plain.router.weight.grad is None or not plain.router.weight.grad.any()


def test_topk_with_k_equal_e_is_the_soft_gate_and_runs_densely():
    experts = [Expert() for _ in range(E)]
    topk, soft = TopKGate(D, E, k=E), SoftGate(D, E)
    soft.router.load_state_dict(topk.router.state_dict())
    x = torch.randn(8, D)
    a, b = MixtureOfExperts(experts, topk)(x), MixtureOfExperts(experts, soft)(x)
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.output, b.output)
    assert all(len(ex.calls) == 2 and ex.calls[0].shape[0] == 8 for ex in experts)


def test_keygate_modulo_and_table():
    x = torch.zeros(10, 1)
    keys = torch.arange(10)
    assert KeyGate(10, 4)(x, key=keys).indices.flatten().tolist() == [i % 4 for i in range(10)]
    table = [3, 3, 0, 1, 2, 0, 0, 1, 2, 3]
    g = KeyGate(10, 4, table=table)(x, key=keys.flip(0))
    assert g.indices.flatten().tolist() == table[::-1]
    assert torch.equal(g.weights, torch.eye(4)[table[::-1]])
    assert g.logits is None and g.aux_loss.item() == 0.0
    assert "table" in KeyGate(10, 4, table=table).state_dict()


def test_noisy_gate_follows_shazeer_formula_with_a_generator_and_is_off_in_eval():
    gate = TopKGate(D, E, k=2, noisy=True)
    assert not gate.noise.weight.any()  # zero-init as in tensor2tensor
    with torch.no_grad():
        gate.noise.weight.normal_()
    x = torch.randn(8, D)
    clean = gate.router(x)
    g1 = gate(x, generator=torch.Generator().manual_seed(7))
    g2 = gate(x, generator=torch.Generator().manual_seed(7))
    g3 = gate(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(g1.logits, g2.logits) and torch.equal(g1.weights, g2.weights)
    assert not torch.allclose(g1.logits, g3.logits)
    eps = torch.randn(8, E, generator=torch.Generator().manual_seed(7))
    std = torch.log1p(torch.exp(x @ gate.noise.weight.T)) + 0.01
    torch.testing.assert_close(g1.logits, clean + eps * std)
    gate.eval()
    e1 = gate(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(e1.logits, clean)
    torch.testing.assert_close(e1.weights, reference_weights(gate, x, None))


def test_learned_temperature_divides_logits_and_gets_gradient():
    gate = TopKGate(D, E, k=2, learn_temperature=True)
    x = torch.randn(8, D)
    before = gate(x)
    with torch.no_grad():
        gate.log_temperature.fill_(math.log(2.0))
    after = gate(x)
    torch.testing.assert_close(after.logits, before.logits / 2)
    assert torch.equal(after.indices, before.indices)  # temperature only sharpens or flattens
    (after.weights * torch.randn(8, E)).sum().backward()
    assert gate.log_temperature.grad is not None and gate.log_temperature.grad != 0
    gate.reset_parameters()
    assert gate.log_temperature.item() == 0.0


def test_aux_losses():
    x = torch.randn(32, D)
    g = TopKGate(D, E, k=2)(x)
    probs = torch.softmax(g.logits, -1)
    torch.testing.assert_close(g.aux_loss, switch_balance_loss(probs, probs.argmax(-1)))
    z = TopKGate(D, E, k=2, z_loss_coef=0.5)
    gz = z(x)
    zl = torch.logsumexp(gz.logits, -1).square().mean()
    probs_z = torch.softmax(gz.logits, -1)
    torch.testing.assert_close(gz.aux_loss, switch_balance_loss(probs_z, probs_z.argmax(-1)) + 0.5 * zl)
    assert SoftGate(D, E)(x).aux_loss.item() == 0.0
    s = SoftGate(D, E, z_loss_coef=1e-3)(x)
    torch.testing.assert_close(s.aux_loss, 1e-3 * torch.logsumexp(s.logits, -1).square().mean())
    out = MixtureOfExperts([Expert() for _ in range(E)], KeyGate(4, E))(x, key=torch.zeros(32, dtype=torch.long))
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0


def test_tuple_input_and_separate_gate_input():
    class SideExpert(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D + 2, OUT)

        def forward(self, x, side):
            return self.lin(torch.cat([x, side], -1))

    experts = [SideExpert() for _ in range(E)]
    moe = MixtureOfExperts(experts, TopKGate(2, E, k=2, hidden=16))
    x, side = torch.randn(7, D), torch.randn(7, 2)
    out = moe((x, side), gate_input=side)
    weights = reference_weights(moe.gate, side, None)
    torch.testing.assert_close(out.weights, weights)
    expect = torch.stack([sum(weights[b, e] * experts[e](x[b:b + 1], side[b:b + 1])[0]
                              for e in range(E) if weights[b, e] != 0) for b in range(7)])
    torch.testing.assert_close(out.output, expect)
    assert (out.weights != 0).sum(-1).eq(2).all()


def test_empty_batch():
    out = MixtureOfExperts([Expert() for _ in range(E)], TopKGate(D, E))(torch.randn(0, D))
    assert out.output.shape == (0, OUT) and out.weights.shape == (0, E)


def test_rejects_bad_input():
    moe = MixtureOfExperts([Expert() for _ in range(E)], TopKGate(D, E))
    with pytest.raises(ValueError, match=r"x: expected \(B, 6\), got \(2, 5\)"):
        moe(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"x: expected \(B, 6\), got \(2, 3, 6\)"):
        SoftGate(D, E)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= num_experts \(4\), got k=5"):
        TopKGate(D, E, k=5)
    with pytest.raises(ValueError, match=r"k: expected"):
        TopKGate(D, E, k=0)
    with pytest.raises(ValueError, match=r"gate_input: expected \(3, \*\), got \(2, 2\)"):
        moe(torch.randn(3, D), gate_input=torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"x: expected tensors sharing the batch size 3"):
        moe((torch.randn(3, D), torch.randn(2, 1)))
    with pytest.raises(ValueError, match=r"gate: expected num_experts == len\(experts\) \(3\), got 4"):
        MixtureOfExperts([Expert() for _ in range(3)], TopKGate(D, E))


def test_keygate_rejects_bad_keys():
    moe = MixtureOfExperts([Expert() for _ in range(E)], KeyGate(6, E))
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match=r"key: KeyGate routes by an integer key, expected \(3,\), got None"):
        moe(x)
    with pytest.raises(ValueError, match=r"key: expected \(3,\), got \(3, 1\)"):
        moe(x, key=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key: expected values in \[0, 6\), got values in \[0, 6\]"):
        moe(x, key=torch.tensor([0, 6, 2]))
    with pytest.raises(ValueError, match=r"key: expected values in \[0, 6\), got values in \[-1, 2\]"):
        moe(x, key=torch.tensor([0, -1, 2]))
    with pytest.raises(TypeError, match=r"key: expected an integer tensor"):
        moe(x, key=torch.zeros(3))
    with pytest.raises(ValueError, match=r"table: expected \(6,\), got \(5,\)"):
        KeyGate(6, E, table=[0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"table: expected expert indices in \[0, 4\)"):
        KeyGate(6, E, table=[0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("kind", ["key", "soft", "topk"])
def test_bf16_autocast(kind):
    moe = MixtureOfExperts([nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, OUT)) for _ in range(E)],
                           make_gate(kind))
    x, key = torch.randn(16, D), torch.randint(0, 10, (16,))
    ref = moe(x, key=key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, key=key)
    assert out.output.dtype == torch.bfloat16 and torch.isfinite(out.output).all()
    assert out.weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.weights, ref.weights, rtol=0.05, atol=0.02)
    torch.testing.assert_close(out.output.float(), ref.output, rtol=0.05, atol=0.05)


class PlainExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, 5), nn.Linear(5, OUT)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_compiles_sparse_dispatch_with_graph_break_and_no_recompiles_per_routing():
    # the sparse dispatch needs per-expert row counts on the host: fullgraph=False; dynamo skips
    # the dispatch frame and compiles each expert's forward as its own dynamic-row-count graph
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    moe = MixtureOfExperts([PlainExpert() for _ in range(E)], TopKGate(D, E, k=2))
    compiled = torch.compile(moe, backend=backend, fullgraph=False)
    for step, batch in enumerate((8, 8, 11, 16, 9, 13, 10)):
        if step == 4:
            warm = len(graphs)
        x = torch.randn(batch, D)
        got, ref = compiled(x), moe(x)
        torch.testing.assert_close(got.output, ref.output)
        torch.testing.assert_close(got.weights, ref.weights)
    assert len(graphs) == warm  # new batch sizes and routing patterns reuse the graphs
    assert sum("PlainExpert" in str(g.code) or "tanh" in str(g.code) for g in graphs) >= 1  # experts compiled


def test_compiles_dense_gate_fullgraph():
    moe = MixtureOfExperts([nn.Linear(D, OUT) for _ in range(E)], SoftGate(D, E))
    x = torch.randn(8, D)
    got = torch.compile(moe, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got.output, moe(x).output)
