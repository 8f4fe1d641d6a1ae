"""fastnca.losses: sliced Wasserstein, content and overflow losses; re-exports."""

import pytest
import torch
import torch.nn.functional as F

import fastnca
from fastnca import losses
from fastnca.losses import content_loss, overflow_loss, sliced_wasserstein_loss

F64 = torch.float64


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def w2_by_transport(a, b):
    """Squared 1-D Wasserstein-2 distance of two equal-size empirical distributions from its
    definition, the cheapest matching over every permutation (no sorting): an independent
    reference for the sort-based loss. a, b: (N,) with N small."""
    import itertools

    return min(((a - b[list(p)]) ** 2).mean() for p in itertools.permutations(range(len(b))))


def swd_by_transport(f, t, dirs):
    """One layer: mean over images and directions of w2_by_transport of the projections."""
    B, C = f.shape[:2]
    pf = torch.einsum("pc,bcn->bpn", dirs, f.reshape(B, C, -1))
    pt = torch.einsum("pc,bcn->bpn", dirs, t.reshape(t.shape[0], C, -1)).expand_as(pf)
    return torch.stack(
        [w2_by_transport(pf[b, p], pt[b, p]) for b in range(B) for p in range(dirs.shape[0])]
    ).mean()


def test_reexports():
    assert losses.style_loss is fastnca.style_loss and losses.gram is fastnca.gram
    assert losses.StyleLoss is fastnca.StyleLoss
    assert fastnca.sliced_wasserstein_loss is sliced_wasserstein_loss


def test_swd_is_the_optimal_transport_cost_and_is_reproducible():
    f = [torch.randn(2, 5, 2, 3, dtype=F64), torch.randn(2, 7, 3, 2, dtype=F64)]
    t = [torch.randn(1, 5, 3, 2, dtype=F64), torch.randn(2, 7, 2, 3, dtype=F64)]
    loss = sliced_wasserstein_loss(f, t, n_projections=3, weights=[1.0, 0.5], generator=_gen())
    g = _gen()  # the loss's directions: unit columns of randn(C, P) from the same generator
    d0 = torch.randn(5, 3, generator=g, dtype=F64)
    d1 = torch.randn(7, 3, generator=g, dtype=F64)
    d0, d1 = (d0 / d0.norm(dim=0)).T, (d1 / d1.norm(dim=0)).T
    want = swd_by_transport(f[0], t[0], d0) + 0.5 * swd_by_transport(f[1], t[1], d1)
    torch.testing.assert_close(loss, want)
    f = [torch.randn(2, 5, 4, 3, dtype=F64), torch.randn(2, 7, 3, 3, dtype=F64)]
    t = [torch.randn(1, 5, 6, 5, dtype=F64), torch.randn(2, 7, 3, 3, dtype=F64)]
    assert sliced_wasserstein_loss(f, t, generator=_gen(3)) == sliced_wasserstein_loss(
        f, t, generator=_gen(3)
    )
    torch.manual_seed(5)
    a = sliced_wasserstein_loss(f, t)
    torch.manual_seed(5)
    assert sliced_wasserstein_loss(f, t) == a
    assert sliced_wasserstein_loss(f, t) != a  # fresh directions on each call


def test_swd_zero_identical_and_permutation_invariant():
    f = torch.randn(2, 6, 5, 7)
    assert sliced_wasserstein_loss([f], [f.clone()], generator=_gen()).item() == 0.0
    t = torch.randn(2, 6, 5, 7)
    perm = torch.randperm(35)
    fp = f.reshape(2, 6, 35)[:, :, perm].reshape(2, 6, 5, 7)
    a = sliced_wasserstein_loss(f, t, generator=_gen())
    b = sliced_wasserstein_loss(fp, t, generator=_gen())
    assert a.item() > 0
    torch.testing.assert_close(a, b)
    # A target with the same values on a larger grid (each pixel twice): interpolation of the
    # sorted target resamples the same distribution, so the loss is (almost) zero.
    t2 = f.repeat_interleave(2, dim=3)
    assert sliced_wasserstein_loss(f, t2, generator=_gen()).item() < 0.05 * a.item()


def test_swd_gradcheck():
    f = torch.randn(2, 3, 3, 4, dtype=F64, requires_grad=True)
    t = torch.randn(1, 3, 5, 3, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda x: sliced_wasserstein_loss(x, t, n_projections=4, generator=_gen()), (f,)
    )


