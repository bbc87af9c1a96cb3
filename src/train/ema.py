"""Exponential moving average of a model's weights, with timm ModelEmaV3's decay warmup.

Schedule from timm ``ModelEmaV3(use_warmup=True)`` (after @crowsonkb):
https://github.com/huggingface/pytorch-image-models/blob/main/timm/utils/model_ema.py
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .distributed import unwrap

__all__ = ["EMA"]

logger = logging.getLogger(__name__)

_BUFFER_POLICIES = ("copy", "average")


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor (FSDP2 shard) as its local shard, a view: foreach ops have no DTensor rule."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


class EMA:
    r"""Exponential moving average of a model's parameters (and, by policy, buffers).

    .. math::
        \theta_{ema} \leftarrow d_t\,\theta_{ema} + (1 - d_t)\,\theta, \qquad
        d_t = \begin{cases} 0 & t \le 1 \\
        \min\big(d,\ 1 - (1 + (t-1)/\gamma)^{-p}\big) & t > 1 \text{ (warmup)} \\
        d & t > 1 \text{ (no warmup)} \end{cases}

    where :math:`t` is the number of optimizer steps taken so far (1 after the first step), so the
    first update copies the model. With :math:`\gamma = 1, p = 2/3` the decay reaches 0.999 after
    about 31.6k steps. This is timm ``ModelEmaV3(use_warmup=True, update_after_step=0)``.

    The averaged copy ``ema.module`` is a deep copy of the model unwrapped by
    :func:`~blockyard.train.unwrap` (DDP/DataParallel ``.module`` and ``torch.compile``'s
    ``._orig_mod`` are stripped; a module of your own that holds the network under ``.module`` is
    kept whole), in eval mode, with ``requires_grad=False``.
    Build the EMA before attaching forward hooks (monitors): ``deepcopy`` copies hooks too.
    Update it on every rank after every optimizer step that was really taken (not after a step
    the grad scaler skipped); DDP keeps the parameters identical, so every rank's EMA agrees.

    **Updating every k steps.** With ``every=k > 1`` the average moves only at steps divisible by
    ``k`` (and at the first update, which copies); :meth:`update` returns at once on other steps.
    An update after a gap compounds the decays of the steps since the last one,

    .. math::
        \theta_{ema} \leftarrow D\,\theta_{ema} + (1 - D)\,\theta, \qquad
        D = \prod_{s = t_{last}+1}^{t} d_s,

    so the old average keeps exactly the weight the per-step rule would give it and the averaging
    horizon, counted in optimizer steps, does not change; what is lost is only the weights of the
    skipped steps, each stood in for by the newer one. This is the memory-traffic lever for
    memory-bound models (one update is a full read-read-write pass over the weights, as costly
    as a copy); Lightning's ``EMAWeightAveraging(update_every_n_steps=...)`` and ema-pytorch's
    ``update_every`` skip steps the same way but keep the per-step decay, which stretches the
    horizon k times. ``every=1`` (the default) is the per-step formula above, exactly.

    Entries are matched by position (``parameters()`` then ``buffers()`` order), so the model
    passed to :meth:`update` may be wrapped differently from the one given here. All floating
    tensors are updated with one ``torch._foreach_lerp_`` call; integer tensors (such as
    ``num_batches_tracked``) are always copied.

    Args:
        model: the model to average (wrapped or not).
        decay: the decay :math:`d` reached after warmup (or used throughout without warmup).
        warmup: use the warmup schedule above; otherwise :math:`d` from step 2 on.
        warmup_gamma: :math:`\gamma`, stretches the warmup.
        warmup_power: :math:`p`, the warmup's power.
        buffers: ``"copy"`` (BN running statistics follow the live model, like ``AveragedModel``)
            or ``"average"`` (floating buffers are averaged too, like timm's default).
        every: move the average every ``every`` optimizer steps (see above); 1 = every step.

    Shapes:
        - every EMA tensor has the shape, dtype and device of the model's tensor.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, buffers: str = "copy", every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
        if warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma: expected > 0, got {warmup_gamma}")
        if warmup_power <= 0:
            raise ValueError(f"warmup_power: expected > 0, got {warmup_power}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        if buffers not in _BUFFER_POLICIES:
            raise ValueError(f"buffers: expected one of {_BUFFER_POLICIES}, got {buffers!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.buffers = buffers
        self.every = every
        self.step: int | None = None  # step of the last update that moved the average; None before
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)
        self.rebind()

    def rebind(self) -> None:
        """Re-read :attr:`module`'s tensors after it was changed in place.

        :func:`~blockyard.train.shard_model` calls it after sharding the averaged copy like the
        model (FSDP2 replaces every parameter by a DTensor shard). Sharded tensors are averaged
        through their local shards, which match the live model's shard for shard.
        """
        params = list(self.module.parameters())
        bufs = list(self.module.buffers())
        self._n_params, self._n_buffers = len(params), len(bufs)
        # Split positions once: lerped (floating) vs copied; the live model is split the same way.
        entries = _local(params + bufs)
        self._lerp_idx = [i for i, t in enumerate(entries)
                          if t.is_floating_point() and (i < len(params) or self.buffers == "average")]
        lerp = set(self._lerp_idx)
        self._copy_idx = [i for i in range(len(entries)) if i not in lerp]
        self._ema_lerp = [entries[i] for i in self._lerp_idx]
        self._ema_copy = [entries[i] for i in self._copy_idx]

    def decay_at(self, step: int) -> float:
        """The decay used by ``update(model, step)`` (0.0 means a plain copy)."""
        if step <= 1:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (step - 1) / self.warmup_gamma) ** -self.warmup_power)

    def _entries(self, model: nn.Module) -> list[torch.Tensor]:
        model = unwrap(model)
        params = list(model.parameters())
        bufs = list(model.buffers())
        if len(params) != self._n_params or len(bufs) != self._n_buffers:
            raise ValueError(f"model: expected {self._n_params} parameters and {self._n_buffers} buffers like "
                             f"the averaged model, got {len(params)} and {len(bufs)}")
        return _local(params + bufs)

    def _span_decay(self, step: int) -> float:
        """Decay of one update at ``step``: ``d_step``, or the product since the last one if ``every > 1``."""
        if self.every == 1:
            return self.decay_at(step)
        if self.step is None:
            return 0.0  # the product would run from step 1, whose decay is 0: a copy
        d = 1.0
        for s in range(min(self.step, step - 1) + 1, step + 1):  # at least the step itself
            d *= self.decay_at(s)
            if d == 0.0:
                break
        return d

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, force: bool = False) -> None:
        """Move the average towards ``model`` (wrapped or not) after optimizer step ``step``.

        With ``every > 1`` this is a no-op unless ``step`` is a multiple of ``every``, it is the
        first update, or ``force`` is true (use it before evaluating or saving the average at a
        step that is not a multiple, so it includes the latest weights).

        Args:
            model: the live model, same architecture as the one the EMA was built from.
            step: optimizer steps taken so far, a Python int (1 after the first step).
            force: update even at a step that ``every`` would skip.
        """
        if isinstance(step, torch.Tensor) or step < 0:
            raise ValueError(f"step: expected a Python int >= 0, got {step!r}")
        if self.every > 1 and not force and self.step is not None and step % self.every != 0:
            return
        entries = self._entries(model)
        d = self._span_decay(step)
        if self._ema_lerp:
            src = [entries[i].detach() for i in self._lerp_idx]
            if d == 0.0:
                torch._foreach_copy_(self._ema_lerp, src)
            else:
                torch._foreach_lerp_(self._ema_lerp, src, 1.0 - d)
        if self._ema_copy:
            torch._foreach_copy_(self._ema_copy, [entries[i].detach() for i in self._copy_idx])
        self.step = int(step)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers into the average (a hard reset)."""
        entries = self._entries(model)
        torch._foreach_copy_(self._ema_lerp + self._ema_copy,
                             [entries[i].detach() for i in self._lerp_idx + self._copy_idx])

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights under ``"module"`` (name -> tensor) plus JSON-able settings and ``step``."""
        return {
            "module": self.module.state_dict(),
            "step": self.step,
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "buffers": self.buffers,
            "every": self.every,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averaged weights and ``step``; the schedule settings stay the constructor's.

        A saved setting that differs from the constructor's is logged as a warning (a resumed run
        with a different decay is legal but usually a mistake).
        """
        if "module" not in state_dict:
            raise ValueError(f"state_dict: expected a 'module' entry, got keys {sorted(state_dict)}")
        self.module.load_state_dict(state_dict["module"])
        step = state_dict.get("step")
        self.step = None if step is None else int(step)
        for key in ("decay", "warmup", "warmup_gamma", "warmup_power", "buffers", "every"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                logger.warning("EMA.load_state_dict: saved %s=%r differs from this EMA's %r; keeping %r",
                               key, state_dict[key], getattr(self, key), getattr(self, key))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, warmup={self.warmup}, warmup_gamma={self.warmup_gamma}, "
                f"warmup_power={self.warmup_power:.4g}, buffers={self.buffers!r}, every={self.every}, "
                f"step={self.step})")
