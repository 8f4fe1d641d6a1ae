"""Every Triton op on a real GPU against fastnca.reference (run by tests/gpu/test_cuda.py and
benchmarks/gpu_check.sh).

tests/ runs the kernels through the Triton interpreter on CPU; this file runs them compiled, on
CUDA (TRITON_INTERPRET unset), with what the interpreter cannot do: ``opcheck`` with all its
test_utils (the aot_dispatch ones trace the kernels through ``wrap_triton``), ``torch.compile``
with ``fullgraph=True`` over the registered ops, TF32/tensor-core dtypes and shapes large enough to
take the multi-program paths (split-K Gram, many stencil tiles).

    FASTNCA_TEST_DEVICE=cuda (default)   the GPU check
    FASTNCA_TEST_DEVICE=cpu TRITON_INTERPRET=1   a dry run of this file on CPU (small shapes,
                                                 opcheck without the aot_dispatch utils)
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.library import opcheck

from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS, Perception, StyleLoss, gram
from fastnca.kernels.gram import gram_bwd, gram_fwd, style_fwd
from fastnca.kernels.nca_step import nca_step_bwd, nca_step_fwd
from fastnca.kernels.perceive import perceive_bwd, perceive_fwd
from fastnca.ops import nca_step
from fastnca.reference import (
    gram_ref,
    nca_step_ref,
    perceive_backward_ref,
    perceive_ref,
    style_loss_ref,
)

DEVICE = torch.device(os.environ.get("FASTNCA_TEST_DEVICE", "cuda"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.fail(
        "tests/gpu/cuda_kernels.py needs CUDA (or FASTNCA_TEST_DEVICE=cpu with "
        "TRITON_INTERPRET=1 for a dry run)",
        pytrace=False,
    )
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.fail("FASTNCA_TEST_DEVICE=cpu needs TRITON_INTERPRET=1", pytrace=False)

ON_GPU = DEVICE.type == "cuda"
ALL_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)
UTILS = ALL_UTILS if ON_GPU else ALL_UTILS[:3]
F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)
# Relative to the reference's magnitude (see tests/conftest.py).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-1, rtol=2e-2),
}
# Odd shapes with ragged tiles and the circular wrap on every edge; on the GPU also a large one.
PERCEIVE_SHAPES = [(2, 3, 37, 70), (1, 2, 1, 1), (2, 1, 19, 3)] + (
    [(4, 16, 128, 129)] if ON_GPU else []
)
# (B, C, H, W): ragged 16/64-wide tiles; on the GPU also VGG-like few-tile, long-N (split-K) layers.
GRAM_SHAPES = [(2, 3, 5, 7), (2, 37, 9, 11)] + (
    [(2, 64, 128, 128), (1, 130, 33, 31), (3, 256, 32, 32)] if ON_GPU else []
)
# (B, C, H, W, hidden): odd channel/hidden counts, ragged 64-cell tiles; on the GPU the texture
# preset's (4, 12, 128, 128) x 96 hidden and a wide one.
NCA_SHAPES = [(2, 3, 5, 7, 10), (1, 12, 9, 13, 96)] + (
    [(4, 12, 128, 128, 96), (2, 16, 33, 65, 128)] if ON_GPU else []
)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 Gram dots in full fp32 (no TF32)
    yield
    torch.set_float32_matmul_precision(prec)


def nan_like(shape, dtype):
    """Output buffer filled with NaN, so a cell a kernel never writes fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def close(got, want, dtype):
    """Compare in float64 on the CPU, scaled by the reference's magnitude."""
    want = want.detach().double().cpu()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.detach().double().cpu() / scale, want / scale, **TOL[dtype])


def frame_count_compile(fn):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    return torch.compile(fn, fullgraph=True), counters


# --------------------------------------------------------------------------------------- perceive


