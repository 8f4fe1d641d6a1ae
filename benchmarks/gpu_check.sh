#!/usr/bin/env bash
# GPU check: one command for a CUDA machine (about 5 minutes on an H100, bounded under 8: 140 s
# tests + 230 s suite + 90 s floors = 460 s, plus start-up).
#   1. every Triton op against fastnca.reference, compiled for the GPU (TRITON_INTERPRET unset):
#      tests/gpu/cuda_kernels.py, incl. opcheck with all test_utils and compile fullgraph;
#   2. the ops benchmark suite on CUDA: lesson eager vs torch.compile vs fastnca, every row timed
#      with CUDA events, the L2 cache flushed before each call (outside the timing), with GB/s,
#      GFLOP/s and the % of its roofline floor for this card (peaks: fastnca/bench/gpu_hw.py; an
#      unknown card gets no floor, and the table says so);
#   3. every float32 kernel launch timed against its static roofline floor (% of floor);
#   4. writes docs/gpu_check.json, docs/gpu_check.md (card, versions, test tally, table) and
#      docs/gpu_check.png when matplotlib is installed.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter; default
#        .venv/bin/python when present, else python3). Exit 0 only if tests and suite pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
unset TRITON_INTERPRET
export FASTNCA_TEST_DEVICE=cuda FASTNCA_BENCH_DEVICE=cuda
t0=$(date +%s)

if ! "$PY" -c "import torch, fastnca" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch and fastnca; install with pip install -e \".[dev]\" or set PYTHON" >&2
  exit 2
fi
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
if [ -z "$card" ]; then
  echo "gpu_check: CUDA is not available here (torch.cuda.is_available() is False)" >&2
  exit 2
fi
# The card whose peaks give the floors (fastnca/bench/gpu_hw.py, looked up by this name).
floors=$("$PY" -c "import sys; from fastnca.bench.gpu_hw import card_for; c = card_for(sys.argv[1]); print(f'{c.name} peaks' if c else 'none: this card is not in fastnca/bench/gpu_hw.py, so no floor')" "$card")
mkdir -p docs
echo "== gpu_check on $card (roofline floors: $floors): kernel tests on CUDA ($(date -u +%T))"
# ~1 min; the bound leaves the suite its time inside 8 minutes.
timeout 140 "$PY" -m pytest tests/gpu/cuda_kernels.py -q -x --confcutdir tests/gpu \
  -p no:cacheprovider 2>&1 | tee docs/gpu_check_tests.log
rc_tests=${PIPESTATUS[0]}
tally=$(grep -E "^[0-9]+ (passed|failed)|passed|failed|error" docs/gpu_check_tests.log | tail -1)

echo "== gpu_check: ops suite on CUDA ($(date -u +%T))"
plot=()
"$PY" -c "import matplotlib" 2>/dev/null && plot=(--plot docs/gpu_check.png)
# Ratio gate against this card's committed baseline; without one, record it (commit the file).
kind=$("$PY" -c "from fastnca.bench.rows import device_kind as k, machine_info as m; print(k(m('cuda')))")
baseline=fastnca/bench/baselines/$kind.json
if [ -f "$baseline" ]; then
  gate=(--gate); gate_note="ratio gate against $baseline"
else
  gate=(--write-baseline); gate_note="no baseline for $kind yet: recorded $baseline, commit it"
fi
timeout 230 "$PY" -c "import sys; from fastnca.cli import main; sys.exit(main())" bench --suite ops --device cuda --json docs/gpu_check.json \
  --markdown docs/gpu_check_table.md "${plot[@]}" "${gate[@]}"
rc_bench=$?

echo "== gpu_check: float32 kernel launches against their static floors ($(date -u +%T))"
# Every recorded launch of the static report (python -m fastnca.bench.gpu_static) timed with
# triton.testing.do_bench (median, L2 flushed before each rep), beside its roofline floor.
timeout 90 "$PY" -m fastnca.bench.gpu_static --only float32 --time docs/gpu_check_floors.md
rc_floor=$?

{
  echo "# GPU check: $card"
  echo
  echo "Made by \`bash benchmarks/gpu_check.sh\` in $(( $(date +%s) - t0 )) s on $(date -u +%F)."
  echo
  echo "Kernel tests on CUDA (benchmarks/test_cuda_kernels.py): ${tally:-no result} (exit $rc_tests)."
  echo "Ops suite exit: $rc_bench ($gate_note). Roofline floors: $floors; every suite row timed"
  echo "with CUDA events, the L2 cache flushed before each call outside the timing."
  echo
  [ -f docs/gpu_check_table.md ] && cat docs/gpu_check_table.md
  echo
  echo "Kernel launches against their static floors (exit $rc_floor; floors from docs/gpu_static.md):"
  echo
  [ -f docs/gpu_check_floors.md ] && cat docs/gpu_check_floors.md
} > docs/gpu_check.md
rm -f docs/gpu_check_table.md docs/gpu_check_floors.md
echo "== gpu_check: wrote docs/gpu_check.md and docs/gpu_check.json ($(( $(date +%s) - t0 )) s)"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
