"""The C++ CPU kernels (kernels/nca_step_cpu.cpp, perceive_cpu.cpp, built by
fastnca.ops._cpp_kernels): nca_step's forward and gradients equal to the reference in float64 for
tiles that do and do not divide the grid, grids narrower than a tile and one-cell grids, any
filter bank, bool and float masks, with and without biases, at 1-3 threads; bitwise repeatable;
float32 at the texture preset's size; perceive's forward and adjoint in row blocks; and the
loader: a built module is imported without compiling, a failed build warns once and the
op falls back to its pure-torch path, FASTNCA_CPU_KERNELS=0 turns the kernel off."""

import importlib
import warnings

import pytest
import torch
from conftest import TOL, assert_perceive_matches_ref

import fastnca.ops._cpp_kernels as cpp
import fastnca.ops._nca_cpu as ncpu
from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS
from fastnca.ops import nca_step
from fastnca.reference import nca_step_ref

perc = importlib.import_module(
    "fastnca.ops.perceive"
)  # the module (fastnca.ops.perceive is the op)

needs_kernels = pytest.mark.skipif(
    cpp.kernels() is None, reason=f"C++ CPU kernels unavailable: {cpp.status()}"
)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _case(B, C, H, W, hid, nf, mask_kind, bias, dtype=torch.float64, scale=1.0):
    x = torch.randn(B, C, H, W, dtype=dtype, requires_grad=True)
    w1 = (scale * torch.randn(hid, nf * C, dtype=dtype)).requires_grad_()
    b1 = torch.randn(hid, dtype=dtype, requires_grad=True) if bias else None
    w2 = (scale * torch.randn(C, hid, dtype=dtype)).requires_grad_()
    b2 = torch.randn(C, dtype=dtype, requires_grad=True) if bias else None
    mask = torch.rand(B, 1, H, W) < 0.5
    if mask_kind == "float":
        mask = mask.to(dtype) * torch.rand(B, 1, H, W, dtype=dtype)
    if nf == 4:
        k = DEFAULT_FILTERS.to(dtype)
    elif nf == 3:
        k = DISTILL_FILTERS[:3].to(dtype)  # the growing models' bank
    else:
        k = torch.randn(nf, 3, 3, dtype=dtype)
    return (x, w1, b1, w2, b2, mask, k)


def _check(args, tol):
    x, w1, b1, w2, b2, mask, k = args
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]
    out = nca_step(x, w1, b1, w2, b2, mask, filters=k)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    want = nca_step_ref(x, w1, b1, w2, b2, mask, k)
    exp = torch.autograd.grad(want, params, g)
    torch.testing.assert_close(out, want, **tol)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, **tol)
    return out, got


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 9, 7),  # one tile per image
        (3, 4, 23, 100),  # 20-row tiles, the last one 3 rows
        (1, 3, 4, 2600),  # a row wider than a tile: one-row tiles
        (2, 2, 1, 1),  # one cell: it is its own neighbour
        (1, 2, 2, 3),
    ],
)
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_kernel_matches_reference(threads, monkeypatch, shape, nthreads):
    monkeypatch.setattr(ncpu, "TILE_CELLS", 2048)
    threads(nthreads)
    torch.manual_seed(0)
    _check(_case(*shape, hid=11, nf=4, mask_kind="bool", bias=True), TOL[torch.float64])


