"""NCA step options (padding, alive masking, clipping, any filter bank, rotated perception):
nca_step_ref against independent formulas, its gradients (float64 gradcheck), and the public
nca_step (the CPU custom op) against nca_step_ref, forward, gradients and saved bytes."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import STEP_OPTION_SETS, TEXTURE_CLIP, TOL

from fastnca import DISTILL_FILTERS
from fastnca.reference import alive_mask_ref, nca_step_ref, perceive_ref, rotate_filters


def make(B=2, C=5, H=6, W=7, hidden=9, nf=3, dtype=torch.float64, seed=0, alpha=True):
    """Random step arguments. With ``alpha``, channel 3 holds values far from the alive threshold
    0.1 (|a - 0.1| >= 0.05), so finite differences never flip the alive mask; columns 0-2 are
    dead."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = r(B, C, H, W)
    if alpha:
        a = torch.rand(B, H, W, generator=g, dtype=torch.float64)
        x[:, 3] = torch.where(a < 0.6, -a, 0.15 + a).to(dtype)  # ~60% dead cells
        x[:, 3, :, :3] = -a[:, :, :3].to(dtype)  # and a dead band, so some cells die
    k = DISTILL_FILTERS[:nf] if nf <= 4 else torch.randn(nf, 3, 3, generator=g)
    return dict(
        x=x,
        w1=r(hidden, nf * C, scale=0.5),
        b1=r(hidden, scale=0.3),
        w2=r(C, hidden, scale=0.5),
        b2=r(C, scale=0.3),
        mask=torch.rand(B, 1, H, W, generator=g) < 0.6,
        filters=k.to(dtype),
    )


# ------------------------------------------------------------------------- nca_step_ref semantics


def test_defaults_are_the_lesson_step():
    a = make(alpha=False)
    p = perceive_ref(a["x"], a["filters"])
    h = torch.relu(torch.einsum("kj,bjhw->bkhw", a["w1"], p) + a["b1"][:, None, None])
    y = torch.einsum("ck,bkhw->bchw", a["w2"], h) + a["b2"][:, None, None]
    want = a["x"] + y * a["mask"]
    torch.testing.assert_close(nca_step_ref(**a), want, **TOL[torch.float64])


def test_zero_padding_is_conv2d_padding_1():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    k = torch.randn(3, 3, 3, dtype=torch.float64)
    want = F.conv2d(x.reshape(6, 1, 5, 4), k[:, None], padding=1).reshape(2, 9, 5, 4)
    torch.testing.assert_close(perceive_ref(x, k, padding="zeros"), want)
    with pytest.raises(ValueError, match="padding"):
        perceive_ref(x, k, padding="reflect")


def _alive_loop(x, thr, ch, wrap):
    # Independent max over the 3x3 neighbourhood, cell by cell.
    B, _, H, W = x.shape
    out = torch.zeros(B, 1, H, W, dtype=torch.bool)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                vals = []
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        u, v = i + di, j + dj
                        if wrap:
                            vals.append(x[b, ch, u % H, v % W])
                        elif 0 <= u < H and 0 <= v < W:
                            vals.append(x[b, ch, u, v])
                out[b, 0, i, j] = max(vals) > thr
    return out


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_alive_mask_padding_never_wins(padding):
    x = torch.full((1, 4, 4, 5), -1.0, dtype=torch.float64)  # all dead, negative alpha
    x[0, 3, 0, 0] = 0.5  # one living corner cell
    got = alive_mask_ref(x, 0.1, 3, padding)
    assert torch.equal(got, _alive_loop(x, 0.1, 3, padding == "circular"))
    assert got.sum() == (4 if padding == "zeros" else 9)
    x = torch.randn(2, 5, 5, 6, dtype=torch.float64)
    assert torch.equal(
        alive_mask_ref(x, 0.1, 2, padding), _alive_loop(x, 0.1, 2, padding == "circular")
    )
    # Zero padding is never "alive" even with a negative threshold: the border has no ghosts.
    x = torch.full((1, 4, 3, 3), -5.0, dtype=torch.float64)
    assert not alive_mask_ref(x, -1.0, 3, "zeros").any()


