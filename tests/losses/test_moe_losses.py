import math

import pytest
import torch

from blockyard.losses import router_z_loss, switch_balance_loss


def paper_switch_loss(probs, index):
    """Switch Transformer eq. 4, written with loops: E * sum_e f_e * P_e."""
    tokens, experts = probs.shape
    total = 0.0
    for e in range(experts):
        f = sum(1 for t in range(tokens) if int(index[t]) == e) / tokens
        p = sum(float(probs[t, e]) for t in range(tokens)) / tokens
        total += f * p
    return experts * total


@pytest.mark.parametrize("experts", [1, 2, 4, 8])
def test_switch_loss_is_one_at_uniform_routing(experts):
    tokens = 4 * experts
    probs = torch.full((tokens, experts), 1.0 / experts)
    index = torch.arange(tokens) % experts
    torch.testing.assert_close(switch_balance_loss(probs, index), torch.tensor(1.0))


def test_switch_loss_is_e_when_collapsed_and_above_one_when_skewed():
    probs = torch.zeros(12, 4)
    probs[:, 0] = 1.0
    collapsed = switch_balance_loss(probs, torch.zeros(12, dtype=torch.long))
    torch.testing.assert_close(collapsed, torch.tensor(4.0))
    skewed = torch.softmax(torch.randn(64, 4) + torch.tensor([2.0, 0, 0, 0]), -1)
    assert switch_balance_loss(skewed, skewed.argmax(-1)) > 1.0


def test_switch_loss_matches_paper_formula():
    probs = torch.softmax(torch.randn(37, 5), -1)
    index = torch.randint(0, 5, (37,))
    loss = switch_balance_loss(probs, index)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(paper_switch_loss(probs, index)))


def test_switch_loss_topk_index_is_mixtral_loss_divided_by_k():
    probs = torch.softmax(torch.randn(20, 6), -1)
    index = probs.topk(2, -1).indices
    # HF transformers load_balancing_loss_func: E * sum_{k,e} mean_t onehot(topk)[k, e] * mean_t p[e]
    tokens_per_expert = torch.nn.functional.one_hot(index, 6).float().mean(0)  # (K, E)
    hf = 6 * (tokens_per_expert * probs.mean(0)).sum()
    torch.testing.assert_close(switch_balance_loss(probs, index), hf / 2)
    uniform = torch.full((6, 6), 1 / 6)
    pairs = torch.stack([torch.arange(6), (torch.arange(6) + 1) % 6], -1)
    torch.testing.assert_close(switch_balance_loss(uniform, pairs), torch.tensor(1.0))


def test_switch_loss_gradient_flows_through_probs_only():
    probs = torch.softmax(torch.randn(10, 3), -1).requires_grad_()
    index = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    switch_balance_loss(probs, index).backward()
    f = torch.tensor([5, 3, 2]) / 10
    # d/dp_{t,e} of E * sum_e f_e * mean_t p_{t,e} = E * f_e / T
    torch.testing.assert_close(probs.grad, (3 * f / 10).expand(10, 3))


def test_router_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # rows: logsumexp = log 2 and log 4 = 2 log 2, so mean of squares = (1 + 4) / 2 * log(2)^2
    expect = 2.5 * math.log(2.0) ** 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expect))
    batched = router_z_loss(logits.expand(3, 2, 2))
    torch.testing.assert_close(batched, torch.tensor(expect))


def test_router_z_loss_runs_in_float32_for_bf16_logits():
    logits = (torch.randn(16, 8) * 30).bfloat16()
    z = router_z_loss(logits)
    assert z.dtype == torch.float32 and torch.isfinite(z)
    expect = torch.logsumexp(logits.double(), -1).square().mean()
    torch.testing.assert_close(z.double(), expect, rtol=1e-5, atol=0)
    assert switch_balance_loss(logits.softmax(-1), logits.argmax(-1)).dtype == torch.float32


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match=r"probs: expected \(T, E\), got \(4,\)"):
        switch_balance_loss(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert_index: expected \(4,\) or \(4, K\), got \(3,\)"):
        switch_balance_loss(torch.rand(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert_index: expected \(4,\) or \(4, K\), got \(4, 1, 1\)"):
        switch_balance_loss(torch.rand(4, 2), torch.zeros(4, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expert_index: expected an integer tensor"):
        switch_balance_loss(torch.rand(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"logits: expected \(T, E\) with E >= 1, got \(5,\)"):
        router_z_loss(torch.randn(5))
