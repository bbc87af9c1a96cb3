"""Auxiliary losses of a mixture-of-experts router: Switch load balance and ST-MoE router z-loss.

Fedus et al., "Switch Transformers", JMLR 2022, https://arxiv.org/abs/2101.03961 (eq. 4);
Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022,
https://arxiv.org/abs/2202.08906 (eq. 5).

They live with the gates that add them to ``GateOutput.aux_loss`` (so ``blockyard.blocks`` needs
no other subpackage); ``blockyard.losses`` re-exports both under the same names.
"""
from __future__ import annotations

import torch

__all__ = ["router_z_loss", "switch_balance_loss"]


def switch_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    r"""Switch Transformer load-balancing loss, equal to 1.0 at perfectly uniform routing.

    .. math::
        L = E \sum_{e=1}^{E} f_e \, P_e, \qquad
        f_e = \frac{1}{TK} \sum_{t,k} \mathbb{1}[\mathrm{idx}_{t,k} = e], \qquad
        P_e = \frac{1}{T} \sum_t p_{t,e}

    ``f`` (the share of assignments each expert receives) is a count and carries no gradient;
    ``P`` (the mean router probability) does, so minimising ``L`` pushes probability away from
    overloaded experts. ``L = 1`` when both are uniform and ``L = E`` when every token goes to one
    expert with probability 1. Switch (k = 1), GShard, DeepSpeed and ST-MoE pass the top-1 index
    only; a ``(T, K)`` index counts all K assignments and is normalised by ``T*K``, so the minimum
    is still 1 (HF's Mixtral ``load_balancing_loss_func`` is ``K`` times this value). Multiply by
    the paper's coefficient (``1e-2``) yourself. Computed in float32.

    Args:
        probs: router probabilities ``softmax(logits)`` over the E experts (not renormalised
            after top-k).
        expert_index: integer expert chosen for each token, top-1 ``(T,)`` or top-k ``(T, K)``.

    Shapes:
        - probs: ``(T, E)``
        - expert_index: ``(T,)`` or ``(T, K)``
        - output: scalar (0-dim float32)
    """
    if probs.dim() != 2:
        raise ValueError(f"probs: expected (T, E), got {tuple(probs.shape)}")
    tokens, experts = probs.shape
    if expert_index.dim() not in (1, 2) or expert_index.shape[0] != tokens:
        raise ValueError(f"expert_index: expected ({tokens},) or ({tokens}, K), got {tuple(expert_index.shape)}")
    if expert_index.dtype.is_floating_point or expert_index.dtype.is_complex or expert_index.dtype == torch.bool:
        raise TypeError(f"expert_index: expected an integer tensor, got {expert_index.dtype}")
    flat = expert_index.reshape(-1).long()
    counts = torch.zeros(experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    fraction = counts / max(flat.numel(), 1)
    mean_prob = probs.float().mean(0)
    return experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""ST-MoE router z-loss: mean over rows of the squared log-partition function.

    .. math:: L_z = \frac{1}{T} \sum_t \Big(\log \sum_e e^{l_{t,e}}\Big)^2

    Penalises large router logits (the cause of round-off blow-ups in the softmax), not
    imbalance. Computed in float32 (``exp`` of bf16 logits overflows early); the paper's
    coefficient is ``1e-3``.

    Args:
        logits: router logits, experts on the last dim; every leading dim counts as rows.

    Shapes:
        - logits: ``(T, E)`` or ``(*, T, E)``
        - output: scalar (0-dim float32)
    """
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected (T, E) with E >= 1, got {tuple(logits.shape)}")
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
