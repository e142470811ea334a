"""Kernel accounting of one fast-learner meta-update as it would run on a GPU, computed on a CPU.

    python -m bench.trace [--workload NAME] [--batch-size B] [--backend cuda|triton|torch]
                          [--conv-impl triton|grouped|unfold|unfold_bmm|per_task|channels_last]
                          [--first-block auto|fused|unfused] [--no-cuda-graph] [--tf32] [--tf32x3]
                          [--conv-efficiency F] [--device-ceilings h100|h200] [--quick] [--json] [--out FILE.json]
    python -m bench.trace --calibrate     # launch costs and the comparison with the measured H100 update

What it does: builds the fast learner (mamlpp_fast.fast) for the workload on the CPU in float32 and runs
one meta-update (second order, MSL, epoch 0, as bench.run measures) while recording every operation:

- aten operations (a TorchDispatchMode below autograd, so the backward and double backward that the
  autograd engine runs are recorded too): one GPU kernel per operation that is not a view, an empty
  allocation or a metadata query; a `_foreach_*` operation launches ceil(tensors / T) kernels, T being
  the tensors-per-launch limit of PyTorch's multi_tensor_apply for its number of tensor lists (110, 64,
  48, 36, 30 for 1..5 lists), or one kernel per tensor where PyTorch takes its slow route (tensors
  not dense, or of different strides across the lists); `select_backward` / `slice_backward` launch two (zero fill, copy). FLOPs: torch.utils.flop_counter's formulas (the same as bench.flops'
  FlopCounterMode count, with the grouped-convolution weight-gradient correction of bench.flops).
- the custom ops, mapped to the kernels of the simulated backend (their aten operations on the CPU are
  hidden): per-step batch norm with backend `cuda` (kernels/per_step_bn.cu) or `triton`
  (mamlpp_fast/triton/per_step_bn.py): a reduce kernel and an apply kernel per forward, backward and
  double backward; LSLR with `cuda` (kernels/lslr.cu): ceil(tensors / 24) forward launches, and per group
  of 24 one backward and one dalpha launch; with `triton` (mamlpp_fast/triton/lslr.py): one forward and
  one backward launch for all tensors (one per tensor in trees before that kernel took tuples), one
  dalpha launch and the zero fill of its workspace. Backend `torch`
  runs the ops' aten operations, which are recorded as such.
- the fused first block (`--first-block`, default: fused unless the backend is torch, the design priced
  here; the learner's own `first_block="auto"` takes it on CUDA only while
  mamlpp_fast.fast.AUTO_FUSES_ON_CUDA["first_block"] holds; mamlpp_fast/triton/conv_block.py): per forward a
  statistics and an apply kernel, per backward and double backward a reduction, an apply and the
  in-order sum of the per-program weight gradients (`_block_patch` below for bytes and FLOPs; the FLOPs
  include the recomputation of the convolution output, so they exceed bench.flops' count).
- convolutions with conv_impl `triton` (mamlpp_fast/triton/conv.py): per forward and data gradient the
  weight re-layout copy and the main kernel, per weight gradient the main kernel; when its split is > 1
  (split from the kernels' own `conv_block_config` / `wgrad_block_config` with the trace's SM count, 132
  by default) the main kernel also sums the partials (or, with MAMLPP_CONV_SPLIT_SUM=separate, a
  separate sum kernel does: `_conv_triton_patch`); the weight gradient's lane table is
  cached per shape (not launched in a steady-state meta-update). The other conv_impls are aten operations;
  for `grouped` and `channels_last`, cuDNN's kernels per aten convolution call are modelled as: one
  convolution kernel per computed result (forward; data gradient and weight gradient of
  convolution_backward) plus, for `grouped`, the layout transposes that the 2026-11-26 H100 profile
  showed around strict fp32 grouped convolutions (`CUDNN_TRANSPOSES_PER_CALL`, calibrated there: 1,040
  genericTranspose calls per meta-update); `channels_last`'s layout copies are aten operations.

Steady state: Adam runs as on a CUDA device (foreach) with its state already created, and the
running-statistics update's constants (built once per structure on the host) are not recorded.

Bytes: each kernel reads its input tensors once and writes its outputs once (the compulsory traffic; an
expanded tensor counts its storage once). Kernels that re-read operands through L2 (the convolutions'
gathers) or whose operands stay in the 50 MB L2 between kernels are not modelled: bytes are DRAM-sized
upper bounds per kernel and lower bounds on the L2 traffic.

Predicted time (always a prediction, never a measurement): per kernel max(FLOPs / FMA rate, bytes /
bandwidth), plus a per-launch cost (inside a CUDA graph, or eager); FLOPs run at the strict-fp32 rate,
or the TF32 rate with --tf32 for convolutions and matmuls. The ceilings (`CEILINGS`) come from the
committed H100 measurements of 2026-11-26 (bench/results/gpu_2026-11-26/); how each was derived is in
CEILINGS[...]['sources']. The H200 entry was measured on 2026-12-04 by `python -m bench.ceilings`.
Calibration against the one measured captured meta-update is in bench/NOTES.md ("Trace").

Layers: an operation is attributed to the layer whose activation size (H of its largest 4-D tensor)
it touches (conv i, its batch norm and its pooling share a layer), else to 'params' (LSLR, Adam, running
statistics, the finiteness check, by where it was called) or 'head+grads' (everything else without a 4-D
activation: linear layer, loss, sums and accumulations of weight-shaped gradients).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CEILINGS", "Kernel", "TraceResult", "trace_meta_update", "predict", "summarize", "main",
           "CUDNN_TRANSPOSES_PER_CALL"]

# Device ceilings. Only measured numbers (or numbers derived from measurements, with the derivation).
CEILINGS: dict[str, dict[str, Any]] = {
    "h100": {
        "device": "NVIDIA H100 80GB HBM3 (132 SMs), measured 2026-11-26",
        "fp32_tflops": 51.67,
        "tf32_tflops": 414.85,
        "bandwidth_tbs": 2.23,
        "graph_launch_us": 0.51,
        "eager_launch_us": 20.3,
        "sms": 132,
        "sources": {
            "fp32_tflops": "best of 20 8192x8192 torch.mm, strict fp32 (bench_cuda-...-231853.md, 'Dense matmul ceiling')",
            "tf32_tflops": "same, TF32",
            "bandwidth_tbs": ("effective streaming rate of our cuda-backend BN kernels on the largest shape "
                              "(bench_ops_h100_20261126.json, mini_imagenet N75 T2 C48 84x84: forward + backward "
                              "+ double backward move 16 x 203.2 MB in 1.457 ms): a measured lower bound of the "
                              "copy bandwidth; no pure copy was timed"),
            "graph_launch_us": ("upper bound: intercept of the captured fast [triton] meta-update over B "
                                "(B=1 9.88 ms, B=2 18.50 ms: 1.26 ms at B=0) divided by the trace's "
                                "2,472 kernels of that configuration (triton backend, grouped convolutions, "
                                "Omniglot 20w1s, B=1); the intercept also holds B-independent work"),
            "eager_launch_us": ("(eager - captured) / kernels of the fast [triton] Omniglot 20w1s B=8 "
                                "meta-update: (135.86 - 74.02) ms / 3,040 kernels (host-side cost per "
                                "launch, Python included); `python -m bench.trace --calibrate` recomputes both"),
        },
    },
    "h200": {
        "device": "NVIDIA H200 (132 SMs), measured 2026-12-04",
        "fp32_tflops": 50.74,
        "tf32_tflops": 388.3,
        "bandwidth_tbs": 4.17,
        "graph_launch_us": 0.85,
        "eager_launch_us": 11.0,
        "sms": 132,
        "sources": {
            "all": ("python -m bench.ceilings on the lent H200, torch 2.11.0+cu130 "
                    "(bench/results/gpu_2026-12-04/call1_ceilings.json)"),
            "fp32_tflops": "best of 10 torch.mm 8192^3, random float32, strict fp32",
            "tf32_tflops": "same, TF32",
            "bandwidth_tbs": ("best of 10 device-to-device copies of 2 GiB, bytes read + written (a pure copy, "
                              "unlike the H100 entry's lower bound from the batch-norm kernels)"),
            "graph_launch_us": ("replay of a CUDA graph of 2,000 one-element adds over 2,000: an upper bound "
                                "(each add's own run is in it)"),
            "eager_launch_us": "2,000 one-element adds from Python, host clock, over 2,000 (torch's dispatch included)",
        },
    },
}

# Calibrated on the 2026-11-26 H100 profile (bench/NOTES.md): 1,040 genericTranspose_kernel calls per
# Omniglot 20w1s B=8 meta-update around cuDNN's strict-fp32 grouped convolutions (NCHW <-> NHWC). The
# trace counts 215 aten.convolution and 60 aten.convolution_backward calls there; 4 transposes per forward
# call and 3 per backward call give exactly 1,040 (a fit of the one profiled count, not a derivation).
CUDNN_TRANSPOSES_PER_CALL = {"convolution": 4, "convolution_backward": 3}

_FOREACH_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
    "alias", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "resize_", "set_", "_reshape_alias", "_unsafe_view",
    "view", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select", "slice", "as_strided",
    "split", "split_with_sizes", "unbind", "narrow", "diagonal", "unfold", "view_as", "expand_as",
    "_is_all_true", "record_stream", "is_nonzero", "_record_function_enter_new", "_record_function_exit",
    "squeeze_", "unsqueeze_", "t_", "transpose_", "as_strided_", "detach_",
}
# aten operations whose CUDA implementation launches more than one kernel: the backward of an indexing
# view allocates zeros and copies the gradient into them.
_MULTI_KERNEL = {"select_backward": 2, "slice_backward": 2}


@dataclass
class Kernel:
    """One GPU kernel launch (or a group of identical ones: `launches`)."""
    name: str
    kind: str
    layer: str
    launches: int = 1
    flops: int = 0
    bytes: int = 0
    tf32_ok: bool = False   # runs at the TF32 rate with --tf32 (convolutions, matmuls)
    call: Any = None        # custom ops: what bench.static_metrics needs to replay the launch
    node: str = "forward"   # the autograd node whose backward launched it ("forward": none running)
    programs: int = 0       # CTAs of a launch that cannot fill the device (0: it fills it); see `_share`
    consts: Any = None      # fused first block: the constexprs that tell its pass's kernel apart (`_block_efficiency`)
    chain: int = 0          # a program's dependent steps of little work each (0: none modelled); `longest_chains`
    group: int = 0          # > 0: launched inside a `side_by_side` pair (config key conv_streams); `side_by_side_counts`
    branch: int = 0         # in such a pair: 0 on the current stream, 1 on the side stream


@dataclass
class TraceResult:
    config: dict
    kernels: list = field(default_factory=list)


# ---- helpers ---------------------------------------------------------------------------------------------
def _tensors(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t) -> int:
    """Bytes a kernel moves for tensor t: its elements, but an expanded view only its storage."""
    n = t.numel() * t.element_size()
    try:
        n = min(n, t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - no storage (meta, sparse): the view's size
        pass
    return n


def _foreach_fast_route(lists) -> bool:
    """Whether a `_foreach_*` operation on these tensor lists takes PyTorch's multi-tensor route on a CUDA
    device (its ForeachUtils' conditions): every tensor of one dtype and device, non-overlapping and
    dense, and the corresponding tensors of the lists of equal sizes and equal strides (dimensions of
    size 1 aside). Otherwise it runs the operation once per tensor."""
    first = lists[0][0]
    for lst in lists:
        for t in lst:
            if t.dtype != first.dtype or t.device != first.device or not _dense(t):
                return False
    for lst in lists[1:]:
        for a, b in zip(lists[0], lst):
            if a.shape != b.shape or any(n != 1 and x != y for n, x, y in zip(a.shape, a.stride(), b.stride())):
                return False
    return True


def _dense(t) -> bool:
    """Non-overlapping and dense: the elements fill a contiguous block in some order of the dimensions."""
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def _unique_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(t)
    return total


class _Recorder:
    """Holds the kernel list, the layer map and the nesting state of one trace."""

    def __init__(self, layer_sizes: dict, sim_backend: str, conv_impl: str, sms: int):
        self.kernels: list[Kernel] = []
        self.layer_sizes = layer_sizes   # activation H -> layer name
        self.sim_backend = sim_backend
        self.conv_impl = conv_impl
        self.sms = sms
        self.hidden = 0                  # > 0: aten ops are parts of a custom op, not recorded
        self.scope: list[str] = []       # 'params' scopes: lslr, adam, running_stats, finite_check
        self.group = self.branch = 0     # the `side_by_side` pair (and its branch) being recorded, 0: none
        self.groups = 0

    @contextlib.contextmanager
    def side(self, branch: int):
        """mamlpp_fast.triton._device's observer: the launches of one branch of a `side_by_side` pair
        (branch 0 opens a new pair)."""
        if branch == 0:
            self.groups += 1
        saved = (self.group, self.branch)
        self.group, self.branch = self.groups, branch
        try:
            yield
        finally:
            self.group, self.branch = saved

    @contextlib.contextmanager
    def hide(self):
        self.hidden += 1
        try:
            yield
        finally:
            self.hidden -= 1

    @contextlib.contextmanager
    def in_scope(self, name):
        self.scope.append(name)
        try:
            yield
        finally:
            self.scope.pop()

    def layer_of(self, ts) -> str:
        best = None
        for t in ts:
            if t.dim() == 4 and (best is None or t.numel() > best.numel()):
                best = t
        if best is not None:
            name = self.layer_sizes.get(int(best.shape[-1]))
            if name is not None:
                return name
        return "params" if self.scope else "head+grads"

    def add(self, **kw):
        if self.scope and kw.get("kind") not in ("conv", "bn", "lslr"):
            kw["kind"] = self.scope[-1]  # adam, running_stats, finite_check
        kw.setdefault("node", _node_label())
        kw.setdefault("group", self.group)
        kw.setdefault("branch", self.branch)
        self.kernels.append(Kernel(**kw))


def _node_label() -> str:
    """The autograd node running now, as a short label: "forward" when none (the forward passes and the
    optimizer), else its class name without the generated prefixes and the "Backward" suffix (e.g.
    "_ConvF" = the backward of the Triton convolution's forward, "mamlpp_bn_forward" = the registered
    batch norm's backward, "MaxPool2DWithIndices")."""
    import torch
    node = torch._C._current_autograd_node()
    if node is None:
        return "forward"
    name = type(node).__name__
    for prefix in ("GeneratedBackwardFor_",):
        name = name[len(prefix):] if name.startswith(prefix) else name
    for suffix in ("_defaultBackward", "Backward0", "Backward"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return name


def _aten_kind(name: str) -> str:
    if name in ("convolution", "convolution_backward", "_convolution"):
        return "conv"
    if name in ("im2col", "col2im"):
        return "conv"
    if "max_pool" in name or "avg_pool" in name:
        return "pool"
    if name in ("mm", "bmm", "baddbmm", "addmm", "matmul"):
        return "matmul"
    if "softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss"
    if name.startswith("_foreach"):
        return "foreach"
    if name in ("sum", "mean", "var_mean", "var", "std", "amax", "max", "min", "norm", "linalg_vector_norm"):
        return "reduction"
    if name in ("copy_", "clone", "_to_copy", "contiguous", "cat", "stack", "fill_", "zero_", "zeros",
                "zeros_like", "ones_like", "full", "full_like", "scalar_tensor", "index_put_", "new_zeros",
                "new_full", "arange", "_unsafe_index_put", "index", "gather", "scatter", "where"):
        return "copy/fill"
    return "elementwise"


# ---- the dispatch mode -------------------------------------------------------------------------------------
def _make_mode(rec: _Recorder):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    from .flops import _conv_backward_flop_grouped
    registry = dict(flop_registry)
    registry[torch.ops.aten.convolution_backward] = shape_wrapper(_conv_backward_flop_grouped)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if rec.hidden or func.namespace == "mamlpp":
                # the registered ops (torch.ops.mamlpp.*) launch nothing themselves: their backend
                # functions, recorded above, do
                return out
            name = func._overloadpacket.__name__
            if name in _NO_KERNEL or getattr(func, "is_view", False):
                return out
            ins = list(_tensors(args)) + list(_tensors(kwargs))
            outs = list(_tensors(out))
            # mutated arguments count as written (and read)
            written = list(outs)
            for i, a in enumerate(func._schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write and i < len(args):
                    written += list(_tensors(args[i]))
            nbytes = _unique_bytes(ins) + _unique_bytes(written)
            flops = 0
            packet = func._overloadpacket
            if packet in registry:
                flops = int(registry[packet](*args, **kwargs, out_val=out))
            kind = _aten_kind(name)
            layer = rec.layer_of(ins + outs)
            launches = _MULTI_KERNEL.get(name, 1)
            if name.startswith("_foreach"):
                lists = [a for a in list(args) if isinstance(a, (list, tuple)) and a and
                         isinstance(a[0], torch.Tensor)]
                depth = len(lists) + (0 if name.endswith("_") else 1)
                n = max((len(a) for a in lists), default=1)
                launches = max(1, math.ceil(n / _FOREACH_MAX_TENSORS.get(min(max(depth, 1), 5), 30)))
                if not _foreach_fast_route(lists):
                    launches = n  # PyTorch's slow route: the operation once per tensor
                    name += " (per tensor)"
            if name in ("convolution", "convolution_backward") and rec.conv_impl in ("grouped", "channels_last"):
                results = 1 if name == "convolution" else sum(bool(m) for m in args[-1][:2])
                has_bias_grad = name == "convolution_backward" and bool(args[-1][2])
                conv_launches = results
                rec.add(name=f"cudnn {name}", kind="conv", layer=layer, launches=conv_launches,
                        flops=flops, bytes=nbytes, tf32_ok=True)
                if rec.conv_impl == "grouped":  # NCHW <-> NHWC around the call; each moves its tensor twice
                    rec.add(name="cudnn genericTranspose", kind="conv transpose", layer=layer,
                            launches=CUDNN_TRANSPOSES_PER_CALL[name], flops=0, bytes=2 * nbytes)
                if has_bias_grad:
                    rec.add(name="bias grad reduction", kind="reduction", layer=layer, launches=1,
                            bytes=_nbytes(args[0]))
                return out
            rec.add(name=f"aten.{name}", kind=kind, layer=layer, launches=launches, flops=flops, bytes=nbytes,
                    tf32_ok=kind in ("conv", "matmul"))
            return out

    return Mode()


# ---- simulated custom-op backends ------------------------------------------------------------------------
def _bn_block_cuda(M: int, TC: int, sms: int) -> int:
    """chunks of kernels/launchers.h bn_num_chunks (for the record; the launch count does not depend on it)."""
    c = min(math.ceil(4 * sms / TC), math.ceil(M / 2048))
    return max(1, min(c, 1024))


def _triton_lslr_launches(n: int) -> int:
    """Forward (or backward) launches of the triton backend's LSLR for n tensors: one for all of them
    when its kernels take tuples of tensors (mamlpp_fast/triton/lslr.py `_starts`), else one per tensor
    (the tree before that change)."""
    try:
        from mamlpp_fast.triton import lslr as tl_lslr
    except ImportError:
        return n
    return 1 if hasattr(tl_lslr, "_starts") else n


def _make_backend(rec: _Recorder):
    """A Backend whose functions compute with the torch backend (hidden) and record the simulated kernels."""
    from mamlpp_fast.ops import lslr as torch_lslr
    from mamlpp_fast.ops import per_step_bn as torch_bn
    from mamlpp_fast.ops.backend import Backend
    import types

    sim = rec.sim_backend
    try:
        from mamlpp_fast.triton.lslr import task_major_dense as _task_major_dense
    except ImportError:  # a tree whose compiled backends make every LSLR operand contiguous (not modelled)
        def _task_major_dense(t):
            return False

    def nb(*ts):
        return sum(_nbytes(t) for t in ts if t is not None)

    def bn_forward(x, gamma, beta, num_tasks, eps, slope):
        with rec.hide():
            y, mean, invstd = torch_bn.bn_forward(x, gamma, beta, num_tasks, eps, slope)
        layer = rec.layer_of([x])
        call = ("bn_forward", tuple(x.shape), tuple(gamma.shape), num_tasks)
        rec.add(name=f"{sim} bn_fwd_reduce", kind="bn", layer=layer, bytes=nb(x), call=call)
        rec.add(name=f"{sim} bn_fwd_apply", kind="bn", layer=layer, bytes=nb(x, y, gamma, beta, mean, invstd))
        return y, mean, invstd

    def bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope):
        with rec.hide():
            dx, dgamma, dbeta = torch_bn.bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope)
        layer = rec.layer_of([x])
        call = ("bn_backward", tuple(x.shape), tuple(gamma.shape), num_tasks)
        rec.add(name=f"{sim} bn_bwd_reduce", kind="bn", layer=layer, bytes=nb(dy, x), call=call)
        rec.add(name=f"{sim} bn_bwd_apply", kind="bn", layer=layer, bytes=nb(dy, x, dx, dgamma, dbeta))
        return dx, dgamma, dbeta

    def bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope):
        with rec.hide():
            gx, ggamma, gdy = torch_bn.bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean,
                                                          invstd, num_tasks, slope)
        layer = rec.layer_of([x])
        call = ("bn_double_backward", tuple(x.shape), tuple(gamma.shape), num_tasks,
                ggx is not None, gggamma is not None, ggbeta is not None)
        rec.add(name=f"{sim} bn_dbwd_reduce", kind="bn", layer=layer, bytes=nb(ggx, dy, x), call=call)
        rec.add(name=f"{sim} bn_dbwd_apply", kind="bn", layer=layer, bytes=nb(ggx, dy, x, gx, gdy, ggamma))
        return gx, ggamma, gdy

    def lslr_forward(thetas, grads, alphas, step):
        with rec.hide():
            outs = torch_lslr.lslr_forward(thetas, grads, alphas, step)
        n = len(grads)
        # the compiled backends bring a theta whose layout differs from its gradient's into that layout
        # first (a copy: mamlpp_fast.ops.torch_backend, Layouts); the torch backend computed without one
        for t, g in zip(thetas, grads):
            ref = g[0] if t.dim() < g.dim() else g
            if g.shape[0] > 0 and _task_major_dense(g) and t.stride() != ref.stride():
                rec.add(name=f"{sim} lslr theta re-layout (aten.copy_)", kind="lslr", layer="params",
                        bytes=2 * _nbytes(t))
        total = sum(nb(t, g, o) for t, g, o in zip(thetas, grads, outs))
        call = ("lslr_forward", tuple(tuple(t.shape) for t in thetas), tuple(tuple(g.shape) for g in grads))
        launches = math.ceil(n / 24) if sim == "cuda" else _triton_lslr_launches(n)
        rec.add(name=f"{sim} lslr_fwd", kind="lslr", layer="params", launches=launches, bytes=total, call=call)
        return outs

    def lslr_backward(douts, grads, alphas, step, shared):
        with rec.hide():
            dthetas, dgrads, dalphas = torch_lslr.lslr_backward(douts, grads, alphas, step, shared)
        n = len(grads)
        total = sum(nb(d, g, dg) + (nb(dt) if s else 0)
                    for d, g, dg, dt, s in zip(douts, grads, dgrads, dthetas, shared))
        call = ("lslr_backward", tuple(tuple(g.shape) for g in grads), tuple(shared))
        if sim == "cuda":
            groups = math.ceil(n / 24)
            rec.add(name="cuda lslr_bwd", kind="lslr", layer="params", launches=groups, bytes=total, call=call)
            rec.add(name="cuda lslr_dalpha", kind="lslr", layer="params", launches=groups, bytes=0)
        else:
            rec.add(name="triton lslr workspace zero fill", kind="lslr", layer="params", launches=1, bytes=0)
            rec.add(name="triton lslr_bwd", kind="lslr", layer="params", launches=_triton_lslr_launches(n),
                    bytes=total, call=call)
            rec.add(name="triton lslr_dalpha", kind="lslr", layer="params", launches=1, bytes=0)
        return dthetas, dgrads, dalphas

    impl = types.SimpleNamespace(bn_forward=bn_forward, bn_backward=bn_backward,
                                 bn_double_backward=bn_double_backward, lslr_forward=lslr_forward,
                                 lslr_backward=lslr_backward)
    return Backend(f"trace-{sim}", impl, None, accepts_needs=False)


