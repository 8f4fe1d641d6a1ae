"""Backend selection (fastnca.ops._backend): which path each device takes, and that none strands.

CUDA is simulated: the capability probe and Triton's import status are replaced; a subprocess
hides Triton entirely; the Triton path itself runs on CPU under the interpreter
(FASTNCA_BACKEND=triton with TRITON_INTERPRET=1, which conftest sets).
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TOL

import fastnca.kernels.gram as kgram
import fastnca.kernels.nca_step as knca
import fastnca.kernels.perceive as kperceive
from fastnca import gram, nca_step, perceive, style_loss
from fastnca.ops import _backend
from fastnca.reference import DEFAULT_FILTERS, gram_ref, nca_step_ref, perceive_ref, style_loss_ref

CUDA0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("FASTNCA_BACKEND", raising=False)
    _backend.set_backend(None)
    _backend.reset()
    yield
    _backend.set_backend(None)
    _backend.reset()


def _gpu(monkeypatch, cap=(9, 0), triton_missing=None):
    monkeypatch.setattr(_backend, "_capability", lambda index: cap)
    monkeypatch.setattr(_backend, "triton_status", lambda: triton_missing)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("cap", [(8, 0), (9, 0), (10, 0)])
def test_auto_runs_triton_on_covered_capabilities(monkeypatch, cap):
    _gpu(monkeypatch, cap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_triton(CUDA0)
    assert f"sm_{cap[0]}{cap[1]}" in _backend.decide(CUDA0).reason


def test_auto_falls_back_once_on_uncovered_capability(monkeypatch):
    _gpu(monkeypatch, (8, 6))
    with pytest.warns(RuntimeWarning, match=r"capability 8\.6.*does not cover.*torch composite"):
        assert not _backend.use_triton(CUDA0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once only
        assert not _backend.use_triton(CUDA0)
    _backend.set_backend("triton")  # an explicit request runs Triton anyway
    assert _backend.use_triton(CUDA0)


def test_auto_falls_back_when_triton_does_not_import(monkeypatch):
    _gpu(monkeypatch, triton_missing="Triton does not import (ImportError: no module)")
    with pytest.warns(RuntimeWarning, match="pip install triton"):
        assert not _backend.use_triton(CUDA0)


def test_explicit_triton_without_triton_is_a_one_line_error(monkeypatch):
    _gpu(monkeypatch, triton_missing="Triton does not import (ImportError: no module)")
    monkeypatch.setenv("FASTNCA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"^FASTNCA_BACKEND=triton but .*pip install") as e:
        _backend.use_triton(CUDA0)
    assert "\n" not in str(e.value)


def test_torch_backend_and_bad_names(monkeypatch):
    _gpu(monkeypatch)
    monkeypatch.setenv("FASTNCA_BACKEND", "torch")
    assert not _backend.use_triton(CUDA0)
    monkeypatch.setenv("FASTNCA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTNCA_BACKEND must be one of auto, triton, torch"):
        _backend.use_triton(CUDA0)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.set_backend("fast")
    _backend.set_backend("torch")  # the Python switch wins over the environment
    assert not _backend.use_triton(CUDA0)


def test_cpu_paths(monkeypatch):
    cpu = torch.device("cpu")
    assert not _backend.use_triton(cpu)  # auto: torch composite, no warning needed
    _backend.set_backend("triton")
    assert _backend.use_triton(cpu)  # conftest sets TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="needs the Triton interpreter"):
        assert not _backend.use_triton(cpu)


def test_covered_matches_the_static_report():
    from fastnca.bench.gpu_hw import ARCHS

    assert sorted((cc // 10, cc % 10) for cc in ARCHS) == sorted(_backend.COVERED)


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch
import fastnca
from fastnca import perceive, nca_step, gram, style_loss
from fastnca.ops import _backend
x = torch.randn(2, 3, 5, 6, requires_grad=True)
y = perceive(x).sum() + gram(x).sum() + style_loss([x], [torch.eye(3)])
y = y + nca_step(x, torch.randn(8, 12), None, torch.randn(3, 8)).sum()
y.backward()
assert x.grad.isfinite().all()
print(_backend.triton_status().split(" (")[0])
_backend.set_backend("triton")
try:
    _backend.use_triton(torch.device("cuda", 0))
except RuntimeError as e:
    print(e)
"""


def test_import_and_cpu_ops_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTNCA_BACKEND")}
    r = subprocess.run(
        [sys.executable, "-c", _NO_TRITON], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-2] == "Triton does not import"
    assert lines[-1].startswith("FASTNCA_BACKEND=triton but Triton does not import")
    assert "pip install triton" in lines[-1]


def _count_launches(monkeypatch):
    calls = []
    for mod in (kperceive, knca, kgram):
        real = mod.launch
        monkeypatch.setattr(
            mod,
            "launch",
            lambda k, *a, real=real, **kw: (
                calls.append(k.fn.__name__ if hasattr(k, "fn") else str(k)),
                real(k, *a, **kw),
            )[1],
        )
    return calls


