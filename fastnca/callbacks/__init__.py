"""Learner callbacks. ``accelerate`` and ``matplotlib`` are imported only when used."""

from fastnca.callbacks.checkpoint import (
    CheckpointCB,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from fastnca.callbacks.core import (
    BatchSchedCB,
    DeviceCB,
    EpochSchedCB,
    GradNormCB,
    LRSchedulerCB,
    MetricsCB,
    default_device,
)
from fastnca.callbacks.precision import AccelerateCB, CompileCB, MixedPrecision, check_autocast
from fastnca.callbacks.progress import ProgressCB
from fastnca.learner import Callback, TrainCB

__all__ = [
    "AccelerateCB",
    "BatchSchedCB",
    "Callback",
    "CheckpointCB",
    "CompileCB",
    "DeviceCB",
    "EpochSchedCB",
    "GradNormCB",
    "LRSchedulerCB",
    "MetricsCB",
    "MixedPrecision",
    "ProgressCB",
    "TrainCB",
    "check_autocast",
    "default_device",
    "load_checkpoint",
    "save_checkpoint",
    "unwrap_model",
]
