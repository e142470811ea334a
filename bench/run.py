"""Benchmark entry point: meta-updates per second and peak memory of every MAML++ implementation.

    python -m bench.run [--device auto|cpu|cuda] [--out DIR] [--quick] [--workloads a,b] [--learners ...]
                        [--backends ...] [--iters N] [--warmup N] [--no-sweeps] [--time-budget SECONDS]
    (run from the repository root: bench/ is not part of the installed package)

One run, one device. Measured, in this order (see bench/NOTES.md for the method):
1. the device's dense fp32 matmul ceiling (strict fp32, and TF32 on a GPU);
2. for each workload (bench/workloads.py: the paper's Omniglot and mini-ImageNet MAML++ settings):
   the fast learner on each backend of the device, eagerly and with CUDA-graph capture of the whole
   meta-update (config key `cuda_graph`), the torch.func baseline (bench/baseline_torchfunc.py), the
   reference learner (mamlpp_fast.reference), and the JAX baseline (bench/baseline_jax.py, in a
   subprocess, when jax is installed);
3. sweeps of the fast learner over the meta-batch size and the number of inner steps;
4. `trainer` items (bench/trainer_bench.py): the experiment loop end to end (ExperimentBuilder and the
   real data loader) beside the learner alone, per data source and `num_dataprovider_workers` value,
   and the projected wall time of the paper configurations' full runs ("time to result").
Each item: `--warmup` meta-updates, then meta-updates until `--iters` of them or `--max-time` seconds
(at least `--min-iters`); the median time per meta-update is reported (CUDA events on a GPU,
time.perf_counter on a CPU), with peak memory (torch.cuda.max_memory_allocated on a GPU; on a CPU the
growth of the process's peak RSS over its RSS before the item, Linux only, else "n/a"). FLOPs per
meta-update come from bench/flops.py (equal to torch.utils.flop_counter.FlopCounterMode's count).

Results: <out>/bench_<device>_<date>.json and .md, copied to <out>/latest_<cpu|cuda>.json/.md (with
--quick: *_quick). Only measured numbers are written; what was not measured is "n/a" with a reason,
what the time budget cut is listed as skipped.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

from . import workloads as W
from . import trainer_bench as TB
from .flops import flops_from_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results")
LEARNERS = ("fast", "torchfunc", "reference", "jax", "trainer")
BACKENDS = {"cpu": ("native", "torch"), "cuda": ("native", "triton", "torch")}
VARIANTS = ("eager", "cuda_graph")
DEFAULT_BUDGET_S = 450.0  # full runs: the GPU run must end within ~8 minutes


# -- small helpers ------------------------------------------------------------------------------------
def _now() -> float:
    return time.perf_counter()


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001 - not installed or broken metadata
        return None


def _revision_file() -> str | None:
    """A checkout copied without .git (e.g. to a GPU machine) can carry its revision in .git_revision."""
    try:
        with open(os.path.join(REPO, ".git_revision")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def revision() -> str:
    """The git revision a result belongs to: $MAMLPP_GIT_REV first (scripts/gpu_session.sh sets it from
    the .git_revision the session carried: the device's copy of the tree may hold a stale .git), else
    `git rev-parse HEAD`, else .git_revision, else "unknown"."""
    return os.environ.get("MAMLPP_GIT_REV") or _git("rev-parse", "HEAD") or _revision_file() or "unknown"


def _slug(s: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in s)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class _CpuPeakRss:
    """Peak RSS growth during a block (Linux): reset the high-water mark (write 5 to /proc/self/clear_refs),
    then VmHWM after - VmRSS before, at least 0. None where that is not possible.

    The kernel's RSS counters are approximate (each thread batches its page-count updates), so with little
    growth VmHWM after can read a few pages below VmRSS before (seen: -68 kB in a full test run): such a
    difference is noise and is reported as 0."""

    def __enter__(self):
        _malloc_trim()
        self.ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            pass
        self.before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        self.delta = max(0, hwm - self.before) if (self.ok and hwm is not None and self.before is not None) else None
        return False


# -- environment --------------------------------------------------------------------------------------
def resolve_device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch sees no GPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def environment(dev, argv: list[str], args) -> dict[str, Any]:
    import torch
    now = _dt.datetime.now().astimezone()
    env: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "stamp": now.strftime("%Y%m%d-%H%M%S"),
        "command": "python -m bench.run " + shlex.join(argv),
        "process_argv": shlex.join(sys.argv),
        "git_revision": revision(),
        "git_dirty": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _pkg_version("triton"),
        "numpy": _pkg_version("numpy"),
        "jax": None,  # filled in when the JAX baseline ran
        "device_type": dev.type,
        "device": str(dev),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "quick": bool(args.quick),
        "precision": ("TF32 allowed everywhere (--tf32)" if args.tf32 else "strict float32 everywhere"),
        "tf32": {"cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                 "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                 "learner_config_allow_tf32": _precision_overrides(args).get("allow_tf32", "no such config key"),
                 "jax_precision": _jax_precision(args)},
        "settings": {k: getattr(args, k) for k in ("iters", "warmup", "min_iters", "max_time", "time_budget")},
    }
    status = _git("status", "--porcelain")
    env["git_dirty"] = None if status is None else bool(status)
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env["device_name"] = torch.cuda.get_device_name(dev)
        env["device_memory_bytes"] = int(p.total_memory)
        env["device_sm_count"] = int(p.multi_processor_count)
        env["device_capability"] = f"{p.major}.{p.minor}"
    else:
        env["device_name"] = env["cpu"]
    try:
        from mamlpp_fast.ops import available_backends
        env["available_backends"] = available_backends(dev)
    except Exception as e:  # noqa: BLE001
        env["available_backends"] = f"error: {e}"
    return env


# -- timing ---------------------------------------------------------------------------------------------
def _sync(dev) -> None:
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize(dev)


def time_loop(step: Callable[[], Any], dev, warmup: int, iters: int, min_iters: int, max_time: float):
    """Run `step` warmup times, then until `iters` runs or `max_time` seconds (at least `min_iters`).
    Returns (per-iteration seconds, the last step's return value, per-iteration process CPU seconds on a
    CPU device (None on a GPU): with one thread this is the work itself, whatever else the machine runs)."""
    import torch
    out = None
    for _ in range(warmup):
        out = step()
    _sync(dev)
    min_iters = max(1, min(min_iters, iters))
    if dev.type == "cuda":
        events = []
        t0 = _now()
        while len(events) < iters and (len(events) < min_iters or _now() - t0 < max_time):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = step()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
        cpu_times = None
    else:
        times, cpu_times = [], []
        t0 = _now()
        while len(times) < iters and (len(times) < min_iters or _now() - t0 < max_time):
            t, c = _now(), time.process_time()
            out = step()
            times.append(_now() - t)
            cpu_times.append(time.process_time() - c)
    return times, out, cpu_times


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {"iters": len(times), "median_s": med, "mean_s": statistics.fmean(times), "min_s": min(times),
            "p10_s": _pct(times, 0.1), "p90_s": _pct(times, 0.9), "updates_per_s": 1.0 / med,
            "times_s": [round(t, 7) for t in times]}


def _loss_value(out) -> float | None:
    try:
        if isinstance(out, tuple):
            out = out[0]["loss"]
        return float(out)
    except Exception:  # noqa: BLE001
        return None


# -- ceilings -------------------------------------------------------------------------------------------
def matmul_ceiling(dev, quick: bool) -> dict[str, Any]:
    """Best dense fp32 matmul rate (TFLOP/s): strict fp32, and TF32 on a GPU (restores the flags)."""
    import torch
    res: dict[str, Any] = {}
    if dev.type == "cuda":
        n, reps = (4096, 5) if quick else (8192, 20)
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            for key, tf32 in (("fp32", False), ("tf32", True)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                for _ in range(3):
                    torch.mm(a, b)
                times, _, _ = time_loop(lambda: torch.mm(a, b), dev, 0, reps, reps, 1e9)
                res[key] = {"tflops": 2 * n ** 3 / min(times) / 1e12,
                            "tflops_median": 2 * n ** 3 / statistics.median(times) / 1e12, "n": n, "reps": reps,
                            "timer": "cuda events", "setting": f"torch.backends.cuda.matmul.allow_tf32={tf32}"}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        del a, b
        torch.cuda.empty_cache()
    else:
        n, reps = (1024, 5) if quick else (2048, 10)
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times, _, _ = time_loop(lambda: torch.mm(a, b), dev, 1, reps, reps, 1e9)
        res["fp32"] = {"tflops": 2 * n ** 3 / min(times) / 1e12,
                       "tflops_median": 2 * n ** 3 / statistics.median(times) / 1e12, "n": n, "reps": reps,
                       "timer": "perf_counter", "threads": torch.get_num_threads()}
        res["tf32"] = None
    return res


# -- the learners -----------------------------------------------------------------------------------
class NotApplicable(Exception):
    """This item cannot run here (reason in the message); reported as "n/a"."""


def _precision_overrides(a) -> dict[str, Any]:
    """Config overrides that give the learners the run's precision (config key allow_tf32, when it exists)."""
    from mamlpp_fast import config as C
    return {"allow_tf32": bool(getattr(a, "tf32", False))} if "allow_tf32" in C.DEFAULTS else {}


def _jax_precision(a) -> str:
    return "default" if getattr(a, "tf32", False) else "highest"


def _build_reference(w, dev, a):
    from mamlpp_fast.reference import MAMLFewShotClassifier
    model = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, **_precision_overrides(a)))
    batch = W.make_batch(w, dev)
    return (lambda: model.run_train_iter(batch, 0)), {}, model


