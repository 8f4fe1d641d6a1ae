"""gram / style_loss: Triton kernels (interpreter), registered ops, CPU composites vs reference."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import TOL, assert_rounded, nan_like
from torch.library import opcheck

from fastnca import StyleLoss, gram, style_loss
from fastnca.kernels.gram import _tile_pair, gram_bwd, gram_fwd, style_fwd
from fastnca.reference import gram_batch_ref, gram_ref, style_loss_ref

F64 = torch.float64
# (C, H, W): C from 3 to 37 with ragged 16-wide tiles, odd H*W (35 and 99 columns).
CASES = [(3, 5, 7), (16, 9, 11), (24, 5, 7), (37, 9, 11)]


def lesson_gram(x):
    """The lesson: einsum('bchw,bdhw->cd') / (h*w), summed over the batch."""
    return torch.einsum("bchw,bdhw->cd", x, x) / (x.shape[-2] * x.shape[-1])


def test_reference_forms():
    f = torch.randn(3, 4, 5, 6, dtype=F64)
    g = gram_ref(f)
    assert g.shape == (3, 4, 4)
    for b in range(3):
        fb = f[b].reshape(4, 30)
        torch.testing.assert_close(g[b], fb @ fb.T / 30)
    torch.testing.assert_close(gram_batch_ref(f), lesson_gram(f))
    torch.testing.assert_close(gram_batch_ref(f), g.sum(0))
    torch.testing.assert_close(gram(f, batch_sum=True), lesson_gram(f))
    t2, t3 = torch.randn(4, 4, dtype=F64), torch.randn(3, 4, 4, dtype=F64)
    f2 = torch.randn(3, 2, 3, 3, dtype=F64)
    t22 = torch.randn(2, 2, dtype=F64)
    want = 0.5 * ((g - t2) ** 2).sum() / 48 + 2.0 * ((gram_ref(f2) - t22) ** 2).sum() / 12
    torch.testing.assert_close(style_loss_ref([f, f2], [t2, t22], [0.5, 2.0]), want)
    torch.testing.assert_close(style_loss_ref([f], [t3]), ((g - t3) ** 2).mean())


@triton.jit
def _pairs_kernel(out_ptr, n, NUDGE: tl.constexpr):
    p = tl.program_id(0) * 0 + tl.arange(0, 2048)  # a tensor index, as in the kernels
    ti, tj = _tile_pair(p, NUDGE)
    tl.store(out_ptr + 2 * p, ti, mask=p < n)
    tl.store(out_ptr + 2 * p + 1, tj, mask=p < n)


@pytest.mark.parametrize("nudge", [0, -1, 1, -3, 3])
def test_tile_pair_enumerates_upper_triangle_once(nudge):
    # nudge: the sqrt moved that many float32 ulps (a hardware sqrt a few ulps off); without the
    # guard, one ulp low maps 47 of 1176 pairs wrong.
    T = 48  # C up to 3072 with 64-row tiles
    n = T * (T + 1) // 2
    out = torch.full((n, 2), -1, dtype=torch.int32)
    _pairs_kernel[(1,)](out, n, nudge)
    want = sorted((i, j) for j in range(T) for i in range(j + 1))
    got = [tuple(r) for r in out.tolist()]
    assert sorted(got) == want
    assert got[:4] == [(0, 0), (0, 1), (1, 1), (0, 2)]  # column-major order


@pytest.mark.parametrize("C, H, W", CASES)
@pytest.mark.parametrize("split", [1, 3])
def test_kernel_gram_forward_float64(C, H, W, split):
    f = torch.randn(2, C, H, W, dtype=F64)
    out = nan_like((2, C, C), F64)
    g = gram_fwd(f, out=out, split=split, block_m=16, block_k=16)
    assert g.data_ptr() == out.data_ptr()
    assert not g.isnan().any()  # every element written (mirror included)
    torch.testing.assert_close(g, gram_ref(f), **TOL[F64])


def test_kernel_gram_forward_block32_noncontiguous():
    base = torch.randn(2, 11, 9, 37, dtype=F64)
    f = base.permute(0, 3, 1, 2)  # (2, 37, 11, 9), channels-last strides
    g = gram_fwd(f, out=nan_like((2, 37, 37), F64), block_m=32, block_k=32)
    torch.testing.assert_close(g, gram_ref(f.contiguous()), **TOL[F64])


@pytest.mark.parametrize("C, H, W", CASES)
@pytest.mark.parametrize("per_image", [False, True])
def test_kernel_style_forward_float64(C, H, W, per_image):
    f = torch.randn(2, C, H, W, dtype=F64)
    t = torch.randn(2, C, C, dtype=F64) if per_image else torch.randn(C, C, dtype=F64)
    d = gram_ref(f) - t  # t is not symmetric: both orientations of each tile must be compared
    for split in (1, 2):
        loss, res = style_fwd(f, t, save=True, split=split, block_m=16, block_k=16)
        torch.testing.assert_close(loss, d.square().mean(), **TOL[F64])
        torch.testing.assert_close(res, d + d.transpose(1, 2), **TOL[F64])
    loss, res = style_fwd(f, t, save=False, block_m=16, block_k=16)
    assert res.numel() == 0
    torch.testing.assert_close(loss, d.square().mean(), **TOL[F64])


@pytest.mark.parametrize("C, H, W", CASES)
def test_kernel_backward_float64(C, H, W):
    f = torch.randn(2, C, H, W, dtype=F64)
    dg = torch.randn(2, C, C, dtype=F64)  # upstream gradients are not symmetric in general
    df = gram_bwd(
        dg, f, sym=True, out=nan_like((2, C, H * W), F64), block_m=16, block_n=32, block_k=16
    )
    fr = f.clone().requires_grad_()
    gram_ref(fr).backward(dg)
    torch.testing.assert_close(df, fr.grad, **TOL[F64])
    # Style loss backward: dF = g * 2/(B C² N) * S F with S = D + Dᵀ.
    t = torch.randn(C, C, dtype=F64)
    _, res = style_fwd(f, t, save=True, block_m=16, block_k=16)
    g = torch.tensor(0.7, dtype=F64)
    df = gram_bwd(
        res,
        f,
        sym=False,
        grad_scale=g,
        scale=2.0 / (2 * C * C * H * W),
        block_m=16,
        block_n=32,
        block_k=16,
    )
    fr.grad = None
    (0.7 * style_loss_ref([fr], [t])).backward()
    torch.testing.assert_close(df, fr.grad, **TOL[F64])


@pytest.mark.parametrize("gpu_branches", [False, True], ids=["interp", "gpu-branches"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_low_precision_correctly_rounded(dtype, split, gpu_branches, monkeypatch):
    # Rule of tests/conftest.py. G = F Fᵀ / N: n = N products + the 1/N scale (rounded) in
    # float32, one rounding to dtype. gpu_branches: the launchers' compiled-GPU choices (fp16 dots
    # in fp16, the backward's A = dG + dGᵀ rounded to the feature dtype before its dot: one more
    # relative rounding of that dtype on every term).
    if gpu_branches:
        monkeypatch.setenv("FASTNCA_GPU_BRANCHES", "1")
    B, C, H, W = 2, 24, 5, 7
    N = H * W
    f = torch.randn(B, C, H, W).to(dtype)
    fd = f.double()
    g = gram_fwd(f, out=nan_like((B, C, C), dtype), block_m=16, block_k=16, split=split)
    assert g.dtype == dtype
    mag_g = gram_ref(fd.abs())
    # float32 dots are TF32 on the GPU (both operands rounded to 11 bits): rel 2 x 2^-11 there;
    # the interpreter computes them exactly, the bound is the GPU's.
    tf32 = 2 * 2.0**-11 if gpu_branches and dtype == torch.float32 else 0.0
    assert_rounded(g, gram_ref(fd), mag_g, n=N + 2 + split, rel=tf32, name="G")
    # Style loss and residual, float32: D = G - T, S = D + Dᵀ, L = mean(D²).
    t = torch.randn(C, C)
    loss, res = style_fwd(f, t, save=True, block_m=16, block_k=16, split=split)
    assert loss.dtype == torch.float32 and res.dtype == torch.float32
    d = gram_ref(fd) - t.double()
    mag_d = mag_g + t.double().abs()  # bounds |D| and what D's rounding sees
    n_d = N + 4 + split
    assert_rounded(
        res, d + d.transpose(1, 2), mag_d + mag_d.transpose(1, 2), n=n_d, rel=tf32, name="S"
    )
    mag_l = (2 * d.abs() * mag_d).mean()
    assert_rounded(loss, d.square().mean(), mag_l, n=n_d + B * C * C + 2, rel=tf32, name="loss")
    # Backward: dF = (dG + dGᵀ) F / N; n = C terms + the symmetric add + scale.
    dg = torch.randn(B, C, C).to(dtype)
    out = nan_like((B, C, N), dtype)
    df = gram_bwd(dg, f, sym=True, out=out, block_m=16, block_n=32, block_k=16)
    assert df.dtype == dtype
    dgd, fr = dg.double(), fd.reshape(B, C, N)
    want = ((dgd + dgd.transpose(1, 2)) @ fr / N).view(f.shape)
    mag = ((dgd.abs() + dgd.abs().transpose(1, 2)) @ fr.abs() / N).view(f.shape)
    rel = torch.finfo(dtype).eps / 2 if gpu_branches and dtype != torch.float32 else tf32
    assert_rounded(df, want, mag, n=C + 3, rel=rel, name="dF")


def test_registered_ops_autograd_and_opcheck():
    f = torch.randn(2, 5, 3, 7, requires_grad=True)
    g = torch.ops.fastnca.gram(f)
    dg = torch.randn_like(g)
    g.backward(dg)
    fr = f.detach().clone().requires_grad_()
    gram_ref(fr).backward(dg)
    torch.testing.assert_close(g, gram_ref(f.detach()), **TOL[torch.float32])
    torch.testing.assert_close(f.grad, fr.grad, **TOL[torch.float32])
    t = torch.randn(2, 5, 5)
    f.grad = None
    loss, res = torch.ops.fastnca.style_loss(f, t, True)
    (3.0 * loss).backward()
    fr.grad = None
    (3.0 * style_loss_ref([fr], [t])).backward()
    torch.testing.assert_close(loss, style_loss_ref([f.detach()], [t]), **TOL[torch.float32])
    torch.testing.assert_close(f.grad, fr.grad, **TOL[torch.float32])
    # Without the residual there is nothing to differentiate: a clear error, not a wrong gradient.
    loss, _ = torch.ops.fastnca.style_loss(f, t, False)
    with pytest.raises(RuntimeError, match="save_residual=True"):
        loss.backward()
    # test_aot_dispatch_* need wrap_triton to trace the kernels (not possible under the
    # interpreter); they run on CUDA in benchmarks/gpu_check.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    fx = f.detach().requires_grad_()
    opcheck(torch.ops.fastnca.gram.default, (fx,), test_utils=utils)
    opcheck(torch.ops.fastnca.gram_backward.default, (dg, f.detach()), test_utils=utils)
    opcheck(torch.ops.fastnca.style_loss.default, (fx, t, True), test_utils=utils)
    opcheck(
        torch.ops.fastnca.style_loss_backward.default,
        (torch.tensor(1.0), res, f.detach()),
        test_utils=utils,
    )


def test_public_cpu_several_layers_float64():
    shapes = [(2, 3, 5, 7), (2, 16, 3, 3), (2, 37, 9, 11)]
    feats = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes]
    targets = [
        torch.randn(3, 3, dtype=F64),
        torch.randn(2, 16, 16, dtype=F64),
        gram_ref(torch.randn(1, 37, 4, 4, dtype=F64))[0],
    ]
    w = [1.0, 0.25, 3.0]
    loss = style_loss(feats, targets, w)
    want = style_loss_ref([f.detach() for f in feats], targets, w)
    torch.testing.assert_close(loss, want, **TOL[F64])
    loss.backward()
    refs = [f.detach().clone().requires_grad_() for f in feats]
    style_loss_ref(refs, targets, w).backward()
    for f, r in zip(feats, refs, strict=True):
        torch.testing.assert_close(f.grad, r.grad, **TOL[F64])
    small = [
        torch.randn(2, 3, 3, 5, dtype=F64, requires_grad=True),
        torch.randn(1, 4, 2, 3, dtype=F64, requires_grad=True),
    ]
    ts = [torch.randn(3, 3, dtype=F64), torch.randn(1, 4, 4, dtype=F64)]
    assert torch.autograd.gradcheck(lambda a, b: style_loss([a, b], ts, [0.5, 2.0]), tuple(small))
    assert torch.autograd.gradcheck(lambda a: gram(a), (small[0],))
    assert torch.autograd.gradcheck(lambda a: gram(a, batch_sum=True), (small[0],))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_public_cpu_dtypes(dtype):
    # The torch composites under the kernels' rule (tests/conftest.py): float32 arithmetic, G and
    # dF rounded once to dtype, the loss in float32.
    B, C, H, W = 2, 16, 5, 7
    N = H * W
    f = torch.randn(B, C, H, W).to(dtype).requires_grad_()
    t = torch.randn(C, C)
    g = gram(f)
    assert g.dtype == dtype
    fd = f.detach().double()
    mag_g = gram_ref(fd.abs())
    assert_rounded(g, gram_ref(fd), mag_g, n=N + 2, name="G")
    loss = style_loss([f], [t])
    assert loss.dtype == torch.float32
    loss.backward()
    assert f.grad.dtype == dtype
    d = gram_ref(fd) - t.double()
    mag_d = mag_g + t.double().abs()
    n_d = N + 4
    assert_rounded(loss, d.square().mean(), (2 * d.abs() * mag_d).mean(), n=n_d + B * C * C + 2)
    # dL/dF = 2 / (B C² N) (D + Dᵀ) F
    k = 2 / (B * C * C * N)
    fr = fd.reshape(B, C, N)
    want = (k * (d + d.transpose(1, 2)) @ fr).view(f.shape)
    mag = (k * (mag_d + mag_d.transpose(1, 2)) @ fr.abs()).view(f.shape)
    assert_rounded(f.grad, want, mag, n=n_d + C + 4, name="dF")


def test_compile_fullgraph_cpu_no_recompile():
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters
    frames.clear()
    crit = StyleLoss.from_features([torch.randn(1, 3, 6, 5), torch.randn(1, 8, 3, 3)], [1.0, 0.5])

    def f(a, b):
        return crit([a, b]) + gram(a).square().sum()

    cf = torch.compile(f, fullgraph=True)
    for _ in range(2):
        a = torch.randn(2, 3, 6, 5, requires_grad=True)
        b = torch.randn(2, 8, 3, 3, requires_grad=True)
        loss = cf(a, b)
        loss.backward()
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    f(ar, br).backward()
    torch.testing.assert_close(loss, f(a.detach(), b.detach()))
    torch.testing.assert_close(a.grad, ar.grad)
    torch.testing.assert_close(b.grad, br.grad)
    assert frames["stats"]["unique_graphs"] == 1
    for n in (3, 5):  # other batch sizes: at most one recompile, then a dynamic graph serves all
        cf(torch.randn(n, 3, 6, 5, requires_grad=True), torch.randn(n, 8, 3, 3)).backward()
    assert frames["stats"]["unique_graphs"] <= 2


def test_style_loss_module():
    style = [torch.randn(1, 4, 5, 5), torch.randn(1, 6, 3, 4)]
    crit = StyleLoss.from_features(style, weights=[2.0, 1.0])
    assert [t.shape for t in crit.targets] == [(4, 4), (6, 6)]
    assert set(dict(crit.named_buffers())) == {"target_0", "target_1"}
    assert not list(crit.parameters())
    torch.testing.assert_close(crit.target_0, gram_ref(style[0])[0])
    assert crit([s.expand(3, -1, -1, -1) for s in style]).item() < 1e-10  # the style itself
    x = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 2, 2)]
    want = style_loss_ref(x, [gram_ref(s)[0] for s in style], [2.0, 1.0])
    torch.testing.assert_close(crit(x), want)
    per_image = StyleLoss.from_features([torch.randn(3, 4, 5, 5)])
    assert per_image.target_0.shape == (3, 4, 4)
    assert "channels=[4, 6]" in repr(crit)
    with pytest.raises(ValueError, match=r"targets\[0\] must be \(C, C\)"):
        StyleLoss([torch.zeros(4, 5)])
    with pytest.raises(ValueError, match="weights has 1 entries but targets has 2 layers"):
        StyleLoss.from_features(style, weights=[1.0])


F4 = torch.zeros(2, 4, 3, 3)
T4 = torch.zeros(4, 4)


@pytest.mark.parametrize(
    "feats, targets, weights, err, match",
    [
        ([], [], None, ValueError, "feats is empty"),
        ([F4], [], None, ValueError, "targets is empty"),
        ([F4, F4], [T4], None, ValueError, "targets has 1 layers but feats has 2"),
        ([F4], [T4], [1.0, 2.0], ValueError, "weights has 2 entries but feats has 1 layers"),
        ([F4, torch.zeros(4, 3, 3)], [T4, T4], None, ValueError, r"feats\[1\] must be 4-D"),
        ([F4.long()], [T4], None, TypeError, r"feats\[0\] must be a floating.*int64"),
        ([F4], [T4.int()], None, TypeError, r"targets\[0\] must be a floating.*int32"),
        (
            [F4, F4],
            [T4, torch.zeros(5, 5)],
            None,
            ValueError,
            r"targets\[1\] has shape \(5, 5\) but feats\[1\] has 4 channels.*expected \(4, 4\)",
        ),
        ([F4], [torch.zeros(3, 4, 4)], None, ValueError, r"\(2, 4, 4\)"),
        ([torch.zeros(2, 4, 0, 3)], [T4], None, ValueError, "H, W >= 1"),
        ("feats", [T4], None, TypeError, "feats must be a tensor or a list"),
        (
            [F4],
            [torch.zeros(4, 4, device="meta")],
            None,
            ValueError,
            r"targets\[0\] is on meta but feats\[0\] is on cpu",
        ),
    ],
)
def test_bad_inputs(feats, targets, weights, err, match):
    with pytest.raises(err, match=match):
        style_loss(feats, targets, weights)


def test_gram_bad_inputs():
    with pytest.raises(ValueError, match=r"f must be 4-D, got shape \(4, 3\)"):
        gram(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="f must be a floating"):
        gram(torch.zeros(1, 2, 3, 3, dtype=torch.int32))