def test_triton_backend_on_cpu_runs_the_kernels_forward_and_backward(monkeypatch):
    _backend.set_backend("triton")
    calls = _count_launches(monkeypatch)
    tol = TOL[torch.float32]
    x = torch.randn(2, 3, 5, 7)
    w1, b1, w2 = torch.randn(10, 12) * 0.3, torch.randn(10), torch.randn(3, 10) * 0.3
    mask = torch.rand(2, 1, 5, 7) < 0.6
    t = torch.randn(3, 3)
    leaves = [x, w1, b1, w2]
    for fn, ref in (
        (lambda a, b, c, d: perceive(a), lambda a, b, c, d: perceive_ref(a)),
        (lambda a, b, c, d: gram(a), lambda a, b, c, d: gram_ref(a)),
        (
            lambda a, b, c, d: style_loss([a], [t]),
            lambda a, b, c, d: style_loss_ref([a], [t.double()]),
        ),
        (
            lambda a, b, c, d: nca_step(a, b, c, d, mask=mask),
            lambda a, b, c, d: nca_step_ref(
                a, b, c, d, None, mask.double(), DEFAULT_FILTERS.double()
            ),
        ),
    ):
        got_in = [v.clone().requires_grad_() for v in leaves]
        ref_in = [v.double().requires_grad_() for v in leaves]
        got, want = fn(*got_in), ref(*ref_in)
        torch.testing.assert_close(got.double(), want, **tol)
        g = torch.randn(got.shape, dtype=torch.float64)
        got.backward(g.to(got.dtype))
        want.backward(g)
        for a, b in zip(got_in, ref_in, strict=True):
            if b.grad is not None:
                torch.testing.assert_close(a.grad.double(), b.grad, **tol)
    assert {
        "perceive_fwd_kernel",
        "perceive_bwd_kernel",
        "gram_fwd_kernel",
        "gram_bwd_kernel",
        "style_fwd_kernel",
        "nca_step_fwd_kernel",
        "nca_step_bwd_kernel",
        "nca_step_bwd_dx_kernel",
    } <= set(calls)


@pytest.mark.parametrize("prec", ["bf16", "fp16", "tf32", "ieee"])
def test_nca_step_kernels_dot_precision_opt_in(prec):
    # The launchers' dot_precision: half-precision operands with float32 accumulation (emulated
    # exactly by the interpreter), or the float32 dot precisions; state stays float32.
    x, w1, b1, w2 = (
        torch.randn(1, 3, 5, 7),
        torch.randn(10, 12) * 0.3,
        torch.randn(10),
        torch.randn(3, 10) * 0.3,
    )
    mask = torch.rand(1, 1, 5, 7) < 0.6
    out = knca.nca_step_fwd(x, w1, b1, w2, None, mask, DEFAULT_FILTERS, dot_precision=prec)
    want = nca_step_ref(
        x.double(),
        w1.double(),
        b1.double(),
        w2.double(),
        None,
        mask.double(),
        DEFAULT_FILTERS.double(),
    )
    assert out.dtype == torch.float32
    tol = dict(atol=3e-2, rtol=2e-2) if prec in ("bf16", "fp16") else TOL[torch.float32]
    torch.testing.assert_close(out.double(), want, **tol)
    if prec in ("bf16", "fp16"):  # the operands really were rounded
        exact = knca.nca_step_fwd(x, w1, b1, w2, None, mask, DEFAULT_FILTERS, dot_precision="ieee")
        assert (out - exact).abs().max() > 1e-5
    dx, dw1, *_ = knca.nca_step_bwd(
        torch.ones_like(x), x, w1, b1, w2, mask, DEFAULT_FILTERS, dot_precision=prec
    )
    assert dx.isfinite().all() and dw1.isfinite().all()


def test_nca_step_dot_precision_is_checked():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="dot_precision must be one of"):
        knca.nca_step_fwd(
            x,
            torch.randn(8, 12),
            None,
            torch.randn(3, 8),
            None,
            torch.ones(1, 1, 4, 4, dtype=torch.bool),
            DEFAULT_FILTERS,
            dot_precision="fp8",
        )


def test_doctor_reports_paths_and_reasons(monkeypatch, capsys):
    import argparse

    from fastnca.cli import doctor

    parser = argparse.ArgumentParser()
    doctor.add_parser(parser.add_subparsers())
    monkeypatch.setenv("FASTNCA_BACKEND", "triton")  # CPU under the interpreter: Triton path
    assert doctor.run(parser.parse_args(["doctor"])) == 0
    out = capsys.readouterr().out
    assert "backend: FASTNCA_BACKEND=triton, TRITON_INTERPRET=1" in out
    assert "nca_step    triton Triton interpreter" in out
    assert doctor.run(parser.parse_args(["doctor", "--json"])) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    cpu = info["devices"][0]
    assert cpu["device"] == "cpu" and cpu["ops"]["gram"]["path"] == "triton"


def test_doctor_static_status_from_the_cache(tmp_path):
    # A CUDA card's static status comes from the compile cache (empty here) without compiling.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTNCA_GPU_STATIC_CACHE"] = str(tmp_path)
    code = (
        "from fastnca.cli.doctor import _static\n"
        "print(_static(75, False))\nprint(_static(90, False))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    uncovered, missing = r.stdout.strip().splitlines()[-2:]
    assert uncovered.startswith("not covered")
    assert missing.startswith("not in the cache (") and "--arch 90" in missing
