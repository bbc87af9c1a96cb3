"""JSON-lines metrics log whose content after a resume equals that of an uninterrupted run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MetricsLog", "read_metrics"]


def _plain(value: Any, key: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, key) for k, v in value.items()}
    raise TypeError(f"{key}: expected a number, string, tensor or list/dict of them, got {type(value).__name__}")


def _complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines; a partial last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [line for line in lines[:-1] if line.strip()]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a metrics JSONL file into a list of records (``NaN``/``Infinity`` come back as floats)."""
    return [json.loads(line) for line in _complete_lines(Path(path))]


class MetricsLog:
    """Append-only JSONL metrics file: one record per step or epoch, at full float precision.

    Each :meth:`log` writes one ``{"step": step, **values}`` line with a single write and
    flushes it. Floats are written with ``repr`` and read back bit-identical; a non-finite
    value is written as ``NaN``/``Infinity`` (what Python's ``json`` reads back) because a
    diverging loss must be recorded, not rejected.

    Resume: pass the step of the checkpoint you resumed from as ``resume_step``. Records
    with ``step <= resume_step`` are kept and everything after (written by the interrupted
    run after that checkpoint, including a half-written last line) is dropped by an atomic
    rewrite, so the resumed run's file equals an uninterrupted run's. For this to hold, log a
    step's record *before* saving that step's checkpoint. ``resume_step=None`` starts a new
    log: an existing file is emptied.

    Args:
        path: the ``.jsonl`` file; parent directories are created.
        resume_step: see above.
        is_main: only the main process writes; elsewhere :meth:`log` is a no-op.
        fsync: also fsync after every record (durable at a small cost per call).

    Example::

        resumed = ckpt.load_latest(state)
        log = MetricsLog(out / "metrics.jsonl", resume_step=resumed["step"] if resumed else None)
        log.log(step, loss=loss, lr=lr)
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, *, is_main: bool = True,
                 fsync: bool = False) -> None:
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)):
            raise TypeError(f"resume_step: expected an int or None, got {type(resume_step).__name__}")
        self.path = Path(path)
        self.is_main, self.fsync = is_main, fsync
        self._file = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate_after(-1 if resume_step is None else resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Atomically drop every record with ``"step" > step`` (and any partial last line)."""
        if not self.is_main:
            return
        kept = [line for line in _complete_lines(self.path) if json.loads(line).get("step", -1) <= step]
        if self._file is not None:
            self._file.flush()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self._file is not None:  # the old handle points at the replaced file
            self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, /, **values: Any) -> None:
        """Append ``{"step": step, **values}``; tensors and numpy values become plain numbers."""
        if self._file is None:
            if self.is_main:
                raise ValueError(f"MetricsLog({self.path}) is closed")
            return
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        if "step" in values:
            raise ValueError("values: 'step' is given as the first argument")
        record = {"step": step, **{k: _plain(v, k) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All complete records in the file."""
        if self._file is not None:
            self._file.flush()
        return read_metrics(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