def _build_torchfunc(w, dev, a):
    import torch
    from .baseline_torchfunc import TorchFuncMAMLPP
    torch.manual_seed(0)
    base = TorchFuncMAMLPP(W.make_args(w), dev)
    batch = W.make_batch(w, dev)
    return (lambda: base.meta_update(batch, 0)), {}, base


def _build_fast(w, dev, a, backend: str, variant: str, conv_impl: str | None = None, first_block: str | None = None,
                conv_precision: str | None = None, conv_streams: bool | None = None):
    from mamlpp_fast import config as C
    from mamlpp_fast.ops import BackendFallbackWarning, available_backends, get_backend, set_backend
    from mamlpp_fast.ops.conv import clear_conv_cache
    if backend not in available_backends(dev):
        raise NotApplicable(f"backend {backend!r} is not available for {dev.type} tensors here "
                            f"(available: {available_backends(dev)})")
    over: dict[str, Any] = {"backend": backend, **_precision_overrides(a)}
    if conv_impl is not None and "conv_impl" in C.DEFAULTS:
        over["conv_impl"] = conv_impl
        clear_conv_cache()  # conv_impl=auto times its candidates again for this item (during the warm-up)
    if first_block is not None:
        if "first_block" not in C.DEFAULTS:
            raise NotApplicable("the fast learner has no config key 'first_block' yet")
        over["first_block"] = first_block
        if "bn_pool" in C.DEFAULTS:  # the other fused op (ops.bn_pool) follows the same value
            over["bn_pool"] = first_block
    if conv_precision is not None:
        if "conv_precision" not in C.DEFAULTS:
            raise NotApplicable("the fast learner has no config key 'conv_precision' yet")
        over["conv_precision"] = conv_precision
    if conv_streams is not None:
        if "conv_streams" not in C.DEFAULTS:
            raise NotApplicable("the fast learner has no config key 'conv_streams' yet")
        over["conv_streams"] = conv_streams
    if variant == "cuda_graph":
        if dev.type != "cuda":
            raise NotApplicable("CUDA graphs need a CUDA device")
        if "cuda_graph" not in C.DEFAULTS:
            raise NotApplicable("the fast learner has no config key 'cuda_graph' yet")
        over["cuda_graph"] = True
    from mamlpp_fast.fast import MAMLFewShotClassifier
    set_backend(backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackendFallbackWarning)
        model = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, **over))
        used = get_backend(device=dev).name
    fell = [str(c.message) for c in caught if issubclass(c.category, BackendFallbackWarning)]
    if used != backend or fell:
        raise NotApplicable(f"backend {backend!r} fell back to {used!r}: {'; '.join(fell)}")
    if variant == "cuda_graph" and not getattr(model, "supports_cuda_graph", False):
        raise NotApplicable("model.supports_cuda_graph is False for this configuration")
    batch = W.make_batch(w, dev)
    extra = {"backend_used": used, "conv_impl": getattr(model.args, "conv_impl", None)}

    def step():
        out = model.run_train_iter(batch, 0)
        if "first_block_fused" not in extra:  # once: whether the first layer ran fused (ops.conv_block)
            cache = model.__dict__.get("_first_block_cache", {})
            extra["first_block_fused"] = any(v is not None for v in cache.values())
            cache = model.__dict__.get("_bn_pool_cache", {})
            extra["bn_pool_fused"] = any(v is not None for v in cache.values())
        return out
    return step, extra, model


