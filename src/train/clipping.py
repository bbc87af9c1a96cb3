"""Gradient clipping: total-norm, element-value and unit-wise adaptive (AGC) clipping.

Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", ICML 2021
(NFNets, AGC). https://arxiv.org/abs/2102.06171 — same numerics as timm's ``adaptive_clip_grad``.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["adaptive_clip_grad_", "clip_gradients", "grad_norm", "unitwise_norm"]

ParamsLike = nn.Module | torch.Tensor | Iterable[Any]
ExcludeLike = str | torch.Tensor | Callable[[str | None, torch.Tensor], bool] | Iterable[Any] | None

_ALGORITHMS = ("norm", "value", "agc")


def _named(params: ParamsLike) -> list[tuple[str | None, torch.Tensor]]:
    """Normalise the accepted parameter forms to ``[(name or None, tensor), ...]``."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    if isinstance(params, torch.Tensor):
        return [(None, params)]
    out: list[tuple[str | None, torch.Tensor]] = []
    for item in params:
        if isinstance(item, torch.Tensor):
            out.append((None, item))
        elif (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], torch.Tensor)):
            out.append(item)
        else:
            raise TypeError(f"params: expected a Module, tensors or (name, tensor) pairs, got an item of "
                            f"type {type(item).__name__}")
    return out


def _excluder(exclude: ExcludeLike) -> Callable[[str | None, torch.Tensor], bool]:
    """Build one predicate ``(name, param) -> bool`` from the accepted ``exclude`` forms."""
    if isinstance(exclude, (str, torch.Tensor)) or (callable(exclude) and not isinstance(exclude, nn.Module)):
        exclude = (exclude,)
    elif isinstance(exclude, nn.Module):
        exclude = list(exclude.parameters())
    patterns: list[str] = []
    tensors: set[int] = set()
    predicates: list[Callable[[str | None, torch.Tensor], bool]] = []
    for item in exclude:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, torch.Tensor):
            tensors.add(id(item))
        elif isinstance(item, nn.Module):
            tensors.update(id(p) for p in item.parameters())
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            tensors.add(id(item[1]))
        elif callable(item):
            predicates.append(item)
        else:
            raise TypeError(f"exclude: expected name patterns, tensors, (name, tensor) pairs, modules or "
                            f"predicates, got an item of type "
                            f"{type(item).__name__}")

    def excluded(name: str | None, p: torch.Tensor) -> bool:
        if id(p) in tensors:
            return True
        if patterns:
            if name is None:
                raise ValueError("exclude: name patterns need named parameters (a Module or "
                                 "named_parameters() pairs), got unnamed tensors")
            for pat in patterns:
                if name == pat or name.startswith(pat + ".") or fnmatch.fnmatchcase(name, pat):
                    return True
        return any(pred(name, p) for pred in predicates)

    return excluded


def _select(params: ParamsLike, exclude: ExcludeLike = ()) -> list[torch.Tensor]:
    """Parameters that have a gradient and are not excluded, in order, each tensor once."""
    named = _named(params)
    empty = exclude is None or (isinstance(exclude, (tuple, list, set)) and not exclude)
    excluded = None if empty else _excluder(exclude)
    seen: set[int] = set()
    out = []
    for name, p in named:
        if p.grad is None or id(p) in seen or (excluded is not None and excluded(name, p)):
            continue
        if p.grad.is_sparse:
            raise TypeError(f"params: sparse gradients are not supported (parameter {name or tuple(p.shape)})")
        seen.add(id(p))
        out.append(p)
    return out


def _grouped(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    # Same reduction order as torch.nn.utils.clip_grad_norm_ (per-group foreach norms, then the norm
    # of the stacked norms), so the "norm" algorithm matches it bitwise.
    if not grads:
        return torch.tensor(0.0)
    first = grads[0].device
    norms = [n for group in _grouped(grads) for n in torch._foreach_norm(group, norm_type)]
    total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)
    # FSDP2 (fully_shard) gradients are DTensor shards: the norm of the shards is a partial result;
    # full_tensor() reduces it over the ranks, so every rank gets the whole model's norm.
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(f"norm_type: expected a positive number or inf, got {norm_type}")
    return norm_type


