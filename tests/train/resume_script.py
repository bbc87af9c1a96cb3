"""A tiny training run for the kill-and-resume tests in test_checkpoint.py (not a test itself).

Every step draws data from the torch, numpy and python global RNGs and from an explicit
torch.Generator, and the model has dropout, so any RNG state that is not restored exactly
changes the losses. ``--kill-after STEP`` SIGKILLs the process after logging STEP (and after
saving, when STEP is a checkpoint step); ``--kill-in-save STEP`` SIGKILLs it in the middle of
the save of STEP, right after the first file of that checkpoint is written.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import blockyard.train.checkpoint as checkpoint_module
from blockyard.train.checkpoint import CheckpointManager
from blockyard.train.dashboard import Dashboard
from blockyard.train.early_stopping import EarlyStopping
from blockyard.train.ema import EMA
from blockyard.train.metrics_log import MetricsLog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-after", type=int, default=-1)
    parser.add_argument("--kill-in-save", type=int, default=-1)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 (the global generators are what resume must restore)
    random.seed(0)

    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    ema = EMA(model, decay=0.9)
    stopper = EarlyStopping(patience=100)
    gen = torch.Generator().manual_seed(123)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "ema": ema, "stopper": stopper, "gen": gen}

    manager = CheckpointManager(args.out / "ckpt", keep_last=2)
    resumed = manager.load_latest(state)
    start = resumed["step"] if resumed else 0
    log = MetricsLog(args.out / "metrics.jsonl", resume_step=start if resumed else None)

    if args.kill_in_save >= 0:
        original = checkpoint_module.write_file
        marker = f".tmp-step_{args.kill_in_save:08d}"

        def write_then_die(path, data):
            entry = original(path, data)
            if marker in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        checkpoint_module.write_file = write_then_die

    with open(os.devnull, "w") as sink, Dashboard(args.steps, every_s=0.0, stream=sink) as dash:
        for step in range(start + 1, args.steps + 1):
            x = torch.randn(16, 8) + 0.1 * torch.from_numpy(np.random.randn(16, 8).astype(np.float32))  # noqa: NPY002
            y = x.sum(1, keepdim=True) * random.uniform(0.5, 1.5) + torch.randn(16, 1, generator=gen)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model, step)
            stopper.step(loss.item())
            log.log(step, loss=loss.item(), lr=sched.get_last_lr()[0])
            dash.update(step, loss=loss)
            if step % args.every == 0:
                manager.save(step, {**state, "epoch": step // args.every}, metric=loss.item())
            if step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    log.close()


if __name__ == "__main__":
    main()