def _conv_choices_made() -> list[dict[str, Any]]:
    """What conv_impl=auto chose during the last item: shape, pattern, choice and the times it saw."""
    from mamlpp_fast.ops.conv import conv_choices
    out = []
    for key, (impl, times) in conv_choices().items():
        x_shape, w_shape, stride, padding, _dtype, _dev, _tf32, input_grad, pattern = key
        out.append({"x": list(x_shape), "w": list(w_shape), "stride": list(stride), "padding": list(padding),
                    "input_grad": input_grad, "pattern": pattern, "chosen": impl,
                    "ms": {k: (None if v is None else round(v, 4)) for k, v in times.items()}})
    return out


def conv_table(w, dev, a) -> dict[str, Any]:
    """Each convolution implementation (mamlpp_fast.ops.conv) at every layer shape one meta-update of
    the fast learner runs on workload `w`: median ms per call of the MAML pattern of that call (support
    passes: forward + create_graph derivatives + backward through them; target passes: forward +
    backward), how many such calls one meta-update makes, and the sum (an estimate of the meta-update's
    convolution time per implementation, and for the per-shape fastest, which is what auto picks)."""
    import collections
    import torch
    from mamlpp_fast.common import float32_precision
    from mamlpp_fast.fast import MAMLFewShotClassifier
    from mamlpp_fast.ops.conv import CONV_IMPLS, fastest, record_conv_calls, time_conv_impls
    model = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, backend="torch", conv_impl="grouped",
                                                                  **_precision_overrides(a)))
    batch = W.make_batch(w, dev)
    with record_conv_calls() as calls:
        model.run_train_iter(batch, 0)
    del model, batch
    counts = collections.Counter(calls)
    reps, warmup = (2, 1) if a.quick or dev.type == "cpu" else (7, 2)
    rows = []
    with float32_precision(bool(a.tf32), True):
        for (xs, ws, st, pd, ig, pat), cnt in counts.items():
            times = time_conv_impls(xs, ws, st, pd, torch.float32, dev, reps=reps, warmup=warmup, input_grad=ig,
                                    pattern=pat)
            rows.append({"x": list(xs), "w": list(ws), "stride": list(st), "padding": list(pd), "input_grad": ig,
                         "pattern": pat, "calls_per_update": cnt, "ms": times, "fastest": fastest(times)})
    totals: dict[str, Any] = {}
    for impl in CONV_IMPLS:
        vals = [r["ms"].get(impl) for r in rows]
        totals[impl] = (None if any(v is None for v in vals)
                        else sum(r["calls_per_update"] * v for r, v in zip(rows, vals)))
    totals["per-shape fastest"] = sum(r["calls_per_update"] * r["ms"][r["fastest"]] for r in rows
                                      if r["ms"][r["fastest"]] is not None)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"workload": w.name, "reps": reps, "warmup": warmup, "timer": "cuda events" if dev.type == "cuda"
            else "time.perf_counter", "shapes": rows, "estimated_ms_per_update": totals}


def measure_torch_item(build: Callable, w, dev, a, warmup: int) -> dict[str, Any]:
    """Build the learner, time it, and measure its peak memory."""
    import torch
    gc.collect()
    res: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base_mem = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step, extra, holder = build(w, dev, a)
        times, out, _ = time_loop(step, dev, warmup, a.iters, a.min_iters, a.max_time)
        res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(dev) - base_mem)
        res["mem_kind"] = "torch.cuda.max_memory_allocated - allocated before setup"
        res["timer"] = "cuda events"
    else:
        with _CpuPeakRss() as rss:
            step, extra, holder = build(w, dev, a)
            times, out, cpu_times = time_loop(step, dev, warmup, a.iters, a.min_iters, a.max_time)
        res["peak_mem_bytes"] = rss.delta
        res["cpu_time_median_s"] = statistics.median(cpu_times)
        res["cpu_times_s"] = [round(t, 7) for t in cpu_times]
        res["torch_threads"] = torch.get_num_threads()
        res["mem_kind"] = "peak RSS growth (VmHWM - VmRSS before setup)" if rss.delta is not None else "n/a"
        res["timer"] = "time.perf_counter"
    res.update(summarize(times))
    res.update(extra)
    res["last_loss"] = _loss_value(out)
    del step, holder, out
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _jax_python(a) -> str | None:
    if a.jax_python:
        return a.jax_python
    return sys.executable if importlib.util.find_spec("jax") is not None else None


def measure_jax_item(w, dev, a, warmup: int, remaining_s: float | None) -> dict[str, Any]:
    py = _jax_python(a)
    if py is None:
        raise NotApplicable("jax is not installed in this Python (pass --jax-python to use another one)")
    if dev.type == "cuda":
        import torch
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "jax.json")
        cmd = [py, "-m", "bench.baseline_jax", "--workload", w.name, "--device", "gpu" if dev.type == "cuda" else "cpu",
               "--warmup", str(warmup), "--iters", str(a.iters), "--min-iters", str(a.min_iters),
               "--max-time", str(a.max_time), "--precision", _jax_precision(a),
               "--json-out", out]
        base = _base_workload(w, a.quick)
        if base is not None and base.name != w.name:
            cmd[4] = base.name
            cmd += ["--batch-size", str(w.batch_size), "--steps", str(w.steps)]
        if a.quick:
            cmd.append("--quick")
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if dev.type == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        elif dev.index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(dev.index)
        if a.jax_cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", a.jax_cache)
        timeout = a.jax_timeout if remaining_s is None else max(30.0, min(a.jax_timeout, remaining_s))
        preexec = None
        if dev.type == "cpu" and a.threads and hasattr(os, "sched_setaffinity"):
            # XLA's CPU client sizes its thread pools to the machine; torch runs with --threads. The JAX
            # process gets as many cores as torch has threads (the first of this process's CPUs), so a
            # 1-thread comparison is one core against one core.
            cpus = sorted(os.sched_getaffinity(0))[:max(1, int(a.threads))]
            preexec = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
            cmd += ["--cpus", ",".join(map(str, cpus))]
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=preexec)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the JAX subprocess ran past {timeout:.0f} s and was stopped") from None
        if not os.path.exists(out):
            tail = (p.stderr or p.stdout or "")[-800:]
            raise RuntimeError(f"the JAX subprocess failed (rc {p.returncode}): {tail}")
        with open(out) as f:
            r = json.load(f)
    if r.get("status") != "ok":
        raise NotApplicable(r.get("reason", "jax baseline did not run"))
    times = r.pop("times_s")
    r.pop("median_s", None)
    r.pop("updates_per_s", None)
    r.pop("iters", None)
    r.pop("status", None)
    r.update(summarize(times))
    r["last_loss"] = r.pop("loss", None)
    r["workload"] = w.name  # the subprocess names the main workload it derived a sweep point from
    return r


