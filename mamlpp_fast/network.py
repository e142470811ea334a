"""The network and the inner-loop learning rule both learners are made of, and the constants of its
batch norm and activation.

The modules follow AntreasAntoniou/HowToTrainYourMAMLPytorch (meta_neural_network_architectures.py,
inner_loop_optimizers.py) with the original's module and parameter names and registration order, so
that a learner's `state_dict()` keys are the original's: a checkpoint of the original loads here
unchanged and ours loads there. Their `forward` is the one-task-at-a-time computation the reference
learner (mamlpp_fast.reference) runs and the fast learner (mamlpp_fast.fast) reproduces for all tasks
at once; the fast learner uses these modules only as the holders of its parameters and running
statistics, and the constants below in its own batched ops.

Deliberate difference (see MetaBatchNormLayer): the running statistics of batch norm are backed up
before evaluation with a real copy and restored after each evaluation task. The original's backup
shares storage with the live statistics, so its restore restores nothing (its issue #42): set the
config key `bn_backup_aliasing=True` to reproduce that.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BN_EPS", "BN_MOMENTUM", "LEAKY_SLOPE", "MetaConv2dLayer", "MetaLinearLayer", "MetaBatchNormLayer",
           "MetaConvNormLayerReLU", "VGGReLUNormNetwork", "LSLRGradientDescentLearningRule",
           "inner_loop_parameter_dict", "build_network"]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
LEAKY_SLOPE = 0.01


class MetaConv2dLayer(nn.Module):
    """3x3 convolution whose weights may be replaced by fast weights at call time."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, padding: int):
        super().__init__()
        self.stride, self.padding = int(stride), int(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, weight=None, bias=None):
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        return F.conv2d(x, w, b, stride=self.stride, padding=self.padding)