def _conv_triton_patch(rec: _Recorder):
    """Replacements of mamlpp_fast.triton.conv's three launchers: torch computes (hidden), the record is
    the launches each launcher makes on a GPU with rec.sms SMs, from the kernels' own launch
    configuration (`conv_block_config` / `wgrad_block_config`):

    - forward / data gradient: the weight re-layout copy (w to (B, kh, kw, Ci, Co) / (B, kh, kw, Co, Ci):
      reads and writes w; only the first call with a given weight tensor and layout, as the launcher
      keeps the copy on the tensor: `relaid_weights`), the main kernel (reads x or g, the re-laid weights
      and the bias, writes the output, or with SPLIT > 1 its SPLIT partials);
    - weight gradient: the main kernel (reads x, g and the lane table of 3 int32 per reduction lane,
      writes the output, in the forward's weight layout, or SPLIT partials; with the conv bias's gradient, its programs read g once more
      and write the (B, Co) sums, or, where the launcher keeps it apart, a separate reduction). The lane
      table itself is built once per shape and cached, so a steady-state meta-update launches nothing
      for it (not recorded);
    - SPLIT > 1, the partials' sum: inside the main kernel where the launcher says so
      (`split_sum_in_kernel`: the last chunk's program of each tile reads the SPLIT partials, its own
      included except in the weight gradients of `wgrad_keeps_own`, and writes the output; one atomic on
      a 4-byte counter per program, not counted), else
      a separate in-order sum kernel (reads SPLIT partials, writes one output).

    The main kernels carry all the FLOPs (2 x the MACs: bench/flops.py's count); the copies and sums none.
    A tree from before the kernel rework (conv_block_config(co, k, red, device)) is not modelled."""
    import torch
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_input, conv2d_weight

    from mamlpp_fast.triton.conv import conv_block_config, wgrad_block_config
    try:
        from mamlpp_fast.triton._device import conv_precision as forced
    except ImportError:  # a tree without the precision-dependent weight-gradient tiles
        forced = None
    try:  # trees that summed the bias apart in some configurations (until 2026-12-05)
        from mamlpp_fast.triton.conv import bias_in_wgrad as bias_in
    except ImportError:  # the bias's programs in every weight-gradient launch (None: no separate sum)
        bias_in = None

    def macs(meta, n):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        return n * ho * wo * co * ci * kh * kw * b

    try:
        from mamlpp_fast.triton.conv import relaid_weights
    except ImportError:  # a tree from before the re-laid weights were kept on the tensor: a copy per call
        relaid_weights = None
    try:
        from mamlpp_fast.triton.conv import split_sum_in_kernel, wgrad_sums_split
    except ImportError:  # a tree from before the in-kernel sum: always a separate sum
        def split_sum_in_kernel():
            return False

        def wgrad_sums_split(cfg, with_bias):
            return False
    try:
        from mamlpp_fast.triton.conv import split_chain_in_kernel
    except ImportError:  # a tree that sums every split in the kernel
        def split_chain_in_kernel(split, cfg, kind="wgrad"):
            return True
    try:
        from mamlpp_fast.triton.conv import wgrad_keeps_own
    except ImportError:  # a tree whose last program always reads its own partial back
        def wgrad_keeps_own(cfg):
            return False
    try:
        from mamlpp_fast.triton.conv import forward_layout
    except ImportError:  # a tree whose weight gradient is stored in the weight's own layout
        def forward_layout(w):
            return w
    try:
        from mamlpp_fast.triton.conv import tensor_core_products
    except ImportError:  # a tree whose tiles do not depend on the products' precision
        tensor_core_products = None
    try:
        from mamlpp_fast.triton.conv import tensor_core_mode
    except ImportError:  # a tree whose tensor-core tiles are the same for TF32 and tf32x3
        tensor_core_mode = tensor_core_products

    def tc(dtype) -> dict:
        """The launchers' tensor_cores argument for `dtype` operands (TF32 / tf32x3 tiles,
        `tensor_core_mode`): the traced iteration runs inside the learner's numerics (config keys
        allow_tf32, conv_precision), as the launchers do."""
        if tensor_core_mode is None:
            return {}
        return {"tensor_cores": tensor_core_mode(dtype)}

    def gemm(kind, name, call, layer, flops, w, operands, out, split, cfg, sums_split=True, kept=0, layout=None):
        """The re-layout copy (forward / data gradient only, when the launcher makes one: `relaid_weights`
        keeps a tensor's copy for its later calls; `layout`: the one the kernel reads, default its own),
        the main kernel, the partial sum."""
        for wt in (w if isinstance(w, (list, tuple)) else [w]):
            if wt is None:
                continue
            with rec.hide():
                copied = True if relaid_weights is None else relaid_weights(wt, layout or kind.replace("conv_", ""))[1]
            if copied:
                rec.add(name=f"triton {kind} weight re-layout (aten.copy_)", kind="conv", layer=layer,
                        bytes=2 * _nbytes(wt))
        in_kernel = (split > 1 and sums_split and split_sum_in_kernel()
                     and split_chain_in_kernel(split, cfg, kind.replace("conv_", "")))
        # in-kernel: + split partials read (less `kept` bytes the last programs add from registers), 1 written
        written = (2 * split + 1) * _nbytes(out) - kept if in_kernel else split * _nbytes(out)
        # the chain: the last program's (SPLIT - 1) x NSUB partial loads, one after another (its reduction
        # steps do the launch's FLOPs, which the prediction prices)
        chain = (split - 1) * cfg.get("NSUB", 1) if in_kernel else 0
        rec.add(name=name, kind="conv", layer=layer, flops=flops, tf32_ok=True, call=call,
                bytes=operands + written, chain=chain)
        if split > 1 and not in_kernel:
            rec.add(name="split partial sum (aten.sum)", kind="conv", layer=layer,
                    bytes=(split + 1) * _nbytes(out))

    def fwd(x, w, bias, meta, x2=None, w2=None):
        """F(x, w) + bias, or with x2, w2 the launcher's dual launch F(x, w) + F(x2, w2) + bias (one
        kernel over both pairs' taps; where the configuration is SMALL, two launches and an add)."""
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        n = x.shape[0]
        dual = x2 is not None
        cfg = conv_block_config("fwd", n * ho * wo, co, ci, (2 if dual else 1) * kh * kw, b, rec.sms, **tc(x.dtype))
        if dual and cfg.get("SMALL"):
            out = fwd(x, w, bias, meta) + fwd(x2, w2, None, meta)  # the add is recorded by the mode
            return out
        with rec.hide():
            out = F.conv2d(x, w.reshape(-1, ci, kh, kw), None if bias is None else bias.reshape(-1), s, p, groups=b)
            if dual:
                out = out + F.conv2d(x2, w2.reshape(-1, ci, kh, kw), None, s, p, groups=b)
        call = ("conv_forward", tuple(x.shape), meta, bias is not None) + ((True,) if dual else ())
        gemm("conv_fwd", "triton conv_fwd" + (" (dual)" if dual else ""), call, rec.layer_of([x, out]),
             (2 if dual else 1) * 2 * macs(meta, n), [w, w2] if dual else w,
             sum(_nbytes(t) for t in (x, w, x2, w2, bias) if t is not None), out, cfg["SPLIT"], cfg)
        return out

    def dgrad(g, w, meta):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        n = g.shape[0]
        with rec.hide():
            dx = conv2d_input((n, b * ci, h, wd), w.reshape(-1, ci, kh, kw), g, s, p, groups=b)
        cfg = conv_block_config("dgrad", n * h * wd, ci, co, kh * kw, b, rec.sms, **tc(g.dtype))
        gemm("conv_dgrad", "triton conv_dgrad", ("conv_data_grad", tuple(g.shape), meta),
             rec.layer_of([g, dx]), 2 * macs(meta, n), w, _nbytes(g) + _nbytes(w), dx, cfg["SPLIT"], cfg,
             layout="fwd" if cfg.get("W_FWD") else "dgrad")
        return dx

    def wgrad(x, g, meta, with_bias=False):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        n = x.shape[0]
        with rec.hide():
            # in the layout the launcher stores it in (so that the fast weights made from it, and the
            # re-layout copies they need, are the device's)
            dw = forward_layout(conv2d_weight(x, (b * co, ci, kh, kw), g, s, p, groups=b).view(b, co, ci, kh, kw))
            db = g.reshape(n, b, co, -1).sum((0, 3)) if with_bias else None
            # with the bias: one more (B, Co) result, from the bias programs' own pass over g
            out = dw if db is None else torch.cat([dw.reshape(-1), db.reshape(-1)])
        red = n * ho * wo
        # the launcher's configuration as the trainer runs it by default (config key allow_tf32 False):
        # strict fp32 for float32 unless config key conv_precision forces TF32 (this CPU process's
        # torch.backends.cudnn.allow_tf32 is not the trainer's)
        strict = {} if forced is None else {"strict_fp32": x.dtype == torch.float32 and forced() in (None, "ieee")}
        cfg = wgrad_block_config(co, ci, kh * kw, red, b, rec.sms, **strict, **tc(x.dtype))
        lane_bytes = 3 * red * 4  # the cached lane table, read by every program column
        bias_read = _nbytes(g) if db is not None else 0
        if db is not None and bias_in is not None and not bias_in(cfg):  # an older tree's separate sum
            rec.add(name="bias grad reduction", kind="reduction", layer=rec.layer_of([g]), bytes=_nbytes(g))
            out, bias_read = dw, 0
        gemm("conv_wgrad", "triton conv_wgrad", ("conv_weight_grad", tuple(x.shape), meta, with_bias),
             rec.layer_of([x, g]), 2 * macs(meta, n), None, _nbytes(x) + _nbytes(g) + lane_bytes + bias_read,
             out, cfg["SPLIT"], cfg, wgrad_sums_split(cfg, db is not None and bias_read > 0),
             _nbytes(dw) if wgrad_keeps_own(cfg) else 0)
        return dw if db is None else (dw, db)

    return fwd, dgrad, wgrad


