"""nca_step: the Triton kernels (interpreter), CPU paths and registered ops against nca_step_ref."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import TOL, NanTorch, assert_rounded
from torch.library import opcheck

import fastnca.kernels.nca_step as knca
from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS
from fastnca.kernels.nca_step import nca_step_bwd, nca_step_fwd
from fastnca.nca.model import saved_tensor_bytes
from fastnca.ops import nca_step
from fastnca.ops.nca_step import _dense_checkpointed, update_mask
from fastnca.reference import nca_step_ref


def make(B, C, H, W, hidden, nf=4, b1=True, b2=False, mask="bool", dtype=torch.float64):
    """Random step arguments; filters: DEFAULT_FILTERS for nf=4, else a random bank."""
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + W + hidden + nf)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = DEFAULT_FILTERS if nf == 4 else torch.randn(nf, 3, 3, generator=g)
    fired = torch.rand(B, 1, H, W, generator=g) < 0.6
    m = fired if mask == "bool" else (fired * torch.rand(B, 1, H, W, generator=g)).to(dtype)
    return dict(
        x=r(B, C, H, W),
        w1=r(hidden, nf * C, scale=0.3),
        b1=r(hidden) if b1 else None,
        w2=r(C, hidden, scale=0.3),
        b2=r(C) if b2 else None,
        mask=m,
        filters=k.to(dtype),
    )


def ref_grads(a, g):
    """Output and gradients (x, w1, b1, w2, b2) of nca_step_ref in float64."""
    leaves = {
        k: a[k].double().clone().requires_grad_() if a[k] is not None else None
        for k in ("x", "w1", "b1", "w2", "b2")
    }
    out = nca_step_ref(**leaves, mask=a["mask"].double(), filters=a["filters"].double())
    out.backward(g.double())
    return out.detach(), [None if t is None else t.grad for t in leaves.values()]


def check_grads(got, want, tol):
    for name, gt, wt in zip(("x", "w1", "b1", "w2", "b2"), got, want, strict=True):
        if wt is None:
            assert gt is None, name
        else:
            torch.testing.assert_close(gt.double(), wt, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def nan_buffers(monkeypatch):
    monkeypatch.setattr(knca, "torch", NanTorch())


def abs_args(a):
    """The step on absolute values (every ReLU is then the identity): its output and gradients
    for |g| bound the sums of |terms| the kernels round (tests/conftest.py rule)."""
    b = {k: (v.abs() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in a.items()}
    b["mask"] = a["mask"].double().abs()
    return b


# (B, C, H, W, hidden, nf, b1, b2, mask): odd shapes, odd channel/hidden counts, several tiles of
# 16 cells with a ragged last one, grids where the wrap reaches the same cell from both sides.
CASES = [
    (2, 3, 5, 7, 10, 4, True, False, "bool"),
    (1, 4, 9, 13, 12, 5, True, True, "float"),
    (1, 12, 3, 8, 96, 4, False, True, "bool"),
    (1, 3, 1, 1, 10, 4, True, True, "bool"),
    (2, 1, 2, 3, 5, 4, True, False, "float"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_float64(case, nan_buffers):
    B, C, H, W, hidden, nf, b1, b2, mask = case
    a = make(B, C, H, W, hidden, nf, b1, b2, mask)
    args = (a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["mask"], a["filters"])
    out = nca_step_fwd(*args, block_m=16)
    g = torch.randn_like(out)
    want, wgrads = ref_grads(a, g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    dx, dw1, db1, dw2, db2 = nca_step_bwd(
        g, *args[:4], a["mask"], a["filters"], block_m=16, max_programs=2
    )
    check_grads(
        [dx, dw1, db1 if b1 else None, dw2, db2 if b2 else None], wgrads, TOL[torch.float64]
    )


# dot_precision -> extra relative error of the dot operands (the rule's ``rel``): tf32 rounds
# both operands to 11 bits (2 x 2^-11 per product, two layers), tf32x3 keeps ~22 bits, bf16/fp16
# round them to the type. Under the interpreter every dot is computed exactly in float32 (its
# input_precision is ignored; bf16/fp16 operands are rounded and upcast), so these runs check the
# GPU branches' indexing and masking at the GPU's precision.
DOT_REL = {
    None: 0.0,
    "tf32": 4 * 2.0**-11,
    "tf32x3": 4 * 2.0**-22,
    "bf16": 4 * 2.0**-8,
    "fp16": 4 * 2.0**-11,
}


@pytest.mark.parametrize(
    "dtype, prec",
    [
        (torch.float32, None),
        (torch.float16, None),
        (torch.bfloat16, None),
        (torch.float32, "tf32"),
        (torch.float32, "tf32x3"),
        (torch.float32, "bf16"),
        (torch.float32, "fp16"),
    ],
)
def test_kernels_correctly_rounded(dtype, prec, nan_buffers):
    # float32 arithmetic, one rounding of out and dx to dtype; float32 weight gradients. Chain
    # lengths: out: 9 taps + F*C + HID + 4; gradients add C + the B*H*W cells and the programs'
    # partials.
    B, C, H, W, HID, NF = 2, 3, 6, 5, 12, 4
    a = make(B, C, H, W, HID, b2=True, dtype=dtype)
    a["w1"], a["w2"] = a["w1"].float(), a["w2"].float()  # mixed: float32 weights, half state
    args = (a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["mask"], a["filters"])
    out = nca_step_fwd(*args, block_m=32, dot_precision=prec)
    assert out.dtype == dtype
    g = torch.randn(out.shape).to(dtype)
    want, wgrads = ref_grads(a, g)
    mag, mgrads = ref_grads(abs_args(a), g.abs())
    rel = DOT_REL[prec]
    n_out = 9 + NF * C + HID + 4
    assert_rounded(out, want, mag, n=n_out, rel=rel, name="out")
    grads = nca_step_bwd(
        g, *args[:4], a["mask"], a["filters"], block_m=32, max_programs=2, dot_precision=prec
    )
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    n_grad = n_out + C + B * H * W + 2
    for name, got, w, m in zip(
        ("dx", "dw1", "db1", "dw2", "db2"), grads, wgrads, mgrads, strict=True
    ):
        assert_rounded(got, w, m, n=n_grad, rel=rel, name=name)


def test_registered_op_autograd_and_opcheck():
    a = make(1, 3, 5, 6, 10, b2=True, dtype=torch.float32)
    leaves = [a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")]
    out = torch.ops.fastnca.nca_step(*leaves, a["mask"], a["filters"])
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = ref_grads(a, g)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    check_grads([t.grad for t in leaves], wgrads, TOL[torch.float32])
    # test_aot_dispatch_* need wrap_triton to trace the kernels, which the interpreter cannot do;
    # they run on CUDA in benchmarks/gpu_check.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    fresh = [t.detach().requires_grad_() for t in leaves]
    opcheck(torch.ops.fastnca.nca_step.default, (*fresh, a["mask"], a["filters"]), test_utils=utils)
    opcheck(
        torch.ops.fastnca.nca_step.default,
        (*fresh[:4], None, a["mask"], a["filters"]),
        test_utils=utils,
    )
    opcheck(
        torch.ops.fastnca.nca_step_backward.default,
        (g, a["x"], a["w1"], a["b1"], a["w2"], a["mask"], a["filters"]),
        test_utils=utils,
    )


def test_cpu_ops_opcheck():
    # The CPU ops hold no Triton: every opcheck utility runs, aot_dispatch ones included.
    a = make(2, 3, 5, 4, 6, b2=True, mask="float", dtype=torch.float32)
    leaves = [a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")]
    opcheck(torch.ops.fastnca.nca_step_cpu.default, (*leaves, a["mask"], a["filters"]))
    b = make(1, 2, 3, 3, 5, b1=False, dtype=torch.float32)
    opcheck(
        torch.ops.fastnca.nca_step_cpu.default,
        (b["x"].requires_grad_(), b["w1"], None, b["w2"], None, b["mask"], b["filters"]),
    )
    g = torch.randn(2, 3, 5, 4)
    opcheck(
        torch.ops.fastnca.nca_step_cpu_backward.default,
        (g, a["x"], a["w1"], a["b1"], a["w2"], a["mask"], a["filters"]),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("path", ["cpu", "dense"])
def test_cpu_paths_float64(case, path):
    B, C, H, W, hidden, nf, b1, b2, mask = case
    a = make(B, C, H, W, hidden, nf, b1, b2, mask)
    names = ("x", "w1", "b1", "w2", "b2")
    leaves = {k: None if a[k] is None else a[k].clone().requires_grad_() for k in names}
    if path == "cpu":
        out = nca_step(**leaves, mask=a["mask"], filters=a["filters"])
    else:  # what torch.compile and non-CPU, non-CUDA devices run
        out = _dense_checkpointed(*leaves.values(), a["mask"], a["filters"])
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = ref_grads(a, g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    check_grads(
        [None if t is None else t.grad for t in leaves.values()], wgrads, TOL[torch.float64]
    )


def test_cpu_path_blocks_of_cells(monkeypatch):
    # Fired cells go through the MLP in blocks: make them 7 cells to cross block edges.
    monkeypatch.setattr(sys.modules["fastnca.ops._nca_cpu"], "_chunk", lambda: 7)
    a = make(2, 3, 6, 5, 10, b2=True, mask="float")
    leaves = [a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")]
    out = nca_step(*leaves, mask=a["mask"], filters=a["filters"])
    g = torch.randn_like(out)
    out.backward(g)
    want, wgrads = ref_grads(a, g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    check_grads([t.grad for t in leaves], wgrads, TOL[torch.float64])


def test_cpu_path_gradcheck_layouts_and_lesson_weights():
    a = make(1, 2, 4, 3, 5, nf=3, b2=True, mask="float")
    inputs = tuple(a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2"))
    step = lambda *t: nca_step(*t, mask=a["mask"], filters=a["filters"])
    assert torch.autograd.gradcheck(step, inputs)
    # Non-contiguous and channels-last states; the lesson's (out, in, 1, 1) conv weights.
    b = make(2, 3, 7, 5, 10, dtype=torch.float32)
    want = nca_step_ref(**b)
    xt = b["x"].transpose(2, 3).contiguous().transpose(2, 3)
    xc = b["x"].contiguous(memory_format=torch.channels_last)
    for x in (xt, xc):
        got = nca_step(
            x,
            b["w1"][..., None, None],
            b["b1"],
            b["w2"][..., None, None],
            mask=b["mask"],
            filters=b["filters"],
        )
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        assert got.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_path_correctly_rounded(dtype):
    # The torch composite under the kernels' rule: float32 arithmetic, one rounding to dtype of
    # the output and of every gradient (all leaves are half here).
    B, C, H, W, HID, NF = 2, 4, 6, 7, 12, 4
    a = make(B, C, H, W, HID, b2=True, dtype=dtype)
    leaves = [a[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")]
    out = nca_step(*leaves, mask=a["mask"], filters=a["filters"])
    assert out.dtype == dtype
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    want, wgrads = ref_grads(a, g)
    mag, mgrads = ref_grads(abs_args(a), g.abs())
    n_out = 9 + NF * C + HID + 4
    assert_rounded(out, want, mag, n=n_out, name="out")
    assert all(t.grad.dtype == dtype for t in leaves)
    for name, t, w, m in zip(
        ("dx", "dw1", "db1", "dw2", "db2"), leaves, wgrads, mgrads, strict=True
    ):
        assert_rounded(t.grad, w, m, n=n_out + C + B * H * W + 2, name=name)


def test_resting_cells_are_copied_and_nan_propagates():
    a = make(1, 3, 6, 7, 10, dtype=torch.float32)
    out = nca_step(**a)
    rest = ~a["mask"].expand_as(a["x"])
    assert torch.equal(out[rest], a["x"][rest])  # bit-exact copy of resting cells
    assert not torch.equal(out[~rest], a["x"][~rest])
    x = a["x"].clone()
    x[0, 1, 0, 0] = float("nan")
    everyone = torch.ones(1, 1, 6, 7, dtype=torch.bool)
    for got in (
        nca_step(x, a["w1"], a["b1"], a["w2"], mask=everyone),
        nca_step_fwd(x, a["w1"], a["b1"], a["w2"], None, everyone, DEFAULT_FILTERS, block_m=16),
    ):
        nan = got.isnan().any(1)[0]  # (H, W): the cell and its 8 wrapped neighbours
        want = torch.zeros(6, 7, dtype=torch.bool)
        want[[0, 0, 0, 1, 1, 1, -1, -1, -1], [0, 1, -1] * 3] = True
        assert torch.equal(nan, want)
        torch.testing.assert_close(
            nca_step_ref(x, a["w1"], a["b1"], a["w2"], None, everyone), got, equal_nan=True
        )
    # Nothing fires: the state, NaN included, comes back as it was.
    none = torch.zeros_like(everyone)
    assert torch.equal(nca_step(x, a["w1"], a["b1"], a["w2"], mask=none).isnan(), x.isnan())


def test_mask_statistics_and_reproducibility():
    x = torch.zeros(4, 2, 64, 64)
    for rate in (0.5, 0.1, 0.9):
        m = update_mask(x, rate)
        assert m.dtype == torch.bool and m.shape == (4, 1, 64, 64)
        assert abs(m.float().mean().item() - rate) < 0.02  # 16384 draws: 5+ sigma
        assert abs(m[0, 0, :, :32].float().mean().item() - rate) < 0.05  # no band structure
    assert not update_mask(x, 0.0).any() and update_mask(x, 1.0).all()
    # The lesson's mask for the same seed: (rand + rate).floor().
    torch.manual_seed(7)
    m = update_mask(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(m.float(), (torch.rand(4, 1, 64, 64) + 0.3).floor())
    # nca_step without a mask draws exactly that mask from torch's generator.
    a = make(2, 3, 8, 9, 10, dtype=torch.float32)
    torch.manual_seed(3)
    got = nca_step(a["x"], a["w1"], a["b1"], a["w2"], fire_rate=0.3)
    torch.manual_seed(3)
    m = update_mask(a["x"], 0.3)
    torch.testing.assert_close(got, nca_step_ref(a["x"], a["w1"], a["b1"], a["w2"], None, m))
    torch.manual_seed(3)
    assert torch.equal(got, nca_step(a["x"], a["w1"], a["b1"], a["w2"], fire_rate=0.3))
    assert not torch.equal(got, nca_step(a["x"], a["w1"], a["b1"], a["w2"], fire_rate=0.3))


def test_compile_fullgraph_cpu_forward_backward():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    a = make(2, 3, 5, 7, 10, b2=True, dtype=torch.float32)
    names = ("x", "w1", "b1", "w2", "b2")

    def f(x, w1, b1, w2, b2):
        return nca_step(x, w1, b1, w2, b2, mask=a["mask"], filters=DISTILL_FILTERS).square().sum()

    cf = torch.compile(f, fullgraph=True)
    leaves = [a[k].clone().requires_grad_() for k in names]
    loss = cf(*leaves)
    loss.backward()
    eager = [a[k].clone().requires_grad_() for k in names]
    want = f(*eager)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    for t, e in zip(leaves, eager, strict=True):
        torch.testing.assert_close(t.grad, e.grad, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] >= 1
    # Compiled, backward still keeps only x, the mask and the shared weights and filters.
    step = torch.compile(
        lambda *t: nca_step(*t, mask=a["mask"], filters=DISTILL_FILTERS), fullgraph=True
    )
    _, info = saved_tensor_bytes(step, *leaves)
    x, mask = a["x"], a["mask"]
    shared = sum(t.numel() * t.element_size() for t in (*leaves[1:], DISTILL_FILTERS))
    assert info["saved"] <= x.numel() * x.element_size() + mask.numel() + shared


_TRACE_SCRIPT = """
import torch
import torch._higher_order_ops.triton_kernel_wrap as tkw
from functorch.compile import aot_function
import fastnca
from fastnca.reference import DEFAULT_FILTERS
# No GPU to lower the kernels and find what they write: name the outputs.
WRITES = {"nca_step_fwd_kernel": ["out_ptr"], "nca_step_bwd_dx_kernel": ["dx_ptr"],
          "nca_step_bwd_kernel": ["dp_ptr", "dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr"]}
