"""A small DDPM workload: the noise schedule, a loader that noisifies inside its collate function
(the lesson's trick: no DDPM callback), a UNet, a procedural 32x32 image set, a local Fashion-MNIST
reader and the ancestral sampler. It is the second workload of the training-strategy benchmarks.

DDPM forward process (Ho et al. 2020), with ``alphabar_t = prod_{s<=t} (1 - beta_s)``::

    x_t = sqrt(alphabar_t) * x0 + sqrt(1 - alphabar_t) * eps,    eps ~ N(0, I),  t ~ U{0..T-1}

``ddpm_dataloader`` batches are ``((x_t, t), eps)``; the UNet predicts eps from ``(x_t, t)``.
Images are in [-1, 1].
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fastnca._checks import check_int

__all__ = [
    "DDPMSchedule",
    "FashionMNIST",
    "SyntheticShapes",
    "UNet",
    "ddpm_collate",
    "ddpm_dataloader",
    "ddpm_sample",
    "ddpm_schedule",
    "linear_betas",
    "noisify",
    "timestep_embedding",
]


# ----- schedule and the noisifying collate -----
class DDPMSchedule(NamedTuple):
    """Per-step tensors, each (T,) float32: beta, alpha = 1 - beta, alphabar = cumprod(alpha),
    sigma = sqrt(beta) (the sampler's noise scale, as in the lesson)."""

    beta: torch.Tensor
    alpha: torch.Tensor
    alphabar: torch.Tensor
    sigma: torch.Tensor


def linear_betas(
    beta_min: float = 1e-4, beta_max: float = 0.02, n_steps: int = 1000
) -> torch.Tensor:
    """``beta_t`` linearly spaced from ``beta_min`` to ``beta_max``: (n_steps,) float32."""
    check_int("n_steps", n_steps, 1)
    if not 0 < beta_min <= beta_max < 1:
        raise ValueError(
            f"need 0 < beta_min <= beta_max < 1, got beta_min={beta_min}, beta_max={beta_max}"
        )
    return torch.linspace(beta_min, beta_max, n_steps, dtype=torch.float64).float()


def ddpm_schedule(betas: torch.Tensor | None = None) -> DDPMSchedule:
    """alpha, alphabar (cumulative product computed in float64) and sigma from ``betas``."""
    betas = linear_betas() if betas is None else torch.as_tensor(betas)
    if betas.dim() != 1 or not betas.is_floating_point():
        raise ValueError(
            f"betas must be a 1-D float tensor, got {betas.dtype} shape {tuple(betas.shape)}"
        )
    b = betas.double()
    return DDPMSchedule(
        b.float(), (1 - b).float(), torch.cumprod(1 - b, 0).float(), b.sqrt().float()
    )


def noisify(
    x0: torch.Tensor,
    alphabar: torch.Tensor,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """``((x_t, t), eps)``: x0 (B, ...) noised to a random step ``t`` (B,) int64 of
    ``len(alphabar)``; ``x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps``; eps ~ N(0, I).

    Everything is made on x0's device; ``x_t`` and ``eps`` have x0's dtype."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise TypeError(
            f"x0 must be a floating tensor (B, ...), got {getattr(x0, 'dtype', type(x0).__name__)}"
        )
    alphabar = torch.as_tensor(alphabar)
    if alphabar.dim() != 1 or len(alphabar) < 1:
        raise ValueError(
            f"alphabar must be a 1-D tensor of T >= 1 steps, got shape {tuple(alphabar.shape)}"
        )
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


def ddpm_dataloader(
    ds,
    batch_size: int,
    alphabar: torch.Tensor | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    **kwargs,
) -> DataLoader:
    """A DataLoader over ``ds`` whose batches are ``((x_t, t), eps)`` (see ``ddpm_collate``);
    ``alphabar`` defaults to the linear schedule 1e-4..0.02 over 1000 steps."""
    check_int("batch_size", batch_size, 1)
    if alphabar is None:
        alphabar = ddpm_schedule(linear_betas()).alphabar
    return DataLoader(
        ds,
        batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=partial(ddpm_collate, alphabar=alphabar),
        **kwargs,
    )


# ----- model -----
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t w_k), sin(t w_k)], w_k = P^(-k/half)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    a = t.float()[:, None] * w[None]
    emb = torch.cat([a.cos(), a.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + time embedding (per channel), GroupNorm-SiLU-conv3x3, + skip."""

    def __init__(self, ni: int, nf: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(ni), nn.Conv2d(ni, nf, 3, padding=1)
        self.emb = nn.Linear(t_dim, nf)
        self.norm2, self.conv2 = _norm(nf), nn.Conv2d(nf, nf, 3, padding=1)
        self.skip = nn.Conv2d(ni, nf, 1) if ni != nf else nn.Identity()

    def forward(self, x, temb):  # x: (B, ni, H, W), temb: (B, t_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small noise-prediction UNet: ``model((x_t, t))`` or ``model(x_t, t)`` -> eps, same shape
    as x_t (B, C, H, W) with H, W divisible by 2**(len(nfs) - 1).

    One ResBlock per level on the way down (strided-conv downsampling) and up (nearest upsampling
    + conv), skip connections by concatenation, sinusoidal time embedding through a 2-layer MLP.
    The default (nfs=(32, 64, 128), 1 channel) has 1.6 M parameters.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        nfs: tuple[int, ...] = (32, 64, 128),
    ):
        super().__init__()
        if not nfs or any(int(c) < 1 for c in nfs):
            raise ValueError(f"nfs must be a non-empty tuple of channel counts >= 1, got {nfs!r}")
        nfs = tuple(int(c) for c in nfs)
        out_channels = in_channels if out_channels is None else out_channels
        self.nfs, t_dim = nfs, 4 * nfs[0]
        self.t_mlp = nn.Sequential(nn.Linear(nfs[0], t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_channels, nfs[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        prev = nfs[0]
        for i, c in enumerate(nfs):
            self.down.append(ResBlock(prev, c, t_dim))
            last = i == len(nfs) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, padding=1))
            prev = c
        self.mid = ResBlock(prev, prev, t_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(nfs))):
            self.up.append(ResBlock(prev + c, c, t_dim))
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
            prev = c
        self.norm_out, self.conv_out = _norm(prev), nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, x, t=None):
        if t is None:
            if not (isinstance(x, (tuple, list)) and len(x) == 2):
                raise TypeError("UNet takes (x_t, t) as one tuple or as two arguments")
            x, t = x
        n = 2 ** (len(self.nfs) - 1)
        if x.dim() != 4 or x.shape[-1] % n or x.shape[-2] % n:
            raise ValueError(
                f"x_t must be (B, C, H, W) with H, W divisible by {n}, got {tuple(x.shape)}"
            )
        temb = self.t_mlp(timestep_embedding(t, self.nfs[0]).to(x.dtype))
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for block, up in zip(self.up, self.upsample, strict=True):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----- data -----
class SyntheticShapes(Dataset):
    """``n`` procedural images (C, size, size) in [-1, 1] with a label: 0 disk, 1 square,
    2 ring, 3 stripes; random position, size, angle and (per channel) intensity. Item ``i`` is
    the same on every call and machine (its own seeded generator); nothing is downloaded."""

    KINDS = ("disk", "square", "ring", "stripes")

    def __init__(self, n: int = 4096, size: int = 32, channels: int = 1, seed: int = 0):
        for name, v, lo in (("n", n, 0), ("size", size, 4), ("channels", channels, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.n, self.size, self.channels, self.seed = n, size, channels, seed
        lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self._yy, self._xx = torch.meshgrid(lin, lin, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for SyntheticShapes(n={self.n})")
        i %= self.n
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        kind = int(torch.randint(len(self.KINDS), (1,), generator=g))
        cx, cy, r, ang, f = torch.rand(5, generator=g).tolist()
        cx, cy, r = 0.25 + 0.5 * cx, 0.25 + 0.5 * cy, 0.12 + 0.2 * r
        dx, dy = self._xx - cx, self._yy - cy
        if kind == 0:
            m = (dx.square() + dy.square()) < r * r
        elif kind == 1:
            c, s = math.cos(ang * math.pi / 2), math.sin(ang * math.pi / 2)
            m = torch.maximum((c * dx + s * dy).abs(), (c * dy - s * dx).abs()) < r * 0.8
        elif kind == 2:
            m = ((dx.square() + dy.square()).sqrt() - r).abs() < 0.05
        else:
            a = ang * math.pi
            m = torch.sin(2 * math.pi * (2 + 3 * f) * (dx * math.cos(a) + dy * math.sin(a))) > 0
        level = 0.4 + 0.6 * torch.rand(self.channels, 1, 1, generator=g)
        img = m.float()[None] * level  # (C, size, size) in [0, 1]
        return img * 2 - 1, kind


_FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` is decompressed): an unsigned-byte array."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    nd = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(nd))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd)
    if data.size != math.prod(dims):
        raise ValueError(
            f"{path}: header says {dims} ({math.prod(dims)} bytes), file has {data.size}"
        )
    return data.reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST read from local IDX files (never downloaded): ``root`` holds
    ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]`` (or the t10k files
    with ``train=False``), directly or under ``FashionMNIST/raw`` (torchvision's layout).
    Items: ``(x, label)``, x (1, pad_to, pad_to) float32 in [-1, 1], padded with -1 (black)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, pad_to: int = 32):
        root = Path(root)
        found = []
        for name in _FMNIST_FILES[train]:
            cands = [
                d / (name + ext)
                for d in (root, root / "FashionMNIST" / "raw")
                for ext in ("", ".gz")
            ]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST file {name}[.gz] not found in {root} (or {root}/FashionMNIST/"
                    "raw). Download the four IDX files from github.com/zalandoresearch/"
                    "fashion-mnist yourself, or train on fastnca.demos.ddpm.SyntheticShapes()"
                )
            found.append(hit)
        images, labels = read_idx(found[0]), read_idx(found[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{found[0]} / {found[1]}: expected (N, H, W) images and N labels, "
                f"got {images.shape} and {labels.shape}"
            )
        h, w = images.shape[1:]
        if pad_to < max(h, w):
            raise ValueError(f"pad_to must be >= the image size {max(h, w)}, got {pad_to}")
        self.images, self.labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        self.pad = (left, pad_to - w - left, top, pad_to - h - top)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float()[None] / 127.5 - 1.0
        return F.pad(x, self.pad, value=-1.0), int(self.labels[i])


# ----- sampling -----
@torch.no_grad()
def ddpm_sample(
    model: nn.Module,
    shape,
    sched: DDPMSchedule | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip: float | None = None,
    return_all: bool = False,
):
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2, sigma_t^2 = beta_t, as in the lesson).

    From x_T ~ N(0, I), for t = T-1 .. 0 with eps = model((x_t, t)):
        x0_hat  = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)           (clamped to +-clip if given)
        x_{t-1} = x0_hat sqrt(ab_{t-1}) beta_t / (1 - ab_t)
                  + x_t sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) + sigma_t z,   z ~ N(0, I)
    with ab_{-1} = 1 and z = 0 at t = 0. ``sched``: a DDPMSchedule or betas (default linear
    1e-4..0.02, 1000 steps). Runs on the model's device and dtype; returns x_0 (float32, CPU)
    or, with ``return_all``, the list of every x_t.
    """
    if sched is None:
        sched = ddpm_schedule(linear_betas())
    elif not isinstance(sched, DDPMSchedule):
        sched = ddpm_schedule(sched)
    p = next(model.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    shape = tuple(shape)
    x = torch.randn(shape, generator=generator).to(dev, dt)
    beta, alpha, ab, sigma = (v.double().tolist() for v in sched)
    out = []
    for t in reversed(range(len(beta))):
        tb = torch.full((shape[0],), t, dtype=torch.long, device=dev)
        eps = model((x, tb)).to(dt)
        ab_prev = ab[t - 1] if t > 0 else 1.0
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        x = x0 * (math.sqrt(ab_prev) * beta[t] / (1 - ab[t])) + x * (
            math.sqrt(alpha[t]) * (1 - ab_prev) / (1 - ab[t])
        )
        if t > 0:
            x = x + sigma[t] * torch.randn(shape, generator=generator).to(dev, dt)
        if return_all:
            out.append(x.float().cpu())
    return out if return_all else x.float().cpu()
