"""The fast MAML++ learner: every task of a meta-batch in one pass.

Same constructor, methods, config keys, state_dict keys, returned values and files as
`mamlpp_fast.reference.MAMLFewShotClassifier`: both are built on the same network modules
(mamlpp_fast.network) and the same learner core (mamlpp_fast.learner_core: meta-optimizer, schedule,
MSL weights, non-finite policy, running-statistics snapshots, checkpoints); only the outer forward
differs, and this learner adds the CUDA-graph capture of a whole meta-update. Instead of a Python loop
over the B tasks:

- fast weights carry a leading task dimension: an adapted tensor of shape S is held as (B, *S);
- activations use the layout (n, B*C, H, W) (task-major channels), so the convolutions of all tasks
  are one `task_conv2d` call per layer (mamlpp_fast.ops.conv: a grouped convolution with groups=B,
  or im2col + batched matmuls, ...; config key `conv_impl`, default `auto`: on a GPU the fastest for
  each layer's shape, timed once; on a CPU a fixed rule from measurements: im2col for the first layer
  of one input channel, else the grouped convolution, which on a 2-core CPU (torch 2.13, oneDNN) took
  0.74 s vs 1.05 s for B separate convolutions at the Omniglot layer-2 shape, forward + backward +
  double backward), max pooling and average pooling are plain calls, and the linear layer
  is one batched matmul;
- batch norm with per-(task, channel) statistics, per-step gamma/beta and leaky ReLU is the custom op
  `per_step_batch_norm` (hand-written backward and double backward);
- the LSLR inner update of every adapted tensor of every task is one `lslr_update` call;
- running statistics: the reference updates row s of each BN layer once per forward that uses it,
  support then target, task after task. With momentum m and K such batch statistics v_1..v_K in that
  order, the sequential updates r <- (1-m) r + m v_k have the closed form
      r_K = (1-m)^K r_0 + sum_k m (1-m)^(K-k) v_k,
  which is applied once per (layer, step) at the end of the meta-batch with the statistics of all
  tasks interleaved in the reference's order (support_0, target_0, support_1, target_1, ...). The
  unbiased variance is recovered from the op's saved inverse std: var = (1/invstd^2 - eps) * M/(M-1).

The per-task losses are means over each task's own examples; all tasks of a batch have the same
number of examples, so the batch mean of the per-task means is the mean over all examples, which is
what the code computes (B * mean for the inner-loop loss, whose gradient w.r.t. task t's weights is
that task's own loss gradient).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .learner_core import LearnerAPI
from .network import BN_EPS, BN_MOMENTUM, LEAKY_SLOPE
from .ops import lslr_update, per_step_batch_norm
from .ops.conv_block import block_supported, conv_bn_pool
from .ops.fanout import expand_tasks, fanout, fanout_rows
from .ops.conv_block import torch_impl as block_torch_impl
from .ops.bn_pool import bn_pool, bn_pool_supported
from .ops.bn_pool import torch_impl as bn_pool_torch_impl
from .ops.conv import task_conv2d
from .ops.head import head_loss, head_supported
from .ops.head import torch_impl as head_torch_impl
from .ops.pool import max_pool2x2

# Per fused op (config keys first_block, bn_pool and head): whether its value "auto" takes the op's fused
# Triton kernels on a CUDA device. Each stays off until that op's own device tests pass
# (bench.fused_verdict lists them and reads a device run's junit.xml; tests/gpu/RESULTS.md): the first
# device run (H200, 2026-12-04) failed every test that ran the fused ops. Found since, without a device:
# the block's float64 backward could not be compiled by Triton (fixed; tests/test_static_metrics.py now
# compiles the fused kernels in float64), and the float32 tests at full size redrew their inputs until
# timed out (fixed). Whether the float32 kernels are right on the device is not yet measured; the
# unfused ops' device tests pass. "fused" still selects the kernels (with a warning on CUDA while the
# op's entry is off). One entry per op, so that an op whose tests pass is not held back by another's.
AUTO_FUSES_ON_CUDA = {"first_block": False, "bn_pool": False, "head": False}

__all__ = ["MAMLFewShotClassifier"]


def _task_major(x: torch.Tensor) -> torch.Tensor:
    """(B, N, K, C, H, W) -> (N*K, B*C, H, W): example-major rows, task-major channels."""
    b, n, k, c, h, w = x.shape
    return x.reshape(b, n * k, c, h, w).transpose(0, 1).reshape(n * k, b * c, h, w)


def _triton_kernels_run(t: torch.Tensor, op_backend: str) -> bool:
    """Whether this learner's one-launch Triton kernels outside the op backends (running statistics,
    accuracy) run for tensors like t: on a CUDA device when Triton is available, and on a CPU only under
    TRITON_INTERPRET=1 with the Triton op backend (the interpreter's tests)."""
    from . import triton as tb
    if t.device.type == "cuda":
        wanted = True
    else:
        from .triton._device import _interpret
        wanted = t.device.type == "cpu" and op_backend == "triton" and _interpret()
    return wanted and t.dtype in (torch.float32, torch.float64) and tb.is_available()


def running_stats_launcher(stats: torch.Tensor, op_backend: str):
    """The one-launch Triton update of the running statistics (triton.running_stats
    `running_stats_update`) for statistics like `stats`, or None where it does not run
    (`_triton_kernels_run`)."""
    if not _triton_kernels_run(stats, op_backend):
        return None
    from .triton.running_stats import running_stats_update
    return running_stats_update


def accuracy_launcher(logits: torch.Tensor, op_backend: str):
    """The one-launch Triton accuracy (triton.metrics `accuracy`: torch's argmax, eq, cast and mean in
    one kernel, the same float32 value) for logits like these, or None where it does not run
    (`_triton_kernels_run`)."""
    if not _triton_kernels_run(logits, op_backend):
        return None
    from .triton.metrics import accuracy
    return accuracy


class MAMLFewShotClassifier(LearnerAPI, nn.Module):
    """MAML++ with all tasks of a meta-batch processed together. API identical to the reference.

    This class is the batched outer forward and the CUDA-graph capture; the public methods and the
    meta-optimizer come from the learner core (`self.core`) through LearnerAPI, as for the reference.

    The op backend is this learner's own choice: its config key `backend` is passed to every op call
    (``backend=``; "auto" defers to `mamlpp_fast.ops.set_backend`, then env MAMLPP_BACKEND, then the
    device's best); nothing process-wide is changed. See mamlpp_fast.ops.backend.
    """

    supports_data_parallel = True  # its running-statistics update goes through core.reduce_statistics

    def __init__(self, im_shape, device, args):
        super().__init__()
        core = self._init_core(im_shape, device, args)  # config, seed, network, LSLR (learner_core.LearnerAPI)
        self._op_backend = self.args.backend  # passed to the ops (backend=), for this learner only
        self._adapted_names = list(self.get_inner_loop_parameter_dict(self.classifier.named_parameters()))
        self._importance_cache: tuple[int, torch.Tensor, list] | None = None
        self._graphs: dict = {}
        self._graph_failed: str | None = None
        self._stream = None  # warm-up and capture stream of the CUDA graphs (`_capture_stream`)
        # The meta-optimizer: with CUDA graphs, (fused) Adam with its step count and learning rate on the
        # device (capturable), so that the captured step reads the current epoch's rate from a tensor the host
        # fills before each replay. cuDNN algorithm search (config key cudnn_benchmark, default on): the
        # grouped convolutions of the fast learner are where its GPU time goes, and letting cuDNN time its
        # algorithms took mini-ImageNet 5-way 5-shot (CUDA graph) from 206 ms to 78 ms per meta-update on
        # an H100 (measured 2026-11-26, bench/NOTES.md).
        core.attach(self, capturable=self._graph_mode(), cudnn_benchmark=self.args.cudnn_benchmark)

    @property
    def backend_name(self) -> str:
        """The op backend that runs this learner's ops on its device (shown in the start-up line)."""
        from .ops import get_backend
        return get_backend(self._op_backend, self.device).name

    # -- batched network ----------------------------------------------------------------------------
    def _bn_rows(self, uses: int = 1, saved: bool = False) -> list[dict]:
        """The per-step gamma and beta rows of every BN layer, split once per outer forward: ``uses``
        dicts (one per use: the support and the target passes), each mapping "layer.name" to the tuple
        of step rows, and with `saved` one more dict of gamma rows only (the rows that the support pass's
        backward nodes read again, `_net`). The rows are aliases made by one `fanout_rows` node, whose
        backward stacks the row gradients of all tables and uses at once; indexing the (S, C) parameter
        at every use instead made each use's backward a zero fill of all S rows plus a copy of one, then
        an (S, C) addition per further use, and one `unbind` per table left autograd an addition per row
        and extra use."""
        keys, tables = [], []
        for i in range(self.classifier.num_stages):
            layer = f"conv{i}"
            norm = self.classifier.layer_dict[layer].norm_layer
            if norm.per_step and not norm.inner_loop_bn:
                for name, own in (("weight", norm.weight), ("bias", norm.bias)):
                    keys.append(f"{layer}.{name}")
                    tables.append(own)
        everything = list(range(len(tables)))
        reads = [everything] * uses
        if saved:
            reads.append([t for t in everything if keys[t].endswith(".weight")])
        if not tables:
            return [{} for _ in reads]
        return [dict(zip([keys[t] for t in use], rows)) for use, rows in zip(reads, fanout_rows(tables, reads))]

    def _bn_params(self, layer: str, step: int, fast: dict, rows: dict, names=("weight", "bias")):
        """gamma and beta of a BN call (or those of `names`): adapted (B, C) fast tensors when the inner
        loop adapts them (each separately: only the learnable one is adapted), else the step's row
        (`_bn_rows`) or the shared vector."""
        norm = self.classifier.layer_dict[layer].norm_layer
        out = []
        for name in names:
            key = f"layer_dict.{layer}.norm_layer.{name}"
            row = rows.get(f"{layer}.{name}")
            out.append(fast[key] if key in fast else (row[step] if row is not None else getattr(norm, name)))
        return tuple(out)

    def _net(self, x: torch.Tensor, num_tasks: int, step: int, fast: dict, stats: list | None,
             pattern: str = "first_order", rows: dict | None = None, saved: tuple | None = None,
             image_cache: dict | None = None):
        """The features of all tasks before the linear head (`_head`): the last activation (n, B*C, h, w)
        (after the average pooling when the network does not max-pool); x is (n, B*C, H, W), fast maps
        names to (B, *shape); rows: the per-step BN rows of this outer forward (`_bn_rows`; split here
        when not given).

        When `stats` is a list, (layer, mean, invstd, M) of every BN call are appended to it. `pattern`
        ("second_order" for the support pass of a second-order step) tells conv_impl=auto which
        derivatives will be taken (mamlpp_fast.ops.conv). `saved`: (fast, rows) of the aliases that the
        ops' backward nodes read instead (`mamlpp_fast.ops.fanout`), for the support pass. `image_cache`:
        a dict kept for x over the meta-update (`conv_bn_pool`'s: the fused first block's terms that
        depend on the image alone, formed once per image set instead of per step)."""
        b = num_tasks
        out = x
        rows = self._bn_rows()[0] if rows is None else rows
        # the support pass's activations are read again by the nodes the inner backward builds: the
        # producer returns an alias for them (ops.fanout, "activations"), None where none is made
        out_s = None
        for i in range(self.classifier.num_stages):
            layer = f"conv{i}"
            conv = self.classifier.layer_dict[layer].conv
            w = fast[f"layer_dict.{layer}.conv.weight"]
            bias = fast[f"layer_dict.{layer}.conv.bias"]
            w_s = bias_s = gamma_s = None
            if saved is not None:
                w_s, bias_s = saved[0][f"layer_dict.{layer}.conv.weight"], saved[0][f"layer_dict.{layer}.conv.bias"]
                (gamma_s,) = self._bn_params(layer, step, *saved, names=("weight",))
            block = self._first_block_impl(out, w, conv) if i == 0 else None
            if block is not None:  # convolution, BN, leaky ReLU and pooling as one op (ops.conv_block)
                gamma, beta = self._bn_params(layer, step, fast, rows)
                gamma_s = None if gamma_s is gamma else gamma_s  # a shared, unsplit gamma: no alias
                out, mean, invstd, *alias = conv_bn_pool(out, w, bias, gamma, beta, b, conv.stride, conv.padding,
                                                         BN_EPS, LEAKY_SLOPE, impl=block, w_saved=w_s,
                                                         bias_saved=bias_s, gamma_saved=gamma_s,
                                                         alias=saved is not None, image_cache=image_cache)
                out_s = alias[0] if alias else None
                if stats is not None:
                    stats.append((i, mean, invstd, out.shape[0] * out.shape[2] * out.shape[3] * 4))
                continue
            out = task_conv2d(out, w, bias, b, conv.stride, conv.padding, self.args.conv_impl, pattern,
                              weight_saved=w_s, input_saved=out_s)
            gamma, beta = self._bn_params(layer, step, fast, rows)
            gamma_s = None if gamma_s is gamma else gamma_s
            m = out.shape[0] * out.shape[2] * out.shape[3]
            pool = self._bn_pool_impl(out) if self.classifier.max_pooling else None
            if pool is not None:  # batch norm, leaky ReLU and pooling as one op (ops.bn_pool)
                out, mean, invstd, *alias = bn_pool(out, gamma, beta, b, BN_EPS, LEAKY_SLOPE, impl=pool,
                                                    gamma_saved=gamma_s, alias=saved is not None)
                out_s = alias[0] if alias else None
            else:
                out_s = None
                out, mean, invstd = per_step_batch_norm(out, gamma, beta, b, BN_EPS, LEAKY_SLOPE,
                                                        backend=self._op_backend)
                if self.classifier.max_pooling:  # F.max_pool2d's values and derivatives (ops.pool)
                    out = max_pool2x2(out)
            if stats is not None:
                stats.append((i, mean, invstd, m))
        if not self.classifier.max_pooling:
            out = F.avg_pool2d(out, out.shape[2])
        return out

    def _head(self, out: torch.Tensor, num_tasks: int, fast: dict, labels: torch.Tensor, support: bool,
              weight: torch.Tensor | None = None, prev: torch.Tensor | None = None):
        """The linear head and loss of a pass: (loss, logits (B, n, classes)). out: the features of `_net`;
        labels (B*n,) task-major. Support pass: the sum over the tasks of each task's mean
        cross-entropy (B times the mean over all examples: its gradient w.r.t. task t's weights is that
        task's own loss gradient); target pass: the mean over all examples, times `weight` (the step's
        MSL importance) when given, plus `prev` (the MSL sum so far) when given.

        Config key `head`: "fused" runs the op `head_loss` (one kernel per pass and derivative on the
        Triton backend, mamlpp_fast.ops.head), "unfused" a batched matmul and F.cross_entropy (autograd's
        formulas), "auto" fused where the Triton kernels run on a CUDA device."""
        b = num_tasks
        n = out.shape[0]
        weights = fast["layer_dict.linear.weights"]  # (B, classes, F)
        lin_bias = fast["layer_dict.linear.bias"]  # (B, classes)
        impl = self._head_impl(out, weights.shape[1])
        if impl is not None:
            scale = 1.0 / n if support else 1.0 / labels.numel()
            return head_loss(out, weights, lin_bias, labels, b, scale, weight, prev, impl=impl)
        feats = out.reshape(n, b, -1).transpose(0, 1)  # (B, n, F), each row flattened as (C, h, w)
        logits = torch.baddbmm(lin_bias.unsqueeze(1), feats, weights.transpose(1, 2))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
        if support:
            return loss * b, logits
        if weight is not None:
            loss = weight * loss
        return (loss if prev is None else prev + loss), logits

    def _first_block_impl(self, x: torch.Tensor, w: torch.Tensor, conv):
        """The implementation of the fused first block (mamlpp_fast.ops.conv_block) for this call, or
        None for the unfused ops. Config key `first_block`: "unfused"; "fused" (wherever the layer allows
        it: max pooling, an even-sized convolution output, an input without gradient; the Triton kernels
        where they run (a CUDA device, or TRITON_INTERPRET=1), else the PyTorch implementation, which
        recomputes the convolution and saves memory, not time); "auto": fused where the Triton kernels
        run on a CUDA device and `AUTO_FUSES_ON_CUDA["first_block"]` holds, else unfused. Decided once
        per (device, dtype, shape)."""
        return self._fused_impl("first_block", x, (tuple(w.shape), x.requires_grad),
                                lambda: block_supported(x, w, conv.stride, conv.padding,
                                                        self.classifier.max_pooling),
                                "conv_block", block_torch_impl, "the first layer")

    def _bn_pool_impl(self, x: torch.Tensor):
        """The implementation of `bn_pool` (batch norm, leaky ReLU and max pooling as one op,
        mamlpp_fast.ops.bn_pool) for the layer whose convolution output is x, or None for the unfused
        ops. Config key `bn_pool`: "unfused"; "fused" (the Triton kernels where they run, else the
        PyTorch implementation: the same work as unfused); "auto": fused where the Triton kernels run on
        a CUDA device and `AUTO_FUSES_ON_CUDA["bn_pool"]` holds, else unfused. Decided once per (device,
        dtype, shape)."""
        return self._fused_impl("bn_pool", x, (), lambda: bn_pool_supported(x), "bn_pool", bn_pool_torch_impl,
                                f"a {x.shape[2]}x{x.shape[3]} layer")

    def _head_impl(self, x: torch.Tensor, classes: int):
        """The implementation of `head_loss` (mamlpp_fast.ops.head) for features x, or None for the
        unfused ops (config key `head`, as `_bn_pool_impl`, with `AUTO_FUSES_ON_CUDA["head"]`; `_head`)."""
        return self._fused_impl("head", x, (classes,), lambda: head_supported(x.shape[0], classes), "head",
                                head_torch_impl, "the head")

    def _fused_impl(self, key: str, x: torch.Tensor, extra: tuple, why_not, triton_module: str, torch_impl,
                    what: str):
        """Shared decision of `_first_block_impl` and `_bn_pool_impl`: config key `key`, cached per
        (mode, device, dtype, shape, extra); `why_not()` is None where the fused op takes the call."""
        mode = getattr(self.args, key, "auto")
        if mode == "unfused":
            return None
        ck = (key, mode, x.device, x.dtype, tuple(x.shape)) + extra
        cache = self.__dict__.setdefault(f"_{key}_cache", {})
        if ck in cache:
            return cache[ck]
        why = why_not()
        impl = None
        if why is None:
            import importlib

            from . import triton as tb
            from .ops import get_backend
            triton_ok = (x.dtype in (torch.float32, torch.float64) and tb.is_available()
                         and (x.device.type == "cuda" or (x.device.type == "cpu" and tb._interpret()))
                         and get_backend(self._op_backend, x.device).name != "torch")
            if triton_ok:
                impl = importlib.import_module(f".triton.{triton_module}", __package__)
                if mode == "fused" and x.device.type == "cuda" and not AUTO_FUSES_ON_CUDA[key]:
                    warnings.warn(f"{key}='fused': its Triton kernels have not yet passed their tests on a "
                                  f"CUDA device (mamlpp_fast.fast.AUTO_FUSES_ON_CUDA[{key!r}]); results may be "
                                  "wrong", stacklevel=4)
            elif mode == "fused":
                impl = torch_impl
            if mode == "auto" and (x.device.type != "cuda" or not AUTO_FUSES_ON_CUDA[key]):
                impl = None
        elif mode == "fused":
            warnings.warn(f"{key}='fused': {what} runs unfused: {why}", stacklevel=4)
        cache[ck] = impl
        return impl

    def _importance(self) -> torch.Tensor:
        """The MSL weights of the current epoch on the device, computed once per epoch (with a host copy
        for the returned losses, so that reporting them costs no device-to-host transfer)."""
        if self._importance_cache is None or self._importance_cache[0] != self.current_epoch:
            weights = self.get_per_step_loss_importance_vector()
            self._importance_cache = (self.current_epoch, weights, list(weights.cpu().numpy()))
        return self._importance_cache[1]

    @torch.no_grad()
    def _update_running_stats(self, pending: dict) -> None:
        """Apply the closed form of the reference's sequential momentum updates to every (layer, step) row
        of a meta-update at once. pending[(layer, step)] = list of (mean (B*C,), invstd (B*C,), M) per
        forward, in the order the reference visits them within each task (support, then target).

        With G rows, E forwards and B tasks: the E means and inverse stds are stacked in one tensor,
        the inverse stds turned into biased variances in place, and one batched matmul with the
        closed-form weights ((2, G, E*B) @ (2, E*B, C): means, and variances with the unbiasing factor
        M/(M-1) folded into their weights) gives every row's weighted sum; the old rows (stacked once)
        are added with their decay and written back by one multi-tensor copy: 7 kernels per
        meta-update instead of ~17 per row (340 for Omniglot's 20 rows). Where the Triton kernels run
        (a CUDA device, or the interpreter under the Triton op backend: `running_stats_launcher`) the
        same closed form is ONE launch that reads every forward's statistics in place and writes the
        rows (mamlpp_fast.triton.running_stats). The weights depend only on the
        structure (rows, forwards per row, M, B), so they are built on the host once per structure and
        cached on the device (never inside a CUDA-graph capture: the uncaptured warm-up meta-update
        builds them; a structure first seen during a capture takes the per-row form)."""
        groups = list(pending.items())
        if not groups:
            return
        first = groups[0][1][0][0]
        norms = [self.classifier.layer_dict[f"conv{layer}"].norm_layer for (layer, _), _ in groups]
        c = norms[0].running_mean.shape[-1]
        if any(n.running_mean.shape[-1] != c for n in norms):
            return self._update_running_stats_rows(pending)
        b = first.numel() // c
        structure = tuple((lk, tuple(e[2] for e in ents)) for lk, ents in groups)
        cache = self.__dict__.setdefault("_running_stats_consts", {})
        launch = running_stats_launcher(first, self._op_backend)
        if launch is not None and all(n.running_mean.dtype == first.dtype == n.running_var.dtype for n in norms) \
                and all(t.is_contiguous() and t.numel() == b * c and t.dtype == first.dtype
                        for _, ents in groups for e in ents for t in e[:2]):
            key = ("triton", structure, b, first.dtype, first.device)
            consts = cache.get(key)
            if consts is None:
                if first.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    return self._update_running_stats_rows(pending)
                consts = cache[key] = self._running_stats_kernel_constants(groups, b, first.dtype, first.device)
            weights, decays, row_of = consts
            flat = [e for _, ents in groups for e in ents]
            launch([e[0] for e in flat], [e[1] for e in flat],
                   [n.running_mean[step] for n, ((_, step), _) in zip(norms, groups)],
                   [n.running_var[step] for n, ((_, step), _) in zip(norms, groups)], weights, decays, row_of)
            return None
        key = (structure, b, first.dtype, first.device)
        consts = cache.get(key)
        if consts is None:
            if first.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return self._update_running_stats_rows(pending)
            consts = cache[key] = self._running_stats_constants(groups, b, first.dtype, first.device)
        weights, decay = consts
        flat = [e for _, ents in groups for e in ents]
        e_count = len(flat)
        stats = torch.stack([e[0] for e in flat] + [e[1] for e in flat])  # (2E, B*C): means, inverse stds
        stats[e_count:].pow_(-2).sub_(BN_EPS)                              # biased variances
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # statistics in full precision even with allow_tf32
        try:
            sums = torch.bmm(weights, stats.view(2, e_count * b, c))       # (2, G, C)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        rows = [n.running_mean[step] for n, ((_, step), _) in zip(norms, groups)]
        rows += [n.running_var[step] for n, ((_, step), _) in zip(norms, groups)]
        new = torch.addcmul(sums, torch.stack(rows).view(2, len(groups), c).to(sums.dtype), decay)
        torch._foreach_copy_(rows, list(new.view(2 * len(groups), c).unbind(0)))

    @staticmethod
    def _running_stats_kernel_constants(groups, b: int, dtype, device):
        """(weights (2, E, b), decays and eps (G + 1,), row of each forward) of the one-launch update
        (triton.running_stats `running_stats_weights`) for this structure, built on the host."""
        from .triton.running_stats import running_stats_weights
        return running_stats_weights([[e[2] for e in ents] for _, ents in groups], b, BN_MOMENTUM, BN_EPS,
                                     dtype, device)

    @staticmethod
    def _running_stats_constants(groups, b: int, dtype, device):
        """(weights (2, G, E*B), decay (G, 1)) of `_update_running_stats` for this structure. Row g with P
        forwards holds K = B*P values in the reference's order j = t*P + p (task t, forward p); value j
        gets m (1-m)^(K-1-j) (times M/(M-1) of its forward for the variances), the old row (1-m)^K.
        Built from Python lists (no device work but the copies)."""
        m = BN_MOMENTUM
        e_count = sum(len(ents) for _, ents in groups)
        w_mean = [[0.0] * (e_count * b) for _ in groups]
        w_var = [[0.0] * (e_count * b) for _ in groups]
        decay = []
        row = 0
        for g, (_, ents) in enumerate(groups):
            p_count = len(ents)
            k = b * p_count
            for p, (_, _, count) in enumerate(ents):
                for t in range(b):
                    coef = m * (1.0 - m) ** (k - 1 - (t * p_count + p))
                    w_mean[g][(row + p) * b + t] = coef
                    w_var[g][(row + p) * b + t] = coef * (count / (count - 1))
            decay.append([(1.0 - m) ** k])
            row += p_count
        weights = torch.tensor([w_mean, w_var], dtype=torch.float64)
        return weights.to(device, dtype), torch.tensor(decay, dtype=torch.float64).to(device, dtype)

    @torch.no_grad()
    def _update_running_stats_rows(self, pending: dict) -> None:
        """The same closed form, one (layer, step) row at a time (no host-built constants: usable inside a
        CUDA-graph capture, and for layers of different widths)."""
        m = BN_MOMENTUM
        for (layer, step), entries in pending.items():
            norm = self.classifier.layer_dict[f"conv{layer}"].norm_layer
            c = norm.running_mean.shape[-1]
            means = torch.stack([e[0].view(-1, c) for e in entries], dim=1)  # (B, P, C)
            vars_ = torch.stack([(e[1].view(-1, c).pow(-2) - BN_EPS) * (e[2] / (e[2] - 1)) for e in entries], dim=1)
            k = means.shape[0] * means.shape[1]
            # coef_j = m (1-m)^(K-1-j) for the j-th value in the reference's order (0-based)
            expo = torch.arange(k - 1, -1, -1, device=means.device, dtype=means.dtype)
            coef = m * torch.pow(1.0 - m, expo)  # scalar base: no host-to-device copy (graph-safe)
            decay = (1.0 - m) ** k
            rm, rv = norm.running_mean[step], norm.running_var[step]
            rm.mul_(decay).add_(coef @ means.reshape(k, c))
            rv.mul_(decay).add_(coef @ vars_.reshape(k, c))

    # -- the outer forward -------------------------------------------------------------------------------
    def _forward_tensors(self, data_batch, epoch, use_second_order, use_multi_step_loss_optimization, num_steps,
                         training_phase, importance, target_grad=True):
        """The batched MAML++ outer forward, device tensors only (no host synchronisation, so that it can
        be captured in a CUDA graph). Returns (loss with graph, accuracy 0-d tensor, target logits
        (B, n_t, N) detached). `target_grad=False` runs the target passes without autograd (same values,
        no graph kept: what evaluation needs, with much less memory)."""
        x_support, x_target, y_support, y_target = data_batch
        b = x_support.shape[0]
        # contiguous once here: with one input channel the task-major view is not, and the first layer's
        # ops would each copy it
        xs, xt = _task_major(x_support).contiguous(), _task_major(x_target).contiguous()
        ys, yt = y_support.reshape(-1), y_target.reshape(-1)  # task-major, matching logits (B, n, N)
        s_train = self.args.number_of_training_steps_per_iter
        use_msl = (use_multi_step_loss_optimization and training_phase
                   and epoch < self.args.multi_step_loss_num_epochs)
        final_step = min(num_steps, s_train) - 1
        last = num_steps - 1 if use_msl else final_step
        track = any(n.per_step for n in self.classifier.norm_layers()) and (
            training_phase or self.args.bn_backup_aliasing)
        pending: dict = {}

        params = dict(self.classifier.named_parameters())
        lrs = self.inner_loop_optimizer.names_learning_rates_dict
        names = self._adapted_names
        meta = [params[k] for k in names]
        # the learning rates as the rows of one (L, S+1) tensor: their gradients over the steps add up as
        # one table per step rather than L vectors (ops.lslr `_StackedRates`)
        rates = [lrs[k.replace(".", "-")] for k in names]
        alphas = torch.stack(rates) if len({tuple(r.shape) for r in rates}) == 1 else rates
        # Every fast weight is read by several uses: this step's target pass, the next step's support pass,
        # the node its backward builds for the second-order derivative (which reads the weight again),
        # and the next LSLR update. Each use reads its own alias from one `fanout` node per step, which
        # sums their gradients in one multi-tensor addition per use instead of autograd's addition per
        # tensor and use; the per-step BN rows likewise (`_bn_rows`), and step 0's meta-parameters.
        rows_support, rows_target, rows_saved = self._bn_rows(2, saved=True)
        grad_on = torch.is_grad_enabled() and meta[0].requires_grad
        meta_lslr = meta
        if grad_on:
            meta, meta_lslr = fanout(2, meta)
        # step 0's fast weights: the meta-parameters for every task (their task sums in one node)
        fast_list = expand_tasks(b, meta)
        # the learning-rate table is read once per step: its gradients summed by one fan-out node
        if grad_on and isinstance(alphas, torch.Tensor) and alphas.requires_grad:
            alpha_uses = [use[0] for use in fanout(last + 1, [alphas])]
        else:
            alpha_uses = [alphas] * (last + 1)
        support_list, saved_list = fanout(2, fast_list) if grad_on else (fast_list, fast_list)
        cache_support, cache_target = {}, {}  # the fused first block's image terms, per image set
        theta_list = meta_lslr
        loss = None
        target_logits = None
        one = None
        for step in range(last + 1):
            fast = dict(zip(names, support_list))
            stats = [] if track else None
            feats = self._net(xs, b, step, fast, stats, "second_order" if use_second_order else "first_order",
                              rows_support, (dict(zip(names, saved_list)), rows_saved), cache_support)
            support_loss, _ = self._head(feats, b, fast, ys, support=True)
            if one is None:  # the seed of every support gradient: one fill per outer forward, not per step
                one = self.core.ones(support_loss)
            grads = torch.autograd.grad(support_loss, support_list, grad_outputs=one,
                                        create_graph=use_second_order)
            fast_list = lslr_update(theta_list, list(grads), alpha_uses[step], step, backend=self._op_backend)
            if track:
                for layer, mean, invstd, m in stats:
                    pending.setdefault((layer, step), []).append((mean, invstd, m))
            with_target = use_msl or step == final_step
            nxt = step < last
            uses = [with_target, nxt, nxt, nxt]  # target pass, next support pass, its backward, next LSLR
            if sum(uses) >= 2 and fast_list[0].requires_grad:
                aliases = iter(fanout(sum(uses), fast_list))
                target_list, support_list, saved_list, theta_list = (next(aliases) if u else None for u in uses)
            else:
                target_list = support_list = saved_list = theta_list = fast_list
            if with_target:
                stats = [] if track else None
                with torch.set_grad_enabled(target_grad and torch.is_grad_enabled()):
                    fast = dict(zip(names, target_list))
                    feats = self._net(xt, b, step, fast, stats, rows=rows_target, image_cache=cache_target)
                    loss, target_logits = self._head(feats, b, fast, yt, support=False,
                                                     weight=importance[step] if use_msl else None, prev=loss)
                if track:
                    for layer, mean, invstd, m in stats:
                        pending.setdefault((layer, step), []).append((mean, invstd, m))
        if pending:
            self._update_running_stats(self.core.reduce_statistics(pending))
        preds = target_logits.detach()
        launch = accuracy_launcher(preds, self._op_backend)
        if launch is not None:
            accuracy = launch(preds, y_target)
        else:
            accuracy = preds.argmax(-1).eq(y_target.reshape(b, -1)).to(torch.float32).mean()
        return loss, accuracy, preds

    def _host_losses(self, loss, accuracy, preds, importance, finite=None):
        """Copy the metrics to the host: one device-to-host transfer (the finiteness flag when given, the
        loss, the accuracy and the target logits packed together), the one synchronisation of a
        meta-update. `importance` must be the tensor of `_importance()`, whose host copy is cached.

        Without `finite`, losses['loss'] is `loss` itself (with its graph, as forward() returns it);
        with it, a host 0-d tensor of the loss, and the result is (losses, preds, finite as a bool)."""
        head = [] if finite is None else [finite.reshape(1).to(preds.dtype)]
        head += [loss.detach().reshape(1).to(preds.dtype), accuracy.reshape(1).to(preds.dtype)]
        packed = torch.cat(head + [preds.reshape(-1)]).cpu().numpy()
        k = len(head)
        preds_np = packed[k:].reshape(tuple(preds.shape))
        host_loss = torch.from_numpy(packed[k - 2:k - 1].copy()).reshape(())
        losses = {"loss": loss if finite is None else host_loss, "accuracy": float(packed[k - 1])}
        for i, item in enumerate(self._importance_cache[2]):
            losses[f"loss_importance_vector_{i}"] = item
        preds_list = [preds_np[t] for t in range(preds_np.shape[0])]
        if finite is None:
            return losses, preds_list
        return losses, preds_list, bool(packed[0])

    def forward(self, data_batch, epoch, use_second_order, use_multi_step_loss_optimization, num_steps,
                training_phase):
        """All tasks at once; returns (losses, per_task_target_preds) exactly as the reference."""
        importance = self._importance()
        loss, accuracy, preds = self._forward_tensors(data_batch, epoch, use_second_order,
                                                      use_multi_step_loss_optimization, num_steps,
                                                      training_phase, importance)
        return self._host_losses(loss, accuracy, preds, importance)

    def train_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch, **self.core.train_phase(epoch))

    def evaluation_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch, **self.core.evaluation_phase())

    # -- CUDA-graph capture of the whole meta-update ------------------------------------------------------
    supports_cuda_graph = True

    def _graph_mode(self) -> bool:
        """Config key `cuda_graph` on a CUDA device, and no reduction over processes installed (its
        collectives cannot be captured)."""
        return (bool(getattr(self.args, "cuda_graph", False)) and self.device.type == "cuda"
                and self.core.reducer is None)

    def _train_step_tensors(self, data, epoch, importance):
        """Forward, outer backward, imagenet clamp and the finiteness flag, on device tensors only
        (the Adam step is separate, so that a non-finite update can be withheld)."""
        core = self.core
        core.optimizer.zero_grad(set_to_none=True)
        stats = core.snapshot_running_stats()
        phase = core.train_phase(epoch)
        loss, accuracy, preds = self._forward_tensors(
            data, epoch, phase["use_second_order"], phase["use_multi_step_loss_optimization"], phase["num_steps"],
            True, importance)
        core.backward(loss)
        return loss.detach(), accuracy, preds, core.finite_flag(loss), stats

    def run_train_iter(self, data_batch, epoch):
        """One meta-update on a batch of tasks. Returns (losses, per-task target logits).

        With the config key `cuda_graph` (on by default) on a CUDA device, the whole update (inner loop,
        outer backward, Adam step) is captured once per batch shape and MAML++ phase (MSL on/off,
        first/second order) and replayed, the graph of the latest phase only; the first call of each
        phase runs uncaptured (warm-up) and a capture that fails falls back to uncaptured updates with
        one warning. Two graphs are replayed:
        forward/backward (with a device-side finiteness flag), then, if the flag is set, the Adam step.
        Otherwise one uncaptured update runs with a single device-to-host transfer (`_eager_train_iter`),
        or, when a reducer is installed (data parallelism: metrics, gradients and statistics are reduced
        over the ranks), the core's plain meta-update (LearnerCore.train_iter) with this learner's forward."""
        if not self._graph_mode() or self._graph_failed is not None:
            if self.core.reducer is not None:
                return self.core.train_iter(data_batch, epoch)
            with self.core.precision():
                return self._eager_train_iter(data_batch, epoch)
        with self.core.precision():
            return self._graph_train_iter(data_batch, epoch)

    def _graph_train_iter(self, data_batch, epoch):
        core = self.core
        epoch = int(epoch)
        lr = core.begin_train_iter(epoch)
        data = core.batch(data_batch)
        importance = self._importance()
        key = (tuple(t.shape for t in data), self.args.second_order and epoch > self.args.first_order_to_second_order_epoch,
               self.args.use_multi_step_loss_optimization and epoch < self.args.multi_step_loss_num_epochs)
        entry = self._graphs.get(key)
        if entry is None:
            # A new phase: the graphs of the others go (each holds its private pool, the update's
            # activations): the phase follows the epoch, which only grows in a run, so an earlier phase
            # does not come back, and one that did would be captured again. Dropped once their last replay
            # (the Adam step may still run) has finished: their pools then hold nothing in flight.
            if self._graphs:
                torch.cuda.synchronize(self.device)
                self._graphs.clear()
            # Warm-up on a side stream (a real update), then capture for the next calls of this phase.
            side = self._capture_stream()
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss, accuracy, preds, finite, stats = self._train_step_tensors(data, epoch, importance)
                ok = bool(finite)
                if ok:
                    core.optimizer.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            if not ok:
                core.restore_running_stats(stats)
                core.handle_nonfinite(loss, data, epoch)
            losses, preds_list, _ = self._host_losses(loss, accuracy, preds, importance, finite)
            self._capture(key, data, epoch, importance)
        else:
            graph, step_graph, static_in, static_imp, outs = entry
            for dst, src in zip(static_in, data):
                dst.copy_(src, non_blocking=True)
            static_imp.copy_(importance, non_blocking=True)
            graph.replay()
            loss, accuracy, preds, finite, stats = outs
            # the one host synchronisation of a captured meta-update: flag and metrics in one transfer
            losses, preds_list, ok = self._host_losses(loss, accuracy, preds, importance, finite)
            if ok:
                step_graph.replay()
            else:
                core.restore_running_stats(stats)
                core.handle_nonfinite(loss, data, epoch)
        losses["learning_rate"] = lr
        losses["skipped"] = not ok
        return losses, preds_list

    def _eager_train_iter(self, data_batch, epoch):
        """One uncaptured meta-update (the core's train_iter steps: forward, backward, imagenet clamp,
        finiteness check, Adam step or skip) with a single device-to-host transfer: the finiteness flag
        travels with the metrics, and the Adam step is queued after that transfer."""
        core = self.core
        epoch = int(epoch)
        lr = core.begin_train_iter(epoch)
        data = core.batch(data_batch)
        importance = self._importance()
        loss, accuracy, preds, finite, stats = self._train_step_tensors(data, epoch, importance)
        losses, preds_list, ok = self._host_losses(loss, accuracy, preds, importance, finite)
        if ok:
            core.optimizer.step()
        else:
            core.restore_running_stats(stats)
            core.handle_nonfinite(loss, data, epoch)
        core.optimizer.zero_grad()
        losses["learning_rate"] = lr
        losses["skipped"] = not ok
        return losses, preds_list

    # -- evaluation without host transfers -----------------------------------------------------------
    def evaluation_logits(self, data_batch):
        """What run_validation_iter computes, left on the device: (target logits (B, n_t, N), y_target
        (B, N, T) int64), no host transfer and no autograd graph of the target passes.

        Batch statistics are per task and every other operation is per task, so a task's logits do not
        depend on the other tasks of the call: evaluation may group tasks freely (config key
        `evaluation_batch_size`; only the rounding of a differently shaped kernel can differ). The
        BN running statistics are not touched unless `bn_backup_aliasing` is set (then the trainer
        keeps the original's grouping)."""
        if self.training:
            self.eval()
        data = self._batch(data_batch)
        with self._precision():
            _, _, preds = self._forward_tensors(data, self.current_epoch, False, True,
                                                self.args.number_of_evaluation_steps_per_iter, False,
                                                self._importance(), target_grad=False)
        return preds, data[3]

    @staticmethod
    def evaluation_metrics(preds, y_target):
        """(loss, accuracy) 0-d device tensors of a batch of tasks from its target logits, computed as
        run_validation_iter computes them for that batch (mean cross-entropy over all its targets, and
        the fraction of correct targets in float32)."""
        b, n_way = preds.shape[0], preds.shape[-1]
        loss = F.cross_entropy(preds.reshape(-1, n_way), y_target.reshape(-1))
        accuracy = preds.argmax(-1).eq(y_target.reshape(b, -1)).to(torch.float32).mean()
        return loss, accuracy

    @staticmethod
    def _static_inputs(data) -> list:
        """The buffers a captured update reads its batch from (the host copies each batch into them
        before a replay): the labels as clones, the (B, N, K, C, H, W) images in the storage order of
        their task-major form (`_task_major`: (N*K, B*C, H, W) contiguous), so that the captured
        forward's `_task_major(x).contiguous()` is a view, not a copy kernel; the copy into the buffer,
        which runs anyway, lays the images out."""
        out = []
        for t in data:
            if t.dim() == 6:
                b, n, k, c, h, w = t.shape
                buf = torch.empty((n * k, b, c, h, w), dtype=t.dtype, device=t.device)
                out.append(buf.transpose(0, 1).view(b, n, k, c, h, w).copy_(t))
            else:
                out.append(t.clone())
        return out

    def _capture_stream(self):
        """The stream the warm-up updates run on and the graphs are captured on: one, so that the
        launchers' per-stream buffers that the warm-up made and cached (`triton._device._tile_counters`,
        the tickets of the kernels that elect a last program; those of the conv_streams side stream of
        this stream) are the ones the capture finds. On a stream the warm-up never ran on, each such
        launch allocated and zeroed a buffer inside the graph (one more node each)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def _capture(self, key, data, epoch, importance) -> None:
        static_in = self._static_inputs(data)
        static_imp = importance.clone()
        graph = torch.cuda.CUDAGraph()
        step_graph = torch.cuda.CUDAGraph()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            stream = self._capture_stream()
            with torch.cuda.graph(graph, stream=stream):
                outs = self._train_step_tensors(static_in, epoch, static_imp)
            with torch.cuda.graph(step_graph, pool=graph.pool(), stream=stream):
                self.optimizer.step()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run uncaptured
            self._graph_failed = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize(self.device)
            warnings.warn(f"CUDA-graph capture of the meta-update failed ({self._graph_failed}); "
                          "continuing with uncaptured meta-updates", RuntimeWarning, stacklevel=3)
            return
        self._graphs[key] = (graph, step_graph, static_in, static_imp, outs)
