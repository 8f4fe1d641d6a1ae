"""CUDA-only: every Triton kernel compiled for the GPU of this machine (tests/gpu/cuda_kernels.py).

The rest of tests/ runs the kernels under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel is imported, and ``@triton.jit`` reads it once), so the
compiled kernels run here in a pytest subprocess with TRITON_INTERPRET unset and the root conftest
cut off. Skipped on machines without CUDA; `bash benchmarks/gpu_check.sh` runs the same file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_kernels_compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "cuda_kernels.py"),
        "-q",
        "-x",
        "--confcutdir",
        str(HERE),
        "-p",
        "no:cacheprovider",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