def block_call(x, w, meta) -> tuple:
    """The trace's call of the fused first block (op, image shape, weight shape, meta): what
    bench.static_metrics replays (forward, backward, double backward) and the key, with the pass, of its
    kernels' FFMA shares (`ffma_efficiencies`)."""
    return ("conv_bn_pool", tuple(x.shape), tuple(w.shape), meta)


# the fused first block's passes: the Triton kernel each launches (mamlpp_fast/triton/conv_block.py)
# that compute products (the small per-channel kernels, `_fwd_stats_kernel` and the finishing ones, are
# priced by their bytes)
_BLOCK_KERNELS = {"triton block_fwd": "_fwd_kernel", "triton block_gram": "_gram_kernel",
                  "triton block_bwd": "_bwd_kernel", "triton block_dbwd_dgout": "_dbwd_dgout_kernel"}


def _block_patch(rec: _Recorder):
    """An implementation of the fused first block (mamlpp_fast.ops.conv_block) that computes with the
    PyTorch one (hidden) and records the Triton kernels (mamlpp_fast/triton/conv_block.py) with their
    launch configuration for rec.sms SMs. Bytes: each pass reads the image and the pooled-size tensors
    it needs (gout; the pooled output or d(gout) written; the int8 position of each window's maximum,
    written by the forward's reduction and read by every backward pass; zsel, the convolution output at
    that maximum, written by the forward's reduction and read by its apply pass and the backward) and
    the per-program partial weight gradients (TC x CHUNKS x KP); FLOPs: the products the kernels
    execute, padding included:
    2 x n*Ho*Wo*T*C'*KP (KP = the patch width, the next power of two >= 16 of K + 1; C' = the channels as
    the kernels' channel blocks execute them, masked lanes included) per evaluation of the convolution
    output (z, or u = P' U' in the double backward) and per weight-gradient contraction: forward 1 (z;
    its statistics kernel none); backward 1 (Q_D, no z); double backward 2 (the backward's pass for
    gout, then u for d(gout)).
    The image's Gram terms (`image_stats`: once per image set where the caller keeps them, as the
    learner does): 2 x n*Ho*Wo*T*KP^2, their (T, CHUNKS, KP^2 + KP) partials written and summed by one
    reduction, which the backward's finishing kernel reads."""
    import types

    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton.conv_block import block_config

    def geometry(x, w_shape, meta):
        """(MACs of one patch-product evaluation, bytes of the weight-gradient partials, layer, MACs of
        the Gram terms, bytes of their partials, the Gram kernel's chunks per task)"""
        n = x.shape[0]
        t, c, ci, kh, kw = w_shape
        stride, pad = meta[1], meta[2]
        ho = (x.shape[2] + 2 * pad - kh) // stride + 1
        wo = (x.shape[3] + 2 * pad - kw) // stride + 1
        kp = max(16, 1 << (ci * kh * kw).bit_length())  # the patch width: next power of two of K + 1
        cfg = block_config(n * (ho // 2) * (wo // 2), t, c, kp, x.device, sms=rec.sms)
        lanes = cfg["CB"] * cfg["BLOCK_C"]  # channels as executed: 48 run as 64 (masked lanes)
        macs = n * ho * wo * t * lanes * kp  # one evaluation of the (padded) patch products
        gchunks = cfg.get("GRAM_CHUNKS", cfg["CHUNKS"])
        gram = t * gchunks * (kp * kp + kp) * x.element_size()  # the Gram kernel's partials
        return (macs, t * c * cfg["CHUNKS"] * kp * x.element_size(), rec.layer_of([x]), n * ho * wo * t * kp * kp,
                gram, gchunks)

    def small(*ts):
        return sum(_nbytes(t) for t in ts if t is not None)

    def forward(x, w, bias, gamma, beta, meta, stats=None):
        with rec.hide():
            out, mean, invstd, aux = torch_impl.forward(x, w, bias, gamma, beta, meta)
        macs, _, layer, _, gram, chunks = geometry(x, w.shape, meta)
        if stats is None:  # formed per call (no image cache): the Triton forward forms them itself
            image_stats(x, tuple(w.shape), meta)
        call = block_call(x, w, meta)
        # the image's Gram terms and w read, the statistics written
        rec.add(name="triton block_fwd_stats", kind="conv", layer=layer,
                bytes=gram // chunks + small(w, bias, mean, invstd))
        # out, zsel (out's size) and sel (int8) written
        rec.add(name="triton block_fwd", kind="conv", layer=layer, flops=2 * macs, tf32_ok=True,
                bytes=small(x, w, bias, gamma, beta, mean, invstd) + 2 * _nbytes(out) + out.numel(), call=call)
        return out, mean, invstd, aux

    def image_stats(x, w_shape, meta):
        _, _, layer, gram_macs, gram, chunks = geometry(x, w_shape, meta)
        call = ("conv_bn_pool", tuple(x.shape), tuple(w_shape), meta)  # block_call's
        rec.add(name="triton block_gram", kind="conv", layer=layer, flops=2 * gram_macs, bytes=_nbytes(x) + gram,
                call=call)
        rec.add(name="split partial sum (aten.sum)", kind="conv", layer=layer, bytes=gram + gram // chunks)
        return ()  # the PyTorch implementation's backward reads none

    def backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=None, stats=None):
        with rec.hide():
            res = torch_impl.backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=gout2)
        macs, partial, layer, _, gram, chunks = geometry(x, w.shape, meta)
        if stats is None:  # formed per call (no image cache): the Triton backward forms them itself
            image_stats(x, tuple(w.shape), meta)
        call, consts = block_call(x, w, meta), dict(HAS_G2=gout2 is not None)
        # gout (and gout2), sel (int8) and zsel (gout's size) read; the partial sums and Q_D written
        rec.add(name="triton block_bwd", kind="conv", layer=layer, flops=2 * macs, tf32_ok=True,
                bytes=small(x, gamma, beta, mean, invstd, gout2) + 2 * _nbytes(gout) + gout.numel() + partial
                + small(res[2], res[3]), call=call, consts=consts)
        # the partials, the image's Gram terms (one chunk's worth: summed) and w read, dw written
        rec.add(name="triton block_finish", kind="conv", layer=layer,
                bytes=partial + gram // chunks + small(w, bias, res[0], res[1]))
        return res

    def double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta,
                        stats=None):
        with rec.hide():
            res = torch_impl.double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean,
                                             invstd, aux, meta)
        macs, partial, layer, _, gram, chunks = geometry(x, w.shape, meta)
        if stats is None:
            image_stats(x, tuple(w.shape), meta)
        call = block_call(x, w, meta)
        # the backward's pass for gout: gout, sel (int8), zsel read; the partial sums and Q_D written
        rec.add(name="triton block_bwd", kind="conv", layer=layer, flops=2 * macs, tf32_ok=True,
                bytes=small(x, gamma, beta, mean, invstd) + 2 * _nbytes(gout) + gout.numel() + partial,
                call=call, consts=dict(HAS_G2=False))
        # the partials, the Gram terms, w and U' read; d(w), d(gamma) and three coefficients per column written
        rec.add(name="triton block_finish", kind="conv", layer=layer,
                bytes=partial + gram // chunks + small(w, bias, uw, ubias, ugamma, ubeta, res[1], res[2], res[3])
                + 3 * _nbytes(mean))
        # sel (int8) and zsel (gout's size) read, d(gout) written
        rec.add(name="triton block_dbwd_dgout", kind="conv", layer=layer, flops=2 * macs, tf32_ok=True,
                bytes=small(x, uw, ubias, gamma, beta, mean, invstd, res[0]) + gout.numel() + _nbytes(gout),
                call=call)
        return res

    return types.SimpleNamespace(name="trace-triton", forward=forward, backward=backward,
                                 double_backward=double_backward, image_stats=image_stats)


def _bn_pool_patch(rec: _Recorder):
    """An implementation of bn_pool (mamlpp_fast.ops.bn_pool: batch norm, leaky ReLU and max pooling of
    layers 1-3) that computes with the PyTorch one (hidden) and records the Triton kernels
    (mamlpp_fast/triton/bn_pool.py) with their launch configuration for rec.sms SMs: two per pass, or
    one where a column is one chunk (plus a small one for a shared gamma's backward sums). Bytes: each kernel reads x (the backward's reduction
    reads it at the windows' maxima only, but those touch ~94% of x's 32-byte sectors: counted whole),
    the pooled-size tensors it needs (gout; out or d(gout) written; the int8 positions of the maxima,
    written by the forward and read by every backward pass), the upstream gradient u of the double
    backward and writes dx / gx."""
    import types

    from mamlpp_fast.ops.bn_pool import torch_impl
    from mamlpp_fast.triton.bn_pool import pool_config

    def small(*ts):
        return sum(_nbytes(t) for t in ts if t is not None)

    def single(x):
        """One kernel per pass where a column is one chunk on rec.sms SMs (triton/bn_pool.py `_single`)."""
        return pool_config(*x.shape, x.device, sms=rec.sms)["CHUNKS"] == 1

    def passes(op, x, gamma, layer, read, written, call=None, reduce_read=None):
        """The pass's kernels: a reduction and an apply, or (single chunk) the apply alone, which then
        reads x from the cache the second time (counted once) and, in the backward passes with a gamma
        shared by the tasks, adds the per-task sums in each channel's last program."""
        if single(x):
            # a shared gamma's sums over the tasks: stored and re-read by the channel's last program
            extra = small(gamma) * 4 if op != "fwd" and gamma.dim() == 1 else 0
            rec.add(name=f"triton bn_pool_{op}_single", kind="bn", layer=layer, bytes=read + written + extra,
                    call=call)
        else:
            rec.add(name=f"triton bn_pool_{op}_reduce", kind="bn", layer=layer,
                    bytes=read if reduce_read is None else reduce_read, call=call)
            rec.add(name=f"triton bn_pool_{op}_apply", kind="bn", layer=layer, bytes=read + written)

    def forward(x, gamma, beta, meta):
        with rec.hide():
            out, mean, invstd, aux = torch_impl.forward(x, gamma, beta, meta)
        call = ("bn_pool", tuple(x.shape), tuple(gamma.shape), meta)
        passes("fwd", x, gamma, rec.layer_of([x]), small(x, gamma, beta),
               small(out, mean, invstd) + out.numel(), call=call, reduce_read=small(x))  # + sel (int8)
        return out, mean, invstd, aux

    def backward(gout, x, gamma, beta, mean, invstd, aux, meta, gout2=None, dx2=None):
        with rec.hide():
            dx, dgamma, dbeta = torch_impl.backward(gout, x, gamma, beta, mean, invstd, aux, meta, gout2=gout2,
                                                    dx2=dx2)
        # + sel; gout2: the output alias's gradient, loaded beside gout; dx2: the input alias's, added to dx
        # by the apply kernel (the single pass reads it once; counted once either way)
        read = small(gout, gout2, x, gamma, beta, mean, invstd, dx2) + gout.numel()
        passes("bwd", x, gamma, rec.layer_of([x]), read, small(dx, dgamma, dbeta))
        return dx, dgamma, dbeta

    def double_backward(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd, aux, meta):
        with rec.hide():
            dgout, gx, ggamma = torch_impl.double_backward(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd,
                                                           aux, meta)
        read = small(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd) + gout.numel()  # + sel
        passes("dbwd", x, gamma, rec.layer_of([x]), read, small(dgout, gx, ggamma))
        return dgout, gx, ggamma

    return types.SimpleNamespace(name="trace-triton", forward=forward, backward=backward,
                                 double_backward=double_backward)


def _running_stats_patch(rec: _Recorder):
    """A stand-in for fast.py's `running_stats_launcher` that, for every statistic, returns a launcher of
    the one-launch Triton update (mamlpp_fast/triton/running_stats.py) which computes it with PyTorch
    (hidden) and records one kernel: G x ceil(C / BLOCK_C) programs reading every forward's mean and
    inverse std and the rows' old values, and writing the rows."""
    from mamlpp_fast.triton.running_stats import running_stats_block_config

    def launch(means, invstds, rmeans, rvars, weights, decays, rows):
        import torch
        with rec.hide(), torch.no_grad():
            c = rmeans[0].numel()
            b = means[0].numel() // c
            eps = decays[-1]
            new_m = [decays[g] * rmeans[g] for g in range(len(rmeans))]
            new_v = [decays[g] * rvars[g] for g in range(len(rvars))]
            for e, g in enumerate(rows):
                mu, inv = means[e].view(b, c), invstds[e].view(b, c)
                new_m[g] = new_m[g] + (weights[0, e][:, None] * mu).sum(0)
                new_v[g] = new_v[g] + (weights[1, e][:, None] * (inv.pow(-2) - eps)).sum(0)
            for dst, val in zip(rmeans + rvars, new_m + new_v):
                dst.copy_(val)
        block = running_stats_block_config(c)["BLOCK_C"]
        rec.add(name="triton running_stats", kind="running_stats", layer="params",
                programs=len(rmeans) * -(-c // block), call=("running_stats", (len(means), len(rmeans), b, c)),
                bytes=sum(_nbytes(t) for t in means + invstds) + 3 * sum(_nbytes(t) for t in rmeans + rvars))

    return lambda stats, op_backend: launch


def _fanout_sum_patch(rec: _Recorder):
    """A stand-in for ops.fanout's `fanout_kernels`: the one-launch Triton sums (mamlpp_fast/triton/fanout.py)
    computing with PyTorch (hidden, in the kernels' order) and recording one kernel each. `sum_uses`
    reads every gradient and writes every sum once; `sum_tasks` reads every task's gradient and writes
    each tensor's sum."""
    import types

    import torch

    from mamlpp_fast.triton import fanout as tfan

    def sum_uses(groups, outs=None):
        with rec.hide():
            sums = []
            for j, g in enumerate(groups):
                acc = g[0].clone() if g else torch.zeros_like(outs[j])
                for t in g[1:]:
                    acc.add_(t)
                sums.append(acc)
            if outs is None:
                outs = sums
            else:
                for o, v in zip(outs, sums):
                    o.copy_(v)
        block = tfan.sum_uses_block_config(max(o.numel() for o in outs))["BLOCK"]
        rec.add(name="triton fanout_sum", kind="foreach", layer=rec.layer_of([t for g in groups for t in g]),
                call=("fanout_sum", tuple((o.numel(), len(g)) for g, o in zip(groups, outs))),
                programs=sum(-(-o.numel() // block) for o in outs),
                bytes=sum(_nbytes(t) for g in groups for t in g) + sum(_nbytes(o) for o in outs))
        return outs

    def sum_tasks(grads):
        with rec.hide():
            outs = [g.sum(0).contiguous() for g in grads]
        block = tfan.sum_uses_block_config(min(max(o.numel() for o in outs), 1024))["BLOCK"]
        rec.add(name="triton expand_sum", kind="reduction", layer=rec.layer_of(grads),
                call=("expand_sum", tuple((tuple(g.shape), tuple(g.stride())) for g in grads)),
                programs=sum(-(-o.numel() // block) for o in outs),
                bytes=sum(_nbytes(g) for g in grads) + sum(_nbytes(o) for o in outs))
        return outs

    kernels = types.SimpleNamespace(sum_uses=sum_uses, sum_tasks=sum_tasks, summable=tfan.summable,
                                    summable_over_tasks=tfan.summable_over_tasks)
    return lambda t: kernels


def _accuracy_patch(rec: _Recorder):
    """A stand-in for fast.py's `accuracy_launcher` returning a launcher of the one-launch Triton accuracy
    (mamlpp_fast/triton/metrics.py) that computes it with PyTorch (hidden) and records one kernel of one
    program reading the logits and labels."""
    def launch(logits, labels):
        import torch
        with rec.hide():
            c = logits.shape[-1]
            acc = logits.reshape(-1, c).argmax(-1).eq(labels.reshape(-1)).to(torch.float32).mean()
        rec.add(name="triton accuracy", kind="elementwise", layer="head+grads", programs=1,
                call=("accuracy", (logits.numel() // c, c)), bytes=_nbytes(logits) + _nbytes(labels) + 4)
        return acc

    return lambda logits, op_backend: launch


def _head_patch(rec: _Recorder):
    """An implementation of head_loss (mamlpp_fast.ops.head: the linear head and its cross-entropy) that
    computes with the PyTorch one (hidden) and records the Triton kernels (mamlpp_fast/triton/head.py):
    one per pass, with T x S programs (forward and backward, split over the features for rec.sms SMs) or
    T (double backward), which `_share` prices. Bytes: the tensors each kernel reads and writes (x, W,
    b, the int64 labels, logits, lse; the forward's slice partials where S > 1); FLOPs: the products of
    the contractions (2 n C F per task each: forward 1, backward 2, double backward 2 plus one per
    upstream gradient of x or W in each of its two phases). The double backward's d(upstream) is summed
    over the tasks by a small torch sum when asked (not on the learner's path)."""
    import types

    import torch

    from mamlpp_fast.ops.head import torch_impl
    from mamlpp_fast.triton.head import head_config

    def small(*ts):
        return _unique_bytes([t for t in ts if t is not None])

    def geometry(x, w):
        t, c, f = w.shape
        n = x.shape[0]
        cfg = head_config(n, c, f, t, rec.sms, dot=x.dtype == torch.float32)
        return t, n, c, f, cfg, rec.layer_of([x.view(n, -1, 1, 1)])

    def forward(x, w, b, labels, lw, prev, meta):
        with rec.hide():
            loss, logits, lse = torch_impl.forward(x, w, b, labels, lw, prev, meta)
        t, n, c, f, cfg, layer = geometry(x, w)
        ws = 2 * t * cfg["S"] * cfg["BN"] * cfg["BC"] * x.element_size() if cfg["S"] > 1 else 0
        steps = -(-cfg["FCH"] // cfg["BF"])
        rec.add(name="triton head_fwd", kind="head", layer=layer, flops=2 * t * n * c * f, programs=t * cfg["S"],
                bytes=small(x, w, b, labels, lw, prev, logits, lse, loss) + ws, call=("head", (n, c, f, t)),
                chain=steps + cfg["S"] - 1 + t - 1)  # + the slice partials, + the tasks' loss terms
        return loss, logits, lse

    def backward(g, x, w, logits, lse, labels, lw, meta):
        with rec.hide():
            res = torch_impl.backward(g, x, w, logits, lse, labels, lw, meta)
        t, n, c, f, cfg, layer = geometry(x, w)
        rec.add(name="triton head_bwd", kind="head", layer=layer, flops=4 * t * n * c * f, programs=t * cfg["S"],
                bytes=small(g, x, w, logits, lse, labels, lw, *res), chain=-(-cfg["FCH"] // cfg["BF"]))
        return res

    def double_backward(vx, vw, vb, g, x, w, logits, lse, labels, lw, meta, need_g=True):
        with rec.hide():
            res = torch_impl.double_backward(vx, vw, vb, g, x, w, logits, lse, labels, lw, meta, need_g=need_g)
        if res[1] is None:
            return res
        t, n, c, f, cfg, layer = geometry(x, w)
        products = 2 + 2 * (vx is not None) + 2 * (vw is not None)
        rec.add(name="triton head_dbwd", kind="head", layer=layer, flops=2 * products * t * n * c * f, programs=t,
                bytes=small(vx, vw, vb, g, x, w, logits, lse, labels, lw, *res[1:]) + t * x.element_size(),
                chain=2 * -(-f // cfg["BF"]))  # H over all the features, then the outputs
        if need_g:
            rec.add(name="aten.sum", kind="reduction", layer=layer, bytes=t * x.element_size())
        return res

    return types.SimpleNamespace(name="trace-triton", forward=forward, backward=backward,
                                 double_backward=double_backward)


# ---- the trace -----------------------------------------------------------------------------------------------
def _layer_sizes(w) -> dict:
    sizes, h = {}, w.height
    for i in range(w.num_stages):
        sizes[h] = f"conv{i}"
        h = h // 2
    return sizes


def trace_meta_update(workload: str = "omniglot_20w1s", batch_size: int | None = None, backend: str = "cuda",
                      conv_impl: str = "triton", cuda_graph: bool = True, sms: int = 132,
                      quick: bool = False, seed: int = 0, first_block: str = "auto",
                      bn_pool: str = "auto", epoch: int = 0, head: str = "auto",
                      conv_precision: str = "auto", conv_streams: bool = False) -> TraceResult:
    """Run one meta-update of the fast learner on the CPU and return the simulated GPU kernels.
    first_block: "fused" (the first layer as mamlpp_fast.ops.conv_block's op on its Triton kernels),
    "unfused", or "auto": fused with the cuda and triton backends, unfused with torch (trees without
    the block: unfused): the design being priced, which the learner's own "auto" takes on a CUDA device
    only while mamlpp_fast.fast.AUTO_FUSES_ON_CUDA[op] holds (off since the fused kernels failed their
    first device tests, 2026-12-04).
    bn_pool: the same for the batch norm + pooling of the later layers (mamlpp_fast.ops.bn_pool);
    head: the same for the linear head and its loss (mamlpp_fast.ops.head).
    epoch: the meta-training epoch (0: MSL on, a target loss after every inner step; from the workload's
    msl_epochs on, MSL is off and the target set is passed after the last step only).
    conv_precision: the learner's config key conv_precision (auto, ieee, tf32, tf32x3): the input
    precision of the Triton convolutions' products, which selects their launch configurations
    (tensor-core tiles for tf32 and tf32x3).
    conv_streams: the learner's config key conv_streams: the launches a device would run side by side on two
    streams are marked (`Kernel.group`, `Kernel.branch`; `side_by_side_counts`)."""
    import torch

    from mamlpp_fast import fast as fast_mod
    from mamlpp_fast.ops import lslr as lslr_mod
    from mamlpp_fast.ops import per_step_bn as bn_mod

    from .workloads import im_shape, make_args, make_batch, workload_by_name
    try:
        from mamlpp_fast.errors import MamlppError
    except ImportError:  # a tree older than mamlpp_fast.errors (replaying a measured revision)
        MamlppError = ValueError
    try:
        from mamlpp_fast.ops import conv as conv_mod
        from mamlpp_fast.triton import conv as tconv
        impls = conv_mod.CONV_IMPLS
    except ImportError as e:  # a tree older than task_conv2d: grouped F.conv2d only
        conv_mod = tconv = None
        impls = ("grouped",)
        import_error = f" (the convolution modules do not import: {type(e).__name__}: {e})"
    else:
        import_error = ""
    try:  # where the Triton convolution's autograd Functions live (triton/conv.py in older trees)
        from mamlpp_fast.ops import conv_triton_autograd as tconv_autograd
    except ImportError:
        tconv_autograd = tconv

    if backend not in ("cuda", "triton", "torch"):
        raise MamlppError(f"bench.trace: --backend must be cuda, triton or torch (a GPU backend), got {backend!r}")
    if conv_impl not in impls:
        raise MamlppError(f"bench.trace: --conv-impl must be one of {', '.join(impls)}, got {conv_impl!r}"
                          f"{import_error}")
    if epoch < 0:
        raise MamlppError(f"bench.trace: --epoch must be >= 0, got {epoch}")
    if batch_size is not None and batch_size < 1:
        raise MamlppError(f"bench.trace: --batch-size must be >= 1, got {batch_size}")
    def fused_choice(value, flag, attr, what):
        """auto -> fused unless the backend is torch or this tree lacks the op (`attr` of fast.py)."""
        if value not in ("auto", "fused", "unfused"):
            raise MamlppError(f"bench.trace: --{flag} must be auto, fused or unfused, got {value!r}")
        has = hasattr(fast_mod, attr)
        if value == "auto":
            value = "fused" if backend != "torch" and has else "unfused"
        if value == "fused" and not has:
            raise MamlppError(f"bench.trace: --{flag} fused: this tree has no {what}")
        return value, has

    first_block, has_block = fused_choice(first_block, "first-block", "block_torch_impl", "fused first block")
    bn_pool, has_pool = fused_choice(bn_pool, "bn-pool", "bn_pool_torch_impl", "bn_pool op")
    head, has_head = fused_choice(head, "head", "head_torch_impl", "head_loss op")
    try:
        w = workload_by_name(workload, quick=quick)
    except KeyError as e:
        raise MamlppError(f"bench.trace: {e.args[0]}") from None
    if batch_size is not None:
        w = w.with_(batch_size=int(batch_size))
    from mamlpp_fast.ops.backend import set_backend
    previous_backend = set_backend(None)  # restored below: the learner sets the process-wide backend
    set_backend(previous_backend)
    torch.manual_seed(seed)
    rec = _Recorder(_layer_sizes(w), backend, conv_impl, sms)
    # the simulated conv_impl runs through task_conv2d's own code; 'triton' with torch-computed launchers
    conv_arg = {} if conv_mod is None else {"conv_impl": "grouped" if conv_impl == "triton" else conv_impl}
    args = make_args(w, backend="torch", **conv_arg)
    if conv_precision != "auto":
        if not hasattr(args, "conv_precision"):
            raise MamlppError(f"bench.trace: this tree has no config key conv_precision ({conv_precision!r} asked)")
        args.conv_precision = conv_precision
    observer = None
    if conv_streams:
        try:
            from mamlpp_fast.triton import _device as device_mod
            observer = device_mod._OBSERVER
        except (ImportError, AttributeError):
            observer = None
        if observer is None or not hasattr(args, "conv_streams"):
            raise MamlppError("bench.trace: this tree has no config key conv_streams (--conv-streams asked)")
        args.conv_streams = True
    model = fast_mod.MAMLFewShotClassifier(im_shape(w), "cpu", args)
    # the object that owns the meta-optimizer and the finiteness check: the learner core (older trees: the
    # learner itself)
    core = getattr(model, "core", None)
    owner = core if core is not None else model
    core_cls = type(core) if core is not None else fast_mod.MAMLFewShotClassifier
    flag_name = "finite_flag" if core is not None else "_finite_flag"
    # Adam as the learner core builds it on a CUDA device (its `adam_options`; older trees: torch's default
    # there, the multi-tensor form), without `capturable`, which a CPU step refuses and which launches
    # nothing more
    try:
        from mamlpp_fast.learner_core import adam_options
        adam_kw = adam_options(torch.device("cuda"), capturable=False)
    except ImportError:
        adam_kw = {"foreach": True}
    owner.optimizer = torch.optim.Adam(model.trainable_parameters(), lr=args.meta_learning_rate, amsgrad=False,
                                       **adam_kw)
    batch = make_batch(w, "cpu", torch.float32, seed=seed)
    # Adam's state as in every meta-update after the first (not recorded): a step with zero gradients
    # creates it and changes no parameter.
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    model.optimizer.step()
    model.optimizer.zero_grad(set_to_none=True)

    saved = {}
    tbackend = _make_backend(rec) if backend != "torch" else None
    patches = [(bn_mod, "get_backend"), (lslr_mod, "get_backend"),
               (fast_mod.MAMLFewShotClassifier, "_update_running_stats"),
               (core_cls, flag_name)]
    # the running-statistics update as the learner runs it on a CUDA device (older trees: no kernel)
    rs_kernel = hasattr(fast_mod, "running_stats_launcher") and backend != "torch"
    if rs_kernel:
        patches.append((fast_mod, "running_stats_launcher"))
    acc_kernel = hasattr(fast_mod, "accuracy_launcher") and backend != "torch"
    if acc_kernel:
        patches.append((fast_mod, "accuracy_launcher"))
    # the fan-out nodes' sums as the learner runs them on a CUDA device (older trees: multi-tensor adds)
    import mamlpp_fast.ops.fanout as fanout_mod
    fan_kernel = hasattr(fanout_mod, "fanout_kernels") and backend != "torch"
    if fan_kernel:
        patches.append((fanout_mod, "fanout_kernels"))
    if first_block == "fused":
        patches.append((fast_mod, "block_torch_impl"))
    if bn_pool == "fused":
        patches.append((fast_mod, "bn_pool_torch_impl"))
    if head == "fused":
        patches.append((fast_mod, "head_torch_impl"))
    if conv_mod is not None:
        patches += [(tconv_autograd, "conv_forward"), (tconv_autograd, "conv_data_grad"),
                    (tconv_autograd, "conv_weight_grad"), (conv_mod._IMPLS, "triton")]
    for obj, name in patches:
        saved[(id(obj), name)] = obj[name] if isinstance(obj, dict) else getattr(obj, name)

    def setp(obj, name, val):
        if isinstance(obj, dict):
            obj[name] = val
        else:
            setattr(obj, name, val)

    # one-time host-built constants of the running-statistics update (cached per structure: not part of
    # a steady-state meta-update) are not recorded
    const_builders = [n for n in ("_running_stats_constants", "_running_stats_kernel_constants")
                      if hasattr(fast_mod.MAMLFewShotClassifier, n)]
    # the backward seeds are kept per shape (learner_core `ones`): built by the first update only
    seeds = hasattr(core_cls, "ones")
    if seeds:
        patches.append((core_cls, "ones"))
        saved[(id(core_cls), "ones")] = core_cls.__dict__["ones"]
    for name in const_builders:
        patches.append((fast_mod.MAMLFewShotClassifier, name))
        saved[(id(fast_mod.MAMLFewShotClassifier), name)] = fast_mod.MAMLFewShotClassifier.__dict__[name]
    orig_rs = fast_mod.MAMLFewShotClassifier._update_running_stats
    orig_ff = getattr(core_cls, flag_name)

    def running_stats(self, pending):
        with rec.in_scope("running_stats"):
            return orig_rs(self, pending)

    def finite_flag(self, loss):
        with rec.in_scope("finite_check"):
            return orig_ff(self, loss)

    try:
        if tbackend is not None:
            setp(bn_mod, "get_backend", lambda name=None, device=None: tbackend)
            setp(lslr_mod, "get_backend", lambda name=None, device=None: tbackend)
        if conv_mod is not None:
            f, d, wg = _conv_triton_patch(rec)
            setp(tconv_autograd, "conv_forward", f)
            setp(tconv_autograd, "conv_data_grad", d)
            setp(tconv_autograd, "conv_weight_grad", wg)
            unchecked = getattr(conv_mod, "triton_unchecked", None)
            if unchecked is None:  # a tree before it (and before the saved weight alias)
                def unchecked(x, wt, bias, b, stride, padding):
                    return tconv_autograd.task_conv2d_triton(x, wt, bias, b, stride, padding)
            setp(conv_mod._IMPLS, "triton", unchecked)
        if first_block == "fused":
            # on this CPU the learner's fused block takes the PyTorch implementation: the recording one
            setp(fast_mod, "block_torch_impl", _block_patch(rec))
            model.args.first_block = "fused"
        elif has_block:
            model.args.first_block = "unfused"
        if bn_pool == "fused":
            setp(fast_mod, "bn_pool_torch_impl", _bn_pool_patch(rec))
            model.args.bn_pool = "fused"
        elif has_pool:
            model.args.bn_pool = "unfused"
        if head == "fused":
            setp(fast_mod, "head_torch_impl", _head_patch(rec))
            model.args.head = "fused"
        elif has_head:
            model.args.head = "unfused"
        setp(fast_mod.MAMLFewShotClassifier, "_update_running_stats", running_stats)
        if rs_kernel:
            setp(fast_mod, "running_stats_launcher", _running_stats_patch(rec))
        if fan_kernel:
            setp(fanout_mod, "fanout_kernels", _fanout_sum_patch(rec))
        if acc_kernel:
            setp(fast_mod, "accuracy_launcher", _accuracy_patch(rec))
        setp(core_cls, flag_name, finite_flag)
        if seeds:
            def ones(self, like, _orig=core_cls.ones):
                with rec.hide():
                    return _orig(self, like)
            setp(core_cls, "ones", ones)
        for name in const_builders:
            def consts(*a, _orig=getattr(fast_mod.MAMLFewShotClassifier, name), **k):
                with rec.hide():
                    return _orig(*a, **k)
            setp(fast_mod.MAMLFewShotClassifier, name, staticmethod(consts))
        if conv_mod is not None:
            model.args.conv_impl = conv_impl
        if observer is not None:
            observer[0] = rec.side
        if hasattr(model, "current_epoch"):
            model.current_epoch = epoch  # what run_train_iter sets before the captured region
        # computed once per epoch, outside the captured region (fast.py `_importance`)
        imp = model._importance() if cuda_graph else None
        # the iteration's numerics as run_train_iter sets them around the captured region (config keys
        # allow_tf32, conv_precision: LearnerCore.precision; older trees: none)
        numerics = core.precision() if core is not None and hasattr(core, "precision") else contextlib.nullcontext()
        with _make_mode(rec), numerics:
            if cuda_graph:
                # the captured region of fast.py's _train_iter: _train_step_tensors on the static input
                # buffers (older trees: the batch itself), then the Adam step
                data = model._batch(batch)
                static = getattr(model, "_static_inputs", None)
                if static is not None:
                    with rec.hide():
                        data = static(data)
                model._train_step_tensors(data, epoch, imp)
                with rec.in_scope("adam"):
                    model.optimizer.step()
            else:
                orig_step = model.optimizer.step

                def step(*a, **k):
                    with rec.in_scope("adam"):
                        return orig_step(*a, **k)
                model.optimizer.step = step
                model.run_train_iter(batch, epoch)
    finally:
        for obj, name in patches:
            setp(obj, name, saved[(id(obj), name)])
        set_backend(previous_backend)
        if observer is not None:
            observer[0] = None
    from .flops import flops_from_args
    an = flops_from_args(make_args(w), epoch=epoch)
    cfg = dict(workload=w.name, batch_size=w.batch_size, backend=backend, conv_impl=conv_impl,
               first_block=first_block, bn_pool=bn_pool, head=head, epoch=epoch, cuda_graph=cuda_graph, sms=sms,
               conv_precision=conv_precision, conv_streams=conv_streams, analytic_flops_total=an["total"], analytic_flops_minimal=an["minimal"],
               workload_detail=w.to_dict())
    return TraceResult(cfg, rec.kernels)


# ---- prediction and summaries ----------------------------------------------------------------------------
def _rate(k: Kernel, ceil: dict, tf32: bool, conv_efficiency: float, tf32x3: bool = False,
          efficiencies: dict | None = None) -> float:
    """FLOP/s of kernel group k: the fp32 (or TF32) ceiling, times conv_efficiency for convolutions, or
    the call's own efficiency where `efficiencies` (`ffma_efficiencies`) holds it and was read for the
    mode priced here (its `mode`: "fp32", "tf32" or "tf32x3"; efficiencies of another mode are ignored).
    tf32x3 (config key conv_precision="tf32x3"): our convolution kernels run three TF32 products per
    product, a third of the TF32 rate (matmuls follow `tf32`)."""
    if tf32x3 and k.tf32_ok and k.kind == "conv":
        rate = ceil["tf32_tflops"] / 3 * 1e12
    else:
        rate = (ceil["tf32_tflops"] if (tf32 and k.tf32_ok) else ceil["fp32_tflops"]) * 1e12
    if k.kind != "conv":
        return rate
    key = efficiency_key(k)
    if _applies(efficiencies, tf32, tf32x3) and key in efficiencies:
        return rate * efficiencies[key]
    return rate * conv_efficiency


def _applies(efficiencies, tf32: bool, tf32x3: bool) -> bool:
    """Whether per-call `efficiencies` (`ffma_efficiencies`) price the mode asked for (their `mode`:
    "fp32", "tf32" or "tf32x3"; efficiencies of another mode are ignored)."""
    mode = "tf32x3" if tf32x3 else "tf32" if tf32 else "fp32"
    return bool(efficiencies) and getattr(efficiencies, "mode", "fp32") == mode


CONV_CALLS = ("conv_forward", "conv_data_grad", "conv_weight_grad")


def efficiency_key(k: Kernel):
    """The key of kernel group k in `ffma_efficiencies`: its call for a convolution (`CONV_CALLS`); for a
    pass of the fused first block, (call, pass name, the constexprs that select the pass's kernel), since
    its passes run different kernels; None for the rest."""
    if k.call is None:
        return None
    if k.call[0] in CONV_CALLS:
        return k.call
    if k.call[0] == "conv_bn_pool" and k.name in _BLOCK_KERNELS:
        return (k.call, k.name, tuple(sorted((k.consts or {}).items())))
    return None


class Efficiencies(dict):
    """{`efficiency_key`: efficiency} for the convolution mode `mode` ("fp32": strict, "tf32", "tf32x3"):
    `ffma_efficiencies`' result, which `summarize` applies only when it prices that mode."""

    def __init__(self, mode: str = "fp32", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = mode


def priced_mode(res: TraceResult) -> str:
    """The convolutions' product mode of trace `res`: "tf32x3" or "tf32" where the learner's config key
    conv_precision forced it, else "fp32" (strict float32: "auto" without allow_tf32, as the traced
    learner runs; bench.static_metrics' precision labels)."""
    cp = res.config.get("conv_precision", "auto")
    return cp if cp in ("tf32", "tf32x3") else "fp32"


MODE_LABELS = {"fp32": "strict-fp32", "tf32": "TF32", "tf32x3": "tf32x3"}

# TF32 multiply-adds per SM per cycle on sm_90 (Hopper's dense TF32 rate: 494.7 TFLOP/s = 2 x 1,024 x
# 132 SMs x 1.83 GHz): the tensor-pipe time of a loop's products in `tensor_loop_efficiency`
TF32_FMA_PER_SM_CYCLE = 1024


def _table_rows(table: str, flag: str, mode: str = "fp32") -> list:
    """The Triton rows of a bench.static_metrics JSON compiled in `mode` (default strict fp32); MamlppError
    naming `flag` and the file where it cannot be read."""
    from mamlpp_fast.errors import MamlppError
    try:
        with open(table) as f:
            return [r for r in json.load(f)["triton_kernels"] if r.get("precision") == mode]
    except (OSError, ValueError, KeyError) as e:
        raise MamlppError(f"{flag}: cannot read a bench.static_metrics JSON from {table!r}: {e}") from None


def _conv_launch(call, memo: dict, mode: str = "fp32"):
    """The Triton convolution launch (a bench.static_metrics `Launch`) of convolution call `call` in
    product mode `mode` (`priced_mode`), or None where it launches none; captured once per call (`memo`)."""
    if call not in memo:
        from .static_metrics import capture_launches
        memo[call] = next((ln for ln in capture_launches(call, tf32=mode)
                           if ln[0].__name__.startswith("_conv_")), None)
    return memo[call]


def _conv_kernels(res: TraceResult):
    """(kernel group, its Triton convolution launch) for each convolution call of `res` (`CONV_CALLS`)
    that launches one, in the trace's product mode (`priced_mode`), each call captured once."""
    memo: dict = {}
    mode = priced_mode(res)
    for k in res.kernels:
        if k.call is not None and k.call[0] in CONV_CALLS:
            ln = _conv_launch(k.call, memo, mode)
            if ln is not None:
                yield k, ln


def _priceable(r: dict, mode: str) -> bool:
    """Whether row r holds what `loop_efficiency` / `tensor_loop_efficiency` read: in strict fp32 its hot
    loop's FFMA share, or, for a kernel without a loop, its whole body's FFMA count; in TF32 / tf32x3 its
    instruction count."""
    if mode != "fp32":
        return bool(r.get("instructions"))
    return r.get("ffma_share") is not None or (r.get("loop") is False and r.get("all_ffma") is not None)


def _conv_row(rows: list, ln, call, table: str, flag: str, need_share: bool = False, mode: str = "fp32") -> dict:
    """The row of `rows` (`_table_rows` of `mode`) compiled with the configuration of launch `ln`;
    MamlppError naming `flag`, the table and the call where there is none (with `need_share`: none that
    can be priced, `_priceable`)."""
    from mamlpp_fast.errors import MamlppError

    from .static_metrics import launch_consts
    consts = launch_consts(ln[2])
    for r in rows:
        if r["kernel"] == ln[0].__name__ and r["config"] == consts and (not need_share or _priceable(r, mode)):
            return r
    raise MamlppError(f"{flag}: {table} has no {MODE_LABELS[mode]} {ln[0].__name__} with the configuration of "
                      f"{call[0]} {call[1]} ({consts}): regenerate it with python -m bench.static_metrics")


def ffma_efficiencies(res: TraceResult, table: str) -> dict:
    """{key: efficiency} (`efficiency_key`) for every convolution call of `res` (`CONV_CALLS`) and every
    pass of the fused first block (`_block_efficiency`): the share of FFMA among the
    SASS instructions of its kernel's strict-fp32 hot loop times the launch's `tile_utilization` (the
    padded products it executes for nothing); the share read from a bench.static_metrics JSON (compiled
    for the device with its Triton, e.g. bench/results/static_metrics_sm90a_triton3.6.0.json) by the
    launch configuration the call gets here (bench.static_metrics `capture_launches`, the same
    constexpr arguments the table records). An SM issues one instruction per FFMA slot, so a loop whose
    share is f reaches at most f of the FMA ceiling: pricing each convolution at it makes the prediction
    see what the loop's instruction mix costs (spills and extra integer work), which one global
    --conv-efficiency cannot. A launch without a loop (the first layer's one-step forward) is priced at
    its whole body's FFMA share.

    A trace of the TF32 or tf32x3 products (`priced_mode`: config key conv_precision) reads the table's
    rows of that precision, for the launches that mode makes (the tensor-core tiles), and prices each
    convolution at `tensor_loop_efficiency` instead: the tensor pipe's time for the loop's products over
    its issue time, the same question (what the instruction stream lets the pipe reach) for the other
    pipe. The result is an `Efficiencies` of that mode. Raises MamlppError naming a call the table does not
    hold (a table compiled before the kernels or configurations changed, or with other --triton-configs)."""
    from mamlpp_fast.errors import MamlppError

    from .static_metrics import capture_launches
    mode = priced_mode(res)
    rows = _table_rows(table, "--conv-efficiency-from", mode)
    if mode != "fp32":  # the block's kernels without products compile once, as strict fp32 rows
        rows = rows + _table_rows(table, "--conv-efficiency-from")
    out = Efficiencies(mode)
    block_launches: dict = {}  # the fused block's captured launches per call (shared by its passes' keys)
    for k in res.kernels:
        call, key = k.call, efficiency_key(k)
        if key is None or key in out:
            continue
        if call[0] == "conv_bn_pool":
            if call not in block_launches:
                block_launches[call] = capture_launches(call, tf32=mode)
            out[key] = _block_efficiency(k, block_launches[call], rows, table, mode)
            continue
        ln = _conv_launch(call, {}, mode)
        if ln is None:
            raise MamlppError(f"--conv-efficiency-from: no convolution kernel launched by {call[0]} {call[1]}")
        row = _conv_row(rows, ln, call, table, "--conv-efficiency-from", need_share=True, mode=mode)
        eff = (loop_efficiency(call, ln[2], row) if mode == "fp32"
               else tensor_loop_efficiency(ln[2], row, mode, inside_fraction(call, ln[2])))
        out[call] = eff * tile_utilization(call, ln[2])
    return out


def tensor_loop_efficiency(kw: dict, row: dict, mode: str, inside: float = 0.0) -> float:
    """The fraction of the tensor pipe's rate a TF32 / tf32x3 convolution launch's loop can reach, by its
    issue count. One iteration multiplies a BLOCK_M x (NSUB x BLOCK_N) x BLOCK_K tile (3 TF32 products
    per product in tf32x3): MACs / `TF32_FMA_PER_SM_CYCLE` cycles of the SM's tensor pipe, while each of
    its warps issues the loop's SASS instructions (`row["instructions"]`, one per cycle on its
    scheduler; the warps of one warpgroup on the four schedulers). More CTAs per SM scale both alike, so
    the loop runs at min(1, tensor cycles / instructions) of the mode's rate (TF32, or a third of it for
    tf32x3, in useful products). A launch without a loop does one step: the same with its whole body's
    count. A weight gradient whose lanes run in two loops (INSIDE: a fraction `inside` of them,
    `inside_fraction`, in the loop without the tap mask, the rest in the masked one; the row's
    `loop_instructions`, fewest first) issues f x the first's count + (1 - f) x the second's per step on
    average. Not modelled: latency (the issue count is a floor) and the mode's ceiling itself (measured)."""
    products = 3 if mode == "tf32x3" else 1
    macs = kw["BLOCK_M"] * kw["BLOCK_N"] * kw.get("NSUB", 1) * kw["BLOCK_K"] * products
    counts = row.get("loop_instructions") or []
    instructions = row["instructions"]
    if inside > 0.0 and len(counts) >= 2:
        instructions = inside * counts[0] + (1.0 - inside) * counts[-1]
    return min(1.0, macs / TF32_FMA_PER_SM_CYCLE / instructions)


def _block_efficiency(k: Kernel, captured: list, rows: list, table: str, mode: str = "fp32") -> float:
    """The strict-fp32 hot loop's FFMA share of the kernel that pass k of the fused first block launches
    (`_BLOCK_KERNELS`, told apart by k.consts; captured: bench.static_metrics `capture_launches` of
    k.call), read from the table's rows by that launch's configuration. No tile-use factor: the trace's
    FLOPs of the block already count the products its tiles execute (channels and patch width as padded,
    `_block_patch`). In TF32 / tf32x3 (`mode`) the block's products are warp-level HMMA (m16n8k8: 1,024
    multiply-adds, 4 cycles of its scheduler's quarter of the tensor pipe), so the loop reaches
    min(1, 4 x HMMA / instructions) of the mode's rate; a loop without HMMA is priced at its FFMA share."""
    from mamlpp_fast.errors import MamlppError

    from .static_metrics import launch_consts
    name = _BLOCK_KERNELS[k.name]
    want = k.consts or {}
    launches = [kw for fn, _args, kw in captured
                if fn.__name__ == name and all(kw.get(c, False) == v for c, v in want.items())]
    if not launches:
        raise MamlppError(f"--conv-efficiency-from: the fused block {k.call[1]} launches no {name} with {want}")
    consts = launch_consts(launches[0])
    found = [r for r in rows if r["kernel"] == name and r["config"] == consts and r.get("ffma_share") is not None]
    found.sort(key=lambda r: r["precision"] != mode)  # the mode's own row first
    if not found:
        raise MamlppError(f"--conv-efficiency-from: {table} has no {MODE_LABELS[mode]} {name} with the "
                          f"configuration of the fused block {k.call[1]} ({consts}): regenerate it with "
                          "python -m bench.static_metrics")
    r = found[0]
    if mode != "fp32" and r.get("hmma"):
        return min(1.0, 4 * r["hmma"] / r["instructions"])
    return float(r["ffma_share"])


def inside_fraction(call, kw: dict) -> float:
    """The share of a weight-gradient launch's reduction lanes that its unmasked loop runs (INSIDE: the
    lanes whose every tap is inside the image, listed first by the lane table, whole BLOCK_K steps of
    them); 0 for a launch without INSIDE or another op."""
    if call[0] != "conv_weight_grad" or not kw.get("INSIDE"):
        return 0.0
    from mamlpp_fast.triton.conv import inside_lanes
    ho, wo = call[2][7], call[2][8]
    n = call[1][0]
    return inside_lanes(n, call[2]) // kw["BLOCK_K"] * kw["BLOCK_K"] / (n * ho * wo)


def loop_efficiency(call, kw: dict, row: dict) -> float:
    """The FFMA share a launch runs at: its hot loop's (`ffma_share`); for a weight gradient whose lanes
    run in two loops (INSIDE, `inside_fraction` f of them in the better one, share s_in, the rest in the
    masked one, s_out: `ffma_loop_shares`), the time-weighted share 1 / (f / s_in + (1 - f) / s_out); for
    a launch without a loop (the first layer's forward: one step), its whole body's FFMA over its
    instructions."""
    if row.get("ffma_share") is None and row.get("loop") is False:
        return row["all_ffma"] / row["instructions"]
    f = inside_fraction(call, kw)
    shares = row.get("ffma_loop_shares") or []
    if f == 0.0 or len(shares) < 2:
        return float(row["ffma_share"])
    return 1.0 / (f / max(shares) + (1.0 - f) / min(shares))


def tile_utilization(call, kw: dict) -> float:
    """Useful products / products a convolution launch executes: its tiles' padding (rows past the pixels
    or output channels, columns past the channels or Ci*kh*kw, k-steps past the channels, lanes past a
    split chunk's end), which the kernel multiplies by masked zeros. The trace's FLOPs are the useful
    ones; the FMA pipe runs the executed ones. `call`: a bench.trace convolution call (op, input
    shape, meta, ...); kw: the launch's keyword arguments (bench.static_metrics `capture_launches`)."""
    b, co, ci, kh, kw_, h, wd, ho, wo, s, p = call[2]
    n = call[1][0]

    def used(x, tile):  # x items in tiles of `tile`
        return x / (-(-x // tile) * tile)

    bm, bn, bk, nsub = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw.get("NSUB", 1)
    if call[0] == "conv_weight_grad":
        red, chunk = n * ho * wo, kw.get("CHUNK", n * ho * wo)
        lanes = red / (red // chunk * (-(-chunk // bk) * bk) + (-(-(red % chunk) // bk) * bk))
        cols = used(ci, bn) if kw.get("TAP_MAJOR") else used(ci * kh * kw_, bn)
        return used(co, bm * nsub) * cols * lanes
    rows, chans, red_ch = (n * ho * wo, co, ci) if call[0] == "conv_forward" else (n * h * wd, ci, co)
    k_used = used(red_ch * kh * kw_, bk) if kw.get("SMALL") else used(red_ch, bk)
    return used(rows, bm) * used(chans, bn * nsub) * k_used


def _share(k: Kernel, ceil: dict) -> float:
    """The fraction of the device a launch of k.programs CTAs can use: programs / SMs, at most 1 (a
    launch of T programs, one per task, gets T multiprocessors' share of the FMA rate and of the
    bandwidth; an approximation: one CTA may draw more than 1/SMs of the bandwidth)."""
    return min(1.0, k.programs / ceil["sms"]) if k.programs else 1.0


def predict(k: Kernel, ceil: dict, tf32: bool, cuda_graph: bool, conv_efficiency: float = 1.0,
            tf32x3: bool = False, efficiencies: dict | None = None) -> float:
    """Predicted milliseconds of kernel group k at the ceilings `ceil` (None when not measured)."""
    if ceil.get("fp32_tflops") is None:
        return None
    rate = _rate(k, ceil, tf32, conv_efficiency, tf32x3, efficiencies)
    share = _share(k, ceil)
    t = max(k.flops / rate, k.bytes / (ceil["bandwidth_tbs"] * 1e12)) / share * 1e3
    launch = ceil["graph_launch_us"] if cuda_graph else ceil["eager_launch_us"]
    return t + k.launches * launch * 1e-3


def summarize(res: TraceResult, ceilings: str = "h100", tf32: bool = False, conv_efficiency: float = 1.0,
              tf32x3: bool = False, efficiencies: dict | None = None) -> dict:
    """Totals, per layer, per op kind and per (layer, kind), and the 20 most launched kernel names.
    conv_efficiency: the fraction of the FMA ceiling the convolution kernels are assumed to reach
    (1.0: the ceiling; bench.static_metrics' FFMA share of their inner loops bounds it from above);
    efficiencies (`ffma_efficiencies`): per convolution call, that bound itself, for the mode it was
    read for (`Efficiencies.mode`)."""
    ceil = CEILINGS[ceilings]
    by_name = defaultdict(lambda: dict(kernels=0, bytes=0))
    graph = res.config["cuda_graph"]
    tot = dict(kernels=0, bytes=0, flops=0, predicted_ms=0.0)
    by_kind = defaultdict(lambda: dict(kernels=0, bytes=0, flops=0, predicted_ms=0.0))
    by_layer = defaultdict(lambda: dict(kernels=0, bytes=0, flops=0, predicted_ms=0.0))
    by_layer_kind = defaultdict(lambda: dict(kernels=0, bytes=0, flops=0, predicted_ms=0.0))
    by_node = defaultdict(lambda: dict(kernels=0, bytes=0, flops=0, predicted_ms=0.0))
    compute_ms = bytes_ms = launch_ms = 0.0
    measured = ceil.get("fp32_tflops") is not None
    for k in res.kernels:
        ms = predict(k, ceil, tf32, graph, conv_efficiency, tf32x3, efficiencies) if measured else 0.0
        by_name[k.name]["kernels"] += k.launches
        by_name[k.name]["bytes"] += k.bytes
        if measured:
            rate = _rate(k, ceil, tf32, conv_efficiency, tf32x3, efficiencies)
            share = _share(k, ceil)
            c, b = k.flops / rate / share * 1e3, k.bytes / (ceil["bandwidth_tbs"] * 1e12) / share * 1e3
            compute_ms += c if c >= b else 0.0
            bytes_ms += b if b > c else 0.0
            launch_ms += k.launches * (ceil["graph_launch_us"] if graph else ceil["eager_launch_us"]) * 1e-3
        for d in (tot, by_kind[k.kind], by_layer[k.layer], by_layer_kind[(k.layer, k.kind)], by_node[k.node]):
            d["kernels"] += k.launches
            d["bytes"] += k.bytes
            d["flops"] += k.flops
            d["predicted_ms"] += ms
    conv_flops = sum(k.flops for k in res.kernels if k.kind == "conv")
    out = dict(res.config)
    out.update(tot)
    if not measured:
        out["predicted_ms"] = None
    out.update(dict(
        prediction=("PREDICTION from device ceilings (%s), not a measurement" % ceil["device"]) if measured
        else f"no prediction: {ceil['device']}",
        ceilings=ceilings, tf32=tf32, tf32x3=tf32x3, conv_efficiency=conv_efficiency,
        conv_efficiency_per_call=_applies(efficiencies, tf32, tf32x3),
        top_names=dict(sorted(by_name.items(), key=lambda kv: -kv[1]["kernels"])[:20]),
        ceiling_values={k: v for k, v in ceil.items() if k != "sources"},
        predicted_split_ms=(dict(compute_bound=compute_ms, bandwidth_bound=bytes_ms, launches=launch_ms)
                            if measured else None),
        # the learner's convolution and linear FLOPs (what bench.flops counts): all but the running-statistics matmul
        conv_linear_flops=sum(k.flops for k in res.kernels if k.kind != "running_stats"), conv_flops=conv_flops,
        by_kind={k: v for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["kernels"])},
        by_layer=dict(sorted(by_layer.items())),
        by_layer_kind={f"{a}/{b}": v for (a, b), v in sorted(by_layer_kind.items())},
        # where the launches come from: the autograd node that ran them (bench.trace `_node_label`)
        by_node={k: v for k, v in sorted(by_node.items(), key=lambda kv: -kv[1]["kernels"])},
        # gradient accumulation: autograd adds the gradients of a tensor used more than once
        accumulation_adds=sum(k.launches for k in res.kernels if k.name == "aten.add" and k.node != "forward"),
    ))
    if out["conv_efficiency_per_call"] and measured:
        out["by_call"] = _by_call(res, ceil, graph, conv_efficiency, efficiencies, tf32, tf32x3)
    out["longest_chains"] = longest_chains(res)
    pairs = side_by_side_counts(res)
    if pairs is not None:
        out["side_by_side"] = pairs
    out["max_chain"] = max((c["chain"] for c in out["longest_chains"]), default=0)
    return out


def side_by_side_counts(res: TraceResult) -> dict | None:
    """With config key conv_streams (`trace_meta_update(conv_streams=True)`): the `side_by_side` pairs a
    device would run on two streams, the launches on the side stream, and `serial_kernels`, the launches
    left one after another when each pair costs its longer branch (every launch outside a pair, plus per
    pair the larger of its two branches' launch counts); per layer (the layer of the pair's side-stream
    launches). None when the trace has no pair. Not priced: the model's time of a launch is its FLOPs or
    bytes at the device's rate plus a launch cost, which two streams do not change; what they can change,
    launches that fill part of the device each running at once, is a latency effect the model leaves out."""
    branches = defaultdict(lambda: [0, 0])
    layer_of = {}
    alone = 0
    for k in res.kernels:
        if k.group:
            branches[k.group][k.branch] += k.launches
            if k.branch == 1:
                layer_of.setdefault(k.group, k.layer)
        else:
            alone += k.launches
    if not branches:
        return None
    by_layer = defaultdict(lambda: dict(pairs=0, beside=0))
    for g, (a, b) in branches.items():
        d = by_layer[layer_of.get(g, "?")]
        d["pairs"] += 1
        d["beside"] += b
    return dict(pairs=len(branches), beside=sum(b for _, b in branches.values()),
                serial_kernels=alone + sum(max(a, b) for a, b in branches.values()),
                by_layer=dict(sorted(by_layer.items())))


def longest_chains(res: TraceResult, top: int = 10) -> list:
    """The kernels whose programs wait on the longest chains of dependent steps that do little work each
    (`Kernel.chain`): a convolution's last program summing the split partials inside the kernel, (SPLIT - 1)
    x NSUB loads one after another; the head's feature steps per program and its last programs' sums.
    Longest first: [{name, layer, call shape, launches, chain}] per distinct launch. (A convolution's own
    reduction steps are not counted: they do its FLOPs, which the prediction prices.)

    Not priced: a step's cost is a round trip to memory or a cross-thread reduction whose latency the
    trace's launch + FLOPs + bytes model does not hold, but long chains are what made the head's kernels
    and the first layers' split sums cost tens of microseconds where their FLOPs and bytes priced one
    (bench/NOTES.md, "The head's kernels" and "The convolutions' in-kernel split sums")."""
    agg: dict = {}
    for k in res.kernels:
        if not k.chain:
            continue
        shape = list(k.call[1]) if isinstance(k.call, tuple) and len(k.call) > 1 else None
        key = (k.name, k.layer, str(shape), k.chain)
        a = agg.setdefault(key, dict(name=k.name, layer=k.layer, shape=shape, launches=0, chain=k.chain))
        a["launches"] += k.launches
    return sorted(agg.values(), key=lambda a: (-a["chain"], -a["launches"]))[:top]


def _by_call(res: TraceResult, ceil: dict, graph: bool, conv_efficiency: float, efficiencies: dict,
             tf32: bool = False, tf32x3: bool = False) -> list:
    """Per distinct convolution call priced per call (op, input shape): launches, the predicted ms at
    conv_efficiency and at the call's own efficiency, and that efficiency (the lowest and highest where
    its launches differ: with and without the bias); largest difference first. tf32 / tf32x3: the mode
    priced (the efficiencies' own, `Efficiencies.mode`)."""
    agg: dict = {}
    for k in res.kernels:
        key = efficiency_key(k)
        if key not in efficiencies:
            continue
        a = agg.setdefault((k.call[0], tuple(k.call[1])), dict(op=k.call[0], shape=list(k.call[1]), launches=0,
                                                               ceiling_ms=0.0, per_call_ms=0.0, efficiency=[]))
        a["launches"] += k.launches
        a["ceiling_ms"] += predict(k, ceil, tf32, graph, conv_efficiency, tf32x3)
        a["per_call_ms"] += predict(k, ceil, tf32, graph, conv_efficiency, tf32x3, efficiencies)
        e = efficiencies[key]
        a["efficiency"] = [min([e] + a["efficiency"]), max([e] + a["efficiency"])]
    return sorted(agg.values(), key=lambda a: a["ceiling_ms"] - a["per_call_ms"])


def _fmt_bytes(b):
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def to_markdown(s: dict) -> str:
    lines = [f"### Trace: {s['workload']} B={s['batch_size']}, backend {s['backend']}, conv_impl {s['conv_impl']}, "
             + (f"first block {s['first_block']}, " if "first_block" in s else "")
             + (f"bn_pool {s['bn_pool']}, " if "bn_pool" in s else "")
             + (f"head {s['head']}, " if "head" in s else "")
             + (f"epoch {s['epoch']} (MSL {'on' if s['epoch'] < s['workload_detail']['msl_epochs'] else 'off'}), "
                if s.get("epoch") else "")
             + 
             f"{'CUDA graph' if s['cuda_graph'] else 'eager'}"
             + (", convolutions in tf32x3" + (", matmuls TF32" if s["tf32"] else "") if s.get("tf32x3")
                else (", TF32" if s["tf32"] else ", strict fp32"))
             + (", each convolution and fused-block pass at its strict-fp32 loop's FFMA share of the FMA ceiling ("
                f"{s.get('conv_efficiency_from')})" if s.get("conv_efficiency_per_call")
                else f", convolutions at {s['conv_efficiency']:.0%} of the FMA ceiling"
                if s.get("conv_efficiency", 1.0) != 1.0 else ""),
             "",
             f"{s['prediction']}.", "",
             f"Totals: **{s['kernels']:,} kernels**, {_fmt_bytes(s['bytes'])} read+written, {s['flops'] / 1e9:.2f} GFLOP "
             f"(analytic: total {s['analytic_flops_total'] / 1e9:.2f}, minimal {s['analytic_flops_minimal'] / 1e9:.2f}), "
             + (f"predicted **{s['predicted_ms']:.2f} ms**" if s['predicted_ms'] is not None else "no predicted time")]
    if s.get("predicted_split_ms"):
        p = s["predicted_split_ms"]
        lines[-1] += (f" (compute-bound kernels {p['compute_bound']:.2f} ms, bandwidth-bound {p['bandwidth_bound']:.2f} ms, "
                      f"launches {p['launches']:.2f} ms).")
    sbs = s.get("side_by_side")
    if sbs:
        lines += ["", (f"conv_streams: {sbs['pairs']} pairs of independent launches run on two streams, "
                       f"{sbs['beside']} launches on the side stream; **{sbs['serial_kernels']:,} launches one after "
                       f"another** of the {s['kernels']:,} (a pair costing its longer branch; `side_by_side_counts`, "
                       "not priced). Per layer: "
                       + ", ".join(f"{k} {v['pairs']} pairs ({v['beside']} beside)" for k, v in sbs["by_layer"].items())
                       + ".")]
    cal = s.get("calibration")
    if cal:
        lines += ["", (f"Calibrated on a device profile ({cal['source']}; per-category factors {cal['factors']}): "
                       f"**{cal['calibrated_ms']:.2f} ms**" if cal.get("calibrated_ms") is not None
                       else f"No calibrated time: {cal.get('why')}") + "."]
    lines += ["", "| layer | kernels | bytes | GFLOP | predicted ms |", "|---|---|---|---|---|"]
    for name, v in s["by_layer"].items():
        lines.append(f"| {name} | {v['kernels']:,} | {_fmt_bytes(v['bytes'])} | {v['flops'] / 1e9:.2f} | "
                     f"{v['predicted_ms']:.2f} |")
    lines += ["", "| op kind | kernels | bytes | GFLOP | predicted ms |", "|---|---|---|---|---|"]
    for name, v in s["by_kind"].items():
        lines.append(f"| {name} | {v['kernels']:,} | {_fmt_bytes(v['bytes'])} | {v['flops'] / 1e9:.2f} | "
                     f"{v['predicted_ms']:.2f} |")
    if s.get("longest_chains"):
        lines += ["", "Longest chains of dependent steps of little work per program (`longest_chains`; not priced):", "",
                  "| kernel | layer | input | launches | chain |", "|---|---|---|---|---|"]
        for c in s["longest_chains"]:
            lines.append(f"| {c['name']} | {c['layer']} | {c['shape']} | {c['launches']} | {c['chain']} |")
    if s.get("by_node"):
        lines += ["", "| launched by (autograd node; forward: none) | kernels | bytes | predicted ms |", "|---|---|---|---|"]
        for name, v in list(s["by_node"].items())[:12]:
            lines.append(f"| {name} | {v['kernels']:,} | {_fmt_bytes(v['bytes'])} | {v['predicted_ms']:.2f} |")
        lines += ["", f"Gradient-accumulation adds (aten.add inside the backward): {s['accumulation_adds']:,}."]
    if s.get("by_call"):
        lines += ["", "| convolution call (op, input shape) | launches | predicted ms at the ceiling | per call | "
                      + ("efficiency (FFMA share x tile use) |" if not (s.get("tf32") or s.get("tf32x3"))
                         else "efficiency (tensor pipe by the issue count x tile use) |"), "|---|---|---|---|---|"]
        for c in s["by_call"]:
            lines.append(f"| {c['op']} {tuple(c['shape'])} | {c['launches']} | {c['ceiling_ms']:.3f} | "
                         f"{c['per_call_ms']:.3f} | {c['efficiency'][0]:.0%}"
                         + (f"-{c['efficiency'][1]:.0%}" if round(c['efficiency'][1], 2) != round(c['efficiency'][0], 2)
                            else "") + " |")
    if s.get("top_names"):
        lines += ["", "Most launched: " + ", ".join(f"{n} {v['kernels']}" for n, v in list(s["top_names"].items())[:12])]
    if s.get("launch_comparison"):
        lines += ["", launch_comparison_markdown(s["launch_comparison"]).rstrip("\n")]
    if s.get("resident_warps"):
        lines += ["", resident_warps_markdown(s["resident_warps"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


# The measured points of 2026-11-26 (H100) that the launch costs and the calibration use.
MEASURED_H100 = {
    "graph_triton_grouped_b1_ms": 9.88,     # bench_cuda-...-231853.md, batch sweep, fast [triton] + CUDA graph
    "graph_triton_grouped_b2_ms": 18.50,
    "graph_triton_grouped_b8_ms": 74.02,
    "eager_triton_grouped_b8_ms": 135.86,
    "graph_cuda_grouped_b8_ms": 74.76,      # gpu_check_summary_20261126.txt (scripts/probe_gpu.py cuda)
}


def _unfused_kw() -> dict:
    """trace_meta_update keywords for the measured configuration (no fused op: it had none)."""
    import inspect
    params = inspect.signature(trace_meta_update).parameters
    return {k: "unfused" for k in ("first_block", "bn_pool", "head") if k in params}


def calibrate(ceilings: str = "h100") -> dict:
    """Derive the launch costs of CEILINGS from MEASURED_H100 and the trace's kernel counts, and compare
    the prediction for the measured configuration (cuda backend, grouped cuDNN convolutions, CUDA graph,
    Omniglot 20w1s B=8: 74.76 ms) with the measurement. Returns the numbers (all Omniglot 20w1s)."""
    m = MEASURED_H100
    # the measured configuration had no fused first block
    kw = _unfused_kw()
    k_b1 = summarize(trace_meta_update("omniglot_20w1s", 1, "triton", "grouped", True, **kw), ceilings)["kernels"]
    k_b8 = summarize(trace_meta_update("omniglot_20w1s", 8, "triton", "grouped", True, **kw), ceilings)["kernels"]
    intercept = 2 * m["graph_triton_grouped_b1_ms"] - m["graph_triton_grouped_b2_ms"]
    graph_launch_us = intercept / k_b1 * 1e3
    eager_launch_us = (m["eager_triton_grouped_b8_ms"] - m["graph_triton_grouped_b8_ms"]) / k_b8 * 1e3
    res = trace_meta_update("omniglot_20w1s", 8, "cuda", "grouped", True, **kw)
    s = summarize(res, ceilings)
    conv_kinds = ("conv", "conv transpose")
    conv_ms = sum(v["predicted_ms"] for k, v in s["by_kind"].items() if k in conv_kinds)
    other_ms = s["predicted_ms"] - conv_ms
    measured = m["graph_cuda_grouped_b8_ms"]
    return dict(kernels_triton_grouped_b1=k_b1, kernels_triton_grouped_b8=k_b8, intercept_ms=intercept,
                graph_launch_us=graph_launch_us, eager_launch_us=eager_launch_us,
                calibration_config="cuda backend, grouped cuDNN convolutions, CUDA graph, Omniglot 20w1s B=8",
                kernels=s["kernels"], bytes=s["bytes"], flops=s["flops"], predicted_ms=s["predicted_ms"],
                measured_ms=measured, measured_over_predicted=measured / s["predicted_ms"],
                predicted_conv_ms=conv_ms, predicted_other_ms=other_ms,
                conv_ms_if_other_exact=measured - other_ms,
                conv_efficiency_if_other_exact=conv_ms / (measured - other_ms))


def profile_entry(profile_json: str, workload: str, batch_size: int) -> tuple:
    """(the profile, its entry for `workload` at `batch_size` or None) of a bench.gpu_profile JSON."""
    with open(profile_json) as f:
        prof = json.load(f)
    entry = next((w for w in prof.get("workloads", []) if w.get("workload") == workload
                  and w.get("batch_size") == batch_size), None)
    return prof, entry


def calibrated_prediction(res: TraceResult, profile_json: str) -> dict:
    """The trace's prediction calibrated on a device profile (`python -m bench.gpu_profile` JSON): for each
    kernel category (bench.gpu_profile's), factor = the device time measured for it / what the trace of
    that profiled configuration predicted for it (at the ceiling, the profile's ceilings), from the
    profile's entry for this workload; the calibrated time is the sum over this trace's categories of
    factor x its prediction (same ceilings), a category the profile did not run keeping factor 1.

    A model of 'this category costs what it cost on the device per unit of predicted time': right for
    the configuration profiled (by construction, up to the categories the trace does not see) and a
    first-order guess for a change inside a category; a change of the mix between categories moves it as
    the factors say. Returns {calibrated_ms, factors, source}, or {calibrated_ms: None, why} when the
    profile has no entry for this workload."""
    from .gpu_profile import trace_category
    prof, entry = profile_entry(profile_json, res.config["workload"], res.config["batch_size"])
    if entry is None:
        return dict(calibrated_ms=None, why=f"{profile_json} has no profile of {res.config['workload']} "
                                            f"B={res.config['batch_size']}")
    ceil = entry["trace"].get("ceilings", "h100")
    factors = {}
    for cat, m in entry["profile_by_category"].items():
        pred = entry["trace"]["by_category"].get(cat, {}).get("ms", 0.0)
        if pred > 0:
            factors[cat] = m["ms"] / pred
    total = 0.0
    for k in res.kernels:
        total += factors.get(trace_category(k.name), 1.0) * predict(k, CEILINGS[ceil], False, True)
    return dict(calibrated_ms=total, factors={c: round(f, 3) for c, f in factors.items()}, ceilings=ceil,
                source=f"{profile_json} ({prof.get('device')}, {prof.get('date')})",
                measured_eager_kernel_ms=entry.get("profile_kernel_ms"), measured_captured_ms=entry.get("captured_ms"))


def conv_launch_predictions(res: TraceResult, ceilings: str = "h200", efficiencies: dict | None = None) -> dict:
    """{(kernel name, (x, y, z) grid): {kernel, grid, layer, calls, launches, predicted_ms}}: the trace's
    convolution launches (`CONV_CALLS`) by the Triton kernel and grid their launcher gives them on the
    trace's simulated device (bench.static_metrics `capture_launches`), with their predicted time
    (captured, at `ceilings`; `efficiencies`: per call, as `summarize` takes them). The key is what the
    profiler records per launch, so that `conv_launch_comparison` can set them side by side."""
    ceil = CEILINGS[ceilings]
    mode = priced_mode(res)
    out: dict = {}
    for k, ln in _conv_kernels(res):
        key = (ln[0].__name__, ln.programs_grid())
        d = out.setdefault(key, dict(kernel=key[0], grid=list(key[1]), layer=k.layer, calls=[], launches=0,
                                     predicted_ms=0.0))
        if k.call not in d["calls"]:
            d["calls"].append(k.call)
        d["launches"] += k.launches
        d["predicted_ms"] += predict(k, ceil, mode == "tf32", True, efficiencies=efficiencies,
                                     tf32x3=mode == "tf32x3")
    return out


def resident_warps(res: TraceResult, table: str, sms: int = 132) -> list:
    """Per convolution launch shape of trace `res` (`CONV_CALLS`; kernel, grid and configuration from
    the recorded launches), the warps an SM can hold while the launch runs: `by_registers`, what its
    registers and shared memory allow (bench.static_metrics `occupancy`, from the compiled row of
    `table`, a bench.static_metrics JSON of the same Triton's configurations), and `resident`, that or
    fewer where the grid is too small to give every SM as many (programs x num_warps / sms on average
    in the first wave). Fewest resident warps first: the launches whose latency the fewest warps hide
    (the occupancy hypothesis of bench/NOTES.md, which the A/B's "2x warps" and "2x split" test). Rows:
    {kernel, grid, layer, call, programs, num_warps, registers, by_registers, resident, waves, launches}."""
    from .static_metrics import occupancy
    mode = priced_mode(res)
    rows = _table_rows(table, "--occupancy-from", mode)
    out: dict = {}
    for k, ln in _conv_kernels(res):
        grid = ln.programs_grid()
        key = (ln[0].__name__, grid, k.call)
        if key in out:
            out[key]["launches"] += k.launches
            continue
        r = _conv_row(rows, ln, k.call, table, "--occupancy-from", mode=mode)
        warps = int(ln[2].get("num_warps", r["num_warps"]))
        by_regs = occupancy(r.get("registers") or 0, r["shared_bytes"], warps)
        programs = grid[0] * grid[1] * grid[2]
        slots = max(1, by_regs // warps) * sms
        out[key] = dict(kernel=key[0], grid=list(grid), layer=k.layer, call=f"{k.call[0]} {tuple(k.call[1])}",
                        programs=programs, num_warps=warps, registers=r.get("registers"), by_registers=by_regs,
                        resident=min(by_regs, programs * warps / sms), waves=programs / slots, launches=k.launches)
    return sorted(out.values(), key=lambda d: (d["resident"], d["kernel"], d["grid"]))


def resident_warps_markdown(rows: list) -> str:
    """`resident_warps` as a markdown table."""
    out = ["Convolution launches by the warps an SM holds while they run (fewest first; `by regs`: what "
           "registers and shared memory allow; `resident`: that, or fewer where the grid is small; waves: "
           "programs over the programs all SMs hold at once):", "",
           "| kernel | call | layer | grid | programs x warps | regs | by regs | resident | waves | launches |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for d in rows:
        out.append(f"| `{d['kernel']}` | {d['call']} | {d['layer']} | {'x'.join(map(str, d['grid']))} | "
                   f"{d['programs']} x {d['num_warps']} | {d['registers']} | {d['by_registers']} | "
                   f"{d['resident']:.1f} | {d['waves']:.2f} | {d['launches']} |")
    return "\n".join(out) + "\n"


def conv_launch_comparison(res: TraceResult, launch_groups: list, ceilings: str = "h200",
                           efficiencies: dict | None = None) -> dict:
    """Per convolution launch shape, the device's time (a profile's `launch_groups`, bench.gpu_profile:
    kernel, grid, mean and minimum microseconds per launch, registers, warps per SM) beside the trace's
    prediction for the launches of the same kernel and grid (`conv_launch_predictions`). Rows, longest
    measured total first: {kernel, grid, layer, launches_traced, launches_measured, predicted_us,
    measured_us, min_us, measured_over_predicted, registers, warps_per_sm}; `unmatched_traced` /
    `unmatched_measured`: launch shapes only one side has (another configuration or Triton version, or
    convolutions the learner ran on cuDNN). This is the per-call correction the category factors of
    `calibrated_prediction` cannot give: which launch shapes the model misses, and by how much."""
    pred = conv_launch_predictions(res, ceilings, efficiencies)
    measured = {}
    for g in launch_groups:
        if not str(g.get("name", "")).startswith("_conv_"):
            continue
        grid = tuple(int(v) for v in (list(g.get("grid") or []) + [1, 1, 1])[:3])
        key = (g["name"], grid)
        m = measured.setdefault(key, dict(launches=0, total_us=0.0, min_us=float("inf"),
                                          registers=g.get("registers"), warps_per_sm=g.get("warps_per_sm")))
        m["launches"] += g["launches"]
        m["total_us"] += g["total_us"]
        m["min_us"] = min(m["min_us"], g["min_us"])
    rows = []
    for key, d in pred.items():
        m = measured.get(key)
        if m is None:
            continue
        p_us = d["predicted_ms"] * 1e3 / d["launches"]
        m_us = m["total_us"] / m["launches"]
        rows.append(dict(kernel=d["kernel"], grid=d["grid"], layer=d["layer"], launches_traced=d["launches"],
                         launches_measured=m["launches"], predicted_us=p_us, measured_us=m_us, min_us=m["min_us"],
                         measured_over_predicted=m_us / p_us if p_us else None, registers=m["registers"],
                         warps_per_sm=m["warps_per_sm"], measured_total_us=m["total_us"]))
    rows.sort(key=lambda r: -r["measured_total_us"])
    return dict(rows=rows, ceilings=ceilings,
                unmatched_traced=[dict(kernel=d["kernel"], grid=d["grid"], layer=d["layer"], launches=d["launches"])
                                  for key, d in pred.items() if key not in measured],
                unmatched_measured=[dict(kernel=key[0], grid=list(key[1]), launches=m["launches"])
                                    for key, m in measured.items() if key not in pred])


def launch_comparison_markdown(cmp: dict) -> str:
    """`conv_launch_comparison` as a markdown table."""
    out = [f"Per convolution launch shape: the device's mean time per launch against the trace's prediction "
           f"(captured, {cmp['ceilings']} ceilings" + (f"; {cmp['priced']}" if cmp.get("priced") else "") + "):", "",
           "| kernel | grid | layer | launches (traced / measured) | predicted us | measured us | min us | "
           "measured / predicted | regs | warps/SM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        ratio = "n/a" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}x"
        out.append(f"| `{r['kernel']}` | {'x'.join(map(str, r['grid']))} | {r['layer']} | {r['launches_traced']} / "
                   f"{r['launches_measured']} | {r['predicted_us']:.1f} | {r['measured_us']:.1f} | {r['min_us']:.1f} | "
                   f"{ratio} | {r['registers']} | {r['warps_per_sm']} |")
    for side, what in (("unmatched_traced", "traced, not measured"), ("unmatched_measured", "measured, not traced")):
        if cmp[side]:
            out.append(f"\n{what}: " + ", ".join(f"`{u['kernel']}` {'x'.join(map(str, u['grid']))} ({u['launches']})"
                                                for u in cmp[side]))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """python -m bench.trace: kernel launches, bytes, FLOPs and predicted time of one meta-update."""
    from mamlpp_fast.errors import MamlppError
    p = argparse.ArgumentParser(prog="python -m bench.trace", description=main.__doc__)
    p.add_argument("--workload", default=None,
                   help="a name of bench/workloads.py (default omniglot_20w1s; with --quick the first quick one)")
    p.add_argument("--batch-size", type=int, default=None, help="tasks per meta-update (default: the workload's)")
    p.add_argument("--backend", default="cuda", help="op backend simulated: cuda, triton or torch")
    p.add_argument("--conv-impl", default="triton", help="conv_impl simulated (mamlpp_fast.ops.conv.CONV_IMPLS)")
    p.add_argument("--first-block", default="auto", choices=("auto", "fused", "unfused"),
                   help="the first layer as the fused block (auto: fused unless --backend torch)")
    p.add_argument("--bn-pool", default="auto", choices=("auto", "fused", "unfused"),
                   help="batch norm + max pooling of the later layers as one op (auto: fused unless --backend torch)")
    p.add_argument("--head", default="auto", choices=("auto", "fused", "unfused"),
                   help="the linear head and its loss as one op (auto: fused unless --backend torch)")
    p.add_argument("--epoch", type=int, default=0,
                   help="meta-training epoch (default 0: MSL on; from the workload's msl_epochs on: MSL off)")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager launches instead of a captured graph")
    p.add_argument("--tf32", action="store_true", help="convolutions and matmuls at the TF32 rate")
    p.add_argument("--tf32x3", action="store_true",
                   help="our convolution kernels in tf32x3 (conv_precision): a third of the TF32 rate")
    p.add_argument("--device-ceilings", default=None, choices=sorted(CEILINGS),
                   help="whose measured ceilings price the kernels (default h200, the device the sessions are "
                        "lent, measured by bench.ceilings; --calibrate defaults to h100, the device of the "
                        "measurement it compares with)")
    p.add_argument("--conv-efficiency", type=float, default=1.0,
                   help="fraction of the FMA ceiling assumed for the convolution kernels (default 1.0)")
    p.add_argument("--conv-efficiency-from", default=None, metavar="JSON",
                   help="price each convolution and each pass of the fused first block at its strict-fp32 "
                        "loop's FFMA share, read from this "
                        "bench.static_metrics JSON (e.g. bench/results/static_metrics_sm90a_triton3.6.0.json, "
                        "with --triton-configs 3.6)")
    p.add_argument("--triton-configs", default=None, metavar="X.Y",
                   help="the Triton version whose launch configurations the convolutions use (they differ "
                        "below 3.7: mamlpp_fast.triton.conv.conv_block_config; default: the installed one; the "
                        "device machines run 3.6)")
    p.add_argument("--quick", action="store_true", help="workload names of --quick (tiny shapes)")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    p.add_argument("--calibrate", action="store_true",
                   help="derive the launch costs and compare with the measured 2026-11-26 H100 meta-update")
    p.add_argument("--calibrate-from", default=None, metavar="PROFILE_JSON",
                   help="also a prediction calibrated per kernel category on a device profile "
                        "(python -m bench.gpu_profile JSON, e.g. bench/results/gpu_2026-12-04/call1_profile.json)")
    p.add_argument("--launches-from", default=None, metavar="PROFILE_JSON",
                   help="also each convolution launch shape's measured time (the profile's launch_groups, "
                        "python -m bench.gpu_profile) beside its prediction (run it with the profile's "
                        "configuration: --first-block/--bn-pool/--head, --triton-configs 3.6)")
    p.add_argument("--occupancy-from", default=None, metavar="JSON",
                   help="also each convolution launch's resident warps per SM, from a bench.static_metrics JSON "
                        "of the same Triton's configurations (e.g. bench/results/static_metrics_sm90a_triton3.6.0.json "
                        "with --triton-configs 3.6)")
    p.add_argument("--conv-streams", action="store_true",
                   help="config key conv_streams on: mark the launches a device would run side by side on two "
                        "streams and count those left one after another (serial_kernels)")
    p.add_argument("--out", default=None, help="also write the full summary (JSON) and a .md next to it")
    a = p.parse_args(argv)
    if a.calibrate:
        print(json.dumps(calibrate(a.device_ceilings or "h100"), indent=1))
        return 0
    from mamlpp_fast.triton import conv as tconv
    installed = tconv._TRITON_VERSION
    try:
        if a.triton_configs is not None:
            try:
                tconv._TRITON_VERSION = tuple(int(v) for v in a.triton_configs.split("."))[:2]
            except ValueError:
                raise MamlppError(f"--triton-configs must be a version X.Y, got {a.triton_configs!r}") from None
        if a.workload is None:
            from .workloads import main_workloads
            a.workload = main_workloads(a.quick)[0].name
        # the learner's conv_precision for the priced mode: its tiles follow it (tensor-core tiles for TF32)
        res = trace_meta_update(a.workload, a.batch_size, a.backend, a.conv_impl, not a.no_cuda_graph, quick=a.quick,
                                first_block=a.first_block, bn_pool=a.bn_pool, epoch=a.epoch, head=a.head,
                                conv_precision="tf32x3" if a.tf32x3 else "tf32" if a.tf32 else "auto",
                                conv_streams=a.conv_streams)
        # under the same launch configurations as the trace
        effs = ffma_efficiencies(res, a.conv_efficiency_from) if a.conv_efficiency_from else None
        occ = resident_warps(res, a.occupancy_from) if a.occupancy_from else None
        launch_cmp = None
        if a.launches_from:
            try:
                _prof, entry = profile_entry(a.launches_from, res.config["workload"], res.config["batch_size"])
            except (OSError, ValueError) as e:
                raise MamlppError(f"--launches-from {a.launches_from}: {type(e).__name__}: {e}") from None
            if entry is None or not entry.get("launch_groups"):
                raise MamlppError(f"--launches-from {a.launches_from}: no per-launch table (launch_groups) for "
                                  f"{res.config['workload']} B={res.config['batch_size']}"
                                  + (f": {entry['launch_groups_error']}" if entry and entry.get("launch_groups_error") else ""))
            # the grids under the same launch configurations as the trace
            launch_cmp = conv_launch_comparison(res, entry["launch_groups"], a.device_ceilings or "h200", effs)
    except MamlppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        configs = ".".join(map(str, tconv._TRITON_VERSION))
        tconv._TRITON_VERSION = installed
    if not 0 < a.conv_efficiency <= 1:
        print(f"error: --conv-efficiency must be in (0, 1], got {a.conv_efficiency}", file=sys.stderr)
        return 2
    s = summarize(res, a.device_ceilings or "h200", a.tf32, a.conv_efficiency, a.tf32x3, effs)
    s["conv_efficiency_from"] = a.conv_efficiency_from
    if a.calibrate_from:
        try:
            s["calibration"] = calibrated_prediction(res, a.calibrate_from)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --calibrate-from {a.calibrate_from}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        s["calibrated_ms"] = s["calibration"]["calibrated_ms"]
    if launch_cmp is not None:
        s["launch_comparison"] = launch_cmp
    if occ is not None:
        s["resident_warps"] = occ
    s["command"] = "python -m bench.trace " + " ".join(sys.argv[1:] if argv is None else argv)
    import datetime
    import os

    import torch

    from .run import _git, revision
    s["git_revision"] = revision()
    s["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    s["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    s["torch"] = torch.__version__
    s["triton_configs"] = configs
    if a.out:
        with open(a.out, "w") as f:
            json.dump(s, f, indent=1)
        with open(a.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(to_markdown(s) + f"\nCommand: `{s['command']}`; git {s['git_revision'][:10]}"
                    f"{' (modified)' if s['git_dirty'] else ''}, torch {s['torch']}, convolution launch "
                    f"configurations of Triton {s['triton_configs']}, {s['date']}.\n")
    if a.json:
        keys = ("workload", "batch_size", "backend", "conv_impl", "cuda_graph", "tf32", "tf32x3", "conv_efficiency",
                "conv_efficiency_from", "ceilings", "kernels",
                "bytes", "flops", "conv_linear_flops", "predicted_ms", "prediction", "analytic_flops_total", "analytic_flops_minimal",
                "triton_configs", "calibrated_ms", "max_chain")
        out = {k: s.get(k) for k in keys}
        out["serial_kernels"] = s["side_by_side"]["serial_kernels"] if s.get("side_by_side") else None
        print(json.dumps(out))
    else:
        print(to_markdown(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
