import copy
import json
import logging

import pytest
import torch
from torch import nn

from blockyard.train.ema import EMA


def make_net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_steps(net, n, seed=0):
    """Yield after each SGD step (train mode, so BN running stats move too)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for step in range(1, n + 1):
        x = torch.randn(16, 4, generator=g)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield step


def hand_decay(step, decay=0.999, gamma=1.0, power=2 / 3):
    """DESIGN.md: 0 for step <= 1, else min(decay, 1 - (1 + (step-1)/gamma) ** -power)."""
    if step <= 1:
        return 0.0
    return min(decay, 1 - (1 + (step - 1) / gamma) ** -power)


def test_decay_warmup_values_at_known_steps():
    ema = EMA(make_net(), decay=0.999)
    # values worked out by hand: 1 - 2**(-2/3), 1 - 10**(-2/3), 1 - 1000**(-2/3) = 0.99
    expected = {0: 0.0, 1: 0.0, 2: 0.3700394750525634, 10: 0.7845565309968117, 1000: 0.99}
    for step, value in expected.items():
        assert ema.decay_at(step) == pytest.approx(value, rel=1e-12, abs=0)
    for step in (0, 1, 2, 10, 1000, 10**6):
        assert ema.decay_at(step) == pytest.approx(hand_decay(step), rel=1e-12, abs=0)
    assert ema.decay_at(10**8) == 0.999  # capped at decay
    slow = EMA(make_net(), decay=0.9999, warmup_gamma=10.0, warmup_power=0.75)
    assert slow.decay_at(1000) == pytest.approx(1 - (1 + 999 / 10.0) ** -0.75, rel=1e-12)
    flat = EMA(make_net(), decay=0.9, warmup=False)
    assert [flat.decay_at(s) for s in (0, 1, 2, 10, 1000)] == [0.0, 0.0, 0.9, 0.9, 0.9]


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_step_by_step_reference(warmup):
    net = make_net()
    ema = EMA(net, decay=0.95, warmup=warmup, buffers="average")
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    for step in train_steps(net, 12):
        ema.update(net, step)
        d = (hand_decay(step, 0.95) if warmup else (0.0 if step <= 1 else 0.95))
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                ref[k] = d * ref[k] + (1 - d) * v.double()
            else:
                ref[k] = v.clone()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), ref[k].double(), rtol=1e-6, atol=1e-7, msg=k)
    assert ema.step == 12
    # the average really lags the live weights
    assert not torch.allclose(ema.module[0].weight, net[0].weight)


def test_first_update_copies_exactly():
    net = make_net()
    ema = EMA(net, decay=0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 1)
    for a, b in zip(ema.module.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["copy", "average"])
def test_buffer_policy(policy):
    net = make_net()
    ema = EMA(net, decay=0.9, warmup=False, buffers=policy)
    ref_mean = net[1].running_mean.clone()
    for step in train_steps(net, 6):
        ema.update(net, step)
        d = 0.0 if step <= 1 else 0.9
        ref_mean = d * ref_mean + (1 - d) * net[1].running_mean
    bn, live = ema.module[1], net[1]
    assert torch.equal(bn.num_batches_tracked, live.num_batches_tracked)  # integer: always copied
    assert bn.num_batches_tracked.dtype == torch.long
    if policy == "copy":
        assert torch.equal(bn.running_mean, live.running_mean)
        assert torch.equal(bn.running_var, live.running_var)
    else:
        torch.testing.assert_close(bn.running_mean, ref_mean)
        assert not torch.allclose(bn.running_mean, live.running_mean)
    # parameters are averaged under both policies
    assert not torch.allclose(ema.module[0].weight, net[0].weight)


class Wrapper(nn.Module):  # a user's own module holding the network under .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.fixture
def one_rank_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
def test_built_from_ddp_and_updated_through_it():
    net = make_net()
    wrapped = nn.parallel.DistributedDataParallel(net)
    ema = EMA(wrapped, decay=0.5, warmup=False)
    assert list(ema.module.state_dict()) == list(net.state_dict())  # no "module." prefix
    assert isinstance(ema.module, nn.Sequential)
    plain = EMA(net, decay=0.5, warmup=False)
    for step in train_steps(net, 3):
        ema.update(wrapped, step)
        plain.update(net, step)
    for a, b in zip(ema.module.state_dict().values(), plain.module.state_dict().values()):
        assert torch.equal(a, b)


def test_own_module_holding_the_net_is_kept_whole_and_updates_positionally():
    class Probabilities(nn.Module):  # no parameters of its own, but its forward is not the net's
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x).softmax(-1)

    net = make_net()
    model = Probabilities(net)
    ema = EMA(model, decay=0.5, warmup=False)
    assert isinstance(ema.module, Probabilities)  # ema(x) computes what model(x) computes
    x = torch.randn(3, 4)
    torch.testing.assert_close(ema(x), model.eval()(x))
    plain = EMA(net, decay=0.5, warmup=False)
    for step in train_steps(net, 3):
        ema.update(net, step)  # the bare net and its holder have the same parameters in order
        plain.update(Wrapper(net), step)
    for a, b in zip(ema.module.state_dict().values(), plain.module.state_dict().values()):
        assert torch.equal(a, b)


def test_module_attribute_next_to_other_layers_is_not_unwrapped():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

    ema = EMA(Block())
    assert set(ema.module.state_dict()) == {"module.weight", "module.bias", "other.weight", "other.bias"}


def test_built_from_compiled_module():
    net = make_net()
    twin = copy.deepcopy(net)
    compiled = torch.compile(net)  # never called: no compilation cost
    ema = EMA(compiled, decay=0.5, warmup=False)
    assert not any("_orig_mod" in k for k in ema.module.state_dict())
    assert list(ema.module.state_dict()) == list(net.state_dict())
    plain = EMA(twin, decay=0.5, warmup=False)
    for step, _ in zip(train_steps(net, 3), train_steps(twin, 3)):
        ema.update(Wrapper(compiled), step)  # DDP(compile(model)) style nesting
        plain.update(twin, step)
    for a, b in zip(ema.module.state_dict().values(), plain.module.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(ema.module[0].weight, net[0].weight)


def test_eval_copy_is_frozen_and_independent():
    net = make_net()
    ema = EMA(net)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.module.parameters(), net.parameters()))
    before = ema.module[0].weight.clone()
    list(train_steps(net, 1))
    assert torch.equal(ema.module[0].weight, before)  # moves only on update()
    x = torch.randn(3, 4)
    torch.testing.assert_close(ema(x), ema.module(x))


def test_state_dict_round_trip_is_pickle_free():
    net = make_net()
    ema = EMA(net, decay=0.9)
    for step in train_steps(net, 5):
        ema.update(net, step)
    state = ema.state_dict()
    extras = {k: v for k, v in state.items() if k != "module"}
    json.dumps(extras)  # everything but the weights is JSON
    assert all(isinstance(v, torch.Tensor) for v in state["module"].values())
    saved = {k: v.clone() for k, v in state["module"].items()}

    other = EMA(make_net(), decay=0.9)
    other.load_state_dict(json.loads(json.dumps(extras)) | {"module": saved})
    assert other.step == 5
    for k, v in other.module.state_dict().items():
        assert torch.equal(v, saved[k])
    # both continue identically
    for step in train_steps(net, 2, seed=1):
        ema.update(net, 5 + step)
        other.update(net, 5 + step)
    for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)


def test_load_warns_on_different_settings(caplog):
    state = EMA(make_net(), decay=0.9).state_dict()
    other = EMA(make_net(), decay=0.99)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "decay" in caplog.text and other.decay == 0.99


def test_bad_arguments():
    with pytest.raises(ValueError, match="buffers"):
        EMA(make_net(), buffers="mean")
    with pytest.raises(ValueError, match="decay"):
        EMA(make_net(), decay=1.5)
    ema = EMA(make_net())
    with pytest.raises(ValueError, match="model: expected"):
        ema.update(nn.Linear(4, 2), 3)
    with pytest.raises(ValueError, match="step"):
        ema.update(make_net(), -1)
    with pytest.raises(ValueError, match="state_dict"):
        ema.load_state_dict({"step": 3})


@pytest.mark.parametrize("every", [2, 3, 5])
def test_every_k_equals_per_step_when_weights_hold_between_updates(every):
    """If the weights only change at update steps, skipping is lossless: same as the per-step rule.

    Between two updates at t_a < t_b the per-step EMA applies d_{t_a+1} ... d_{t_b} to the old
    average with the same theta each time, i.e. one lerp with the product D; every=k must do that.
    """
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    per_step = EMA(net, decay=0.9)
    skipping = EMA(net, decay=0.9, every=every)
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    for step in range(1, 31):
        if step == 1 or step % every == 1 or every == 1:  # the weights move right after an update
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
        per_step.update(net, step)
        skipping.update(net, step)
        d = hand_decay(step, 0.9)
        for k, v in net.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double()
        if step % every == 0 or step == 1:
            for k, v in skipping.module.state_dict().items():
                torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-7, msg=f"{k} at {step}")
    for a, b in zip(per_step.module.state_dict().values(), skipping.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_every_k_skips_work_and_keeps_the_horizon():
    net = nn.Linear(4, 3)
    ema = EMA(net, decay=0.99, warmup=False, every=4)
    ema.update(net, 1)  # first update copies
    assert ema.step == 1
    b1 = ema.module.bias.clone()
    with torch.no_grad():
        net.bias.fill_(1.0)
    for step in (2, 3):
        ema.update(net, step)
        assert torch.equal(ema.module.bias, b1) and ema.step == 1  # skipped steps touch nothing
    ema.update(net, 4)  # compounds d_2 d_3 d_4 = 0.99**3, not 0.99 (that would stretch the horizon)
    b4 = 0.99**3 * b1 + (1 - 0.99**3)
    torch.testing.assert_close(ema.module.bias, b4)
    assert ema.step == 4
    ema.update(net, 6, force=True)  # forced at a non-multiple: compounds d_5 d_6
    torch.testing.assert_close(ema.module.bias, 0.99**2 * b4 + (1 - 0.99**2))
    assert ema.step == 6
    ema.update(net, 8)  # the next multiple compounds d_7 d_8 only
    torch.testing.assert_close(ema.module.bias, 0.99**4 * b4 + (1 - 0.99**4))


def snapshots(n):
    """The live model's state after each of n training steps."""
    net = make_net()
    return net, [copy.deepcopy(net.state_dict()) for _ in train_steps(net, n)]


def test_every_k_resume_is_exact():
    net, states = snapshots(10)
    whole = EMA(make_net(), decay=0.95, every=3)
    first = EMA(make_net(), decay=0.95, every=3)
    for step, state in enumerate(states, 1):
        net.load_state_dict(state)
        whole.update(net, step)
        if step <= 7:
            first.update(net, step)
    saved = first.state_dict()
    assert saved["step"] == 6 and saved["every"] == 3  # step 7 was skipped
    extras = json.loads(json.dumps({k: v for k, v in saved.items() if k != "module"}))
    resumed = EMA(make_net(), decay=0.95, every=3)
    resumed.load_state_dict(extras | {"module": {k: v.clone() for k, v in saved["module"].items()}})
    for step in (8, 9, 10):
        net.load_state_dict(states[step - 1])
        resumed.update(net, step)
    for a, b in zip(whole.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)


def test_every_must_be_a_positive_int():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            EMA(make_net(), every=bad)
