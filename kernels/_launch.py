"""One launch helper for every kernel file: traceable by torch.compile, testable on CPU.

``wrap_triton`` makes the launch visible to ``torch.compile``/``make_fx`` inside a
``torch.library.triton_op``. Under ``TRITON_INTERPRET=1`` (CPU tests) it hands back the
interpreted kernel, which would try to read fake tensors' data while ``opcheck`` or
``torch.compile`` trace the op; the kernel's effect on shapes is nil (outputs are allocated by
the launcher), so for fake or meta tensors the launch is skipped.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton


def launch(kernel, grid, *args, **kwargs) -> None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(is_fake(t) or t.device.type == "meta" for t in tensors):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
