"""Mixed precision in three words: ``"fp32"``, ``"bf16"``, ``"fp16"``.

The training loop is written once; precision only changes what :func:`autocast` and
:func:`make_grad_scaler` return (nanoGPT's trick: features become no-ops instead of branches)::

    scaler = make_grad_scaler(precision, device)
    with autocast(device, precision):
        loss = criterion(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                  # before clipping
    clip_gradients(model.parameters(), value=1.0)
    if scaler_step(scaler, optimizer):          # False when fp16 overflow skipped the step
        apply_lr(optimizer, warmup_cosine(step := step + 1, ...))
        ema.update(model, step)
    optimizer.zero_grad(set_to_none=True)

On a skipped fp16 step neither the schedule nor the EMA may advance (Lightning #5558, #16228,
#18828 advance them anyway): :func:`scaler_step` says whether the optimizer really stepped.

fp16 on the CPU is allowed (torch has float16 CPU autocast and a CPU GradScaler): it is slow and
not meant for training, but lets the fp16 code path (loss scaling, skipped steps) be run and
tested on a machine without a GPU. bf16 autocast on CPUs without AVX512-BF16/AMX is often slower
than fp32 (pytorch #86270, #118499); :func:`default_precision` picks fp32 on the CPU.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "default_precision", "make_grad_scaler", "precision_dtype", "scaler_step"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str) -> str:
    if precision not in _DTYPES:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def _device_type(device: str | torch.device) -> str:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    return torch.device(device).type


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a precision name (``"bf16"`` -> ``torch.bfloat16``)."""
    return _DTYPES[_check(precision)]


def default_precision(device: str | torch.device) -> str:
    """``"bf16"`` on CUDA devices that support it, ``"fp16"`` on older GPUs, ``"fp32"`` elsewhere."""
    if _device_type(device) == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``'s type.

    ``"fp32"`` is a ``nullcontext`` (it does not switch off an enclosing autocast); ``"bf16"`` and
    ``"fp16"`` are ``torch.autocast(device_type, dtype=...)``. Parameters stay float32; matmuls
    and convolutions run in the reduced dtype, reductions in float32 (torch's autocast lists).

    Args:
        device: a ``torch.device`` or a string such as ``"cuda:1"``; only its type matters.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; anything else is a ``ValueError``.
    """
    precision = _check(precision)
    device_type = _device_type(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


def make_grad_scaler(precision: str, device: str | torch.device | None = None) -> torch.amp.GradScaler:
    """A real ``torch.amp.GradScaler`` for ``"fp16"``, a disabled (no-op) one otherwise.

    The disabled scaler has the same interface: ``scale(loss)`` returns ``loss``, ``unscale_`` and
    ``update`` do nothing, ``step(optimizer)`` calls ``optimizer.step()``, ``state_dict()`` is
    ``{}``, so the loop and the checkpoint code never branch on precision. Loading an fp16
    scaler's state into it is ignored; loading ``{}`` into an fp16 scaler raises (torch's check).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the training device (its type selects the scaler's backend); ``None`` means CUDA
            if available, else the CPU.
    """
    precision = _check(precision)
    if device is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = _device_type(device)
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` then ``scaler.update()``; True if the optimizer really stepped.

    An fp16 scaler skips ``optimizer.step()`` when the (unscaled) gradients hold inf/NaN and
    backs its scale off. For ordinary optimizers the skip is detected with a step post-hook
    (removed again before returning), which costs no host sync beyond the scaler's own. Fused
    optimizers (``fused=True``) take ``found_inf`` into their own step and skip *inside* it, so
    their step hook fires either way: for them the answer is whether ``update()`` backed the
    scale off (``backoff_factor < 1`` always), one host sync per step, fp16 only. Under DDP the
    gradients are already all-reduced, so every rank gets the same answer.
    """
    if scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return not scaler.get_scale() < before
    stepped: list[bool] = []
    handle = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        scaler.step(optimizer)
    finally:
        handle.remove()
    scaler.update()
    return bool(stepped)
