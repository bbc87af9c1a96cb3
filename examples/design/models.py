"""Design decomposition models: the U-Net encoder (image -> F) and the ResNet-18 abstractor (F -> metadata).

Two forms of the structure map F travel between the stages:

- **hard F** ``(B, 4, H, W)`` (``render.Rendering.structure``): text mask, image mask, colour
  class id (``0 .. NUM_COLORS - 1``, 0 = background), hierarchy in [0, 1];
- **soft F** ``(B, SOFT_CHANNELS, H, W)``: text probability, image probability, the
  ``NUM_COLORS`` colour-class probabilities, hierarchy. Channel order: ``0`` text, ``1`` image,
  ``2 .. 2 + NUM_COLORS - 1`` colour, last hierarchy. :func:`one_hot_structure` turns a hard F
  into the soft form (one-hot colour), :func:`hard_structure` the other way (0.5 thresholds,
  arg-max colour).

:class:`DesignEncoder` returns a soft F differentiably (:meth:`DesignEncoder.soft_structure`)
and :class:`DesignAbstractor` accepts either form, so a reward can back-propagate from the
abstractor's outputs through the encoder to an image. :func:`load_encoder` and
:func:`load_abstractor` rebuild a trained model from a finished stage's run folder
(``examples/design_encoder.py`` / ``design_abstractor.py`` ``--out``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import MLP, ConvHead, UNet, resnet18
from blockyard.train import CheckpointManager

from .vocab import FORMATS, GOALS, GRAMMAR_NAMES, NUM_COLORS

__all__ = ["MODEL_FILE", "SOFT_CHANNELS", "AbstractorOutput", "DesignAbstractor", "DesignEncoder", "EncoderOutput",
           "hard_structure", "load_abstractor", "load_encoder", "one_hot_structure"]

SOFT_CHANNELS = 3 + NUM_COLORS
#: In a stage's run folder: which model it trained and its constructor keywords.
MODEL_FILE = "model.json"


def _check_map(name: str, x: torch.Tensor, channels: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        want = " or ".join(f"(B, {c}, H, W)" for c in channels)
        raise ValueError(f"{name}: expected {want}, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _color_ids(structure: torch.Tensor) -> torch.Tensor:
    """The colour channel of a hard F as int64 ids; ValueError if it holds anything else."""
    color = structure[:, 2]
    ids = color.round().long()
    if color.numel() and (not torch.equal(ids.to(color.dtype), color) or ids.min() < 0 or ids.max() >= NUM_COLORS):
        raise ValueError(f"structure: expected colour ids (channel 2) as integers in 0..{NUM_COLORS - 1}, got values "
                         f"in [{float(color.min())}, {float(color.max())}]")
    return ids


def one_hot_structure(structure: torch.Tensor) -> torch.Tensor:
    """Hard F ``(B, 4, H, W)`` -> soft F ``(B, SOFT_CHANNELS, H, W)`` with one-hot colour (see the module docstring)."""
    _check_map("structure", structure, (4,))
    onehot = F.one_hot(_color_ids(structure), NUM_COLORS).permute(0, 3, 1, 2).to(structure.dtype)
    return torch.cat([structure[:, :2], onehot, structure[:, 3:]], dim=1)


def hard_structure(soft: torch.Tensor) -> torch.Tensor:
    """Soft F ``(B, SOFT_CHANNELS, H, W)`` -> hard F ``(B, 4, H, W)``: masks ``> 0.5``, arg-max colour."""
    _check_map("soft", soft, (SOFT_CHANNELS,))
    color = soft[:, 2:2 + NUM_COLORS].argmax(dim=1, keepdim=True).to(soft.dtype)
    return torch.cat([(soft[:, :2] > 0.5).to(soft.dtype), color, soft[:, -1:]], dim=1)


class EncoderOutput(NamedTuple):
    """The encoder's four heads.

    Shapes:
        - text, image: ``(B, 1, H, W)`` mask logits (sigmoid > 0.5 = the pixel belongs)
        - color: ``(B, NUM_COLORS, H, W)`` colour-class logits
        - hierarchy: ``(B, 1, H, W)`` hierarchy value in (0, 1) (a sigmoid)
    """

    text: torch.Tensor
    image: torch.Tensor
    color: torch.Tensor
    hierarchy: torch.Tensor


class DesignEncoder(nn.Module):
    """Image -> structure map F: a :class:`~blockyard.blocks.UNet` trunk and four :class:`~blockyard.blocks.ConvHead` s.

    The seed's Module 5 (a U-Net with 1x1 heads for text, image, colour and hierarchy). The image
    in [0, 1] is centred to [-1, 1] inside; the trunk's last decoder map (``widths[0]``
    channels, full resolution) feeds every head.

    Args:
        widths: U-Net channels per level, finest first (the seed: 64, 128, 256, 512, 1024).
        blocks_per_level: residual blocks per U-Net level.
        head_depth: conv layers per head (1: the seed's 1x1 conv).

    Shapes:
        - image: ``(B, 3, H, W)`` float RGB in [0, 1]
        - output: :class:`EncoderOutput`
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = (16, 32, 64), blocks_per_level: int = 1,
                 head_depth: int = 1) -> None:
        super().__init__()
        self.unet = UNet(3, None, widths=tuple(widths), blocks_per_level=blocks_per_level)
        width = self.unet.widths[0]
        self.text_head = ConvHead(width, 1, depth=head_depth)
        self.image_head = ConvHead(width, 1, depth=head_depth)
        self.color_head = ConvHead(width, NUM_COLORS, depth=head_depth)
        self.hierarchy_head = ConvHead(width, 1, depth=head_depth)

    def forward(self, image: torch.Tensor) -> EncoderOutput:
        _check_map("image", image, (3,))
        h = self.unet(image * 2.0 - 1.0)
        return EncoderOutput(self.text_head(h), self.image_head(h), self.color_head(h),
                             torch.sigmoid(self.hierarchy_head(h)))

    def soft_structure(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable soft F ``(B, SOFT_CHANNELS, H, W)``: sigmoid masks, softmax colour, hierarchy."""
        out = self(image)
        return torch.cat([torch.sigmoid(out.text.float()), torch.sigmoid(out.image.float()),
                          torch.softmax(out.color.float(), dim=1), out.hierarchy.float()], dim=1)

    def structure(self, image: torch.Tensor) -> torch.Tensor:
        """Hard F ``(B, 4, H, W)``: ``hard_structure(soft_structure(image))``."""
        return hard_structure(self.soft_structure(image))


class AbstractorOutput(NamedTuple):
    """The abstractor's heads; tone and grammar in their natural units.

    Shapes:
        - goal: ``(B, len(GOALS))`` logits; format: ``(B, len(FORMATS))`` logits
        - tone: ``(B,)``; grammar: ``(B, 4)`` in the order of ``vocab.GRAMMAR_NAMES``
    """

    goal: torch.Tensor
    format: torch.Tensor
    tone: torch.Tensor
    grammar: torch.Tensor


class DesignAbstractor(nn.Module):
    """F -> goal, format, tone and grammar scores: :func:`~blockyard.blocks.resnet18` on an embedded F.

    The seed's Module 6 with its bugs fixed: 10 goals and 4 formats, and the colour channel
    embedded (``nn.Embedding(NUM_COLORS, color_dim)``) instead of read as a raw 0..18 float. The
    ResNet sees ``3 + color_dim`` channels: text, image, hierarchy and the colour embedding. A
    soft F's colour probabilities ``p`` enter as ``sum_k p_k e_k`` (the embedding matrix applied to
    ``p``), which equals the lookup on a one-hot ``p``, so one model serves ground-truth F,
    the encoder's hard F and its differentiable soft F.

    Tone and grammar heads predict standardised values; the output is ``mean + std * z`` with
    the training split's statistics (buffers, set by :meth:`set_target_stats`), so a loss on
    ``(output - target) / std`` weighs every dimension alike.

    Args:
        color_dim: colour embedding size.
        hidden: hidden width of each head's MLP (the grammar head: ``hidden, hidden // 2``).
        dropout: after the shared layer and each head's hidden layers (the seed: 0.3 and 0.2).

    Shapes:
        - structure: hard ``(B, 4, H, W)`` or soft ``(B, SOFT_CHANNELS, H, W)``
        - output: :class:`AbstractorOutput`
    """

    def __init__(self, color_dim: int = 8, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.color_embed = nn.Embedding(NUM_COLORS, color_dim)
        self.backbone = resnet18(in_channels=3 + color_dim)
        self.shared = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Dropout(dropout))
        self.goal_head = MLP(512, hidden, len(GOALS), dropout=dropout)
        self.format_head = MLP(512, hidden, len(FORMATS), dropout=dropout)
        self.tone_head = MLP(512, hidden, 1, dropout=dropout)
        self.grammar_head = MLP(512, (hidden, hidden // 2), len(GRAMMAR_NAMES), dropout=dropout)
        for name, size in (("tone", 1), ("grammar", len(GRAMMAR_NAMES))):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_std", torch.ones(size))

    @torch.no_grad()
    def set_target_stats(self, tone: torch.Tensor, grammar: torch.Tensor) -> None:
        """Standardise the tone and grammar heads by the mean and std of training targets ``(N,)``, ``(N, 4)``."""
        for name, values in (("tone", tone.reshape(-1, 1)), ("grammar", grammar)):
            getattr(self, f"{name}_mean").copy_(values.float().mean(0))
            getattr(self, f"{name}_std").copy_(values.float().std(0).clamp_min(1e-6))

    def embed(self, structure: torch.Tensor) -> torch.Tensor:
        """The ResNet's input ``(B, 3 + color_dim, H, W)`` from a hard or soft F."""
        _check_map("structure", structure, (4, SOFT_CHANNELS))
        weight = self.color_embed.weight
        if structure.shape[1] == 4:
            color = self.color_embed(_color_ids(structure)).permute(0, 3, 1, 2)
            hierarchy = structure[:, 3:]
        else:
            color = torch.einsum("bkhw,ke->behw", structure[:, 2:2 + NUM_COLORS].to(weight.dtype), weight)
            hierarchy = structure[:, -1:]
        return torch.cat([structure[:, :2].to(weight.dtype), hierarchy.to(weight.dtype), color], dim=1)

    def forward(self, structure: torch.Tensor) -> AbstractorOutput:
        h = self.shared(self.backbone(self.embed(structure)))
        tone = self.tone_mean + self.tone_std * self.tone_head(h).float()
        grammar = self.grammar_mean + self.grammar_std * self.grammar_head(h).float()
        return AbstractorOutput(self.goal_head(h), self.format_head(h), tone[:, 0], grammar)