def test_alive_masking_kills_isolated_and_keeps_neighbours():
    a = make(B=1, C=4, H=7, W=7, hidden=6, alpha=False)
    a["x"].zero_()
    a["x"][0, 3:, 3, 3] = 1.0  # the authors' seed: one living cell
    out = nca_step_ref(**a, padding="zeros", alive_threshold=0.1)
    pre = alive_mask_ref(a["x"], 0.1)
    new = nca_step_ref(**a, padding="zeros")
    post = alive_mask_ref(new, 0.1)
    torch.testing.assert_close(out, new * (pre & post))
    assert (out[:, :, ~(pre & post)[0, 0]] == 0).all()  # dead cells are exactly 0
    assert pre.sum() == 9


def test_rotation():
    k = DISTILL_FILTERS.double()
    r = rotate_filters(k, math.pi / 2)
    torch.testing.assert_close(r, torch.stack([k[0], -k[2], k[1], k[3]]))
    assert rotate_filters(k, 0.0) is k
    # The perceived gradient (gx, gy) turns by the angle: (c gx - s gy, s gx + c gy).
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    p = perceive_ref(x, k).reshape(2, 3, 4, 6, 5)
    pr = perceive_ref(x, rotate_filters(k, 0.7)).reshape(2, 3, 4, 6, 5)
    c, s = math.cos(0.7), math.sin(0.7)
    torch.testing.assert_close(pr[:, :, 1], c * p[:, :, 1] - s * p[:, :, 2])
    torch.testing.assert_close(pr[:, :, 2], s * p[:, :, 1] + c * p[:, :, 2])
    torch.testing.assert_close(pr[:, :, [0, 3]], p[:, :, [0, 3]])
    with pytest.raises(ValueError, match="F >= 3"):
        rotate_filters(k[:2], 0.3)


def test_clip_ranges():
    a = make(alpha=False)
    huge = {k: (-1e9, 1e9) for k in TEXTURE_CLIP}
    torch.testing.assert_close(nca_step_ref(**a, clip=huge), nca_step_ref(**a))
    # hidden clipped to [0, 0]: the update is the bias alone.
    out = nca_step_ref(**a, clip={"hidden": (0.0, 0.0)})
    torch.testing.assert_close(out, a["x"] + a["b2"][:, None, None] * a["mask"])
    out = nca_step_ref(**a, clip={"update": (-0.01, 0.02), "state": (-1.5, 1.0)})
    assert out.max() <= 1.0 and out.min() >= -1.5
    d = (out - a["x"].clamp(-1.5, 1.0))[a["mask"].expand_as(out) & (a["x"].abs() < 0.9)]
    assert d.max() <= 0.02 + 1e-12 and d.min() >= -0.01 - 1e-12


@pytest.mark.parametrize("nf", [1, 3, 6])
def test_any_filter_bank(nf):
    a = make(nf=nf, alpha=False)
    out = nca_step_ref(**a)
    p = F.conv2d(
        F.pad(a["x"].reshape(-1, 1, 6, 7), (1, 1, 1, 1), mode="circular"), a["filters"][:, None]
    ).reshape(2, 5 * nf, 6, 7)
    h = torch.relu(torch.einsum("kj,bjhw->bkhw", a["w1"], p) + a["b1"][:, None, None])
    y = torch.einsum("ck,bkhw->bchw", a["w2"], h) + a["b2"][:, None, None]
    torch.testing.assert_close(out, a["x"] + y * a["mask"])


OPTION_SETS = {
    **STEP_OPTION_SETS,
    "circular-alive": dict(alive_threshold=0.1, alive_channel=3, clip={"update": (-0.5, 0.5)}),
}


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_reference_gradcheck(opts):
    a = make(B=1, C=4, H=4, W=7, hidden=6)
    leaves = {k: a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")}
    out = nca_step_ref(**a, **opts)
    if opts.get("alive_threshold") is not None:  # masking kills some cells, keeps others
        dead = (out == 0).all(1)
        assert dead.any() and not dead.all()
    if opts.get("clip"):  # the update clip bites somewhere (the others are checked above)
        y = nca_step_ref(**{**a, "mask": torch.ones_like(a["mask"])}) - a["x"]
        lo, hi = opts["clip"]["update"]
        assert ((y < lo) | (y > hi)).any() and ((y > lo) & (y < hi)).any()
    fn = lambda x, w1, b1, w2, b2: nca_step_ref(x, w1, b1, w2, b2, a["mask"], a["filters"], **opts)
    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-7, atol=1e-6)


# ------------------------------------------------------- public nca_step (CPU op) vs reference


def _leaves(a, dtype):
    return {
        k: None if a[k] is None else a[k].to(dtype).clone().requires_grad_()
        for k in ("x", "w1", "b1", "w2", "b2")
    }


