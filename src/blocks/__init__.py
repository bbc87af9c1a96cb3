"""Layers and tensor ops used inside models. Every name is re-exported flat here."""

from .alibi import alibi_bias, alibi_slopes
from .attention import Attention, BottleneckAttention, CrossAttention, masked_attention
from .convnext import ConvNeXtV2Block
from .diffusion import DDPMScheduler, DDPMStepOutput
from .drop import DropPath, drop_path
from .film import FiLM
from .fno import FNOBlock, StableFNOBlock
from .gates import GateOutput, KeyGate, SoftGate, TopKGate
from .graph import GraphAttention, GraphAttentionOutput, add_self_loops, segment_softmax
from .group_norm import GroupNorm, group_norm
from .heads import MLP, ConvHead, SideHead
from .masking import Gathered, downsample_mask, gather_masked, random_mask, scatter_masked
from .moe import MixtureOfExperts, MoEOutput
from .norm import GRN, LayerNorm2d, LayerScale
from .params import count_parameters
from .posenc import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    coord_channels,
    sincos_2d,
    timestep_embedding,
)
from .resblock import ResBlock
from .resnet import BasicBlock, ResNet2d, ResNetFeatures, resnet18
from .router_losses import router_z_loss, switch_balance_loss
from .spectral import SpectralConv2d
from .transformer import TransformerBlock
from .unet import UNet
from .unet_levels import DecoderLevel, EncoderLevel
from .uno import HybridUNO
from .vit import ViT2d

__all__ = [
    "GRN",
    "MLP",
    "Attention",
    "BasicBlock",
    "BottleneckAttention",
    "ConvHead",
    "ConvNeXtV2Block",
    "CrossAttention",
    "DDPMScheduler",
    "DDPMStepOutput",
    "DecoderLevel",
    "DropPath",
    "EncoderLevel",
    "FNOBlock",
    "FiLM",
    "GateOutput",
    "Gathered",
    "GraphAttention",
    "GraphAttentionOutput",
    "GroupNorm",
    "HybridUNO",
    "KeyGate",
    "LayerNorm2d",
    "LayerScale",
    "LearnedPositionalEmbedding",
    "MixtureOfExperts",
    "MoEOutput",
    "ResBlock",
    "ResNet2d",
    "ResNetFeatures",
    "RotaryEmbedding",
    "SideHead",
    "SoftGate",
    "SpectralConv2d",
    "StableFNOBlock",
    "TopKGate",
    "TransformerBlock",
    "UNet",
    "ViT2d",
    "add_self_loops",
    "alibi_bias",
    "alibi_slopes",
    "coord_channels",
    "count_parameters",
    "downsample_mask",
    "drop_path",
    "gather_masked",
    "group_norm",
    "masked_attention",
    "random_mask",
    "resnet18",
    "router_z_loss",
    "scatter_masked",
    "segment_softmax",
    "sincos_2d",
    "switch_balance_loss",
    "timestep_embedding",
]
