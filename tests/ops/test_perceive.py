"""perceive: Triton kernels (interpreter) and the CPU path against perceive_ref."""

import pytest
import torch
from conftest import TOL, assert_rounded, nan_like
from torch.library import opcheck

from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS, Perception, perceive
from fastnca.kernels.perceive import perceive_bwd, perceive_fwd
from fastnca.reference import perceive_backward_ref, perceive_ref

# Odd, non-square shapes; several programs per axis (tiles are 16 x 64) with ragged edges; tiny
# grids where the wrap touches the same cell from both sides.
SHAPES = [(2, 3, 37, 70), (1, 2, 1, 1), (1, 2, 2, 5), (2, 1, 19, 3), (1, 1, 1, 130)]


def lesson_perceive(x, filters):
    """The lesson's code, verbatim in spirit: reshape, circular pad, conv2d, reshape."""
    B, C, H, W = x.shape
    y = torch.nn.functional.pad(x.reshape(B * C, 1, H, W), (1, 1, 1, 1), "circular")
    return torch.nn.functional.conv2d(y, filters[:, None].to(x.dtype)).reshape(B, -1, H, W)


def test_reference_matches_lesson_and_layout():
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    out = perceive_ref(x)
    torch.testing.assert_close(out, lesson_perceive(x, DEFAULT_FILTERS.double()))
    # Channel-major layout: out[:, c*F + f] is filter f on channel c; identity is filter 0.
    torch.testing.assert_close(out[:, 0::4], x)
    sobel_x = DEFAULT_FILTERS[1].double()
    manual = sum(
        sobel_x[a, e] * torch.roll(x[:, 2], shifts=(1 - a, 1 - e), dims=(1, 2))
        for a in range(3)
        for e in range(3)
    )
    torch.testing.assert_close(out[:, 2 * 4 + 1], manual)


