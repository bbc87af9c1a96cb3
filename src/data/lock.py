"""An exclusive advisory file lock, so two processes never write one folder at the same time."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["LockHeld", "file_lock", "hold_lock", "release_lock"]


class LockHeld(RuntimeError):
    """:func:`hold_lock` found the lock taken; ``holder`` is what its holder wrote into the file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


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


def hold_lock(path: str | os.PathLike, owner: str) -> IO[str]:
    """Take an exclusive ``flock`` on ``path`` without waiting, write ``owner`` into it, return its handle.

    The lock lasts until :func:`release_lock` (or the process ends, however it ends). A run folder
    holds one for its lifetime (:class:`~blockyard.train.RunDir`). Without ``fcntl`` (Windows)
    nothing is locked.

    Raises:
        LockHeld: another process holds it; ``holder`` is the ``owner`` it wrote ("unknown" if none yet).
    """
    path = Path(path)
    fh = open(path, "a+")
    if fcntl is not None:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise LockHeld(path, holder) from None
    fh.seek(0)
    fh.truncate()
    fh.write(owner + "\n")
    fh.flush()
    return fh


def release_lock(fh: IO[str]) -> None:
    """Release and close a handle from :func:`hold_lock`."""
    if fcntl is not None:
        fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()
