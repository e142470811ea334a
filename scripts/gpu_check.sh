#!/usr/bin/env bash
# GPU check of the native / Triton ops, for a machine with a CUDA GPU and no network.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh
#
# Stages (all run, a failure does not stop the next ones; each has a time limit):
#   env      -> $OUT/env.txt         nvidia-smi, python/torch/triton/CUDA/nvcc versions, date, git rev
#   build    -> $OUT/build.log       pip install -e . --no-build-isolation --no-deps (+ CMake log,
#                                    + what _C was built with)
#   tests    -> $OUT/gpu_tests.log   pytest tests/gpu + the CPU op tests; $OUT/junit.xml
#   memcheck -> $OUT/memcheck.log    compute-sanitizer memcheck on tests/gpu/test_gpu_ops.py -k "not slow"
#   bench    -> $OUT/bench_ops.log   pytest-benchmark bench/bench_ops.py; $OUT/bench_ops.json
#   summary  -> $OUT/summary.txt     exit code and seconds of each stage
# Exit status: 0 when every stage passed, 1 otherwise. Python: $PYTHON (default python3).
# Limits (seconds, env): BUILD_TIMEOUT=240 TESTS_TIMEOUT=150 MEMCHECK_TIMEOUT=90 BENCH_TIMEOUT=90.
set -u
: "${OUT:?set OUT to the results directory}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MAMLPP_REQUIRE_NATIVE=1   # a missing _C / cuda backend is a failure here, not a skip
unset TRITON_INTERPRET

# shellcheck source=scripts/gpu_common.sh
source scripts/gpu_common.sh

# ---- env ---------------------------------------------------------------------------------------
write_env "$OUT/env.txt"

# ---- build -------------------------------------------------------------------------------------
: >"$OUT/build.log"
stage build "${BUILD_TIMEOUT:-240}" "$OUT/build.log" \
  "$PY" -m pip install -v -e . --no-build-isolation --no-deps
{
  echo "--- build/native/native_build.log"
  cat build/native/native_build.log 2>/dev/null || echo "(missing)"
} >>"$OUT/build.log"
stage import 60 "$OUT/build.log" "$PY" -c "
from mamlpp_fast import _native
print('built with:', _native.built_with(), '| device types:', _native.device_types(), '| error:', _native.load_error())
assert 'cuda' in _native.device_types(), 'native backend built without CUDA'
import mamlpp_fast.triton as tb
print('triton available:', tb.is_available(), tb.unavailable_reason())
"

# ---- tests -------------------------------------------------------------------------------------
: >"$OUT/gpu_tests.log"
CPU_OP_TESTS=$(ls tests/test_native_cpp.py tests/test_triton_interp.py tests/test_nvcc_compile.py tests/test_ops_*.py 2>/dev/null | tr '\n' ' ')
# pytest-xdist when present: faster, and a crashing test (segfault) fails alone instead of the run
XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 4"
# shellcheck disable=SC2086
stage tests "${TESTS_TIMEOUT:-150}" "$OUT/gpu_tests.log" \
  "$PY" -m pytest tests/gpu $CPU_OP_TESTS -q -rfEs -p no:cacheprovider $XDIST --junitxml="$OUT/junit.xml"

# ---- memcheck ------------------------------------------------------------------------------------
: >"$OUT/memcheck.log"
memcheck_stage "${MEMCHECK_TIMEOUT:-90}" "$OUT/memcheck.log"

# ---- bench ---------------------------------------------------------------------------------------
: >"$OUT/bench_ops.log"
stage bench "${BENCH_TIMEOUT:-90}" "$OUT/bench_ops.log" \
  "$PY" -m pytest bench/bench_ops.py -q -p no:cacheprovider --benchmark-only --benchmark-enable \
  --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=min,median,mean,stddev,rounds \
  --benchmark-sort=name

# ---- summary -------------------------------------------------------------------------------------
fail=0
{
  echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), total ${SECONDS}s)"
  for i in "${!NAMES[@]}"; do
    status=$(stage_status "${CODES[$i]}")
    [ "$status" = ok ] || fail=1
    printf '%-9s exit %-4s %5ss  %s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}" "$status"
  done
  grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/gpu_tests.log" | tail -n 1 | sed 's/^/tests: /'
  grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -n 1 | sed 's/^/memcheck: /'
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $fail
