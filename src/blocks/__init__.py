"""Layers and tensor ops used inside models. Every name is re-exported flat here."""

from .film import FiLM
from .norm import group_norm

__all__ = [
    "FiLM",
    "group_norm",
]
