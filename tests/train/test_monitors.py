import math

import pytest
import torch
from torch import nn

from blockyard.train import ActivationMonitor, ActivationStats, GradNormMonitor, NonFiniteGuard


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
        self.head = nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.frozen(self.head(self.encoder(x)) * self.scale)


def net_with_grads() -> Net:
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(5, 3)).pow(2).sum().backward()
    return net


def naive_group_norms(net: nn.Module, groups: dict[str, list[str]]) -> dict[str, float]:
    params = dict(net.named_parameters())
    out = {}
    for group, names in groups.items():
        sq = [params[n].grad.double().pow(2).sum() for n in names if params[n].grad is not None]
        out[group] = math.sqrt(sum(float(s) for s in sq))
    out["total"] = math.sqrt(sum(v**2 for v in out.values()))
    return out


GROUPS = {  # named_parameters order: the root's own parameters first
    1: {"scale": ["scale"],
        "encoder": ["encoder.0.weight", "encoder.0.bias", "encoder.1.0.weight", "encoder.1.0.bias"],
        "head": ["head.weight", "head.bias"], "unused": ["unused.weight", "unused.bias"]},
    2: {"scale": ["scale"], "encoder.0": ["encoder.0.weight", "encoder.0.bias"],
        "encoder.1": ["encoder.1.0.weight", "encoder.1.0.bias"], "head": ["head.weight", "head.bias"],
        "unused": ["unused.weight", "unused.bias"]},
    None: {"scale": ["scale"], "encoder.0": ["encoder.0.weight", "encoder.0.bias"],
           "encoder.1.0": ["encoder.1.0.weight", "encoder.1.0.bias"], "head": ["head.weight", "head.bias"],
           "unused": ["unused.weight", "unused.bias"]},
}


@pytest.mark.parametrize("depth", [1, 2, None])
def test_grad_norms_per_module_match_naive_loop(depth):
    net = net_with_grads()
    monitor = GradNormMonitor(nn.DataParallel(net), depth=depth)  # wrapper prefixes are looked through
    assert monitor.names == list(GROUPS[depth])
    got = monitor.compute()
    want = naive_group_norms(net, GROUPS[depth])
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["unused"] == 0.0 and got["head"] > 0


def test_total_grad_norm_equals_clip_grad_norm():
    net = net_with_grads()
    total = GradNormMonitor(net, depth=2).compute_tensor()[-1]
    reference = nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e9)
    torch.testing.assert_close(total, reference)


def test_half_precision_grads_do_not_overflow_the_norm():
    p = nn.Parameter(torch.zeros(10_000, dtype=torch.float16))
    p.grad = torch.full_like(p, 1000.0)
    assert torch.isinf(torch.linalg.vector_norm(p.grad))  # a naive fp16 norm overflows
    holder = nn.Module()
    holder.block = nn.Module()
    holder.block.p = p
    norms = GradNormMonitor(holder).compute_tensor()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([1e5, 1e5]), rtol=1e-5, atol=0)


def test_grad_norm_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        GradNormMonitor(Net(), depth=0)
    with pytest.raises(ValueError, match="requires_grad"):
        GradNormMonitor(nn.Linear(2, 2).requires_grad_(False))
    clash = nn.Module()
    clash.total = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'total'"):
        GradNormMonitor(clash)


class Block(nn.Module):
    def __init__(self, dim, gain):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.gain = gain

    def forward(self, x):
        return x + self.gain * torch.tanh(self.lin(x))


class PairBlock(nn.Module):
    def forward(self, x):
        return 3 * x, "aux"


def make_stack():
    torch.manual_seed(0)
    return nn.Sequential(*[Block(6, gain=float(i + 1)) for i in range(4)])


def test_activation_stats_match_manual_pass_per_block():
    model = make_stack()
    x = torch.randn(3, 5, 6)
    with ActivationMonitor(model, module_types=Block) as monitor:
        model(x)
    assert monitor.names == ["0", "1", "2", "3"]
    stats = monitor.stats()
    h = x
    for i, block in enumerate(model):
        h = block(h)
        ref = h.detach().double()
        got = stats[str(i)]
        assert isinstance(got, ActivationStats)
        assert got.mean == pytest.approx(ref.mean().item(), abs=1e-6)
        assert got.std == pytest.approx(ref.std(correction=0).item(), rel=1e-5)
        assert got.abs_max == pytest.approx(ref.abs().max().item(), rel=1e-6)
    assert stats["3"].std > stats["0"].std  # the stack's gains make later blocks drift


