"""Rank-0 progress display that redraws in place on a terminal and writes plain lines to logs.

Progress bars that emit carriage returns flood redirected logs (SLURM, ``nohup``) with
thousands of overwritten fragments (Lightning #6647, #8975). Here the stream decides: on a
TTY the line is redrawn in place with ``\\r``; anywhere else one complete, newline-terminated
and flushed line is written per interval. This is the only module of blockyard that prints.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, TextIO

import torch

__all__ = ["Dashboard"]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # host sync only when a line is actually drawn
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Dashboard:
    """Progress of a training run: step/total, steps per second, ETA and the latest metrics.

    ``update(step, **metrics)`` is cheap (a clock read); the line is only formatted when it
    is drawn, so tensors passed as metrics cost a host sync per drawn line, not per step.
    Drawn lines look like ``step 120/1000  12.0% | 35.2 it/s | ETA 0:00:25 | loss 0.1234``.

    Args:
        total: the number of steps of the run.
        every_s: seconds between lines when the stream is not a TTY.
        stream: text stream written to; ``sys.stdout`` by default.
        is_main: draw only on the main process; elsewhere every method is a no-op.
        tty_every_s: seconds between in-place redraws on a TTY.
        desc: prefix of every line.
        clock: monotonic time source in seconds (injectable for tests).
    """

    def __init__(self, total: int, every_s: float = 10.0, stream: TextIO | None = None, is_main: bool = True, *,
                 tty_every_s: float = 0.5, desc: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total: expected an int >= 1, got {total!r}")
        if every_s < 0 or tty_every_s < 0:
            raise ValueError(f"every_s, tty_every_s: expected >= 0, got {every_s}, {tty_every_s}")
        self.total, self.is_main, self.desc, self._clock = total, is_main, desc, clock
        self.stream = sys.stdout if stream is None else stream
        self.tty = _isatty(self.stream)
        self.interval = tty_every_s if self.tty else every_s
        self._start: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_draw = -math.inf
        self._state: tuple[int, dict[str, Any]] | None = None
        self._drawn_state: tuple[int, dict[str, Any]] | None = None
        self._width = 0  # length of the line currently shown on a TTY

    def update(self, step: int, **metrics: Any) -> None:
        """Record progress after ``step`` steps; draws when the interval has passed or at the end."""
        if not self.is_main:
            return
        now = self._clock()
        if self._start is None:
            self._start = (step, now)
        self._state = (step, metrics)
        if now - self._last_draw >= self.interval or step >= self.total:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The progress line for the latest update."""
        if self._state is None:
            return f"{self.desc}step 0/{self.total}"
        now = self._clock() if now is None else now
        step, metrics = self._state
        s0, t0 = self._start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else math.nan
        eta = (self.total - step) / rate if rate > 0 else math.nan
        parts = [f"{self.desc}step {step}/{self.total} {100.0 * step / self.total:5.1f}%",
                 f"{rate:.3g} it/s" if math.isfinite(rate) else "-- it/s", f"ETA {_duration(eta)}"]
        if metrics:
            parts.append("  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
        return " | ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_draw = now
        self._drawn_state = self._state

    def write(self, text: str) -> None:
        """Print a message on its own line without breaking the progress line."""
        if not self.is_main:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._state is not None:
            self._width = 0
            self._draw(self._clock())
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state if it was not shown yet and end the line on a TTY."""
        if not self.is_main or self._state is None:
            return
        if self._drawn_state is not self._state:
            self._draw(self._clock())
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.flush()
        self._state = self._drawn_state = None

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
