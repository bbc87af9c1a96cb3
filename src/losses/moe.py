"""Auxiliary losses of a mixture-of-experts router, re-exported from :mod:`blockyard.blocks.router_losses`.

The gates of :mod:`blockyard.blocks.gates` compute these losses inside their forward, so the one
definition lives next to them; this module keeps them reachable with the other losses.
"""
from __future__ import annotations

from ..blocks.router_losses import router_z_loss, switch_balance_loss

__all__ = ["router_z_loss", "switch_balance_loss"]
