"""Learner callbacks. ``accelerate`` and ``matplotlib`` are imported only when used."""

from fastnca.train.callbacks.checkpoint import (
    CheckpointCB,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from fastnca.train.callbacks.core import (
    BatchSchedCB,
    DeviceCB,
    EpochSchedCB,
    GradNormCB,
    MetricsCB,
)
from fastnca.train.callbacks.precision import (
    AccelerateCB,
    CompileCB,
    MixedPrecision,
    check_autocast,
)
from fastnca.train.callbacks.progress import ProgressCB
from fastnca.train.learner import Callback, TrainCB

__all__ = [
    "AccelerateCB",
    "BatchSchedCB",
    "Callback",
    "CheckpointCB",
    "CompileCB",
    "DeviceCB",
    "EpochSchedCB",
    "GradNormCB",
    "MetricsCB",
    "MixedPrecision",
    "ProgressCB",
    "TrainCB",
    "check_autocast",
    "load_checkpoint",
    "save_checkpoint",
    "unwrap_model",
]
