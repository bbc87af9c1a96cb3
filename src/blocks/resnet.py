"""Residual CNNs: the BasicBlock, a ResNet on small matrices with side parameters, and ResNet-18.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. https://arxiv.org/abs/1512.03385
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .heads import SideHead, _place

__all__ = ["BasicBlock", "ResNet2d", "ResNetFeatures", "resnet18"]


def _init_resnet(module: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation: He-normal (fan_out) convs, unit/zero norm affine."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, BasicBlock) and getattr(m.bn2, "weight", None) is not None:
                nn.init.zeros_(m.bn2.weight)


class BasicBlock(nn.Module):
    r"""ResNet basic block (two 3x3 convs), post-activation, torchvision's layout and names.

    .. math::
        y = \mathrm{ReLU}\big(s(x) + \mathrm{BN}_2(W_2 * \mathrm{ReLU}(\mathrm{BN}_1(W_1 *_{\text{stride}} x)))\big)

    :math:`s` is the identity, or ``downsample`` = 1x1 conv (with the stride) + norm when the
    stride is not 1 or the channel count changes. Convs carry no bias (a norm follows each).
    Parameter names (``conv1, bn1, conv2, bn2, downsample.0, downsample.1``) match torchvision's
    ``BasicBlock``, so its weights load. Zeroing ``bn2.weight`` (``zero_init_residual``) makes the
    block ``ReLU(s(x))``, i.e. the identity on the non-negative inputs a ReLU network feeds it.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        stride: stride of the first conv and of the shortcut.
        act_layer: activation constructor.
        norm_layer: called as ``norm_layer(channels)``; ``nn.BatchNorm2d`` by default.

    Shapes:
        - x: ``(B, C_in, H, W)``
        - output: ``(B, C_out, ceil(H / stride), ceil(W / stride))``
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 act_layer: Callable[[], nn.Module] = nn.ReLU,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = _place(norm_layer(out_channels), device, dtype)
        self.relu = act_layer()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, **dd)
        self.bn2 = _place(norm_layer(out_channels), device, dtype)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, **dd),
                _place(norm_layer(out_channels), device, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two convolutions and add the shortcut.

        Args:
            x: ``(B, C_in, H, W)``.

        Returns:
            ``(B, C_out, ceil(H / stride), ceil(W / stride))``, after the final ReLU.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(h + skip)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"


class ResNet2d(nn.Module):
    r"""Residual CNN for small matrices of any size, with side parameters joined before the head.

    System A's ``ResNet2DWithParams`` (seed research A5) made size-agnostic:

    .. math::
        f &= \mathrm{flatten}(\mathrm{Pool}_{p}(\mathrm{Blocks}^{n}(\mathrm{ReLU}(\mathrm{BN}(W_0 * x))))) \\
        s &= \mathrm{ReLU}(W_s\, \mathrm{side} + b_s) \\
        y &= \mathrm{MLP}([f, s])

    stem 3x3 conv (stride 1) + BN + ReLU, ``num_blocks`` stride-1 :class:`BasicBlock` s of
    width ``C``, adaptive average pooling to ``pool_size`` (default 1 = global average pooling,
    so any ``H, W >= 1`` works), then a :class:`SideHead`: the side projection (``side_hidden``
    wide, 64 in the seed) concatenated and the head ``Linear -> ReLU -> [Dropout] -> Linear``
    (hidden 256 in the seed).
    The seed flattens the whole 6x6 map instead of pooling: ``pool_size=6`` on 6x6 inputs
    reproduces that exactly (adaptive pooling to the input's own size is the identity), and on
    other sizes still works (smaller maps are repeated, larger ones averaged into 6x6 cells).
    Unlike the seed, the convs have no bias (a BN follows each; torchvision does the same).
    With BatchNorm in training mode a batch needs more than one value per channel.

    Args:
        in_channels: input channels (1 for a code matrix).
        base_channels: width ``C`` of the stem and of every block.
        num_blocks: number of residual blocks (System A's best: 64 channels, 5 blocks).
        side_dim: size of the side-parameter vector (e.g. 3 for ``(n, k, m)``); 0 = none.
        out_dim: output features.
        side_hidden: width of the side projection.
        head_hidden: hidden widths of the head MLP.
        dropout: dropout after each hidden activation of the head (0 = none, the seed's best).
        pool_size: output size of the adaptive average pool (int or ``(h, w)``).
        act_layer: activation everywhere (blocks, side projection, head).
        norm_layer: block/stem norm, called as ``norm_layer(C)``.
        zero_init_residual: zero each block's last norm gamma (off by default, as in the seed).

    Shapes:
        - x: ``(B, in_channels, H, W)``, any ``H, W >= 1``
        - side: ``(B, side_dim)``, required iff ``side_dim > 0``
        - output: ``(B, out_dim)``
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, num_blocks: int = 5, side_dim: int = 0,
                 out_dim: int = 1, side_hidden: int = 64, head_hidden: int | Sequence[int] = (256,),
                 dropout: float = 0.0, pool_size: int | tuple[int, int] = 1,
                 act_layer: Callable[[], nn.Module] = nn.ReLU,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, zero_init_residual: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if num_blocks < 0 or side_dim < 0:
            raise ValueError(f"num_blocks, side_dim: expected >= 0, got {num_blocks}, {side_dim}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.side_dim = side_dim
        self.zero_init_residual = zero_init_residual
        self.pool_size = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        c = base_channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False, **dd),
                                  _place(norm_layer(c), device, dtype), act_layer())
        self.blocks = nn.Sequential(*[BasicBlock(c, c, act_layer=act_layer, norm_layer=norm_layer, **dd)
                                      for _ in range(num_blocks)])
        self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
        features = c * self.pool_size[0] * self.pool_size[1]
        self.head = SideHead(features, side_dim=side_dim, out_dim=out_dim, side_hidden=side_hidden,
                             hidden=head_hidden, dropout=dropout, act_layer=act_layer, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_resnet(self, self.zero_init_residual)

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``out_dim`` values per matrix from its pooled features and side parameters.

        Args:
            x: ``(B, in_channels, H, W)``, any ``H, W >= 1``.
            side: ``(B, side_dim)``, required iff ``side_dim > 0`` (else None).

        Returns:
            ``(B, out_dim)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x: expected (B, {self.in_channels}, H >= 1, W >= 1), got {tuple(x.shape)}")
        self.head.check_side(side, x.shape[0])
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1), side)

    def extra_repr(self) -> str:
        return f"side_dim={self.side_dim}, pool_size={self.pool_size}"


class ResNetFeatures(nn.Module):
    r"""ResNet with :class:`BasicBlock` stages, torchvision's layout and parameter names.

    ``conv1`` 7x7 stride 2 -> ``bn1`` -> ``relu`` -> ``maxpool`` 3x3 stride 2 -> ``layer1..4``
    (widths 64, 128, 256, 512; the first block of stages 2-4 has stride 2) -> ``avgpool``
    (global) -> flatten -> ``fc``. Use :func:`resnet18` to build ResNet-18.

    Args:
        layers: number of blocks per stage (``(2, 2, 2, 2)`` = ResNet-18).
        in_channels: input channels.
        num_features: output size; 512 makes ``fc`` the identity (no parameters), any other
            value makes it ``nn.Linear(512, num_features)`` (1000 = torchvision's classifier).
        zero_init_residual: zero every block's ``bn2.weight`` (torchvision's option).
        norm_layer: called as ``norm_layer(channels)``.

    Shapes:
        - x: ``(B, in_channels, H, W)``; the stem divides H and W by 4, so any ``H, W >= 1`` works
        - output: ``(B, num_features)``
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3, num_features: int = 512,
                 zero_init_residual: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers: expected 4 stage depths >= 1, got {tuple(layers)}")
        if in_channels < 1 or num_features < 1:
            raise ValueError(f"in_channels, num_features: expected >= 1, got {in_channels}, {num_features}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.num_features = num_features
        self.zero_init_residual = zero_init_residual
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = _place(norm_layer(64), device, dtype)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        width = 64
        for i, (n, out) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(width, out, stride, norm_layer=norm_layer, **dd)]
            blocks += [BasicBlock(out, out, norm_layer=norm_layer, **dd) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            width = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity() if num_features == 512 else nn.Linear(512, num_features, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_resnet(self, self.zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Extract globally pooled features (then ``fc``).

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            ``(B, num_features)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_features={self.num_features}"


def resnet18(in_channels: int = 3, num_features: int = 512, zero_init_residual: bool = False,
             norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> ResNetFeatures:
    """ResNet-18 feature extractor in pure torch, with torchvision's parameter names.

    Global-average-pooled 512-d features (11,176,512 parameters at ``in_channels=3``, i.e.
    torchvision's 11,689,512 minus its 513,000-parameter ``fc``). A torchvision ``resnet18``
    state_dict loads strictly after dropping its ``fc.*`` keys, or as it is with
    ``num_features=1000`` (then ``fc`` is the ImageNet classifier). For a 4-channel input with
    RGB weights (seed research B5), copy ``conv1.weight`` into channels 0-2 and its channel
    mean into channel 3.

    Args:
        in_channels: input channels of ``conv1``.
        num_features: output size (see :class:`ResNetFeatures`).
        zero_init_residual: zero every block's last BN gamma (off, like torchvision).
        norm_layer: called as ``norm_layer(channels)``.

    Shapes:
        - x: ``(B, in_channels, H, W)``
        - output: ``(B, num_features)``
    """
    return ResNetFeatures((2, 2, 2, 2), in_channels=in_channels, num_features=num_features,
                          zero_init_residual=zero_init_residual, norm_layer=norm_layer, device=device, dtype=dtype)
