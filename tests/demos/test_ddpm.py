"""DDPM workload: UNet, procedural data, local Fashion-MNIST reader, ancestral sampler, training."""

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastnca.demos.ddpm import (
    FashionMNIST,
    SyntheticShapes,
    UNet,
    ddpm_dataloader,
    ddpm_sample,
    ddpm_schedule,
    linear_betas,
    timestep_embedding,
)
from fastnca.train.callbacks import MetricsCB
from fastnca.train.learner import DataLoaders, Learner


def test_unet_shapes_call_forms_and_gradients():
    m = UNet(in_channels=3, nfs=(8, 16, 16))
    x, t = torch.randn(2, 3, 12, 20), torch.tensor([0, 999])
    out = m((x, t))
    assert out.shape == x.shape
    torch.testing.assert_close(m(x, t), out)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # the time step matters
    torch.testing.assert_close(m((x, t)), out)
    assert not torch.allclose(m((x, torch.tensor([5, 5]))), out)
    with pytest.raises(ValueError, match="divisible by 4"):
        m((torch.randn(1, 3, 10, 10), torch.tensor([1])))
    with pytest.raises(TypeError, match=r"\(x_t, t\)"):
        m(x)
    assert sum(p.numel() for p in UNet().parameters()) == pytest.approx(1.6e6, rel=0.01)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 3]), 7)
    assert e.shape == (2, 7)
    torch.testing.assert_close(e[0, :3], torch.ones(3))  # cos(0)
    torch.testing.assert_close(e[0, 3:], torch.zeros(4))  # sin(0), then the odd pad


def test_synthetic_shapes():
    ds = SyntheticShapes(64, size=32, channels=2, seed=3)
    x, y = ds[5]
    assert x.shape == (2, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() > -1  # something is drawn
    torch.testing.assert_close(ds[5][0], x)  # deterministic per index
    torch.testing.assert_close(SyntheticShapes(64, channels=2, seed=3)[5][0], x)
    assert not torch.equal(SyntheticShapes(64, channels=2, seed=4)[5][0], x)
    labels = {ds[i][1] for i in range(len(ds))}
    assert labels == {0, 1, 2, 3}
    with pytest.raises(IndexError):
        ds[64]
    with pytest.raises(ValueError, match="size"):
        SyntheticShapes(size=2)


def _write_idx(path, arr, gz):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_local_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 1, 4, 1, 5])
    sub = tmp_path / "FashionMNIST" / "raw" if gz else tmp_path  # torchvision layout too
    sub.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    _write_idx(sub / f"t10k-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(sub / f"t10k-labels-idx1-ubyte{ext}", labels, gz)
    ds = FashionMNIST(tmp_path, train=False)
    assert len(ds) == 5
    x, y = ds[2]
    assert x.shape == (1, 32, 32) and y == 4
    want = torch.tensor(imgs[2] / 127.5 - 1, dtype=torch.float32)
    torch.testing.assert_close(x[0, 2:30, 2:30], want)
    assert (x[0, :2] == -1).all() and (x[0, :, 30:] == -1).all()  # padded with black
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*Download"):
        FashionMNIST(tmp_path, train=True)


def test_fashion_mnist_bad_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 12)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(1), False)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        FashionMNIST(tmp_path)


class Oracle(nn.Module):
    """The exact noise predictor E[eps | x_t] for a known data distribution."""

    def __init__(self, sched, x_star=None, s=None):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))  # gives the sampler a device and dtype
        self.ab, self.x_star, self.s = sched.alphabar, x_star, s

    def forward(self, inp):
        x, t = inp
        ab = self.ab[t].view(-1, 1, 1, 1)
        if self.x_star is not None:  # data = one point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1-ab)
            return (x - ab.sqrt() * self.x_star) / (1 - ab).sqrt()
        # data ~ N(0, s^2): eps_hat = sqrt(1-ab) x_t / (ab s^2 + 1 - ab)
        return (1 - ab).sqrt() * x / (ab * self.s**2 + 1 - ab)


def _sched(T):
    return ddpm_schedule(linear_betas(0.1 / T, 20.0 / T, T))  # the 1e-4..0.02 schedule over T


def test_sampler_recovers_a_point_mass_exactly():
    sched = _sched(50)
    x_star = torch.rand(1, 1, 4, 4) * 2 - 1
    out = ddpm_sample(
        Oracle(sched, x_star=x_star),
        (3, 1, 4, 4),
        sched,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, x_star.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_sampler_reproduces_a_gaussian():
    sched, s = _sched(200), 0.5
    xs = ddpm_sample(
        Oracle(sched, s=s),
        (8000, 1, 1, 1),
        sched,
        return_all=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(xs) == 200
    assert xs[0].std().item() == pytest.approx(1.0, rel=0.05)  # starts from noise
    assert xs[-1].mean().item() == pytest.approx(0.0, abs=0.03)
    assert xs[-1].std().item() == pytest.approx(s, rel=0.04)


def test_unet_learns_on_synthetic_data():
    torch.manual_seed(0)
    sched = _sched(100)
    ds = SyntheticShapes(96, size=8)
    dl = ddpm_dataloader(ds, 16, alphabar=sched.alphabar, shuffle=False)
    m = MetricsCB()
    learn = Learner(
        UNet(nfs=(8, 16)),
        DataLoaders(dl, dl),
        F.mse_loss,
        lr=3e-3,
        cbs=[m],
        opt_func=torch.optim.Adam,
    )
    learn.fit(4, valid=False)
    assert m.log[-1]["loss"] < 0.75 * m.log[0]["loss"], m.log
    out = ddpm_sample(learn.model, (2, 1, 8, 8), sched, clip=1.0)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
