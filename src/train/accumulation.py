"""Gradient accumulation that equals one large-batch step, also for the epoch's last partial group.

Micro-batches are grouped by ``k`` within an epoch; the optimizer steps after the last
micro-batch of each group, and after the epoch's last micro-batch. Each loss is divided by the
size of *its* group, so a leftover group of ``n < k`` micro-batches is divided by ``n``: the
update is the mean gradient of the samples it saw, as for every full group (timm does the
same; Lightning #19987 and accelerate divide by ``k`` and under-weight the last update).

Under DDP (and FSDP1/FSDP2), gradients are synchronised only on the stepping micro-batch:
forward *and* backward of the others run with the sync off (a forward outside it re-enables it).

Usage::

    acc = GradientAccumulator(k=4, num_batches=len(loader))
    for i, (x, y) in enumerate(loader):
        with acc.sync_context(model, i) as mb:       # no_sync unless mb.step
            with autocast(device, precision):
                loss = criterion(model(x), y)
            group_loss += acc.backward(loss, scaler)  # backward of loss / mb.group_size
        if mb.step:
            scaler.unscale_(optimizer)
            clip_gradients(model.parameters(), value=1.0)
            scaler_step(scaler, optimizer)
            optimizer.zero_grad(set_to_none=True)

Every rank must see the same ``num_batches`` (``DistributedSampler`` guarantees it), so every
rank steps on the same micro-batches without talking to the others. With equal-sized
micro-batches the accumulated gradient equals the gradient of the concatenated group; with a
smaller last DataLoader batch it is the mean of the per-micro-batch means.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["GradientAccumulator", "MicroBatch"]


class MicroBatch(NamedTuple):
    """What to do with micro-batch ``index`` of the epoch.

    ``step``: the optimizer steps after it. ``group_size``: micro-batches in its group (``k``, or
    the leftover count for the epoch's last group); its loss is divided by this.
    ``position``: its place in the group, from 0.
    """

    index: int
    step: bool
    group_size: int
    position: int


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Turns gradient synchronisation off for one micro-batch, whatever the wrapper.

    DDP and FSDP1 have ``no_sync()``; FSDP2 (``fully_shard``) has ``set_requires_gradient_sync``
    (turned back on when the context exits, so the stepping micro-batch reduce-scatters the
    accumulated gradient). torch.compile wraps the distributed module (compile after wrapping),
    so ``_orig_mod`` is followed down. Anything else: a null context.
    """
    while True:
        if hasattr(model, "set_requires_gradient_sync"):
            return _fsdp2_no_sync(model)
        if hasattr(model, "no_sync"):
            return model.no_sync()
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return contextlib.nullcontext()
        model = inner


@contextlib.contextmanager
def _fsdp2_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class GradientAccumulator:
    r"""Plans which micro-batches step and how their losses are weighted.

    For micro-batch :math:`i` of an epoch of :math:`N` micro-batches, its group starts at
    :math:`g = k \lfloor i / k \rfloor`, has :math:`n = \min(k, N - g)` members, and the loss
    is divided by :math:`n`; the optimizer steps when :math:`i = g + n - 1`. Optimizer steps
    per epoch: :math:`\lceil N / k \rceil` (use it for schedules).

    Args:
        k: micro-batches per optimizer step (``1`` = no accumulation).
        num_batches: micro-batches per epoch (``len(loader)``). ``None`` for an endless stream:
            then every group has ``k`` members, and the caller must not end an epoch mid-group.
            It can also be given per call.

    Shapes:
        - loss passed to :meth:`backward`: any (usually a scalar)
    """

    def __init__(self, k: int, num_batches: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        self.k = k
        self.num_batches = self._check_num_batches(num_batches)
        self._current: MicroBatch | None = None

    @staticmethod
    def _check_num_batches(num_batches: int | None) -> int | None:
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ValueError(f"num_batches: expected an integer >= 1 or None, got {num_batches!r}")
        return num_batches

    def plan(self, index: int, num_batches: int | None = None) -> MicroBatch:
        """The :class:`MicroBatch` for micro-batch ``index`` (0-based, within the epoch)."""
        n_total = self._check_num_batches(num_batches) or self.num_batches
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index: expected an integer >= 0, got {index!r}")
        if n_total is not None and index >= n_total:
            raise ValueError(f"index: expected < num_batches={n_total}, got {index}")
        start = (index // self.k) * self.k
        size = self.k if n_total is None else min(self.k, n_total - start)
        position = index - start
        return MicroBatch(index, position == size - 1, size, position)

    def should_step(self, index: int, num_batches: int | None = None) -> bool:
        """Whether the optimizer steps after micro-batch ``index``."""
        return self.plan(index, num_batches).step

    def steps_per_epoch(self, num_batches: int | None = None) -> int:
        """Optimizer steps in an epoch of ``num_batches`` micro-batches: ``ceil(N / k)``."""
        n_total = self._check_num_batches(num_batches) or self.num_batches
        if n_total is None:
            raise ValueError("num_batches: required for an epoch length, got None")
        return math.ceil(n_total / self.k)

    @contextlib.contextmanager
    def sync_context(
        self, model: nn.Module, index: int, num_batches: int | None = None
    ) -> Iterator[MicroBatch]:
        """Context for the forward and backward of micro-batch ``index``; yields its plan.

        On a non-stepping micro-batch of a DDP or FSDP1 model it enters ``model.no_sync()``, of
        an FSDP2 (``fully_shard``) model it sets ``set_requires_gradient_sync(False)`` until the
        context exits (also under torch.compile), so no all-reduce / reduce-scatter happens; on
        the stepping one it syncs. Without a distributed wrapper it only sets the plan that
        :meth:`backward` uses.
        """
        mb = self.plan(index, num_batches)
        sync_off = contextlib.nullcontext() if mb.step else _no_sync(model)
        self._current = mb
        try:
            with sync_off:
                yield mb
        finally:
            self._current = None

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
        """Backward of ``loss / group_size`` (through ``scaler.scale`` if given).

        Must be called inside :meth:`sync_context`. Returns the divided loss, detached: summed
        over a group it is the group's mean loss.
        """
        mb = self._current
        if mb is None:
            raise RuntimeError("GradientAccumulator.backward: call it inside `with acc.sync_context(model, i):`")
        scaled = loss / mb.group_size
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return scaled.detach()

    def extra_repr(self) -> str:
        return f"k={self.k}, num_batches={self.num_batches}"

    def __repr__(self) -> str:
        return f"GradientAccumulator({self.extra_repr()})"