def unitwise_norm(x: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """Norm of each output unit of a parameter, as in NFNets/timm.

    A tensor with ``ndim <= 1`` (bias, gain, scalar) is a single unit: its whole-tensor norm (a
    0-dim tensor). Otherwise dim 0 indexes the units (rows of a Linear weight, filters of a Conv
    weight) and the norm runs over all other dims, kept as size-1 dims for broadcasting. Half
    precision inputs are reduced in float32.

    Note: dim 0 is *not* the output dim of ``ConvTranspose`` weights ``(in, out, *k)``; AGC then
    clips per input unit. Exclude such weights or accept that behaviour.

    Shapes:
        - x: ``(U, *rest)`` or ``()`` / ``(N,)``
        - output: ``(U, 1, ..., 1)`` or ``()``
    """
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type, dtype=dtype)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)


def _settled(norm: torch.Tensor) -> torch.Tensor:
    """A norm of FSDP2 (DTensor) shards, reduced over the ranks where it is a partial result.

    A unit spanning the sharded dim 0 (a bias: one unit) has its norm split over the ranks; the
    in-place clamps below need it whole. Per-row norms of a dim-0 shard are local already.
    """
    placements = getattr(norm, "placements", ())
    if not any(p.is_partial() for p in placements):
        return norm
    from torch.distributed.tensor import Replicate

    return norm.redistribute(placements=[Replicate() if p.is_partial() else p for p in placements])


