"""blockyard: config-free PyTorch building blocks for scientific deep learning.

Subpackages (``import blockyard`` stays light: each is imported on first attribute access, so
``blockyard.blocks.UNet`` works after ``import blockyard``, as with numpy's and scipy's
subpackages, and torch is loaded only then):

- ``blockyard.blocks``: layers and tensor ops used inside models.
- ``blockyard.losses``: loss functions and evaluation metrics.
- ``blockyard.data``: storage, datasets, samplers, splits.
- ``blockyard.train``: distributed set-up, precision, accumulation, clipping, EMA, schedules,
  checkpoints, early stopping, dashboard, monitors and sweeps.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static tools see the subpackages; at run time PEP 562 loads them on demand
    from . import blocks, data, losses, train

__version__ = "0.1.0"

_SUBPACKAGES = ("blocks", "data", "losses", "train")

__all__ = ["__version__", "blocks", "data", "losses", "train"]


def __getattr__(name: str) -> Any:
    """Import a subpackage on first access (PEP 562); any other unknown name is an AttributeError."""
    if name in _SUBPACKAGES:
        # import_module binds the subpackage on this module, so later lookups skip this function
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})
