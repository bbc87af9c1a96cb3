"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) in one call.

Under DDP every rank holds the whole model, its gradients and the optimizer state. FSDP2 keeps
1/world of each on every rank (the parameters become ``DTensor`` shards along dim 0); a sharded
module all-gathers its parameters just before its forward (and backward) and frees them after,
and gradients are reduce-scattered instead of all-reduced. Sharding each block separately keeps
only one block's full parameters alive at a time; sharding only the root keeps the persistent
memory at 1/world but gathers the whole model for every forward.

Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023.
https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html

Usage (the model on ``info.device`` first; the optimizer built after sharding)::

    info = setup_distributed()
    net = FusionNet(...).to(info.device)
    ema = EMA(net)                                    # before sharding: FSDP modules cannot be copied
    model = shard_model(net, modules=(EncoderLevel, DecoderLevel), precision="bf16", ema=ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)
    ckpt = CheckpointManager(out / "checkpoints", sharded=True)   # every rank writes its shards

Gradient accumulation (:class:`~blockyard.train.GradientAccumulator`, :class:`~blockyard.train.Stepper`)
turns the reduce-scatter off on the non-stepping micro-batches; clipping and the non-finite guard
reduce the sharded gradients' norm over the ranks. Every forward of a sharded model is a collective:
every rank must run the same number of them, or evaluate inside :func:`gathered`.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import is_distributed
from .precision import PRECISIONS, precision_dtype

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["gathered", "is_sharded", "mixed_precision_policy", "shard_model"]

logger = logging.getLogger(__name__)

ModulesLike = type | tuple[type, ...] | Sequence[nn.Module] | None


