"""Data tricks from the lessons: MultDL (repeat each batch), LengthDataset / dummy_dls (train
without data), and the DDPM noisify collate (noise is added while batching, so no DDPM callback).

DDPM forward process (Ho et al. 2020), with ``alphabar_t = prod_{s<=t} (1 - beta_s)``::

    x_t = sqrt(alphabar_t) * x0 + sqrt(1 - alphabar_t) * eps,    eps ~ N(0, I),  t ~ U{0..T-1}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fastnca.learner import DataLoaders

__all__ = [
    "DDPMSchedule",
    "LengthDataset",
    "MultDL",
    "batch_size_of",
    "ddpm_collate",
    "ddpm_dataloader",
    "ddpm_schedule",
    "dummy_dls",
    "linear_betas",
    "noisify",
    "to_cpu",
    "to_device",
]


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


def to_cpu(x):
    """Detach and move every tensor in a (nested) structure to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return to_device(x, "cpu") if isinstance(x, (Mapping, list, tuple)) else x


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
        if isinstance(mult, bool) or not isinstance(mult, int) or mult < 1:
            raise ValueError(f"mult must be an int >= 1 (times each batch is yielded), "
                             f"got {mult!r}")
        if not isinstance(dl, Iterable):
            raise TypeError(f"dl must be an iterable of batches, got {type(dl).__name__}")
        self.dl, self.mult = dl, mult

    def __len__(self) -> int:
        try:
            return len(self.dl) * self.mult
        except TypeError:
            raise TypeError(f"MultDL has no length: its loader ({type(self.dl).__name__}) "
                            "has none") from None

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
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx):
        if not -self.length <= idx < self.length:
            raise IndexError(f"index {idx} out of range for LengthDataset({self.length})")
        return 0, 0


def dummy_dls(n: int = 100, batch_size: int = 1) -> DataLoaders:
    """DataLoaders of ``n`` training batches and one validation batch of dummy items."""
    return DataLoaders(DataLoader(LengthDataset(n * batch_size), batch_size=batch_size),
                       DataLoader(LengthDataset(batch_size), batch_size=batch_size))


# ----- DDPM -----
class DDPMSchedule(NamedTuple):
    """Per-step tensors, each (T,) float32: beta, alpha = 1 - beta, alphabar = cumprod(alpha),
    sigma = sqrt(beta) (the sampler's noise scale, as in the lesson)."""

    beta: torch.Tensor
    alpha: torch.Tensor
    alphabar: torch.Tensor
    sigma: torch.Tensor


def linear_betas(beta_min: float = 1e-4, beta_max: float = 0.02,
                 n_steps: int = 1000) -> torch.Tensor:
    """``beta_t`` linearly spaced from ``beta_min`` to ``beta_max``: (n_steps,) float32."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    if not 0 < beta_min <= beta_max < 1:
        raise ValueError(f"need 0 < beta_min <= beta_max < 1, got beta_min={beta_min}, "
                         f"beta_max={beta_max}")
    return torch.linspace(beta_min, beta_max, n_steps, dtype=torch.float64).float()


def ddpm_schedule(betas: torch.Tensor | None = None) -> DDPMSchedule:
    """alpha, alphabar (cumulative product computed in float64) and sigma from ``betas``."""
    betas = linear_betas() if betas is None else torch.as_tensor(betas)
    if betas.dim() != 1 or not betas.is_floating_point():
        raise ValueError(f"betas must be a 1-D float tensor, got {betas.dtype} shape "
                         f"{tuple(betas.shape)}")
    b = betas.double()
    return DDPMSchedule(b.float(), (1 - b).float(), torch.cumprod(1 - b, 0).float(),
                        b.sqrt().float())


def noisify(x0: torch.Tensor, alphabar: torch.Tensor, t: torch.Tensor | None = None,
            generator: torch.Generator | None = None):
    """``((x_t, t), eps)``: x0 (B, ...) noised to a random step ``t`` (B,) int64 of
    ``len(alphabar)``; ``x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps``; eps ~ N(0, I).

    Everything is made on x0's device; ``x_t`` and ``eps`` have x0's dtype."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise TypeError(f"x0 must be a floating tensor (B, ...), got "
                        f"{getattr(x0, 'dtype', type(x0).__name__)}")
    alphabar = torch.as_tensor(alphabar)
    if alphabar.dim() != 1 or len(alphabar) < 1:
        raise ValueError(f"alphabar must be a 1-D tensor of T >= 1 steps, got shape "
                         f"{tuple(alphabar.shape)}")
    n, dev = x0.shape[0], x0.device
    if t is None:
        t = torch.randint(0, len(alphabar), (n,), generator=generator, dtype=torch.long)
    t = torch.as_tensor(t, dtype=torch.long)
    if t.shape != (n,):
        raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev, x0.dtype)
    ab = alphabar.to(torch.float32)[t.cpu()].to(dev).reshape(-1, *([1] * (x0.dim() - 1)))
    xt = (ab.sqrt() * x0.float() + (1 - ab).sqrt() * eps.float()).to(x0.dtype)
    return (xt, t.to(dev)), eps


def _images_of(batch):
    """The image tensor of a collated batch: itself, the first item of a tuple/list, or the
    'image'/'img'/first value of a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for k in ("image", "img", "x"):
            if k in batch:
                return batch[k]
        return next(iter(batch.values()))
    if isinstance(batch, (list, tuple)) and batch:
        return _images_of(batch[0])
    raise TypeError(f"ddpm_collate: cannot find images in a batch of type {type(batch).__name__}")


def ddpm_collate(batch, alphabar: torch.Tensor):
    """``default_collate`` then ``noisify`` of the images: a batch ``((x_t, t), eps)``, ready for
    TrainCB (``model((x_t, t))`` vs ``eps``). Labels, if any, are dropped."""
    return noisify(_images_of(default_collate(batch)), alphabar)


def ddpm_dataloader(ds, batch_size: int, alphabar: torch.Tensor | None = None, shuffle: bool = True,
                    num_workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader over ``ds`` whose batches are ``((x_t, t), eps)`` (see ``ddpm_collate``);
    ``alphabar`` defaults to the linear schedule 1e-4..0.02 over 1000 steps."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if alphabar is None:
        alphabar = ddpm_schedule(linear_betas()).alphabar
    return DataLoader(ds, batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=partial(ddpm_collate, alphabar=alphabar), **kwargs)
