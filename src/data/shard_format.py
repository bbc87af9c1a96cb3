"""The on-disk format of a shard folder, shared by its writer and its reader.

A folder holds safetensors shards and an ``index.json`` listing them (file name, sample count,
byte size, sha256) with the folder's field schema (dtype and per-sample shape of each field).
:func:`~blockyard.data.write_shard` writes it; :class:`~blockyard.data.ShardDataset` reads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ._safetensors import CorruptedStoreError
from .padded import PAD_MASK

__all__ = ["FORMAT", "INDEX", "MATRIX", "RESERVED", "SHAPE", "SIDE", "TARGET", "pad_mask", "read_index"]

FORMAT = "blockyard.ShardDataset"
INDEX = "index.json"
MATRIX, SHAPE, SIDE, TARGET = "matrix", "shape", "side", "target"
RESERVED = (MATRIX, SHAPE, SIDE, TARGET, PAD_MASK)  # field names extras may not take


def pad_mask(shapes: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """``(S, K, N)`` bool, True = padding (outside the true ``(k, n)`` of each row of ``shapes``).

    Args:
        shapes: the true ``(k, n)`` of each sample.
        K, N: the padded matrix shape.

    Shapes:
        - shapes: ``(S, 2)`` integers
        - output: ``(S, K, N)`` bool
    """
    rows = torch.arange(K)[None, :, None] >= shapes[:, 0, None, None]
    cols = torch.arange(N)[None, None, :] >= shapes[:, 1, None, None]
    return rows | cols


def read_index(folder: Path) -> dict[str, Any]:
    """The parsed ``index.json`` of a shard folder.

    Raises:
        CorruptedStoreError: the index is not JSON, or not a shard folder's index.
    """
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise CorruptedStoreError(f"{path}: unreadable index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise CorruptedStoreError(f"{path}: format {got!r}, expected {FORMAT!r}")
    return index
