"""Static GPU report: every kernel launch of fastnca compiled for A100/H100/B200 without a GPU.

For each case (op, shape, dtype) and target (sm_80, sm_90, sm_100) the real launchers of
``fastnca.kernels`` are called on meta tensors inside ``fastnca.kernels._launch.recording``: they
launch nothing and hand back what they would launch (kernel, arguments, constexprs, grid, warps).
Each launch is then compiled exactly as Triton's JIT would (the same binder, so the same argument
specialisation) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, down to
a cubin with the ptxas shipped in the triton wheel; ptxas' ``-v`` log gives registers, stack and
spill bytes, the compiled metadata the shared memory. Occupancy follows from the per-arch limits;
the roofline floor of one launch from the bytes it must move and the FLOPs it must run.

    python -m fastnca.bench.gpu_static --write docs/gpu_static.md  # the full table
    python -m fastnca.bench.gpu_static --check                  # CI: exit 1 on a spill/failure

Compiled results are cached by (Triton source hash, specialisation, options, target, triton
version) under ``$FASTNCA_GPU_STATIC_CACHE`` (default ``~/.cache/fastnca/gpu_static``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from fastnca.bench.gpu_compile import _job, compile_all
from fastnca.bench.gpu_hw import ARCHS, CARDS, Arch, floor_us
from fastnca.bench.gpu_report import document, markdown

# ---------------------------------------------------------------------------------- cases

NCA_SHAPES = {  # name: (B, C, H, W, hidden); 4 filters, fire rate irrelevant to the kernels
    "lesson 4/8": (4, 4, 256, 256, 8),
    "texture 12/96": (4, 12, 128, 128, 96),
    "16/128": (4, 16, 128, 128, 128),
}
VGG_LAYERS = {  # VGG16 relu1_1..relu5_1 of one 256x256 image: (B, C, H, W)
    "relu1_1": (1, 64, 256, 256),
    "relu2_1": (1, 128, 128, 128),
    "relu3_1": (1, 256, 64, 64),
    "relu4_1": (1, 512, 32, 32),
    "relu5_1": (1, 512, 16, 16),
}
DTYPES = ("float32", "bfloat16", "float16")
NF = 4
# nca_step options that compile differently (launcher keywords, filters), float32 at one shape each:
# growing NCA (zero padding, 3 filters; alive masking is outside the kernels), texture (4 clips).
NCA_OPTIONS = {
    "growing": (dict(zero_pad=True), 3),
    "texture": (dict(clip=[-2.0, 2.0, 0.0, 2.0, -2.0, 2.0, -2.0, 2.0]), 4),
}


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    kwargs: dict  # extra launcher keyword arguments (injected configurations)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.kwargs.items())
        return f"{self.op} {self.shape} {self.dtype}{extra}"


def default_cases() -> list[Case]:
    cases = []
    for dt in DTYPES:
        for s in NCA_SHAPES:
            cases.append(Case("nca_step", s, dt, {}))
        for s in NCA_SHAPES:
            cases.append(Case("perceive", s, dt, {}))
        for s in VGG_LAYERS:
            cases.append(Case("gram", s, dt, {}))
            cases.append(Case("style_loss", s, dt, {}))
    cases.append(Case("nca_step", "16/128", "float32", {"options": "growing"}))
    cases.append(Case("nca_step", "texture 12/96", "float32", {"options": "texture"}))
    return cases


def _nca_options(case: Case) -> tuple[dict, dict, int]:
    """(launcher keywords, option keywords, filters) of an nca_step case."""
    kw = dict(case.kwargs)
    return (kw, *(NCA_OPTIONS[kw.pop("options")] if "options" in kw else ({}, NF)))


def parse_inject(spec: str) -> Case:
    """'op,shape,dtype,key=value,...' -> Case (shape as in the table, e.g. 'texture 12/96')."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) < 3:
        raise ValueError(f"--inject must be 'op,shape,dtype[,key=value...]', got {spec!r}")
    kw = {}
    for p in parts[3:]:
        k, _, v = p.partition("=")
        kw[k] = int(v) if v.lstrip("-").isdigit() else v
    return Case(parts[0], parts[1], parts[2], kw)