def _ref_out_grads(a, g, opts):
    lv = _leaves(a, torch.float64)
    out = nca_step_ref(
        **lv,
        mask=a["mask"].double() if a["mask"].is_floating_point() else a["mask"],
        filters=a["filters"].double(),
        **opts,
    )
    out.backward(g.double())
    return out.detach(), [None if t is None else t.grad for t in lv.values()]


CPU_CASES = {
    **OPTION_SETS,
    "zeros-only": dict(padding="zeros"),
    "angle-only": dict(perception_angle=2.5),
    "clip-each": dict(clip={"perception": (-0.8, None), "hidden": (None, 1.0)}),
}


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("opts", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_cpu_op_float64(opts, float_mask, monkeypatch):
    import fastnca.ops.nca_step_options as mod
    from fastnca.ops import nca_step

    monkeypatch.setattr(mod, "_chunk", lambda: 7)  # several blocks with a ragged last one
    a = make(B=2, C=5, H=5, W=7, hidden=9, nf=4)
    if float_mask:
        a["mask"] = (a["mask"] * torch.rand(a["mask"].shape)).double()
    lv = _leaves(a, torch.float64)
    out = nca_step(
        lv["x"],
        lv["w1"],
        lv["b1"],
        lv["w2"],
        lv["b2"],
        mask=a["mask"],
        filters=a["filters"],
        **opts,
    )
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = _ref_out_grads(a, g, opts)
    torch.testing.assert_close(out.detach(), want, **TOL[torch.float64])
    for name, t, w in zip(("x", "w1", "b1", "w2", "b2"), lv.values(), wgrads, strict=True):
        torch.testing.assert_close(t.grad, w, **TOL[torch.float64], msg=lambda m, n=name: n + m)


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_cpu_op_float32(opts):
    from fastnca.ops import nca_step

    a = make(B=2, C=6, H=6, W=7, hidden=16, nf=4)
    lv = _leaves(a, torch.float32)
    out = nca_step(
        lv["x"],
        lv["w1"],
        lv["b1"],
        lv["w2"],
        lv["b2"],
        mask=a["mask"],
        filters=a["filters"].float(),
        **opts,
    )
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = _ref_out_grads(a, g, opts)
    torch.testing.assert_close(out.detach().double(), want, **TOL[torch.float32])
    for t, w in zip(lv.values(), wgrads, strict=True):
        torch.testing.assert_close(t.grad.double(), w, **TOL[torch.float32])


def test_cpu_op_saved_bytes():
    from fastnca.nca.model import saved_tensor_bytes
    from fastnca.ops import nca_step

    B, C, H, W = 2, 16, 24, 20
    a = make(B=B, C=C, H=H, W=W, hidden=32, nf=3, dtype=torch.float32)
    params = [a[k].requires_grad_() for k in ("w1", "b1", "w2", "b2")]
    x = a["x"].requires_grad_()
    opts = OPTION_SETS["all"]
    _, info = saved_tensor_bytes(
        nca_step,
        x,
        *params,
        mask=a["mask"],
        filters=a["filters"],
        exclude=[*params, a["filters"]],
        **opts,
    )
    # x, the update mask and the alive mask per cell; plus the rotated bank (F*9 floats).
    assert info["saved"] == B * H * W * (4 * C + 2) + a["filters"].numel() * 4


def test_option_errors():
    from fastnca.ops import nca_step

    a = make(alpha=False, dtype=torch.float32)
    args = (a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["mask"], 0.5, a["filters"].float())
    bad = [
        (dict(padding="reflect"), "padding"),
        (dict(alive_threshold="0.1"), "alive_threshold"),
        (dict(alive_threshold=0.1, alive_channel=5), "alive_channel"),
        (dict(clip={"hiden": (0, 1)}), "unknown keys"),
        (dict(clip={"hidden": (2, 1)}), "lo <= hi"),
        (dict(clip={"hidden": 1.0}), "clip\\['hidden'\\]"),
        (dict(clip=[(0, 1)]), "clip must be"),
        (dict(perception_angle=float("nan")), "perception_angle"),
    ]
    for opts, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            nca_step(*args, **opts)
    k1 = DISTILL_FILTERS[:2].float()
    w1 = torch.zeros(9, 10)
    with pytest.raises(ValueError, match="F >= 3"):
        nca_step(a["x"], w1, None, a["w2"], mask=a["mask"], filters=k1, perception_angle=0.3)


def test_compile_fullgraph_with_options():
    from fastnca.ops import nca_step

    a = make(B=1, C=5, H=5, W=6, hidden=8, nf=3, dtype=torch.float32)
    lv = _leaves(a, torch.float32)
    opts = OPTION_SETS["all"]
    f = lambda x, w1, b1, w2, b2: nca_step(
        x, w1, b1, w2, b2, mask=a["mask"], filters=a["filters"], **opts
    )
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*lv.values())
    out.sum().backward()
    torch.testing.assert_close(out, f(*[t.detach() for t in lv.values()]))


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_dense_path_float64(opts):
    # The composite that non-CPU devices (CUDA included, for now) run, checked here on the CPU.
    from fastnca.ops.nca_step_options import _dense, check_options

    a = make(B=2, C=5, H=5, W=7, hidden=9, nf=4)
    o = check_options(
        opts.get("padding", "circular"),
        opts.get("alive_threshold"),
        opts.get("alive_channel", 3),
        opts.get("clip"),
        opts.get("perception_angle", 0.0),
        5,
        4,
    )
    lv = _leaves(a, torch.float64)
    k = rotate_filters(a["filters"], o[4])
    out = torch.utils.checkpoint.checkpoint(
        _dense, *lv.values(), a["mask"], k, *o[:4], use_reentrant=False
    )
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = _ref_out_grads(a, g, opts)
    torch.testing.assert_close(out.detach(), want, **TOL[torch.float64])
    for t, w in zip(lv.values(), wgrads, strict=True):
        torch.testing.assert_close(t.grad, w, **TOL[torch.float64])


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_cpu_op_sparse_life_float64(padding):
    # A small living blob in a large dead grid: the CPU op skips the MLP of cells far from life
    # (forward) and of dead cells (backward); results stay those of nca_step_ref.
    from fastnca.ops import nca_step

    a = make(B=2, C=5, H=11, W=13, hidden=9, nf=3)
    a["x"][:, 3] = -0.5
    a["x"][0, 3, 4:6, 5:7] = 0.8
    a["x"][1, 3, 0, 0] = 0.8  # on the border: wraps or not
    a["w2"][3] *= 10  # large alpha updates of both signs: life moves, neighbours' updates matter
    a["mask"] = (a["mask"] * torch.rand(a["mask"].shape)).double()
    lv = _leaves(a, torch.float64)
    opts = dict(padding=padding, alive_threshold=0.1, clip={"state": (-1.0, 1.0)})
    out = nca_step(*lv.values(), mask=a["mask"], filters=a["filters"], **opts)
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = _ref_out_grads(a, g, opts)
    assert 0 < (out != 0).any(1).sum() < 40  # the blob, not the grid
    torch.testing.assert_close(out.detach(), want, **TOL[torch.float64])
    for t, w in zip(lv.values(), wgrads, strict=True):
        torch.testing.assert_close(t.grad, w, **TOL[torch.float64])


