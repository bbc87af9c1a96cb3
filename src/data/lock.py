"""An exclusive advisory file lock, so two processes never write one folder at the same time."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, with its parent folder).

    Other processes entering ``file_lock`` on the same path wait until this one leaves. Used by
    :func:`~blockyard.data.write_shard` to serialise index updates and by the examples' dataset
    builders so that two ranks or jobs never build one directory at once. On systems without
    ``fcntl`` (Windows) nothing is locked: do not write one folder from two processes there.

    Args:
        path: the lock file, e.g. ``folder / ".lock"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
