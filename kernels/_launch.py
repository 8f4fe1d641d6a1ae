"""One launch helper for every kernel file: traceable by torch.compile, testable on CPU, recordable.

``wrap_triton`` makes the launch visible to ``torch.compile``/``make_fx`` inside a
``torch.library.triton_op``: while tracing (arguments are fake tensors) it records the kernel in the
graph, under FakeTensorMode it does nothing, on real tensors it launches. A compiled kernel
(``triton.runtime.JITFunction``) therefore always goes through it.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` gives an interpreted function, which
``wrap_triton`` hands back unwrapped: called with fake or meta tensors (``opcheck``'s fake test,
tracing) it would read their missing data. Its effect on shapes is nil (launchers allocate the
outputs), so for interpreted kernels the launch is skipped on fake or meta tensors.

Recording (``fastnca.bench.gpu_static``): in ``with recording(GpuInfo(capability, sms)) as rec:`` a
launcher called with meta tensors launches nothing and appends one ``Launch`` (kernel, grid,
arguments, keyword arguments) per kernel to ``rec``; the launchers ask ``gpu_info(device)`` for the
capability and SM count, which the recording supplies. So the static report compiles exactly what
the launchers would launch on that GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


@dataclass(frozen=True)
class GpuInfo:
    """What a launcher may ask of the GPU: (major, minor) capability and multiprocessor count."""

    capability: tuple[int, int]
    sm_count: int
    nvidia: bool = True


@dataclass
class Launch:
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class _Recording:
    gpu: GpuInfo
    launches: list = field(default_factory=list)


_ACTIVE: list[_Recording] = []
_GPU_CACHE: dict[int, GpuInfo] = {}


@contextlib.contextmanager
def recording(gpu: GpuInfo):
    """Record launches instead of running them; yields the list of ``Launch`` records."""
    rec = _Recording(gpu)
    _ACTIVE.append(rec)
    try:
        yield rec.launches
    finally:
        _ACTIVE.remove(rec)


def gpu_info(device: torch.device) -> GpuInfo | None:
    """The GPU the launch targets: the recorded one while recording, the CUDA device's otherwise,
    None for other devices (CPU under the interpreter)."""
    if _ACTIVE:
        return _ACTIVE[-1].gpu
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _GPU_CACHE:
        p = torch.cuda.get_device_properties(idx)
        _GPU_CACHE[idx] = GpuInfo(
            (p.major, p.minor), p.multi_processor_count, torch.version.hip is None
        )
    return _GPU_CACHE[idx]


def launch(kernel, grid, *args, **kwargs) -> None:
    if _ACTIVE:
        _ACTIVE[-1].launches.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    if not isinstance(kernel, JITFunction) and any(
        isinstance(a, torch.Tensor) and (is_fake(a) or a.device.type == "meta") for a in args
    ):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
