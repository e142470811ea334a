"""Analytic FLOP count of one MAML++ meta-update (conv and linear layers only).

What is counted, and why it matches `torch.utils.flop_counter.FlopCounterMode`:
FlopCounterMode counts only matrix-type aten ops (convolution, convolution_backward, mm, addmm, bmm,
baddbmm, ...), 2 FLOPs per multiply-add, no bias adds; batch norm, leaky ReLU, pooling, softmax /
cross-entropy, the LSLR update and Adam are element-wise and are not counted. This module counts the
same thing, from the shapes alone.

Notation. For a layer l (conv3x3 or the final linear layer) let F_l(n) be the FLOPs of its forward
on n examples: conv: 2 * n * C_out * C_in * 9 * H_out * W_out; linear: 2 * n * in * out. Layer 0 is
the first convolution: its input is data, so no gradient w.r.t. its input is ever needed.

One inner step s of one task, second order (create_graph=True), n_s support and n_t target examples:

  support forward                         F_l(n_s)                      every layer
  inner gradient (autograd.grad,          F_l(n_s) (dL/dW)              every layer
    create_graph=True)                    + F_l(n_s) (dL/dx)            l >= 1
  target forward (MSL: every step)        F_l(n_t)
  outer backward through the target       F_l(n_t) (dW) + F_l(n_t) (dx, l >= 1)
    forward
  outer backward through the inner        for a layer with y = conv(x, W), gW = corr(x, gy),
    gradient (the double backward)        gx = convT(gy, W) and incoming cotangents ggW, ggx:
                                            d gy = conv(ggx, W) + conv(x, ggW)   2 F (1 F at l = 0)
                                            d W  = corr(ggx, gy)                 1 F (l >= 1)
                                            d x  = convT(gy, ggW)                1 F (l >= 1)
  outer backward through the support      F_l(n_s) (dW) + F_l(n_s) (dx, l >= 1)
    forward

So per step: support F_l(n_s) x 9 for l >= 1 and x 4 for l = 0 (the necessary work); target
F_l(n_t) x 3 for l >= 1 and x 2 for l = 0. PyTorch's convolution double backward
(`_convolution_double_backward`) also computes d x = convT(gy, ggW) at layer 0, whose input is data and
needs no gradient: one extra F_0(n_s) per step, which FlopCounterMode sees and counts. With strided
convolutions (max_pooling False) the double backward's d W is run as a convolution dilated by the
stride whose output is larger than 3x3 and then narrowed (see Layer.dbl_dw_per_example); the paper's
configurations use stride 1, where this term is exactly F. `count_flops` returns both: `total` (what
PyTorch executes, = FlopCounterMode) and `minimal` (without those extra terms). Linear layers need no
correction (their double backward is mm's, which honours the mask).

First order (second_order False or epoch <= first_order_to_second_order_epoch): the inner gradients
are constants for the outer backward: support = forward + inner gradient (x 3 for l >= 1, x 2 for l = 0),
no double backward, no outer backward through the support forward. Without MSL (or after
multi_step_loss_num_epochs) only the last step's target forward enters the loss.

The total is multiplied by the meta-batch size B (tasks are independent; the fast learner's grouped
convolutions and batched matmuls do exactly the same multiply-adds).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Layer", "network_layers", "count_flops", "flops_from_args", "measure_flops"]


@dataclass(frozen=True)
class Layer:
    """A conv3x3 or linear layer; `per_example` = FLOPs of its forward on one example."""
    name: str
    kind: str  # "conv" | "linear"
    per_example: int
    first: bool  # True for the layer whose input is the data
    # FLOPs per example of the double backward's d W = corr(ggx, gy) as PyTorch runs it. Equal to
    # per_example for stride 1; for stride s > 1 PyTorch computes it as a convolution dilated by s
    # whose output (K x K') is larger than the 3x3 kernel and then narrowed: K = H_in + 2p - s (H_out - 1).
    dbl_dw_per_example: int = -1

    def __post_init__(self):
        if self.dbl_dw_per_example < 0:
            object.__setattr__(self, "dbl_dw_per_example", self.per_example)


def _conv_out(h: int, stride: int, padding: int, k: int = 3) -> int:
    return (h + 2 * padding - k) // stride + 1


def network_layers(image_channels: int, image_height: int, image_width: int, num_filters: int, num_stages: int,
                   num_classes: int, max_pooling: bool = True, conv_padding: int = 1) -> list[Layer]:
    """Layers of the original's VGGReLUNormNetwork with their per-example forward FLOPs."""
    stride = 1 if max_pooling else 2
    pad = int(conv_padding)
    c, h, w = int(image_channels), int(image_height), int(image_width)
    layers = []
    for i in range(int(num_stages)):
        ho, wo = _conv_out(h, stride, pad), _conv_out(w, stride, pad)
        kh, kw = h + 2 * pad - stride * (ho - 1), w + 2 * pad - stride * (wo - 1)
        layers.append(Layer(f"conv{i}", "conv", 2 * num_filters * c * 9 * ho * wo, i == 0,
                            2 * num_filters * c * kh * kw * ho * wo))
        c, h, w = num_filters, ho, wo
        if max_pooling:
            h, w = h // 2, w // 2
    if not max_pooling:  # global average pooling
        h = w = 1
    features = c * h * w
    layers.append(Layer("linear", "linear", 2 * features * num_classes, num_stages == 0))
    return layers


