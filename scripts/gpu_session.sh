#!/usr/bin/env bash
# Everything a lent GPU machine is needed for, in one call that ends within DEADLINE seconds:
#
#   git rev-parse HEAD > .git_revision          # here, before the call (carry .git_revision)
#   OUT=/path bash scripts/gpu_session.sh        # there; or: make gpu-session OUT=/path
#
# Stages, most needed first; each gets min(its limit, what is left of DEADLINE) and is skipped when
# under 15 s are left; a failure does not stop the next one:
#   env       nvidia-smi, versions, date, git revision                         -> env.txt
#   build     pip install -e . --no-build-isolation --no-deps (+ CMake log)     -> build.log
#   import    which backends loaded                                            -> build.log
#   diagnose  python -m bench.diagnose_fused: the fused ops' kernels (first block, bn_pool) at the learner's
#             shapes in float64 against their PyTorch implementation, per result, launch variant and
#             run (a race shows as a non-deterministic result)                   -> diagnose.{log,json}
#   ceilings  python -m bench.ceilings: fp32/TF32 matmul, copy bandwidth, launch costs (bench.trace's
#             CEILINGS measured on this device, before anything else loads it)  -> ceilings.json
#   warm      one eager and one captured meta-update per workload, in background processes beside the
#             tests (python -m bench.gpu_profile --warm-only): Triton compiles the learner's kernels into
#             its on-disk cache there, not inside the timed stages after it   -> warm_*.log
#   tests     tests/gpu (conv, head, ops, learner, capture) + the CPU op tests  -> gpu_tests.log, junit.xml
#             (the summary reads junit.xml per fused op: python -m bench.fused_verdict; and with the
#             benchmark and precision files, the conv_streams and tf32x3 rules: python -m bench.decisions)
#   profile   python -m bench.gpu_profile: the captured update's time, device time per kernel category
#             beside bench.trace's prediction (both workloads)                  -> profile.{md,json}
#   bench     python -m bench.run: the conv table, fast (native backend; conv_impl auto; the fused ops,
#             first block and bn_pool, on and off; eager and CUDA graph), reference, torch.func and JAX on
#             Omniglot 20-way 1-shot B=8 and mini-ImageNet 5-way 1-shot B=2, then the B=8/B=64 roofline
#             points                                                            -> bench/
#   convab    python -m bench.conv_ab --jobs 8: the Triton convolutions with the installed Triton's
#             launch configurations against the k-major ones of Triton >= 3.7, twice the warps (more
#             resident warps per SM, a lower FFMA share) and twice the split (more programs), at
#             Omniglot's three layers and mini-ImageNet's 42x42 / 21x21 ones (its kernels compiled
#             first in 8 processes)                                             -> conv_ab.{json,md}
#   profiledefault  python -m bench.gpu_profile with the learner's own defaults (conv_impl auto; on CUDA
#             no fused op, AUTO_FUSES_ON_CUDA), run after the benchmark has compiled their kernels: the
#             per-launch table of the configuration users get                   -> profile_default.{md,json}
#   ncu       Nsight Compute on the first NCU_COUNT (24) Triton convolution launches of one eager
#             Omniglot meta-update: speed of light, occupancy, launch statistics, warp stall reasons,
#             pipe use (is the FMA pipe the busiest?) and the shared-memory table (wavefronts and bank
#             conflicts per shared load: whether the FMA loops wait on shared memory)
#             (why the convolutions reach ~32% of the fp32 peak where their loops' FFMA share is ~79%;
#             counters need the Firecracker runtime, KINDS.md)                   -> ncu.csv
#   precision python -m bench.precision --device cuda: the meta-gradient error of strict fp32, TF32
#             and 3xTF32 against float64, the device's own TF32                  -> precision.{json,md}
#   memcheck  compute-sanitizer memcheck on the non-slow GPU op tests          -> memcheck.log
#   opbench   pytest-benchmark bench/bench_ops.py                              -> bench_ops.json
# The device tool returns at most 8 files, so everything is packed into $OUT/gpu_session.tgz (refreshed
# after every stage: a call stopped from outside still returns the stages it finished), beside
# $OUT/summary.txt and copies of the benchmark's and the profile's markdown ($OUT/bench.md, profile.md).
# Limits (s, env): DEADLINE=560 BUILD_LIMIT=180 TESTS_LIMIT=150 PROFILE_LIMIT=60 BENCH_LIMIT=240
# PRECISION_LIMIT=60 MEMCHECK_LIMIT=60 CONVAB_LIMIT=40 CEILINGS_LIMIT=40 WARM_LIMIT=200 DIAGNOSE_LIMIT=90
# NCU_LIMIT=90 NCU_COUNT=24 PROFILEDEFAULT_LIMIT=40
# OPBENCH_LIMIT=45; BENCH_ARGS replaces the benchmark's arguments; PROFILE_ARGS adds to the profile's
# and the warm-up's (e.g. --conv-impl triton --fused-ops fused: the design bench.trace prices); TEST_ARGS replaces the test stage's
# files and selection; STAGES (comma-separated names of the stages above; default all) runs only those,
# in the order above, so that a lease can be spent in two calls (a second call on the same machine finds
# the build in place, and the build stage then only checks it). Python: $PYTHON (default python3).
set -u
: "${OUT:?set OUT to the results directory}"
# the stages write under a work folder outside $OUT (the device tool returns at most 8 files from $OUT):
# $OUT holds only the packed archive, refreshed after every stage, and the summary and markdown copies
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
mkdir -p "$WORK/session" "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export DEADLINE=${DEADLINE:-560}
W="$WORK/session"
after_stage() { tar -czf "$OUT/gpu_session.tgz" -C "$WORK" session 2>/dev/null || true; }
export PYTHONUNBUFFERED=1
export MAMLPP_REQUIRE_NATIVE=1   # a missing _C / cuda backend is a failure here, not a skip
unset TRITON_INTERPRET
[ -f .git_revision ] && export MAMLPP_GIT_REV="$(cat .git_revision)"
# Triton's kernel cache compiled on a CPU machine for this image (`make triton-cache`, carried as
# .triton_cache): moved to this folder's paths and used, so that the stages load kernels instead of
# compiling them; the summary counts what was compiled here anyway (a lookup that missed)
CACHE_CARRIED=0
if [ -d .triton_cache ]; then
  "$PY" -m bench.triton_cache --relocate .triton_cache >"$W/triton_cache.log" 2>&1 \
    && export TRITON_CACHE_DIR="$PWD/.triton_cache" && CACHE_CARRIED=$(ls .triton_cache | wc -l)
