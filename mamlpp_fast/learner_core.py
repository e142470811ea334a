"""The learner core: everything of a MAML++ learner except its outer forward, shared by composition.

Each learner (mamlpp_fast.reference: one task at a time; mamlpp_fast.fast: all tasks of a meta-batch
at once) holds one `LearnerCore` as `learner.core` and supplies only its outer forward. The core owns:

- the configuration, device, dtype and seed: `LearnerCore(im_shape, device, args)` runs before the
  learner builds its modules (mamlpp_fast.network.build_network), so both learners draw the same
  initial parameters;
- the meta-optimizer, Adam over the learner's trainable parameters (`attach`; fused on CUDA and CPU
  devices: `adam_options`), and its cosine schedule (`set_epoch_learning_rate`); with
  `capturable=True` (the fast learner's CUDA graphs) Adam keeps its step count and learning rate on
  the device;
- the MSL weights (`msl_weights`) and the MAML++ switches of a phase (`train_phase`, `evaluation_phase`);
- the meta-update and the non-finite policy (`meta_update`): outer backward, the optional gradient
  reduction, the original's imagenet clamp, a device-side finiteness flag (`finite_flag`), the step
  withheld when the loss or a meta-gradient is not finite, the failing task and inner step located
  (`locate_nonfinite`), then skip with a warning or stop with NonFiniteError (config key
  `nonfinite_policy`);
- snapshots of the BN running statistics, restored when a step is withheld;
- the plain (uncaptured) training and validation iterations (`train_iter`, `validation_iter`);
- checkpoint files (`save_model`, `load_model`).

The learner's side of the contract: an nn.Module with the submodules `classifier`
(network.VGGReLUNormNetwork) and `inner_loop_optimizer` (network.LSLRGradientDescentLearningRule), whose
`state_dict()` is a checkpoint's 'network', the attribute `current_epoch`, and
`train_forward_prop(batch, epoch)` / `evaluation_forward_prop(batch, epoch)` returning
(losses with a 'loss' tensor, per-task target logits). `LearnerAPI` gives a learner the public methods
of DESIGN.md ("Learner API") by forwarding them to its core.

Reduction (data-parallel training, mamlpp_fast.distributed): a wrapper installs a `Reducer` with
`set_reducer`. During a training iteration the core calls it on the reported metrics (after the
forward) and on the meta-gradients (after the outer backward, before the clamp and the finiteness
test), and a learner that updates running statistics from pending batch statistics (the fast learner)
passes them through `reduce_statistics` first. Outside a training iteration, or without a reducer,
nothing is reduced.
"""
from __future__ import annotations

import contextlib

import os
import warnings
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .common import (CheckpointError, atomic_torch_save, coerce_batch, cosine_lr, float32_precision,
                     load_checkpoint, msl_importance_vector, resolve_device, resolve_dtype, set_torch_seed)
from .config import load_args
from .errors import NonFiniteError
from .network import build_network, inner_loop_parameter_dict

__all__ = ["LearnerCore", "LearnerAPI", "Reducer", "adam_options"]


class Reducer(Protocol):
    """What a data-parallel wrapper reduces over its processes during a training iteration."""

    def metrics(self, losses: dict, preds: list) -> tuple[dict, list]:
        """The losses and per-task logits of the whole meta-batch from this process's share; the
        'loss' keeps a gradient of this process's share only (the gradients are reduced separately)."""

    def gradients(self, grads: list[torch.Tensor]) -> None:
        """Replace, in place, this process's meta-gradients by those of the whole meta-batch."""

    def statistics(self, pending: dict) -> dict:
        """The pending running-statistics updates of the whole meta-batch, in task order."""


