#!/usr/bin/env bash
# Checks the two install paths of README.md "Installing" in a fresh virtual environment:
#   1. pip install --no-build-isolation .   (torch==2.13.0 and the build requirements present): _C builds
#   2. pip install .                        (pip's build isolation hides torch): the install stops with
#                                            the message that says to use --no-build-isolation
# Usage: bash scripts/install_check.sh [LOG]   (LOG default: bench/results/install_check.txt)
# Copies the working tree to a temporary folder (no build outputs), so the repository is untouched.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="${1:-$ROOT/bench/results/install_check.txt}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
git -C "$ROOT" archive --format=tar HEAD | (mkdir -p "$TMP/src" && tar -x -C "$TMP/src")
{
  echo "# scripts/install_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$ROOT" rev-parse --short HEAD), $(python3 --version)"
  python3 -m venv "$TMP/venv"
  V="$TMP/venv/bin/python"
  "$V" -m pip install -q torch==2.13.0 setuptools wheel pybind11 cmake ninja numpy 2>&1 | tail -2
  echo "## 1. pip install --no-build-isolation . (torch $("$V" -c 'import torch; print(torch.__version__)'))"
  (cd "$TMP/src" && MAMLPP_REQUIRE_NATIVE=1 "$V" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5)
  echo "exit status: ${PIPESTATUS[0]}"
  (cd "$TMP" && "$V" -c "import mamlpp_fast, mamlpp_fast._C as C, torch; from mamlpp_fast import _native
print('installed', mamlpp_fast.__version__, 'from', mamlpp_fast.__file__)
ops = ('bn_forward', 'bn_backward', 'bn_double_backward', 'lslr_forward', 'lslr_backward')
print('_C built with:', _native.built_with(), '| registered:', [str(getattr(torch.ops.mamlpp, 'native_' + n).default) for n in ops])")
  "$V" -m pip uninstall -q -y mamlpp-fast
  echo "## 2. pip install . (build isolation)"
  (cd "$TMP/src" && "$V" -m pip install --no-deps . > "$TMP/iso.log" 2>&1; echo "exit status: $?")
  grep -n -i "no-build-isolation\|torch cannot\|error" "$TMP/iso.log" | head -8
} > "$LOG" 2>&1
cat "$LOG"
