"""DDPM noise schedule with diffusers' numerics: forward noising, ancestral and DDIM steps, sampling.

Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020. https://arxiv.org/abs/2006.11239
Song et al., "Denoising Diffusion Implicit Models", ICLR 2021. https://arxiv.org/abs/2010.02502
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

import torch
from torch import nn

__all__ = ["DDPMScheduler", "DDPMStepOutput"]

_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


class DDPMStepOutput(NamedTuple):
    """One reverse step: the less noisy sample and the model's estimate of the clean sample."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _make_betas(schedule: str, num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Same operations and dtypes as diffusers' DDPMScheduler.__init__ (float32 linspace; the cosine
    # schedule in Python floats, then cast), so the buffers agree bit for bit.
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                 for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float32)
    return torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (beta_end - beta_start) + beta_start


def _randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    # diffusers' randn_tensor: draw on the generator's device, then move (a CPU generator gives
    # the same numbers whatever the target device).
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


class DDPMScheduler(nn.Module):
    r"""DDPM noise schedule and samplers with the numerics of diffusers' ``DDPMScheduler``.

    Forward process and the ancestral step (epsilon prediction, ``fixed_small`` variance), with
    :math:`\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)` and :math:`\bar\alpha_{-1} = 1`:

    .. math::
        x_t &= \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon \\
        \hat x_0 &= \mathrm{clip}\big((x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}\big),
            \quad \alpha'_t = \bar\alpha_t / \bar\alpha_{t'},\ \beta'_t = 1 - \alpha'_t \\
        x_{t'} &= \frac{\sqrt{\bar\alpha_{t'}}\,\beta'_t}{1-\bar\alpha_t}\,\hat x_0
            + \frac{\sqrt{\alpha'_t}\,(1-\bar\alpha_{t'})}{1-\bar\alpha_t}\,x_t
            + [t > 0]\,\sigma_t z,\qquad
            \sigma_t^2 = \max\Big(\frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}\beta'_t,\ 10^{-20}\Big)

    with :math:`t' = t - 1` unless given. ``clip`` clamps to ``[-clip_sample_range, clip_sample_range]``
    when ``clip_sample``. The buffers ``betas`` and ``alphas_cumprod`` are float32 computed as
    diffusers does (float32 ``linspace`` and ``cumprod``; lucidrains uses float64, about 1e-6
    relative apart). They are non-persistent (derived from the arguments, not saved in a
    ``state_dict``), follow ``.to(device)``, and stay float32 under ``.to(dtype)``/``.half()``.

    Coefficients are computed in ``promote(x.dtype, float32)`` and the result is cast back to
    the input dtype (diffusers computes ``add_noise`` in the input dtype, which loses
    :math:`1-\bar\alpha_t` for small ``t`` in half precision); in float32 the two are identical.

    Timesteps ``t`` are a Python int or an integer tensor ``()`` / ``(B,)`` (one per sample,
    vectorised, no host sync). Range checks: Python ints and CPU tensors raise ``ValueError``;
    tensors on other devices are checked asynchronously (a device-side assert). With a tensor
    ``t`` the step always draws noise (then zeroes it where ``t == 0``); with an int it draws
    only when ``t > 0``, like diffusers, so a shared ``generator`` gives diffusers' numbers.

    Args:
        num_steps: number of training timesteps ``T``.
        beta_start: first beta.
        beta_end: last beta.
        clip_sample: clamp the predicted clean sample (DDPM and DDIM steps).
        schedule: ``"linear"``, ``"scaled_linear"`` (linear in sqrt beta), ``"squaredcos_cap_v2"``
            (Nichol & Dhariwal cosine, s = 0.008, betas capped at 0.999) or ``"sigmoid"``.
        clip_sample_range: bound of the clamp.

    Shapes:
        - x0, noise, eps, x_t: ``(B, *)``, all the same shape
        - t, t_prev: int, or ``()`` / ``(B,)`` integer tensor
        - outputs: same shape and dtype as ``x_t`` (``x0`` for :meth:`add_noise`)
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 clip_sample: bool = True, schedule: str = "linear", clip_sample_range: float = 1.0,
                 device=None) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {_SCHEDULES}, got {schedule!r}")
        if schedule != "squaredcos_cap_v2" and not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"beta_start, beta_end: expected 0 < start <= end < 1, got {beta_start}, {beta_end}")
        self.num_steps = num_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.clip_sample = clip_sample
        self.schedule = schedule
        self.clip_sample_range = clip_sample_range
        self.register_buffer("betas", torch.empty(0), persistent=False)
        self.register_buffer("alphas_cumprod", torch.empty(0), persistent=False)
        self._build(device)

    def _build(self, device) -> None:
        betas = _make_betas(self.schedule, self.num_steps, self.beta_start, self.beta_end)
        self.betas = betas.to(device)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.betas.dtype != torch.float32:  # .half()/.to(dtype): rebuild rather than lose precision
            self._build(self.betas.device)
        return self

    # ---- input handling -------------------------------------------------------------------
    def _index(self, t: int | torch.Tensor, name: str, batch: int, device, low: int = 0) -> torch.Tensor:
        """Timesteps as a long tensor ``(B,)`` on ``device``, range-checked against ``[low, T)``."""
        high = self.num_steps
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
            if t.shape not in ((), (batch,)):
                raise ValueError(f"{name}: expected () or ({batch},), got {tuple(t.shape)}")
            t = t.to(device=device, dtype=torch.long).expand(batch)
            ok = (t >= low) & (t < high)
            if not torch.compiler.is_compiling():
                if t.device.type == "cpu":
                    if not bool(ok.all()):
                        raise ValueError(f"{name}: expected values in [{low}, {high}), got {t.tolist()}")
                else:
                    torch._assert_async(ok.all(), f"{name}: values outside [{low}, {high})")
            return t
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{name}: expected an int or an integer tensor, got {type(t).__name__}")
        if not low <= t < high:
            raise ValueError(f"{name}: expected a value in [{low}, {high}), got {t}")
        return torch.full((batch,), t, device=device, dtype=torch.long)

    @staticmethod
    def _check_pair(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
        if b.dim() < 1:
            raise ValueError(f"{b_name}: expected (B, *), got {tuple(b.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"{a_name}: expected {tuple(b.shape)} (the shape of {b_name}), got {tuple(a.shape)}")

    def _gather(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
        """``(alphas_cumprod[t], alphas_cumprod[t_prev] or 1, work dtype)``, shaped to broadcast on ``x``."""
        work = torch.promote_types(x.dtype, torch.float32)
        ac = self.alphas_cumprod.to(device=x.device, dtype=work)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        ac_t = ac[t].view(shape)
        ac_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.ones((), dtype=work, device=x.device))
        return ac_t, ac_prev.view(shape), work

    # ---- forward process ------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise``, per sample, over any trailing dims."""
        self._check_pair(noise, "noise", x0, "x0")
        ti = self._index(t, "t", x0.shape[0], x0.device)
        ac_t, _, work = self._gather(x0, ti, ti)
        return (ac_t**0.5 * x0.to(work) + (1 - ac_t) ** 0.5 * noise.to(work)).to(x0.dtype)

    def posterior_variance(self, t: int | torch.Tensor, t_prev: int | torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' ``_get_variance`` (fixed_small): ``max((1-ac[t'])/(1-ac[t]) * (1 - ac[t]/ac[t']), 1e-20)``.

        Returns float32 ``(B,)`` (``B = 1`` for an int ``t``) on the buffers' device.
        """
        batch = t.numel() if isinstance(t, torch.Tensor) else 1
        ref = self.alphas_cumprod.new_empty(batch)
        ti = self._index(t, "t", batch, ref.device)
        tp = ti - 1 if t_prev is None else self._index(t_prev, "t_prev", batch, ref.device, low=-1)
        ac_t, ac_prev, _ = self._gather(ref, ti, tp)
        return ((1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)).clamp(min=1e-20)

    # ---- reverse steps --------------------------------------------------------------------
    def _pred_x0(self, eps: torch.Tensor, x_t: torch.Tensor, ac_t: torch.Tensor) -> torch.Tensor:
        x0 = (x_t - (1 - ac_t) ** 0.5 * eps) / ac_t**0.5
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
             generator: torch.Generator | None = None, t_prev: int | torch.Tensor | None = None) -> DDPMStepOutput:
        """One ancestral DDPM step from ``t`` to ``t_prev`` (default ``t - 1``; -1 means "clean")."""
        self._check_pair(eps, "eps", x_t, "x_t")
        batch = x_t.shape[0]
        ti = self._index(t, "t", batch, x_t.device)
        tp = ti - 1 if t_prev is None else self._index(t_prev, "t_prev", batch, x_t.device, low=-1)
        ac_t, ac_prev, work = self._gather(x_t, ti, tp)
        xw, ew = x_t.to(work), eps.to(work)
        cur_alpha = ac_t / ac_prev
        cur_beta = 1 - cur_alpha
        x0 = self._pred_x0(ew, xw, ac_t)
        mean = (ac_prev**0.5 * cur_beta / (1 - ac_t)) * x0 + (cur_alpha**0.5 * (1 - ac_prev) / (1 - ac_t)) * xw
        std = ((1 - ac_prev) / (1 - ac_t) * cur_beta).clamp(min=1e-20) ** 0.5
        if isinstance(t, torch.Tensor):
            z = _randn(eps.shape, generator, eps.device, eps.dtype).to(work)
            prev = mean + torch.where(ti.view(ac_t.shape) > 0, std, torch.zeros_like(std)) * z
        elif t > 0:
            prev = mean + std * _randn(eps.shape, generator, eps.device, eps.dtype).to(work)
        else:
            prev = mean
        return DDPMStepOutput(prev.to(x_t.dtype), x0.to(x_t.dtype))

    def ddim_step(self, eps: torch.Tensor, t: int | torch.Tensor, t_prev: int | torch.Tensor, x_t: torch.Tensor,
                  eta: float = 0.0, generator: torch.Generator | None = None, *,
                  use_clipped_model_output: bool = True) -> DDPMStepOutput:
        r"""One DDIM step (Song et al. eq. 12) from ``t`` to ``t_prev`` (-1 = the clean sample).

        .. math::
            x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}-\sigma^2}\,\hat\epsilon + \sigma z,
            \qquad \sigma = \eta\sqrt{\tfrac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}\big(1-\tfrac{\bar\alpha_t}
            {\bar\alpha_{t'}}\big)}

        with :math:`\hat x_0` the (clipped, when ``clip_sample``) prediction of :meth:`step` and
        :math:`\bar\alpha_{-1} = 1` (diffusers' ``set_alpha_to_one=True``). ``eta=0`` is
        deterministic and differentiable. By default (``use_clipped_model_output=True``, GLIDE's
        choice) the direction term is re-derived from the clipped prediction,
        :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}`, as diffusers
        does with the same keyword; with ``False`` it uses the model's ``eps`` as given
        (:math:`\hat\epsilon = \epsilon`), diffusers' ``DDIMScheduler.step`` default, bit for bit. The two
        differ only where the clip was active, which under classifier-free guidance is often: in
        ``benchmarks/diffusion_peer.py`` (8x8 digits, cosine schedule, 3000 steps, guidance scale 3) the
        share of samples a classifier recognises was 1.000 with the default and 0.094 with ``False``
        for blockyard's U-Net, 1.000 and 0.038 for diffusers' ``UNet2DConditionModel``.
        """
        self._check_pair(eps, "eps", x_t, "x_t")
        if eta < 0:
            raise ValueError(f"eta: expected >= 0, got {eta}")
        if isinstance(t, int) and isinstance(t_prev, int) and not t_prev < t:
            raise ValueError(f"t_prev: expected < t={t}, got {t_prev}")
        batch = x_t.shape[0]
        ti = self._index(t, "t", batch, x_t.device)
        tp = self._index(t_prev, "t_prev", batch, x_t.device, low=-1)
        ac_t, ac_prev, work = self._gather(x_t, ti, tp)
        xw, ew = x_t.to(work), eps.to(work)
        x0 = self._pred_x0(ew, xw, ac_t)
        if use_clipped_model_output:
            ew = (xw - ac_t**0.5 * x0) / (1 - ac_t) ** 0.5
        var = (1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)
        sigma = eta * var**0.5
        prev = ac_prev**0.5 * x0 + (1 - ac_prev - sigma**2).clamp(min=0) ** 0.5 * ew
        if eta > 0:
            prev = prev + sigma * _randn(eps.shape, generator, eps.device, eps.dtype).to(work)
        return DDPMStepOutput(prev.to(x_t.dtype), x0.to(x_t.dtype))

    def ddim_timesteps(self, steps: int) -> list[int]:
        """diffusers' "leading" spacing: ``[k * (T // steps) for k < steps]``, descending (50 of 1000: 980..0)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps: expected an int in [1, {self.num_steps}], got {steps}")
        ratio = self.num_steps // steps
        return [k * ratio for k in range(steps - 1, -1, -1)]

    def sample(self, model: Callable[..., torch.Tensor], shape: Sequence[int], steps: int | None = None,
               eta: float = 0.0, generator: torch.Generator | None = None, device=None, dtype=None,
               enable_grad: bool = False, use_clipped_model_output: bool = True, **cond) -> torch.Tensor:
        """Generate from pure noise: ancestral DDPM over all ``T`` steps, or DDIM over ``steps``.

        ``model(x_t, t, **cond)`` must return the predicted noise, shaped like ``x_t``; ``t`` is a
        long tensor ``(B,)``. The start noise and every step's noise come from ``generator``.
        Runs under ``torch.no_grad()`` unless ``enable_grad`` (e.g. to backpropagate through a
        short DDIM chain). ``cond`` names must differ from this method's keywords.

        Args:
            model: the noise predictor.
            shape: ``(B, *)`` of the sample.
            steps: None for ancestral DDPM over every timestep; an int for DDIM with
                :meth:`ddim_timesteps` spacing.
            eta: DDIM stochasticity (0 = deterministic).
            generator: source of all randomness.
            device: default: the buffers' device.
            dtype: sample dtype (default float32).
            enable_grad: keep autograd on.
            use_clipped_model_output: DDIM only, see :meth:`ddim_step`.
            **cond: forwarded to ``model``.

        Shapes:
            - output: ``shape``, the final (clean) sample
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or min(shape) < 1:
            raise ValueError(f"shape: expected (B, *) with positive sizes, got {shape}")
        timesteps = list(range(self.num_steps - 1, -1, -1)) if steps is None else self.ddim_timesteps(steps)
        device = self.betas.device if device is None else device
        dtype = torch.float32 if dtype is None else dtype
        with torch.set_grad_enabled(enable_grad):
            x = _randn(shape, generator, device, dtype)
            if steps is None and torch.promote_types(dtype, torch.float32) == dtype:
                return self._ddpm_chain(model, x, generator, cond)
            for i, t in enumerate(timesteps):
                eps = model(x, torch.full((shape[0],), t, device=x.device, dtype=torch.long), **cond)
                if steps is None:
                    x = self.step(eps, t, x, generator).prev_sample
                else:
                    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                    x = self.ddim_step(eps, t, t_prev, x, eta, generator,
                                       use_clipped_model_output=use_clipped_model_output).prev_sample
        return x

    def _ddpm_chain(self, model: Callable[..., torch.Tensor], x: torch.Tensor, generator: torch.Generator | None,
                    cond: dict) -> torch.Tensor:
        """:meth:`step` from ``T - 1`` down to 0 with every coefficient computed once for the chain.

        Bit for bit :meth:`step`'s arithmetic (the same float32, or float64, expressions, here over
        all ``t`` at once, then applied as scalars), without its per-step indexing, gathers and
        checks: those small ops cost more than the step's own arithmetic on small samples.
        """
        work = x.dtype
        ac_t = self.alphas_cumprod.to(device=x.device, dtype=work)
        ac_prev = torch.cat([torch.ones(1, dtype=work, device=x.device), ac_t[:-1]])
        cur_alpha = ac_t / ac_prev
        cur_beta = 1 - cur_alpha
        table = torch.stack([(1 - ac_t) ** 0.5, ac_t**0.5,
                             ac_prev**0.5 * cur_beta / (1 - ac_t),
                             cur_alpha**0.5 * (1 - ac_prev) / (1 - ac_t),
                             ((1 - ac_prev) / (1 - ac_t) * cur_beta).clamp(min=1e-20) ** 0.5], dim=1).tolist()
        bound = self.clip_sample_range
        for t in range(self.num_steps - 1, -1, -1):
            eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), **cond)
            self._check_pair(eps, "eps", x, "x_t")
            sqrt_one_minus, sqrt_ac, c_x0, c_xt, std = table[t]
            x0 = (x - sqrt_one_minus * eps.to(work)) / sqrt_ac
            if self.clip_sample:
                x0 = x0.clamp(-bound, bound)
            prev = c_x0 * x0 + c_xt * x
            if t > 0:
                prev = prev + std * _randn(eps.shape, generator, eps.device, eps.dtype).to(work)
            x = prev
        return x

    def forward(self, *args: object, **kwargs: object) -> NoReturn:
        """Not callable: a scheduler is used through its methods, which say what they compute.

        :meth:`add_noise` (the training input ``x_t``), :meth:`step` (one ancestral step),
        :meth:`ddim_step` (one DDIM step) and :meth:`sample` (the whole reverse chain). It is an
        ``nn.Module`` so that its buffers follow ``.to(device)``.

        Raises:
            TypeError: always, naming those methods.
        """
        raise TypeError("DDPMScheduler is not called directly: use add_noise(x0, noise, t), step(eps, t, x_t), "
                        "ddim_step(eps, t, t_prev, x_t) or sample(model, shape)")

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, schedule={self.schedule!r}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}, clip_sample={self.clip_sample}")
