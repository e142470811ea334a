# Shared by scripts/gpu_check.sh and scripts/gpu_session.sh (source it; needs PY set).
#
#   stage NAME LIMIT LOG CMD...   run CMD with a time limit, output appended to LOG; records name, exit
#                                 code and seconds in NAMES/CODES/SECS. With DEADLINE set (seconds since
#                                 the script started), the limit is cut to what is left, and a stage with
#                                 under 15 s left is skipped (exit code -1).
#   memcheck_stage LIMIT LOG      compute-sanitizer memcheck on the non-slow GPU op tests
#   write_env FILE [GIT]          date, git revision, host, nvcc, compute-sanitizer, python/torch/CUDA/
#                                 cuDNN/device and package versions, nvidia-smi -> FILE

declare -a NAMES=() CODES=() SECS=()

stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
      echo "== $name: SKIPPED (${left}s left of DEADLINE=${DEADLINE})" | tee -a "$log"
      NAMES+=("$name"); CODES+=(-1); SECS+=(0)
      return
    fi
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$log"
  NAMES+=("$name"); CODES+=("$rc"); SECS+=("$((SECONDS - t0))")
  echo "== $name: exit $rc in $((SECONDS - t0))s" | tee -a "$log"
  # a caller's hook after each stage (gpu_session.sh packs what it has, so that a call stopped from
  # outside still returns every finished stage)
  if declare -F after_stage >/dev/null; then after_stage; fi
}

write_env() {
  local file=$1 git=${2:-}
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ -n "$git" ]; then
      echo "git: $git"
    else
      echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
    fi
    echo "host: $(uname -a)"
    echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' ')"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo missing)"
    "$PY" - <<'PYEOF'
import sys
print("python:", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device:", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
              round(p.total_memory / 2**30, 1), "GiB")
except Exception as e:
    print("torch: error", e)
for mod in ("triton", "jax", "pybind11", "cmake", "ninja", "pytest", "pytest_benchmark", "xdist", "setuptools"):
    try:
        m = __import__(mod)
        print(f"{mod}:", getattr(m, "__version__", "?"))
    except Exception as e:
        print(f"{mod}: missing ({e})")
PYEOF
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
  } >"$file" 2>&1
}

# compute-sanitizer memcheck on the non-slow GPU op tests (exit 127 recorded when it is missing)
memcheck_stage() {
  local limit=$1 log=$2
  if command -v compute-sanitizer >/dev/null 2>&1; then
    stage memcheck "$limit" "$log" \
      compute-sanitizer --tool memcheck --error-exitcode 17 --leak-check no --print-limit 20 \
      "$PY" -m pytest tests/gpu/test_gpu_ops.py -q -p no:cacheprovider -x -k "not slow"
  else
    echo "compute-sanitizer not found" >>"$log"
    NAMES+=(memcheck); CODES+=(127); SECS+=(0)
  fi
}

# the status word of stage i for the summaries
stage_status() {
  local code=$1
  if [ "$code" -eq -1 ]; then echo SKIPPED; elif [ "$code" -ne 0 ]; then echo FAILED; else echo ok; fi
}