def count_flops(layers: list[Layer], n_support: int, n_target: int, num_steps: int, batch_size: int,
                second_order: bool = True, msl: bool = True) -> dict[str, Any]:
    """FLOPs of one meta-update of `batch_size` tasks.

    n_support = N*K and n_target = N*T examples per task. Returns a dict: `total` (what PyTorch
    executes; equals FlopCounterMode), `minimal` (the necessary multiply-adds: without the layer-0 input
    gradient that PyTorch's conv double backward computes needlessly, and without the padding of its
    dilated d W convolution for strided convs), and the parts `support`, `target`, `pytorch_extra`.
    """
    support = target = wasted = 0
    target_steps = num_steps if msl else 1
    for layer in layers:
        fs, ft = layer.per_example * n_support, layer.per_example * n_target
        if second_order:
            # fwd 1 + inner dW 1 + inner dx 1 + double backward 4 + outer backward dW 1 + dx 1
            support += fs * (4 if layer.first else 9)
            if layer.first and layer.kind == "conv":
                wasted += fs
            if not layer.first:  # strided convs: PyTorch's dilated form of the double backward's d W
                wasted += (layer.dbl_dw_per_example - layer.per_example) * n_support
        else:
            support += fs * (2 if layer.first else 3)  # fwd + inner dW (+ inner dx)
        target += ft * (2 if layer.first else 3)  # fwd + outer dW (+ outer dx)
    support *= num_steps * batch_size
    target *= target_steps * batch_size
    wasted *= num_steps * batch_size
    minimal = support + target
    return {"total": minimal + wasted, "minimal": minimal, "support": support, "target": target,
            "pytorch_extra": wasted}


def flops_from_args(args: Any, batch_size: int | None = None, epoch: int = 0) -> dict[str, Any]:
    """count_flops for a config Namespace (mamlpp_fast.config) at `epoch` of meta-training."""
    layers = network_layers(args.image_channels, args.image_height, args.image_width, args.cnn_num_filters,
                            args.num_stages, args.num_classes_per_set, bool(args.max_pooling),
                            int(args.conv_padding))
    n = args.num_classes_per_set
    second = bool(args.second_order) and epoch > args.first_order_to_second_order_epoch
    msl = bool(args.use_multi_step_loss_optimization) and epoch < args.multi_step_loss_num_epochs
    return count_flops(layers, n * args.num_samples_per_class, n * args.num_target_samples,
                       args.number_of_training_steps_per_iter,
                       args.batch_size if batch_size is None else batch_size, second, msl)


