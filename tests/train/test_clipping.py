import math

import pytest
import torch
from torch import nn

from blockyard.train.clipping import adaptive_clip_grad_, clip_gradients, unitwise_norm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Linear(8, 6)
        self.gain = nn.Parameter(torch.zeros(6))  # zero-init: only the eps floor lets it move
        self.head = nn.Linear(6, 2)


def net_with_grads(seed=0, grad_scale=1.0, spread=False):
    """Random gradients; with ``spread`` each unit's scale varies over 1e-4..10 so AGC both clips
    and leaves alone units of the same parameter."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net()
    for p in net.parameters():
        grad = torch.randn(p.shape, generator=g) * grad_scale
        if spread and p.ndim > 1:
            grad = grad * 10 ** torch.empty(p.shape[0], *[1] * (p.ndim - 1)).uniform_(-4, 1, generator=g)
        p.grad = grad
    return net


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def naive_agc(net, clip_factor, eps):
    """AGC written unit by unit (NFNets / timm semantics) with Python loops."""
    out = {}
    for name, p in net.named_parameters():
        w, g = p.detach().double(), p.grad.detach().double().clone()
        units = [slice(None)] if p.ndim <= 1 else range(p.shape[0])
        for i in units:
            max_norm = clip_factor * max(math.sqrt(float((w[i] ** 2).sum())), eps)
            g_norm = math.sqrt(float((g[i] ** 2).sum()))
            if g_norm > max_norm:
                g[i] = g[i] * (max_norm / g_norm)
        out[name] = g.float()
    return out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_norm_equals_torch_clip_grad_norm(norm_type, max_norm):
    ours, ref = net_with_grads(), net_with_grads()
    total = clip_gradients(ours.parameters(), "norm", max_norm, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    for (n, g), (_, h) in zip(grads(ours).items(), grads(ref).items()):
        torch.testing.assert_close(g, h, rtol=0, atol=0, msg=n)


def test_returns_pre_clip_norm_and_clips_to_value():
    net = net_with_grads(grad_scale=10.0)
    before = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    total = clip_gradients(net, "norm", 1.0)
    assert isinstance(total, torch.Tensor) and total.dim() == 0
    torch.testing.assert_close(total, before)
    after = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert before > 10 and after == pytest.approx(1.0, rel=1e-5)


def test_value_clamps_elements_and_returns_pre_clip_norm():
    net, ref = net_with_grads(grad_scale=3.0), net_with_grads(grad_scale=3.0)
    before = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    total = clip_gradients(net.parameters(), "value", 0.5)
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.5)
    torch.testing.assert_close(total, before)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.grad.abs().max() <= 0.5
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_unitwise_norm_units():
    w = torch.randn(4, 3, 2, 2)
    expected = torch.stack([w[i].flatten().norm() for i in range(4)]).view(4, 1, 1, 1)
    torch.testing.assert_close(unitwise_norm(w), expected)
    b = torch.randn(5)
    n = unitwise_norm(b)
    assert n.shape == () and n == b.norm()  # a 1-D parameter is ONE unit (timm)


@pytest.mark.parametrize("clip_factor", [0.01, 0.1])
def test_agc_matches_naive_unitwise_loop(clip_factor):
    net = net_with_grads(spread=True)
    expected = naive_agc(net, clip_factor, 1e-3)
    before = grads(net)
    adaptive_clip_grad_(net.parameters(), clip_factor=clip_factor, eps=1e-3)
    after = grads(net)
    changed = unchanged = 0
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-10, msg=name)
        same = (after[name] == before[name]).flatten(1).all(1) if after[name].ndim > 1 else \
            (after[name] == before[name]).all().view(1)
        changed += int((~same).sum())
        unchanged += int(same.sum())
    assert changed > 0 and unchanged > 0  # both branches exercised


def test_agc_eps_floor_moves_zero_init_parameter():
    net = net_with_grads()
    adaptive_clip_grad_(net, clip_factor=0.01, eps=1e-3)
    # gain is zero: its whole-vector grad norm is clipped to clip_factor * eps
    assert net.gain.grad.norm().item() == pytest.approx(0.01 * 1e-3, rel=1e-5)


def test_agc_via_clip_gradients_with_exclude_head():
    net, ref = net_with_grads(grad_scale=0.05), net_with_grads(grad_scale=0.05)
    expected = naive_agc(ref, 0.02, 1e-3)
    head_before = {n: p.grad.clone() for n, p in net.head.named_parameters()}
    included = [p.grad.clone().flatten() for n, p in net.named_parameters() if not n.startswith("head")]
    total = clip_gradients(net, "agc", 0.02, exclude="head")
    torch.testing.assert_close(total, torch.cat(included).norm())
    for n, p in net.named_parameters():
        if n.startswith("head"):
            torch.testing.assert_close(p.grad, head_before[n[5:]], rtol=0, atol=0)
        else:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-8)


def test_agc_bf16_close_to_float32():
    net = net_with_grads(grad_scale=0.05)
    expected = naive_agc(net, 0.01, 1e-3)
    for p in net.parameters():
        p.data = p.data.bfloat16()
        p.grad = p.grad.bfloat16()
    adaptive_clip_grad_(net, 0.01)
    for n, p in net.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), expected[n], rtol=2e-2, atol=1e-5)


def make_exclusions(net):
    return {
        "name": "head",
        "glob": ["head.*"],
        "tensors": [net.head.weight, net.head.bias],
        "pairs": net.head.named_parameters(),
        "module": net.head,
        "predicate": lambda name, p: name.startswith("head."),
    }


@pytest.mark.parametrize("kind", ["name", "glob", "tensors", "pairs", "module", "predicate"])
def test_exclude_forms_leave_head_alone(kind):
    net = net_with_grads(grad_scale=10.0)
    exclude = make_exclusions(net)[kind]
    head_before = [net.head.weight.grad.clone(), net.head.bias.grad.clone()]
    rest = [p.grad.clone().flatten() for n, p in net.named_parameters() if not n.startswith("head")]
    total = clip_gradients(net.named_parameters(), "norm", 1.0, exclude=exclude)
    torch.testing.assert_close(total, torch.cat(rest).norm())
    torch.testing.assert_close(net.head.weight.grad, head_before[0], rtol=0, atol=0)
    torch.testing.assert_close(net.head.bias.grad, head_before[1], rtol=0, atol=0)
    rest_after = torch.cat([p.grad.flatten() for n, p in net.named_parameters() if not n.startswith("head")])
    assert rest_after.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_exclude_bias_glob():
    net = net_with_grads(grad_scale=10.0)
    biases = {n: p.grad.clone() for n, p in net.named_parameters() if n.endswith(".bias")}
    clip_gradients(net, "value", 0.1, exclude="*.bias")
    for n, p in net.named_parameters():
        if n in biases:
            assert torch.equal(p.grad, biases[n])
        else:
            assert p.grad.abs().max() <= 0.1


def test_tied_parameter_counted_once_and_missing_grads_skipped():
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    no_grad = nn.Parameter(torch.ones(2))
    total = clip_gradients([w, w, no_grad], "norm", 100.0)
    assert total.item() == pytest.approx(math.sqrt(12.0))
    assert clip_gradients([no_grad], "norm", 1.0).item() == 0.0


def test_bad_arguments():
    net = net_with_grads()
    with pytest.raises(ValueError, match="algorithm"):
        clip_gradients(net, "l2")
    with pytest.raises(ValueError, match="value"):
        clip_gradients(net, "norm", 0.0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_gradients(net, "norm", 1.0, norm_type=-1)
    with pytest.raises(ValueError, match="exclude: name patterns need named"):
        clip_gradients(list(net.parameters()), "norm", 1.0, exclude="head")
    with pytest.raises(TypeError, match="exclude"):
        clip_gradients(net, "norm", 1.0, exclude=[3])
    with pytest.raises(TypeError, match="params"):
        clip_gradients([1.0], "norm", 1.0)
    with pytest.raises(ValueError, match="clip_factor"):
        adaptive_clip_grad_(net, clip_factor=0.0)
