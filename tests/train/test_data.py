"""Data tricks: MultDL, LengthDataset/dummy_dls, DDPM schedule, noisify, ddpm_collate."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastnca.demos.ddpm import ddpm_collate, ddpm_dataloader, ddpm_schedule, linear_betas, noisify
from fastnca.train.data import LengthDataset, MultDL, batch_size_of, dummy_dls, to_device


@pytest.mark.parametrize("mult", [1, 2, 3])
def test_multdl_yields_each_batch_mult_times_in_order(mult):
    dl = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3)  # batches of 3, 3, 3, 1
    batches = list(MultDL(dl, mult))
    assert len(MultDL(dl, mult)) == len(dl) * mult == len(batches)
    plain = [b[0].tolist() for b in dl]
    assert [b[0].tolist() for b in batches] == [b for b in plain for _ in range(mult)]
    # each repeat is the very same batch object (no reloading)
    for i in range(0, len(batches), mult):
        assert all(batches[i + k] is batches[i] for k in range(mult))


def test_multdl_any_iterable():
    assert list(MultDL([1, 2], 2)) == [1, 1, 2, 2] and len(MultDL([1, 2], 3)) == 6
    gen = MultDL((i for i in range(2)), 2)
    with pytest.raises(TypeError, match="no length"):
        len(gen)
    assert list(gen) == [0, 0, 1, 1]


@pytest.mark.parametrize("mult", [0, -1, 1.5, True, "2"])
def test_multdl_bad_mult(mult):
    with pytest.raises(ValueError, match="mult: expected a positive int"):
        MultDL([1], mult)


def test_multdl_not_iterable():
    with pytest.raises(TypeError, match="dl must be an iterable"):
        MultDL(3, 2)


def test_length_dataset_and_dummy_dls():
    ds = LengthDataset(5)
    assert len(ds) == 5 and ds[4] == (0, 0)
    with pytest.raises(IndexError):
        ds[5]
    dls = dummy_dls(7)
    assert len(dls.train) == 7 and len(dls.valid) == 1
    assert [len(b[0]) for b in dls.train] == [1] * 7
    with pytest.raises(ValueError, match="length"):
        LengthDataset(-1)


def test_linear_betas_and_schedule():
    b = linear_betas(1e-4, 0.02, 1000)
    assert b.shape == (1000,) and b.dtype == torch.float32
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(b[1:] - b[:-1], torch.full((999,), 0.0199 / 999), atol=1e-8, rtol=0)
    s = ddpm_schedule(b)
    torch.testing.assert_close(s.alpha, 1 - b)
    torch.testing.assert_close(s.alphabar, torch.cumprod(1 - b.double(), 0).float())
    torch.testing.assert_close(s.sigma, b.sqrt())
    assert 0 < s.alphabar[-1] < 1e-4  # nearly pure noise at T
    with pytest.raises(ValueError, match="beta_min"):
        linear_betas(0.1, 0.01)
    with pytest.raises(ValueError, match="n_steps"):
        linear_betas(n_steps=0)


def test_noisify_formula_shapes_and_dtype():
    ab = ddpm_schedule(linear_betas()).alphabar
    x0 = torch.randn(6, 2, 5, 3, dtype=torch.float64)
    (xt, t), eps = noisify(x0, ab)
    assert xt.shape == eps.shape == x0.shape and xt.dtype == eps.dtype == torch.float64
    assert t.shape == (6,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    a = ab[t].double().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6, rtol=1e-6)
    (xt2, t2), _ = noisify(x0.float(), ab, t=torch.tensor([0, 1, 2, 3, 4, 999]))
    assert t2.tolist() == [0, 1, 2, 3, 4, 999] and xt2.dtype == torch.float32
    with pytest.raises(ValueError, match="t must have shape"):
        noisify(x0, ab, t=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="x0 must be a floating"):
        noisify(torch.zeros(2, 3, dtype=torch.long), ab)


@pytest.mark.parametrize("step", [10, 500, 990])
def test_noisify_statistics(step):
    """For a fixed x0 = c and step t: E[x_t] = sqrt(ab_t) c, Var[x_t] = 1 - ab_t; eps ~ N(0, 1)."""
    ab = ddpm_schedule(linear_betas()).alphabar
    g = torch.Generator().manual_seed(1)
    n, c = 20000, 0.7
    x0 = torch.full((n, 1, 2, 2), c)
    (xt, _), eps = noisify(x0, ab, t=torch.full((n,), step), generator=g)
    a = ab[step].item()
    se = (1 - a) ** 0.5 / (4 * n) ** 0.5  # standard error of the mean
    assert xt.mean().item() == pytest.approx(a**0.5 * c, abs=5 * se)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.03)
    assert eps.mean().item() == pytest.approx(0, abs=0.03) and eps.std().item() == pytest.approx(
        1, rel=0.03
    )


def test_noisify_random_steps_cover_range():
    ab = ddpm_schedule(linear_betas(n_steps=10)).alphabar
    (_, t), _ = noisify(torch.zeros(2000, 1), ab, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert counts.min() > 120 and counts.max() < 280  # ~uniform over the 10 steps


@pytest.mark.parametrize("kind", ["tuple", "dict", "tensor"])
def test_ddpm_collate_structure(kind):
    ab = ddpm_schedule(linear_betas()).alphabar
    imgs = [torch.randn(1, 4, 4) for _ in range(3)]
    items = {
        "tuple": [(im, 7) for im in imgs],
        "dict": [{"label": 1, "image": im} for im in imgs],
        "tensor": imgs,
    }[kind]
    (xt, t), eps = ddpm_collate(items, ab)
    assert xt.shape == eps.shape == (3, 1, 4, 4) and t.shape == (3,)
    a = ab[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * torch.stack(imgs) + (1 - a).sqrt() * eps)


def test_ddpm_dataloader():
    ds = TensorDataset(torch.rand(10, 1, 4, 4) * 2 - 1, torch.zeros(10))
    dl = ddpm_dataloader(ds, 4, shuffle=False)
    batches = list(dl)
    assert [b[0][0].shape[0] for b in batches] == [4, 4, 2]
    (xt, t), eps = batches[0]
    assert xt.shape == eps.shape == (4, 1, 4, 4) and t.dtype == torch.long
    pickle.dumps(dl.collate_fn)  # picklable: works with num_workers > 0
    with pytest.raises(ValueError, match="batch_size"):
        ddpm_dataloader(ds, 0)


def test_helpers():
    b = ((torch.zeros(5, 2), torch.ones(5)), {"y": torch.zeros(5)}, "s")
    assert batch_size_of(b) == 5 and batch_size_of((0, 0)) == 1
    moved = to_device(b, "cpu")
    assert moved[2] == "s" and isinstance(moved[0], tuple) and moved[1]["y"].shape == (5,)