def test_filter_banks():
    assert DEFAULT_FILTERS.shape == (4, 3, 3)
    torch.testing.assert_close(DEFAULT_FILTERS[2], DEFAULT_FILTERS[1].T)
    assert DEFAULT_FILTERS[3, 1, 1] == -12 and DEFAULT_FILTERS[3].sum() == 0
    torch.testing.assert_close(DISTILL_FILTERS[0], DEFAULT_FILTERS[0])
    torch.testing.assert_close(DISTILL_FILTERS[1:], DEFAULT_FILTERS[1:] / 8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nf", [4, 5])
def test_kernel_forward_backward_float64(shape, nf):
    x = torch.randn(shape, dtype=torch.float64)
    k = DEFAULT_FILTERS.double() if nf == 4 else torch.randn(nf, 3, 3, dtype=torch.float64)
    B, C, H, W = shape
    out = perceive_fwd(x, k, out=nan_like((B, C * nf, H, W), torch.float64))
    torch.testing.assert_close(out, perceive_ref(x, k), **TOL[torch.float64])
    g = torch.randn_like(out)
    dx = perceive_bwd(g, k, out=nan_like(shape, torch.float64))
    xr = x.clone().requires_grad_()
    perceive_ref(xr, k).backward(g)
    torch.testing.assert_close(dx, xr.grad, **TOL[torch.float64])
    torch.testing.assert_close(perceive_backward_ref(g, k), xr.grad, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_low_precision_correctly_rounded(dtype):
    # float32 arithmetic, one rounding to dtype (tests/conftest.py rule): forward n = 9 taps,
    # backward n = 9 taps x F filters; mag = the same stencil on |x|, |k|.
    x = torch.randn(2, 3, 9, 21).to(dtype)
    k = DISTILL_FILTERS
    out = perceive_fwd(x, k, out=nan_like((2, 12, 9, 21), dtype))
    assert out.dtype == dtype
    xd, kd = x.double(), k.double()
    assert_rounded(out, perceive_ref(xd, kd), perceive_ref(xd.abs(), kd.abs()), n=9)
    g = torch.randn_like(out)
    dx = perceive_bwd(g, k, out=nan_like(x.shape, dtype))
    assert dx.dtype == dtype
    gd = g.double()
    mag = perceive_backward_ref(gd.abs(), kd.abs())
    assert_rounded(dx, perceive_backward_ref(gd, kd), mag, n=9 * k.shape[0], name="dx")


def test_registered_op_autograd_and_opcheck():
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    y = torch.ops.fastnca.perceive(x, DEFAULT_FILTERS)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(y, perceive_ref(x.detach()), **TOL[torch.float32])
    torch.testing.assert_close(
        x.grad, perceive_backward_ref(g, DEFAULT_FILTERS), **TOL[torch.float32]
    )
    # test_aot_dispatch_* need wrap_triton to trace the kernel, which the interpreter cannot do;
    # they run on CUDA in benchmarks/gpu_check.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck(
        torch.ops.fastnca.perceive.default,
        (x.detach().requires_grad_(), DEFAULT_FILTERS),
        test_utils=utils,
    )
    opcheck(torch.ops.fastnca.perceive_backward.default, (g, DEFAULT_FILTERS), test_utils=utils)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_path_matches_reference(shape):
    x = torch.randn(shape)
    torch.testing.assert_close(perceive(x), perceive_ref(x), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_correctly_rounded(dtype):
    # The torch composite: float32 conv, one rounding to dtype; same rule as the kernels.
    x = torch.randn(2, 3, 7, 5).to(dtype)
    out = perceive(x, DISTILL_FILTERS)
    assert out.dtype == dtype
    xd, kd = x.double(), DISTILL_FILTERS.double()
    assert_rounded(out, perceive_ref(xd, kd), perceive_ref(xd.abs(), kd.abs()), n=9)


def test_cpu_path_gradcheck_and_noncontiguous():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: perceive(t, k), (x,))
    base = torch.randn(2, 5, 9, 3)
    xt = base.transpose(2, 3)[:, ::2]  # (2, 3, 3, 9), non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(perceive(xt), perceive_ref(xt.contiguous()))
    torch.testing.assert_close(perceive_fwd(xt, DEFAULT_FILTERS), perceive_ref(xt.contiguous()))


def test_compile_fullgraph_cpu_no_recompile():
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters
    frames.clear()
    model = Perception()

    def f(x):
        return model(x).square().mean()

    cf = torch.compile(f, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 10, 7, requires_grad=True)
        loss = cf(x)
        loss.backward()
    xr = x.detach().clone().requires_grad_()
    f(xr).backward()
    torch.testing.assert_close(loss, f(x.detach()))
    torch.testing.assert_close(x.grad, xr.grad)
    assert frames["stats"]["unique_graphs"] == 1
    assert frames["stats"]["calls_captured"] >= 1
    # Other batch sizes: one recompile, then a dynamic graph serves them (kept under inductor's own
    # size threshold, 840 * B <= 4096, past which its CPU reduction code recompiles once more).
    for b in (3, 4):
        cf(torch.randn(b, 3, 10, 7, requires_grad=True)).backward()
    assert frames["stats"]["unique_graphs"] <= 2


def test_perception_module():
    m = Perception(DISTILL_FILTERS)
    assert "filters" in dict(m.named_buffers()) and not list(m.parameters())
    assert m.n_filters == 4
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(m(x), perceive_ref(x, DISTILL_FILTERS))
    with pytest.raises(ValueError, match="filters"):
        Perception(torch.zeros(4, 3))


@pytest.mark.parametrize(
    "x, filters, err, match",
    [
        (torch.zeros(3, 4, 4), None, ValueError, r"x must be 4-D, got shape \(3, 4, 4\)"),
        (
            torch.zeros(1, 1, 4, 4, dtype=torch.int64),
            None,
            TypeError,
            "x must be a floating.*int64",
        ),
        (torch.zeros(1, 1, 4, 4, dtype=torch.complex64), None, TypeError, "complex64"),
        (
            torch.zeros(1, 1, 4, 4),
            torch.zeros(4, 3, 2),
            ValueError,
            r"filters.*\(F, 3, 3\).*\(4, 3, 2\)",
        ),
        (torch.zeros(1, 1, 4, 4), torch.zeros(9), ValueError, "filters"),
        (torch.zeros(1, 1, 4, 4), torch.zeros(2, 3, 3, dtype=torch.int32), TypeError, "filters"),
        (torch.zeros(1, 1, 0, 4), None, ValueError, "H, W >= 1"),
        ([[1.0]], None, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(x, filters, err, match):
    with pytest.raises(err, match=match):
        perceive(x, filters)


def test_filters_on_other_device():
    x = torch.zeros(1, 1, 4, 4)
    k = torch.zeros(4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="filters is on meta but x is on cpu"):
        perceive(x, k)
