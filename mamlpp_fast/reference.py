"""The reference MAML++ learner: pure PyTorch, one task at a time, like the authors' code.

This module is the oracle of the project: the specification the fast learner is checked against. It
follows the behaviour of AntreasAntoniou/HowToTrainYourMAMLPytorch (few_shot_learning_system.py) step
by step, on the original's network and inner-loop rule (mamlpp_fast.network, whose module and parameter
names give `state_dict()` the original's keys: a checkpoint of the original loads here unchanged and
ours loads there). It supplies only the outer forward; everything around it (the meta-optimizer and its
schedule, MSL weights, the non-finite policy, running-statistics snapshots, checkpoint files) is the
learner core both learners share (mamlpp_fast.learner_core).

Deliberate differences (each documented where it happens):
- the running statistics of batch norm are backed up before evaluation with a real copy and restored
  after each evaluation task, so validation leaves them unchanged. The original's backup shares
  storage with the live statistics, so its restore restores nothing (its issue #42): set the config key
  `bn_backup_aliasing=True` to reproduce that (network.MetaBatchNormLayer);
- the learning rate is set from the cosine closed form (what the original's deprecated
  `scheduler.step(epoch=...)` computes) and `losses['learning_rate']` reports the rate used;
- in evaluation the target set is scored after the last evaluation step (the original scores it after
  step `number_of_training_steps_per_iter - 1`, which is the same step whenever the two counts agree,
  and crashes when there are fewer evaluation steps);
- no leading "device" dimension on fast weights (the original carries one of size 1 and sums it away).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NonFiniteError  # noqa: F401 (re-exported)
from .learner_core import LearnerAPI
from .network import (BN_EPS, BN_MOMENTUM, LEAKY_SLOPE, LSLRGradientDescentLearningRule,  # noqa: F401 (re-exported)
                      MetaBatchNormLayer, MetaConv2dLayer, MetaConvNormLayerReLU, MetaLinearLayer, VGGReLUNormNetwork)

__all__ = ["MAMLFewShotClassifier", "VGGReLUNormNetwork", "LSLRGradientDescentLearningRule", "NonFiniteError"]


class MAMLFewShotClassifier(LearnerAPI, nn.Module):
    """MAML++ few-shot classifier, one task at a time (the original's algorithm and API).

    The outer forward is this class; the public methods (run_train_iter, run_validation_iter, save_model,
    load_model, meta_update, ...) and the attributes `optimizer` and `scheduler` come from the learner
    core (`self.core`, mamlpp_fast.learner_core) through LearnerAPI.

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
        core = self._init_core(im_shape, device, args)  # config, seed, network, LSLR (learner_core.LearnerAPI)
        core.attach(self)  # the meta-optimizer (Adam) and its cosine schedule

    # -- the algorithm -------------------------------------------------------------------------------------
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

    def train_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch, **self.core.train_phase(epoch))

    def evaluation_forward_prop(self, data_batch, epoch):
        return self.forward(data_batch, epoch, **self.core.evaluation_phase())
