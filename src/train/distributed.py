"""Process-group setup from torchrun's environment, and cross-rank agreement helpers.

The same script runs unchanged under ``python train.py`` (one process, no process group),
``torchrun --standalone --nproc_per_node=N train.py`` and ``srun torchrun ... train.py``:
torchrun exports ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (plus ``MASTER_ADDR``/``MASTER_PORT``)
to every worker, and that is all this module reads.

Every control-flow decision that may differ between ranks (early stop, skip a step, last step)
must go through :func:`any_rank`; a rank that leaves a loop alone leaves the others blocked in the
next collective (Lightning #379, yolov5 #8345).

Reference: https://pytorch.org/docs/stable/elastic/run.html
"""
from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_ranks",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "is_distributed",
    "setup_distributed",
    "teardown_distributed",
    "unwrap",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class DistInfo(NamedTuple):
    """Where this process sits in the job.

    ``is_main`` is ``rank == 0``: the process that logs, prints and writes checkpoints.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def _default_device(local_rank: int, world_size: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if world_size == 1 and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(
    backend: str | None = None,
    timeout: timedelta | float | None = None,
    device: str | torch.device | None = None,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment, or run alone.

    With ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` all set (torchrun, ``srun torchrun``) the
    default process group is initialised (``env://`` rendezvous) with ``nccl`` when the device is
    CUDA and ``gloo`` otherwise, and the CUDA device is set to ``local_rank``. Without them the
    process runs alone: ``world_size == 1``, no process group, and the device is CUDA, else MPS,
    else the CPU. If a process group already exists it is reused as is.

    Args:
        backend: process-group backend; ``None`` picks ``nccl`` for CUDA and ``gloo`` otherwise.
        timeout: collective timeout (a ``timedelta`` or seconds); ``None`` keeps torch's default
            (10 min for NCCL, 30 min for gloo). A rank that waits longer than this raises instead
            of hanging forever.
        device: force a device (e.g. ``"cpu"`` on a GPU machine); ``None`` picks it as above.

    Returns:
        ``DistInfo(rank, local_rank, world_size, device, is_main)``.
    """
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=float(timeout))
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if present and len(present) != len(_TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        raise ValueError(
            f"environment: expected all of {list(_TORCHRUN_VARS)} (as torchrun sets them), "
            f"got {present} without {missing}"
        )

    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK") if present else rank
    elif present:
        rank, local_rank, world_size = (_env_int(name) for name in _TORCHRUN_VARS)
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(
                f"environment: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, "
                f"got RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}"
            )
    else:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # `srun python train.py` starts N independent single-process runs, almost never intended.
            logger.warning("SLURM_NTASKS > 1 but no torchrun environment: every task trains alone; "
                           "launch with `srun torchrun ...`")
        rank, local_rank, world_size = 0, 0, 1

    device = torch.device(device) if device is not None else _default_device(local_rank, world_size)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)

    if present and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"backend": backend, "rank": rank, "world_size": world_size}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device  # eager communicator: errors surface here, not mid-run
        dist.init_process_group(**kwargs)
        logger.info("initialised %s process group: rank %d/%d on %s", backend, rank, world_size, device)
    return DistInfo(rank, local_rank, world_size, device, rank == 0)


_TEARDOWN_PAUSE_S = 0.2


