"""`fastnca doctor`: what this machine runs, and why.

Versions (Python, torch, Triton, CUDA), the requested backend (FASTNCA_BACKEND), every device with
its compute capability and bf16 support, the path each op takes there (Triton kernels or torch
composite) with the reason, and whether the static GPU report
(python -m fastnca.bench.gpu_static) is clean for each CUDA card: read from its compile cache,
or compiled with --static.

Example:
    fastnca doctor
    fastnca doctor --json
"""

from __future__ import annotations

import json
import os
import platform

OPS = ("perceive", "nca_step", "gram", "style_loss")
# The CPU custom ops (fastnca/ops/_nca_cpu.py, perceive.py): what they run with the C++ CPU
# kernels (fastnca/ops/_cpp_kernels.py) and without them.
CPU_OPS = {
    "perceive": (
        "CPU op fastnca::perceive_cpu",
        "C++ kernel (row blocks of each plane in cache)",
        "streaming stencil passes",
    ),
    "nca_step": (
        "CPU op fastnca::nca_step_cpu: the MLP on fired cells only",
        "C++ kernel (tiles of rows fused in cache)",
        "torch parts",
    ),
}


def _cpu_paths() -> dict[str, str]:
    from fastnca.ops import _cpp_kernels

    built = _cpp_kernels.kernels() is not None
    why = "" if built else f" (C++ kernels {_cpp_kernels.status()})"
    return {
        op: f"{what}, {cpp if built else torch_path}{why}"
        for op, (what, cpp, torch_path) in CPU_OPS.items()
    }


def add_parser(sub):
    p = sub.add_parser(
        "doctor",
        help="versions, devices, and which path (Triton or torch) each op takes where",
        description="Report torch/Triton/CUDA versions, devices (capability, bf16), the path each "
        "op takes on each device and why, and whether the static GPU report is clean for each "
        "CUDA card.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--static",
        action="store_true",
        help="compile the static report for the cards here when the cache lacks it (minutes)",
    )
    return p


def _static(cc: int, compile_missing: bool) -> str:
    from fastnca.bench import gpu_compile
    from fastnca.bench import gpu_static as gs

    if cc not in gs.ARCHS:
        return f"not covered (the report compiles {', '.join(f'sm_{c}' for c in gs.ARCHS)})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "unknown under TRITON_INTERPRET=1 (run python -m fastnca.bench.gpu_static --check)"
    cases = gs.default_cases()
    jobs, missing = {}, 0
    for case in cases:
        for launch in gs.record(case, gs.ARCHS[cc]):
            key, *job = gs._job(launch, cc)
            jobs[key] = (key, *job)
            missing += not os.path.exists(os.path.join(gpu_compile._cache_dir(), key + ".json"))
    if missing and not compile_missing:
        return (
            f"not in the cache ({missing} of {len(jobs)} launches): fastnca doctor --static, or "
            f"python -m fastnca.bench.gpu_static --check --arch {cc} --gate {cc}"
        )
    rows = gs.build(cases, [cc], os.cpu_count() or 1)
    found = gs.problems(rows, [cc])
    return "clean" if not found else f"{len(found)} problem(s): {found[0]}"


def collect(compile_missing: bool = False) -> dict:
    import torch

    from fastnca.ops import _backend

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rocm": torch.version.hip,
        "triton": None,
        "triton_status": _backend.triton_status() or "imports",
        "backend": _backend.get_backend(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "devices": [],
    }
    if _backend.triton_status() is None:
        import triton

        info["triton"] = triton.__version__
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for dev in devices:
        d = {"device": str(dev)}
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            d.update(
                name=p.name,
                capability=f"{p.major}.{p.minor}",
                sms=p.multi_processor_count,
                bf16=(p.major, p.minor) >= (8, 0),
                static_report=_static(p.major * 10 + p.minor, compile_missing),
            )
        else:
            d.update(name=platform.processor() or platform.machine(), bf16=True)
        try:
            dec = _backend.decide(dev)
            path = "triton" if dec.triton else "torch"
            d["ops"] = {op: {"path": path, "why": dec.reason} for op in OPS}
            if dev.type == "cpu" and not dec.triton:
                n = torch.get_num_threads()
                for op, what in _cpu_paths().items():
                    d["ops"][op]["why"] = f"{what}, {n} thread{'s' * (n > 1)}"
            d["ops_note"] = "float64 gram/style_loss always take the torch composite"
        except (RuntimeError, ValueError) as e:
            d["ops"] = {op: {"path": "error", "why": str(e)} for op in OPS}
        info["devices"].append(d)
    return info


def run(args) -> int:
    info = collect(compile_missing=args.static)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']}  torch {info['torch']}  CUDA {info['cuda'] or '-'}", end="")
    print(f"  ROCm {info['rocm']}" if info["rocm"] else "")
    print(f"triton {info['triton'] or '-'} ({info['triton_status']})")
    interp = ", TRITON_INTERPRET=1" if info["triton_interpret"] else ""
    print(f"backend: FASTNCA_BACKEND={info['backend']}{interp}")
    for d in info["devices"]:
        extra = f" capability {d['capability']}, {d['sms']} SMs" if "capability" in d else ""
        print(f"\n{d['device']}: {d['name']}{extra}, bf16 {'yes' if d['bf16'] else 'no'}")
        for op, o in d["ops"].items():
            print(f"  {op:<11} {o['path']:<6} {o['why']}")
        if "static_report" in d:
            print(f"  static GPU report: {d['static_report']}")
    if not any(d["device"].startswith("cuda") for d in info["devices"]):
        print("\nno CUDA device: every op runs its CPU path")
    return 0
