"""The reference MAML++ learner: pure PyTorch, one task at a time, like the authors' code.

This module is the oracle of the project. It follows the behaviour of
AntreasAntoniou/HowToTrainYourMAMLPytorch (few_shot_learning_system.py,
meta_neural_network_architectures.py, inner_loop_optimizers.py) step by step, with module and
parameter names chosen so that `state_dict()` keys are the original's: a checkpoint of the original
loads here unchanged and ours loads there.

Deliberate differences (each documented where it happens):
- the running statistics of batch norm are backed up before evaluation with a real copy and restored
  after each evaluation task, so validation leaves them unchanged. The original's backup shares
  storage with the live statistics, so its restore restores nothing (its issue #42): set the config key
  `bn_backup_aliasing=True` to reproduce that;
- the learning rate is set from the cosine closed form (what the original's deprecated
  `scheduler.step(epoch=...)` computes) and `losses['learning_rate']` reports the rate used;
- in evaluation the target set is scored after the last evaluation step (the original scores it after
  step `number_of_training_steps_per_iter - 1`, which is the same step whenever the two counts agree,
  and crashes when there are fewer evaluation steps);
- no leading "device" dimension on fast weights (the original carries one of size 1 and sums it away).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (CheckpointError, atomic_torch_save, coerce_batch, cosine_lr, float32_precision,
                     load_checkpoint, msl_importance_vector, resolve_device, resolve_dtype, set_torch_seed)
from .config import load_args
from .errors import NonFiniteError  # noqa: F401 (re-exported)

__all__ = ["MAMLFewShotClassifier", "VGGReLUNormNetwork", "LSLRGradientDescentLearningRule", "NonFiniteError"]

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


class MAMLFewShotClassifier(nn.Module):
    """MAML++ few-shot classifier, one task at a time (the original's algorithm and API).

    Arguments:
        im_shape: (b, C, H, W) of the images (b is only used to build the network).
        device: torch device (or "auto"/None: the config's `device`, else CUDA when available).
        args: argparse.Namespace, dict, or path to an experiment JSON of the original.

    Example:
        >>> from mamlpp_fast.config import default_args
        >>> args = default_args(cnn_num_filters=8, num_stages=2, number_of_training_steps_per_iter=2,
        ...                     number_of_evaluation_steps_per_iter=2, batch_size=2)
        >>> model = MAMLFewShotClassifier((2, 1, 28, 28), "cpu", args)
        >>> sorted(model.state_dict())[0]
        'classifier.layer_dict.conv0.conv.bias'
    """

    def __init__(self, im_shape, device, args):
        super().__init__()
        self.args = args = load_args(args)
        self.device = resolve_device(device if device is not None else args.device)
        self.dtype = resolve_dtype(args)
        self.batch_size = args.batch_size
        self.im_shape = tuple(im_shape)
        self.current_epoch = 0
        self.rng = set_torch_seed(args.seed)
        self.classifier = VGGReLUNormNetwork(self.im_shape, args.num_classes_per_set, args)
        self.task_learning_rate = args.task_learning_rate
        self.inner_loop_optimizer = LSLRGradientDescentLearningRule(
            total_num_inner_loop_steps=args.number_of_training_steps_per_iter,
            use_learnable_learning_rates=args.learnable_per_layer_per_step_inner_loop_learning_rate,
            init_learning_rate=args.task_learning_rate)
        self.inner_loop_optimizer.initialise(self.get_inner_loop_parameter_dict(self.classifier.named_parameters()))
        self.to(device=self.device, dtype=self.dtype)
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=args.meta_learning_rate, amsgrad=False)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer=self.optimizer, T_max=args.total_epochs, eta_min=args.min_learning_rate)

    # -- pieces of the algorithm -------------------------------------------------------------------
    def get_per_step_loss_importance_vector(self) -> torch.Tensor:
        w = msl_importance_vector(self.args.number_of_training_steps_per_iter,
                                  self.args.multi_step_loss_num_epochs, self.current_epoch)
        # The original builds it with torch.Tensor (float32); in float64 mode keep float64.
        return torch.tensor(w, dtype=self.dtype, device=self.device)

    def get_inner_loop_parameter_dict(self, params) -> dict:
        """The adapted tensors: every trainable parameter of the classifier, BN ones only with
        enable_inner_loop_optimizable_bn_params."""
        return {name: param for name, param in params if param.requires_grad
                and (self.args.enable_inner_loop_optimizable_bn_params or "norm_layer" not in name)}

    def apply_inner_loop_update(self, loss, names_weights_copy: dict, use_second_order: bool,
                                current_step_idx: int) -> dict:
        grads = torch.autograd.grad(loss, list(names_weights_copy.values()), create_graph=use_second_order,
                                    allow_unused=True)
        names_grads = {}
        for key, g in zip(names_weights_copy, grads):
            names_grads[key] = torch.zeros_like(names_weights_copy[key]) if g is None else g
        return self.inner_loop_optimizer.update_params(names_weights_copy, names_grads, current_step_idx)

    def net_forward(self, x, y, weights, backup_running_statistics, training, num_step):
        if backup_running_statistics:
            self.classifier.backup_stats()
        preds = self.classifier(x, num_step, weights)
        return F.cross_entropy(preds, y), preds

    def forward(self, data_batch, epoch, use_second_order, use_multi_step_loss_optimization, num_steps,
                training_phase):
        """The MAML++ outer forward over the tasks of a batch, one task at a time.

        Returns (losses, per_task_target_preds): losses['loss'] is the mean over tasks of each task's
        summed (MSL-weighted) target losses and keeps its graph for the meta-update."""
        x_support_set, x_target_set, y_support_set, y_target_set = data_batch
        s_train = self.args.number_of_training_steps_per_iter
        use_msl = use_multi_step_loss_optimization and training_phase and epoch < self.args.multi_step_loss_num_epochs
        final_step = min(num_steps, s_train) - 1
        importance = self.get_per_step_loss_importance_vector()
        total_losses, correct = [], []
        per_task_target_preds = []
        for xs, ys, xt, yt in zip(x_support_set, y_support_set, x_target_set, y_target_set):
            c, h, w = xs.shape[-3:]
            xs, ys, xt, yt = xs.reshape(-1, c, h, w), ys.reshape(-1), xt.reshape(-1, c, h, w), yt.reshape(-1)
            weights = self.get_inner_loop_parameter_dict(self.classifier.named_parameters())
            task_losses = []
            target_preds = None
            for step in range(final_step + 1 if not use_msl else num_steps):
                support_loss, _ = self.net_forward(xs, ys, weights, backup_running_statistics=(
                    step == 0 and not training_phase), training=True, num_step=step)
                weights = self.apply_inner_loop_update(support_loss, weights, use_second_order, step)
                if use_msl:
                    target_loss, target_preds = self.net_forward(xt, yt, weights, False, True, step)
                    task_losses.append(importance[step] * target_loss)
                elif step == final_step:
                    target_loss, target_preds = self.net_forward(xt, yt, weights, False, True, step)
                    task_losses.append(target_loss)
            per_task_target_preds.append(target_preds.detach().cpu().numpy())
            correct.append(target_preds.detach().argmax(1).eq(yt).to(torch.float32))
            total_losses.append(torch.sum(torch.stack(task_losses)))
            if not training_phase:
                self.classifier.restore_backup_stats()
        losses = {"loss": torch.mean(torch.stack(total_losses)),
                  "accuracy": float(torch.cat(correct).mean().item())}
        for i, item in enumerate(importance.detach().cpu().numpy()):
            losses[f"loss_importance_vector_{i}"] = item
        return losses, per_task_target_preds

    def trainable_parameters(self):
        for param in self.parameters():
            if param.requires_grad:
                yield param

    def train_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch,
                            use_second_order=self.args.second_order and epoch > self.args.first_order_to_second_order_epoch,
                            use_multi_step_loss_optimization=self.args.use_multi_step_loss_optimization,
                            num_steps=self.args.number_of_training_steps_per_iter, training_phase=True)

    def evaluation_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch, use_second_order=False, use_multi_step_loss_optimization=True,
                            num_steps=self.args.number_of_evaluation_steps_per_iter, training_phase=False)

    def meta_update(self, loss, data_batch=None, epoch=None) -> bool:
        """Backward, the original's imagenet clamp, and the Adam step, unless the meta-loss or a
        meta-gradient is not finite: then no parameter changes, and the config key `nonfinite_policy`
        decides between skipping the batch (a warning naming the task and inner step that produced the
        first non-finite value) and raising NonFiniteError. Returns True when the step was taken."""
        self.optimizer.zero_grad()
        loss.backward()
        self._clamp_imagenet_grads()
        if not bool(self._finite_flag(loss)):
            self._handle_nonfinite(loss, data_batch, epoch)
            return False
        self.optimizer.step()
        return True

    def _snapshot_running_stats(self) -> list:
        """Copies of the BN running statistics (restored when a meta-update is withheld)."""
        return [(n.running_mean.detach().clone(), n.running_var.detach().clone())
                for n in self.classifier.norm_layers() if n.per_step]

    @torch.no_grad()
    def _restore_running_stats(self, saved: list) -> None:
        for n, (rm, rv) in zip([n for n in self.classifier.norm_layers() if n.per_step], saved):
            n.running_mean.copy_(rm)
            n.running_var.copy_(rv)

    def _clamp_imagenet_grads(self) -> None:
        if "imagenet" in self.args.dataset_name:
            for param in self.classifier.parameters():
                if param.requires_grad and param.grad is not None:
                    param.grad.clamp_(-10, 10)

    def _finite_flag(self, loss) -> torch.Tensor:
        """0-d bool device tensor: loss and every meta-gradient finite (no host synchronisation)."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        total = loss.detach().reshape(1).to(torch.float64)
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads)).sum().to(torch.float64)
        return torch.isfinite(total).reshape(())

    def _handle_nonfinite(self, loss, data_batch, epoch) -> None:
        where = self.locate_nonfinite(data_batch, epoch) if data_batch is not None else "unknown"
        self.optimizer.zero_grad()
        msg = f"non-finite meta-update (loss {float(loss.detach()):.4g}) at {where}; no parameter was changed"
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteError(msg)
        warnings.warn(msg + " (batch skipped: nonfinite_policy='skip')", RuntimeWarning, stacklevel=3)

    def locate_nonfinite(self, data_batch, epoch) -> str:
        """Re-run the batch one task and one inner step at a time (first order, no updates) and name
        the first task/step/set whose loss, or a gradient, is not finite."""
        saved = self._snapshot_running_stats()
        try:
            xs_all, xt_all, ys_all, yt_all = data_batch
            for task, (xs, ys, xt, yt) in enumerate(zip(xs_all, ys_all, xt_all, yt_all)):
                c, h, w = xs.shape[-3:]
                xs, ys, xt, yt = xs.reshape(-1, c, h, w), ys.reshape(-1), xt.reshape(-1, c, h, w), yt.reshape(-1)
                if not (torch.isfinite(xs).all() and torch.isfinite(xt).all()):
                    return f"task {task}: the input images hold non-finite values"
                weights = self.get_inner_loop_parameter_dict(self.classifier.named_parameters())
                for step in range(self.args.number_of_training_steps_per_iter):
                    support_loss, _ = self.net_forward(xs, ys, weights, False, True, step)
                    if not torch.isfinite(support_loss):
                        return f"task {task}, inner step {step}: support-set loss"
                    grads = torch.autograd.grad(support_loss, list(weights.values()), allow_unused=True)
                    for name, g in zip(weights, grads):
                        if g is not None and not torch.isfinite(g).all():
                            return f"task {task}, inner step {step}: support-set gradient of {name}"
                    weights = self.inner_loop_optimizer.update_params(
                        weights, {k: (g if g is not None else torch.zeros_like(weights[k])).detach()
                                  for k, g in zip(weights, grads)}, step)
                    target_loss, _ = self.net_forward(xt, yt, weights, False, True, step)
                    if not torch.isfinite(target_loss):
                        return f"task {task}, inner step {step}: target-set loss"
            for name, p in self.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return f"the meta-gradient of {name} (outer backward)"
            return "the outer backward (every inner-loop loss was finite)"
        finally:
            self._restore_running_stats(saved)

    def _set_epoch_learning_rate(self, epoch: int) -> float:
        lr = cosine_lr(epoch, self.args.meta_learning_rate, self.args.min_learning_rate, self.args.total_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scheduler.last_epoch = epoch
        return lr

    def _batch(self, data_batch):
        return coerce_batch(data_batch, self.device, self.dtype, self.im_shape, self.args.num_classes_per_set)

    # -- public API ------------------------------------------------------------------------------------
    def run_train_iter(self, data_batch, epoch):
        """One meta-update on a batch of tasks. Returns (losses, per-task target logits)."""
        with self._precision():
            return self._train_iter(data_batch, epoch)

    def _precision(self):
        """Numerics of a meta-update: strict float32 unless allow_tf32 (PyTorch's cuDNN defaults otherwise)."""
        return float32_precision(self.args.allow_tf32)

    def _train_iter(self, data_batch, epoch):
        epoch = int(epoch)
        lr = self._set_epoch_learning_rate(epoch)
        self.current_epoch = epoch
        if not self.training:
            self.train()
        batch = self._batch(data_batch)
        stats = self._snapshot_running_stats()
        losses, preds = self.train_forward_prop(batch, epoch)
        losses["skipped"] = not self.meta_update(losses["loss"], batch, epoch)
        if losses["skipped"]:
            self._restore_running_stats(stats)
        losses["loss"] = losses["loss"].detach()
        losses["learning_rate"] = lr
        self.optimizer.zero_grad()
        return losses, preds

    def run_validation_iter(self, data_batch):
        """Adapt on each task's support set (first order, evaluation steps) and score its target set."""
        if self.training:
            self.eval()
        batch = self._batch(data_batch)
        with self._precision():
            losses, preds = self.evaluation_forward_prop(batch, self.current_epoch)
        losses["loss"] = losses["loss"].detach()
        return losses, preds

    def save_model(self, model_save_dir, state):
        """Write `state` plus 'network' (state_dict) and 'optimizer' atomically to the path `model_save_dir`."""
        state["network"] = self.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        atomic_torch_save(state, model_save_dir)

    def load_model(self, model_save_dir, model_name, model_idx):
        """Load `<model_save_dir>/<model_name>_<model_idx>`; returns the experiment state dict."""
        path = os.path.join(model_save_dir, f"{model_name}_{model_idx}")
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.load_state_dict(state["network"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None
        if "optimizer" in state:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
        return state
