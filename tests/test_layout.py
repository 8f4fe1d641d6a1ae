"""The package's layers: imports only go downward, no import circles, modules stay small.

Layers, lowest first (a module may import its own layer and the ones below):
kernels < reference, _io, _device < ops, losses, lesson* < train < style < nca < demos < bench < cli
(* lesson.py is the lessons' literal code; it borrows the ImageNet constants from style).
The import graph is read from the source (every ``import``/``from`` statement, also inside
functions), so a late import cannot hide a circle.
"""

import ast
from pathlib import Path

import fastnca

ROOT = Path(fastnca.__file__).resolve().parent
KERNELS = ROOT.parent / "kernels"
LAYERS = [
    ("fastnca.kernels",),
    (
        "fastnca.reference",
        "fastnca._io",
        "fastnca._device",
        "fastnca._checks",
        "fastnca._plot",
        "fastnca._memory",
    ),
    ("fastnca.ops", "fastnca.losses"),
    ("fastnca.train",),
    ("fastnca.style", "fastnca.lesson"),
    ("fastnca.nca",),
    ("fastnca.demos",),
    ("fastnca.bench",),
    ("fastnca.cli", "fastnca.__main__"),
]
MAX_LINES = 420
# One op per kernel file means a file holds the op's forward and backward kernels and their
# launch rules; the fused NCA step and the Gram/style kernels need more room than other modules.
MAX_KERNEL_LINES = 650


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT, "fastnca"), (KERNELS, "fastnca.kernels")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            if "suites" in rel.parts:  # benchmark files: scripts run by pytest, not modules
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = f
    return mods


def _imports(name: str, path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("fastnca")}


def _graph():
    mods = _modules()
    return mods, {m: {i for i in _imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def _layer(mod: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            return i
    return -1  # the package root (fastnca/__init__.py): the public API, may import anything


def test_no_import_circles():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n == "fastnca" or m == "fastnca":
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_downward():
    _, graph = _graph()
    bad = [
        f"{m} imports {n}"
        for m, deps in graph.items()
        for n in deps
        if _layer(m) >= 0 and _layer(n) > _layer(m)
    ]
    assert not bad, "upward imports: " + "; ".join(sorted(bad))


def test_only_the_bench_plugin_imports_pytest():
    mods = _modules()
    users = sorted(
        m
        for m, p in mods.items()
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and "pytest"
            in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
            for n in ast.walk(ast.parse(p.read_text()))
        )
    )
    assert users == ["fastnca.bench.plugin"]


def test_modules_stay_small():
    big = {
        m: n
        for m, p in _modules().items()
        if (n := len(p.read_text().splitlines()))
        > (MAX_KERNEL_LINES if m.startswith("fastnca.kernels.") else MAX_LINES)
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_cpp_kernels_stay_small():
    # The C++ CPU kernels (one op per file, shared stencil helpers in a header) obey the kernel
    # limit too.
    files = sorted(KERNELS.glob("*.cpp")) + sorted(KERNELS.glob("*.h"))
    assert {f.name for f in files} >= {"nca_step_cpu.cpp", "perceive_cpu.cpp", "stencil_cpu.h"}
    big = {f.name: n for f in files if (n := len(f.read_text().splitlines())) > MAX_KERNEL_LINES}
    assert not big, f"C++ kernel files over {MAX_KERNEL_LINES} lines: {big}"
