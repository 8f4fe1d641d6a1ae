"""Compiling recorded kernel launches for a named GPU without one, and reading their resources.

Each launch is compiled exactly as Triton's JIT would (the same binder, so the same argument
specialisation) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a
cubin with the ptxas shipped in the triton wheel; ptxas' ``-v`` log gives registers, stack and spill
bytes, the compiled metadata the shared memory. Results are cached by (Triton source hash,
specialisation, options, target, triton version) under ``$FASTNCA_GPU_STATIC_CACHE`` (default
``~/.cache/fastnca/gpu_static``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _cache_dir() -> str:
    d = os.environ.get("FASTNCA_GPU_STATIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastnca", "gpu_static"
    )
    os.makedirs(d, exist_ok=True)
    return d


def _job(launch, cc: int):
    """(cache key, ASTSource, target, options dict) for one launch, as Triton's JIT builds them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kern = launch.kernel
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, sig, constexprs, attrs = kern._pack_args(backend, launch.kwargs, bound, spec, opts)
    src = ASTSource(kern, sig, constexprs, attrs)
    key = hashlib.sha256(
        f"{src.hash()}|{sorted(options.__dict__.items())}|{cc}|{triton.__version__}".encode()
    ).hexdigest()[:32]
    return key, src, target, options.__dict__


def _compile(job) -> dict:
    """Compile one job -> resources (regs, stack, spill_stores, spill_loads, smem) or error."""
    import triton

    _, src, target, options = job
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v log printed to stdout
    triton.knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=target, options=options)
    except Exception as e:  # noqa: BLE001 - reported per configuration
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    log = buf.getvalue()
    m, r = _PTXAS.search(log), _REGS.search(log)
    if not m or not r:
        return {"error": "no ptxas -v log in the compile output"}
    return {
        "regs": int(r.group(1)),
        "stack": int(m.group(1)),
        "spill_stores": int(m.group(2)),
        "spill_loads": int(m.group(3)),
        "smem": int(ck.metadata.shared),
        "num_stages": int(ck.metadata.num_stages),
    }


_JOBS: dict = {}  # key -> job, read by forked compile workers (jobs hold unpicklable kernels)


def _compile_keyed(key):
    return key, _compile(_JOBS[key])


def compile_all(jobs: dict, n_jobs: int) -> dict:
    """{key: job} -> {key: resources}, from the cache where present, else compiled (in parallel)."""
    cache = _cache_dir()
    out, todo = {}, []
    for key in jobs:
        path = os.path.join(cache, key + ".json")
        if os.path.exists(path):
            with open(path) as fh:
                out[key] = json.load(fh)
        else:
            todo.append(key)
    if todo:
        print(
            f"gpu_static: compiling {len(todo)} kernel configurations "
            f"({len(out)} cached) with {n_jobs} process(es)",
            file=sys.stderr,
        )
        _JOBS.clear()
        _JOBS.update(jobs)
        if n_jobs > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(n_jobs) as pool:
                results = pool.map(_compile_keyed, todo, chunksize=1)
        else:
            results = [_compile_keyed(t) for t in todo]
        for key, res in results:
            out[key] = res
            if "error" not in res or "no ptxas" not in res["error"]:
                tmp = os.path.join(cache, f".{key}.{os.getpid()}.tmp")
                with open(tmp, "w") as fh:
                    json.dump(res, fh)
                os.replace(tmp, os.path.join(cache, key + ".json"))
    return out