def test_cpu_op_life_kept_by_a_far_neighbour():
    # k (living) dies, i (two cells away, not alive before) comes to life; j between them stays
    # alive only through i's update, so i's MLP must run although no living cell touches i.
    from fastnca.ops import nca_step

    C, H, W = 4, 5, 9
    x = torch.zeros(1, C, H, W, dtype=torch.float64)
    x[0, 0] = torch.arange(H * W, dtype=torch.float64).view(H, W) + 1  # a visible channel
    x[0, 3] = -0.5
    x[0, 3, 2, 3] = 0.8  # k
    w1 = torch.zeros(2, 3 * C, dtype=torch.float64)
    w1[0, 3 * 3 + 0] = 10.0  # hidden 0 = relu(10 * own alpha)
    w2 = torch.zeros(C, 2, dtype=torch.float64)
    w2[3, 0] = -5.0
    b2 = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # alpha += 1 - 50 * alpha+
    mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
    mask[0, 0, 2, 3] = mask[0, 0, 2, 5] = True  # k and i fire
    k = DISTILL_FILTERS[:3].double()
    args = (x, w1, torch.zeros(2, dtype=torch.float64), w2, b2, mask, k)
    for padding in ("zeros", "circular"):
        want = nca_step_ref(*args, padding=padding, alive_threshold=0.1)
        got = nca_step(*args[:5], mask=mask, filters=k, padding=padding, alive_threshold=0.1)
        assert want[0, 0, 2, 4] == x[0, 0, 2, 4]  # j alive, unchanged
        torch.testing.assert_close(got, want, **TOL[torch.float64])