fi

# shellcheck source=scripts/gpu_common.sh
source scripts/gpu_common.sh

STAGES=${STAGES:-env,build,import,diagnose,ceilings,warm,tests,profile,bench,convab,profiledefault,ncu,precision,memcheck,opbench}
want() { [[ ",$STAGES," == *",$1,"* ]]; }

# ---- env ------------------------------------------------------------------------------------------
write_env "$W/env.txt" "${MAMLPP_GIT_REV:-unknown (no .git_revision)}"   # always: every call records its device

# ---- build and import -------------------------------------------------------------------------------
want build && stage build "${BUILD_LIMIT:-180}" "$W/build.log" "$PY" -m pip install -v -e . --no-build-isolation --no-deps
want build && { echo "--- build/native/native_build.log"; cat build/native/native_build.log 2>/dev/null || echo "(missing)"; } >>"$W/build.log"
want import && stage import 30 "$W/build.log" "$PY" -c "
from mamlpp_fast import _native
print('built with:', _native.built_with(), '| device types:', _native.device_types(), '| error:', _native.load_error())
import mamlpp_fast.triton as tb
print('triton available:', tb.is_available(), tb.unavailable_reason())
assert 'cuda' in _native.device_types(), 'native backend built without CUDA'
"

# ---- where the fused kernels differ from their PyTorch implementation -----------------------------------
want diagnose && stage diagnose "${DIAGNOSE_LIMIT:-90}" "$W/diagnose.log" "$PY" -m bench.diagnose_fused --out "$W/diagnose.json"

# ---- device ceilings (an idle device) ----------------------------------------------------------------
want ceilings && stage ceilings "${CEILINGS_LIMIT:-40}" "$W/ceilings.log" "$PY" -m bench.ceilings --out "$W/ceilings.json"

# ---- Triton's kernel cache filled in the background while the tests run ---------------------------------
WARM_PIDS=()
if want warm; then
  wl_limit=${WARM_LIMIT:-200}
  [ $((DEADLINE - SECONDS)) -lt "$wl_limit" ] && wl_limit=$((DEADLINE - SECONDS))
  for wl in omniglot_20w1s miniimagenet_5w1s; do
    # shellcheck disable=SC2086
    timeout --kill-after=5 "$wl_limit" "$PY" -m bench.gpu_profile --warm-only --workloads "$wl" ${PROFILE_ARGS:-} \
      >"$W/warm_$wl.log" 2>&1 &
    WARM_PIDS+=($!)
  done
fi

# ---- tests ------------------------------------------------------------------------------------------
XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n ${XDIST_WORKERS:-4}"
# pytest-timeout when present: a hanging test (an in-kernel wait that never ends) fails alone
# and a session limit 20 s inside the stage's, so that pytest reports its failures (which test, which
# result) before the stage's limit kills it
t_left=$((DEADLINE - SECONDS)); t_lim=${TESTS_LIMIT:-150}; [ "$t_left" -lt "$t_lim" ] && t_lim=$t_left
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && \
  XDIST="$XDIST --timeout=${TEST_TIMEOUT:-100} --session-timeout=$((t_lim > 40 ? t_lim - 20 : 20))"
