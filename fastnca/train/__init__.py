"""A small callback Learner in the fast.ai miniai tradition, its callbacks and data tricks.

``learner`` (Learner, Callback, TrainCB, the cancel exceptions), ``callbacks`` (device, metrics,
progress, mixed precision, Accelerate, compile, gradient normalisation, schedulers, checkpoints),
``data`` (DataLoaders, MultDL, dummy_dls, to_device).
"""

from fastnca.train.data import MultDL, dummy_dls
from fastnca.train.learner import Callback, DataLoaders, Learner, TrainCB

__all__ = ["Callback", "DataLoaders", "Learner", "MultDL", "TrainCB", "dummy_dls"]
