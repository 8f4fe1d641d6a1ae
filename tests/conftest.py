"""Test setup: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before any kernel module (fastnca.kernels.*) is imported, because
@triton.jit reads it at decoration time.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastnca.nca.distill import TEXTURE_CLIP  # noqa: E402


def pytest_sessionstart(session):
    # Build the C++ CPU kernels before any test (about 45 s, once per machine), so that no test
    # and no `fastnca` subprocess of a test waits on the compiler. CI requires them.
    from fastnca.ops import _cpp_kernels

    if _cpp_kernels.kernels() is None and os.environ.get("FASTNCA_REQUIRE_CPU_KERNELS") == "1":
        pytest.exit(f"C++ CPU kernels required: {_cpp_kernels.status()}", returncode=1)


# One intra-op thread: the tests' tensors are small, and on a busy 2-core machine two threads made
# them up to 20x slower (each test file used to pin this itself).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tolerance rule, derived from the kernels' arithmetic (float32 accumulation, float64 for float64
# input; one final rounding to the output dtype d, to nearest even on every path):
#
#   y      = the exact result (float64 reference on the same input values),
#   mag    = the same computation on |inputs| (sum of |terms|; for a ReLU MLP: the network on
#            absolute values, where every ReLU is the identity), an upper bound on what the
#            accumulation rounds,
#   n      = the accumulation length (terms summed along the longest dependency chain),
#   u_acc  = 2^-24 (float32 accumulate) or 2^-53 (float64);
#   the accumulated value y_k obeys |y_k - y| <= gamma_n * mag, gamma_n = n u / (1 - n u), and the
#   stored value rd_d(y_k) is within half a unit in the last place of d: so
#
#       |got - y| <= 0.5 ulp_d(max(|got|, |y|)) + gamma_n(u_acc) * mag          (assert_rounded)
#
# With mag ~ |y| and n small, gamma_n mag is ~1e-6 of |y|: a bfloat16 output must be the correctly
# rounded value of y (or its neighbour when y_k lies within gamma_n mag of a rounding boundary).
# Half-precision arithmetic inside a kernel, truncation instead of rounding, a wrong scale or a
# missing term break it. float32 results (losses, residuals, weight gradients) get the same rule
# with d = float32. TOL is for float32/float64 paths whose rounding sequence differs from the
# reference's (autograd, opcheck); half precision has no loose entry: it is checked by the rule.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def ulp(v, dtype):
    """Spacing of ``dtype`` at |v| (float64); below the normal range, the subnormal spacing."""
    fi = torch.finfo(dtype)
    a = v.double().abs()
    _, e = torch.frexp(a)  # a = m 2^e, m in [0.5, 1): spacing 2^(e-1) eps
    normal = torch.ldexp(torch.full_like(a, fi.eps / 2), e)
    return torch.where(a < fi.tiny, torch.full_like(a, fi.tiny * fi.eps), normal)


def assert_rounded(got, exact, mag, n, acc=torch.float32, name="output", rel=0.0):
    """got (any float dtype) against the exact float64 result under the rule above; ``rel``: an
    extra relative error on the terms (operands rounded before a dot: the unit roundoff of the
    type they were rounded to, e.g. 2^-8 for bf16 tensor-core operands, 2^-11 for tf32)."""
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    u = UNIT[acc]
    gamma = n * u / (1 - n * u)
    g, y = got.double(), exact.double()
    bound = 0.5 * ulp(torch.maximum(g.abs(), y.abs()), got.dtype) + (gamma + rel) * mag.double()
    err = (g - y).abs()
    bad = ~(err <= bound)  # NaN (an unwritten cell) fails too
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name} ({got.dtype}): {int(bad.sum())}/{bad.numel()} beyond 0.5 ulp + gamma_{n}*mag; "
            f"first at {i}: got {g.flatten()[i].item()!r}, exact {y.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}"
        )


def assert_perceive_matches_ref(op, x, k):
    """op(x, k) and its gradient equal fastnca.reference.perceive_ref's (float64 tolerance)."""
    from fastnca.reference import perceive_ref

    out = op(x, k)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    want = perceive_ref(x, k)
    (wdx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    torch.testing.assert_close(dx, wdx, **TOL[torch.float64])


def nan_like(shape, dtype, device="cpu"):
    """Output buffer filled with NaN, so a cell a kernel never writes fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# A texture-NCA run that takes a second: a 16x16 grid, 4 channels, 8 hidden, a pool of 4,
# batches of 2, 2-3 steps, random VGG weights (no download). TrainConfig fields.
TINY_RUN = dict(
    size=16, channels=4, hidden=8, pool=4, batch=2, min_steps=2, max_steps=3, weights="random"
)


def tiny_train_args(max_steps=3, gif_frames=1, progress=False) -> list[str]:
    """TINY_RUN as `fastnca train` options (with ``max_steps``), and ``gif_frames`` GIF frames."""
    run = {**TINY_RUN, "max_steps": max_steps, "gif_frames": gif_frames}
    args = [a for k, v in run.items() for a in ("--" + k.replace("_", "-"), str(v))]
    return args if progress else args + ["--no-progress"]


class NanTorch:
    """torch, except that empty/empty_like give NaN-filled float buffers (outputs, per-program
    partial weight gradients, scratch): a cell or partial no program writes fails. Patched in as a
    kernel module's ``torch``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *a, **k):
        return self._nan(torch.empty(*a, **k))

    def empty_like(self, *a, **k):
        return self._nan(torch.empty_like(*a, **k))


# Step-option sets shared by the options tests (TEXTURE_CLIP: the published texture models').
STEP_OPTION_SETS = {
    "growing": dict(padding="zeros", alive_threshold=0.1, perception_angle=0.4),
    "texture": dict(clip=TEXTURE_CLIP),
    "all": dict(
        padding="zeros",
        alive_threshold=0.1,
        clip={
            "perception": (-1.0, 1.0),
            "hidden": (0.0, 1.5),
            "update": (-0.3, 0.3),
            "state": (-1.0, 2.0),
        },
        perception_angle=-1.1,
    ),
}
