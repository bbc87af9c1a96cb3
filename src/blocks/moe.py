"""Gated mixture of experts: a gate picks experts per row, only the picked experts run on it.

Jacobs et al., "Adaptive Mixtures of Local Experts", 1991; Shazeer et al., "Outrageously Large
Neural Networks", ICLR 2017, https://arxiv.org/abs/1701.06538. The gates live in ``gates.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MixtureOfExperts", "MoEOutput"]


class MoEOutput(NamedTuple):
    """Result of a :class:`MixtureOfExperts` forward.

    - output: ``(B, *out)``, ``sum_e weights[:, e] * experts[e](x)``.
    - weights: ``(B, E)`` gate weights, 0 for unselected experts, rows sum to 1.
    - aux_loss: 0-dim float32 auxiliary loss of the gate (never None), for logging separately.
    """

    output: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor


class MixtureOfExperts(nn.Module):
    r"""Mixture of experts in which each row runs only through the experts its gate selects.

    .. math:: y_b = \sum_{e \in S(b)} w_{b,e}\, f_e(x_b), \qquad \sum_e w_{b,e} = 1

    A sparse gate (``KeyGate``, ``TopKGate`` with ``k < E``) dispatches rows: the (row, expert)
    assignments are sorted by expert once, each expert that received rows runs on
    ``x.index_select`` of them, and its weighted output is ``index_add``-ed back; an expert with
    no rows is not called at all (its parameters get no gradient, so DDP needs
    ``find_unused_parameters=True``). The per-expert row counts are needed as Python ints to
    split the rows, which costs **one host sync per forward** (``bincount(...).tolist()``). Under
    ``torch.compile`` the dispatch frame is skipped (a graph break: use ``fullgraph=False``)
    while the gate is compiled, and so is the forward of each expert whose class is defined
    outside torch (plain ``nn.Sequential``/``nn.Linear`` experts run eagerly), as its own graph
    dynamic in the row count: after the first calls, new routing patterns do not recompile
    (the compiled-loop alternative guarded on every count and recompiled per pattern). A dense gate
    (``SoftGate``, ``TopKGate`` with ``k = E``; ``gate.dense`` is True) runs every expert on the
    whole batch with no sync and no gather. The weighted sum is accumulated in float32 (float64
    for float64 experts) and cast back to the experts' output dtype.

    Args:
        experts: the ``E`` expert modules; each maps a batch of rows ``(b, *in)`` to
            ``(b, *out)`` with the same ``*out`` for all experts (checked at construction for
            experts that declare their width, ``nn.Linear`` or an ``nn.Sequential`` ending in
            one, and on every forward before the combine: a ``ValueError`` names the expert).
            Experts may be copies of one pretrained backbone (the m-height recipe); the gate
            breaks the symmetry.
        gate: a gate module (:class:`KeyGate`, :class:`SoftGate`, :class:`TopKGate` or your own
            returning a ``GateOutput``-like tuple with ``weights`` and ``indices``, and having
            ``num_experts`` and ``dense`` attributes).

    Forward args:
        x: the experts' input, a tensor or a tuple of tensors sharing the batch dim (each expert
            is called as ``expert(*x)``; rows of every tensor are dispatched together).
        key: ``(B,)`` integer routing key, required by ``KeyGate``, ignored by learned gates.
        gate_input: what the gate sees, when it is not ``x`` (e.g. only the code shape
            ``(n, k)`` in the m-height seed); defaults to ``x`` (its first tensor for a tuple).
        generator: randomness of a noisy gate.

    Shapes:
        - x: ``(B, *in)`` or a tuple of ``(B, ...)`` tensors
        - output: ``(B, *out)``; weights: ``(B, E)``; aux_loss: ``()``
    """

    def __init__(self, experts: Sequence[nn.Module], gate: nn.Module) -> None:
        super().__init__()
        if "_sparse_skipped_by_dynamo" not in MixtureOfExperts.__dict__:
            # dynamo skips _sparse's frame (its row counts are data-dependent ints that would
            # recompile the graph for every routing pattern) but still compiles what it calls: each
            # expert becomes its own graph, dynamic in the number of rows. Wrapped on first
            # construction, not at import: torch.compiler.disable imports torch._dynamo (~1 s).
            MixtureOfExperts._sparse_skipped_by_dynamo = torch.compiler.disable(MixtureOfExperts._sparse,
                                                                                  recursive=False)
        experts = list(experts)
        if not experts:
            raise ValueError("experts: expected at least one expert, got 0")
        num = getattr(gate, "num_experts", len(experts))
        if num != len(experts):
            raise ValueError(f"gate: expected num_experts == len(experts) ({len(experts)}), got {num}")
        widths = {e: w for e, w in enumerate(map(_declared_width, experts)) if w is not None}
        if len(set(widths.values())) > 1:
            raise ValueError(f"experts: expected the same output width for every expert, got declared widths "
                             f"{widths} (expert index: width)")
        self.experts = nn.ModuleList(experts)
        self.gate = gate

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], key: torch.Tensor | None = None,
                gate_input: torch.Tensor | None = None, generator: torch.Generator | None = None) -> MoEOutput:
        """Route the rows with the gate and combine the selected experts' outputs.

        Args:
            x: ``(B, *in)`` or a tuple of ``(B, ...)`` tensors (each expert is called as ``expert(*x)``).
            key: ``(B,)`` integer routing key, required by ``KeyGate``, ignored by learned gates.
            gate_input: ``(B, *)`` what the gate sees, when it is not ``x`` (default: ``x``, its first tensor
                for a tuple).
            generator: randomness of a noisy gate.

        Returns:
            :class:`MoEOutput` with ``output`` ``(B, *out)`` (``sum_e weights[:, e] * experts[e](x)``),
            ``weights`` ``(B, E)`` and the gate's ``aux_loss`` ``()``.
        """
        inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        if not inputs or inputs[0].dim() < 1:
            raise ValueError(f"x: expected (B, *) or a tuple of (B, ...) tensors, got {_shapes(inputs)}")
        batch = inputs[0].shape[0]
        if any(t.dim() < 1 or t.shape[0] != batch for t in inputs):
            raise ValueError(f"x: expected tensors sharing the batch size {batch}, got {_shapes(inputs)}")
        if gate_input is None:
            gate_input = inputs[0]
        elif gate_input.dim() < 1 or gate_input.shape[0] != batch:
            raise ValueError(f"gate_input: expected ({batch}, *), got {tuple(gate_input.shape)}")

        routing = self.gate(gate_input, key=key, generator=generator)
        weights = routing.weights
        if weights.shape != (batch, self.num_experts):
            raise ValueError(f"gate: expected weights ({batch}, {self.num_experts}), got {tuple(weights.shape)}")
        if getattr(self.gate, "dense", False):
            output = self._dense(inputs, weights)
        else:
            output = self._sparse_skipped_by_dynamo(inputs, weights, routing.indices)
        return MoEOutput(output, weights, routing.aux_loss)

    def _dense(self, inputs: tuple[torch.Tensor, ...], weights: torch.Tensor) -> torch.Tensor:
        total, out_dtype = None, None
        for e, expert in enumerate(self.experts):
            y = expert(*inputs)
            if total is None:
                out_dtype = y.dtype
                acc = torch.promote_types(y.dtype, torch.float32)
                total = torch.zeros(y.shape, device=y.device, dtype=acc)
            else:
                _check_out(y, total.shape[1:], e)
            w = weights[:, e].to(total.dtype)
            total = total + w.view(-1, *([1] * (y.dim() - 1))) * y.to(total.dtype)
        return total.to(out_dtype)

    def _sparse(self, inputs: tuple[torch.Tensor, ...], weights: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        batch = weights.shape[0]
        if indices.dim() != 2 or indices.shape[0] != batch:
            raise ValueError(f"gate: expected indices ({batch}, K), got {tuple(indices.shape)}")
        per_row = indices.shape[1]
        flat = indices.reshape(-1)
        # group the (row, expert) assignments by expert; rows keep their order within an expert
        rows = torch.argsort(flat, stable=True) // per_row
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        output, out_dtype, start = None, None, 0
        for e, (expert, count) in enumerate(zip(self.experts, counts)):
            if count == 0:
                continue
            index = rows[start:start + count]
            start += count
            y = expert(*(t.index_select(0, index) for t in inputs))
            if output is None:
                out_dtype = y.dtype
                acc = torch.promote_types(y.dtype, torch.float32)
                output = torch.zeros((batch, *y.shape[1:]), device=y.device, dtype=acc)
            else:
                _check_out(y, output.shape[1:], e)
            w = weights.index_select(0, index)[:, e].to(output.dtype)
            output.index_add_(0, index, w.view(-1, *([1] * (y.dim() - 1))) * y.to(output.dtype))
        if output is None:  # empty batch: no expert got a row; run one on it for the output shape
            y = self.experts[0](*inputs)
            return torch.zeros_like(y)
        return output.to(out_dtype)


def _declared_width(expert: nn.Module) -> int | None:
    """The output width of an ``nn.Linear`` (or an ``nn.Sequential`` ending in one), known without
    running it; None for any other module (an ``out_dim`` attribute is not reliable: GraphAttention's
    output is ``heads * out_dim`` wide)."""
    if isinstance(expert, nn.Sequential) and len(expert) and isinstance(expert[-1], nn.Linear):
        expert = expert[-1]
    return expert.out_features if isinstance(expert, nn.Linear) else None


def _check_out(y: torch.Tensor, expected: torch.Size, e: int) -> None:
    # before the combine: broadcasting would silently widen (B, 1) to (B, k), index_add_ fails cryptically
    if y.shape[1:] != expected:
        raise ValueError(f"experts: expected every expert to return (rows, *out) with the same *out; the "
                         f"first returned *out = {tuple(expected)}, expert {e} returned {tuple(y.shape)}")


def _shapes(inputs: tuple) -> list:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
