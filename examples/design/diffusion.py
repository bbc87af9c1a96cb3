"""The design decoder's denoiser, classifier-free guidance and a differentiable DDIM chain.

``DesignDenoiser`` is a blockyard :class:`~blockyard.blocks.UNet` that predicts the noise of an
RGB design (mapped to [-1, 1]) at timestep ``t`` given its metadata (goal, format, tone):

- the timestep: ``timestep_embedding(t, widths[0])`` -> MLP -> ``cond``, FiLM at every level;
- the metadata (``meta="cross_attention"``, the default): three context tokens (a goal embedding,
  a format embedding, an MLP of the tone) that the U-Net's lowest ``context_levels`` resolutions
  attend to; ``meta="additive"`` is the seed's path instead: an MLP of the three embeddings
  concatenated is added to the timestep vector (no cross-attention);
- condition dropout: each field has its own learned null token; ``drop (B, 3)`` (True = that
  field is dropped, i.e. replaced by its null token) selects them. All three dropped is the
  unconditional model of classifier-free guidance (:func:`guided_eps`).

:func:`ddim_chain` runs DDIM (eta 0) with autograd on, from a given ``x_T``: the same values as
``DDPMScheduler.sample(..., steps=S)`` started from the same noise, with gradients to ``x_T``
and to the denoiser's weights (optionally one ``torch.utils.checkpoint`` segment per step).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from blockyard.blocks import MLP, DDPMScheduler, UNet, timestep_embedding
from blockyard.train import CheckpointManager

from .models import MODEL_FILE
from .vocab import FORMATS, GOALS

__all__ = ["DECODER_DIR", "DECODER_KIND", "META_MODES", "PREDICTIONS", "Chain", "DesignDenoiser", "ddim_chain",
           "guided_eps", "load_decoder"]

#: In a decoder stage's run folder: the weights to sample with (the EMA for stage 3, the tuned ones for stage 4).
DECODER_DIR = "decoder"
DECODER_KIND = "design-decoder"

META_MODES = ("cross_attention", "additive")
PREDICTIONS = ("v", "epsilon")
NUM_FIELDS = 3  # goal, format, tone


class DesignDenoiser(nn.Module):
    r"""Noise predictor :math:`\hat\epsilon(x_t, t, \text{goal}, \text{format}, \text{tone})` of an RGB design.

    Ho et al. 2020 (DDPM), conditioned as in Rombach et al. 2022 (cross-attention to context
    tokens) with Ho & Salimans 2022's condition dropout; ``meta="additive"`` is the seed's
    decoder (metadata embedding added to the timestep embedding).

    The output is always the noise estimate (what ``DDPMScheduler`` steps take). With
    ``prediction="v"`` the U-Net's output :math:`F` is read as the velocity
    :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0` (Salimans & Ho,
    "Progressive Distillation", ICLR 2022) and turned into
    :math:`\hat\epsilon = \sqrt{1-\bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,F`, so the clean-sample
    estimate is :math:`\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,F`: bounded at large
    ``t``. With ``prediction="epsilon"`` (:math:`\hat\epsilon = F`, the seed's) a small error of
    :math:`F` at ``t = 900`` is multiplied by :math:`\sqrt{(1-\bar\alpha_t)/\bar\alpha_t} \approx 60` in
    :math:`\hat x_0`, and an undertrained decoder samples clipped noise.

    Args:
        widths: U-Net widths, finest first (``len`` = levels; 64 px needs no more than 5).
        meta: ``"cross_attention"`` or ``"additive"``.
        meta_dim: size of each metadata token.
        heads: attention heads of the cross-attention (must divide the widths it acts on).
        context_levels: lowest resolutions with cross-attention (``meta="cross_attention"``).
        blocks_per_level: residual blocks per U-Net level.
        attention: self-attention over the bottleneck positions (the seed's mid-block attention).
        prediction: what the U-Net predicts, ``"v"`` or ``"epsilon"`` (see above).
        num_steps, beta_start, beta_end: the linear schedule of ``alphas_cumprod`` (as
            :class:`DDPMScheduler`'s defaults), used by ``prediction="v"``.
        stem: the U-Net's ``stem`` (``"conv"``, its default, is the right one for a denoiser).

    Shapes:
        - x: ``(B, 3, H, W)``; t: ``(B,)`` long; goal, format: ``(B,)`` long; tone: ``(B,)`` float
        - drop: optional ``(B, 3)`` bool, True = that field (goal, format, tone) is dropped
        - output: ``(B, 3, H, W)``, at least float32 with ``prediction="v"``
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), meta: str = "cross_attention",
                 meta_dim: int = 64, heads: int = 4, context_levels: int = 2, blocks_per_level: int = 1,
                 attention: bool = False, prediction: str = "v", stem: str = "conv", num_steps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__()
        if meta not in META_MODES:
            raise ValueError(f"meta: expected one of {META_MODES}, got {meta!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        alphas_cumprod = DDPMScheduler(num_steps, beta_start, beta_end).alphas_cumprod
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        widths = tuple(int(w) for w in widths)
        self.meta, self.tdim = meta, widths[0]
        cond_dim = 4 * widths[0]
        self.time = MLP(widths[0], hidden=(cond_dim,), out_dim=cond_dim, act_layer=nn.SiLU)
        # The last row of each table is that field's null token.
        self.goal = nn.Embedding(len(GOALS) + 1, meta_dim)
        self.format = nn.Embedding(len(FORMATS) + 1, meta_dim)
        self.tone = MLP(1, hidden=(meta_dim,), out_dim=meta_dim, act_layer=nn.SiLU)
        self.tone_null = nn.Parameter(torch.randn(meta_dim))
        cross = meta == "cross_attention"
        self.meta_cond = None if cross else MLP(NUM_FIELDS * meta_dim, hidden=(cond_dim,), out_dim=cond_dim,
                                                act_layer=nn.SiLU)
        self.unet = UNet(3, 3, widths, cond_dim=cond_dim, context_dim=meta_dim if cross else None, heads=heads,
                         context_levels=context_levels, blocks_per_level=blocks_per_level, attention=attention,
                         stem=stem)

    def tokens(self, goal: torch.Tensor, format: torch.Tensor, tone: torch.Tensor,
               drop: torch.Tensor | None = None) -> torch.Tensor:
        """The three metadata tokens ``(B, 3, meta_dim)``, null tokens where ``drop``."""
        b = goal.shape[0]
        for name, v in (("goal", goal), ("format", format), ("tone", tone)):
            if v.shape != (b,):
                raise ValueError(f"{name}: expected ({b},), got {tuple(v.shape)}")
        if drop is None:
            drop = torch.zeros(b, NUM_FIELDS, dtype=torch.bool, device=goal.device)
        elif drop.shape != (b, NUM_FIELDS) or drop.dtype != torch.bool:
            raise ValueError(f"drop: expected a ({b}, {NUM_FIELDS}) bool tensor, got {tuple(drop.shape)} {drop.dtype}")
        g = self.goal(torch.where(drop[:, 0], len(GOALS), goal))
        f = self.format(torch.where(drop[:, 1], len(FORMATS), format))
        tn = torch.where(drop[:, 2, None], self.tone_null.to(g.dtype), self.tone(tone[:, None].to(g.dtype)))
        return torch.stack([g, f, tn], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, goal: torch.Tensor, format: torch.Tensor,
                tone: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected ({x.shape[0]},), got {tuple(t.shape)}")
        cond = self.time(timestep_embedding(t, self.tdim).to(self.tone_null.dtype))
        tokens = self.tokens(goal, format, tone, drop)
        if self.meta_cond is not None:
            out = self.unet(x, cond + self.meta_cond(tokens.flatten(1)))
        else:
            out = self.unet(x, cond, tokens)
        if self.prediction == "epsilon":
            return out
        # In float32 at least, whatever the autocast: at large t the estimate is nearly x_t, and
        # x0 = (x_t - sqrt(1 - ac) eps) / sqrt(ac) cancels it; a bf16 eps would leave its rounding x 60.
        work = torch.promote_types(x.dtype, torch.float32)
        ac = self.alphas_cumprod.to(device=x.device, dtype=work)[t].view(-1, 1, 1, 1)
        return (1 - ac).sqrt() * x.to(work) + ac.sqrt() * out.to(work)


def guided_eps(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, goal: torch.Tensor,
               format: torch.Tensor, tone: torch.Tensor, scale: float = 1.0, *,
               two_pass: bool = False) -> torch.Tensor:
    r"""Classifier-free guidance: :math:`\hat\epsilon_\varnothing + s\,(\hat\epsilon_c - \hat\epsilon_\varnothing)`.

    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022. https://arxiv.org/abs/2207.12598

    :math:`\hat\epsilon_\varnothing` drops all three fields. At ``scale == 1`` this is the
    conditional model and only it runs, unless ``two_pass`` (then both run, in one batch of
    ``2B``, as at any other scale).

    Shapes:
        - x: ``(B, 3, H, W)``; t, goal, format, tone: ``(B,)``
        - output: ``(B, 3, H, W)``
    """
    if scale == 1.0 and not two_pass:
        return model(x, t, goal, format, tone)
    b = x.shape[0]
    drop = torch.zeros(2 * b, NUM_FIELDS, dtype=torch.bool, device=x.device)
    drop[b:] = True
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([goal, goal]), torch.cat([format, format]),
                torch.cat([tone, tone]), drop)
    cond, uncond = eps.chunk(2)
    return uncond + scale * (cond - uncond)


class Chain(NamedTuple):
    """A DDIM chain's end and path: ``sample`` = the state after the last step run (the clean sample after all
    of them), ``x0`` = each step's clean-sample estimate."""

    sample: torch.Tensor
    x0: list[torch.Tensor]


def ddim_chain(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor,
               scheduler: DDPMScheduler, steps: int, *, stop: int | None = None, use_checkpoint: bool = False) -> Chain:
    r"""Deterministic DDIM (eta 0) from ``x_T`` over ``steps`` steps, with autograd on.

    Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12 with sigma = 0, at
    ``scheduler.ddim_timesteps(steps)`` through :meth:`DDPMScheduler.ddim_step` (so the clean-sample
    clip and the re-derived direction term are the scheduler's). Started from the ``x_T`` that
    ``scheduler.sample(model, shape, steps=steps, generator=g)`` draws from ``g``, it returns that
    sample; unlike ``sample`` it keeps the graph, so the result is differentiable in ``x_T`` and in
    whatever ``eps_fn`` closes over. ``use_checkpoint`` recomputes each step's forward in the
    backward (memory of one step instead of ``steps``).

    Args:
        eps_fn: ``eps_fn(x_t, t)`` -> predicted noise, ``t`` a long tensor ``(B,)``.
        x_T: the start noise.
        scheduler: the noise schedule.
        steps: DDIM steps (the seed's latent loop: 10 to 20).
        stop: run only the first ``stop`` steps; ``sample`` is then the noisy state at timestep
            ``scheduler.ddim_timesteps(steps)[stop]`` (default: all steps, the clean sample).
        use_checkpoint: ``torch.utils.checkpoint`` each step.

    Shapes:
        - x_T: ``(B, C, H, W)``; output ``sample`` and each ``x0[i]``: the same
    """
    timesteps = scheduler.ddim_timesteps(steps)
    if stop is not None and not 0 <= stop <= steps:
        raise ValueError(f"stop: expected None or an int in [0, {steps}], got {stop!r}")
    x, path = x_T, []
    for i, t in enumerate(timesteps[:stop]):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)

        def step(x_t: torch.Tensor, t: int = t, t_prev: int = t_prev, tt: torch.Tensor = tt):
            return tuple(scheduler.ddim_step(eps_fn(x_t, tt), t, t_prev, x_t))

        x, x0 = checkpoint(step, x, use_reentrant=False) if use_checkpoint else step(x)
        path.append(x0)
    return Chain(x, path)


def load_decoder(run_dir: str | os.PathLike, device: torch.device | str | None = None) -> DesignDenoiser:
    """The denoiser a finished decoder stage (``design_decoder.py`` or ``design_reward.py`` ``--out``) samples with.

    Reads ``model.json`` (``{"kind": "design-decoder", "kwargs": ...}``) and the newest intact
    checkpoint in ``run_dir/decoder``; returns it in eval mode. Raises ``FileNotFoundError`` or
    ``ValueError`` naming ``run_dir`` when it is not a finished decoder run.
    """
    run_dir = Path(run_dir)
    spec_file, run_file = run_dir / MODEL_FILE, run_dir / "run.json"
    if not spec_file.is_file() or not run_file.is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} is not a decoder run folder (no {MODEL_FILE} or run.json); "
                                "expected the --out of a finished design_decoder.py or design_reward.py")
    spec = json.loads(spec_file.read_text())
    if spec.get("kind") != DECODER_KIND:
        raise ValueError(f"run_dir: {run_dir} holds a {spec.get('kind')!r}, expected a {DECODER_KIND!r}")
    status = json.loads(run_file.read_text()).get("status")
    if status != "finished":
        raise ValueError(f"run_dir: the decoder run in {run_dir} is {status!r}, not finished; finish it first "
                         "(rerun its stage with --resume auto)")
    model = DesignDenoiser(**spec["kwargs"])
    if CheckpointManager(run_dir / DECODER_DIR, rng=False, is_main=False).load_latest({"model": model}) is None:
        raise FileNotFoundError(f"run_dir: no intact checkpoint in {run_dir / DECODER_DIR}")
    return model.to(device).eval()
