"""fastnca.bench.gpu_static: what the launchers record, the occupancy/roofline arithmetic, and
the CI gate failing on an injected spilling configuration (compiled for sm_80 with the ptxas of
the wheel)."""

import os
import subprocess
import sys

import pytest

from fastnca.bench import gpu_compile, gpu_hw
from fastnca.bench import gpu_static as gs


def test_records_what_the_launchers_launch_for_the_target():
    # nca_step texture preset, float32, as an A100 would run it: tf32x3 dots, the persistent
    # backward sized by the SM count, the configuration rule's tiles.
    launches = gs.record(gs.Case("nca_step", "texture 12/96", "float32", {}), gpu_hw.ARCHS[80])
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == ["nca_step_fwd_kernel", "nca_step_bwd_kernel", "nca_step_bwd_dx_kernel"]
    fwd, bwd, _ = launches
    assert fwd.kwargs["DOT_PRECISION"] == "tf32x3" and fwd.kwargs["DOT_DTYPE"] == ""
    assert fwd.grid == (128 * 128 // fwd.kwargs["BLOCK_M"], 4)
    n_prog = bwd.args[-1]
    assert n_prog == 2 * gpu_hw.ARCHS[80].sms
    assert bwd.grid == (n_prog * (1 + 96 // bwd.kwargs["HB"]),)
    # The same call on sm_90 asks for that card's SM count.
    bwd90 = gs.record(gs.Case("nca_step", "texture 12/96", "float32", {}), gpu_hw.ARCHS[90])[1]
    assert bwd90.args[-1] == 2 * gpu_hw.ARCHS[90].sms


def test_gram_cases_record_forward_and_backward():
    names = [
        launch.kernel.fn.__name__
        for launch in gs.record(gs.Case("style_loss", "relu5_1", "bfloat16", {}), gpu_hw.ARCHS[90])
    ]
    assert names == ["style_fwd_kernel", "gram_bwd_kernel"]


def test_occupancy_from_registers_shared_memory_and_warps():
    a100 = gpu_hw.ARCHS[80]
    res = dict(regs=128, smem=0, spill_stores=0, spill_loads=0, stack=0)
    assert gpu_hw.occupancy(res, 4, a100) == (4, 0.25)  # 128 regs x 128 threads: 4 blocks
    assert gpu_hw.occupancy(dict(res, regs=32), 4, a100) == (16, 1.0)  # warp-slot bound
    assert gpu_hw.occupancy(dict(res, regs=32, smem=80 * 1024), 4, a100) == (2, 0.125)
    assert gpu_hw.occupancy(dict(res, smem=200 * 1024), 4, a100) == (0, 0.0)  # over the block limit
    assert gpu_hw.occupancy({"error": "x"}, 4, a100) == (0, 0.0)


def test_roofline_floor():
    case = gs.Case("perceive", "lesson 4/8", "float32", {})
    fwd = gs.record(case, gpu_hw.ARCHS[80])[0]
    nbytes, dot, kind, other = gs.work(case, fwd)
    B, C, H, W, _ = gs.NCA_SHAPES["lesson 4/8"]
    assert nbytes == B * C * H * W * 4 * (1 + gs.NF) and dot == 0.0
    a100 = gpu_hw.CARDS[0]
    assert gpu_hw.floor_us((nbytes, dot, kind, other), a100) == pytest.approx(
        1e6 * max(nbytes / 1.555e12, other / 19.5e12)
    )
    # A dot-bound launch: 1 GFLOP of tf32x3 on an A100 is 3 / 156 ms.
    assert gpu_hw.floor_us((0, 1e9, "tf32x3", 0), a100) == pytest.approx(1e6 * 3e9 / 156e12)


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Function properties for k\n"
        "    264 bytes stack frame, 100 bytes spill stores, 96 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 408 bytes cmem[0]\n"
    )
    m = gpu_compile._PTXAS.search(log)
    assert m.groups() == ("264", "100", "96") and gpu_compile._REGS.search(log).group(1) == "255"


def test_bad_arguments_exit_2(capsys):
    assert gs.main(["--arch", "75"]) == 2
    assert "unknown capability 75" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--inject must be"):
        gs.parse_inject("nca_step")


def test_check_fails_on_an_injected_spilling_configuration():
    # The gate: a clean default (perceive) passes, the injected nca_step backward at 64 cells on
    # 4 warps (outside the configuration rule) spills on sm_80, so --check exits 1 and names it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    inject = "nca_step,texture 12/96,float32,block_m=64,num_warps=4"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastnca.bench.gpu_static",
            "--check",
            "--arch",
            "80",
            "--gate",
            "80",
            "--only",
            "perceive lesson 4/8 float32",
            "--inject",
            inject,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    spills = [line for line in r.stdout.splitlines() if line.startswith("SPILLS")]
    assert spills and all("block_m=64 num_warps=4" in line for line in spills)
    assert any("nca_step_bwd_kernel" in line for line in spills)
    assert "perceive" not in "\n".join(spills)
    assert "problem(s)" in r.stdout.splitlines()[-1]
