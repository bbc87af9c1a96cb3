"""Evaluation sharded over ranks: each rank computes every world-th row, every rank gets all rows."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from .distributed import is_distributed

__all__ = ["gather_rows", "predict_rows", "shard_rows"]


def _world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_rows(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """This rank's rows of ``n``: ``rank, rank + world, ...``, padded with row 0 to ``ceil(n / world)``.

    Every rank gets the same count, so :func:`gather_rows` can all-gather equal shapes; the
    padding rows are dropped again there.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    rank, world = _world()
    rows = torch.arange(rank, math.ceil(n / world) * world, world, device=device)
    return torch.where(rows < n, rows, torch.zeros_like(rows))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`shard_rows`: ``(n, *rest)`` in row order, on every rank.

    Shapes:
        - local: ``(ceil(n / world), *rest)``, this rank's rows from :func:`shard_rows`
        - output: ``(n, *rest)``
    """
    world = _world()[1]
    per = math.ceil(n / world)
    if local.shape[0] != per:
        raise ValueError(f"local: expected {per} rows (ceil({n} / {world})), got shape {tuple(local.shape)}")
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    # part r holds rows r, r + world, ...: interleaving the parts gives row order
    return torch.stack(parts, dim=1).reshape(per * world, *local.shape[1:])[:n]


@torch.no_grad()
def predict_rows(fn: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``fn(rows)`` for every row of ``n``, sharded over the ranks in chunks, gathered on every rank.

    ``fn`` takes a 1-D index tensor of rows and returns a tensor with one row per index (it
    runs under ``torch.no_grad``). Call it on every rank, with the same model on every rank:
    under DDP each rank's BatchNorm running statistics differ (DDP copies rank 0's buffers only
    at the start of a training forward), so call :func:`~blockyard.train.broadcast_buffers`
    first when the model has any.

    Shapes:
        - output: ``(n, *rest)`` where ``fn`` returns ``(len(rows), *rest)``
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    rows = shard_rows(n, device)
    local = torch.cat([fn(rows[i:i + batch_size]) for i in range(0, rows.numel(), batch_size)])
    return gather_rows(local, n)
