r"""Convolution of every task of a meta-batch with its own weights (``task_conv2d``), several ways.

Layout (as everywhere in the fast learner): ``x`` is ``(n, B*Cin, H, W)``, task-major channels;
``weight`` is ``(B, Cout, Cin, kh, kw)`` (task ``t``'s fast weights in row ``t``), ``bias`` is
``(B, Cout)``; the result is ``(n, B*Cout, Ho, Wo)``, contiguous, channel ``t*Cout + o``::

    out[i, t*Cout + o] = bias[t, o] + sum_{c, p, q} weight[t, o, c, p, q] * xpad[i, t*Cin + c, s*h + p, s*w + q]

All implementations compute this same function from differentiable PyTorch ops, so autograd gives
the backward and the double backward that MAML++ needs (a convolution is bilinear in (x, weight): its
derivatives are again convolutions, transposed convolutions and weight gradients of the same shapes).
They differ in which kernels run and in rounding only:

- ``grouped``: one ``conv2d`` with ``groups=B`` (what torch.func's vmap does). On an H100 in strict
  float32, cuDNN ran this as a direct grouped kernel plus NCHW<->NHWC transposes around every call:
  ~80% of the fast learner's GPU time (bench/NOTES.md, 2026-11-26).
- ``channels_last``: the same grouped convolution on NHWC copies of ``x`` and ``weight`` (the output
  is copied back to NCHW for the batch-norm op), so that cuDNN may pick its NHWC grouped kernels.
- ``unfold``: im2col (``F.unfold``) and one batched matmul over (example, task) pairs whose result is
  already in the output layout: ``(1, B, Cout, K) @ (n, B, K, L) -> (n, B, Cout, L)`` with
  ``K = Cin*kh*kw`` and ``L = Ho*Wo``; cuBLAS runs n*B small GEMMs, no transposes.
- ``unfold_bmm``: im2col, then the columns are regrouped per task, ``(B, K, n*L)``, for B large GEMMs
  ``(B, Cout, K) @ (B, K, n*L)``; the result is permuted back to ``(n, B*Cout, Ho, Wo)``.
- ``per_task``: B ordinary convolutions on channel slices, stacked.
- ``triton``: our implicit-GEMM Triton kernels (mamlpp_fast/triton/conv.py): forward, data gradient
  and weight gradient of every task in one launch each, the operands gathered from the task-major
  layout on the fly (no im2col buffer, no transposes), differentiable to any order through the three
  kernels alone. Needs triton and a CUDA device (or TRITON_INTERPRET=1 with CPU tensors, for tests).

``auto`` chooses per layer shape on a CUDA device by timing each implementation once on the exact
MAML++ pattern (forward, first derivatives with ``create_graph``, and a backward through them); the
choice is cached per (shape, stride, padding, dtype, device, TF32 setting) and logged once. Like
``torch.backends.cudnn.benchmark`` it may pick differently between runs, which changes results at
rounding level only. On other devices ``auto`` follows a fixed rule from CPU measurements
(`cpu_rule`: ``unfold`` for one input channel per task, else ``grouped``), so CPU runs stay
deterministic.
"""
from __future__ import annotations

import logging
import statistics
import threading

import torch
import torch.nn.functional as F

from .fanout import saved_alias

__all__ = ["CONV_IMPLS", "available_conv_impls", "task_conv2d", "choose_conv_impl", "time_conv_impls",
           "clear_conv_cache", "conv_choices", "fastest", "record_conv_calls"]

CONV_IMPLS = ("grouped", "channels_last", "unfold", "unfold_bmm", "per_task", "triton")
logger = logging.getLogger("mamlpp_fast")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def available_conv_impls(device) -> tuple[str, ...]:
    """The implementations that can run on tensors of `device`: all but ``triton``, which needs triton
    and a CUDA device (or TRITON_INTERPRET=1 with CPU tensors)."""
    from .. import triton as tb
    dev = torch.device(device)
    ok_triton = tb.is_available() and (dev.type == "cuda" or tb._interpret())
    return tuple(i for i in CONV_IMPLS if i != "triton" or ok_triton)