@needs_kernels
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("nf", [4, 3, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_banks_masks_biases(threads, monkeypatch, mask_kind, nf, bias):
    monkeypatch.setattr(ncpu, "TILE_CELLS", 24)  # 3-row tiles on an 8-wide grid
    threads(2)
    torch.manual_seed(1)
    _check(_case(2, 3, 10, 8, hid=7, nf=nf, mask_kind=mask_kind, bias=bias), TOL[torch.float64])


@needs_kernels
def test_kernel_float32_texture_size_and_repeatable(threads):
    # 2x64x64 grids: 4 tiles
    threads(2)
    torch.manual_seed(2)
    kw = dict(mask_kind="bool", bias=True, dtype=torch.float32, scale=0.1)  # a trained net's scale
    args = _case(2, 12, 64, 64, hid=96, nf=4, **kw)
    torch.manual_seed(3)
    out, grads = _check(args, TOL[torch.float32])
    torch.manual_seed(3)  # the same incoming gradient
    again, grads2 = _check(args, TOL[torch.float32])
    assert torch.equal(out, again)  # bitwise the same, run to run
    for a, b in zip(grads, grads2, strict=True):
        assert torch.equal(a, b)
    for n in (1, 3):  # and at any thread count (weight gradients: fixed tile groups)
        threads(n)
        torch.manual_seed(3)
        out3, grads3 = _check(args, TOL[torch.float32])
        assert torch.equal(out, out3)
        for a, b in zip(grads, grads3, strict=True):
            assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 2, 1, 4), (1, 1, 3, 1)])
@pytest.mark.parametrize("nf", [4, 3])
def test_perceive_kernel_row_blocks(threads, monkeypatch, shape, nf):
    monkeypatch.setattr(perc, "BLOCK_CELLS", 10)  # two-row blocks: halos cross blocks
    threads(2)
    torch.manual_seed(5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    k = torch.randn(nf, 3, 3, dtype=torch.float64)
    k[-1, 0] = 0  # a row without taps
    assert_perceive_matches_ref(perc.perceive, x, k)


@needs_kernels
def test_kernel_and_torch_path_agree(monkeypatch):
    torch.manual_seed(3)
    args = _case(2, 4, 12, 12, hid=9, nf=4, mask_kind="float", bias=True)
    out, grads = _check(args, TOL[torch.float64])
    monkeypatch.setenv("FASTNCA_CPU_KERNELS", "0")
    assert cpp.kernels() is None and cpp.status().startswith("off")
    out2, grads2 = _check(args, TOL[torch.float64])
    torch.testing.assert_close(out, out2, **TOL[torch.float64])


@needs_kernels
def test_built_module_is_imported_without_compiling(monkeypatch):
    from torch.utils import cpp_extension

    def no_build(*a, **k):
        raise AssertionError("compiled again although the module is built")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(cpp, "_state", {})
    assert cpp.kernels() is not None and cpp.status() == "compiled"


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("Error building extension 'fastnca_cpu': c++: not found")

    monkeypatch.setattr(cpp, "_build", broken)
    monkeypatch.setattr(cpp, "_state", {})
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: not found"):
        assert cpp.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert cpp.kernels() is None
    assert cpp.status().startswith("unavailable (RuntimeError")
    torch.manual_seed(4)
    _check(_case(1, 3, 6, 5, hid=5, nf=4, mask_kind="bool", bias=True), TOL[torch.float64])


def test_cache_folder_and_name_follow_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTNCA_CPU_KERNELS_CACHE", str(tmp_path))
    assert cpp._cache() == tmp_path
    name = cpp._name()
    assert name.startswith("fastnca_cpu_") and name == cpp._name()
    src = tmp_path / "nca_step_cpu.cpp"
    src.write_text(cpp._sources()[0].read_text() + "\n// changed\n")
    orig = cpp._sources
    monkeypatch.setattr(cpp, "_sources", lambda names=cpp._SOURCES: [src] + orig(names)[1:])
    assert cpp._name() != name  # a changed source builds anew


def test_doctor_names_the_cpu_path(monkeypatch):
    from fastnca.cli import doctor

    monkeypatch.setenv("FASTNCA_BACKEND", "torch")
    built = cpp.kernels() is not None
    ops = doctor.collect()["devices"][0]["ops"]
    assert ("C++ kernel" in ops["nca_step"]["why"]) == built
    assert ("C++ kernel" in ops["perceive"]["why"]) == built
    monkeypatch.setenv("FASTNCA_CPU_KERNELS", "0")
    ops = doctor.collect()["devices"][0]["ops"]
    assert (
        "torch parts" in ops["nca_step"]["why"]
        and "FASTNCA_CPU_KERNELS=0" in ops["nca_step"]["why"]
    )
    assert "streaming stencil passes" in ops["perceive"]["why"]
