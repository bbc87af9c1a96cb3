"""Rows of ``benchmarks/peers.py`` for single layers and losses: ours and the peer, weights shared, numerics checked."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from blockyard.blocks import GRN, Attention, ConvNeXtV2Block, GraphAttention, LayerNorm2d, SpectralConv2d
from blockyard.losses import dice_loss, ssim


class Skip(Exception):
    """A peer cannot be imported here; the message says why."""


class Case(NamedTuple):
    name: str  # our block and the shapes
    peer_name: str
    ours: Callable[[], object]  # one timed call
    peer: Callable[[], object]
    numerics: str  # what was checked before timing


def peer_import(module: str, what: str = ""):
    """Import a peer module or raise :class:`Skip` naming it (after torchvision's op stubs, see below)."""
    _torchvision_op_stubs()
    try:
        mod = __import__(module, fromlist=[what] if what else [])
    except Exception as err:  # ImportError, or a peer that fails while importing its own dependencies
        raise Skip(f"{module} not importable ({type(err).__name__}: {err}); see the set-up in peers.py") from err
    return getattr(mod, what) if what else mod


def _torchvision_op_stubs() -> None:
    """PyPI's torchvision wheels are CUDA builds whose C ops do not load on a CPU-only torch, and
    torchvision then fails at import registering fake kernels for ``nms``/``qnms``. timm (for
    ``FrozenBatchNorm2d``) and diffusers (when it finds torchvision installed) import it; defining
    the two op schemas (never called here) lets the import finish."""
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_op_stubs.lib = lib  # keep the registration alive
    except RuntimeError:  # already defined by a working torchvision
        pass


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
            grad: torch.Tensor | None = None) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One call = the forward and the gradients of ``inputs`` (no accumulation into ``.grad``)."""
    def run() -> tuple[torch.Tensor, ...]:
        out = fn()
        return (out.detach(), *torch.autograd.grad(out, inputs, grad))
    return run


def check_same(ours: Callable[[], tuple], peer: Callable[[], tuple], rtol: float = 1e-5, atol: float = 1e-5,
               peer_map: Callable[[tuple], tuple] | None = None) -> str:
    """Assert that the forward outputs and every gradient agree; return a short description."""
    a, b = ours(), peer()
    if peer_map is not None:
        b = peer_map(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, i=i: f"output {i}: {m}")
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return f"output + {len(a) - 1} grads equal (max diff {worst:.1e})"


def _randomise(*params: torch.Tensor) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.5)


def case_grn() -> Case:
    GlobalResponseNorm = peer_import("timm.layers.grn", "GlobalResponseNorm")
    c = 96
    x = torch.randn(16, 32, 32, c, requires_grad=True)
    g = torch.randn_like(x)
    ours = GRN(c, channels_last=True)
    _randomise(ours.gamma, ours.beta)
    peer = GlobalResponseNorm(c, eps=1e-6, channels_last=True)
    peer.load_state_dict({"weight": ours.gamma.detach(), "bias": ours.beta.detach()})
    o = fwd_bwd(lambda: ours(x), [x, ours.gamma, ours.beta], g)
    p = fwd_bwd(lambda: peer(x), [x, peer.weight, peer.bias], g)
    return Case("GRN channels-last (B16 32x32 C96)", "timm GlobalResponseNorm", o, p,
                check_same(o, p, rtol=1e-4, atol=1e-4))


def case_layernorm2d() -> Case:
    TimmLN = peer_import("timm.layers", "LayerNorm2d")
    c = 96
    x = torch.randn(16, c, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    ours = LayerNorm2d(c)
    _randomise(ours.weight, ours.bias)
    peer = TimmLN(c)
    peer.load_state_dict(ours.state_dict())
    o = fwd_bwd(lambda: ours(x), [x, ours.weight, ours.bias], g)
    p = fwd_bwd(lambda: peer(x), [x, peer.weight, peer.bias], g)
    return Case("LayerNorm2d (B16 C96 32x32)", "timm LayerNorm2d", o, p, check_same(o, p, rtol=1e-4, atol=1e-4))


def case_attention() -> Case:
    TimmAttention = peer_import("timm.layers", "Attention")
    dim, heads = 128, 8
    x = torch.randn(16, 256, dim, requires_grad=True)
    g = torch.randn_like(x)
    ours = Attention(dim, heads=heads)
    peer = TimmAttention(dim, num_heads=heads, qkv_bias=False)
    peer.load_state_dict(ours.state_dict(), strict=False)
    params_o = [ours.qkv.weight, ours.proj.weight, ours.proj.bias]
    params_p = [peer.qkv.weight, peer.proj.weight, peer.proj.bias]
    o = fwd_bwd(lambda: ours(x), [x, *params_o], g)
    p = fwd_bwd(lambda: peer(x), [x, *params_p], g)
    return Case("Attention (B16 N256 C128 h8)", "timm Attention", o, p, check_same(o, p, rtol=1e-4, atol=1e-4))


def case_spectral() -> Case:
    SpectralConv = peer_import("neuralop.layers.spectral_convolution", "SpectralConv")
    c, m = 32, 12
    x = torch.randn(8, c, 64, 64, requires_grad=True)
    g = torch.randn_like(x)
    ours = SpectralConv2d(c, c, m)
    # neuraloperator counts modes over both signs (2m vertical; 2m - 1 horizontal keeps m rfft columns)
    # and stores the vertical axis fft-shifted: frequencies -m..m-1 against our 0..m-1, -m..-1.
    peer = SpectralConv(c, c, n_modes=(2 * m, 2 * m - 1), bias=False)
    w = torch.view_as_complex(ours.weight.detach())
    with torch.no_grad():
        peer.weight.tensor.copy_(torch.cat([w[:, :, m:], w[:, :, :m]], dim=2))
    o = fwd_bwd(lambda: ours(x), [x, ours.weight], g)
    p = fwd_bwd(lambda: peer(x), [x, peer.weight.tensor], g)

    def as_ours(out: tuple) -> tuple:  # the complex weight's gradient in our real, unshifted layout
        gw = torch.view_as_real(out[2])
        return out[0], out[1], torch.cat([gw[:, :, m:], gw[:, :, :m]], dim=2)

    return Case("SpectralConv2d (B8 C32 64x64 modes 12)", "neuraloperator SpectralConv", o, p,
                check_same(o, p, rtol=1e-4, atol=1e-4, peer_map=as_ours))


def case_graph() -> Case:
    GATConv = peer_import("torch_geometric.nn", "GATConv")
    n, e, cin, cout, heads = 600, 4000, 64, 16, 4
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(0, n, (e,), generator=gen)
    dst = (src + torch.randint(1, n, (e,), generator=gen)) % n  # no self loops: both layers add their own
    edge_index = torch.stack([src, dst])
    x = torch.randn(n, cin, requires_grad=True)
    g = torch.randn(n, heads * cout)
    ours = GraphAttention(cin, cout, heads=heads)
    _randomise(ours.bias)
    peer = GATConv(cin, cout, heads=heads)
    peer.load_state_dict(ours.state_dict())
    names = ["lin.weight", "att_src", "att_dst", "bias"]
    po, pp = dict(ours.named_parameters()), dict(peer.named_parameters())
    o = fwd_bwd(lambda: ours(x, edge_index), [x, *(po[k] for k in names)], g)
    p = fwd_bwd(lambda: peer(x, edge_index), [x, *(pp[k] for k in names)], g)
    return Case("GraphAttention (N600 E4000 64->4x16)", "PyG GATConv", o, p, check_same(o, p, rtol=1e-4, atol=1e-4))


def convnext_peer(ours: ConvNeXtV2Block):
    """timm's ConvNeXt-V2 block (``use_grn=True``, no layer scale) with our block's weights."""
    ConvNeXtBlock = peer_import("timm.models.convnext", "ConvNeXtBlock")
    peer = ConvNeXtBlock(ours.dim, use_grn=True, ls_init_value=None)
    rename = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2", "grn.gamma": "mlp.grn.weight",
              "grn.beta": "mlp.grn.bias"}
    state = {}
    for key, value in ours.state_dict().items():
        for a, b in rename.items():
            if key.startswith(a):
                key = b + key[len(a):]
                break
        state[key] = value
    peer.load_state_dict(state)
    return peer


def case_convnext() -> Case:
    c = 96
    ours = ConvNeXtV2Block(c, zero_init_last=False)
    _randomise(ours.grn.gamma, ours.grn.beta)
    peer = convnext_peer(ours)
    x = torch.randn(16, c, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    o = fwd_bwd(lambda: ours(x), [x, *ours.parameters()], g)
    p = fwd_bwd(lambda: peer(x), [x, *peer.parameters()], g)  # same parameter order (checked by the names)
    return Case("ConvNeXtV2Block (B16 C96 32x32)", "timm ConvNeXtBlock(use_grn=True)", o, p,
                check_same(o, p, rtol=1e-4, atol=1e-4))


def case_dice() -> Case:
    DiceLoss = peer_import("monai.losses", "DiceLoss")
    logits = torch.randn(16, 4, 64, 64, requires_grad=True)
    target = (torch.rand(16, 4, 64, 64) > 0.5).float()
    peer = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)  # = our eps=1.0 in numerator and denominator
    o = fwd_bwd(lambda: dice_loss(logits, target, eps=1.0), [logits])
    p = fwd_bwd(lambda: peer(logits, target), [logits])
    return Case("dice_loss (B16 C4 64x64)", "MONAI DiceLoss(sigmoid=True)", o, p,
                check_same(o, p, rtol=1e-5, atol=1e-6))


def case_ssim() -> Case:
    SSIMLoss = peer_import("monai.losses", "SSIMLoss")
    pred = torch.rand(16, 3, 64, 64, requires_grad=True)
    target = torch.rand(16, 3, 64, 64)
    peer = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5, k1=0.01, k2=0.03)
    o = fwd_bwd(lambda: 1 - ssim(pred, target, data_range=1.0), [pred])
    p = fwd_bwd(lambda: peer(pred, target), [pred])
    a, b = o(), p()
    # MONAI scales the (co)variances by n / (n - 1) with n = 121 window pixels (sample covariance);
    # ours is the paper's population covariance. The work is the same; the values differ slightly.
    diff = float((a[0] - b[0]).abs())
    if diff > 5e-3:
        raise AssertionError(f"ssim: ours and MONAI's SSIMLoss differ by {diff}, more than the covariance explains")
    return Case("ssim as a loss (B16 C3 64x64, window 11)", "MONAI SSIMLoss", o, p,
                f"values {diff:.1e} apart (MONAI's sample covariance)")


BLOCK_CASES: dict[str, Callable[[], Case]] = {
    "GRN": case_grn,
    "LayerNorm2d": case_layernorm2d,
    "Attention": case_attention,
    "SpectralConv2d": case_spectral,
    "GraphAttention": case_graph,
    "ConvNeXtV2Block": case_convnext,
    "dice_loss": case_dice,
    "ssim": case_ssim,
}