_KINDS = {"design-encoder": DesignEncoder, "design-abstractor": DesignAbstractor}


def _load(run_dir: str | os.PathLike, kind: str, device: torch.device | str | None) -> nn.Module:
    run_dir = Path(run_dir)
    spec_file, run_file = run_dir / MODEL_FILE, run_dir / "run.json"
    if not spec_file.is_file() or not run_file.is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} is not a run folder of a design stage (no {MODEL_FILE} or "
                                f"run.json); expected the --out of a finished {kind} stage")
    spec = json.loads(spec_file.read_text())
    if spec.get("kind") != kind:
        raise ValueError(f"run_dir: {run_dir} holds a {spec.get('kind')!r}, expected a {kind!r}")
    status = json.loads(run_file.read_text()).get("status")
    if status != "finished":
        raise ValueError(f"run_dir: the {kind} run in {run_dir} is {status!r}, not finished; finish it first "
                         "(rerun its stage with --resume auto)")
    model = _KINDS[kind](**spec["kwargs"])
    loaded = CheckpointManager(run_dir / "checkpoints", rng=False, is_main=False).load_best({"model": model})
    if loaded is None:
        raise FileNotFoundError(f"run_dir: no intact checkpoint with a metric in {run_dir / 'checkpoints'}")
    return model.to(device).eval()


def load_encoder(run_dir: str | os.PathLike, device: torch.device | str | None = None) -> DesignEncoder:
    """The trained :class:`DesignEncoder` (best validation checkpoint) of a finished encoder run, in eval mode.

    Args:
        run_dir: the ``--out`` of ``examples/design_encoder.py``.
        device: where to put it (default: the CPU).

    Raises ``FileNotFoundError`` or ``ValueError`` naming ``run_dir`` when it is not a finished
    encoder run. The parameters keep ``requires_grad``: call ``requires_grad_(False)`` to freeze.
    """
    return _load(run_dir, "design-encoder", device)


def load_abstractor(run_dir: str | os.PathLike, device: torch.device | str | None = None) -> DesignAbstractor:
    """The trained :class:`DesignAbstractor` of a finished abstractor run (``examples/design_abstractor.py --out``).

    As :func:`load_encoder`.
    """
    return _load(run_dir, "design-abstractor", device)
