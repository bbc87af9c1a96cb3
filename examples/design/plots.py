"""Figures of the design stages (matplotlib passed in: ``blockyard.train.pyplot()``)."""
from __future__ import annotations

from pathlib import Path

import torch

from .vocab import NUM_COLORS, color_rgb

__all__ = ["color_image", "plot_structures"]

_BACKGROUND_RGB = (235, 235, 235)


def color_image(color: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` colour ids -> ``(H, W, 3)`` RGB in [0, 1]: palette colours, background light grey."""
    lut = torch.tensor([_BACKGROUND_RGB, *(color_rgb(c) for c in range(1, NUM_COLORS))], dtype=torch.float32) / 255
    return lut[color.round().long().clamp(0, NUM_COLORS - 1)]


def plot_structures(plt, image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    """One row per design: the input, then truth and prediction of each F channel side by side.

    Shapes:
        - image: ``(N, 3, H, W)`` in [0, 1]; truth, pred: ``(N, 4, H, W)`` hard F
    """
    names = ("text", "image", "colour", "hierarchy")
    rows = image.shape[0]
    fig, axes = plt.subplots(rows, 9, figsize=(18, 2.1 * rows), squeeze=False)
    for r in range(rows):
        panels = [("input", image[r].permute(1, 2, 0).clamp(0, 1), None)]
        for c, name in enumerate(names):
            for kind, f in (("true", truth), ("pred", pred)):
                panel = color_image(f[r, 2]) if c == 2 else f[r, c].float()
                panels.append((f"{name} {kind}", panel, None if c == 2 else "gray"))
        for ax, (title, panel, cmap) in zip(axes[r], panels):
            ax.imshow(panel.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