def _base_workload(w, quick: bool):
    """The main workload a sweep point derives from (for the JAX subprocess), else w itself."""
    for m in W.main_workloads(quick):
        if m.name == w.name or w.name.startswith(m.name + "_"):
            return m
    return None


def _process_warmup(dev) -> None:
    """One tiny untimed meta-update of the reference learner, so that one-time initialisations of the
    process (oneDNN / cuDNN / cuBLAS handles, thread pools, lazy imports) are not charged to the first
    item's time or memory."""
    try:
        w = W.QUICK_MAIN[0].with_(batch_size=1, steps=1)
        step, _, holder = _build_reference(w, dev, None)
        step()
        _sync(dev)
        del step, holder
        gc.collect()
    except Exception as e:  # noqa: BLE001 - a failure here shows up again in the items
        print(f"bench: process warm-up failed: {type(e).__name__}: {e}", file=sys.stderr)


# -- plan -----------------------------------------------------------------------------------------------
def _main_selection(a):
    mains = W.main_workloads(a.quick)
    if a.workloads and a.workloads != "all":
        names = [n.strip() for n in a.workloads.split(",") if n.strip()]
        mains = tuple(W.workload_by_name(n, a.quick) for n in names)
    return mains


def plan(a, dev) -> list[dict[str, Any]]:
    """The ordered list of items (section, workload, learner, backend, variant)."""
    items = []
    backends = a.backends or list(BACKENDS.get(dev.type, ("torch",)))
    for w in _main_selection(a):
        for learner in a.learners:
            if learner == "fast":
                for be in backends:
                    for v in VARIANTS:
                        for ci in a.conv_impls:
                            for fb in a.first_blocks:
                                items.append({"section": "main", "workload": w, "learner": "fast", "backend": be,
                                              "variant": v, "conv_impl": ci,
                                              "first_block": None if fb == "auto" else fb,
                                              "conv_precision": _precision_item(a.conv_precisions[0]),
                                              "conv_streams": _streams_item(a.conv_streams[0])})
                    # the other input precisions of the Triton products: the captured update only (what the
                    # learner runs on a GPU), with the first conv_impl and first-block values
                    for cp in a.conv_precisions[1:]:
                        items.append({"section": "main", "workload": w, "learner": "fast", "backend": be,
                                      "variant": VARIANTS[-1], "conv_impl": a.conv_impls[0],
                                      "first_block": None if a.first_blocks[0] == "auto" else a.first_blocks[0],
                                      "conv_precision": _precision_item(cp),
                                      "conv_streams": _streams_item(a.conv_streams[0])})
                    # the other conv_streams values: likewise, with the first precision
                    for cs in a.conv_streams[1:]:
                        items.append({"section": "main", "workload": w, "learner": "fast", "backend": be,
                                      "variant": VARIANTS[-1], "conv_impl": a.conv_impls[0],
                                      "first_block": None if a.first_blocks[0] == "auto" else a.first_blocks[0],
                                      "conv_precision": _precision_item(a.conv_precisions[0]),
                                      "conv_streams": _streams_item(cs)})
            elif learner == "trainer":  # the experiment loop end to end (bench/trainer_bench.py)
                for source in TB.sources_for(w, a.omniglot_dir):
                    for workers in a.trainer_workers:
                        items.append({"section": "main", "workload": w, "learner": "trainer", "backend": None,
                                      "variant": "eager", "dataset": source, "workers": workers})
            else:
                items.append({"section": "main", "workload": w, "learner": learner, "backend": None,
                              "variant": "eager"})
    if not a.no_sweeps and "fast" in a.learners:
        from mamlpp_fast.ops import available_backends
        avail = [b for b in available_backends(dev) if b in backends] or ["torch"]
        be = a.sweep_backend if a.sweep_backend != "auto" else avail[0]
        batch = [w for w in W.batch_sweep(a.quick) if a.batch_sweep is None or w.batch_size in a.batch_sweep]
        steps = [] if a.no_steps_sweep else W.steps_sweep(a.quick)
        for section, ws in (("sweep_batch", batch), ("sweep_steps", steps)):
            for w in ws:
                for v in VARIANTS:
                    items.append({"section": section, "workload": w, "learner": "fast", "backend": be, "variant": v,
                                  "conv_impl": a.conv_impls[0]})
    return items


def _precision_item(value: str) -> str | None:
    """A --conv-precisions value as the item's conv_precision: None for auto (the learner's default)."""
    return None if value == "auto" else value


def _streams_item(value: str) -> bool | None:
    """A --conv-streams value as the item's conv_streams: None for default (the learner's default)."""
    return None if value == "default" else value == "on"


def _same_config(w1, w2) -> bool:
    d1, d2 = w1.to_dict(), w2.to_dict()
    d1.pop("name")
    d2.pop("name")
    return d1 == d2


