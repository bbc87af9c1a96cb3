"""The grammar reward of a generated design, differentiable from the image back to the decoder.

Two pieces, used by reward fine-tuning (stage 4) and latent optimisation (stage 5):

- :func:`clean_estimate`: the one-step clean-sample estimate of a noisy design,
  ``x0 = (x_t - sqrt(1 - ac_t) eps) / sqrt(ac_t)`` clipped to [-1, 1] (the scheduler's own
  ``ddim_step(..., t_prev=-1).pred_original_sample``), as an RGB image in [0, 1];
- :func:`grammar_reward`: image -> the frozen encoder's *soft* F (sigmoid masks, softmax colour
  probabilities, hierarchy; no thresholds, no arg-max) -> the four grammar scores
  (``grammar.grammar_scores`` on the image and that F), ``(B, 4)``.

Why the formulas and not the abstractor's grammar head: the formulas are the quantity the stages
report (on the encoder's hard F), they are exact and differentiable on soft maps, and they
cannot be satisfied by an input the abstractor was never trained on (the abstractor regresses
the scores of ground-truth F; a reward through it invites adversarial F that only it likes). The
abstractor's head stays a second opinion in the reports (``source="abstractor"`` is here for
that and for comparison runs). The colour-class channel of F does not enter the formulas (the
contrast reads the RGB image itself); through the abstractor the colour enters as the softmax
probabilities.
"""
from __future__ import annotations

import torch
from torch import nn

from blockyard.blocks import DDPMScheduler

from .grammar import grammar_scores
from .models import DesignAbstractor, DesignEncoder
from .vocab import NUM_COLORS

__all__ = ["REWARD_SOURCES", "clean_estimate", "formula_structure", "grammar_reward", "to_image"]

REWARD_SOURCES = ("formula", "abstractor")


def to_image(x: torch.Tensor) -> torch.Tensor:
    """A sample in [-1, 1] -> an RGB image in [0, 1] (values outside are clamped)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def clean_estimate(scheduler: DDPMScheduler, eps: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    r"""One-step clean-sample estimate of a noisy design, as an image in [0, 1].

    :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}`,
    clipped to [-1, 1] when the scheduler clips (the clip passes no gradient where it is active),
    then mapped to [0, 1]. Differentiable in ``eps`` and ``x_t``.

    Shapes:
        - eps, x_t: ``(B, 3, H, W)``; t: ``(B,)`` long
        - output: ``(B, 3, H, W)`` float32 in [0, 1]
    """
    t_prev = torch.full_like(t, -1)
    return to_image(scheduler.ddim_step(eps, t, t_prev, x_t).pred_original_sample)


def formula_structure(soft: torch.Tensor) -> torch.Tensor:
    """Soft F ``(B, 3 + NUM_COLORS, H, W)`` -> the 4-channel F the grammar formulas read.

    Text and image probabilities and the hierarchy map as they are (differentiable); the colour
    channel, which no formula reads, holds the arg-max class (detached), so the map is also a
    valid hard-form F.
    """
    color = soft[:, 2:2 + NUM_COLORS].detach().argmax(dim=1, keepdim=True).to(soft.dtype)
    return torch.cat([soft[:, :2], color, soft[:, -1:]], dim=1)


def grammar_reward(image: torch.Tensor, encoder: DesignEncoder, source: str = "formula",
                   abstractor: DesignAbstractor | None = None) -> torch.Tensor:
    """The four grammar scores of ``image`` through the encoder's soft F, differentiable in ``image``.

    Args:
        image: RGB in [0, 1].
        encoder: the trained (frozen) encoder.
        source: ``"formula"``: ``grammar_scores(image, formula_structure(soft F))``;
            ``"abstractor"``: the abstractor's grammar head on the soft F.
        abstractor: required for ``source="abstractor"``.

    Shapes:
        - image: ``(B, 3, H, W)``
        - output: ``(B, 4)`` float32 in the order of ``vocab.GRAMMAR_NAMES``
    """
    if source not in REWARD_SOURCES:
        raise ValueError(f"source: expected one of {REWARD_SOURCES}, got {source!r}")
    soft = encoder.soft_structure(image)
    if source == "abstractor":
        if not isinstance(abstractor, nn.Module):
            raise ValueError("abstractor: expected the trained DesignAbstractor for source='abstractor', got None")
        return abstractor(soft).grammar.float()
    return grammar_scores(image.float(), formula_structure(soft))