def test_activation_monitor_hooks_are_removed_on_exit():
    model = make_stack()
    with ActivationMonitor(model, module_types=(Block,)) as monitor:
        model(torch.randn(2, 6))
        assert all(len(b._forward_hooks) == 1 for b in model)
    assert all(len(b._forward_hooks) == 0 for b in model)
    before = monitor.tensor().clone()
    model(torch.randn(2, 6) * 100)
    assert torch.equal(monitor.tensor(), before)


def test_activation_stats_are_float32_under_bf16_autocast():
    model = make_stack()
    monitor = ActivationMonitor(model, module_types=Block)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 6))
    table = monitor.tensor()
    assert table.dtype == torch.float32 and table.shape == (4, 3)
    torch.testing.assert_close(table[-1, 2], out.float().abs().max())
    monitor.remove()


def test_activation_monitor_tuple_outputs_missing_blocks_and_reset():
    model = nn.Sequential(PairBlock())
    unused = PairBlock()
    root = nn.ModuleDict({"used": model, "unused": unused})
    monitor = ActivationMonitor(root, module_types=PairBlock)
    assert monitor.names == ["used.0", "unused"]
    x = torch.tensor([[-1.0, 2.0]])
    root["used"](x)
    table = monitor.tensor()
    torch.testing.assert_close(table[0], torch.tensor([1.5, 4.5, 6.0]))
    assert torch.isnan(table[1]).all()
    assert list(monitor.stats()) == ["used.0"]
    monitor.reset()
    assert monitor.stats() == {}
    monitor.remove()


def test_activation_monitor_rejects_bad_types():
    with pytest.raises(TypeError, match="module_types"):
        ActivationMonitor(make_stack(), module_types=int)
    with pytest.raises(ValueError, match="module_types"):
        ActivationMonitor(make_stack(), module_types=nn.Conv2d)


def model_with_grads():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    return model, loss


def test_guard_lets_finite_steps_through_untouched():
    model, loss = model_with_grads()
    grads = [p.grad.clone() for p in model.parameters()]
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard.should_skip(loss, model.parameters()) is False
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("where", ["loss", "grad_inf", "grad_nan"])
def test_guard_skips_and_clears_grads_on_non_finite(where):
    model, loss = model_with_grads()
    if where == "loss":
        loss = loss * float("nan")
    else:
        model.weight.grad[1, 2] = float("inf") if where == "grad_inf" else float("nan")
    guard = NonFiniteGuard()
    assert guard.should_skip(loss, model.parameters()) is True
    assert all(p.grad is None for p in model.parameters())
    assert guard.state_dict() == {"consecutive": 1, "total_skipped": 1}


def test_guard_does_not_flag_large_finite_gradients():
    p16 = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    p16.grad = torch.full_like(p16, 60000.0)
    p32 = nn.Parameter(torch.zeros(4))
    p32.grad = torch.full_like(p32, 1e30)
    assert torch.isinf(torch.linalg.vector_norm(p16.grad)) and torch.isinf(torch.linalg.vector_norm(p32.grad))
    assert NonFiniteGuard().should_skip(None, [p16, p32]) is False


def test_guard_aborts_on_a_streak_and_resets_on_a_good_step():
    guard = NonFiniteGuard(max_consecutive=3)
    nan, ok = torch.tensor(math.nan), torch.tensor(1.0)
    assert [guard.should_skip(v) for v in (nan, nan, ok, nan, nan)] == [True, True, False, True, True]
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        guard.should_skip(nan)
    assert guard.total_skipped == 5

    resumed = NonFiniteGuard(max_consecutive=3)
    resumed.load_state_dict({"consecutive": 2, "total_skipped": 7})
    with pytest.raises(RuntimeError, match="3 consecutive steps"):  # 2 restored + this one
        resumed.should_skip(nan)


def test_guard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
    with pytest.raises(ValueError, match="neither"):
        NonFiniteGuard().should_skip(None, [nn.Parameter(torch.zeros(2))])
