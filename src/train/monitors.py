"""Training-health monitors: per-module gradient norms, per-block activation statistics, and a
guard that skips non-finite steps on all ranks together.

All three are free of host syncs until their results are read, except :class:`NonFiniteGuard`,
whose skip-or-step decision needs one (as ``GradScaler.step`` does).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from .distributed import any_rank, is_distributed, unwrap

__all__ = ["ActivationMonitor", "ActivationStats", "GradNormMonitor", "NonFiniteGuard"]


def _group_key(name: str, depth: int | None) -> str:
    *modules, leaf = name.split(".")
    if not modules:
        return leaf  # a parameter owned by the root module is its own group
    return ".".join(modules if depth is None else modules[:depth])


class GradNormMonitor:
    r"""L2 norms of the gradients grouped by module, plus the total norm, in one vectorised pass.

    A parameter ``encoder.blocks.3.conv.weight`` belongs to group ``encoder`` at ``depth=1``,
    ``encoder.blocks`` at ``depth=2``, ``encoder.blocks.3.conv`` at ``depth=None``; a parameter
    of the root module is its own group. Group norm :math:`\sqrt{\sum_{p \in G} \|g_p\|_2^2}`,
    total over all parameters (the value ``clip_grad_norm_`` returns). Per-parameter norms come
    from one ``torch._foreach_norm`` in float32, so fp16/bf16 gradients do not overflow. Call it
    after ``scaler.unscale_(optimizer)`` to see true gradients under fp16. Parameters without a
    gradient count as zero.

    Args:
        model: the model (DDP and torch.compile wrappers are looked through for names).
        depth: how many module-name components define a group; ``None`` = the full module path.

    Shapes:
        - :meth:`compute_tensor`: ``(G + 1,)`` float32, groups in :attr:`names` order then the total
    """

    def __init__(self, model: nn.Module, depth: int | None = 1) -> None:
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise ValueError(f"depth: expected an integer >= 1 or None, got {depth!r}")
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: expected at least one parameter with requires_grad, got none")
        keys = [_group_key(n, depth) for n, _ in named]
        self.names: list[str] = list(dict.fromkeys(keys))
        if "total" in self.names:
            raise ValueError("model: a module group is named 'total', which is reserved for the total norm")
        position = {k: i for i, k in enumerate(self.names)}
        self.depth = depth
        self._params = [p for _, p in named]
        self._group = [position[k] for k in keys]
        self._index_cache: dict[torch.device, torch.Tensor] = {}

    def compute_tensor(self) -> torch.Tensor:
        """Group norms then the total norm, as one float32 tensor (no host sync)."""
        have = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not have:
            return torch.zeros(len(self.names) + 1, device=self._params[0].device)
        grads = [self._params[i].grad for i in have]
        device = grads[0].device
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        sq = torch.stack([n.to(device) for n in norms]).square()
        if len(have) == len(self._params):
            if device not in self._index_cache:
                self._index_cache[device] = torch.tensor(self._group, device=device)
            index = self._index_cache[device]
        else:
            index = torch.tensor([self._group[i] for i in have], device=device)
        group_sq = torch.zeros(len(self.names), device=device).index_add_(0, index, sq)
        return torch.cat([group_sq, group_sq.sum().reshape(1)]).sqrt()

    def compute(self) -> dict[str, float]:
        """``{group: norm, ..., "total": norm}`` as Python floats (one host sync)."""
        values = self.compute_tensor().tolist()
        return dict(zip([*self.names, "total"], values))


class ActivationStats(NamedTuple):
    """Statistics of one block's output over all its elements (float32)."""

    mean: float
    std: float
    abs_max: float


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


