"""Loss functions and evaluation metrics. Every name is re-exported flat here."""

from .heatmap import MASK_FILL, WTAOutput, gaussian_heatmap, wta_heatmap_loss
from .metrics import accuracy, iou, topk_accuracy
from .moe import router_z_loss, switch_balance_loss
from .neighborhood import neighborhood_cross_entropy
from .regression import CompositeLoss, LossOutput, dice_loss, log2_mse, masked_mse
from .set_targets import set_cross_entropy, wta_set_heatmap_loss
from .ssim import ssim

__all__ = [
    "MASK_FILL",
    "CompositeLoss",
    "LossOutput",
    "WTAOutput",
    "accuracy",
    "dice_loss",
    "gaussian_heatmap",
    "iou",
    "log2_mse",
    "masked_mse",
    "neighborhood_cross_entropy",
    "router_z_loss",
    "set_cross_entropy",
    "ssim",
    "switch_balance_loss",
    "topk_accuracy",
    "wta_heatmap_loss",
    "wta_set_heatmap_loss",
]