@torch.no_grad()
def adaptive_clip_grad_(params: ParamsLike, clip_factor: float = 0.01, eps: float = 1e-3,
                        norm_type: float = 2.0) -> None:
    r"""Unit-wise adaptive gradient clipping (AGC), in place.

    For every unit :math:`i` of every parameter :math:`W` (see :func:`unitwise_norm`):

    .. math::
        G_i \leftarrow G_i \cdot \min\Big(1, \frac{\lambda \max(\lVert W_i\rVert, \epsilon)}
        {\max(\lVert G_i\rVert, 10^{-6})}\Big)

    i.e. a unit's gradient is rescaled to norm :math:`\lambda \max(\lVert W_i\rVert, \epsilon)` when it
    is larger, and left bit-for-bit unchanged otherwise (timm's ``torch.where`` form, same results).
    The floor ``eps`` on the *parameter* norm lets zero-initialised parameters move; a 1-D parameter
    (bias, norm gain) is one unit, clipped by its whole-vector norm, exactly as timm does. Biases are
    not excluded here; the paper excludes the final classifier — use
    ``clip_gradients(..., algorithm="agc", exclude=...)`` for that.

    Args:
        params: a Module, tensors, or ``(name, tensor)`` pairs; those without ``.grad`` are skipped.
        clip_factor: :math:`\lambda`, the largest allowed ratio of gradient to parameter norm.
        eps: floor on the parameter unit norm.
        norm_type: order of the unit norms.

    Shapes:
        - every parameter: any; its gradient is modified in place.
    """
    if clip_factor <= 0:
        raise ValueError(f"clip_factor: expected > 0, got {clip_factor}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    norm_type = _check_norm_type(norm_type)
    params = _select(params)
    if not params:
        return
    grads = [p.grad for p in params]
    max_norms = [_settled(unitwise_norm(p.detach(), norm_type)) for p in params]
    torch._foreach_clamp_min_(max_norms, eps)
    torch._foreach_mul_(max_norms, clip_factor)
    grad_norms = [_settled(unitwise_norm(g.detach(), norm_type)) for g in grads]
    torch._foreach_clamp_min_(grad_norms, 1e-6)
    scale = torch._foreach_div(max_norms, grad_norms)
    # min(1, ratio) keeps small units exactly unchanged (x * 1.0 == x) and avoids a host sync.
    torch._foreach_clamp_max_(scale, 1.0)
    # One call for all parameters; the scales broadcast (units, 1, ..., 1) over each gradient.
    torch._foreach_mul_(grads, scale)


@torch.no_grad()
def grad_norm(params: ParamsLike, exclude: ExcludeLike = (), norm_type: float = 2.0) -> torch.Tensor:
    """The total gradient norm of ``params`` (those with a gradient, not excluded), without clipping.

    Same selection and reduction as :func:`clip_gradients`, so passing the result to it as
    ``norm=`` clips exactly as if it had measured the norm itself (one read of the gradients saved).

    Shapes:
        - output: ``()`` on the first gradient's device (no host sync)
    """
    return _total_norm([p.grad for p in _select(params, exclude)], _check_norm_type(norm_type))


def clip_gradients(params: ParamsLike, algorithm: str = "norm", value: float = 1.0, exclude: ExcludeLike = (),
                   norm_type: float = 2.0, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Clip gradients in place and return the total gradient norm measured *before* clipping.

    Algorithms:
        - ``"norm"``: scale all gradients by ``min(1, value / (total_norm + 1e-6))``; identical to
          ``torch.nn.utils.clip_grad_norm_(params, value, norm_type)``.
        - ``"value"``: clamp every gradient element to ``[-value, value]``.
        - ``"agc"``: :func:`adaptive_clip_grad_` with ``clip_factor=value``.

    The returned norm is a 0-dim tensor on the first gradient's device (no host sync); it is
    computed over the selected parameters only (``tensor(0.)`` when none has a gradient). A
    non-finite norm is returned as is and, for ``"norm"``, propagates into the gradients like
    torch's function does, so a non-finite guard downstream can see it.

    Args:
        params: a Module (its ``named_parameters()``), an iterable of tensors, or an iterable of
            ``(name, tensor)`` pairs such as ``model.named_parameters()``. Parameters without a
            gradient are skipped; a tensor listed twice counts once.
        algorithm: ``"norm"``, ``"value"`` or ``"agc"``.
        value: max total norm, max absolute element, or AGC clip factor; must be > 0.
        exclude: parameters to leave alone and to leave out of the returned norm (``None`` or
            ``()``: none). One item or an iterable of items, each of which is
            a name pattern (``str``) — matches a name equal to it, a name below it as a module
            prefix (``"head"`` matches ``"head.weight"``), or an ``fnmatch`` glob (``"*.bias"``);
            needs named ``params``;
            a tensor — that exact parameter object;
            a ``(name, tensor)`` pair, so ``model.head.named_parameters()`` works as is;
            a Module — all of its parameters (``exclude=model.head``);
            a callable ``predicate(name, param) -> bool`` — ``name`` is ``None`` for unnamed tensors.
        norm_type: order of the norm (``float("inf")`` allowed).
        norm: the total norm of the same selection, already measured by :func:`grad_norm`
            (``"norm"`` only); it is not measured again.

    Shapes:
        - output: ``()``
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {_ALGORITHMS}, got {algorithm!r}")
    value = float(value)
    if not value > 0:
        raise ValueError(f"value: expected > 0, got {value}")
    norm_type = _check_norm_type(norm_type)
    selected = _select(params, exclude)
    grads = [p.grad for p in selected]
    if norm is not None and algorithm != "norm":
        raise ValueError(f"norm: a precomputed norm applies to algorithm='norm' only, got algorithm={algorithm!r}")
    total = _total_norm(grads, norm_type) if norm is None else norm
    if not grads:
        return total
    if algorithm == "norm":
        coef = torch.clamp(value / (total + 1e-6), max=1.0)
        # Multiplying by exactly 1.0 is a full read-write pass over every gradient for nothing.
        # On the CPU checking the value costs no device sync, so skip it (bitwise identical);
        # on accelerators always multiply, as torch does, to avoid a host sync.
        if coef.device.type == "cpu" and bool(coef == 1.0):
            return total
        for group in _grouped(grads):
            torch._foreach_mul_(group, coef.to(group[0].device))
    elif algorithm == "value":
        for group in _grouped(grads):
            torch._foreach_clamp_min_(group, -value)
            torch._foreach_clamp_max_(group, value)
    else:
        adaptive_clip_grad_(selected, clip_factor=value, norm_type=norm_type)
    return total