def check_task_conv_inputs(x, weight, bias, num_tasks) -> None:
    """The one validation of task_conv2d's input, with messages that name the offending tensor (a wrong
    shape would otherwise surface as a confusing error deep inside cuDNN or a silently wrong reshape).
    What one implementation alone requires is checked where the op picks it (`_triton`)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"task_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"task_conv2d: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t is not x and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"task_conv2d: {name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")
    if x.dim() != 4:
        raise ValueError(f"task_conv2d: x must be 4-D (n, B*Cin, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"task_conv2d: weight must be 5-D (B, Cout, Cin, kh, kw), got shape {tuple(weight.shape)}")
    b, cout, cin = weight.shape[:3]
    if b != num_tasks:
        raise ValueError(f"task_conv2d: weight has {b} task rows but num_tasks={num_tasks}")
    if x.shape[1] != num_tasks * cin:
        raise ValueError(f"task_conv2d: x has {x.shape[1]} channels, expected num_tasks*Cin = "
                         f"{num_tasks}*{cin} for weight of shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (b, cout):
        raise ValueError(f"task_conv2d: bias must be (B, Cout) = ({b}, {cout}), got shape {tuple(bias.shape)}")


def task_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_tasks: int,
                stride=1, padding=0, impl: str = "grouped", pattern: str = "second_order",
                weight_saved: torch.Tensor | None = None,
                input_saved: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task convolution in the task-major layout (see the module docstring); differentiable to any
    order. `impl` is one of CONV_IMPLS or "auto" (`choose_conv_impl`). `pattern` only tells `auto`
    what the caller will do with the result (see `_maml_pattern`), so that it times the right work.

    `weight_saved`: an alias of `weight` (`mamlpp_fast.ops.fanout`) that the backward reads in place of
    `weight`, so that the gradient the second-order backward returns for the weight goes to that alias
    (summed by the fan-out node with the others) rather than being added to the forward's by autograd.
    `input_saved`: the same for `x`: an alias of x returned by x's producer (``alias=True`` of `bn_pool`
    and `conv_bn_pool`), so that the gradient the second-order backward returns for x reaches the
    producer's backward as its second gradient, which its kernels add where they load the first.
    Only the triton implementation has a backward of its own to give them to; the others ignore them."""
    check_task_conv_inputs(x, weight, bias, num_tasks)
    if weight_saved is not None:
        weight_saved = saved_alias("task_conv2d", "weight", weight, weight_saved)
    if input_saved is not None:
        input_saved = saved_alias("task_conv2d", "x", x, input_saved)
    if pattern not in PATTERNS:
        raise ValueError(f"task_conv2d: unknown pattern {pattern!r} (choose from {', '.join(PATTERNS)})")
    stride, padding = _pair(stride), _pair(padding)
    if _recording is not None:
        _recording.append((tuple(x.shape), tuple(weight.shape), stride, padding, bool(x.requires_grad), pattern))
    if impl == "auto":
        impl = choose_conv_impl(tuple(x.shape), tuple(weight.shape), stride, padding, x.dtype, x.device,
                                input_grad=x.requires_grad, pattern=pattern)
    fn = _IMPLS.get(impl)
    if fn is None:
        raise ValueError(f"task_conv2d: unknown impl {impl!r} (choose from {', '.join(CONV_IMPLS)} or auto)")
    if impl == "triton":
        return fn(x, weight, bias, num_tasks, stride, padding, w_saved=weight_saved, x_saved=input_saved)
    return fn(x, weight, bias, num_tasks, stride, padding)


# ---- the implementations ----------------------------------------------------------------------------
def _grouped(x, w, bias, b, stride, padding):
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                    stride=stride, padding=padding, groups=b)


