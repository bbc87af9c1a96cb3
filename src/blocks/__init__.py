"""Layers and tensor ops used inside models. Every name is re-exported flat here."""

from .drop import DropPath, drop_path
from .film import FiLM
from .norm import group_norm

__all__ = [
    "DropPath",
    "drop_path",
    "FiLM",
    "group_norm",
]
