"""Data tricks from the lessons: MultDL (repeat each batch), LengthDataset / dummy_dls (train
without data), and moving nested batches between devices. The DDPM noisify collate is in
``fastnca.demos.ddpm``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from fastnca._checks import check_int
from fastnca.train.learner import DataLoaders

__all__ = ["LengthDataset", "MultDL", "batch_size_of", "dummy_dls", "to_device"]


# ----- small helpers (image-free) -----
def to_device(x, device, non_blocking: bool = False):
    """Move every tensor in a (nested) tuple/list/dict to ``device``; other leaves stay as is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(to_device(o, device, non_blocking) for o in x))
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(o, device, non_blocking) for o in x)
    return x


def batch_size_of(batch) -> int:
    """Leading dimension of the first tensor found in a (nested) batch; 1 if there is none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, Iterable) and not isinstance(items, (str, bytes)):
        for o in items:
            if isinstance(o, (torch.Tensor, Mapping, list, tuple)):
                return batch_size_of(o)
    return 1


# ----- MultDL -----
class MultDL:
    """Yield every batch of ``dl`` ``mult`` times in a row: ``len = len(dl) * mult``.

    The lesson's trick for a slow loader (e.g. heavy CPU augmentation on few cores): each loaded
    batch gives ``mult`` optimiser steps. Works with any iterable; ``len`` needs a sized one.
    """

    def __init__(self, dl: Iterable, mult: int = 2):
        check_int("mult", mult, 1)
        if not isinstance(dl, Iterable):
            raise TypeError(f"dl must be an iterable of batches, got {type(dl).__name__}")
        self.dl, self.mult = dl, mult

    def __len__(self) -> int:
        try:
            return len(self.dl) * self.mult
        except TypeError:
            raise TypeError(
                f"MultDL has no length: its loader ({type(self.dl).__name__}) has none"
            ) from None

    def __iter__(self):
        for b in self.dl:
            for _ in range(self.mult):
                yield b

    def __repr__(self):
        return f"MultDL({self.dl!r}, mult={self.mult})"


# ----- training without data -----
class LengthDataset(Dataset):
    """``length`` items of ``(0, 0)``: drives a Learner for ``length`` steps when the model needs
    no data (style transfer, NCA)."""

    def __init__(self, length: int = 1):
        check_int("length", length, 0)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx):
        if not -self.length <= idx < self.length:
            raise IndexError(f"index {idx} out of range for LengthDataset({self.length})")
        return 0, 0


def dummy_dls(n: int = 100, batch_size: int = 1) -> DataLoaders:
    """DataLoaders of ``n`` training batches and one validation batch of dummy items."""
    return DataLoaders(
        DataLoader(LengthDataset(n * batch_size), batch_size=batch_size),
        DataLoader(LengthDataset(batch_size), batch_size=batch_size),
    )


# ----- DDPM -----
