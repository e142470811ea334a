# mamlpp-fast. GNU make; every target works on a fresh clone.
#
#   make train      set up .venv (first time), then a short synthetic experiment -> experiments/
#   make test       set up .venv (first time), then the test suite (native extension required)
#   make gpu-check  GPU checks of the native/Triton ops with the machine's own python3 -> $(OUT)
#   make gpu-bench  benchmarks on the GPU with the machine's own python3 -> $(OUT)
#   make gpu-session  build + GPU tests + benchmark + memcheck in one call of < 10 min -> $(OUT)
#   make gpu-first / gpu-second  a 15-minute lease as two calls of ~6 min (the second on the warm machine)
#
# The set-up creates .venv with `python3 -m venv` when missing, installs torch==2.13.0 only when torch
# cannot be imported there (never an unpinned torch, which would pull a multi-GB CUDA build), the other
# dependencies, triton==3.7.1 only when triton cannot be imported, and this package in editable mode
# (which builds the native extension). A stamp file skips it while setup.py, pyproject.toml, the native
# sources and this Makefile are unchanged.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.mamlpp-setup.stamp
OUT ?= ./gpu_out
CONFIG ?= configs/synthetic_default.json
EXPERIMENTS ?= experiments

PY_DEPS := numpy tqdm pillow matplotlib pytest pytest-benchmark pybind11 ninja cmake setuptools wheel
SETUP_INPUTS := Makefile setup.py pyproject.toml $(wildcard CMakeLists.txt) \
	$(shell find csrc kernels -type f 2>/dev/null)

.PHONY: help setup train test gpu-check gpu-bench gpu-session gpu-first gpu-second triton-cache

help:
	@sed -n '2,8p' Makefile | sed 's/^# \{0,1\}//'

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(VPY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install $(PY_DEPS)
	@$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install triton==3.7.1
	$(VPY) -m pip install -e . --no-build-isolation --no-deps
	@touch $@

train: $(STAMP)
	$(VENV)/bin/mamlpp train --config $(CONFIG) --experiment-dir $(EXPERIMENTS)

test: $(STAMP)
	MAMLPP_REQUIRE_NATIVE=1 $(VPY) -m pytest -q

gpu-check:
	OUT="$(abspath $(OUT))" PYTHON=python3 bash scripts/gpu_check.sh

gpu-bench:
	mkdir -p "$(OUT)"
	python3 -m bench.run --device cuda --out "$(OUT)"

gpu-session:
	OUT="$(abspath $(OUT))" PYTHON=python3 bash scripts/gpu_session.sh

# A 15-minute lease as two calls (device README: few full calls; each ~6 min). The first: the fused
# kernels' diagnosis, the GPU tests, the profile beside the trace (of the design the trace prices: every
# convolution on our Triton kernels, the fused ops; what calibrates it, bench.trace --calibrate-from); the second, sent at once to the warm
# machine: the learner benchmark (fused and unfused; the captured update with the convolutions' products in
# tf32x3 and TF32 beside strict fp32 (--conv-precisions); the reference and JAX (torch.func, measured
# 2026-12-04 at 6.6x below the fast learner, is left to the full session); the convolution table: each
# implementation timed per layer shape, what the trace's per-call pricing is checked against), the
# convolutions' launch-configuration A/B (twice the warps: occupancy against FFMA share), Nsight Compute
# on the convolutions, precision and memcheck. A call that has less device time left than its
# DEADLINE: make gpu-second SECOND_DEADLINE=<seconds> (the stages are cut in order, the results packed).
# Triton's kernel cache for a device run (bench/triton_cache.py), compiled on this CPU machine with the
# device image's Python 3.12 and Triton 3.6.0 (PY312: a venv holding torch==2.11.0, triton==3.6.0 and
# numpy), from this tree; carried as .triton_cache in the first call (tests/gpu/RESULTS.md)
PY312 ?= /tmp/py312/bin/python
triton-cache:
	rm -rf .triton_cache && PYTHONPATH=. $(PY312) -m bench.triton_cache --out .triton_cache

FIRST_DEADLINE ?= 380
SECOND_DEADLINE ?= 340
gpu-first:
	STAGES=env,build,import,diagnose,warm,tests,profile DEADLINE=$(FIRST_DEADLINE) TESTS_LIMIT=150 XDIST_WORKERS=8 TEST_TIMEOUT=120 \
	TEST_ARGS="tests/gpu tests/test_native_cpp.py" PROFILE_ARGS="--conv-impl triton --fused-ops fused" \
	$(MAKE) gpu-session OUT="$(OUT)"

gpu-second:
	STAGES=env,build,import,bench,convab,profiledefault,ncu,precision,memcheck DEADLINE=$(SECOND_DEADLINE) BENCH_LIMIT=140 \
	PROFILEDEFAULT_LIMIT=45 CONVAB_LIMIT=60 NCU_LIMIT=35 PRECISION_LIMIT=40 MEMCHECK_LIMIT=35 \
	BENCH_ARGS="--device cuda --workloads omniglot_20w1s,miniimagenet_5w1s --learners fast,reference,jax \
	--backends native --conv-impls auto --first-blocks unfused,fused --conv-precisions auto,tf32x3,tf32 \
	--conv-streams default,on --no-sweeps \
	--time-budget 115 --max-time 1.0" $(MAKE) gpu-session OUT="$(OUT)"
