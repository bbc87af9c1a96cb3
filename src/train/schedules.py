"""Learning-rate schedules as pure functions of the optimizer step, a plateau helper, and ``apply_lr``.

A schedule that is a function of the step counter resumes exactly from the counter alone
(nanoGPT's ``get_lr(it)``); write its value into the optimizer with :func:`apply_lr`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Plateau", "apply_lr", "one_cycle", "warmup_cosine"]


def _check_step(step: float) -> None:
    if isinstance(step, torch.Tensor) or not step >= 0:
        raise ValueError(f"step: expected a number >= 0, got {step!r}")


def warmup_cosine(step: float, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    r"""Linear warmup from 0 to ``base_lr``, then half a cosine down to ``min_lr``.

    .. math::
        \mathrm{lr}(s) = \begin{cases}
        \mathrm{base} \cdot s / w & s < w \\
        \mathrm{min} + (\mathrm{base} - \mathrm{min})\,\tfrac{1}{2}\big(1 + \cos(\pi \tfrac{s - w}{T - w})\big)
        & w \le s \le T \\
        \mathrm{min} & s > T \end{cases}

    so ``lr(0) = 0`` (if ``w > 0``), ``lr(w) = base_lr`` and ``lr(T) = min_lr``, all three exactly: the
    cosine branch is evaluated as the convex combination ``c * base + (1 - c) * min`` of the same
    value, which hits both ends without rounding. ``warmup_steps = 0`` starts at ``base_lr``.

    Args:
        step: optimizer steps taken so far (the lr for the next update), ``>= 0``.
        total_steps: :math:`T`, the step at which ``min_lr`` is reached.
        warmup_steps: :math:`w`, ``0 <= w < T``.
        base_lr: peak learning rate.
        min_lr: final learning rate, ``0 <= min_lr <= base_lr``.
    """
    _check_step(step)
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps: expected 0 <= warmup_steps < total_steps={total_steps}, got {warmup_steps}")
    if base_lr < 0:
        raise ValueError(f"base_lr: expected >= 0, got {base_lr}")
    if not 0 <= min_lr <= base_lr:
        raise ValueError(f"min_lr: expected 0 <= min_lr <= base_lr={base_lr}, got {min_lr}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    c = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    return c * base_lr + (1.0 - c) * min_lr


def one_cycle(step: float, total_steps: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> float:
    r"""The one-cycle policy with cosine annealing, numerically identical to ``OneCycleLR``.

    Smith & Topin, "Super-Convergence", 2017. https://arxiv.org/abs/1708.07120

    From ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start * total_steps - 1``
    steps, then down to ``max_lr / (div_factor * final_div_factor)`` at step ``total_steps - 1``,
    each phase a half cosine ``end + (start - end) / 2 * (1 + cos(pi * pct))``. This matches
    ``torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos", three_phase=False)`` at every step
    it accepts; steps from ``total_steps`` on stay at the final value (torch raises instead).

    Args:
        step: optimizer steps taken so far, ``>= 0``.
        total_steps: length of the cycle, ``>= 1``.
        max_lr: peak learning rate.
        pct_start: fraction of the cycle spent increasing, in ``[0, 1]``.
        div_factor: initial lr is ``max_lr / div_factor``.
        final_div_factor: final lr is ``initial / final_div_factor``.
    """
    _check_step(step)
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start: expected a value in [0, 1], got {pct_start}")
    if div_factor <= 0 or final_div_factor <= 0:
        raise ValueError(f"div_factor, final_div_factor: expected > 0, got {div_factor}, {final_div_factor}")
    initial = max_lr / div_factor
    final = initial / final_div_factor
    step = min(step, total_steps - 1)
    # Same phase boundaries and arithmetic as OneCycleLR.get_lr, so results agree bitwise.
    phases = ((float(pct_start * total_steps) - 1, initial, max_lr), (total_steps - 1, max_lr, final))
    start_step = 0.0
    for i, (end_step, start_lr, end_lr) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            span = end_step - start_step
            pct = (step - start_step) / span if span != 0 else 1.0  # a zero-length phase is already over
            return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
        start_step = end_step
    raise AssertionError("unreachable")


class Plateau:
    """Reduce the learning rate when a validation metric stops improving.

    The decision rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (same ``threshold``,
    ``threshold_mode``, ``cooldown`` and ``eps`` semantics), but decoupled from the optimizer:
    :meth:`step` takes the current lr and returns the next one, so it composes with
    :func:`apply_lr` and with a per-group ``lr_scale``. A NaN metric never improves.

    Usage::

        lr = plateau.step(val_loss, lr)
        apply_lr(optimizer, lr)

    Args:
        factor: multiply the lr by this after ``patience`` epochs without improvement, in ``(0, 1)``.
        patience: epochs without improvement tolerated before reducing.
        mode: ``"min"`` (lower is better) or ``"max"``.
        threshold: the minimal improvement that counts.
        min_lr: the lr never goes below this.
        threshold_mode: ``"rel"`` (improve by ``threshold`` times the best) or ``"abs"``.
        cooldown: epochs to wait after a reduction before counting bad epochs again.
        eps: reductions smaller than this are skipped.
    """

    def __init__(self, factor: float = 0.1, patience: int = 10, mode: str = "min", threshold: float = 1e-4,
                 min_lr: float = 0.0, threshold_mode: str = "rel", cooldown: int = 0, eps: float = 1e-8) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor: expected a value in (0, 1), got {factor}")
        if patience < 0:
            raise ValueError(f"patience: expected >= 0, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        if min_lr < 0:
            raise ValueError(f"min_lr: expected >= 0, got {min_lr}")
        if cooldown < 0:
            raise ValueError(f"cooldown: expected >= 0, got {cooldown}")
        self.factor, self.patience, self.mode = float(factor), int(patience), mode
        self.threshold, self.min_lr, self.threshold_mode = float(threshold), float(min_lr), threshold_mode
        self.cooldown, self.eps = int(cooldown), float(eps)
        self.best: float | None = None  # None until a finite metric was seen (JSON has no inf)
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_lr: float | None = None

    def is_better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than the threshold."""
        if self.best is None:
            return not math.isnan(value) and value != (math.inf if self.mode == "min" else -math.inf)
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return value < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return value > bound

    def step(self, metric: float, lr: float) -> float:
        """Record one epoch's ``metric`` (float or 0-dim tensor) and return the lr to use next."""
        value = float(metric)
        if self.is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        new_lr = float(lr)
        if self.num_bad_epochs > self.patience:
            reduced = max(new_lr * self.factor, self.min_lr)
            if new_lr - reduced > self.eps:
                new_lr = reduced
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self.last_lr = new_lr
        return new_lr

    def state_dict(self) -> dict[str, Any]:
        """The counters (JSON-able; settings are the constructor's)."""
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "last_lr": self.last_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict["best"]
        self.best = None if best is None else float(best)
        self.num_bad_epochs = int(state_dict["num_bad_epochs"])
        self.cooldown_counter = int(state_dict["cooldown_counter"])
        last = state_dict.get("last_lr")
        self.last_lr = None if last is None else float(last)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate to ``lr`` times the group's ``lr_scale`` (default 1).

    A group whose ``lr`` is a tensor (capturable/fused optimizers) is filled in place, so the
    optimizer keeps its tensor.
    """
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
