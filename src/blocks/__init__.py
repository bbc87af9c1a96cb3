"""Layers and tensor ops used inside models. Every name is re-exported flat here."""

from .attention import Attention, BottleneckAttention, CrossAttention, masked_attention
from .drop import DropPath, drop_path
from .film import FiLM
from .fno import FNOBlock, StableFNOBlock, count_parameters
from .heads import MLP, ConvHead
from .norm import GRN, LayerNorm2d, LayerScale, group_norm
from .posenc import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    coord_channels,
    sincos_2d,
    timestep_embedding,
)
from .resblock import ResBlock
from .spectral import SpectralConv2d
from .transformer import TransformerBlock
from .unet import DecoderLevel, EncoderLevel, UNet
from .uno import HybridUNO

__all__ = [
    "GRN",
    "MLP",
    "Attention",
    "BottleneckAttention",
    "ConvHead",
    "CrossAttention",
    "DecoderLevel",
    "DropPath",
    "EncoderLevel",
    "FNOBlock",
    "FiLM",
    "HybridUNO",
    "LayerNorm2d",
    "LayerScale",
    "LearnedPositionalEmbedding",
    "ResBlock",
    "RotaryEmbedding",
    "SpectralConv2d",
    "StableFNOBlock",
    "TransformerBlock",
    "UNet",
    "coord_channels",
    "count_parameters",
    "drop_path",
    "group_norm",
    "masked_attention",
    "sincos_2d",
    "timestep_embedding",
]