# shellcheck disable=SC2086
# the new convolution and head tests last: their Triton kernels compile on first use (tens of seconds);
# first of all, the checks of the in-kernel sums' memory ordering (split sums, tickets), which only a
# device can run
DEFAULT_TEST_ARGS="tests/gpu/test_gpu_conv.py::test_split_sum_in_kernel_on_cuda \
tests/gpu/test_gpu_head.py::test_ticket_sums_deterministic_on_cuda tests/gpu/test_gpu_ops.py tests/gpu/test_gpu_learner.py \
tests/test_native_cpp.py tests/test_ops_bn.py tests/test_ops_lslr.py tests/test_head.py tests/test_conv.py \
tests/gpu/test_gpu_conv.py tests/gpu/test_gpu_head.py"
# shellcheck disable=SC2086
want tests && stage tests "${TESTS_LIMIT:-150}" "$W/gpu_tests.log" \
  "$PY" -m pytest ${TEST_ARGS:-$DEFAULT_TEST_ARGS} -q -rfEs -p no:cacheprovider --durations=25 $XDIST \
  --junitxml="$W/junit.xml"

# the warm-up processes end before anything is timed
if [ ${#WARM_PIDS[@]} -gt 0 ]; then
  t0=$SECONDS
  for pid in "${WARM_PIDS[@]}"; do wait "$pid"; done
  echo "== warm: waited $((SECONDS - t0))s; $(cat "$W"/warm_*.log 2>/dev/null | grep -E '^warmed|[Ee]rror' | tr '\n' ' ')" | tee -a "$W/warm.log"
fi

# ---- device profile of the captured update beside the trace's prediction -------------------------------
# shellcheck disable=SC2086
want profile && stage profile "${PROFILE_LIMIT:-60}" "$W/profile.log" "$PY" -m bench.gpu_profile ${PROFILE_ARGS:-} \
  --out "$W/profile"

# ---- learner benchmark ----------------------------------------------------------------------------------
DEFAULT_BENCH_ARGS="--device cuda --workloads omniglot_20w1s,miniimagenet_5w1s --learners fast,reference,torchfunc,jax \
--backends native --conv-impls auto --first-blocks fused,unfused --batch-sweep 8,64 --no-steps-sweep --time-budget 200 --max-time 1.5"
# shellcheck disable=SC2086
want bench && stage bench "${BENCH_LIMIT:-240}" "$W/bench.log" "$PY" -m bench.run ${BENCH_ARGS:-$DEFAULT_BENCH_ARGS} --out "$W/bench"

# ---- launch configurations A/B of the convolutions ----------------------------------------------------------
want convab && stage convab "${CONVAB_LIMIT:-40}" "$W/conv_ab.log" "$PY" -m bench.conv_ab --iters 30 --jobs 8 --out "$W/conv_ab"

# ---- the default configuration's profile (its kernels compiled by the benchmark above) ----------------------
want profiledefault && stage profiledefault "${PROFILEDEFAULT_LIMIT:-40}" "$W/profile_default.log" "$PY" \
  -m bench.gpu_profile --out "$W/profile_default"

# ---- Nsight Compute on the convolutions ---------------------------------------------------------------------
if want ncu; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [ -n "$NCU" ]; then
    stage ncu "${NCU_LIMIT:-90}" "$W/ncu.log" "$NCU" --clock-control none --target-processes all \
      --kernel-name "regex:_conv_(fwd|dgrad|wgrad)_kernel" --launch-count "${NCU_COUNT:-24}" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --csv --page details --log-file "$W/ncu.csv" "$PY" -m bench.gpu_profile --warm-only --workloads omniglot_20w1s
  else
    echo "ncu not found" >>"$W/ncu.log"; NAMES+=(ncu); CODES+=(127); SECS+=(0)
  fi
fi

# ---- precision options measured on the device (config key conv_precision: strict, TF32, 3xTF32) ----------
want precision && stage precision "${PRECISION_LIMIT:-60}" "$W/precision.log" "$PY" -m bench.precision --device cuda --seeds 5 \
  --out "$W/precision.json"

# ---- memcheck ------------------------------------------------------------------------------------------
want memcheck && memcheck_stage "${MEMCHECK_LIMIT:-60}" "$W/memcheck.log"

# ---- op benchmark --------------------------------------------------------------------------------------
want opbench && stage opbench "${OPBENCH_LIMIT:-45}" "$W/bench_ops.log" \
  "$PY" -m pytest bench/bench_ops.py -q -p no:cacheprovider --benchmark-only --benchmark-enable \
  --benchmark-json="$W/bench_ops.json" --benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name

# ---- summary and packing ---------------------------------------------------------------------------------
fail=0
{
  echo "gpu_session summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), total ${SECONDS}s of DEADLINE=${DEADLINE}s, git ${MAMLPP_GIT_REV:-unknown})"
  if [ -n "${TRITON_CACHE_DIR:-}" ] && [ -d "${TRITON_CACHE_DIR}" ]; then
    echo "triton cache: ${CACHE_CARRIED} kernels carried; $(( $(ls "$TRITON_CACHE_DIR" | wc -l) - CACHE_CARRIED )) compiled on the device ($TRITON_CACHE_DIR)"
  else
    echo "triton cache: none carried ($(cat "$W/triton_cache.log" 2>/dev/null | tail -n 1))"
  fi
  grep -sE "^(device|torch|triton|jax):" "$W/env.txt"
  for i in "${!NAMES[@]}"; do
    status=$(stage_status "${CODES[$i]}")
    [ "$status" = ok ] || fail=1
    printf '%-9s exit %-4s %5ss  %s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}" "$status"
  done
  grep -sE "built with:|triton available:" "$W/build.log" | tail -n 2
  grep -sE "(passed|failed|error)" "$W/gpu_tests.log" | tail -n 1 | sed 's/^/tests: /'
  grep -sE "^(FAILED|ERROR) " "$W/gpu_tests.log" | head -n 20
  # per fused op: whether its device tests allow config value "auto" to take it (AUTO_FUSES_ON_CUDA)
  [ -f "$W/junit.xml" ] && "$PY" -m bench.fused_verdict "$W/junit.xml" 2>&1 | sed 's/^/fused_verdict: /'
  # the decision rules of conv_streams and tf32x3 on what this call measured (tests/gpu/RESULTS.md)
  bjson=$(ls "$W"/bench/latest_cuda*.json 2>/dev/null | head -n 1)
  if [ -f "$W/junit.xml" ] || [ -n "$bjson" ] || [ -f "$W/precision.json" ]; then
    "$PY" -m bench.decisions ${bjson:+--bench "$bjson"} $( [ -f "$W/junit.xml" ] && echo --junit "$W/junit.xml" ) \
      $( [ -f "$W/precision.json" ] && echo --precision "$W/precision.json" ) 2>&1 | cut -c1-400 | sed 's/^/decision: /'
  fi
  grep -sE "^(conv_bn_pool|bn_pool) " "$W/diagnose.log" | cut -c1-220 | sed 's/^/diagnose: /'
  grep -sE "^warmed|[Ee]rror" "$W"/warm_*.log | cut -c1-200
  grep -sE "_tflops|bandwidth|launch_us" "$W/ceilings.json" | tr -s ' ' | sed 's/^/ceiling:/'
  grep -sE "ERROR SUMMARY" "$W/memcheck.log" | tail -n 1 | sed 's/^/memcheck: /'
  grep -sE "^bench: " "$W/bench.log" | cut -c1-220 | tail -n 40
  grep -sE "^(## |Captured update|Eager update)" "$W/profile.log" | cut -c1-220
  grep -sE "^(## |Captured update|Eager update)" "$W/profile_default.log" | cut -c1-220 | sed 's/^/default: /'
  # each convolution launch shape measured over predicted (rows whose third column is a layer name)
  grep -sE '^\| `_conv_[a-z]+_kernel` \| [0-9x]+ \| conv' "$W/profile.log" | head -n 16 | cut -c1-200 | sed 's/^/per-launch: /'
  grep -sE "^\| (ieee|tf32|tf32x3) \|" "$W/precision.log" | sed 's/^/precision: /' 
  grep -sE "^\| (omniglot|miniimagenet)-" "$W/conv_ab.log" | sed "s/^/conv_ab: /"
} >"$OUT/summary.txt" 2>&1
md=$(ls "$W"/bench/latest_cuda*.md 2>/dev/null | head -n 1)
[ -n "$md" ] && cp "$md" "$OUT/bench.md"
[ -f "$W/profile.md" ] && cp "$W/profile.md" "$OUT/profile.md"
[ -f "$W/conv_ab.md" ] && cp "$W/conv_ab.md" "$OUT/conv_ab.md"
[ -f "$W/ceilings.json" ] && cp "$W/ceilings.json" "$OUT/ceilings.json"
[ -f "$W/diagnose.json" ] && cp "$W/diagnose.json" "$OUT/diagnose.json"
tar -czf "$OUT/gpu_session.tgz" -C "$WORK" session && rm -rf "$WORK"
cat "$OUT/summary.txt"
exit $fail