def _fsdp() -> Any:
    try:
        from torch.distributed import fsdp
    except ImportError as err:  # pragma: no cover - torch built without distributed
        raise ImportError(f"shard_model needs torch.distributed.fsdp (torch >= 2.6), got torch {torch.__version__}") \
            from err
    if not hasattr(fsdp, "fully_shard"):
        raise ImportError(f"shard_model needs torch.distributed.fsdp.fully_shard (torch >= 2.6), "
                          f"got torch {torch.__version__}")
    return fsdp


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a precision name of :data:`~blockyard.train.PRECISIONS`.

    ``"fp32"``: no casting. ``"bf16"``/``"fp16"``: parameters are all-gathered and computed in
    that dtype, gradients are reduce-scattered in float32 (``reduce_dtype``), and the sharded
    parameters and optimizer state stay float32. fp16 still needs the GradScaler (the
    :class:`~blockyard.train.Stepper` makes one).
    """
    dtype = precision_dtype(precision)  # raises the library's ValueError for an unknown name
    policy = _fsdp().MixedPrecisionPolicy
    if dtype == torch.float32:
        return policy()
    return policy(param_dtype=dtype, reduce_dtype=torch.float32)


def _targets(model: nn.Module, modules: ModulesLike) -> list[str]:
    """Names (in ``model.named_modules()``) of the submodules to shard on their own, innermost first."""
    if modules is None:
        return []
    named = [(n, m) for n, m in model.named_modules() if m is not model]
    if isinstance(modules, type):
        modules = (modules,)
    if isinstance(modules, tuple) and modules and all(isinstance(t, type) for t in modules):
        bad = [t for t in modules if not issubclass(t, nn.Module)]
        if bad:
            raise TypeError(f"modules: expected nn.Module subclasses, got {bad}")
        names = [n for n, m in named if isinstance(m, modules)]
        if not names:
            raise ValueError(f"modules: expected submodules of type {[t.__name__ for t in modules]} in the model, "
                             f"got none in a {type(model).__name__}")
    elif (isinstance(modules, Sequence) and not isinstance(modules, (str, tuple))) or (
            isinstance(modules, tuple) and all(isinstance(m, nn.Module) for m in modules)):
        by_id = {id(m): n for n, m in named}
        names = []
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules: expected nn.Module instances, got a {type(m).__name__}")
            if id(m) not in by_id:
                raise ValueError(f"modules: expected submodules of the model, got a {type(m).__name__} "
                                 "that is not one of them (or the model itself)")
            names.append(by_id[id(m)])
    else:
        raise TypeError(f"modules: expected None, an nn.Module subclass, a tuple of them or a list of "
                        f"submodules, got {modules!r}")
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(set(names), key=lambda n: -order[n])  # children before their parents


def shard_model(model: nn.Module, *, modules: ModulesLike = None, precision: str = "fp32",
                cpu_offload: bool = False, reshard_after_forward: bool = True, ema: EMA | None = None,
                mesh: Any = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks and return it.

    ``fully_shard`` is applied to every submodule selected by ``modules`` (innermost first), then
    to ``model`` itself, which takes the parameters no selected submodule holds. Parameter names
    (and so checkpoints) are unchanged. Without a process group (one process, no torchrun) the
    model is returned unchanged, as :func:`~blockyard.train.wrap_ddp` does.

    Args:
        model: the model, on the training device (CUDA under NCCL; the CPU under gloo).
        modules: what to shard on its own: ``None`` (the root only), a block type or a tuple of
            types (every submodule of such a type, e.g. ``(EncoderLevel, DecoderLevel)``), or a
            list of submodules.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the compute dtype of the all-gathered
            parameters (see :func:`mixed_precision_policy`).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory
            (``CPUOffloadPolicy``; pinned on CUDA) and copy each block to the GPU for its compute;
            the optimizer step then runs on the CPU.
        reshard_after_forward: free the gathered parameters after each forward (gather again in
            backward): least memory. ``False`` keeps them until the backward, one all-gather less.
        ema: an :class:`~blockyard.train.EMA` built from ``model`` *before* sharding; its averaged
            copy is sharded the same way, so it also takes 1/world of the memory per rank.
        mesh: a 1-D ``DeviceMesh`` to shard over; default: all ranks, on ``"cuda"`` under NCCL
            and ``"cpu"`` otherwise.

    Raises:
        ValueError: ``modules`` selects nothing, or names a module outside ``model``; bad ``precision``.
        TypeError: ``model`` or ``modules`` has the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    names = _targets(model, modules)
    n_params = len(list(model.parameters()))
    if ema is not None and len(list(ema.module.parameters())) != n_params:
        raise ValueError(f"ema: expected an EMA built from this model before sharding ({n_params} parameters), "
                         f"got one of {len(list(ema.module.parameters()))}")
    if not is_distributed():
        logger.info("shard_model: no process group, the model is used unsharded")
        return model
    fsdp = _fsdp()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision),
              "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for target in [model] + ([ema.module] if ema is not None else []):
        for name in names:
            fsdp.fully_shard(target.get_submodule(name), **kwargs)
        fsdp.fully_shard(target, **kwargs)
    if ema is not None:
        ema.rebind()
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded by ``fully_shard``."""
    fsdp_module = getattr(_fsdp(), "FSDPModule", ())
    return any(isinstance(m, fsdp_module) for m in model.modules())


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after_forward: bool = True) -> Iterator[nn.Module]:
    """Hold every rank's full parameters while inside, so forwards need no collective.

    Inside, each rank may run any number of forwards (evaluation on uneven shards of a validation
    set, or on the main process only): the parameters are all-gathered once on entry (a
    collective: enter it on every rank) and resharded on exit. Costs the whole model's memory
    per rank meanwhile, as DDP does. A no-op for an unsharded model.

    Args:
        model: a model sharded by :func:`shard_model` (or any module holding FSDP2 modules).
        reshard_after_forward: the value set back on every sharded module on exit (the one given to
            :func:`shard_model`; FSDP2 exposes no getter).
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, getattr(_fsdp(), "FSDPModule", ()))]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)
