"""shard_model (FSDP2 in one call): arguments, the mixed precision policy, and a world of one process.

The 2-process behaviour (training equal to one process on the global batch, resharding
checkpoints, gathered()) is tested in test_sharded_checkpoint.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from blockyard.train import (
    EMA,
    CheckpointManager,
    Stepper,
    is_sharded,
    mixed_precision_policy,
    shard_model,
)


class Block(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), Block(), Block(), nn.Linear(6, 1))


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("precision, param, reduce", [
    ("fp32", None, None), ("bf16", torch.bfloat16, torch.float32), ("fp16", torch.float16, torch.float32)])
def test_mixed_precision_policy_follows_the_precision_names(precision, param, reduce):
    policy = mixed_precision_policy(precision)
    assert (policy.param_dtype, policy.reduce_dtype) == (param, reduce)


def test_without_a_process_group_the_model_is_returned_unchanged():
    model = make_model()
    ema = EMA(model)
    assert shard_model(model, modules=Block, precision="bf16", ema=ema) is model
    assert not is_sharded(model) and not is_sharded(ema.module)
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_bad_arguments_raise_naming_the_argument():
    model = make_model()
    with pytest.raises(ValueError, match=r"modules: expected submodules of type \['GRU'\].*got none in a Sequential"):
        shard_model(model, modules=nn.GRU)
    with pytest.raises(ValueError, match="modules: expected submodules of the model, got a Linear that is not"):
        shard_model(model, modules=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"modules: expected nn.Module subclasses, got \[<class 'int'>\]"):
        shard_model(model, modules=int)
    with pytest.raises(TypeError, match=r"modules: expected None, an nn\.Module subclass"):
        shard_model(model, modules="Block")
    with pytest.raises(ValueError, match=r"precision: expected one of \['fp32', 'bf16', 'fp16'\], got 'fp8'"):
        shard_model(model, precision="fp8")
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module, got int"):
        shard_model(3)
    with pytest.raises(ValueError, match=r"ema: expected an EMA built from this model before sharding \(8 param"):
        shard_model(model, ema=EMA(nn.Linear(2, 2)))


@pytest.mark.distributed
def test_blocks_are_sharded_on_their_own_in_bf16_and_the_ema_alike(world_of_one):
    model = make_model()
    ema = EMA(model, decay=0.5)
    seen = []
    model[1].linear.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    assert shard_model(model, modules=Block, precision="bf16", ema=ema) is model
    fsdp = torch.distributed.fsdp.FSDPModule
    assert [isinstance(m, fsdp) for m in model] == [False, True, True, False] and isinstance(model, fsdp)
    assert [isinstance(m, fsdp) for m in ema.module] == [False, True, True, False]
    assert all(hasattr(p, "to_local") and p.dtype == torch.float32 for p in model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    assert seen == [torch.bfloat16]  # computed in bf16; the shards and their gradients stay float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert is_sharded(model) and is_sharded(ema.module)
    # the EMA averages the shards in place (its first update copies the model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, 1)
    for p, q in zip(model.parameters(), ema.module.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())


@pytest.mark.distributed
def test_a_list_of_submodules_selects_exactly_those(world_of_one):
    model = make_model()
    shard_model(model, modules=[model[2]])
    fsdp = torch.distributed.fsdp.FSDPModule
    assert [isinstance(m, fsdp) for m in model] == [False, False, True, False]


def _train(model: nn.Module, steps: int = 3, clip: str = "norm", clip_value: float = 0.2) -> list[torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    stepper = Stepper(model, opt, clip=clip, clip_value=clip_value)
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        x = torch.randn(5, 3, generator=g)
        with stepper.micro_batch(i):
            stepper.backward(F.mse_loss(model(x), x[:, :1]))
        stepper.step()
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


@pytest.mark.distributed
@pytest.mark.parametrize("cpu_offload, clip, value", [(False, "norm", 0.2), (True, "norm", 0.2),
                                                      (False, "agc", 0.01), (False, "value", 0.05)],
                         ids=["on-device", "cpu-offload", "agc", "value"])
def test_sharded_training_on_one_rank_equals_plain_training(world_of_one, cpu_offload, clip, value):
    """Clipping that bites (norm, value, unit-wise AGC: a bias is one unit spanning the shards) included."""
    plain = _train(make_model(), clip=clip, clip_value=value)
    sharded = _train(shard_model(make_model(), modules=Block, cpu_offload=cpu_offload), clip=clip, clip_value=value)
    for a, b in zip(sharded, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(plain, make_model().parameters())) > 0.05
    unclipped = _train(make_model(), clip=None)
    assert max((a - b).abs().max().item() for a, b in zip(plain, unclipped)) > 1e-3  # the clipping bites


@pytest.mark.distributed
def test_sharded_model_needs_a_sharded_manager_and_round_trips_through_one(world_of_one, tmp_path):
    model = shard_model(make_model(), modules=Block)
    _train(model)
    with pytest.raises(TypeError, match=r"DTensor .* use CheckpointManager\(\.\.\., sharded=True\)"):
        CheckpointManager(tmp_path / "plain").save(1, {"model": model})
    CheckpointManager(tmp_path / "sharded", sharded=True).save(1, {"model": model})
    target = shard_model(make_model(), modules=Block)
    CheckpointManager(tmp_path / "sharded").load_latest({"model": target})
    for a, b in zip(target.parameters(), model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())


@pytest.mark.distributed
def test_offload_and_reshard_options_reach_fully_shard_for_every_target(world_of_one, monkeypatch):
    import torch.distributed.fsdp as fsdp

    calls, real = [], fsdp.fully_shard

    def spy(module, **kwargs):
        calls.append((module, kwargs))
        return real(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", spy)
    model = make_model()
    shard_model(model, modules=Block, cpu_offload=True, reshard_after_forward=False)
    assert [c[0] for c in calls] == [model[2], model[1], model]  # innermost first, the root last
    for _, kwargs in calls:
        assert isinstance(kwargs["offload_policy"], fsdp.CPUOffloadPolicy) and not kwargs["offload_policy"].pin_memory
        assert kwargs["reshard_after_forward"] is False and kwargs["mesh"].size() == 1
