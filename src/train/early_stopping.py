"""Early stopping whose decision is the same on every rank.

A rank that stops alone leaves the others blocked in their next collective (Lightning #379);
the stop decision is therefore OR-ed over ranks with :func:`any_rank` (as Lightning's
``reduce_boolean_decision(should_stop, all=False)``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .distributed import any_rank

__all__ = ["EarlyStopping"]


class EarlyStopping:
    r"""Stop after ``patience`` checks in a row without improvement, agreed across ranks.

    With ``mode="min"`` a metric :math:`m` improves when :math:`m < \text{best} - \delta`
    (``mode="max"``: :math:`m > \text{best} + \delta`), with :math:`\delta` = ``min_delta``.
    A non-finite metric never improves, and stops at once when ``stop_on_nonfinite``.

    :meth:`step` is a collective under a process group: every rank calls it at the same point.
    It returns True on all ranks if any rank's own rule says stop. Pass an all-reduced metric
    (``all_reduce_mean``) to keep ``best`` and the counter identical on all ranks.

    Args:
        patience: stop at the ``patience``-th check in a row without improvement (``0`` and ``1``
            both stop at the first such check).
        mode: ``"min"`` or ``"max"``.
        min_delta: smallest change that counts as an improvement (``>= 0``).
        stop_on_nonfinite: stop immediately on a NaN/inf metric.
    """

    def __init__(
        self, patience: int, mode: str = "min", min_delta: float = 0.0, stop_on_nonfinite: bool = True
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience: expected an integer >= 0, got {patience!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta: expected a finite number >= 0, got {min_delta!r}")
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.best: float | None = None
        self.best_check: int | None = None
        self.num_bad = 0
        self.checks = 0
        self.stopped = False

    def improves(self, metric: float) -> bool:
        """Whether ``metric`` beats ``best`` by more than ``min_delta`` (no state change)."""
        if not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return metric < self.best - self.min_delta
        return metric > self.best + self.min_delta

    def step(self, metric: float | torch.Tensor) -> bool:
        """Record one check of ``metric``; True (on every rank) when training should stop."""
        value = float(metric.detach()) if isinstance(metric, torch.Tensor) else float(metric)
        self.checks += 1
        if self.improves(value):
            self.best, self.best_check, self.num_bad = value, self.checks, 0
            local = False
        else:
            self.num_bad += 1
            local = self.num_bad >= self.patience or (self.stop_on_nonfinite and not math.isfinite(value))
        self.stopped = any_rank(local)
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (``best`` is ``None`` before the first finite metric)."""
        return {
            "mode": self.mode,
            "best": self.best,
            "best_check": self.best_check,
            "num_bad": self.num_bad,
            "checks": self.checks,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and ``best``; the configuration stays the constructor's."""
        missing = {"mode", "best", "best_check", "num_bad", "checks", "stopped"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        if state["mode"] != self.mode:
            raise ValueError(f"state: expected mode {self.mode!r}, got {state['mode']!r}")
        self.best = None if state["best"] is None else float(state["best"])
        self.best_check = None if state["best_check"] is None else int(state["best_check"])
        self.num_bad = int(state["num_bad"])
        self.checks = int(state["checks"])
        self.stopped = bool(state["stopped"])

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, mode={self.mode!r}, min_delta={self.min_delta}, "
                f"best={self.best}, num_bad={self.num_bad})")
