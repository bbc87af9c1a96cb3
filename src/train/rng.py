"""Capture and restore every global random number generator a training step can draw from.

Exact resume needs the python ``random`` module, numpy's legacy global generator, the torch
CPU generator and every CUDA device's generator. The captured state is plain data (ints,
lists, byte tensors) that :mod:`blockyard.train.serialize` stores without pickle; explicit
``torch.Generator``/``numpy.random.Generator`` objects are checkpointed as ordinary entries.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Return the state of python ``random``, numpy's global generator, torch CPU and CUDA.

    CUDA states are captured per device, and only when CUDA is available.
    """
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002 (the global one)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state` exactly.

    Raises:
        ValueError: when the state was captured with CUDA devices this process does not have.
    """
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) > torch.cuda.device_count():  # before touching anything
        raise ValueError(f"rng: checkpoint holds CUDA states for {len(cuda)} devices, "
                         f"this process sees {torch.cuda.device_count()}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    npy = state["numpy"]
    legacy = (npy["kind"], np.asarray(npy["key"], dtype=np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
              float(npy["gauss"]))
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if cuda and not torch.cuda.is_available():
        logger.warning("rng: the checkpoint holds CUDA generator states but CUDA is not available; "
                       "they are not restored")
    elif cuda:
        for device, s in enumerate(cuda):
            torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), device)