def _channels_last(x, w, bias, b, stride, padding):
    cl = torch.channels_last
    out = F.conv2d(x.contiguous(memory_format=cl), w.reshape(-1, *w.shape[2:]).contiguous(memory_format=cl),
                   None if bias is None else bias.reshape(-1), stride=stride, padding=padding, groups=b)
    return out.contiguous()


def _columns(x, w, b, stride, padding):
    """im2col of every (example, task): (n, B, K, L), K ordered (c, p, q) like weight.view(B, Cout, K)."""
    n, _, h, wd = x.shape
    kh, kw = w.shape[3], w.shape[4]
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, B*Cin*kh*kw, L)
    ho, wo = _out_size(h, kh, stride[0], padding[0]), _out_size(wd, kw, stride[1], padding[1])
    return cols.view(n, b, -1, ho * wo), ho, wo


def _unfold(x, w, bias, b, stride, padding):
    cols, ho, wo = _columns(x, w, b, stride, padding)
    n, cout = x.shape[0], w.shape[1]
    out = torch.matmul(w.reshape(1, b, cout, -1), cols)  # (n, B, Cout, L): the output layout
    if bias is not None:
        out = out + bias.reshape(1, b, cout, 1)
    return out.view(n, b * cout, ho, wo)


def _unfold_bmm(x, w, bias, b, stride, padding):
    cols, ho, wo = _columns(x, w, b, stride, padding)
    n, cout = x.shape[0], w.shape[1]
    k, l_ = cols.shape[2], cols.shape[3]
    per_task = cols.permute(1, 2, 0, 3).reshape(b, k, n * l_)  # (B, K, n*L)
    wm = w.reshape(b, cout, k)
    out = torch.bmm(wm, per_task) if bias is None else torch.baddbmm(bias.reshape(b, cout, 1), wm, per_task)
    return out.view(b, cout, n, l_).permute(2, 0, 1, 3).contiguous().view(n, b * cout, ho, wo)


def _per_task(x, w, bias, b, stride, padding):
    n, _, h, wd = x.shape
    xs = x.view(n, b, -1, h, wd)
    outs = [F.conv2d(xs[:, t], w[t], None if bias is None else bias[t], stride=stride, padding=padding)
            for t in range(b)]
    out = torch.stack(outs, dim=1)  # (n, B, Cout, Ho, Wo)
    return out.view(n, -1, out.shape[3], out.shape[4])


def _triton(x, w, bias, b, stride, padding, w_saved=None, x_saved=None):
    from .. import triton as tb
    if not tb.is_available():
        raise RuntimeError(f"task_conv2d: impl 'triton' is not available here: {tb.unavailable_reason()}")
    if x.device.type != "cuda" and not tb._interpret():
        raise RuntimeError("task_conv2d: impl 'triton' takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"task_conv2d: impl 'triton' takes float32 or float64 tensors, got {x.dtype}")
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"task_conv2d: impl 'triton' takes a square stride and padding only, got stride "
                         f"{stride} and padding {padding}")
    return triton_unchecked(x, w, bias, b, stride, padding, w_saved, x_saved)


def triton_unchecked(x, w, bias, b, stride, padding, w_saved=None, x_saved=None):
    """The triton implementation's autograd op without `_triton`'s availability and device checks: what
    the CPU stand-ins of bench.trace and bench.precision put in its place (they replace the kernels'
    launchers of mamlpp_fast.ops.conv_triton_autograd), so that they take the implementation's
    signature from here rather than repeating it."""
    from .conv_triton_autograd import task_conv2d_triton
    return task_conv2d_triton(x, w, bias, b, stride, padding, w_saved, x_saved)


_IMPLS = {"grouped": _grouped, "channels_last": _channels_last, "unfold": _unfold, "unfold_bmm": _unfold_bmm,
          "per_task": _per_task, "triton": _triton}


# ---- recording the shapes a learner runs (for benchmarks) ------------------------------------------------
_recording: list | None = None


