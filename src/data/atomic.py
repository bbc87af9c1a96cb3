"""Write a JSON file so that a crash leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._safetensors import fsync_dir

__all__ = ["write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and durably.

    The text goes to ``<path>.tmp``, is fsynced, renamed over ``path`` (``os.replace``) and the
    folder is fsynced. Concurrent writers of one path must hold a :func:`file_lock`.

    Args:
        path: the destination file.
        obj: anything ``json.dump`` accepts.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
