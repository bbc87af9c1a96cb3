"""Read a built design dataset: one checksummed ``GroupedStore`` per split, tensors out.

A dataset directory (written by ``build_data.py``) holds ``build.json`` (settings and summary;
its presence means the build finished) and ``train/``, ``val/``, ``test/``, each a
:class:`blockyard.data.GroupedStore` (safetensors, sha256 in its index, memory-mapped). One
stored sample (``FIELDS``):

==============  ==========  ===============================================================
field           dtype       shape and meaning
==============  ==========  ===============================================================
``image``       uint8       ``(3, H, W)`` RGB
``masks``       bool        ``(2, H, W)`` text ink, image boxes (True = belongs)
``color``       uint8       ``(H, W)`` colour class, 0 = background (``vocab.NUM_COLORS``)
``hierarchy``   uint8       ``(H, W)`` hierarchy level (value * ``vocab.HIERARCHY_SCALE``, exact)
``goal``        int64       index into ``vocab.GOALS``
``format``      int64       index into ``vocab.FORMATS``
``tone``        float32     in [0, 1]
``grammar``     float32     ``(4,)`` scores in the order of ``vocab.GRAMMAR_NAMES``
``latents``     int64       ``(6,)`` revealed latents, order ``vocab.LATENT_NAMES``
``index``       int64       the design's index: ``generator.sample_design(seed, index)``
==============  ==========  ===============================================================
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from blockyard.data import GroupedStore

from .generator import sample_design
from .render import structure_tensor
from .vocab import HIERARCHY_SCALE

__all__ = ["FIELDS", "FORMAT", "SPLITS", "DesignBatch", "DesignData", "open_split", "read_summary"]

FORMAT = "blockyard.design-dataset"
SPLITS = ("train", "val", "test")
FIELDS = ("image", "masks", "color", "hierarchy", "goal", "format", "tone", "grammar", "latents", "index")


class DesignBatch(NamedTuple):
    """Designs as model-ready tensors (a leading batch dim, or none for one sample).

    Shapes:
        - image: ``(B, 3, H, W)`` float32 RGB in [0, 1]
        - structure: ``(B, 4, H, W)`` float32 F: text mask, image mask, colour class, hierarchy
        - goal, format: ``(B,)`` int64
        - tone: ``(B,)`` float32
        - grammar: ``(B, 4)`` float32
        - latents: ``(B, 6)`` int64
        - index: ``(B,)`` int64 design index
    """

    image: torch.Tensor
    structure: torch.Tensor
    goal: torch.Tensor
    format: torch.Tensor
    tone: torch.Tensor
    grammar: torch.Tensor
    latents: torch.Tensor
    index: torch.Tensor


def read_summary(root: str | os.PathLike) -> dict:
    """The ``build.json`` of a finished build; ``FileNotFoundError`` for an unfinished or missing one."""
    path = Path(root) / "build.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no build.json, not a finished design dataset (run build_data.py)")
    summary = json.loads(path.read_text())
    if summary.get("format") != FORMAT:
        raise ValueError(f"{path}: format {summary.get('format')!r}, expected {FORMAT!r}")
    return summary


def _to_batch(raw: dict) -> DesignBatch:
    masks = raw["masks"]
    structure = structure_tensor(masks[:, 0], masks[:, 1], raw["color"], raw["hierarchy"].float() / HIERARCHY_SCALE)
    return DesignBatch(raw["image"].float() / 255.0, structure, raw["goal"], raw["format"], raw["tone"],
                       raw["grammar"], raw["latents"], raw["index"])


class DesignData(torch.utils.data.Dataset):
    """One split of a built design dataset (see the module docstring), as a map-style Dataset.

    ``data[i]`` is a :class:`DesignBatch` without a batch dim (``DataLoader`` collates it);
    ``get_batch(indices)`` reads several samples in one memory-mapped gather; ``load()``
    returns the whole split. Opening checks every file's sha256 against the store's index
    (``verify=True``) and raises :class:`blockyard.data.CorruptedStoreError` naming the file
    when one does not match.

    Args:
        root: dataset directory (``build_data.build``'s ``out``).
        split: one of ``SPLITS``.
        verify: hash every file on open (under DDP, on one rank only).
    """

    def __init__(self, root: str | os.PathLike, split: str, verify: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.summary = read_summary(root)
        self.seed = int(self.summary["settings"]["seed"])
        self.store = GroupedStore(self.root / split, verify=verify)
        missing = sorted(set(FIELDS) - set(self.store.fields))
        if missing:
            raise ValueError(f"{self.root / split}: not a design split, fields {missing} are missing")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> DesignBatch:
        one = _to_batch({k: v[None] for k, v in self.store[i].items()})
        return DesignBatch(*(t[0] for t in one))

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> DesignBatch:
        """Samples ``indices`` (any order, repeats allowed) as one batch."""
        return _to_batch(self.store.get_batch(indices))

    def load(self) -> DesignBatch:
        """The whole split as one batch (64 px: about 30 KB per design)."""
        return self.get_batch(np.arange(len(self)))

    def design(self, i: int) -> dict:
        """The design dict of sample ``i``, regenerated from the build's seed and its index."""
        return sample_design(self.seed, int(self.store[i]["index"]))


def open_split(root: str | os.PathLike, split: str, verify: bool = True) -> DesignData:
    """:class:`DesignData` of ``split`` in ``root``."""
    return DesignData(root, split, verify=verify)