def test_swd_decreases_under_optimisation():
    target = torch.randn(1, 4, 8, 8) * torch.tensor([2.0, 0.5, 1.0, 3.0])[:, None, None] + 1.0
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    before = sliced_wasserstein_loss(x, target, n_projections=64, generator=_gen(7)).item()
    for _ in range(30):
        opt.zero_grad()
        sliced_wasserstein_loss(x, target).backward()
        opt.step()
    after = sliced_wasserstein_loss(x, target, n_projections=64, generator=_gen(7)).item()
    assert after < 0.3 * before


def test_swd_half_and_compile():
    f = torch.randn(2, 4, 5, 5).bfloat16()
    assert sliced_wasserstein_loss(f, f, generator=_gen()).dtype == torch.float32
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    cf = torch.compile(
        lambda a, b: sliced_wasserstein_loss([a], [b], n_projections=8), fullgraph=True
    )
    a = torch.randn(2, 4, 5, 6, requires_grad=True)
    b = torch.randn(1, 4, 7, 3)
    torch.manual_seed(3)
    with torch._inductor.config.patch(fallback_random=True):  # eager's random directions
        loss = cf(a, b)
    loss.backward()
    assert torch.isfinite(loss) and a.grad.abs().sum() > 0
    assert counters["stats"]["unique_graphs"] == 1
    ae = a.detach().clone().requires_grad_()
    torch.manual_seed(3)  # the same directions, eagerly
    eager = sliced_wasserstein_loss([ae], [b], n_projections=8)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(a.grad, ae.grad)


def test_content_loss():
    f = [torch.randn(2, 3, 4, 5), torch.randn(2, 6, 2, 2)]
    t = [torch.randn(1, 3, 4, 5), torch.randn(2, 6, 2, 2)]
    want = ((f[0] - t[0]) ** 2).mean() + 0.1 * ((f[1] - t[1]) ** 2).mean()
    torch.testing.assert_close(content_loss(f, t, [1.0, 0.1]), want)
    torch.testing.assert_close(content_loss(f[1], t[1]), F.mse_loss(f[1], t[1]))
    with pytest.raises(ValueError, match=r"target_feats\[0\] has shape \(1, 3, 4, 4\)"):
        content_loss(f, [torch.zeros(1, 3, 4, 4), t[1]])


def test_overflow_loss():
    x = torch.tensor([[-3.0, -1.0, 0.5], [1.0, 1.5, 0.0]], requires_grad=True)
    loss = overflow_loss(x)
    assert loss.item() == 2.5
    assert overflow_loss(x, normalise=True).item() == pytest.approx(2.5 / 6)
    loss.backward()
    assert x.grad.tolist() == [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(TypeError, match="x must be a floating"):
        overflow_loss(torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(
    "feats, targets, kw, err, match",
    [
        ([], [], {}, ValueError, "feats is empty"),
        (
            [torch.zeros(1, 3, 2, 2)],
            [torch.zeros(1, 4, 2, 2)],
            {},
            ValueError,
            r"target_feats\[0\] has 4 channels but feats\[0\] has 3",
        ),
        (
            [torch.zeros(2, 3, 2, 2)],
            [torch.zeros(3, 3, 2, 2)],
            {},
            ValueError,
            r"target_feats\[0\] has batch 3 but feats\[0\] has batch 2",
        ),
        (
            [torch.zeros(1, 3, 2, 2)] * 2,
            [torch.zeros(1, 3, 2, 2)],
            {},
            ValueError,
            "target_feats has 1 layers but feats has 2",
        ),
        (
            [torch.zeros(3, 2, 2)],
            [torch.zeros(1, 3, 2, 2)],
            {},
            ValueError,
            r"feats\[0\] must be 4-D",
        ),
        (
            [torch.zeros(1, 3, 2, 2)],
            [torch.zeros(1, 3, 2, 2, dtype=torch.int64)],
            {},
            TypeError,
            r"target_feats\[0\] must be a floating",
        ),
        (
            [torch.zeros(1, 3, 2, 2)],
            [torch.zeros(1, 3, 2, 2)],
            {"weights": [1.0, 2.0]},
            ValueError,
            "weights has 2 entries but feats has 1 layers",
        ),
        (
            [torch.zeros(1, 3, 2, 2)],
            [torch.zeros(1, 3, 2, 2)],
            {"n_projections": 0},
            ValueError,
            "n_projections: expected a positive int",
        ),
    ],
)
def test_swd_bad_inputs(feats, targets, kw, err, match):
    with pytest.raises(err, match=match):
        sliced_wasserstein_loss(feats, targets, **kw)
