"""The training kit every example's loop is assembled from. Every name is re-exported flat here."""

from .accumulation import GradientAccumulator, MicroBatch
from .checkpoint import CheckpointError, CheckpointManager, CorruptCheckpointWarning
from .cli import CONTROL_FLAGS, add_common_args, kill_point, main_print, per_rank_batch, pyplot, run_config
from .clipping import adaptive_clip_grad_, clip_gradients, grad_norm, unitwise_norm
from .dashboard import Dashboard
from .distributed import (
    DistInfo,
    all_ranks,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_buffers,
    is_distributed,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_ddp,
)
from .early_stopping import EarlyStopping
from .ema import EMA
from .gather import gather_rows, predict_rows, shard_rows
from .metrics_log import MetricsLog, read_metrics
from .monitors import ActivationMonitor, ActivationStats, GradNormMonitor, NonFiniteGuard
from .precision import PRECISIONS, autocast, default_precision, make_grad_scaler, precision_dtype, scaler_step
from .run import RUN_FILE, RunDir, RunFolderError
from .schedules import Plateau, apply_lr, one_cycle, warmup_cosine
from .sharded_checkpoint import export_weights
from .sharding import gathered, is_sharded, mixed_precision_policy, shard_model
from .stepper import Stepper
from .sweeps import SweepSummary, seed_everything, sweep_summary

__all__ = [
    "CONTROL_FLAGS",
    "EMA",
    "PRECISIONS",
    "RUN_FILE",
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
    "RunDir",
    "RunFolderError",
    "Stepper",
    "SweepSummary",
    "adaptive_clip_grad_",
    "add_common_args",
    "all_ranks",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "apply_lr",
    "autocast",
    "barrier",
    "broadcast_buffers",
    "clip_gradients",
    "default_precision",
    "export_weights",
    "gather_rows",
    "gathered",
    "grad_norm",
    "is_distributed",
    "is_sharded",
    "kill_point",
    "main_print",
    "make_grad_scaler",
    "mixed_precision_policy",
    "one_cycle",
    "per_rank_batch",
    "precision_dtype",
    "predict_rows",
    "pyplot",
    "read_metrics",
    "run_config",
    "scaler_step",
    "seed_everything",
    "setup_distributed",
    "shard_model",
    "shard_rows",
    "sweep_summary",
    "teardown_distributed",
    "unitwise_norm",
    "unwrap",
    "warmup_cosine",
    "wrap_ddp",
]