# -- main -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/results)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (CPU smoke test)")
    p.add_argument("--workloads", default="all", help="comma-separated workload names (default all of the paper's)")
    p.add_argument("--learners", default=",".join(LEARNERS), help=f"comma-separated subset of {','.join(LEARNERS)}")
    p.add_argument("--backends", default=None, help="backends of the fast learner (default: all for the device)")
    p.add_argument("--sweep-backend", default="auto", help="backend of the sweeps (default: auto's choice)")
    p.add_argument("--iters", type=int, default=None, help="most timed meta-updates per item (default 50; quick 2)")
    p.add_argument("--min-iters", type=int, default=None, help="fewest timed meta-updates per item (default 5; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed meta-updates first (default 3; quick 1)")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop timing an item after this many seconds once min-iters ran (default 2; quick 0.2)")
    p.add_argument("--no-sweeps", action="store_true", help="skip the meta-batch-size and inner-step sweeps")
    p.add_argument("--batch-sweep", default=None,
                   help="comma-separated meta-batch sizes of the batch sweep (default: all of bench/workloads.py)")
    p.add_argument("--no-steps-sweep", action="store_true", help="skip the inner-step sweep")
    p.add_argument("--conv-impls", default="auto",
                   help="comma-separated conv_impl values of the fast learner's main items (auto and/or "
                        "mamlpp_fast.ops.conv.CONV_IMPLS; default auto); the sweeps use the first")
    p.add_argument("--first-blocks", default="auto",
                   help="comma-separated values of the fast learner's config keys first_block and bn_pool "
                        "(both take the value) for its main items (auto, fused, unfused; default auto: the "
                        "learner's own choice)")
    p.add_argument("--conv-precisions", default="auto",
                   help="comma-separated values of the fast learner's config key conv_precision (auto, ieee, "
                        "tf32, tf32x3: the input precision of its Triton convolution and fused-block products); "
                        "the first applies to every main item, each further one adds the captured update with the "
                        "first --conv-impls and --first-blocks values (default auto)")
    p.add_argument("--conv-streams", default="default",
                   help="comma-separated values of the fast learner's config key conv_streams (default, off, on: "
                        "a convolution's weight gradient on a second stream beside its data gradient); the first "
                        "applies to every main item, each further one adds the captured update with the first "
                        "--conv-impls, --first-blocks and --conv-precisions values (default: default)")
    p.add_argument("--no-conv-table", action="store_true",
                   help="do not time the convolution implementations at the workloads' layer shapes")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"skip the remaining items once the run took this long (default {DEFAULT_BUDGET_S:.0f} s; "
                        "--quick: none; 0: none)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in every implementation (learners' config key allow_tf32, torch's cuDNN/matmul "
                        "flags for the torch.func baseline, JAX precision 'default'); default: strict float32 "
                        "everywhere (the learners' default; JAX precision 'highest')")
    p.add_argument("--no-ceiling", action="store_true", help="do not time the matmul ceiling")
    p.add_argument("--jax-python", default=None, help="Python that has jax (default: this one, when it has jax)")
    p.add_argument("--jax-timeout", type=float, default=300.0, help="seconds per JAX subprocess (compile included)")
    p.add_argument("--jax-cache", default=os.path.join(tempfile.gettempdir(), "mamlpp_bench_jax_cache"),
                   help="JAX persistent compilation cache folder ('' for none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's own; --quick on a CPU: 1, "
                        "which is steadier on a shared machine)")
    p.add_argument("--tag", default="", help="extra word in the output file names")
    p.add_argument("--trainer-updates", type=int, default=None,
                   help="trainer item: meta-updates per epoch (2 epochs, the second reported; default 50; quick 3)")
    p.add_argument("--trainer-eval-tasks", type=int, default=None,
                   help="trainer item: validation tasks per epoch (rounded down to whole batches; default 64; quick 4)")
    p.add_argument("--trainer-workers", default="0,4",
                   help="trainer item: comma-separated num_dataprovider_workers values (0: data drawn in the main "
                        "process, in series with the meta-updates; default 0,4)")
    p.add_argument("--omniglot-dir", default=TB.default_omniglot_dir(),
                   help="folder of the official Omniglot zip files for the trainer item (default: "
                        "$MAMLPP_OMNIGLOT_DIR, else the folder tests/test_data.py uses; absent: synthetic only)")
    a = p.parse_args(argv)
    q = a.quick
    a.iters = a.iters if a.iters is not None else (2 if q else 50)
    a.min_iters = a.min_iters if a.min_iters is not None else (1 if q else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 3)
    a.max_time = a.max_time if a.max_time is not None else (0.2 if q else 2.0)
    if a.time_budget is None:
        a.time_budget = 0.0 if q else DEFAULT_BUDGET_S
    a.trainer_updates = a.trainer_updates if a.trainer_updates is not None else (3 if q else 50)
    a.trainer_eval_tasks = a.trainer_eval_tasks if a.trainer_eval_tasks is not None else (4 if q else 64)
    try:
        a.trainer_workers = [int(x) for x in a.trainer_workers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--trainer-workers takes comma-separated integers, got {a.trainer_workers!r}")
    if a.trainer_updates < 1 or a.trainer_eval_tasks < 1 or not a.trainer_workers or min(a.trainer_workers) < 0:
        p.error("--trainer-updates and --trainer-eval-tasks must be >= 1, --trainer-workers >= 0")
    a.learners = [x.strip() for x in a.learners.split(",") if x.strip()]
    bad = [x for x in a.learners if x not in LEARNERS]
    if bad:
        p.error(f"unknown learner(s) {bad}; choose from {LEARNERS}")
    a.backends = [x.strip() for x in a.backends.split(",")] if a.backends else None
    try:
        a.batch_sweep = [int(x) for x in a.batch_sweep.split(",") if x.strip()] if a.batch_sweep else None
    except ValueError:
        p.error(f"--batch-sweep takes comma-separated integers, got {a.batch_sweep!r}")
    from mamlpp_fast.ops.conv import CONV_IMPLS
    a.conv_impls = [x.strip() for x in a.conv_impls.split(",") if x.strip()] or ["auto"]
    a.first_blocks = [x.strip() for x in a.first_blocks.split(",") if x.strip()] or ["auto"]
    bad = [x for x in a.first_blocks if x not in ("auto", "fused", "unfused")]
    if bad:
        p.error(f"unknown first block value(s) {bad}; choose from auto,fused,unfused")
    a.conv_precisions = [x.strip() for x in a.conv_precisions.split(",") if x.strip()] or ["auto"]
    a.conv_streams = [x.strip() for x in a.conv_streams.split(",") if x.strip()] or ["default"]
    bad = [x for x in a.conv_streams if x not in ("default", "off", "on")]
    if bad:
        p.error(f"unknown conv streams value(s) {bad}; choose from default,off,on")
    bad = [x for x in a.conv_precisions if x not in ("auto", "ieee", "tf32", "tf32x3")]
    if bad:
        p.error(f"unknown conv precision(s) {bad}; choose from auto,ieee,tf32,tf32x3")
    bad = [x for x in a.conv_impls if x != "auto" and x not in CONV_IMPLS]
    if bad:
        p.error(f"unknown conv impl(s) {bad}; choose from auto,{','.join(CONV_IMPLS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; argv as on the command line (default sys.argv[1:]). Returns 0.

    Process-wide settings it changes (torch threads, TF32 flags, the ops backend) are restored on return,
    so that tests can call it in-process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    import torch
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        from mamlpp_fast.ops import set_backend
        saved_backend = set_backend(None)
    except Exception:  # noqa: BLE001 - ops not importable: the fast items will say so
        set_backend, saved_backend = None, None
    try:
        return _run(a, argv)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]
        if set_backend is not None:
            set_backend(saved_backend)


def _run(a, argv: list[str]) -> int:
    import torch
    t_start = _now()
    dev = resolve_device(a.device)
    threads = a.threads if a.threads is not None else (1 if (a.quick and dev.type == "cpu") else None)
    if threads:
        torch.set_num_threads(threads)
    # one precision for every implementation (the learners set it per meta-update from their config)
    torch.backends.cuda.matmul.allow_tf32 = bool(a.tf32)
    torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    env = environment(dev, argv, a)
    print(f"bench: {env['device_name']} ({dev}), torch {env['torch']}, cuda {env['cuda']}, triton {env['triton']}, "
          f"git {str(env['git_revision'])[:12]}", flush=True)
    budget = a.time_budget if a.time_budget and a.time_budget > 0 else None

    ceilings = {}
    if not a.no_ceiling:
        try:
            ceilings = matmul_ceiling(dev, a.quick)
            print("bench: matmul ceiling " + ", ".join(
                f"{k} {v['tflops']:.2f} TFLOP/s" for k, v in ceilings.items() if v), flush=True)
        except Exception as e:  # noqa: BLE001
            ceilings = {"error": f"{type(e).__name__}: {e}"}

    _process_warmup(dev)
    conv_tables: list[dict[str, Any]] = []
    if not a.no_conv_table and "fast" in a.learners:
        for w in _main_selection(a):
            elapsed = _now() - t_start
            if budget is not None and elapsed > budget:
                conv_tables.append({"workload": w.name, "status": "skipped",
                                    "reason": f"time budget {budget:.0f} s exceeded ({elapsed:.0f} s)"})
                continue
            try:
                t = conv_table(w, dev, a)
                t["status"] = "ok"
                est = t["estimated_ms_per_update"]
                print(f"bench: [{_now() - t_start:6.1f}s] conv table {w.name}: " + ", ".join(
                    f"{k} {_fmt(v, '.2f')} ms" for k, v in est.items()), flush=True)
            except Exception as e:  # noqa: BLE001 - one failing table must not lose the rest
                t = {"workload": w.name, "status": "error", "reason": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=8)}
                print(f"bench: conv table {w.name}: error: {t['reason'][:200]}", flush=True)
            conv_tables.append(t)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []

    def write(final: bool) -> list[str]:
        """The report so far; written after every item too, so that a run stopped from outside (a
        time limit) leaves every measurement it finished ("complete": false until the end)."""
        if hasattr(os, "getloadavg"):
            env["loadavg_end"] = list(os.getloadavg())
        env["wall_s"] = _now() - t_start
        env["complete"] = final
        report = {"meta": env, "ceilings": ceilings, "conv_tables": conv_tables, "results": results,
                  "skipped": skipped, "roofline": roofline_rows(results), "speedups": speedups(results),
                  "projections": TB.projections(results)}
        return write_outputs(report, a, dev, env)

    write(False)
    for item in plan(a, dev):
        w = item["workload"]
        row: dict[str, Any] = {"section": item["section"], "workload": w.name, "learner": item["learner"],
                               "backend": item["backend"], "variant": item["variant"], "batch_size": w.batch_size,
                               "steps": w.steps, "config": w.to_dict(), "conv_impl": item.get("conv_impl"),
                               "first_block": item.get("first_block"), "conv_precision": item.get("conv_precision"),
                               "conv_streams": item.get("conv_streams")}
        if item["learner"] == "trainer":
            row.update(dataset=item["dataset"], num_dataprovider_workers=item["workers"])
        label = f"{w.name} {item['learner']}" + (f"[{item['backend']}]" if item["backend"] else "") + \
            (f"[{item['dataset']}, workers={item['workers']}]" if item["learner"] == "trainer" else "") + \
            ("" if item["variant"] == "eager" else f" {item['variant']}") + \
            (f" conv={item['conv_impl']}" if item.get("conv_impl") else "") + \
            (f" first_block={item['first_block']}" if item.get("first_block") else "") + \
            (f" conv_precision={item['conv_precision']}" if item.get("conv_precision") else "") + \
            (f" conv_streams={'on' if item['conv_streams'] else 'off'}" if item.get("conv_streams") is not None else "")
        # a sweep point identical to a main-table item reuses that measurement
        twin = next((r for r in results if r["section"] == "main" and r["learner"] == row["learner"]
                     and r["backend"] == row["backend"] and r["variant"] == row["variant"]
                     and r.get("conv_impl") == row["conv_impl"] and r.get("first_block") == row["first_block"]
                     and r.get("conv_precision") == row["conv_precision"] and r.get("conv_streams") == row["conv_streams"]
                     and _same_config(W.Workload(**r["config"]), w)), None)
        if item["section"] != "main" and twin is not None:
            row.update({k: v for k, v in twin.items() if k not in row or k in ("status", "reason")})
            row["note"] = f"same measurement as the main table's {twin['workload']}"
            results.append(row)
            continue
        elapsed = _now() - t_start
        if budget is not None and elapsed > budget:
            row.update({"status": "skipped", "reason": f"time budget {budget:.0f} s exceeded ({elapsed:.0f} s)"})
            skipped.append(label)
            results.append(row)
            continue
        t_item = _now()
        try:
            warmup = a.warmup if item["variant"] == "eager" else max(a.warmup, 3)
            if item["learner"] == "reference":
                r = measure_torch_item(_build_reference, w, dev, a, warmup)
            elif item["learner"] == "torchfunc":
                r = measure_torch_item(_build_torchfunc, w, dev, a, warmup)
            elif item["learner"] == "trainer":
                first = not any(x.get("learner") == "trainer" and x["workload"] == w.name and x.get("status") == "ok"
                                for x in results)
                r = TB.measure_trainer_item(w, dev, a, item["dataset"], item["workers"], _precision_overrides(a),
                                            measure_reference=first)
            elif item["learner"] == "fast":
                be, var, ci, fb = item["backend"], item["variant"], item.get("conv_impl"), item.get("first_block")
                cp, cs = item.get("conv_precision"), item.get("conv_streams")
                r = measure_torch_item(lambda w_, d_, a_: _build_fast(w_, d_, a_, be, var, ci, fb, cp, cs), w, dev,
                                       a, warmup)
                if ci == "auto":
                    r["conv_choices"] = _conv_choices_made()
            else:
                r = measure_jax_item(w, dev, a, warmup, None if budget is None else budget - elapsed)
                env["jax"] = r.get("jax", env["jax"])
            row["status"] = "ok"
            row.update(r)
            fl = flops_from_args(W.make_args(w), epoch=0)
            row["flops"], row["flops_minimal"] = fl["total"], fl["minimal"]
            row["achieved_tflops"] = fl["total"] * row["updates_per_s"] / 1e12
            for key in ("fp32", "tf32"):
                c = ceilings.get(key) if isinstance(ceilings, dict) else None
                row[f"roofline_{key}"] = row["achieved_tflops"] / c["tflops"] if c else None
        except NotApplicable as e:
            row.update({"status": "n/a", "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - one failing item must not lose the others
            row.update({"status": "error", "reason": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=8)})
        row["item_wall_s"] = _now() - t_item
        results.append(row)
        msg = (f"{row['updates_per_s']:.3f} meta-updates/s (median {row['median_s'] * 1e3:.2f} ms, "
               f"{row['iters']} iters)") if row["status"] == "ok" else f"{row['status']}: {row['reason'][:200]}"
        print(f"bench: [{_now() - t_start:6.1f}s] {label}: {msg}", flush=True)
        write(False)

    paths = write(True)
    print("bench: wrote " + ", ".join(paths), flush=True)
    return 0


# -- derived tables -------------------------------------------------------------------------------------
def speedups(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per main workload: each ok item's meta-updates/s over the reference learner's."""
    out = []
    for r in results:
        if r["section"] != "main" or r.get("status") != "ok":
            continue
        ref = next((x for x in results if x["section"] == "main" and x["workload"] == r["workload"]
                    and x["learner"] == "reference" and x.get("status") == "ok"), None)
        tf = next((x for x in results if x["section"] == "main" and x["workload"] == r["workload"]
                   and x["learner"] == "torchfunc" and x.get("status") == "ok"), None)
        out.append({"workload": r["workload"], "learner": r["learner"], "backend": r["backend"],
                    "variant": r["variant"], "conv_impl": r.get("conv_impl"), "first_block": r.get("first_block"),
                    "conv_precision": r.get("conv_precision"), "conv_streams": r.get("conv_streams"),
                    "vs_reference": r["updates_per_s"] / ref["updates_per_s"] if ref else None,
                    "vs_torchfunc": r["updates_per_s"] / tf["updates_per_s"] if tf else None,
                    "vs_reference_process_cpu_time": (ref["cpu_time_median_s"] / r["cpu_time_median_s"]
                                                      if ref and r.get("cpu_time_median_s") and ref.get("cpu_time_median_s")
                                                      else None)})
    return out


def roofline_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Roofline fractions of the fast learner at the smallest (B=8 in full runs) and largest batch
    (B=64) of the batch sweep, plus every main-table B=8 item."""
    rows = []
    sweep = [r for r in results if r["section"] == "sweep_batch" and r.get("status") == "ok"]
    wanted = {8, 64} if any(r["batch_size"] in (8, 64) for r in sweep) else {r["batch_size"] for r in sweep}
    for r in sweep:
        if r["batch_size"] in wanted:
            rows.append({k: r.get(k) for k in ("workload", "learner", "backend", "variant", "batch_size", "flops",
                                              "updates_per_s", "achieved_tflops", "roofline_fp32", "roofline_tf32")})
    return rows


# -- output ---------------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".3g", na: str = "n/a") -> str:
    if x is None:
        return na
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _flop_str(x) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2 ** 20:.1f}"


def _learner_label(r) -> str:
    s = r["learner"]
    if s == "trainer":
        s += f" [{r.get('dataset')}, workers={r.get('num_dataprovider_workers')}]"
    if r.get("backend"):
        s += f" [{r['backend']}]"
    if r.get("conv_impl"):
        s += f" conv={r['conv_impl']}"
    if r.get("first_block"):
        s += f" first_block={r['first_block']}"
    if r.get("conv_precision"):
        s += f" conv_precision={r['conv_precision']}"
    if r.get("conv_streams") is not None:
        s += f" conv_streams={'on' if r['conv_streams'] else 'off'}"
    if r.get("variant") and r["variant"] != "eager":
        s += " + CUDA graph"
    return s


def render_markdown(report: dict[str, Any]) -> str:
    m, res = report["meta"], report["results"]
    L = [f"# mamlpp-fast benchmark: {m['device_name']}", ""]
    L.append(f"- date: {m['date']}; wall time {m.get('wall_s', 0):.0f} s" +
             ("" if m.get("complete", True) else " (INCOMPLETE: the run was still going or was stopped)"))
    L.append(f"- command: `{m['command']}`" + (f" (process: `{m['process_argv']}`)" if m.get("process_argv") else ""))
    L.append(f"- git revision: {m['git_revision']}" + (" (working tree modified)" if m.get("git_dirty") else ""))
    L.append(f"- device: {m['device']} ({m['device_name']}); CPU {m['cpu']} x{m['cpu_count']}, "
             f"torch threads {m['torch_threads']}")
    L.append(f"- versions: python {m['python']}, torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
             f"Triton {m['triton']}, jax {m['jax'] or 'not run'}")
    L.append(f"- precision: {m['precision']} {m['tf32']}; fast-learner backends here: "
             f"{m.get('available_backends')}")
    if m.get("loadavg_start") is not None:
        L.append(f"- load average at start / end: {m['loadavg_start']} / {m.get('loadavg_end')}")
    L.append(f"- timing: {m['settings']}")
    L.append("")
    c = report["ceilings"]
    L.append("## Dense matmul ceiling")
    if c and "error" not in c:
        for k, v in c.items():
            L.append(f"- {k}: " + ("n/a" if not v else
                                   f"{v['tflops']:.2f} TFLOP/s best, {v['tflops_median']:.2f} median (n={v['n']})"))
    else:
        L.append(f"- {c.get('error', 'not measured') if c else 'not measured'}")
    L.append("")
    L += render_conv_tables(report.get("conv_tables") or [])
    cpu = m["device_type"] == "cpu"
    hdr = ("| workload | learner | meta-updates/s | median ms | p10-p90 ms | iters | peak mem MiB | "
           "TFLOP/s | % fp32 peak | % tf32 peak | x reference | status |" + (" process CPU ms (median) |" if cpu else ""))
    sep = "|" + "---|" * (13 if cpu else 12)
    sp = {(s["workload"], s["learner"], s["backend"], s["variant"], s.get("conv_impl"), s.get("first_block")): s
          for s in report["speedups"]}
    for section, title in (("main", "Meta-updates per second (second order, MSL, all MAML++ parts; epoch 0)"),
                           ("sweep_batch", "Fast learner: meta-batch size sweep"),
                           ("sweep_steps", "Fast learner: inner-step sweep")):
        rows = [r for r in res if r["section"] == section]
        if not rows:
            continue
        L += [f"## {title}", "", hdr, sep]
        for r in rows:
            if r.get("status") == "ok":
                s = sp.get((r["workload"], r["learner"], r["backend"], r["variant"], r.get("conv_impl"),
                            r.get("first_block")), {})
                L.append(f"| {r['workload']} | {_learner_label(r)} | {r['updates_per_s']:.3f} | "
                         f"{r['median_s'] * 1e3:.2f} | {r['p10_s'] * 1e3:.2f}-{r['p90_s'] * 1e3:.2f} | {r['iters']} | "
                         f"{_mib(r.get('peak_mem_bytes'))} | {_fmt(r.get('achieved_tflops'), '.3f')} | "
                         f"{_fmt(None if r.get('roofline_fp32') is None else 100 * r['roofline_fp32'], '.2f')} | "
                         f"{_fmt(None if r.get('roofline_tf32') is None else 100 * r['roofline_tf32'], '.2f')} | "
                         f"{_fmt(s.get('vs_reference'), '.2f', '')} | ok{' (' + r['note'] + ')' if r.get('note') else ''} |"
                         + (f" {_fmt(None if r.get('cpu_time_median_s') is None else r['cpu_time_median_s'] * 1e3, '.1f')} |"
                            if cpu else ""))
            else:
                L.append(f"| {r['workload']} | {_learner_label(r)} | n/a | | | | | | | | | "
                         f"{r.get('status')}: {str(r.get('reason', '')).replace('|', '/')[:160]} |" + (" |" if cpu else ""))
        L.append("")
    if report["roofline"]:
        L += ["## Roofline (fast learner, Omniglot 20-way 1-shot)", "",
              "| batch | learner | FLOP per meta-update | meta-updates/s | TFLOP/s | of fp32 ceiling | of tf32 ceiling |",
              "|---|---|---|---|---|---|---|"]
        for r in report["roofline"]:
            L.append(f"| {r['batch_size']} | {_learner_label(r)} | {_flop_str(r['flops'])} | {r['updates_per_s']:.3f} | "
                     f"{r['achieved_tflops']:.3f} | "
                     f"{_fmt(None if r['roofline_fp32'] is None else 100 * r['roofline_fp32'], '.2f')}% | "
                     f"{_fmt(None if r['roofline_tf32'] is None else 100 * r['roofline_tf32'], '.2f')}% |")
        L.append("")
    L += TB.render_markdown(report)
    if report["skipped"]:
        L += ["## Skipped (time budget)", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    L += ["FLOP per meta-update: bench/flops.py (conv + linear forward, backward and double backward; equal to "
          "torch.utils.flop_counter.FlopCounterMode's count). Memory: " +
          ("torch.cuda.max_memory_allocated minus memory allocated before the learner was built." if m["device_type"] == "cuda"
           else "growth of the process's peak RSS during the item (approximate)."), ""]
    return "\n".join(L)


def render_conv_tables(tables: list[dict[str, Any]]) -> list[str]:
    """Markdown of conv_table(): one table per workload, one row per (layer shape, pattern)."""
    from mamlpp_fast.ops.conv import CONV_IMPLS
    if not tables:
        return []
    L = ["## Convolution implementations (mamlpp_fast.ops.conv) at the learner's layer shapes", "",
         "Median ms per call of the call's MAML pattern (support: forward + create_graph derivatives + backward "
         "through them; target: forward + backward); calls = such calls per meta-update; the last row sums "
         "calls x ms (an estimate of a meta-update's convolution time).", ""]
    for t in tables:
        if t.get("status") != "ok":
            L += [f"- {t['workload']}: {t.get('status')}: {str(t.get('reason', ''))[:200]}", ""]
            continue
        L += [f"### {t['workload']} ({t['timer']}, {t['reps']} reps)", "",
              "| x (n, B*Cin, H, W) | w (B, Cout, Cin, k, k) | pattern | calls | " + " | ".join(CONV_IMPLS) +
              " | fastest |", "|" + "---|" * (5 + len(CONV_IMPLS))]
        for r in t["shapes"]:
            L.append(f"| {tuple(r['x'])} | {tuple(r['w'])} | {r['pattern']}{'' if r['input_grad'] else ' (data input)'} "
                     f"| {r['calls_per_update']} | " + " | ".join(
                         "n/a" if k not in r["ms"] else _fmt(r["ms"][k], ".3f", "failed") for k in CONV_IMPLS)
                     + f" | {r['fastest']} |")
        est = t["estimated_ms_per_update"]
        L.append("| **sum per meta-update** | | | | " + " | ".join(_fmt(est.get(k), '.2f') for k in CONV_IMPLS)
                 + f" | {_fmt(est.get('per-shape fastest'), '.2f')} |")
        L.append("")
    return L


def write_outputs(report: dict[str, Any], a, dev, env) -> list[str]:
    os.makedirs(a.out, exist_ok=True)
    stamp = env.get("stamp") or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    devslug = "cpu" if dev.type == "cpu" else "cuda-" + _slug(env.get("device_name", "gpu"))
    suffix = ("_quick" if a.quick else "") + (f"_{_slug(a.tag)}" if a.tag else "")
    base = os.path.join(a.out, f"bench_{devslug}_{stamp}{suffix}")
    latest = os.path.join(a.out, f"latest_{dev.type}{suffix}")
    text = json.dumps(report, indent=1, default=str)
    md = render_markdown(report)
    paths = []
    for path, content in ((base + ".json", text), (base + ".md", md)):
        with open(path, "w") as f:
            f.write(content)
        paths.append(path)
    for src, ext in ((base + ".json", ".json"), (base + ".md", ".md")):
        shutil.copyfile(src, latest + ext)
        paths.append(latest + ext)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