class ActivationMonitor:
    """Forward hooks recording mean, std (population) and abs-max of chosen blocks' outputs.

    Meant for the drift-versus-depth diagnostic of deep stacks (e.g. FNO blocks): with blocks in
    depth order, a growing ``std`` or ``abs_max`` along :meth:`stats` is drift. Statistics are
    computed in float32 on the device and kept there; nothing syncs with the host until
    :meth:`stats` (or :meth:`tensor`) is read. A block called several times in one forward keeps
    its last call. For tuple outputs the first tensor is used. Hooks are removed by
    :meth:`remove` or on leaving the ``with`` block::

        with ActivationMonitor(model, module_types=FNOBlock) as monitor:
            model(x)
        for name, s in monitor.stats().items():
            log.info("%s mean %.3g std %.3g max %.3g", name, *s)

    Args:
        model: the model (wrappers are looked through).
        module_types: a module class or tuple of classes; every submodule that is an instance
            is monitored, in ``named_modules`` order.

    Shapes:
        - :meth:`tensor`: ``(M, 3)`` float32, rows ``(mean, std, abs_max)``, NaN for a block
          that has not run
    """

    def __init__(self, model: nn.Module, module_types: type[nn.Module] | tuple[type[nn.Module], ...]) -> None:
        types = module_types if isinstance(module_types, tuple) else (module_types,)
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"module_types: expected nn.Module subclasses, got {module_types!r}")
        modules = [(n or type(m).__name__, m) for n, m in unwrap(model).named_modules() if isinstance(m, types)]
        if not modules:
            names = [t.__name__ for t in types]
            raise ValueError(f"module_types: expected at least one submodule of type {names}, got none")
        self.names: list[str] = [n for n, _ in modules]
        self._stats: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in modules]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            x = t.detach().float()
            std, mean = torch.std_mean(x, correction=0)
            self._stats[name] = torch.stack([mean, std, x.abs().amax()])

        return hook

    def tensor(self) -> torch.Tensor:
        """``(M, 3)`` statistics in :attr:`names` order (no host sync)."""
        if not self._stats:
            return torch.full((len(self.names), 3), math.nan)
        device = next(iter(self._stats.values())).device
        empty = torch.full((3,), math.nan, device=device)
        return torch.stack([self._stats.get(n, empty).to(device) for n in self.names])

    def stats(self) -> dict[str, ActivationStats]:
        """``{block name: ActivationStats}`` for the blocks that ran (one host sync)."""
        rows = self.tensor().tolist()
        return {n: ActivationStats(*row) for n, row in zip(self.names, rows) if n in self._stats}

    def reset(self) -> None:
        """Forget the recorded statistics (hooks stay)."""
        self._stats.clear()

    def remove(self) -> None:
        """Remove every hook; recorded statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class NonFiniteGuard:
    """Skip a step whose loss or gradients hold NaN/inf, on all ranks together; abort on a streak.

    :meth:`should_skip` checks the loss and the gradients (the float32 sum of each gradient: it is
    non-finite iff an element is, unless the sum passes 3.4e38, far above where an L2 norm overflows
    at 1.8e19 per element; an inf-norm is exact but 15x slower on the CPU), OR-s the
    verdict over ranks with :func:`any_rank`, and on a skip sets the gradients of ``parameters``
    to ``None``, so every rank skips the same step and the replicas stay equal. The
    ``max_consecutive``-th non-finite step in a row raises ``RuntimeError`` on every rank (so
    no rank hangs); a good step resets the streak. Under fp16, check after
    ``scaler.unscale_`` and leave room in ``max_consecutive`` for the scaler's own early
    overflows, or check only the loss.

    Usage::

        if guard.should_skip(loss, model.parameters()):
            continue                  # grads are cleared; no step, no schedule, no EMA
        optimizer.step()

    Args:
        max_consecutive: non-finite steps in a row that abort training (``>= 1``).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive: expected an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def should_skip(
        self, loss: torch.Tensor | None = None, parameters: Iterable[torch.Tensor] | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> bool:
        """True (on every rank) when this step must be skipped; clears the grads if so.

        ``grad_norm``: the gradients' total norm, already measured (for norm clipping); then the
        gradients are not read again, and a norm that overflowed float32 counts as non-finite
        (clipping by it would zero every gradient anyway).
        """
        params = [] if parameters is None else [p for p in parameters if p.grad is not None]
        loss_bad = grad_bad = None
        if loss is not None:
            loss_bad = ~torch.isfinite(loss.detach()).all()
        if grad_norm is not None:
            grad_bad = ~torch.isfinite(grad_norm.detach())
        elif params:
            # A sum is NaN/inf iff an element is (or the float32 sum passes 3.4e38, i.e. the gradient
            # diverged anyway); one read of each gradient, ~15x faster on the CPU than an inf-norm.
            device = params[0].grad.device
            sums = [p.grad.sum(dtype=torch.float32).to(device) for p in params]
            grad_bad = ~torch.isfinite(torch.stack(sums)).all()
        flags = [f for f in (loss_bad, grad_bad) if f is not None]
        if not flags:
            raise ValueError("should_skip: expected a loss or parameters with gradients, got neither")
        local = flags[0] if len(flags) == 1 else flags[0].to(flags[1].device) | flags[1]
        if not any_rank(local):
            self.consecutive = 0
            return False
        for p in params:
            p.grad = None
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            loss_state = "non-finite" if loss_bad is not None and bool(loss_bad) else "finite"
            grad_state = "non-finite" if grad_bad is not None and bool(grad_bad) else "finite"
            where = " on another rank" if loss_state == grad_state == "finite" and is_distributed() else ""
            raise RuntimeError(
                f"NonFiniteGuard: {self.consecutive} consecutive steps with a non-finite loss or gradient"
                f"{where} (here, last step: loss {loss_state}, gradients {grad_state}); aborting. "
                f"Lower the learning rate, check the data, or use bf16/fp32."
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])
