"""The training kit every example's loop is assembled from. Every name is re-exported flat here."""

from .accumulation import GradientAccumulator, MicroBatch
from .checkpoint import CheckpointError, CheckpointManager, CorruptCheckpointWarning
from .clipping import adaptive_clip_grad_, clip_gradients, unitwise_norm
from .dashboard import Dashboard
from .distributed import (
    DistInfo,
    all_ranks,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    is_distributed,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_ddp,
)
from .early_stopping import EarlyStopping
from .ema import EMA
from .metrics_log import MetricsLog, read_metrics
from .monitors import ActivationMonitor, ActivationStats, GradNormMonitor, NonFiniteGuard
from .precision import PRECISIONS, autocast, default_precision, make_grad_scaler, precision_dtype, scaler_step
from .schedules import Plateau, apply_lr, one_cycle, warmup_cosine
from .sweeps import SweepSummary, seed_everything, sweep_summary

__all__ = [
    "EMA",
    "PRECISIONS",
    "ActivationMonitor",
    "ActivationStats",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointWarning",
    "Dashboard",
    "DistInfo",
    "EarlyStopping",
    "GradNormMonitor",
    "GradientAccumulator",
    "MetricsLog",
    "MicroBatch",
    "NonFiniteGuard",
    "Plateau",
    "SweepSummary",
    "adaptive_clip_grad_",
    "all_ranks",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "apply_lr",
    "autocast",
    "barrier",
    "clip_gradients",
    "default_precision",
    "is_distributed",
    "make_grad_scaler",
    "one_cycle",
    "precision_dtype",
    "read_metrics",
    "scaler_step",
    "seed_everything",
    "setup_distributed",
    "sweep_summary",
    "teardown_distributed",
    "unitwise_norm",
    "unwrap",
    "warmup_cosine",
    "wrap_ddp",
]