class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker, whose module hooks make torch.autograd.grad
    raise "A leaf node was passed to _will_engine_execute_node" (pytorch issue #131753, open since
    torch 2.4). Counting is unchanged: every op is attributed to 'Global' only."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _conv_backward_flop_grouped(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's convolution_backward formula with the weight-gradient term divided by `groups`.

    torch's formula (torch/utils/flop_counter.py, conv_backward_flop, up to at least 2.13) computes the
    weight-gradient term from the transposed input and grad_output shapes, which lose the division by groups:
    a grouped convolution's dW is counted `groups` times (measured: groups=8, 64 channels per group, 8x).
    pytorch PR #183405 makes the same correction. Used only with fix_grouped_conv_backward=True."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flop = 0
    if output_mask[0]:  # grad_input, as torch counts it
        flop += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight, as torch counts it, then / groups
        if transposed:
            dw = conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), transposed=False)
        else:
            dw = conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), transposed=False)
        flop += dw // groups
    return flop


def measure_flops(fn: Callable[[], Any], fix_grouped_conv_backward: bool = False) -> dict[str, Any]:
    """Run fn() under torch.utils.flop_counter.FlopCounterMode; returns {'total': int, 'by_op': {op: int},
    'counter': how it was counted}.

    FlopCounterMode's module tracker is replaced by a no-op (see _NoModuleTracker). If this torch's
    FlopCounterMode has no `mod_tracker` attribute, it is used as is. fix_grouped_conv_backward: count
    grouped convolutions' weight gradients correctly (see _conv_backward_flop_grouped); needed for the fast
    learner (groups = tasks), a no-op for the reference (groups = 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    how = "FlopCounterMode"
    if fix_grouped_conv_backward:
        counter = FlopCounterMode(display=False,
                                  custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop_grouped})
        how += " with grouped-conv dW formula fixed"
    else:
        counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracker()
        how += " (module tracker disabled, pytorch#131753)"
    with counter:
        fn()
    by_op = defaultdict(int)
    for op, v in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] += int(v)
    return {"total": int(counter.get_total_flops()), "by_op": dict(by_op), "counter": how}



def reference_flops(workload, device: str = "cpu", learner: str = "reference") -> dict[str, Any]:
    """FlopCounterMode's count of one meta-update (run_train_iter at epoch 0) of the reference (or fast)
    learner on `workload` (bench.workloads.Workload), next to the analytic count."""
    import torch
    from .workloads import im_shape, make_args, make_batch
    args = make_args(workload)
    if learner == "reference":
        from mamlpp_fast.reference import MAMLFewShotClassifier
    else:
        from mamlpp_fast.fast import MAMLFewShotClassifier
    model = MAMLFewShotClassifier(im_shape(workload), device, args)
    batch = make_batch(workload, device, torch.float32)
    measured = measure_flops(lambda: model.run_train_iter(batch, 0))
    fixed = measure_flops(lambda: model.run_train_iter(batch, 0), fix_grouped_conv_backward=True)
    analytic = flops_from_args(args, epoch=0)
    return {"workload": workload.name, "learner": learner, "flop_counter_mode": measured["total"],
            "flop_counter_mode_grouped_fix": fixed["total"], "equal_with_grouped_fix": fixed["total"] == analytic["total"],
            "by_op": measured["by_op"], "counter": measured["counter"], "analytic_total": analytic["total"],
            "analytic_minimal": analytic["minimal"], "analytic_pytorch_extra": analytic["pytorch_extra"],
            "equal": measured["total"] == analytic["total"], "torch": torch.__version__}


def main(argv=None) -> int:
    """python -m bench.flops [--measure] [--learner reference|fast] [--workloads a,b] [--out FILE]:
    print the analytic count per workload and, with --measure, FlopCounterMode's count of one
    meta-update (slow on a CPU: one full second-order meta-update per workload)."""
    import argparse
    import json
    import sys
    from .workloads import MAIN, make_args, workload_by_name
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=main.__doc__)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--learner", default="reference", choices=("reference", "fast"))
    p.add_argument("--workloads", default=",".join(w.name for w in MAIN[:3:2]))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    rows = []
    for name in a.workloads.split(","):
        w = workload_by_name(name)
        if a.measure:
            row = reference_flops(w, a.device, a.learner)
        else:
            an = flops_from_args(make_args(w), epoch=0)
            row = {"workload": w.name, "analytic_total": an["total"], "analytic_minimal": an["minimal"],
                   "analytic_pytorch_extra": an["pytorch_extra"]}
        row["command"] = "python -m bench.flops " + " ".join(sys.argv[1:] if argv is None else argv)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