def teardown_distributed() -> None:
    """Wait for every rank, then destroy the default process group (once, on every rank, at the end).

    The final barrier and the pause after it, with the GIL released, work around a PyTorch
    teardown deadlock seen twice in this project's 2-process gloo test runs (pytorch#56297):
    DDP's reducer keeps a reference to the process group, so the group is destroyed later, from
    a Python dealloc that holds the GIL, and its destructor joins the gloo worker threads; a
    worker still releasing a finished collective's tensors needs the GIL and never returns. After
    the pause the workers are idle, so the later destructor joins them at once. A no-op without
    a process group.
    """
    if not is_distributed():
        return
    barrier()
    time.sleep(_TEARDOWN_PAUSE_S)
    dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a default process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def wrap_ddp(model: nn.Module, info: DistInfo, **kwargs) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel``, or return it unchanged in a single process.

    ``device_ids=[device.index]`` is passed only for CUDA: DDP requires ``device_ids=None`` for
    CPU (and MPS) modules. The model must already be on ``info.device``. Extra keywords go to DDP
    (``find_unused_parameters=True``, ``gradient_as_bucket_view=True`` ...). To use torch.compile,
    compile the returned model (DDP first, so DDPOptimizer can split the graph at bucket bounds).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if info.device.type == "cuda":
        kwargs.setdefault("device_ids", [info.device.index])
    return DistributedDataParallel(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under any DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``).

    Save, EMA and name parameters from this, so state-dict keys carry no ``module.`` or
    ``_orig_mod.`` prefix. Wrappers may be nested in any order (``compile(DDP(m))``,
    ``DDP(compile(m))``). Only these wrappers are stripped: a module of your own that merely
    holds its network under ``.module`` is returned as it is, since its ``forward`` may do more
    than call it. This is the one unwrap of the library (checkpoints, EMA and monitors use it).
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics ...) to every rank, in place.

    Under DDP every rank updates its own buffers during training and DDP copies rank 0's only at
    the start of the next training forward; an evaluation sharded over the ranks needs one model
    everywhere. A no-op without a process group. Call it on every rank.
    """
    if not is_distributed():
        return
    for buffer in unwrap(model).buffers():
        moved = buffer.to(_comm_device(buffer))
        dist.broadcast(moved, src)
        if moved is not buffer:
            buffer.copy_(moved)


def _comm_device(like: torch.Tensor | None = None) -> torch.device:
    if like is not None and like.device.type != "cpu":
        return like.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like is None else like.device


def _reduce(x, op) -> torch.Tensor | float:
    if not is_distributed():
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
        if not t.is_floating_point():
            t = t.double() if op is None else t
        moved = _comm_device(t)
        out = t.to(moved)
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op is None else op)
        if op is None:
            out = out / dist.get_world_size()
        return out.to(x.device)
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    if op is None:
        t = t / dist.get_world_size()
    return t.item()


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """The mean of ``x`` over all ranks (``x`` itself without a process group).

    A tensor gives a new, detached tensor on ``x``'s device (``x`` is never modified in place;
    an integer tensor gives a float64 mean), a Python number gives a float (one host sync).
    Every rank must call it, with the same shape.
    """
    return _reduce(x, None)


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """The sum of ``x`` over all ranks (``x`` itself without a process group)."""
    return _reduce(x, dist.ReduceOp.SUM)


def _flag(flag: bool | torch.Tensor, op) -> bool:
    if isinstance(flag, torch.Tensor):
        if hasattr(flag, "full_tensor"):  # a DTensor (FSDP2 gradients): its value over all shards
            flag = flag.full_tensor()
        if flag.numel() != 1:
            raise ValueError(f"flag: expected a single-element tensor, got shape {tuple(flag.shape)}")
        t = flag.detach().reshape(1).to(torch.int32)
    else:
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    if is_distributed():
        t = t.to(_comm_device(t))
        dist.all_reduce(t, op=op)
    return bool(t.item())


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank if ``flag`` is true on at least one rank.

    Use it for every decision that changes control flow (stop, skip this step, this is the last
    step), so all ranks take the same branch and none is left waiting in a collective. It is a
    collective itself: every rank must call it at the same point. One host sync.
    """
    return _flag(flag, dist.ReduceOp.MAX if is_distributed() else None)


def all_ranks(flag: bool | torch.Tensor) -> bool:
    """True on every rank if ``flag`` is true on all ranks (the dual of :func:`any_rank`)."""
    return _flag(flag, dist.ReduceOp.MIN if is_distributed() else None)


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
