"""nca_step with options on the Triton path (FASTNCA_BACKEND=triton, interpreted kernels on CPU):
zero padding, clips, any filter bank, rotated perception and alive masking against nca_step_ref,
forward and gradients; saved bytes; compile traces."""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import STEP_OPTION_SETS, TOL, NanTorch

import fastnca.kernels.nca_step as knca
from fastnca import DISTILL_FILTERS
from fastnca.nca.model import saved_tensor_bytes
from fastnca.ops import _backend, nca_step
from fastnca.reference import alive_mask_ref, nca_step_ref

CASES = {
    "zeros": dict(padding="zeros"),
    "clip-perception": dict(clip={"perception": (-0.8, 0.8)}),
    "clip-hidden": dict(clip={"hidden": (0.2, 1.0)}),
    "clip-update": dict(clip={"update": (-0.3, None)}),
    "clip-state": dict(clip={"state": (-1.0, 1.0)}),
    "angle": dict(perception_angle=2.5),
    "alive": dict(alive_threshold=0.1),
    **STEP_OPTION_SETS,
    "circular-alive-update": dict(alive_threshold=0.1, clip={"update": (-0.5, 0.5)}),
}
NAMES = ("x", "w1", "b1", "w2", "b2")


def make(B=2, C=5, H=5, W=7, hidden=9, nf=3, dtype=torch.float64, seed=0):
    """Random step arguments; channel 3 (alpha) is far from the threshold 0.1 (|a - 0.1| >= 0.05)
    with ~60% dead cells and a dead band (columns 0-2), so some cells die and some are born."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = r(B, C, H, W)
    a = torch.rand(B, H, W, generator=g, dtype=torch.float64)
    x[:, 3] = torch.where(a < 0.6, -a, 0.15 + 0.25 * a).to(dtype)
    x[:, 3, :, :3] = -a[:, :, :3].to(dtype)
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


@pytest.fixture
def launches(monkeypatch):
    """The Triton path on CPU (interpreter), NaN-filled kernel buffers; -> kernel names launched."""
    _backend.set_backend("triton")
    calls = []
    real = knca.launch
    monkeypatch.setattr(
        knca, "launch", lambda k, *a, **kw: (calls.append(k.fn.__name__), real(k, *a, **kw))[1]
    )
    monkeypatch.setattr(knca, "torch", NanTorch())
    yield calls
    _backend.set_backend(None)
    _backend.reset()


def run(a, opts, dtype, g):
    """nca_step on ``a`` cast to dtype, backward with g -> (out, grads of x, w1, b1, w2, b2)."""
    lv = [a[k].to(dtype).clone().requires_grad_() for k in NAMES]
    mask = a["mask"] if a["mask"].dtype == torch.bool else a["mask"].to(dtype)
    out = nca_step(*lv, mask=mask, filters=a["filters"].to(dtype), **opts)
    out.backward(g.to(dtype))
    return out.detach(), [t.grad for t in lv]


def reference(a, opts, g):
    lv = [a[k].clone().requires_grad_() for k in NAMES]
    out = nca_step_ref(*lv, a["mask"].double(), a["filters"], **opts)
    out.backward(g)
    return out.detach(), [t.grad for t in lv]


@pytest.mark.parametrize("nf", [3, 5])
@pytest.mark.parametrize("opts", CASES.values(), ids=CASES.keys())
def test_options_float64_against_the_reference(opts, nf, launches):
    a = make(nf=nf)
    a["w2"][3], a["b2"][3] = 0.0, -1.0  # alpha drops by 1 where cells fire: some die
    if nf == 3:  # a float update mask on half the cases
        a["mask"] = (a["mask"] * torch.rand(a["mask"].shape)).double()
    g = torch.randn(a["x"].shape, dtype=torch.float64)
    got, grads = run(a, opts, torch.float64, g)
    want, wgrads = reference(a, opts, g)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for name, gt, wt in zip(NAMES, grads, wgrads, strict=True):
        torch.testing.assert_close(gt, wt, **TOL[torch.float64], msg=lambda m, n=name: f"{n}: {m}")
    assert {"nca_step_fwd_kernel", "nca_step_bwd_kernel", "nca_step_bwd_dx_kernel"} <= set(launches)
    if opts.get("alive_threshold") is not None:
        # Cells die (alive before, not after), live on, and come to life next to living ones.
        ref = {k: v for k, v in opts.items() if k != "alive_threshold"}
        new = nca_step_ref(*(a[k] for k in NAMES), a["mask"].double(), a["filters"], **ref)
        pad = opts.get("padding", "circular")
        pre, post = (alive_mask_ref(t, 0.1, 3, pad) for t in (a["x"], new))
        assert (pre & ~post).any() and (pre & post).any()
        assert ((a["x"][:, 3:4] <= 0.1) & pre & post).any()
        assert (got[~(pre & post).expand_as(got)] == 0).all()
    clip = opts.get("clip") or {}
    # The update and state clips fold their gradient masks into g with one more forward pass.
    n_fwd = 2 if {"update", "state"} & set(clip) else 1
    assert launches.count("nca_step_fwd_kernel") == n_fwd


@pytest.mark.parametrize("opts", [CASES["texture"], CASES["growing"]], ids=["texture", "growing"])
def test_options_float32(opts, launches):
    a = make(B=1, C=6, H=6, W=7, hidden=20, nf=4 if "clip" in opts else 3)
    g = torch.randn(a["x"].shape, dtype=torch.float64)
    got, grads = run(a, opts, torch.float32, g)
    want, wgrads = reference(a, opts, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    for name, gt, wt in zip(NAMES, grads, wgrads, strict=True):
        torch.testing.assert_close(
            gt.double(), wt, **TOL[torch.float32], msg=lambda m, n=name: n + m
        )


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_clip_gradient_at_the_bounds(path, launches):
    # torch.clamp's gradient is 1 strictly inside (lo, hi) and 0 on the bounds (torch 2.14):
    # resting cells sitting exactly on a state bound, and perception on a perception bound
    # (identity filter), get the reference's gradient on the Triton and the CPU paths.
    _backend.set_backend(path)
    a = make()
    x = a["x"]
    x[:, :, ::2, ::2] = 1.0
    x[:, :, 1::2, ::3] = -1.0
    x[:, :, 1::2, 1::3] = 1.5
    opts = dict(clip={"state": (-1.0, 1.0), "perception": (-1.0, 1.0)})
    g = torch.randn(x.shape, dtype=torch.float64)
    got, grads = run(a, opts, torch.float64, g)
    want, wgrads = reference(a, opts, g)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for gt, wt in zip(grads, wgrads, strict=True):
        torch.testing.assert_close(gt, wt, **TOL[torch.float64])
    t = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    t.clamp(-1.0, 1.0).sum().backward()
    assert t.grad.tolist() == [0.0, 1.0, 0.0]  # the convention the kernels follow


def test_saved_bytes(launches):
    # x, the update mask and the alive mask per cell (4C + 2 bytes in float32), plus the bank.
    B, C, H, W = 1, 16, 9, 10
    a = make(B=B, C=C, H=H, W=W, hidden=20, nf=3, dtype=torch.float32)
    params = [a[k].requires_grad_() for k in ("w1", "b1", "w2", "b2")]
    x = a["x"].requires_grad_()
    _, info = saved_tensor_bytes(
        nca_step,
        x,
        *params,
        mask=a["mask"],
        filters=a["filters"],
        exclude=[*params, a["filters"]],
        **CASES["all"],
    )
    assert info["saved"] <= B * H * W * (4 * C + 2) + a["filters"].numel() * 4
    assert info["saved"] >= B * H * W * (4 * C + 2)


def test_compile_fullgraph_runs_the_triton_op(launches):
    # Dynamo sees the registered op as one node (no graph break); backend "eager" then runs it,
    # interpreted kernels included (inductor's lowering of the kernels is checked below).
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    a = make(B=1, C=4, H=5, W=6, hidden=8, dtype=torch.float32)
    opts = CASES["all"]

    def f(x, w1, b1, w2, b2):
        return nca_step(x, w1, b1, w2, b2, mask=a["mask"], filters=a["filters"], **opts)

    lv = [a[k].clone().requires_grad_() for k in NAMES]
    out = torch.compile(f, fullgraph=True, backend="eager")(*lv)
    out.square().sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    eager = [a[k].clone().requires_grad_() for k in NAMES]
    want = f(*eager)
    want.square().sum().backward()
    torch.testing.assert_close(out, want)
    for t, e in zip(lv, eager, strict=True):
        torch.testing.assert_close(t.grad, e.grad)
    assert "nca_step_bwd_kernel" in launches


_TRACE_SCRIPT = """
import math, torch
import torch._higher_order_ops.triton_kernel_wrap as tkw
from functorch.compile import aot_function
import fastnca
from fastnca.reference import DISTILL_FILTERS
# No GPU to lower the kernels and find what they write: name the outputs.
WRITES = {"nca_step_fwd_kernel": ["out_ptr", "gs_ptr"], "nca_step_bwd_dx_kernel": ["dx_ptr"],
          "nca_step_bwd_kernel": ["dp_ptr", "dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr"]}
