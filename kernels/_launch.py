"""One launch helper for every kernel file: traceable by torch.compile, testable on CPU.

``wrap_triton`` makes the launch visible to ``torch.compile``/``make_fx`` inside a
``torch.library.triton_op``: while tracing (arguments are fake tensors) it records the kernel in the
graph, under FakeTensorMode it does nothing, on real tensors it launches. A compiled kernel
(``triton.runtime.JITFunction``) therefore always goes through it.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` gives an interpreted function, which
``wrap_triton`` hands back unwrapped: called with fake or meta tensors (``opcheck``'s fake test,
tracing) it would read their missing data. Its effect on shapes is nil (launchers allocate the
outputs), so for interpreted kernels the launch is skipped on fake or meta tensors.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def launch(kernel, grid, *args, **kwargs) -> None:
    if not isinstance(kernel, JITFunction) and any(
        isinstance(a, torch.Tensor) and (is_fake(a) or a.device.type == "meta") for a in args
    ):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
