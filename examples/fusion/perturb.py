"""State perturbation (the seed's Change 12, "DAgger-lite"): leave the teacher's states, relabel exactly.

A model trained only on the states the teacher passed through never sees the states its own
search reaches. Here a stored state is moved by ``k`` random applicable ops (drawn uniformly
from ``FusionEnv.candidates()``, so neutral and uphill moves as often as improving ones, like the
annealer's proposals) and relabelled with the environment: the op set of the new state (every
applicable op with its crossing change, hence the exact improving set) and, for the teacher-pick
loss, one improving op drawn uniformly, which is the teacher's pick given that it improved.

Each op is applied by ``FusionEnv.apply`` to a candidate of the current state, so the result is
one Hamiltonian path again (``ops._verify_tables``), and replaying ``applied`` from the stored
state gives the same state. The draws come from the generator passed in; the training set
derives it from ``(seed, epoch, index)`` (``batches.FusionSamples``), so a resumed run perturbs
exactly as an uninterrupted one. In the seed the option was stored and never used.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .encoding import encode_ops, state_channels
from .env import FusionEnv
from .ops import Op

__all__ = ["Perturbed", "perturb_state", "world_from_state"]


class Perturbed(NamedTuple):
    """A perturbed state and its exact labels.

    - state: ``(4, h, w)`` float16 stored channels of the new state
    - ops: ``(3, h, w)`` uint8 its op set (``encoding.encode_ops``)
    - target: ``(3,)`` int64 ``(y, x, action)``, an improving op drawn uniformly
    - applied: the random ops applied to the stored state, in order
    - crossings: the new state's crossing count
    """

    state: np.ndarray
    ops: np.ndarray
    target: np.ndarray
    applied: list[Op]
    crossings: int


def world_from_state(state: np.ndarray) -> FusionEnv:
    """The world of stored channels ``(4, h, w)``: zones from channel 0 (``zone / max zone``, so the
    sorted distinct values are the zone ids), H and V edges from channels 1 and 2."""
    s = np.asarray(state, dtype=np.float32)
    _, h, w = s.shape
    zones = np.unique(s[0], return_inverse=True)[1].reshape(h, w)
    return FusionEnv(zones, s[1, :, : w - 1] > 0.5, s[2, : h - 1] > 0.5, check=False)


def perturb_state(state: np.ndarray, steps: int, rng: np.random.Generator) -> Perturbed | None:
    """Apply ``steps`` uniformly drawn applicable ops to the stored state and relabel it.

    Returns ``None`` when the perturbed state has no improving op (nothing to learn there; the
    caller keeps the stored sample).

    Args:
        state: ``(4, h, w)`` stored channels (``encoding.state_channels``).
        steps: number of random ops ``k >= 1``.
        rng: the source of every draw.
    """
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    env = world_from_state(state)
    applied = []
    for _ in range(steps):
        pool = env.candidates()
        if pool.size == 0:
            break
        op = pool.op(int(rng.integers(pool.size)))
        env.apply(op)
        applied.append(op)
    pool = env.candidates()
    improving = np.flatnonzero(pool.delta < 0)
    if improving.size == 0:
        return None
    pick = pool.op(int(improving[rng.integers(improving.size)]))
    return Perturbed(state_channels(env.zones, env.H, env.V),
                     encode_ops(pool.variant, pool.y, pool.x, pool.delta, env.height, env.width),
                     np.array([pick.y, pick.x, pick.variant], dtype=np.int64), applied, env.crossings)
