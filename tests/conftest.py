"""Test setup: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before any kernel module (fastnca.kernels.*) is imported, because
@triton.jit reads it at decoration time.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tests' tensors are small, and on a busy 2-core machine two threads made
# them up to 20x slower (each test file used to pin this itself).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Per-dtype tolerances (relative to the output's magnitude) for kernel-vs-reference checks.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-1, rtol=2e-2),
}


def nan_like(shape, dtype, device="cpu"):
    """Output buffer filled with NaN, so a cell a kernel never writes fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