class record_conv_calls:
    """Context manager: the (x_shape, w_shape, stride, padding, input_grad, pattern) of every task_conv2d call
    inside it, in call order (`with record_conv_calls() as calls: ...`). Used by bench/run.py to time
    the implementations at exactly the shapes a learner runs."""

    def __enter__(self) -> list:
        global _recording
        self._saved, _recording = _recording, []
        return _recording

    def __exit__(self, *exc):
        global _recording
        _recording = self._saved
        return False


# ---- choosing by measurement ------------------------------------------------------------------------
_lock = threading.Lock()
_choices: dict = {}   # key -> (impl, {impl: ms or None}), ms as time_conv_impls measures it


def clear_conv_cache() -> None:
    with _lock:
        _choices.clear()


def conv_choices() -> dict:
    """What `auto` chose so far: {key: (impl, {impl: ms or None})} (a copy)."""
    with _lock:
        return dict(_choices)


PATTERNS = ("second_order", "first_order")


def _maml_pattern(impl, x, w, bias, b, stride, padding, probes, pattern="second_order"):
    """The convolution work of one layer in a meta-update.

    ``second_order`` (the support pass of a second-order inner step): one forward, the inner gradients
    w.r.t. (x when it requires grad, weight, bias) with create_graph, and the outer backward through
    output and gradients: forward, data and weight gradients, and the double-backward terms.
    ``first_order`` (a target pass, or a first-order inner step): one forward and one backward."""
    out = _IMPLS[impl](x, w, bias, b, stride, padding)
    inner = (out * probes[0]).sum()
    wrt = [t for t in (x, w, bias) if t.requires_grad]
    if pattern == "first_order":
        torch.autograd.grad(inner, wrt)
        return
    grads = torch.autograd.grad(inner, wrt, create_graph=True)
    outer = (out * probes[1]).sum()
    for t, g in zip(wrt, grads):
        outer = outer + (g * probes[2 if t is x else 3 if t is w else 4]).sum()
    outer.backward()


