"""MAML++ meta-update written the standard torch.func way: functional_call + grad + vmap over tasks.

This is the baseline a PyTorch user would write to batch MAML over tasks (the pattern of functorch's
MAML-Omniglot example, with torch.func.functional_call instead of the deprecated make_functional):

- an ordinary nn.Module network: 4 x (conv3x3 -> batch norm with the current batch's statistics and
  per-step gamma/beta -> leaky ReLU(0.01) -> 2x2 max pool) -> linear, the MAML++ network;
- one task's MAML++ loss as a Python function: for each inner step, `torch.func.grad` of the support
  loss w.r.t. the adapted weights (conv and linear; gamma/beta are meta-learned but not adapted, as in
  the paper's configs), the LSLR update w - alpha[layer][step] * g, and the MSL-weighted target loss
  of the updated weights; all steps differentiable (second order);
- `torch.vmap` of that function over the tasks of the meta-batch, mean over tasks, `.backward()`, the
  original's gradient clamp to [-10, 10] on mini-ImageNet, and `torch.optim.Adam`.

What it does not have: batch-norm running statistics. vmap cannot carry them (in-place updates of
unbatched buffers from batched values raise), and the usual advice drops them; they never influence
the training outputs or gradients (batch norm normalises with batch statistics in training), so the
meta-gradient is the same as the reference learner's (tests/test_bench.py checks it in float64).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

__all__ = ["MAMLNet", "TorchFuncMAMLPP", "reference_name_map"]


class MAMLNet(nn.Module):
    """The MAML++ conv net with per-step batch-norm weights and biases (no running statistics)."""

    def __init__(self, in_channels: int, filters: int, num_classes: int, num_stages: int, num_steps: int,
                 image_hw: tuple[int, int]):
        super().__init__()
        self.convs = nn.ModuleList()
        c, h, w = in_channels, image_hw[0], image_hw[1]
        for _ in range(num_stages):
            conv = nn.Conv2d(c, filters, 3, padding=1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.convs.append(conv)
            c, h, w = filters, h // 2, w // 2
        self.bn_weight = nn.ParameterList([nn.Parameter(torch.ones(num_steps, filters)) for _ in range(num_stages)])
        self.bn_bias = nn.ParameterList([nn.Parameter(torch.zeros(num_steps, filters)) for _ in range(num_stages)])
        self.linear = nn.Linear(c * h * w, num_classes)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        for conv, gamma, beta in zip(self.convs, self.bn_weight, self.bn_bias):
            x = conv(x)
            x = F.batch_norm(x, None, None, gamma[step], beta[step], training=True, eps=1e-5)
            x = F.leaky_relu(x, 0.01)
            x = F.max_pool2d(x, 2, 2)
        return self.linear(x.flatten(1))


def msl_weights(num_steps: int, msl_epochs: int, epoch: int) -> list[float]:
    """MAML++ multi-step loss weights (the paper's annealing; floor 0.03/S as in the authors' code)."""
    decay, floor = 1.0 / num_steps / msl_epochs, 0.03 / num_steps
    w = [max(1.0 / num_steps - epoch * decay, floor) for _ in range(num_steps - 1)]
    w.append(min(1.0 / num_steps + epoch * (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor))
    return w


class TorchFuncMAMLPP:
    """MAML++ meta-learner batched over tasks with torch.func.

    Arguments:
        args: the learners' config Namespace (mamlpp_fast.config); reads the network shape, steps,
            task_learning_rate, meta_learning_rate, multi_step_loss_num_epochs, dataset_name.
        device, dtype: where the parameters live.
    `meta_update(batch, epoch=0)` runs one meta-update on batch = (x_support (B,N,K,C,H,W), x_target,
    y_support (B,N,K), y_target) tensors on the device and returns the meta-loss (detached, no sync).
    """

    def __init__(self, args: Any, device: Any = "cpu", dtype: torch.dtype = torch.float32):
        self.args = args
        self.num_steps = int(args.number_of_training_steps_per_iter)
        self.net = MAMLNet(args.image_channels, args.cnn_num_filters, args.num_classes_per_set, args.num_stages,
                           self.num_steps, (args.image_height, args.image_width)).to(device=device, dtype=dtype)
        # adapted in the inner loop: conv and linear weights and biases
        self.adapted = [n for n, _ in self.net.named_parameters() if n.startswith(("convs.", "linear."))]
        self.lslr = nn.ParameterDict({
            n.replace(".", "-"): nn.Parameter(torch.full((self.num_steps + 1,), float(args.task_learning_rate),
                                                         device=device, dtype=dtype))
            for n in self.adapted})
        self.clamp = "imagenet" in str(args.dataset_name)
        self.optimizer = torch.optim.Adam(list(self.net.parameters()) + list(self.lslr.parameters()),
                                          lr=args.meta_learning_rate)
        self._msl: dict[int, torch.Tensor] = {}
        self.device, self.dtype = torch.device(device), dtype

    def msl(self, epoch: int) -> torch.Tensor:
        if epoch not in self._msl:
            self._msl[epoch] = torch.tensor(msl_weights(self.num_steps, self.args.multi_step_loss_num_epochs, epoch),
                                            device=self.device, dtype=self.dtype)
        return self._msl[epoch]

    def task_loss(self, xs, ys, xt, yt, msl):
        """MAML++ loss of one task (vmapped over tasks): second-order inner loop with LSLR, MSL."""
        net = self.net
        params = dict(net.named_parameters())
        fast = {n: params[n] for n in self.adapted}

        def support_loss(weights, x, y, step):
            return F.cross_entropy(functional_call(net, weights, (x, step)), y)

        loss = 0.0
        for step in range(self.num_steps):
            grads = grad(support_loss)(fast, xs, ys, step)
            fast = {n: w - self.lslr[n.replace(".", "-")][step] * grads[n] for n, w in fast.items()}
            loss = loss + msl[step] * F.cross_entropy(functional_call(net, fast, (xt, step)), yt)
        return loss

    def loss(self, batch, epoch: int = 0) -> torch.Tensor:
        xs, xt, ys, yt = batch
        b = xs.shape[0]
        xs, xt = xs.reshape(b, -1, *xs.shape[-3:]), xt.reshape(b, -1, *xt.shape[-3:])
        ys, yt = ys.reshape(b, -1), yt.reshape(b, -1)
        msl = self.msl(epoch)
        return vmap(self.task_loss, in_dims=(0, 0, 0, 0, None))(xs, ys, xt, yt, msl).mean()

    def meta_update(self, batch, epoch: int = 0) -> torch.Tensor:
        loss = self.loss(batch, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clamp:  # the original clamps the network's gradients on mini-ImageNet
            for p in self.net.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-10, 10)
        self.optimizer.step()
        return loss.detach()

    # -- mapping to the reference learner (tests) ------------------------------------------------------
    def named_parameters(self):
        yield from self.net.named_parameters()
        for k, p in self.lslr.items():
            yield "lslr." + k, p

    @torch.no_grad()
    def load_reference(self, ref) -> None:
        """Copy the parameters of a mamlpp_fast reference learner (same config) into this baseline."""
        ref_params = dict(ref.named_parameters())
        for ours, theirs in reference_name_map(self.args.num_stages, self.adapted).items():
            dict(self.named_parameters())[ours].copy_(ref_params[theirs])


def reference_name_map(num_stages: int, adapted: list[str]) -> dict[str, str]:
    """{baseline parameter name: reference learner parameter name}."""
    m = {}
    for i in range(num_stages):
        m[f"convs.{i}.weight"] = f"classifier.layer_dict.conv{i}.conv.weight"
        m[f"convs.{i}.bias"] = f"classifier.layer_dict.conv{i}.conv.bias"
        m[f"bn_weight.{i}"] = f"classifier.layer_dict.conv{i}.norm_layer.weight"
        m[f"bn_bias.{i}"] = f"classifier.layer_dict.conv{i}.norm_layer.bias"
    m["linear.weight"] = "classifier.layer_dict.linear.weights"
    m["linear.bias"] = "classifier.layer_dict.linear.bias"
    for n in adapted:
        m["lslr." + n.replace(".", "-")] = ("inner_loop_optimizer.names_learning_rates_dict."
                                            + m[n][len("classifier."):].replace(".", "-"))
    return m
