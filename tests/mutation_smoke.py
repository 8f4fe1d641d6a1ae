"""Mutation smoke check of the test suite's power (not collected: not named test_*.py).

    .venv/bin/python tests/mutation_smoke.py [--only LABEL] [--no-baseline]

Each deliberate bug below is applied to a temporary copy of the working tree (tracked and
untracked, non-ignored files; kernels/ also copied to fastnca/kernels so the copy imports its own
kernels ahead of the editable install), never to the checkout itself. Only the test files that
concern the bug run (each well under two minutes), with PYTHONPATH on the copy. First the same
selections run on the unmutated copy (a test already failing there does not count); then each bug
must make at least one test fail that passed unmutated. Prints a table bug -> failing tests; exit 1
if a bug survives.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    label: str
    path: str  # file in the checkout
    old: str  # text replaced (must occur; `count` times when count > 0)
    new: str
    tests: tuple[str, ...]  # pytest arguments (files and -k)
    count: int = 1  # occurrences of `old` expected (all are replaced)


BUGS = [
    Bug(
        # Only casting the conv to bf16 (acc = x.dtype) is an equivalent mutant on CPU: torch's
        # bf16 conv2d accumulates in float32 and rounds once, and DISTILL_FILTERS are exact in
        # bf16. This one sums the nine taps with half-precision adds, each rounded (float32 input
        # is unaffected: those tests must still pass).
        "perceive CPU composite sums its taps in bf16/fp16 arithmetic",
        "fastnca/ops/perceive.py",
        "    y = F.conv2d(circular_pad1(x.to(acc)), weight, groups=C)\n",
        "    xp = circular_pad1(x).repeat_interleave(filters.shape[0], 1)\n"
        "    H, W = x.shape[-2:]\n"
        "    y = sum(weight[:, 0, a, e].view(1, -1, 1, 1).to(x.dtype)"
        " * xp[:, :, a : a + H, e : e + W]\n            for a in range(3) for e in range(3))\n",
        ("tests/ops/test_perceive.py", "-k", "cpu_path"),
    ),
    Bug(
        "perceive kernel accumulates in the input dtype (half arithmetic)",
        "kernels/perceive.py",
        "acc = torch.float64 if dtype == torch.float64 else torch.float32",
        "acc = dtype",
        ("tests/ops/test_perceive.py", "-k", "kernel"),
    ),
    Bug(
        "Gram divided by N-1 instead of N (forward kernels)",
        "kernels/gram.py",
        "1.0 / N,",
        "1.0 / (N - 1),",
        ("tests/ops/test_gram.py", "-k", "kernel"),
        count=2,
    ),
    Bug(
        "nca_step forward kernel drops the update mask (every cell updated)",
        "kernels/nca_step.py",
        "    m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]\n    offs",
        "    m = (tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty) * 0 + 1)[:, None]\n"
        "    offs",
        ("tests/ops/test_nca_step.py", "-k", "kernels"),
    ),
    Bug(
        "MixedPrecision skips autocast (enabled=False)",
        "fastnca/train/callbacks/precision.py",
        "torch.autocast(self.device_type, dtype=self.dtype)",
        "torch.autocast(self.device_type, dtype=self.dtype, enabled=False)",
        ("tests/train/test_amp_active.py",),
    ),
    Bug(
        "bench gate threshold 0 (fraction ignored)",
        "fastnca/bench/gate.py",
        "want = max(frac * float(rec), 1.0)",
        "want = 0.0",
        ("tests/bench/test_bench.py", "-k", "gate and not every_baseline"),
    ),
    Bug(
        "bf16 stores truncate instead of rounding to nearest even",
        "kernels/_round.py",
        "    if dtype == tl.bfloat16:",
        "    if False:",
        ("tests/ops/test_perceive.py", "-k", "correctly_rounded"),
    ),
    Bug(
        "Gram tile mapping without the sqrt guard",
        "kernels/gram.py",
        "    tj = tl.where((tj + 1) * (tj + 2) // 2 <= p, tj + 1, tj)"
        "  # guard against sqrt rounding\n"
        "    tj = tl.where(tj * (tj + 1) // 2 > p, tj - 1, tj)\n",
        "",
        ("tests/ops/test_gram.py", "-k", "tile_pair"),
    ),
]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f.decode()
        if src.is_file():
            out = dst / f.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    shutil.copytree(dst / "kernels", dst / "fastnca" / "kernels")


def mutate(tree: Path, bug: Bug) -> None:
    rels = [bug.path] + (["fastnca/" + bug.path] if bug.path.startswith("kernels/") else [])
    for rel in rels:
        p = tree / rel
        text = p.read_text()
        n = text.count(bug.old)
        if n != bug.count:
            raise SystemExit(f"mutation {bug.label!r}: {bug.old!r} found {n}x in {rel}")
        p.write_text(text.replace(bug.old, bug.new))


def run_tests(tree: Path, args: tuple[str, ...], timeout: float = 180) -> tuple[int, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=no", "-rf", "-p", "no:cacheprovider", *args]
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"]
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    errors = re.findall(r"^ERROR (\S+)", r.stdout, re.M)
    return r.returncode, [f.split("::", 1)[-1] for f in failed + errors]


def check_imports(tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), TRITON_INTERPRET="1")
    code = "import fastnca, fastnca.kernels.gram as g; print(fastnca.__file__); print(g.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    if not all(o.startswith(str(tree)) for o in out):
        raise SystemExit(f"the copy does not import its own modules: {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="only bugs whose label contains this text")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    opts = ap.parse_args()
    bugs = [b for b in BUGS if not opts.only or opts.only in b.label]
    with tempfile.TemporaryDirectory(prefix="fastnca-mutation-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        check_imports(base)
        # Tests that already fail unmutated (a tree in flux) do not count as catching a bug.
        broken: dict[tuple, set] = {}
        if not opts.no_baseline:
            for sel in dict.fromkeys(b.tests for b in bugs):
                rc, failed = run_tests(base, sel)
                broken[sel] = set(failed)
                if rc != 0:
                    print(f"baseline: {' '.join(sel)} already fails unmutated: {failed}")
            print("baseline done")
        rows, survived = [], 0
        for i, bug in enumerate(bugs):
            tree = Path(tmp) / f"m{i}"
            shutil.copytree(base, tree)
            mutate(tree, bug)
            t0 = time.monotonic()
            rc, failed = run_tests(tree, bug.tests)
            failed = [f for f in failed if f not in broken.get(bug.tests, set())]
            caught = rc != 0 and bool(failed)
            survived += not caught
            rows.append((bug.label, " ".join(bug.tests), time.monotonic() - t0, caught, failed))
            shutil.rmtree(tree)
    for label, sel, secs, caught, failed in rows:
        print(f"\n{'CAUGHT  ' if caught else 'SURVIVED'} {label}  [{sel}; {secs:.0f} s]")
        for f in failed:
            print(f"    {f}")
    print(f"\n{len(rows) - survived}/{len(rows)} deliberate bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