class MetaLinearLayer(nn.Module):
    """Linear layer with the original's parameter names `weights` and `bias`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(out_features, in_features))
        nn.init.xavier_uniform_(self.weights)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, weights=None, bias=None):
        return F.linear(x, self.weights if weights is None else weights, self.bias if bias is None else bias)


class MetaBatchNormLayer(nn.Module):
    """Batch norm that always normalises with the current batch's statistics (training=True, as the
    original), with per-step gamma/beta and running statistics (BNWB + BNRS) when
    `per_step_bn_statistics`.

    Parameter registration order (running_mean, running_var, bias, weight) and their being
    nn.Parameters (running ones with requires_grad=False) follow the original, so state_dict keys and
    the meta-optimizer's parameter order match it.
    """

    def __init__(self, num_features: int, args: Any):
        super().__init__()
        s = args.number_of_training_steps_per_iter
        self.per_step = bool(args.per_step_bn_statistics)
        self.inner_loop_bn = bool(args.enable_inner_loop_optimizable_bn_params)
        self.aliasing = bool(getattr(args, "bn_backup_aliasing", False))
        shape = (s, num_features) if self.per_step else (num_features,)
        self.running_mean = nn.Parameter(torch.zeros(shape), requires_grad=False)
        # Without per-step statistics the original creates zeros here and never uses them.
        self.running_var = nn.Parameter(torch.ones(shape) if self.per_step else torch.zeros(shape),
                                        requires_grad=False)
        if self.inner_loop_bn:  # the original replaces gamma/beta by per-layer vectors in this mode
            shape = (num_features,)
        self.bias = nn.Parameter(torch.zeros(shape), requires_grad=bool(args.learnable_bn_beta))
        self.weight = nn.Parameter(torch.ones(shape), requires_grad=bool(args.learnable_bn_gamma))
        self._backup: tuple[torch.Tensor, torch.Tensor] | None = None

    def backup_stats(self) -> None:
        if not self.per_step:
            return
        if self.aliasing:  # the original's shallow copy: shares storage with the live statistics
            self._backup = (self.running_mean.data, self.running_var.data)
        else:
            self._backup = (self.running_mean.detach().clone(), self.running_var.detach().clone())

    def restore_backup_stats(self) -> None:
        if self.per_step and self._backup is not None and not self.aliasing:
            with torch.no_grad():
                self.running_mean.copy_(self._backup[0])
                self.running_var.copy_(self._backup[1])

    def forward(self, x, num_step: int, weight=None, bias=None):
        # gamma and beta are filled in separately: with enable_inner_loop_optimizable_bn_params only
        # the learnable one of them is an adapted (fast) tensor. (The original crashes on that mix.)
        per_row = self.per_step and not self.inner_loop_bn
        if weight is None:
            weight = self.weight[num_step] if per_row else self.weight
        if bias is None:
            bias = self.bias[num_step] if per_row else self.bias
        if self.per_step:
            # Row views: F.batch_norm updates them in place (momentum 0.1, unbiased variance).
            rm, rv = self.running_mean[num_step], self.running_var[num_step]
        else:
            rm = rv = None
        return F.batch_norm(x, rm, rv, weight, bias, training=True, momentum=BN_MOMENTUM, eps=BN_EPS)


class MetaConvNormLayerReLU(nn.Module):
    """conv3x3 -> batch norm -> leaky ReLU (one stage of the original's VGGReLUNormNetwork)."""

    def __init__(self, in_channels: int, num_filters: int, stride: int, padding: int, args: Any):
        super().__init__()
        self.conv = MetaConv2dLayer(in_channels, num_filters, stride, padding)
        self.norm_layer = MetaBatchNormLayer(num_filters, args)

    def forward(self, x, num_step: int, p: dict | None = None, prefix: str = ""):
        p = p or {}
        out = self.conv(x, p.get(prefix + "conv.weight"), p.get(prefix + "conv.bias"))
        out = self.norm_layer(out, num_step, p.get(prefix + "norm_layer.weight"), p.get(prefix + "norm_layer.bias"))
        return F.leaky_relu(out, LEAKY_SLOPE)


class VGGReLUNormNetwork(nn.Module):
    """`num_stages` x (conv3x3 -> per-step BN -> leaky ReLU [-> 2x2 max pool]) -> [global avg pool] ->
    linear, with optional fast weights given as {parameter name: tensor}."""

    def __init__(self, im_shape, num_output_classes: int, args: Any):
        super().__init__()
        self.max_pooling = bool(args.max_pooling)
        self.num_stages = int(args.num_stages)
        stride = 1 if self.max_pooling else 2
        padding = int(args.conv_padding)
        self.layer_dict = nn.ModuleDict()
        # Build on zeros like the original: the shapes give the linear layer's input size, and (as
        # there) each per-step BN sees the dummy batch twice, which moves running_var row 0 to 0.81.
        out = torch.zeros(tuple(im_shape))
        with torch.no_grad():
            for i in range(self.num_stages):
                block = MetaConvNormLayerReLU(out.shape[1], args.cnn_num_filters, stride, padding, args)
                self.layer_dict[f"conv{i}"] = block
                block.norm_layer(block.conv(out), 0)  # the original's build_block pass
                out = block(out, 0)  # the original's build_network pass
                if self.max_pooling:
                    out = F.max_pool2d(out, 2, 2, 0)
            if not self.max_pooling:
                out = F.avg_pool2d(out, out.shape[2])
        self.encoder_features_shape = list(out.shape)
        self.layer_dict["linear"] = MetaLinearLayer(int(np.prod(out.shape[1:])), num_output_classes)

    def forward(self, x, num_step: int, params: dict | None = None):
        """Logits (n, classes). params: {'layer_dict.conv0.conv.weight': tensor, ...}; missing names
        use the module's own parameters."""
        p = params or {}
        out = x
        for i in range(self.num_stages):
            out = self.layer_dict[f"conv{i}"](out, num_step, p, f"layer_dict.conv{i}.")
            if self.max_pooling:
                out = F.max_pool2d(out, 2, 2, 0)
        if not self.max_pooling:
            out = F.avg_pool2d(out, out.shape[2])
        out = out.reshape(out.size(0), -1)
        return self.layer_dict["linear"](out, p.get("layer_dict.linear.weights"), p.get("layer_dict.linear.bias"))

    def norm_layers(self):
        return [self.layer_dict[f"conv{i}"].norm_layer for i in range(self.num_stages)]

    def backup_stats(self):
        for n in self.norm_layers():
            n.backup_stats()

    def restore_backup_stats(self):
        for n in self.norm_layers():
            n.restore_backup_stats()


class LSLRGradientDescentLearningRule(nn.Module):
    """Per-layer, per-step learning rates (LSLR): one (S+1,) vector per adapted tensor, keyed by the
    tensor's name with '.' -> '-'; update w - lr[step] * g. The last entry is never used (as in the
    original)."""

    def __init__(self, total_num_inner_loop_steps: int, use_learnable_learning_rates: bool,
                 init_learning_rate: float = 1e-3):
        super().__init__()
        if not init_learning_rate > 0:
            raise ValueError(f"task_learning_rate must be positive, got {init_learning_rate}")
        self.init_learning_rate = float(init_learning_rate)
        self.total_num_inner_loop_steps = total_num_inner_loop_steps
        self.use_learnable_learning_rates = use_learnable_learning_rates

    def initialise(self, names_weights_dict: dict) -> None:
        self.names_learning_rates_dict = nn.ParameterDict()
        for key in names_weights_dict:
            self.names_learning_rates_dict[key.replace(".", "-")] = nn.Parameter(
                torch.ones(self.total_num_inner_loop_steps + 1) * self.init_learning_rate,
                requires_grad=self.use_learnable_learning_rates)

    def update_params(self, names_weights_dict: dict, names_grads_wrt_params_dict: dict, num_step: int) -> dict:
        return {key: names_weights_dict[key]
                - self.names_learning_rates_dict[key.replace(".", "-")][num_step] * names_grads_wrt_params_dict[key]
                for key in names_grads_wrt_params_dict}


def inner_loop_parameter_dict(named_parameters, args: Any) -> dict:
    """The adapted tensors: every trainable parameter of the classifier, BN ones only with
    enable_inner_loop_optimizable_bn_params."""
    return {name: param for name, param in named_parameters if param.requires_grad
            and (args.enable_inner_loop_optimizable_bn_params or "norm_layer" not in name)}


def build_network(im_shape, args: Any) -> tuple[VGGReLUNormNetwork, LSLRGradientDescentLearningRule]:
    """The classifier and its inner-loop learning rule, built as the original builds them (the caller
    seeds torch first: mamlpp_fast.learner_core.LearnerCore)."""
    classifier = VGGReLUNormNetwork(tuple(im_shape), args.num_classes_per_set, args)
    rule = LSLRGradientDescentLearningRule(
        total_num_inner_loop_steps=args.number_of_training_steps_per_iter,
        use_learnable_learning_rates=args.learnable_per_layer_per_step_inner_loop_learning_rate,
        init_learning_rate=args.task_learning_rate)
    rule.initialise(inner_loop_parameter_dict(classifier.named_parameters(), args))
    return classifier, rule
