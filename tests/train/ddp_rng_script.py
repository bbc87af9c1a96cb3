"""One rank of the 2-process gloo test of per-rank RNG checkpointing (not a test itself).

Each rank seeds its global RNGs differently, saves through CheckpointManager (a collective),
records what its RNGs draw next, scrambles them, resumes and draws again. Results go to
``OUT/rank{RANK}.json``.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from blockyard.train.checkpoint import CheckpointManager


def draws() -> list[float]:
    return [*torch.rand(3).tolist(), float(np.random.rand()), random.random()]  # noqa: NPY002


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)  # noqa: NPY002
    random.seed(100 + rank)
    torch.rand(rank + 1)  # advance the streams by a rank-dependent amount as well
    model = nn.Linear(3, 2)
    manager = CheckpointManager(out / "ckpt")
    saved = manager.save(5, {"model": model, "note": f"rank{rank}"})
    expected = draws()
    torch.manual_seed(999)
    np.random.seed(999)  # noqa: NPY002
    random.seed(999)
    resumed = manager.load_latest({"model": model})
    got = draws()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "saved": None if saved is None else str(saved), "step": resumed["step"], "note": resumed["note"],
        "expected": expected, "got": got, "world": int(os.environ["WORLD_SIZE"])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
