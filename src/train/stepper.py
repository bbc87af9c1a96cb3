"""The optimizer-step mechanics of every training loop, written once.

A training loop repeats the same eight moves around its forward pass: accumulate micro-batches
(true leftover weighting, gradient sync only on the stepping one), unscale the fp16 loss scale,
skip a non-finite step on every rank together, clip, step through the scaler, advance the
schedule, update the EMA, clear the gradients. :class:`Stepper` owns them; the loop stays in
the script::

    stepper = Stepper(model, optimizer, precision=args.precision, accumulate=args.accum,
                      num_batches=len(loader), clip_value=1.0, ema=ema,
                      schedule=lambda s: warmup_cosine(s, total, warmup, args.lr))
    for i, batch in enumerate(loader):
        with stepper.micro_batch(i) as mb:
            with autocast(device, args.precision):
                loss = criterion(model(batch.x), batch.y)
            stepper.backward(loss)
        if mb.step and stepper.step():          # False: fp16 overflow or a non-finite step was skipped
            dash.update(stepper.steps, loss=loss.detach())

Checkpoint the stepper with the model and optimizer (``state["stepper"] = stepper``): its state
holds the step counter, the skip count, the GradScaler and the non-finite guard, and loading it
re-applies the schedule at the restored step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .accumulation import GradientAccumulator, MicroBatch
from .clipping import clip_gradients, grad_norm
from .ema import EMA
from .monitors import NonFiniteGuard
from .precision import make_grad_scaler, scaler_step
from .schedules import apply_lr

__all__ = ["Stepper"]


class Stepper:
    """Accumulate -> unscale -> non-finite skip -> clip -> scaler step -> schedule -> EMA -> zero_grad.

    :meth:`step` returns whether the optimizer really stepped; only then do :attr:`steps`, the
    schedule and the EMA advance (a skipped fp16 overflow or a non-finite loss/gradient leaves
    all three where they were, on every rank together).

    Args:
        model: the model the loop calls (DDP/FSDP-wrapped or not): gradient sync is turned off on
            the non-stepping micro-batches through it, and the EMA reads its weights.
        optimizer: any ``torch.optim.Optimizer`` (fused ones included).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; fp16 gets a real ``GradScaler`` on
            the model's device type (CPU and CUDA), the others a disabled one.
        device: the training device (selects the scaler's backend); default: the first
            parameter's device.
        accumulate: micro-batches per optimizer step (``1`` = none).
        num_batches: micro-batches per epoch (the last group may be shorter and is weighted
            by its true size); ``None`` for an endless stream.
        clip: ``"norm"``, ``"value"``, ``"agc"`` or ``None`` (no clipping; the norm is not
            computed). ``clip="norm", clip_value=math.inf`` measures the norm without clipping.
        clip_value: the clipping threshold (or AGC's clip factor).
        schedule: ``step -> lr`` applied to every parameter group at construction, after every
            real step and after :meth:`load_state_dict` (``step`` = optimizer steps taken).
        ema: an :class:`~blockyard.train.EMA` updated after every real step.
        skip_nonfinite: skip (on every rank) a step whose loss or gradients hold NaN/inf, and
            abort after ``max_nonfinite`` such steps in a row. One host sync per optimizer
            step; turn it off where divergence must show, not be skipped (a stability study).
            Under fp16 only the loss is checked: gradient overflows are the scaler's to skip.
        max_nonfinite: consecutive non-finite steps that raise ``RuntimeError``.

    Attributes:
        steps: optimizer steps taken. skipped: steps skipped (non-finite or fp16 overflow).
        grad_norm: the pre-clip total gradient norm of the last step (a tensor; no host sync).
        scaler: the ``torch.amp.GradScaler``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                 device: str | torch.device | None = None, accumulate: int = 1, num_batches: int | None = None,
                 clip: str | None = "norm", clip_value: float = 1.0, schedule: Callable[[int], float] | None = None,
                 ema: EMA | None = None, skip_nonfinite: bool = True, max_nonfinite: int = 10) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip not in (None, "norm", "value", "agc"):
            raise ValueError(f"clip: expected None, 'norm', 'value' or 'agc', got {clip!r}")
        if not isinstance(clip_value, (int, float)) or isinstance(clip_value, bool) or not clip_value > 0:
            raise ValueError(f"clip_value: expected a number > 0, got {clip_value!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule: expected a callable step -> lr, got {type(schedule).__name__}")
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if device is None:
            device = self.params[0].device if self.params else torch.device("cpu")
        self.scaler = make_grad_scaler(precision, device)
        self.accumulator = GradientAccumulator(accumulate, num_batches)
        self.clip, self.clip_value, self.schedule = clip, float(clip_value), schedule
        self.guard = NonFiniteGuard(max_nonfinite) if skip_nonfinite else None
        self.steps, self.skipped = 0, 0
        self.grad_norm: torch.Tensor | None = None
        self._plan: MicroBatch | None = None
        self._group_loss: torch.Tensor | None = None
        self._apply_schedule()

    @property
    def lr(self) -> float:
        """The first parameter group's learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def steps_per_epoch(self, num_batches: int | None = None) -> int:
        """Optimizer steps in an epoch of ``num_batches`` micro-batches: ``ceil(N / accumulate)``."""
        return self.accumulator.steps_per_epoch(num_batches)

    @contextlib.contextmanager
    def micro_batch(self, index: int, num_batches: int | None = None) -> Iterator[MicroBatch]:
        """Context for the forward and backward of micro-batch ``index`` of the epoch; yields its plan.

        Gradient sync is off inside it unless the optimizer steps after this micro-batch.
        """
        with self.accumulator.sync_context(self.model, index, num_batches) as mb:
            if mb.position == 0:
                self._group_loss = None
            self._plan = mb
            yield mb

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of ``loss / group_size`` through the scaler; returns it detached.

        Call it inside :meth:`micro_batch`, once per micro-batch.
        """
        part = self.accumulator.backward(loss, self.scaler)
        self._group_loss = part if self._group_loss is None else self._group_loss + part
        return part

    def step(self) -> bool:
        """The optimizer step after a group's last micro-batch; True if the optimizer really stepped."""
        if self._plan is None or not self._plan.step:
            raise RuntimeError("Stepper.step: call it after the stepping micro-batch (`if mb.step and "
                               "stepper.step()`), once per group")
        self._plan = None
        self.scaler.unscale_(self.optimizer)
        # Norm clipping measures the norm once, for the guard and the clip (one read of the gradients).
        norm = grad_norm(self.params) if self.clip == "norm" else None
        if self.guard is not None:
            fp16 = self.scaler.is_enabled()  # gradient overflows are the scaler's to skip
            if self.guard.should_skip(self._group_loss, None if fp16 else self.params, None if fp16 else norm):
                self.skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update()
                return False
        if self.clip is not None:
            self.grad_norm = clip_gradients(self.params, self.clip, self.clip_value, norm=norm)
        stepped = scaler_step(self.scaler, self.optimizer)
        if stepped:
            self.steps += 1
            self._apply_schedule()
            if self.ema is not None:
                self.ema.update(self.model, self.steps)
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def _apply_schedule(self) -> None:
        if self.schedule is not None:
            lr = float(self.schedule(self.steps))
            if not math.isfinite(lr) or lr < 0:
                raise ValueError(f"schedule: expected a finite lr >= 0 at step {self.steps}, got {lr}")
            apply_lr(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "skipped": self.skipped, "scaler": self.scaler.state_dict(),
                "guard": self.guard.state_dict() if self.guard is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.guard is not None and state["guard"]:
            self.guard.load_state_dict(state["guard"])
        self._apply_schedule()

    def __repr__(self) -> str:
        return (f"Stepper(steps={self.steps}, accumulate={self.accumulator.k}, clip={self.clip!r}, "
                f"scaler={'on' if self.scaler.is_enabled() else 'off'}, ema={self.ema is not None})")