def adam_options(device: torch.device, capturable: bool) -> dict:
    """Keyword arguments of the meta-optimizer's torch.optim.Adam on `device`. On CUDA and CPU devices
    the fused implementation: one kernel for every parameter's moments and update (after one for the
    step counts), where the multi-tensor form launches eight per meta-update; the same formulas in the
    same order per element. capturable (the fast learner's CUDA graphs): the step counts and the
    learning rate live on the device, read by a captured step."""
    out: dict[str, Any] = {"capturable": True} if capturable else {}
    if torch.device(device).type in ("cuda", "cpu"):
        out["fused"] = True
    return out


class LearnerCore:
    """The shared machinery of a learner (see the module docstring). `attach(learner)` completes it."""

    def __init__(self, im_shape, device, args):
        self.args = load_args(args)
        self.device = resolve_device(device if device is not None else self.args.device)
        self.dtype = resolve_dtype(self.args)
        self.im_shape = tuple(im_shape)
        self.rng = set_torch_seed(self.args.seed)
        self.learner: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.capturable = False
        self.cudnn_benchmark: bool | None = None
        self.reducer: Reducer | None = None
        self._reducing: Reducer | None = None  # the reducer, during a training iteration only

    def attach(self, learner, *, capturable: bool = False, cudnn_benchmark: bool | None = None) -> None:
        """Build the meta-optimizer over `learner`'s trainable parameters (already on the device).

        capturable: Adam's step count and learning rate on the device, read by a captured step.
        cudnn_benchmark: let cuDNN time its convolution algorithms during iterations (None: leave it)."""
        self.learner = learner
        self.cudnn_benchmark = cudnn_benchmark
        self._build_optimizer(capturable)

    def _build_optimizer(self, capturable: bool) -> None:
        args = self.args
        lr: Any = args.meta_learning_rate
        if capturable:
            # The learning rate a captured step reads: a device tensor the host fills before each replay.
            lr = torch.tensor(float(args.meta_learning_rate), device=self.device, dtype=torch.float32)
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=lr, amsgrad=False,
                                          **adam_options(self.device, capturable))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer=self.optimizer, T_max=args.total_epochs, eta_min=args.min_learning_rate)
        self.capturable = capturable

    def set_reducer(self, reducer: Reducer | None) -> None:
        """Install the reduction of a data-parallel wrapper (before the first meta-update). Its collectives
        cannot be captured in a CUDA graph, so a capturable optimizer is rebuilt as a plain one."""
        if self.optimizer is not None and self.optimizer.state:
            raise RuntimeError("set_reducer must come before the first meta-update (the optimizer has state)")
        if reducer is not None and self.capturable:
            self._build_optimizer(capturable=False)
        self.reducer = reducer

    # -- parameters, schedule, MSL weights -------------------------------------------------------------
    def trainable_parameters(self):
        for param in self.learner.parameters():
            if param.requires_grad:
                yield param

    def adapted_parameters(self) -> dict:
        """{name: parameter} of the tensors the inner loop adapts (network.inner_loop_parameter_dict)."""
        return inner_loop_parameter_dict(self.learner.classifier.named_parameters(), self.args)

    def set_epoch_learning_rate(self, epoch: int) -> float:
        """The cosine rate of `epoch` (CosineAnnealingLR's closed form, what the original's
        `scheduler.step(epoch=...)` computes) into the optimizer; returns it."""
        lr = cosine_lr(epoch, self.args.meta_learning_rate, self.args.min_learning_rate, self.args.total_epochs)
        for group in self.optimizer.param_groups:
            if self.capturable:
                group["lr"].fill_(lr)  # the learning rate is a device tensor read by the captured step
            else:
                group["lr"] = lr
        self.scheduler.last_epoch = epoch
        return lr

    def msl_weights(self) -> torch.Tensor:
        """The MSL weights of the learner's current epoch. The original builds them with torch.Tensor
        (float32); in float64 mode they stay float64."""
        w = msl_importance_vector(self.args.number_of_training_steps_per_iter,
                                  self.args.multi_step_loss_num_epochs, self.learner.current_epoch)
        return torch.tensor(w, dtype=self.dtype, device=self.device)

    def second_order(self, epoch: int) -> bool:
        return bool(self.args.second_order and epoch > self.args.first_order_to_second_order_epoch)

    def train_phase(self, epoch: int) -> dict:
        """The outer forward's switches for a training meta-update at `epoch` (as the original's
        train_forward_prop)."""
        return dict(use_second_order=self.second_order(epoch),
                    use_multi_step_loss_optimization=self.args.use_multi_step_loss_optimization,
                    num_steps=self.args.number_of_training_steps_per_iter, training_phase=True)

    def evaluation_phase(self) -> dict:
        """The outer forward's switches for evaluation (first order, evaluation steps, every target loss)."""
        return dict(use_second_order=False, use_multi_step_loss_optimization=True,
                    num_steps=self.args.number_of_evaluation_steps_per_iter, training_phase=False)

    # -- numerics and batches ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def precision(self):
        """Numerics of an iteration: strict float32 unless allow_tf32 (PyTorch's cuDNN defaults otherwise),
        cuDNN algorithm search when the learner asked for it (common.float32_precision), and the input
        precision of our Triton convolution and fused-block products (config key conv_precision: "ieee",
        "tf32", "tf32x3"; "auto": TF32 exactly when allow_tf32; triton._device.forced_conv_precision); and
        whether independent Triton convolution launches run on two streams (config key conv_streams;
        triton._device.side_by_side), which changes no result."""
        from .triton._device import forced_conv_precision, forced_conv_streams
        mode = getattr(self.args, "conv_precision", "auto")
        with float32_precision(self.args.allow_tf32, self.cudnn_benchmark), \
                forced_conv_precision(None if mode == "auto" else mode), \
                forced_conv_streams(getattr(self.args, "conv_streams", False)):
            yield

    def batch(self, data_batch):
        """The checked batch on the learner's device and dtype (common.coerce_batch)."""
        return coerce_batch(data_batch, self.device, self.dtype, self.im_shape, self.args.num_classes_per_set)

    # -- running statistics -------------------------------------------------------------------------------
    def _per_step_norms(self) -> list:
        return [n for n in self.learner.classifier.norm_layers() if n.per_step]

    def _running_stats(self) -> list:
        return [t for n in self._per_step_norms() for t in (n.running_mean, n.running_var)]

    @torch.no_grad()
    def snapshot_running_stats(self) -> list:
        """Copies of the BN running statistics (restored when a meta-update is withheld): views of one
        buffer, filled by one multi-tensor copy (one launch per meta-update on a GPU rather than one per
        tensor)."""
        src = self._running_stats()
        if not src:
            return []
        flat = torch.empty(sum(t.numel() for t in src), dtype=src[0].dtype, device=src[0].device)
        dst = [d.view_as(t) for d, t in zip(flat.split([t.numel() for t in src]), src)]
        torch._foreach_copy_(dst, src)
        return list(zip(dst[0::2], dst[1::2]))

    @torch.no_grad()
    def restore_running_stats(self, saved: list) -> None:
        if saved:
            torch._foreach_copy_(self._running_stats(), [t for pair in saved for t in pair])

    def reduce_statistics(self, pending: dict) -> dict:
        """`pending` running-statistics updates of the whole meta-batch: reduced by the installed reducer
        during a training iteration, else unchanged."""
        return pending if self._reducing is None else self._reducing.statistics(pending)

    # -- the meta-update and the non-finite policy ------------------------------------------------------------
    def clamp_imagenet_grads(self) -> None:
        """The original clamps every meta-gradient to [-10, 10] when the dataset name holds 'imagenet'."""
        if "imagenet" in self.args.dataset_name:
            for param in self.learner.classifier.parameters():
                if param.requires_grad and param.grad is not None:
                    param.grad.clamp_(-10, 10)

    def finite_flag(self, loss) -> torch.Tensor:
        """0-d bool device tensor: loss and every meta-gradient finite (no host synchronisation). The L2
        norms of the loss and of every gradient (one multi-tensor norm) have a largest value below
        infinity exactly when none of them holds an infinity or a NaN (a NaN propagates through the norm
        and the maximum, and compares false): 4 kernels, where a float64 sum and isfinite took 10."""
        tensors = [loss.detach().reshape(1)] + [p.grad for p in self.trainable_parameters() if p.grad is not None]
        norms = torch._foreach_norm(tensors)
        return torch.stack([n.to(norms[0].dtype) for n in norms]).amax() < float("inf")

    def ones(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor of ones shaped like `like` (the seed of a backward), kept per (shape, dtype, device) so
        that seeding costs no fill kernel per meta-update. Read only. Built outside a CUDA-graph
        capture (the uncaptured warm-up update builds it); inside one a missing seed is a fresh fill."""
        key = (tuple(like.shape), like.dtype, like.device)
        cache = self.__dict__.setdefault("_ones", {})
        one = cache.get(key)
        if one is None:
            one = torch.ones_like(like, memory_format=torch.contiguous_format)
            if not (like.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                cache[key] = one
        return one

    def backward(self, loss) -> None:
        """The outer backward, the gradient reduction (during a reduced training iteration) and the clamp."""
        loss.backward(self.ones(loss))
        if self._reducing is not None:
            self._reducing.gradients([p.grad for p in self.trainable_parameters() if p.grad is not None])
        self.clamp_imagenet_grads()

    def meta_update(self, loss, data_batch=None, epoch=None) -> bool:
        """Backward, the original's imagenet clamp, and the Adam step, unless the meta-loss or a
        meta-gradient is not finite: then no parameter changes, and the config key `nonfinite_policy`
        decides between skipping the batch (a warning naming the task and inner step that produced the
        first non-finite value) and raising NonFiniteError. Returns True when the step was taken."""
        self.optimizer.zero_grad()
        self.backward(loss)
        if not bool(self.finite_flag(loss)):  # with a reducer: the same decision in every process
            self.handle_nonfinite(loss, data_batch, epoch)
            return False
        self.optimizer.step()
        return True

    def handle_nonfinite(self, loss, data_batch, epoch) -> None:
        """A withheld meta-update: clear the gradients, then warn (policy 'skip') or raise (policy 'stop'),
        naming where the first non-finite value came from."""
        where = self.locate_nonfinite(data_batch, epoch) if data_batch is not None else "unknown"
        self.optimizer.zero_grad()
        msg = f"non-finite meta-update (loss {float(loss.detach()):.4g}) at {where}; no parameter was changed"
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteError(msg)
        warnings.warn(msg + " (batch skipped: nonfinite_policy='skip')", RuntimeWarning, stacklevel=4)

    def locate_nonfinite(self, data_batch, epoch) -> str:
        """Re-run the batch one task and one inner step at a time through the network's own forward
        (first order, no updates) and name the first task/step/set whose loss, or a gradient, is not
        finite. The running statistics this moves are restored."""
        learner = self.learner
        classifier, rule = learner.classifier, learner.inner_loop_optimizer
        saved = self.snapshot_running_stats()
        try:
            xs_all, xt_all, ys_all, yt_all = data_batch
            for task, (xs, ys, xt, yt) in enumerate(zip(xs_all, ys_all, xt_all, yt_all)):
                c, h, w = xs.shape[-3:]
                xs, ys, xt, yt = xs.reshape(-1, c, h, w), ys.reshape(-1), xt.reshape(-1, c, h, w), yt.reshape(-1)
                if not (torch.isfinite(xs).all() and torch.isfinite(xt).all()):
                    return f"task {task}: the input images hold non-finite values"
                weights = self.adapted_parameters()
                for step in range(self.args.number_of_training_steps_per_iter):
                    support_loss = F.cross_entropy(classifier(xs, step, weights), ys)
                    if not torch.isfinite(support_loss):
                        return f"task {task}, inner step {step}: support-set loss"
                    grads = torch.autograd.grad(support_loss, list(weights.values()), allow_unused=True)
                    for name, g in zip(weights, grads):
                        if g is not None and not torch.isfinite(g).all():
                            return f"task {task}, inner step {step}: support-set gradient of {name}"
                    weights = rule.update_params(
                        weights, {k: (g if g is not None else torch.zeros_like(weights[k])).detach()
                                  for k, g in zip(weights, grads)}, step)
                    target_loss = F.cross_entropy(classifier(xt, step, weights), yt)
                    if not torch.isfinite(target_loss):
                        return f"task {task}, inner step {step}: target-set loss"
            for name, p in learner.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return f"the meta-gradient of {name} (outer backward)"
            return "the outer backward (every inner-loop loss was finite)"
        finally:
            self.restore_running_stats(saved)

    # -- iterations -------------------------------------------------------------------------------------------
    def begin_train_iter(self, epoch: int) -> float:
        """What every training meta-update starts with: the epoch's learning rate (returned), the learner's
        current epoch (for the MSL weights) and training mode."""
        lr = self.set_epoch_learning_rate(epoch)
        self.learner.current_epoch = epoch
        if not self.learner.training:
            self.learner.train()
        return lr

    def train_iter(self, data_batch, epoch):
        """One meta-update on a batch of tasks (run_train_iter): forward, backward, Adam step unless a
        value is not finite (then the running statistics are restored too). Returns (losses, per-task
        target logits) with losses['learning_rate'] and losses['skipped']."""
        with self.precision():
            epoch = int(epoch)
            lr = self.begin_train_iter(epoch)
            batch = self.batch(data_batch)
            stats = self.snapshot_running_stats()
            self._reducing = self.reducer
            try:
                losses, preds = self.learner.train_forward_prop(batch, epoch)
                if self._reducing is not None:
                    losses, preds = self._reducing.metrics(losses, preds)
                losses["skipped"] = not self.meta_update(losses["loss"], batch, epoch)
            finally:
                self._reducing = None
            if losses["skipped"]:
                self.restore_running_stats(stats)
            losses["loss"] = losses["loss"].detach()
            losses["learning_rate"] = lr
            self.optimizer.zero_grad()
            return losses, preds

    def validation_iter(self, data_batch):
        """Adapt on each task's support set (first order, evaluation steps) and score its target set."""
        learner = self.learner
        if learner.training:
            learner.eval()
        batch = self.batch(data_batch)
        with self.precision():
            losses, preds = learner.evaluation_forward_prop(batch, learner.current_epoch)
        losses["loss"] = losses["loss"].detach()
        return losses, preds

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _own_optimizer_flags(self, saved: dict) -> dict:
        """A checkpoint's optimizer state with this optimizer's implementation flags (fused, capturable,
        foreach, differentiable) and learning-rate type in place of the saved ones. torch's
        load_state_dict takes both from the checkpoint, and places Adam's step counts by the saved
        flags: a checkpoint written by a plain optimizer (a CPU run, an earlier version) would leave
        the counts on the host, where a fused or capturable step refuses them, and one written on a
        CUDA device would make a CPU optimizer capturable. The learning rate keeps its saved value."""
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or \
                len(saved["param_groups"]) != len(self.optimizer.param_groups):
            return saved  # load_state_dict names what does not fit
        groups = []
        for mine, theirs in zip(self.optimizer.param_groups, saved["param_groups"]):
            group = dict(theirs)
            for key in ("fused", "capturable", "foreach", "differentiable"):
                if key in mine:
                    group[key] = mine[key]
            lr = theirs.get("lr", mine["lr"])
            if isinstance(mine["lr"], torch.Tensor):
                group["lr"] = mine["lr"].fill_(float(lr))  # the device tensor a captured step reads
            else:
                group["lr"] = float(lr)
            groups.append(group)
        return dict(saved, param_groups=groups)

    def save_model(self, model_save_dir, state):
        """Write `state` plus 'network' (state_dict) and 'optimizer' atomically to the path `model_save_dir`."""
        state["network"] = self.learner.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        atomic_torch_save(state, model_save_dir)

    def load_model(self, model_save_dir, model_name, model_idx):
        """Load `<model_save_dir>/<model_name>_<model_idx>`; returns the experiment state dict."""
        path = os.path.join(model_save_dir, f"{model_name}_{model_idx}")
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.learner.load_state_dict(state["network"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None
        if "optimizer" in state:
            try:
                self.optimizer.load_state_dict(self._own_optimizer_flags(state["optimizer"]))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
        return state


class LearnerAPI:
    """The public methods and attributes of a learner (DESIGN.md, "Learner API"), each forwarded to the
    learner's `core`. Holds no state and no behaviour of its own: a learner class lists it beside
    nn.Module and defines `forward`, `train_forward_prop` and `evaluation_forward_prop`."""

    core: LearnerCore

    def _init_core(self, im_shape, device, args) -> LearnerCore:
        """The core and the attributes both learners have; then the network, built on the core's seed and
        moved to its device and dtype. The learner calls `core.attach(self)` after its own set-up."""
        self.core = core = LearnerCore(im_shape, device, args)
        self.args, self.device, self.dtype = core.args, core.device, core.dtype
        self.batch_size = core.args.batch_size
        self.im_shape = core.im_shape
        self.current_epoch = 0
        self.rng = core.rng
        self.task_learning_rate = core.args.task_learning_rate
        self.classifier, self.inner_loop_optimizer = build_network(self.im_shape, core.args)
        self.to(device=core.device, dtype=core.dtype)
        return core

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The meta-optimizer (Adam)."""
        return self.core.optimizer

    @property
    def scheduler(self):
        """The meta-optimizer's CosineAnnealingLR (its `last_epoch` follows the epoch of each update)."""
        return self.core.scheduler

    def trainable_parameters(self):
        return self.core.trainable_parameters()

    def get_per_step_loss_importance_vector(self) -> torch.Tensor:
        return self.core.msl_weights()

    def get_inner_loop_parameter_dict(self, params) -> dict:
        """The adapted tensors of `params` (network.inner_loop_parameter_dict)."""
        return inner_loop_parameter_dict(params, self.args)

    def meta_update(self, loss, data_batch=None, epoch=None) -> bool:
        """LearnerCore.meta_update: backward, clamp, Adam step unless non-finite. True when stepped."""
        return self.core.meta_update(loss, data_batch, epoch)

    def locate_nonfinite(self, data_batch, epoch) -> str:
        return self.core.locate_nonfinite(data_batch, epoch)

    def run_train_iter(self, data_batch, epoch):
        """One meta-update on a batch of tasks. Returns (losses, per-task target logits)."""
        return self.core.train_iter(data_batch, epoch)

    def run_validation_iter(self, data_batch):
        """Adapt on each task's support set (first order, evaluation steps) and score its target set."""
        return self.core.validation_iter(data_batch)

    def save_model(self, model_save_dir, state):
        """Write `state` plus 'network' (state_dict) and 'optimizer' atomically to the path `model_save_dir`."""
        return self.core.save_model(model_save_dir, state)

    def load_model(self, model_save_dir, model_name, model_idx):
        """Load `<model_save_dir>/<model_name>_<model_idx>`; returns the experiment state dict."""
        return self.core.load_model(model_save_dir, model_name, model_idx)

    def _set_epoch_learning_rate(self, epoch: int) -> float:
        return self.core.set_epoch_learning_rate(epoch)

    def _precision(self):
        return self.core.precision()

    def _batch(self, data_batch):
        return self.core.batch(data_batch)
