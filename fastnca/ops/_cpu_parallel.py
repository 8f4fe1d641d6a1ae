"""Thread-level parallelism for the CPU ops: independent parts of one op on every core.

torch parallelises each op over its own threads, but most of what the CPU NCA step runs does not
scale that way: column gathers, scatters, threshold_backward and concatenations stay on one core,
and skinny GEMMs such as (96, 48) @ (48, n) reach about 1.3x on two cores. Splitting the op's work
itself (channels of the perception planes, blocks of fired cells of the MLP) into one part per
thread and running each part on its own core, single-threaded, scales every piece at once. torch
ops release the GIL, so plain Python threads do it.

An op runs inside ``with cores() as n:``: torch's intra-op thread count is 1 for the whole op (so
no OpenMP team is started between its phases: its idle workers spin for milliseconds and would
take the cores from the parts) and restored after; ``n`` is the count the caller had. torch's
setting is process-wide, so concurrent torch work elsewhere in the process runs single-threaded
for that moment; the first op to enter saves the count and the last to leave restores it.
``run_parts(fn, k)`` runs ``fn(0) .. fn(k-1)`` at once (this thread takes part 0); results come
back in part order, so reductions over parts are deterministic for a given thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_local = threading.local()  # .threads: the caller's count inside cores(); .part: inside a part
_active = 0  # threads inside cores() now
_saved = 1  # torch's thread count before the first of them
MIN_GRID = 16384  # grid cells below which an op runs whole on torch's own threads


@contextmanager
def cores(cells: int | None = None):
    """Hold the cores for one op over ``cells`` grid cells: yields the thread count the caller
    had, with torch at 1 thread until the block ends. Yields 1 and changes nothing for grids
    under MIN_GRID cells (parts that small lose more to waking threads than they gain: their ops
    keep torch's own threads), on one thread, inside a part, or when another thread's op holds
    the cores."""
    if getattr(_local, "threads", 0) or getattr(_local, "part", False):
        yield 1 if getattr(_local, "part", False) else _local.threads
        return
    if (cells is not None and cells < MIN_GRID) or torch.get_num_threads() == 1:
        yield 1
        return
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _active += 1
        n = 1 if _active > 1 else _saved  # another thread's op holds the cores: one part
    _local.threads = max(1, n)
    try:
        yield _local.threads
    finally:
        _local.threads = 0
        with _lock:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_saved)


def n_parts(work: int, min_work: int) -> int:
    """Parts to split ``work`` items into: one per thread of the enclosing ``cores()`` (1 outside
    one), each of at least ``min_work`` items."""
    if getattr(_local, "part", False):
        return 1  # no nesting
    threads = getattr(_local, "threads", 0) or 1
    return max(1, min(threads, work // max(1, min_work)))


def channel_parts(C: int) -> list[tuple[int, int]]:
    """Channel ranges of a per-channel pass: one per thread of the enclosing ``cores()``."""
    return split(C, n_parts(C, 1))


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
    _local.part = True
    try:
        with torch.no_grad():
            return fn(i)
    finally:
        _local.part = False


def run_parts(fn, n: int) -> list:
    """[fn(0), ..., fn(n-1)], run on n threads at once (single-threaded torch in each)."""
    if n <= 1:
        return [_part(fn, 0)]
    pool = _executor(n - 1)
    with cores():
        futures = [pool.submit(_part, fn, i) for i in range(1, n)]
        try:
            first = _part(fn, 0)
        finally:
            wait(futures)  # every part has finished before the cores are given back
        return [first] + [f.result() for f in futures]


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal [lo, hi) ranges covering range(n)."""
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
