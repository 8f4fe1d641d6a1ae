"""Thread-level parallelism for the CPU ops: independent parts of one op on every core.

torch parallelises each op over its own threads, but most of what the CPU NCA step runs does not
scale that way: column gathers, scatters, threshold_backward and concatenations stay on one core,
and skinny GEMMs such as (96, 48) @ (48, n) reach about 1.3x on two cores. Splitting the op's work
itself (channels of the perception planes, blocks of fired cells of the MLP) into one part per
thread and running each part on its own core, single-threaded, scales every piece at once. torch
ops release the GIL, so plain Python threads do it.

``run_parts(fn, n)`` runs ``fn(0) .. fn(n-1)`` concurrently (this thread takes part 0) with torch's
intra-op thread count set to 1 meanwhile and restored after (torch's setting is process-wide:
concurrent torch work elsewhere in the process runs single-threaded for that moment). Results come
back in part order, so reductions over parts are deterministic for a given thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_busy = threading.local()
_active = 0  # ops inside run_parts now (any thread)
_saved = 1  # torch's thread count before the first of them


def n_parts(work: int, min_work: int) -> int:
    """How many parts to split ``work`` items into: one per torch thread, each >= ``min_work``
    items, and 1 when called from inside another part (no nesting)."""
    if getattr(_busy, "on", False) or _active:
        return 1  # inside a part, or another thread's op holds the cores
    return max(1, min(torch.get_num_threads(), work // max(1, min_work)))


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="fastnca-cpu")
            _pool_size = size
        return _pool


def _part(fn, i):
    # Worker threads do not inherit autograd's thread-local state: the parts only compute.
    _busy.on = True
    try:
        with torch.no_grad():
            return fn(i)
    finally:
        _busy.on = False


def run_parts(fn, n: int) -> list:
    """[fn(0), ..., fn(n-1)], run on n threads at once (single-threaded torch in each)."""
    if n <= 1:
        return [_part(fn, 0)]
    pool = _executor(n - 1)
    _enter()
    try:
        futures = [pool.submit(_part, fn, i) for i in range(1, n)]
        try:
            first = _part(fn, 0)
        finally:
            wait(futures)  # every part has finished before the thread count is restored
        return [first] + [f.result() for f in futures]
    finally:
        _exit()


def _enter():
    # torch's thread count is process-wide: the first op to enter saves it and sets 1, the last to
    # leave restores it (two user threads running ops at once never leave it at 1).
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _active += 1


def _exit():
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            torch.set_num_threads(_saved)


MIN_GRID = 4096  # cells below which per-channel passes stay on one thread


def channel_parts(C: int, cells: int) -> list[tuple[int, int]]:
    """Channel ranges of a per-channel pass over ``cells`` cells: one per thread on large grids."""
    return split(C, n_parts(C, 1) if cells >= MIN_GRID else 1)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal [lo, hi) ranges covering range(n)."""
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