def _cuda_ms(run, reps: int, stream) -> float:
    """GPU milliseconds of one `run()`: captured once in a CUDA graph on `stream` (where the caller warmed
    it up) and replayed `reps` times between two events, so that the time is the kernels' own and not
    the host's launch overhead (the fast learner replays its meta-update as a CUDA graph; eager launch
    gaps would favour implementations with fewer, larger kernels). Where capture fails, the reps run
    eagerly back to back instead."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = None
    try:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        graph.replay()
        step = graph.replay
    except Exception as e:  # noqa: BLE001 - not capturable here: eager timing
        logger.info("task_conv2d: timing without a CUDA graph (%s: %s)", type(e).__name__, e)
        graph = None
        torch.cuda.synchronize()
        step = run
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def time_conv_impls(x_shape, w_shape, stride=1, padding=0, dtype=torch.float32, device="cuda",
                    impls=None, reps: int = 5, warmup: int = 2, seed: int = 0,
                    input_grad: bool = True, pattern: str = "second_order") -> dict:
    """Milliseconds of `_maml_pattern(pattern)` per implementation on random inputs of these shapes: on
    a GPU the mean GPU time of `reps` CUDA-graph replays (`_cuda_ms`), elsewhere the median of `reps`
    timed calls; None for an implementation that raised.
    `impls`: default `available_conv_impls(device)`.
    `input_grad`: whether x requires grad (False for the first layer, whose input is data)."""
    if pattern not in PATTERNS:
        raise ValueError(f"time_conv_impls: unknown pattern {pattern!r} (choose from {PATTERNS})")
    import time

    device = torch.device(device)
    impls = available_conv_impls(device) if impls is None else tuple(impls)
    stride, padding = _pair(stride), _pair(padding)
    b, cout, _, kh, kw = w_shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    x = rand(*x_shape).requires_grad_(input_grad)
    w = (rand(*w_shape) * 0.1).requires_grad_(True)
    bias = rand(b, cout).requires_grad_(True)
    ho = _out_size(x_shape[2], kh, stride[0], padding[0])
    wo = _out_size(x_shape[3], kw, stride[1], padding[1])
    out_shape = (x_shape[0], b * cout, ho, wo)
    probes = (rand(*out_shape), rand(*out_shape), rand(*x_shape), rand(*w_shape), rand(b, cout))
    cuda = device.type == "cuda"
    result = {}
    for impl in impls:
        def run():
            _maml_pattern(impl, x, w, bias, b, stride, padding, probes, pattern)

        try:
            if cuda:
                # the warm-up on the stream the timing captures on: the launchers' per-stream buffers (the
                # Triton kernels' tickets, `triton._device._tile_counters`) are cached outside a capture
                # only, so a capture on a stream that never ran would record a zero-fill per launch that
                # takes one, which the learner's own captured update (warmed up on its capture stream)
                # does not run
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        run()
                torch.cuda.current_stream().wait_stream(stream)
                result[impl] = _cuda_ms(run, reps, stream)
            else:
                for _ in range(warmup):
                    run()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - t0) * 1e3)
                result[impl] = statistics.median(times)
        except Exception as e:  # noqa: BLE001 - an implementation that cannot run here is not chosen
            logger.info("task_conv2d: %s failed at x%s w%s: %s", impl, tuple(x_shape), tuple(w_shape), e)
            result[impl] = None
        finally:
            x.grad = w.grad = bias.grad = None
    return result


def fastest(times: dict) -> str:
    """The implementation with the smallest time (None = failed); ``grouped`` when every one failed."""
    ok = {k: v for k, v in times.items() if v is not None}
    return min(ok, key=ok.get) if ok else "grouped"


def cpu_rule(w_shape) -> str:
    """`auto` off CUDA: a fixed rule, so that CPU results do not depend on timing noise. Measured on the
    2-core CPU, torch 2.13, 1 thread, 2026-12-01, ms per call of the pattern
    (bench/results/latest_cpu_convtable-omniglot20w1s.md): the first Omniglot layer (one input channel
    per task, x (20, 8, 28, 28), w (8, 64, 1, 3, 3)) 137 grouped vs 70 unfold second order, 49 vs 45
    first order (oneDNN has no fast grouped kernel for one channel per group); with 64 input channels
    (x (20, 512, 14, 14)) grouped wins, 455 vs 681 (first order 148 vs 205). mini-ImageNet's first
    layer (3 input channels) was a draw in `time_conv_impls(..., device="cpu", reps=3)` calls the same
    day: 70 vs 58 ms at x (5, 6, 84, 84) second order, 1115 vs 1132 at (75, 6, 84, 84) first order."""
    return "unfold" if w_shape[2] == 1 else "grouped"


def choose_conv_impl(x_shape, w_shape, stride, padding, dtype, device, input_grad: bool = True,
                     pattern: str = "second_order") -> str:
    """The implementation `auto` uses for this layer: on CUDA the fastest by `time_conv_impls`
    (measured once per key, never while a CUDA graph is being captured), else `cpu_rule`."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_rule(w_shape)
    from ..triton._device import conv_precision
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, conv_precision()
    key = (tuple(x_shape), tuple(w_shape), _pair(stride), _pair(padding), dtype, str(device), tf32,
           bool(input_grad), pattern)
    with _lock:
        hit = _choices.get(key)
    if hit is not None:
        return hit[0]
    if torch.cuda.is_current_stream_capturing():
        return "grouped"  # cannot time inside a capture; the uncaptured warm-up normally chose already
    with torch.enable_grad():
        times = time_conv_impls(x_shape, w_shape, stride, padding, dtype, device, input_grad=input_grad,
                                pattern=pattern)
    impl = fastest(times)
    with _lock:
        _choices[key] = (impl, times)
    logger.info("task_conv2d auto: x%s w%s stride %s padding %s %s -> %s (%s)", tuple(x_shape), tuple(w_shape),
                stride, padding, pattern, impl, ", ".join(f"{k} {'failed' if v is None else f'{v:.3f} ms'}"
                                                 for k, v in times.items()))
    return impl
