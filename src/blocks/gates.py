"""Gates of a mixture of experts: hard routing by a key, dense softmax blend, sparse (noisy) top-k.

Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer", ICLR 2017, https://arxiv.org/abs/1701.06538 (noisy top-k gating);
Fedus et al., "Switch Transformers", https://arxiv.org/abs/2101.03961 (load-balancing loss).

Every gate has the signature ``gate(x, key=None, generator=None) -> GateOutput`` and the
attributes ``num_experts`` and ``dense`` (True when every expert runs on every row), which is all
:class:`~blockyard.blocks.MixtureOfExperts` relies on. Learned gates accept and ignore ``key`` and
``KeyGate`` ignores ``x`` beyond its batch size, so gates are interchangeable in one model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .router_losses import router_z_loss, switch_balance_loss

__all__ = ["GateOutput", "KeyGate", "SoftGate", "TopKGate"]


class GateOutput(NamedTuple):
    """What a gate decided for each row.

    - weights: ``(B, E)`` mixing weights, exactly 0 for unselected experts, rows sum to 1
      (float32, or float64 for float64 input).
    - indices: ``(B, K)`` long, the selected experts of each row (``K = 1`` for ``KeyGate``,
      ``k`` in descending weight order for ``TopKGate``, ``E`` for ``SoftGate``).
    - selected: ``(B, E)`` bool, True where the expert runs on the row (note: True = selected,
      not "masked").
    - logits: ``(B, E)`` float32 logits the softmax saw (after temperature and noise), or
      ``None`` for ``KeyGate``. Feed them to ``router_z_loss`` if you want it.
    - aux_loss: 0-dim float32 auxiliary loss, never None; add ``coef * aux_loss`` to your loss.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    selected: torch.Tensor
    logits: torch.Tensor | None
    aux_loss: torch.Tensor


def _router(in_dim: int, num_experts: int, hidden: int | None, act_layer: Callable[[], nn.Module],
            bias: bool, device, dtype) -> nn.Module:
    if hidden is None:
        return nn.Linear(in_dim, num_experts, bias=bias, device=device, dtype=dtype)
    return nn.Sequential(nn.Linear(in_dim, hidden, device=device, dtype=dtype), act_layer(),
                         nn.Linear(hidden, num_experts, bias=bias, device=device, dtype=dtype))


