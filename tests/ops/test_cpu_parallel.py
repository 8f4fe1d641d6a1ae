"""The CPU ops' thread-level parts (fastnca.ops._cpu_parallel): results in order on distinct
threads, torch's thread count always restored, and the split nca_step / perceive paths equal to
the reference (forward and gradients, float64) with more parts than cores and uneven splits.
nca_step runs its pure-torch path here (FASTNCA_CPU_KERNELS=0); the C++ kernel that replaces it
where it builds is tested in test_cpu_kernels.py."""

import threading

import pytest
import torch
from conftest import TOL, assert_perceive_matches_ref

import fastnca.ops._cpu_parallel as par
import fastnca.ops._nca_cpu as ncpu
from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS, NCA
from fastnca.ops import nca_step
from fastnca.ops.perceive import perceive
from fastnca.reference import nca_step_ref


@pytest.fixture
def threads3(monkeypatch):
    # Three parts on any machine, and parts from the smallest grids.
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    monkeypatch.setattr(par, "MIN_GRID", 1)
    monkeypatch.setattr(ncpu, "MIN_FIRED", 1)
    monkeypatch.setenv("FASTNCA_CPU_KERNELS", "0")  # the pure-torch path of nca_step
    yield
    torch.set_num_threads(before)


def test_run_parts_order_threads_and_restore(threads3):
    seen = []
    together = threading.Barrier(3, timeout=30)  # breaks unless the three parts run at once

    def fn(i):
        together.wait()
        seen.append((i, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        assert par.n_parts(100, 1) == 1  # no nesting inside a part
        return i * 10

    assert par.run_parts(fn, 3) == [0, 10, 20]
    assert len({t for _, t, _, _ in seen}) == 3  # on three threads
    assert all(n == 1 and not grad for _, _, n, grad in seen)  # single-threaded, no autograd
    assert torch.get_num_threads() == 3
    assert par.n_parts(100, 1) == 1  # outside cores(): one part
    with par.cores() as n:
        assert n == 3 and torch.get_num_threads() == 1  # the op holds the cores
        assert par.n_parts(100, 40) == 2 and par.n_parts(100, 1) == 3 and par.n_parts(5, 10) == 1
        with par.cores() as inner:
            assert inner == 3  # re-entrant
    assert torch.get_num_threads() == 3


def test_cores_from_two_threads_restores_once(threads3):
    # A second thread entering while this one holds the cores gets one part (no
    # oversubscription) and does not restore the count when it leaves first; this thread does.
    got = []

    def other():
        with par.cores() as n:
            got.append((n, par.n_parts(100, 1)))

    with par.cores() as n:
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert torch.get_num_threads() == 1
    assert n == 3 and got == [(1, 1)] and torch.get_num_threads() == 3


def test_run_parts_error_restores_thread_count(threads3):
    def fn(i):
        if i == 2:
            raise ValueError("part 2 failed")
        return i

    with pytest.raises(ValueError, match="part 2 failed"):
        par.run_parts(fn, 3)
    assert torch.get_num_threads() == 3
    assert par.run_parts(lambda i: i, 3) == [0, 1, 2]  # the pool still works


def test_split_covers_range():
    assert par.split(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert par.split(2, 3) == [(0, 0), (0, 1), (1, 2)]
    assert par.channel_parts(12) == [(0, 12)]  # outside cores(): one part


def test_small_grids_keep_torch_threads(threads3, monkeypatch):
    monkeypatch.setattr(par, "MIN_GRID", 100)
    with par.cores(99) as n:  # too small to split: nothing held, torch keeps its threads
        assert n == 1 and torch.get_num_threads() == 3 and par.channel_parts(12) == [(0, 12)]
    with par.cores(100) as n:
        assert n == 3 and torch.get_num_threads() == 1
        assert par.channel_parts(12) == [(0, 4), (4, 8), (8, 12)]
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("bank", ["default", "distill"])  # the factorised passes, generic taps
def test_nca_step_parts_match_reference(threads3, mask_kind, bank):
    torch.manual_seed(0)
    B, C, H, W, hid = 2, 5, 9, 7, 11
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(hid, 4 * C, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(hid, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(C, hid, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, 1, H, W) < 0.5
    if mask_kind == "float":
        mask = mask.double() * torch.rand(B, 1, H, W, dtype=torch.float64)
    k = (DEFAULT_FILTERS if bank == "default" else DISTILL_FILTERS).double()
    out = nca_step(x, w1, b1, w2, None, mask, filters=k)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w1, b1, w2), g)
    want = nca_step_ref(x, w1, b1, w2, None, mask, k)
    wgrads = torch.autograd.grad(want, (x, w1, b1, w2), g)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    for got, exp in zip(grads, wgrads, strict=True):
        torch.testing.assert_close(got, exp, **TOL[torch.float64])
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("nf", [4, 2])
def test_perceive_parts_match_reference(threads3, nf):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    k = DEFAULT_FILTERS.double() if nf == 4 else torch.randn(nf, 3, 3, dtype=torch.float64)
    assert_perceive_matches_ref(perceive, x, k)


def test_step_without_mask_compiles_fullgraph():
    # The CPU step draws its mask with a custom op (single-threaded, torch's generator): compiled
    # steps trace it whole and draw the same masks as eager ones.
    torch.manual_seed(0)
    m = NCA.texture(zero_init=False)
    x = torch.rand(1, 12, 8, 8, requires_grad=True)
    torch.manual_seed(1)
    want = [m.step(x), m.step(x)]
    torch.manual_seed(1)
    step = torch.compile(m.step, fullgraph=True)
    got = [step(x), step(x)]
    torch.testing.assert_close(got, want)  # the same masks, and a new one each call
    assert not torch.equal(got[0], got[1])
    got[1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