def record(case: Case, arch: Arch, device: str = "meta", gpu=None) -> list:
    """Call the op's launchers (forward and backward) on ``device`` tensors (meta: no data) as
    they would run on ``arch`` (or the given ``GpuInfo``); -> list of Launch, nothing launched."""
    import torch

    from fastnca.kernels import _launch
    from fastnca.kernels.gram import gram_bwd, gram_fwd, style_fwd
    from fastnca.kernels.nca_step import nca_step_bwd, nca_step_fwd
    from fastnca.kernels.perceive import perceive_bwd, perceive_fwd

    dt = getattr(torch, case.dtype)
    meta = dict(device=device)
    f32 = dict(device=device, dtype=torch.float32)
    kw, opts, nf = _nca_options(case)
    gpu = gpu or _launch.GpuInfo((arch.cc // 10, arch.cc % 10), arch.sms)
    with _launch.recording(gpu) as rec:
        if case.op in ("nca_step", "perceive"):
            B, C, H, W, HID = NCA_SHAPES[case.shape]
            x = torch.empty((B, C, H, W), dtype=dt, **meta)
            k = torch.empty((nf, 3, 3), **f32)
            if case.op == "perceive":
                perceive_fwd(x, k, **kw)
                perceive_bwd(torch.empty((B, C * nf, H, W), dtype=dt, **meta), k, **kw)
            else:
                w1, b1 = torch.empty((HID, nf * C), **f32), torch.empty((HID,), **f32)
                w2, b2 = torch.empty((C, HID), **f32), torch.empty((C,), **f32)
                m = torch.empty((B, 1, H, W), dtype=torch.bool, **meta)
                nca_step_fwd(x, w1, b1, w2, b2, m, k, **kw, **opts)
                bkw = dict(kw, **opts, b2=b2) if opts else kw  # b2 enters via the update clip
                nca_step_bwd(torch.empty_like(x), x, w1, b1, w2, m, k, **bkw)
        elif case.op in ("gram", "style_loss"):
            B, C, H, W = VGG_LAYERS[case.shape]
            f = torch.empty((B, C, H, W), dtype=dt, **meta)
            if case.op == "gram":
                g = gram_fwd(f, **kw)
                gram_bwd(torch.empty(g.shape, dtype=dt, **meta), f, sym=True)
            else:
                _, s = style_fwd(f, torch.empty((C, C), **f32), save=True, **kw)
                gram_bwd(
                    torch.empty((B, C, C), **f32),
                    f,
                    sym=False,
                    grad_scale=torch.empty((), **f32),
                    scale=1.0,
                )
        else:
            raise ValueError(f"unknown op {case.op!r}; one of nca_step, perceive, gram, style_loss")
    return list(rec)


# ---------------------------------------------------------------------------------- analysis


def _size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]


def work(case: Case, launch) -> tuple[float, float, str, float]:
    """(bytes that must move, dot FLOPs, dot kind, other FLOPs) of one launch, from its shapes.

    The kernel's own inputs and outputs count once (scratch it writes, e.g. nca_step's dP, counts:
    it is part of that launch's traffic); FLOPs are the useful ones (Gram: upper triangle only).
    """
    name = launch.kernel.fn.__name__
    s = _size(case.dtype)
    kw = launch.kwargs
    if case.op in ("nca_step", "perceive"):
        B, C, H, W, HID = NCA_SHAPES[case.shape]
        nf = _nca_options(case)[2]
        cells, FC = B * H * W, nf * C
        stencil = 18 * nf * C * cells
        prec = "half" if kw.get("DOT_DTYPE") else kw.get("DOT_PRECISION", "ieee")
        if name == "perceive_fwd_kernel" or name == "perceive_bwd_kernel":
            return cells * C * s * (1 + nf), 0.0, "ieee", stencil
        if name == "nca_step_fwd_kernel" and kw.get("GRAD"):  # reads x, g; writes 2 fp32 grads
            return cells * (2 * C * s + 1 + 8 * C), 2.0 * cells * HID * (FC + C), prec, stencil
        if name == "nca_step_fwd_kernel":
            return cells * (2 * C * s + 1), 2.0 * cells * HID * (FC + C), prec, stencil
        if name == "nca_step_bwd_kernel":
            return (
                cells * (2 * C * s + 1 + FC * 4),
                2.0 * cells * HID * (3 * FC + 2 * C),
                prec,
                stencil,
            )
        if name == "nca_step_bwd_dx_kernel":
            return cells * (FC * 4 + 2 * C * s), 0.0, "ieee", stencil
    B, C, H, W = VGG_LAYERS[case.shape]
    N = H * W
    half_in = case.dtype != "float32"
    if name in ("gram_fwd_kernel", "style_fwd_kernel"):
        prec = "half" if half_in and not kw.get("UPCAST") else kw["PREC"]
        split = launch.grid[2] if len(launch.grid) > 2 else 1
        out = B * C * C * (4 if split > 1 or name == "style_fwd_kernel" else s) * split
        extra = C * C * 4 if name == "style_fwd_kernel" else 0
        return B * C * N * s + out + extra, float(B * C * (C + 1) * N), prec, 0.0
    if name == "gram_bwd_kernel":
        prec = "half" if kw.get("DOT_IN_F_DTYPE") else kw["PREC"]
        return 2 * B * C * N * s + B * C * C * 4, 2.0 * B * C * C * N, prec, 0.0
    raise ValueError(f"no roofline formula for kernel {name}")


# ---------------------------------------------------------------------------------- report


@dataclass
class Row:
    case: Case
    kernel: str
    config: str
    grid: tuple
    warps: int
    work: tuple
    res: dict  # cc -> resources


def _config(launch) -> str:
    kern = launch.kernel
    const = {p.name for p in kern.params if p.is_constexpr}
    parts = [f"{k}={v}" for k, v in launch.kwargs.items() if k in const]
    dts = sorted(
        {
            str(a.dtype).replace("torch.", "")
            for a in launch.args
            if hasattr(a, "dtype") and a.dim() > 1
        }
    )
    return " ".join(parts) + f" [{'/'.join(dts)}]"


def build(cases: list[Case], ccs: list[int], n_jobs: int) -> list[Row]:
    rows, jobs, keys = {}, {}, {}
    for case in cases:
        for cc in ccs:
            for i, launch in enumerate(record(case, ARCHS[cc])):
                key, *job = _job(launch, cc)
                jobs[key] = (key, *job)
                rk = (case.label, i, _config(launch), launch.kwargs.get("num_warps", 4))
                if rk not in rows:
                    rows[rk] = Row(
                        case,
                        launch.kernel.fn.__name__,
                        _config(launch),
                        launch.grid,
                        launch.kwargs.get("num_warps", 4),
                        work(case, launch),
                        {},
                    )
                keys[(rk, cc)] = key
    results = compile_all(jobs, n_jobs)
    for (rk, cc), key in keys.items():
        rows[rk].res[cc] = results[key]
    return list(rows.values())


def problems(rows: list[Row], ccs) -> list[str]:
    out = []
    for r in rows:
        for cc in ccs:
            res = r.res.get(cc)
            if res is None:
                continue
            where = f"{ARCHS[cc].name.split()[0]} {r.case.label} {r.kernel} ({r.config})"
            if "error" in res:
                out.append(f"FAILS TO COMPILE {where}: {res['error']}")
            elif res["spill_stores"] or res["spill_loads"]:
                out.append(
                    f"SPILLS {where}: {res['regs']} registers, {res['stack']} B stack, "
                    f"{res['spill_stores']} B spill stores, {res['spill_loads']} B loads"
                )
            elif res["smem"] > ARCHS[cc].smem_block:
                out.append(f"SHARED MEMORY {where}: {res['smem']} B > {ARCHS[cc].smem_block} B")
    return out


def measure(cases: list[Case]) -> str:
    """On a CUDA machine: every recorded launch timed with triton.testing.do_bench (median, L2
    flushed before each rep) beside its static floor for this card -> markdown table."""
    import torch
    import triton.testing

    from fastnca.kernels import _launch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    cc = p.major * 10 + p.minor
    gpu = _launch.GpuInfo((p.major, p.minor), p.multi_processor_count)
    card = next((c for c in CARDS if c.name.split("-")[0] in p.name), None)
    card = card or next((c for c in CARDS if c.cc == cc), None)
    name = card.name if card else "no floor for this card"
    lines = [
        f"| case | kernel | µs (median) | floor µs ({name}) | % of floor |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        torch.manual_seed(0)
        for launch in record(case, ARCHS.get(cc, ARCHS[80]), device="cuda", gpu=gpu):
            for a in launch.args:  # defined values (empty buffers may hold NaN or inf)
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    a.normal_()

            def run(la=launch):
                la.kernel[la.grid](*la.args, **la.kwargs)

            us = 1e3 * triton.testing.do_bench(run, warmup=5, rep=25)
            floor = floor_us(work(case, launch), card) if card else float("nan")
            name = launch.kernel.fn.__name__
            pct = 100 * floor / us
            lines.append(f"| {case.label} | {name} | {us:.1f} | {floor:.1f} | {pct:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastnca.bench.gpu_static", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--write", metavar="PATH", help="write the markdown table (with its header)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 naming every configuration that spills, exceeds shared memory or "
        "fails to compile on the gated targets (--gate)",
    )
    ap.add_argument("--arch", default="80,90,100", help="compute capabilities to compile for")
    ap.add_argument("--gate", default="80,90,100", help="capabilities --check fails on")
    ap.add_argument("--only", default="", help="only cases whose label contains this text")
    ap.add_argument("--no-defaults", action="store_true", help="only the --inject cases")
    ap.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="SPEC",
        help="extra case 'op,shape,dtype,key=value' (launcher keyword arguments), "
        "e.g. 'nca_step,texture 12/96,float32,block_m=256'",
    )
    ap.add_argument(
        "--time",
        metavar="PATH",
        help="on a CUDA machine: time every launch (do_bench) against its floor, write markdown",
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = ap.parse_args(argv)

    try:
        ccs = [int(a) for a in args.arch.split(",") if a]
        gate = [int(a) for a in args.gate.split(",") if a]
        bad = [c for c in ccs + gate if c not in ARCHS]
        if bad:
            raise ValueError(f"--arch/--gate: unknown capability {bad[0]}; one of {list(ARCHS)}")
        cases = [] if args.no_defaults else default_cases()
        cases = [c for c in cases if args.only in c.label]
        cases += [parse_inject(s) for s in args.inject]
        for c in cases:
            if c.dtype not in DTYPES or c.shape not in {**NCA_SHAPES, **VGG_LAYERS}:
                raise ValueError(
                    f"case {c.label!r}: dtype one of {DTYPES}, shape one of "
                    f"{[*NCA_SHAPES, *VGG_LAYERS]}"
                )
    except ValueError as e:
        print(f"gpu_static: {e}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Interpreted kernels cannot be compiled: rerun with the interpreter off.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [
            sys.executable,
            "-m",
            "fastnca.gpu_static",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        return subprocess.run(cmd, env=env).returncode
    if args.time:
        with open(args.time, "w") as fh:
            fh.write(measure(cases))
        return 0
    t0 = time.time()
    rows = build(cases, ccs, args.jobs)
    secs = time.time() - t0
    table = markdown(rows, ccs)
    if args.write:
        with open(args.write, "w") as fh:
            fh.write(document(rows, ccs))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                [
                    dict(
                        case=r.case.label,
                        kernel=r.kernel,
                        config=r.config,
                        grid=r.grid,
                        warps=r.warps,
                        res={str(k): v for k, v in r.res.items()},
                        floor_us={c.name: floor_us(r.work, c) for c in CARDS},
                    )
                    for r in rows
                ],
                fh,
                indent=1,
            )
    if not args.write and not args.json and not args.check:
        print(table)
    found = problems(rows, [c for c in gate if c in ccs])
    n = sum(len(r.res) for r in rows)
    if args.check:
        for p in found:
            print(p)
        verdict = f"{len(found)} problem(s)" if found else "clean"
        print(
            f"gpu_static --check: {len(rows)} launches x {len(ccs)} targets ({n} compiles), "
            f"gated {gate}: {verdict} ({secs:.0f} s)"
        )
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