tkw.get_mutated_tensors = lambda i, *a, **k: WRITES[tkw.kernel_side_table.get_kernel(i).fn.__name__]
def partition(joint, *args, **kwargs):
    print([tkw.kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
           for n in joint.graph.nodes if "triton_kernel_wrapper" in str(n.target)])
    raise SystemExit(0)
args = [t.requires_grad_() for t in (torch.randn(1, 4, 5, 7), torch.randn(10, 12),
                                     torch.randn(10), torch.randn(4, 10), torch.randn(4))]
clip = [-2.0, 2.0, 0.0, 2.0, -2.0, 2.0, -math.inf, 1.0]
f = aot_function(lambda x, w1, b1, w2, b2, m, k: torch.ops.fastnca.nca_step_options(
                     x, w1, b1, w2, b2, m, k, True, 0.1, 3, clip)[0],
                 fw_compiler=lambda gm, _: gm, partition_fn=partition)
f(*args, torch.rand(1, 1, 5, 7) < 0.5, DISTILL_FILTERS[:3])
"""


def test_compile_traces_the_option_kernels():
    # As test_nca_step's trace test, for the options op with compiled (not interpreted) kernels:
    # the joint graph holds the forward, the gradient pass of the update/state clips and both
    # backward kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(
        [
            "nca_step_fwd_kernel",
            "nca_step_fwd_kernel",
            "nca_step_bwd_kernel",
            "nca_step_bwd_dx_kernel",
        ]
    )


def test_launcher_clip_bounds_only_when_set():
    # Open ranges compile nothing: the plain step's launch has no CLIP/ZERO_PAD constexpr.
    inf = math.inf
    assert knca._options(False, None, torch.float32, "cpu") == ({}, None)
    assert knca._options(False, [-inf, inf] * 4, torch.float32, "cpu") == ({}, None)
    kw, t = knca._options(True, [-inf, inf, 0.0, inf, -inf, inf, -inf, 2.0], torch.float64, "cpu")
    assert kw == dict(ZERO_PAD=True, CLIP=2 | 8) and t.dtype == torch.float64 and t[7] == 2.0


@pytest.mark.parametrize("opts", [{}, CASES["texture"]], ids=["plain", "texture"])
def test_dot_precision_reaches_the_kernels(opts, monkeypatch):
    # nca_step(dot_precision=...) on the Triton path: the launches (forward, gradient pass,
    # backward) run the requested dots (bf16 operands are emulated exactly by the interpreter).
    ops_nca = importlib.import_module("fastnca.ops.nca_step")  # the module, not the function

    _backend.set_backend("triton")
    seen = []
    real = knca.launch
    monkeypatch.setattr(
        knca, "launch", lambda k, *a, **kw: (seen.append(kw.get("DOT_DTYPE")), real(k, *a, **kw))[1]
    )
    a = make(B=1, C=4, H=5, W=6, hidden=16, nf=4, dtype=torch.float32)
    lv = [a[k].clone().requires_grad_() for k in NAMES]
    try:
        out = nca_step(*lv, mask=a["mask"], filters=a["filters"], dot_precision="bf16", **opts)
        out.sum().backward()
        exact = nca_step(*lv, mask=a["mask"], filters=a["filters"], dot_precision="ieee", **opts)
    finally:
        _backend.set_backend(None)
        _backend.reset()
    # forward, (the clips' gradient pass,) backward; not dx (no dots); then the "ieee" forward
    assert seen.count("bf16") == (3 if opts else 2) and seen[-1] == ""
    assert 0 < (out - exact).abs().max() < 0.05
    assert ops_nca.DOT_PRECISIONS == knca.DOT_PRECISIONS


def test_dot_precision_on_the_cpu_path_is_checked_and_float32():
    a = make(B=1, C=4, H=5, W=6, hidden=8, nf=4, dtype=torch.float32)
    args = [a[k] for k in NAMES]
    base = nca_step(*args, mask=a["mask"], filters=a["filters"])
    for prec in ("bf16", "tf32", "tf32x3", "ieee"):
        got = nca_step(*args, mask=a["mask"], filters=a["filters"], dot_precision=prec)
        assert torch.equal(got, base)  # the CPU op computes in float32 whatever is asked
    for opts in ({}, CASES["growing"]):
        with pytest.raises(ValueError, match="dot_precision must be None or one of"):
            nca_step(*args, mask=a["mask"], filters=a["filters"], dot_precision="fp8", **opts)


def test_backward_configuration_per_capability():
    # sm_100 runs the backward on 16 cells x 4 warps (spill-free there, docs/gpu_static.md);
    # sm_80/sm_90 keep 32 cells x 8 warps; the forward is the same everywhere.
    from fastnca.bench import gpu_hw
    from fastnca.bench import gpu_static as gs

    for cc, bwd_cfg in ((80, (32, 8)), (90, (32, 8)), (100, (16, 4))):
        fwd, bwd, _ = gs.record(gs.Case("nca_step", "16/128", "float32", {}), gpu_hw.ARCHS[cc])
        assert (fwd.kwargs["BLOCK_M"], fwd.kwargs["num_warps"]) == (32, 4)
        assert (bwd.kwargs["BLOCK_M"], bwd.kwargs["num_warps"]) == bwd_cfg
    # the texture clips: forward, the gradient pass, backward (unpipelined: perception clip), dx
    case = gs.Case("nca_step", "texture 12/96", "float32", {"options": "texture"})
    launches = gs.record(case, gpu_hw.ARCHS[90])
    names = [la.kernel.fn.__name__.removeprefix("nca_step_") for la in launches]
    assert names == ["fwd_kernel", "fwd_kernel", "bwd_kernel", "bwd_dx_kernel"]
    assert launches[1].kwargs["GRAD"] and launches[2].kwargs["CLIP"] == 3
    assert launches[2].kwargs["num_stages"] == 1