@pytest.mark.parametrize("shape", PERCEIVE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_perceive_kernels(shape, dtype):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    k = DISTILL_FILTERS.to(DEVICE)
    B, C, H, W = shape
    out = perceive_fwd(x, k, out=nan_like((B, 4 * C, H, W), dtype))
    assert out.dtype == dtype
    close(out, perceive_ref(x.double().cpu(), k.double().cpu()), dtype)
    g = torch.randn_like(out)
    dx = perceive_bwd(g, k, out=nan_like(shape, dtype))
    close(dx, perceive_backward_ref(g.double().cpu(), k.double().cpu()), dtype)


def test_perceive_registered_op_autograd_and_opcheck():
    x = torch.randn(2, 3, 17, 23, device=DEVICE, requires_grad=True)
    k = DEFAULT_FILTERS.to(DEVICE)
    y = torch.ops.fastnca.perceive(x, k)
    g = torch.randn_like(y)
    y.backward(g)
    close(y, perceive_ref(x.detach().double().cpu()), torch.float32)
    close(x.grad, perceive_backward_ref(g.double().cpu(), DEFAULT_FILTERS.double()), torch.float32)
    opcheck(torch.ops.fastnca.perceive.default, (x.detach().requires_grad_(), k), test_utils=UTILS)
    opcheck(torch.ops.fastnca.perceive_backward.default, (g, k), test_utils=UTILS)


def test_perceive_compile_fullgraph():
    model = Perception().to(DEVICE)

    def f(x):
        return model(x).square().mean()

    cf, counters = frame_count_compile(f)
    for _ in range(2):
        x = torch.randn(2, 3, 21, 9, device=DEVICE, requires_grad=True)
        loss = cf(x)
        loss.backward()
    xr = x.detach().clone().requires_grad_()
    f(xr).backward()
    close(loss, f(x.detach()), torch.float32)
    close(x.grad, xr.grad, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1


# ------------------------------------------------------------------------------ gram / style_loss


@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_gram_kernels(shape, dtype):
    B, C, H, W = shape
    f = torch.randn(shape, device=DEVICE).to(dtype)
    fd = f.double().cpu()
    g = gram_fwd(f, out=nan_like((B, C, C), dtype))
    close(g, gram_ref(fd), dtype)
    t = torch.randn(C, C, device=DEVICE)
    loss, res = style_fwd(f, t, save=True)
    d = gram_ref(fd) - t.double().cpu()
    close(loss, d.square().mean(), dtype)
    close(res, d + d.transpose(1, 2), dtype)
    dg = torch.randn(B, C, C, device=DEVICE).to(dtype)
    df = gram_bwd(dg, f, sym=True, out=nan_like((B, C, H * W), dtype))
    want = (dg.double().cpu() + dg.double().cpu().transpose(1, 2)) @ fd.reshape(B, C, -1) / (H * W)
    close(df, want.view(shape), dtype)


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists only on the GPU")
def test_gram_tf32_default_precision():
    torch.set_float32_matmul_precision("high")
    f = torch.randn(2, 64, 48, 48, device=DEVICE)
    torch.testing.assert_close(
        gram(f).double().cpu(), gram_ref(f.double().cpu()), atol=5e-3, rtol=5e-3
    )


def test_gram_style_registered_ops_autograd_and_opcheck():
    f = torch.randn(2, 5, 3, 7, device=DEVICE, requires_grad=True)
    fr = f.detach().double().cpu().requires_grad_()
    g = torch.ops.fastnca.gram(f)
    dg = torch.randn_like(g)
    g.backward(dg)
    gram_ref(fr).backward(dg.double().cpu())
    close(g, gram_ref(fr.detach()), torch.float32)
    close(f.grad, fr.grad, torch.float32)
    t = torch.randn(2, 5, 5, device=DEVICE)
    f.grad, fr.grad = None, None
    loss, res = torch.ops.fastnca.style_loss(f, t, True)
    (3.0 * loss).backward()
    (3.0 * style_loss_ref([fr], [t.double().cpu()])).backward()
    close(loss, style_loss_ref([fr.detach()], [t.double().cpu()]), torch.float32)
    close(f.grad, fr.grad, torch.float32)
    fx = f.detach().requires_grad_()
    opcheck(torch.ops.fastnca.gram.default, (fx,), test_utils=UTILS)
    opcheck(torch.ops.fastnca.gram_backward.default, (dg, f.detach()), test_utils=UTILS)
    opcheck(torch.ops.fastnca.style_loss.default, (fx, t, True), test_utils=UTILS)
    opcheck(
        torch.ops.fastnca.style_loss_backward.default,
        (torch.tensor(1.0, device=DEVICE), res, f.detach()),
        test_utils=UTILS,
    )


def test_style_loss_compile_fullgraph():
    style = [torch.randn(1, 3, 6, 5, device=DEVICE), torch.randn(1, 40, 9, 7, device=DEVICE)]
    crit = StyleLoss.from_features(style, [1.0, 0.5]).to(DEVICE)

    def f(a, b):
        return crit([a, b]) + gram(a).square().sum()

    cf, counters = frame_count_compile(f)
    for _ in range(2):
        a = torch.randn(2, 3, 6, 5, device=DEVICE, requires_grad=True)
        b = torch.randn(2, 40, 9, 7, device=DEVICE, requires_grad=True)
        loss = cf(a, b)
        loss.backward()
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    f(ar, br).backward()
    close(loss, f(a.detach(), b.detach()), torch.float32)
    close(a.grad, ar.grad, torch.float32)
    close(b.grad, br.grad, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------- nca_step


def nca_args(B, C, H, W, hidden, dtype=torch.float32, b2=True):
    """Step arguments on DEVICE: state in ``dtype``, float32 weights, a bool mask (60 % fire)."""
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + H + W + hidden)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE)
    return dict(
        x=r(B, C, H, W).to(dtype),
        w1=r(hidden, 4 * C, scale=0.3),
        b1=r(hidden),
        w2=r(C, hidden, scale=0.3),
        b2=r(C) if b2 else None,
        mask=(torch.rand(B, 1, H, W, generator=g) < 0.6).to(DEVICE),
        filters=DEFAULT_FILTERS.to(DEVICE),
    )


NCA_LEAVES = ("x", "w1", "b1", "w2", "b2")


def nca_ref(a, grad):
    """nca_step_ref output and gradients (x, w1, b1, w2, b2) in float64 on the CPU."""
    leaves = {
        k: None if a[k] is None else a[k].detach().double().cpu().requires_grad_()
        for k in NCA_LEAVES
    }
    out = nca_step_ref(**leaves, mask=a["mask"].cpu().double(), filters=DEFAULT_FILTERS.double())
    out.backward(grad.double().cpu())
    return out.detach(), [None if t is None else t.grad for t in leaves.values()]


@pytest.mark.parametrize("shape", NCA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_nca_step_kernels(shape, dtype):
    a = nca_args(*shape, dtype=dtype)
    if dtype == torch.float64:
        a.update({k: a[k].double() for k in ("w1", "b1", "w2", "b2")})
    args = [a[k] for k in NCA_LEAVES]
    out = nca_step_fwd(*args, a["mask"], a["filters"])
    assert out.dtype == dtype
    g = torch.randn(out.shape, device=DEVICE).to(dtype)
    want, wgrads = nca_ref(a, g)
    close(out, want, dtype)
    grads = nca_step_bwd(g, *args[:4], a["mask"], a["filters"])
    assert grads[0].dtype == dtype
    for got, ref in zip(grads, wgrads, strict=True):  # weight grads: sums over all cells
        close(got, ref, dtype if dtype in (torch.float64, torch.float32) else torch.bfloat16)


def test_nca_step_registered_op_autograd_and_opcheck():
    a = nca_args(1, 3, 17, 19, 10)
    leaves = [a[k].clone().requires_grad_() for k in NCA_LEAVES]
    out = torch.ops.fastnca.nca_step(*leaves, a["mask"], a["filters"])
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = nca_ref(a, g)
    close(out, want, torch.float32)
    for t, ref in zip(leaves, wgrads, strict=True):
        close(t.grad, ref, torch.float32)
    fresh = [t.detach().requires_grad_() for t in leaves]
    opcheck(torch.ops.fastnca.nca_step.default, (*fresh, a["mask"], a["filters"]), test_utils=UTILS)
    opcheck(
        torch.ops.fastnca.nca_step.default,
        (*fresh[:4], None, a["mask"], a["filters"]),
        test_utils=UTILS,
    )
    opcheck(
        torch.ops.fastnca.nca_step_backward.default,
        (g, *[a[k] for k in NCA_LEAVES[:4]], a["mask"], a["filters"]),
        test_utils=UTILS,
    )


def test_nca_step_rollout_compile_fullgraph():
    """Eight steps of a rollout (mask passed in) compiled as one graph, vs eager, fwd + bwd."""
    a = nca_args(2, 12, 24, 20, 32)
    masks = [(torch.rand(2, 1, 24, 20) < 0.5).to(DEVICE) for _ in range(8)]

    def rollout(x, w1, b1, w2, b2):
        for m in masks:
            x = nca_step(x, w1, b1, w2, b2, mask=m)
        return x.square().mean()

    cf, counters = frame_count_compile(rollout)
    leaves = [a[k].clone().requires_grad_() for k in NCA_LEAVES]
    loss = cf(*leaves)
    loss.backward()
    eager = [a[k].clone().requires_grad_() for k in NCA_LEAVES]
    want = rollout(*eager)
    want.backward()
    close(loss, want, torch.float32)
    for t, e in zip(leaves, eager, strict=True):
        close(t.grad, e.grad, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1


# The step options (zero padding, alive masking, clips, rotated bank) through the Triton op.
GROWING = dict(padding="zeros", alive_threshold=0.1, perception_angle=0.4)
TEXTURE = dict(
    clip={k: (-2.0, 2.0) for k in ("perception", "update", "state")} | {"hidden": (0, 2)}
)


def _options_op_args(a, opts):
    from fastnca.ops.nca_step_options import check_options
    from fastnca.reference import rotate_filters

    zero_pad, thr, ch, clip, angle = check_options(
        opts.get("padding", "circular"),
        opts.get("alive_threshold"),
        3,
        opts.get("clip"),
        opts.get("perception_angle", 0.0),
        a["x"].shape[1],
        4,
    )
    return rotate_filters(a["filters"], angle), (zero_pad, thr, ch, clip)


@pytest.mark.parametrize("opts", [GROWING, TEXTURE], ids=["growing", "texture"])
def test_nca_step_options_op(opts):
    B, C, H, W, hidden = (2, 16, 33, 29, 48) if ON_GPU else (1, 16, 7, 9, 20)
    a = nca_args(B, C, H, W, hidden)
    a["x"][:, 3] = torch.rand(B, H, W, device=DEVICE) - 0.5  # some cells alive, some dead
    k, o = _options_op_args(a, opts)
    leaves = [a[n].clone().requires_grad_() for n in NCA_LEAVES]
    out = torch.ops.fastnca.nca_step_options(*leaves, a["mask"], k, *o)[0]
    g = torch.randn_like(out)
    out.backward(g)
    ref = [a[n].detach().double().cpu().requires_grad_() for n in NCA_LEAVES]
    want = nca_step_ref(*ref, a["mask"].cpu().double(), DEFAULT_FILTERS.double(), **opts)
    want.backward(g.double().cpu())
    close(out, want, torch.float32)
    for t, r in zip(leaves, ref, strict=True):
        close(t.grad, r.grad, torch.float32)
    fresh = [t.detach().requires_grad_() for t in leaves]
    opcheck(
        torch.ops.fastnca.nca_step_options.default, (*fresh, a["mask"], k, *o), test_utils=UTILS
    )


def test_nca_step_options_rollout_compile_fullgraph():
    a = nca_args(2, 16, 24, 20, 32)
    a["x"][:, 3] = torch.rand(2, 24, 20, device=DEVICE) - 0.5
    masks = [(torch.rand(2, 1, 24, 20) < 0.5).to(DEVICE) for _ in range(4)]

    def rollout(x, w1, b1, w2, b2):
        for m in masks:
            x = nca_step(x, w1, b1, w2, b2, mask=m, **GROWING, clip={"update": (-0.5, 0.5)})
        return x.square().mean()

    cf, counters = frame_count_compile(rollout)
    leaves = [a[k].clone().requires_grad_() for k in NCA_LEAVES]
    loss = cf(*leaves)
    loss.backward()
    eager = [a[k].clone().requires_grad_() for k in NCA_LEAVES]
    want = rollout(*eager)
    want.backward()
    close(loss, want, torch.float32)
    for t, e in zip(leaves, eager, strict=True):
        close(t.grad, e.grad, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1
