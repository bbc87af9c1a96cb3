"""The training run of the sharded-checkpoint tests, and its 2-process scenarios (not a test itself).

Imported by test_sharded_checkpoint.py for the single-process runs; run by it as 2 gloo processes
(``RANK``/``WORLD_SIZE`` in the environment) for the FSDP2 ones, which write ``OUT/rank{R}.json``
and ``.safetensors`` files. The last scenario SIGKILLs both processes in the middle of a save.

The run: a model with two blocks sharded on their own (FSDP2 via shard_model, one weight of a
single row so that rank 1 holds an empty shard, uneven 7-row shards), AdamW, a StepLR schedule,
an EMA, gradient accumulation (k=2 over 5 micro-batches: groups 2, 2, 1) and norm clipping that
bites, through Stepper. Micro-batch ``i`` of epoch ``e`` is a fixed global batch of 6 rows; each
of W ranks takes its 6 / W rows, so every world size sees the same global batches.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as F

import blockyard.train.sharded_checkpoint as sharded_checkpoint
from blockyard.train import (
    EMA,
    CheckpointManager,
    CorruptCheckpointWarning,
    Stepper,
    barrier,
    gathered,
    seed_everything,
    setup_distributed,
    shard_model,
    teardown_distributed,
)

K, NUM_BATCHES, EPOCHS, ROWS = 2, 5, 3, 6


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), Block(7), Block(7), nn.Linear(7, 1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(EPOCHS, NUM_BATCHES, ROWS, 4, generator=g)
    return x, (x[..., :1] * x[..., 1:2] - x[..., 2:3]).tanh()


def build(sharded: bool = True) -> dict:
    """The run's state (model, optimizer, scheduler, EMA, stepper); sharded when a process group exists."""
    net = make_model()
    ema = EMA(net, decay=0.8)
    model = shard_model(net, modules=Block, ema=ema) if sharded else net
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    stepper = Stepper(model, opt, accumulate=K, num_batches=NUM_BATCHES, clip_value=0.3, ema=ema)
    return {"model": model, "optimizer": opt, "scheduler": sched, "ema": ema, "stepper": stepper}


def train(state: dict, epochs: range, rank: int = 0, world: int = 1) -> None:
    x, y = data()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    model, stepper = state["model"], state["stepper"]
    for epoch in epochs:
        for i in range(NUM_BATCHES):
            with stepper.micro_batch(i) as mb:
                stepper.backward(F.mse_loss(model(x[epoch, i, rows]), y[epoch, i, rows]))
            if mb.step and stepper.step():
                state["scheduler"].step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the run, whole (a collective under FSDP2): weights, EMA, AdamW moments by position."""
    out = {f"model.{k}": _full(v) for k, v in state["model"].state_dict().items()}
    out.update({f"ema.{k}": _full(v) for k, v in state["ema"].module.state_dict().items()})
    opt = state["optimizer"]
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state[p].items():
            out[f"opt.{i}.{k}"] = _full(v)
    out["lr"] = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)
    out["steps"] = torch.tensor([state["stepper"].steps, state["scheduler"].last_epoch, state["ema"].step or 0])
    return out


def save_snapshot(path: Path, snap: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in snap.items()}, str(path))


# ------------------------------------------------------------------------------------------------
# 2-process scenarios


def main(out: Path) -> None:
    info = setup_distributed(timeout=60)
    rank, world = info.rank, info.world_size
    result: dict = {}

    # 1. uninterrupted sharded run, checkpointed after every epoch (position = epoch)
    state = build()
    seed_everything(100 + rank)  # each rank's global RNG streams differ (build seeds the model's init)
    result["fsdp_blocks"] = [type(m).__name__ for m in state["model"]]
    local = sum(p.to_local().numel() for p in state["model"].parameters())
    result["local_numel"], result["full_numel"] = local, sum(p.numel() for p in state["model"].parameters())
    manager = CheckpointManager(out / "ck2", keep_last=3, sharded=True)
    for epoch in range(EPOCHS):
        train(state, range(epoch, epoch + 1), rank, world)
        snap = snapshot(state)
        result[f"saved_{epoch + 1}"] = str(manager.save(epoch + 1, {**state, "epoch": epoch + 1}))
        if rank == 0 and epoch + 1 < EPOCHS:
            save_snapshot(out / f"epoch{epoch + 1}.safetensors", snap)
        if epoch + 1 == 2:
            result["draws_after_save_2"] = torch.rand(3).tolist()
    if rank == 0:
        save_snapshot(out / "uninterrupted2.safetensors", snap)

    # 2. resume 1 -> 2: the single-process checkpoint of epoch 1, then epochs 2..3 at world 2
    state = build()
    resumed = CheckpointManager(out / "ck1", sharded=True).load_latest(state)
    result["resumed_1to2"] = {"step": resumed["step"], "epoch": resumed["epoch"]}
    after_load = snapshot(state)
    train(state, range(1, EPOCHS), rank, world)
    final = snapshot(state)
    if rank == 0:
        save_snapshot(out / "after_load_1to2.safetensors", after_load)
        save_snapshot(out / "resumed_1to2.safetensors", final)

    # 3. a corrupted shard of the newest checkpoint: named, skipped for epoch 2, on both ranks
    barrier()
    if rank == 0:
        shard = out / "ck2" / "step_00000003" / "shards" / "shard-00002-model-00001-of-00001.safetensors"
        data_ = bytearray(shard.read_bytes())
        data_[-3] ^= 0x10  # a tensor byte (the header stays valid JSON)
        shard.write_bytes(bytes(data_))
    barrier()
    state = build()
    torch.manual_seed(999)  # scrambled: the load must bring this rank's streams back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptCheckpointWarning)
        resumed = manager.load_latest(state)
    result["corrupt"] = {"step": resumed["step"], "warnings": [str(w.message) for w in caught
                                                               if w.category is CorruptCheckpointWarning]}
    result["draws_after_load_2"] = torch.rand(3).tolist()
    snap = snapshot(state)
    if rank == 0:
        save_snapshot(out / "loaded_corrupt.safetensors", snap)

    # 4. gathered(): rank 0 runs two forwards, rank 1 none, and neither waits for the other
    x = data()[0][0, 0]
    with gathered(state["model"]):
        outs = [state["model"](x) for _ in range(2 if rank == 0 else 0)]
    result["gathered_out"] = outs[-1].detach().tolist() if outs else None
    train(state, range(2, EPOCHS), rank, world)  # and training goes on afterwards
    snap = snapshot(state)
    if rank == 0:
        save_snapshot(out / "after_gathered.safetensors", snap)

    # 5. SIGKILL of both ranks in the middle of a save: after the shards and its own RNG file
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    state = build()
    kill = CheckpointManager(out / "ckkill", sharded=True)
    train(state, range(0, 1), rank, world)
    kill.save(1, {**state, "epoch": 1})
    snap = snapshot(state)
    if rank == 0:
        save_snapshot(out / "kill_ref.safetensors", snap)
    train(state, range(1, 2), rank, world)
    original = sharded_checkpoint.write_file

    def write_then_die(path, data_bytes):
        entry = original(path, data_bytes)
        if ".tmp-step_00000002" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    sharded_checkpoint.write_file = write_then_die
    kill.save(2, {**state, "epoch": 2})
    teardown_distributed()  # not reached


if __name__ == "__main__":
    main(Path(sys.argv[1]))
