"""Loss functions and evaluation metrics. Every name is re-exported flat here."""

from .heatmap import MASK_FILL, WTAOutput, gaussian_heatmap, wta_heatmap_loss
from .metrics import accuracy, iou, topk_accuracy
from .neighborhood import neighborhood_cross_entropy

__all__ = [
    "MASK_FILL",
    "WTAOutput",
    "accuracy",
    "gaussian_heatmap",
    "iou",
    "neighborhood_cross_entropy",
    "topk_accuracy",
    "wta_heatmap_loss",
]