def _check_gate_input(x: torch.Tensor, in_dim: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ValueError(f"x: expected (B, {in_dim}), got {tuple(x.shape)}")


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    # routing decisions and softmax in float32 even under autocast (DeepSpeed/ST-MoE do the same)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _reset_router(router: nn.Module) -> None:
    for module in router.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


class KeyGate(nn.Module):
    r"""Hard routing by an integer key: row ``b`` goes to expert ``table[key[b]]`` with weight 1.

    The default table is ``table[i] = i % num_experts``. This is the m-height seed's hard gate (one
    expert per code shape ``(n, k)``, looked up in a dict); map your key to ``0 .. num_keys-1``
    first. No parameters; ``aux_loss`` is 0 (routing is fixed, there is nothing to balance).

    Args:
        num_keys: number of distinct keys; keys must lie in ``[0, num_keys)``.
        num_experts: number of experts ``E``.
        table: optional ``num_keys`` expert indices (stored as a buffer, so it is saved).
        check_range: raise ``ValueError`` on a key outside ``[0, num_keys)``. The check costs one
            host sync per call (skipped under ``torch.compile``); turn it off in a hot GPU loop
            once the data is trusted.

    Shapes:
        - x: ``(B, *)`` (only its batch size and device are used)
        - key: ``(B,)`` integer
        - weights, selected: ``(B, E)``; indices: ``(B, 1)``
    """

    dense = False

    def __init__(self, num_keys: int, num_experts: int, table: Sequence[int] | torch.Tensor | None = None,
                 check_range: bool = True, device=None) -> None:
        super().__init__()
        if num_keys < 1 or num_experts < 1:
            raise ValueError(f"num_keys, num_experts: expected >= 1, got {num_keys}, {num_experts}")
        if table is None:
            table = torch.arange(num_keys) % num_experts
        table = torch.as_tensor(table, dtype=torch.long)
        if table.shape != (num_keys,):
            raise ValueError(f"table: expected ({num_keys},), got {tuple(table.shape)}")
        if (table < 0).any() or (table >= num_experts).any():
            raise ValueError(f"table: expected expert indices in [0, {num_experts}), got {table.tolist()}")
        self.num_keys = num_keys
        self.num_experts = num_experts
        self.check_range = check_range
        self.register_buffer("table", table.to(device))

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> GateOutput:
        """Route row ``b`` to expert ``table[key[b]]``.

        Args:
            x: ``(B, *)``; only its batch size and device are used.
            key: ``(B,)`` integer keys in ``[0, num_keys)`` (required).
            generator: unused (the routing is deterministic); accepted so all gates share one call.

        Returns:
            :class:`GateOutput` with one-hot ``weights`` and ``selected`` ``(B, E)``, ``indices``
            ``(B, 1)``, ``logits`` None and ``aux_loss`` 0.
        """
        if x.dim() < 1:
            raise ValueError(f"x: expected (B, *), got {tuple(x.shape)}")
        batch = x.shape[0]
        if key is None:
            raise ValueError(f"key: KeyGate routes by an integer key, expected ({batch},), got None")
        if key.shape != (batch,):
            raise ValueError(f"key: expected ({batch},), got {tuple(key.shape)}")
        if key.dtype.is_floating_point or key.dtype.is_complex or key.dtype == torch.bool:
            raise TypeError(f"key: expected an integer tensor, got {key.dtype}")
        if self.check_range and not torch.compiler.is_compiling() and batch > 0:
            low, high = key.min(), key.max()
            if bool((low < 0) | (high >= self.num_keys)):  # the one host sync of this gate
                raise ValueError(f"key: expected values in [0, {self.num_keys}), "
                                 f"got values in [{int(low)}, {int(high)}] for key shape {tuple(key.shape)}")
        expert = self.table[key.long()]
        selected = F.one_hot(expert, self.num_experts).bool()
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return GateOutput(selected.to(dtype), expert[:, None], selected, None,
                          torch.zeros((), device=x.device))

    def extra_repr(self) -> str:
        return f"num_keys={self.num_keys}, num_experts={self.num_experts}"


class SoftGate(nn.Module):
    r"""Dense softmax blend: every expert runs on every row, weighted by ``softmax(router(x))``.

    .. math:: w = \mathrm{softmax}(W x + b), \qquad y = \textstyle\sum_e w_e\, f_e(x)

    The m-height seed's soft gate is ``hidden=16`` (Linear -> ReLU -> Linear) on the code
    shape ``(n, k)``. ``aux_loss`` is ``z_loss_coef * router_z_loss(logits)``, so 0 by default:
    all experts run on all rows, compute does not depend on routing, so there is no load to
    balance. To discourage a blend collapsing onto one expert, add
    ``switch_balance_loss(out.logits.softmax(-1), out.logits.argmax(-1))`` yourself.

    Args:
        in_dim: features of the gate input ``x``.
        num_experts: number of experts ``E``.
        hidden: width of a hidden layer of the router, or ``None`` for one linear layer.
        act_layer: activation after the hidden layer.
        z_loss_coef: weight of the router z-loss inside ``aux_loss``.
        bias: bias of the last router layer.

    Shapes:
        - x: ``(B, in_dim)``
        - weights, selected, logits: ``(B, E)``; indices: ``(B, E)``
    """

    dense = True

    def __init__(self, in_dim: int, num_experts: int, hidden: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU, z_loss_coef: float = 0.0, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.z_loss_coef = z_loss_coef
        self.router = _router(in_dim, num_experts, hidden, act_layer, bias, device, dtype)

    def reset_parameters(self) -> None:
        _reset_router(self.router)

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> GateOutput:
        """Blend every expert with ``softmax(router(x))``.

        Args:
            x: ``(B, in_dim)`` gate input.
            key: ignored (learned gates route by ``x``); accepted so all gates share one call.
            generator: unused (no noise); accepted so all gates share one call.

        Returns:
            :class:`GateOutput` with ``weights``, ``selected`` (all True) and ``logits`` ``(B, E)``,
            ``indices`` ``(B, E)`` and ``aux_loss`` ``z_loss_coef * router_z_loss(logits)``.
        """
        _check_gate_input(x, self.in_dim)
        logits = _float_logits(self.router(x))
        weights = logits.softmax(-1)
        indices = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        aux = self.z_loss_coef * router_z_loss(logits) if self.z_loss_coef else torch.zeros((), device=x.device)
        return GateOutput(weights, indices, torch.ones_like(weights, dtype=torch.bool), logits, aux)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_experts={self.num_experts}"


class TopKGate(nn.Module):
    r"""Sparse top-k gate with weights renormalised over the k selected experts.

    .. math::
        l = (W x + b) / T + \epsilon \odot (\mathrm{softplus}(W_n x) + \epsilon_0)
        \ \text{(noise: train mode only)}, \qquad
        w = \mathrm{softmax}(\mathrm{top}_k(l)) \text{ scattered into } E \text{ zeros}

    The softmax over the k kept logits equals the full softmax renormalised over them (the
    m-height seed's sparse gate). ``noisy=True`` is Shazeer's noisy top-k (``W_n``
    zero-initialised as in tensor2tensor, ``epsilon ~ N(0, 1)`` from ``generator``); noise is off
    in eval mode. ``learn_temperature=True`` learns ``T = exp(t)``, ``t = 0`` at init.

    With ``k = 1`` the renormalised weight is identically 1, which gives the router no gradient
    (Megatron-LM #894); ``top1_grad=True`` keeps the value 1 but passes the gradient of the
    full-softmax probability (straight-through, as Switch's ``p * f(x)`` would).

    ``aux_loss`` is ``switch_balance_loss(softmax(l), top-1 index)`` (the Switch/GShard/DeepSpeed
    convention: top-1 assignments only, value 1.0 at uniform routing, E when collapsed), plus
    ``z_loss_coef * router_z_loss(l)``. It is returned raw: multiply by ~1e-2 when adding it.

    Args:
        in_dim: features of the gate input ``x``.
        num_experts: number of experts ``E``.
        k: experts per row, ``1 <= k <= E`` (``k = E`` runs densely).
        noisy: add Shazeer's learned Gaussian noise to the logits in training.
        learn_temperature: divide the logits by a learned temperature.
        hidden, act_layer, bias: router shape, as in :class:`SoftGate`.
        noise_epsilon: minimum noise standard deviation (``1e-2`` in tensor2tensor).
        z_loss_coef: weight of the router z-loss inside ``aux_loss``.
        top1_grad: straight-through router gradient for ``k = 1``.

    Shapes:
        - x: ``(B, in_dim)``
        - weights, selected, logits: ``(B, E)``; indices: ``(B, k)``
    """

    def __init__(self, in_dim: int, num_experts: int, k: int = 2, noisy: bool = False,
                 learn_temperature: bool = False, hidden: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU, bias: bool = True, noise_epsilon: float = 1e-2,
                 z_loss_coef: float = 0.0, top1_grad: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k: expected 1 <= k <= num_experts ({num_experts}), got k={k}")
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.k = k
        self.dense = k == num_experts
        self.noisy = noisy
        self.noise_epsilon = noise_epsilon
        self.z_loss_coef = z_loss_coef
        self.top1_grad = top1_grad
        self.router = _router(in_dim, num_experts, hidden, act_layer, bias, device, dtype)
        self.noise = nn.Linear(in_dim, num_experts, bias=False, device=device, dtype=dtype) if noisy else None
        self.log_temperature = (nn.Parameter(torch.zeros((), device=device, dtype=dtype))
                                if learn_temperature else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_router(self.router)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        if self.log_temperature is not None:
            nn.init.zeros_(self.log_temperature)

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> GateOutput:
        """Select the ``k`` highest-scoring experts per row and renormalise their weights.

        Args:
            x: ``(B, in_dim)`` gate input.
            key: ignored (learned gates route by ``x``); accepted so all gates share one call.
            generator: draws the logit noise of a ``noisy`` gate in training.

        Returns:
            :class:`GateOutput` with ``weights`` (0 outside the top ``k``, rows sum to 1), ``selected``
            and ``logits`` ``(B, E)``, ``indices`` ``(B, k)`` and the balance ``aux_loss``.
        """
        _check_gate_input(x, self.in_dim)
        logits = _float_logits(self.router(x))
        if self.log_temperature is not None:
            logits = logits * torch.exp(-self.log_temperature.to(logits.dtype))
        if self.noise is not None and self.training:
            std = F.softplus(self.noise(x).to(logits.dtype)) + self.noise_epsilon
            eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + eps * std
        probs = logits.softmax(-1)
        top_logits, indices = logits.topk(self.k, dim=-1)
        if self.k == 1 and self.top1_grad:
            top_prob = probs.gather(1, indices)
            top_weights = torch.ones_like(top_prob) + (top_prob - top_prob.detach())  # value exactly 1
        else:
            top_weights = top_logits.softmax(-1)
        weights = torch.zeros_like(probs).scatter(1, indices, top_weights)
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, True)
        aux = switch_balance_loss(probs, indices[:, 0])
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(logits)
        return GateOutput(weights, indices, selected, logits, aux)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, "
                f"learn_temperature={self.log_temperature is not None}")