tkw.get_mutated_tensors = lambda i, *a, **k: WRITES[tkw.kernel_side_table.get_kernel(i).fn.__name__]
def partition(joint, *args, **kwargs):
    print([tkw.kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
           for n in joint.graph.nodes if "triton_kernel_wrapper" in str(n.target)])
    raise SystemExit(0)
args = [t.requires_grad_() for t in (torch.randn(1, 3, 5, 7), torch.randn(10, 12),
                                     torch.randn(10), torch.randn(3, 10))]
f = aot_function(lambda x, w1, b1, w2, m, k: torch.ops.fastnca.nca_step(x, w1, b1, w2, None, m, k),
                 fw_compiler=lambda gm, _: gm, partition_fn=partition)
f(*args, torch.rand(1, 1, 5, 7) < 0.5, DEFAULT_FILTERS)
"""


def test_compile_traces_the_triton_kernels():
    # What torch.compile does to the registered op on CUDA, with compiled (not interpreted)
    # kernels: AOTAutograd's joint graph must hold the forward and both backward kernels (a
    # launch skipped for fake tensors would leave them out and return uninitialised memory).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(
        ["nca_step_fwd_kernel", "nca_step_bwd_kernel", "nca_step_bwd_dx_kernel"]
    )


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(x=torch.zeros(3, 5, 6)), ValueError, r"x must be 4-D"),
        (dict(x=torch.zeros(1, 3, 5, 6, dtype=torch.int32)), TypeError, "x must be a floating"),
        (dict(x=torch.zeros(1, 3, 0, 6)), ValueError, "H, W >= 1"),
        (
            dict(w1=torch.zeros(10, 13)),
            ValueError,
            r"w1 must have shape \(hidden, F\*C\) = "
            r"\(hidden, 12\).*\(10, 13\)",
        ),
        (dict(w1=torch.zeros(10, 12, 3, 3)), ValueError, "w1 must be 2-D"),
        (dict(w1=torch.zeros(10, 12, dtype=torch.int64)), TypeError, "w1 must be a floating"),
        (dict(w2=torch.zeros(3, 11)), ValueError, r"w2 must have shape \(C, hidden\) = \(3, 10\)"),
        (dict(w2=torch.zeros(4, 10)), ValueError, r"w2 must have shape"),
        (dict(b1=torch.zeros(11)), ValueError, r"b1 must have shape \(10,\), got \(11,\)"),
        (dict(b2=torch.zeros(2)), ValueError, r"b2 must have shape \(3,\)"),
        (dict(b2=torch.zeros(3, 1)), ValueError, "b2 must be 1-D"),
        (dict(filters=torch.zeros(4, 3, 2)), ValueError, r"filters must have shape \(F, 3, 3\)"),
        (dict(filters=torch.zeros(5, 3, 3)), ValueError, r"w1 must have shape.*5 filters"),
        (
            dict(mask=torch.ones(1, 1, 5, 5, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(B, 1, H, W\) = \(1, 1, 5, 6\), got \(1, 1, 5, 5\)",
        ),
        (dict(mask=torch.ones(1, 5, 6, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(mask=torch.ones(1, 1, 5, 6, dtype=torch.int64)), TypeError, "mask must be bool or"),
        (dict(fire_rate=1.5), ValueError, r"fire_rate must be a number in \[0, 1\], got 1.5"),
        (dict(fire_rate=-0.1), ValueError, "fire_rate"),
        (dict(fire_rate=float("nan")), ValueError, "fire_rate"),
        (dict(fire_rate="0.5"), ValueError, "fire_rate"),
        (dict(w1=torch.zeros(10, 12, device="meta")), ValueError, "w1 is on meta but x is on cpu"),
        (dict(mask=torch.ones(1, 1, 5, 6, device="meta")), ValueError, "mask is on meta"),
        (dict(b1=torch.zeros(10, device="meta")), ValueError, "b1 is on meta"),
        (dict(filters=torch.zeros(4, 3, 3, device="meta")), ValueError, "filters is on meta"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(change, err, match):
    args = dict(
        x=torch.zeros(1, 3, 5, 6),
        w1=torch.zeros(10, 12),
        b1=torch.zeros(10),
        w2=torch.zeros(3, 10),
        b2=None,
        mask=None,
        fire_rate=0.5,
        filters=None,
    )
    args.update(change)
    with pytest.raises(err, match=match):
        nca_step(**args)
