"""Graph attention (GAT) over one shared ``edge_index``, with PyG ``GATConv`` parameter names and numerics.

Veličković et al., "Graph Attention Networks", ICLR 2018. https://arxiv.org/abs/1710.10903
Reference implementation: torch_geometric ``nn.conv.GATConv`` (not a dependency).

Edge convention everywhere in this file: ``edge_index[0]`` is the source ``j``, ``edge_index[1]``
the target ``i``; a message flows ``j -> i`` and the softmax runs over the edges *into* ``i``.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GraphAttention", "GraphAttentionOutput", "add_self_loops", "segment_softmax"]


class GraphAttentionOutput(NamedTuple):
    """``GraphAttention(..., return_attention=True)`` result.

    ``alpha[..., k, h]`` is the (post-dropout) weight of edge ``edge_index_used[:, k]`` in head
    ``h``, in float32 (float64 for a float64 module); edges follow PyG's order: the input edges
    minus their self loops, then one ``(i, i)`` per node appended (when ``add_self_loops``).
    """

    output: torch.Tensor
    edge_index_used: torch.Tensor
    alpha: torch.Tensor


def _check_edge_index(edge_index: torch.Tensor, num_nodes: int, device: torch.device | None = None) -> None:
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"edge_index: expected a torch.Tensor of shape (2, E), got {type(edge_index).__name__}")
    if edge_index.dtype != torch.long or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index: expected an int64 (long) tensor of shape (2, E), "
                         f"got {edge_index.dtype} of shape {tuple(edge_index.shape)}")
    if device is not None and edge_index.device != device:
        raise ValueError(f"edge_index: expected a tensor on {device} (the device of x), got {edge_index.device}")
    # Data-dependent, so one host sync per call; skipped while tracing so the compiled graph stays whole.
    if edge_index.numel() and not torch.compiler.is_compiling():
        lo, hi = edge_index.aminmax()
        if bool((lo < 0) | (hi >= num_nodes)):
            raise ValueError(f"edge_index: expected node indices in [0, {num_nodes}) (N = {num_nodes}), "
                             f"got values in [{int(lo)}, {int(hi)}] in shape {tuple(edge_index.shape)}")


def add_self_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """PyG's loop policy: drop every existing ``(i, i)`` edge, then append exactly one per node.

    The remaining edges keep their order; the loops come last, ``(0, 0), (1, 1), ...``.
    Dropping first means a node never weighs itself twice (PyG issue #138).

    Shapes:
        - edge_index: ``(2, E)`` int64
        - output: ``(2, E - (number of self loops) + num_nodes)``
    """
    _check_edge_index(edge_index, num_nodes)
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    kept = edge_index[:, edge_index[0] != edge_index[1]]
    return torch.cat([kept, torch.stack([loops, loops])], dim=1)


def segment_softmax(logits: torch.Tensor, index: torch.Tensor, num_segments: int, dim: int = 0) -> torch.Tensor:
    r"""Softmax over the entries of ``logits`` along ``dim`` that share the same ``index``.

    .. math::
        \alpha_k = \frac{\exp(e_k - m_{s})}{\sum_{l:\, \mathrm{index}_l = s} \exp(e_l - m_{s}) + 10^{-16}},
        \qquad s = \mathrm{index}_k,\ m_s = \max_{l:\, \mathrm{index}_l = s} e_l

    (PyG's ``utils.softmax``). The per-segment max is subtracted (stable for any logit size) and
    detached; the sums run in at least float32 and the result is cast back to ``logits.dtype``.
    ``-inf`` logits get weight 0; a segment whose logits are all ``-inf`` gives zeros, not NaN.

    Args:
        logits: scores, any shape.
        index: segment of each entry along ``dim``, int64 in ``[0, num_segments)``.
        num_segments: number of segments ``S``.
        dim: the dimension the segments run along.

    Shapes:
        - logits: ``(..., E, ...)`` with ``E`` at ``dim``
        - index: ``(E,)``
        - output: same as ``logits``
    """
    dim = dim % logits.dim()
    if index.dim() != 1 or index.shape[0] != logits.shape[dim]:
        raise ValueError(f"index: expected shape ({logits.shape[dim]},) (logits.shape[{dim}]), "
                         f"got {tuple(index.shape)}")
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    view = [1] * work.dim()
    view[dim] = -1
    shape = list(work.shape)
    shape[dim] = num_segments
    peak = work.new_zeros(shape).scatter_reduce(dim, index.view(view).expand_as(work), work.detach(), "amax",
                                                include_self=False)
    # An all -inf segment has peak -inf; clamping keeps exp(-inf - peak) at 0 instead of NaN.
    peak = peak.clamp_min(torch.finfo(work.dtype).min)
    ex = (work - peak.index_select(dim, index)).exp()
    denom = work.new_zeros(shape).index_add(dim, index, ex)
    return (ex / (denom.index_select(dim, index) + 1e-16)).to(logits.dtype)


def _glorot_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
    # PyG's glorot: fans are the last two dims, so att (1, H, C) gets bound sqrt(6 / (H + C)).
    bound = math.sqrt(6.0 / (tensor.size(-2) + tensor.size(-1)))
    nn.init.uniform_(tensor, -bound, bound, generator=generator)


class GraphAttention(nn.Module):
    r"""Multi-head graph attention layer (GATConv) on node features sharing one graph.

    .. math::
        h_i = W x_i, \quad
        e_{ij} = \mathrm{LeakyReLU}\big(a_{src}^\top h_j + a_{dst}^\top h_i\big), \quad
        \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}(e_{ij}), \quad
        y_i = \big\Vert_{h} \textstyle\sum_{j \in \mathcal{N}(i)} \alpha^h_{ij} h^h_j + b

    per head ``h`` (concatenated, or averaged with ``concat=False``), where :math:`\mathcal{N}(i)`
    are the sources of the edges into ``i``. With ``add_self_loops`` existing self loops are
    dropped and one ``(i, i)`` per node is added (PyG's policy). Duplicate edges are kept and each
    counts in the softmax. A node with no incoming edge outputs ``b`` (0 without bias), never NaN.

    Same parameters, initialisation (glorot, zero bias) and numerics as PyG's ``GATConv`` with an
    integer ``in_channels``, so its ``lin.weight``, ``att_src``, ``att_dst`` and ``bias`` load
    directly. Logits, softmax and aggregation run in at least float32 (also under autocast) and the
    output is cast back to the dtype of ``lin``'s output. The batch is an extra dimension of every
    per-edge tensor (``(E', B, H)`` logits): no loop over it, no data-dependent shapes, so the
    layer compiles with ``fullgraph=True`` (``return_attention`` alone drops the masked loops).

    Args:
        in_dim: node feature size ``C_in``.
        out_dim: size per head ``C``.
        heads: number of attention heads ``H``.
        concat: concatenate the heads (output ``H * C``) or average them (output ``C``).
        negative_slope: LeakyReLU slope of the attention logits.
        add_self_loops: replace existing self loops by exactly one per node.
        dropout: dropout probability on the attention weights ``alpha`` (training only).
        bias: learn an additive output bias.

    Shapes:
        - x: ``(B, N, C_in)`` or ``(N, C_in)``
        - edge_index: ``(2, E)`` int64, ``edge_index[0]`` = source, ``edge_index[1]`` = target
        - output: ``(B, N, H * C)`` (``concat``) or ``(B, N, C)``; no ``B`` for an unbatched ``x``
        - with ``return_attention``: :class:`GraphAttentionOutput` with ``alpha`` of shape
          ``(B, E', H)`` (or ``(E', H)``) and ``edge_index_used`` ``(2, E')``
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int = 1, concat: bool = True, negative_slope: float = 0.2,
                 add_self_loops: bool = True, dropout: float = 0.0, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1 or heads < 1:
            raise ValueError(f"in_dim, out_dim, heads: expected positive sizes, got {in_dim}, {out_dim}, {heads}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_dim, self.out_dim, self.heads, self.concat = in_dim, out_dim, heads, concat
        self.negative_slope, self.add_self_loops, self.dropout = negative_slope, add_self_loops, dropout
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False, **factory)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_dim, **factory))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(heads * out_dim if concat else out_dim, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _check(self, edge_index: torch.Tensor, n: int, device: torch.device) -> None:
        # The range check syncs with the host; a graph shared by every call (the usual case) is
        # checked once and again only after it is modified in place (its version changes) or
        # replaced. The weak reference never keeps a freed edge_index alive or mistakes another
        # tensor at the same address for it.
        seen = self.__dict__.get("_checked")
        if (not torch.compiler.is_compiling() and isinstance(edge_index, torch.Tensor) and seen is not None
                and seen[0]() is edge_index and seen[1:] == (edge_index._version, n, device)):
            return
        _check_edge_index(edge_index, n, device)
        if not torch.compiler.is_compiling():
            self.__dict__["_checked"] = (weakref.ref(edge_index), edge_index._version, n, device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_checked", None)  # a weak reference does not pickle (torch.save(module), deepcopy)
        return state

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _glorot_(self.lin.weight, generator)
        _glorot_(self.att_src, generator)
        _glorot_(self.att_dst, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, return_attention: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor | GraphAttentionOutput:
        """Aggregate every node's incoming messages over ``edge_index``.

        Args:
            x: ``(B, N, C_in)`` or ``(N, C_in)`` node features.
            edge_index: ``(2, E)`` int64, row 0 = source, row 1 = target, shared by the batch.
            return_attention: also return the attention weights and the edges they belong to.
            generator: drives the attention dropout only (training with ``dropout > 0``).

        Returns:
            ``(B, N, H * C)`` (``concat``) or ``(B, N, C)``, no ``B`` for an unbatched ``x``; with
            ``return_attention`` a :class:`GraphAttentionOutput` ``(out, edge_index_used (2, E'),
            alpha (B, E', H))``.
        """
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected (B, N, {self.in_dim}) or (N, {self.in_dim}), got {tuple(x.shape)}")
        n = x.shape[-2]
        self._check(edge_index, n, x.device)
        # Node-major layout (N, B, ...): the per-edge gathers and scatters are index_select /
        # index_add on dim 0, moving contiguous rows of B * H * C values.
        xn = x.unsqueeze(1) if x.dim() == 2 else x.transpose(0, 1)
        h = self.lin(xn).unflatten(-1, (self.heads, self.out_dim))  # (N, B, H, C)
        cdt = torch.promote_types(h.dtype, torch.float32)
        hf = h.to(cdt)
        a_src = (hf * self.att_src.to(cdt)).sum(-1)  # (N, B, H)
        a_dst = (hf * self.att_dst.to(cdt)).sum(-1)
        src, dst = edge_index[0], edge_index[1]
        keep = None
        if self.add_self_loops:
            # Existing loops stay in place but get logit -inf (weight exactly 0): same result as
            # PyG's remove-then-add, without a data-dependent edge count in the hot path.
            loops = torch.arange(n, device=edge_index.device, dtype=edge_index.dtype)
            keep = torch.cat([src != dst, torch.ones_like(loops, dtype=torch.bool)])
            src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
        logits = F.leaky_relu(a_src.index_select(0, src) + a_dst.index_select(0, dst), self.negative_slope)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, None], float("-inf"))
        alpha = segment_softmax(logits, dst, n, dim=0)  # (E', B, H)
        if self.training and self.dropout > 0.0:
            mask = torch.empty_like(alpha).bernoulli_(1.0 - self.dropout, generator=generator)
            alpha = alpha * mask / (1.0 - self.dropout) if self.dropout < 1.0 else alpha * mask
        out = hf.new_zeros(hf.shape).index_add_(0, dst, hf.index_select(0, src) * alpha[..., None])
        out = out.flatten(-2) if self.concat else out.mean(dim=-2)
        if self.bias is not None:
            out = out + self.bias.to(cdt)
        out = out.to(h.dtype)
        out = out.squeeze(1) if x.dim() == 2 else out.transpose(0, 1).contiguous()
        if not return_attention:
            return out
        alpha = alpha.squeeze(1) if x.dim() == 2 else alpha.transpose(0, 1)
        used = torch.stack([src, dst])
        if keep is not None:
            used, alpha = used[:, keep], alpha[..., keep, :]
        return GraphAttentionOutput(out, used, alpha)

    def extra_repr(self) -> str:
        return (f"{self.in_dim}, {self.out_dim}, heads={self.heads}, concat={self.concat}, "
                f"add_self_loops={self.add_self_loops}, dropout={self.dropout}, bias={self.bias is not None}")
