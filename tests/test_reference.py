"""Unit tests of the reference learner (mamlpp_fast.reference) against hand-computed values and against a
small functional MAML++ written here from the paper / docs/ORIGINAL.md (no code of the original).

Tiny networks (8 filters) on CPU. Exactness checks run in float64, where two correct computations of
the same thing agree to ~1e-12 (docs/NUMERICS.md: in float64 even a 1e-13 perturbation of an inner learning
rate moves meta-gradients only ~1e-9); API checks run in float32.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast.common import BatchError, CheckpointError, cosine_lr, msl_importance_vector
from mamlpp_fast.config import default_args
from mamlpp_fast.reference import MAMLFewShotClassifier, MetaBatchNormLayer
import _batches

S = 3  # inner steps of the tiny test learner
E = 10  # multi_step_loss_num_epochs
F64_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_args(**kw):
    base = dict(cnn_num_filters=8, num_stages=4, number_of_training_steps_per_iter=S,
                number_of_evaluation_steps_per_iter=S, batch_size=2, num_classes_per_set=5,
                num_samples_per_class=1, num_target_samples=2, total_epochs=20, multi_step_loss_num_epochs=E,
                dataset_name="synthetic", device="cpu", learner="reference")
    base.update(kw)
    return default_args(**base)


def make(**kw):
    a = tiny_args(**kw)
    return MAMLFewShotClassifier((2, a.image_channels, a.image_height, a.image_width), "cpu", a)


def learnable_batch(a, seed, noise=0.3, scale=1.0, b=None):
    """Class prototypes plus noise (tests/_batches.py) for the config `a`, images multiplied by `scale`."""
    b = a.batch_size if b is None else b
    xs, xt, ys, yt = _batches.learnable_batch(b, a.num_classes_per_set, a.num_samples_per_class,
                                              a.num_target_samples, a.image_channels, a.image_height,
                                              a.image_width, seed, noise)
    return xs * np.float32(scale), xt * np.float32(scale), ys, yt


def as_tensors(batch, dtype=torch.float64):
    xs, xt, ys, yt = batch
    return (torch.tensor(xs, dtype=dtype), torch.tensor(xt, dtype=dtype), torch.tensor(ys).long(),
            torch.tensor(yt).long())


def fl(t):
    """A Python float of a (possibly graph-carrying) scalar."""
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def stats(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k}


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grad_recorder(model):
    """Record every trainable parameter's .grad when Adam steps (after the imagenet clamp)."""
    names = {id(p): n for n, p in model.named_parameters()}
    rec = {}

    def hook(opt, args, kwargs):
        rec.clear()
        for group in opt.param_groups:
            for p in group["params"]:
                rec[names[id(p)]] = None if p.grad is None else p.grad.detach().clone()
    model.optimizer.register_step_pre_hook(hook)
    return rec


# -- a functional MAML++ written from the spec, for hand checks -------------------------------------------
def functional_net(model, x, step, fast):
    """conv3x3(+bias) -> batch norm with the batch's statistics and BN row `step` -> leaky_relu(0.01)
    [-> max_pool 2x2] per stage; [global avg pool]; linear. Parameters from `fast` (adapted tensors) or
    the model's state (BN gamma/beta)."""
    a = model.args
    p = dict(model.classifier.named_parameters())
    p.update(fast)
    out = x
    for i in range(a.num_stages):
        pre = f"layer_dict.conv{i}."
        out = F.conv2d(out, p[pre + "conv.weight"], p[pre + "conv.bias"], stride=1 if a.max_pooling else 2,
                       padding=int(a.conv_padding))
        gamma, beta = p[pre + "norm_layer.weight"], p[pre + "norm_layer.bias"]
        if a.per_step_bn_statistics and not a.enable_inner_loop_optimizable_bn_params:
            gamma, beta = gamma[step], beta[step]
        mean = out.mean(dim=(0, 2, 3), keepdim=True)
        var = out.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        out = torch.where(out > 0, out, 0.01 * out)
        if a.max_pooling:
            out = F.max_pool2d(out, 2, 2)
    if not a.max_pooling:
        out = out.mean(dim=(2, 3), keepdim=True)
    out = out.flatten(1)
    return out @ p["layer_dict.linear.weights"].t() + p["layer_dict.linear.bias"]


def functional_task(model, xs, ys, xt, yt, num_steps, second_order):
    """Per-step target losses (after each inner step) and final target logits of one task."""
    w = {n: p for n, p in model.classifier.named_parameters()
         if p.requires_grad and (model.args.enable_inner_loop_optimizable_bn_params or "norm_layer" not in n)}
    lrs = model.inner_loop_optimizer.names_learning_rates_dict
    losses, logits = [], None
    for s in range(num_steps):
        loss = F.cross_entropy(functional_net(model, xs, s, w), ys)
        g = torch.autograd.grad(loss, list(w.values()), create_graph=second_order)
        w = {n: w[n] - lrs[n.replace(".", "-")][s] * gi for n, gi in zip(w, g)}
        logits = functional_net(model, xt, s, w)
        losses.append(F.cross_entropy(logits, yt))
    return losses, logits


def functional_meta_loss(model, batch, epoch, second_order, msl=True, num_steps=S):
    """Mean over tasks of the MSL-weighted sum of target losses (msl and epoch < E), else the final one."""
    xs, xt, ys, yt = batch
    w = torch.tensor(msl_importance_vector(S, E, epoch), dtype=torch.float64)
    total = []
    for i in range(xs.shape[0]):
        c, h, wd = xs.shape[-3:]
        ls, _ = functional_task(model, xs[i].reshape(-1, c, h, wd), ys[i].reshape(-1), xt[i].reshape(-1, c, h, wd),
                                yt[i].reshape(-1), num_steps, second_order)
        total.append(sum(w[s] * ls[s] for s in range(num_steps)) if msl and epoch < E else ls[-1])
    return torch.stack(total).mean()


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def max_rel(ga, gb):
    """Largest per-tensor relative difference, denominators floored at 1e-6 of the largest gradient (conv
    biases before batch norm have zero gradient up to rounding, docs/NUMERICS.md)."""
    gmax = max(float(v.abs().max()) for v in gb.values())
    return max(float((ga[k] - gb[k]).abs().max()) / max(float(gb[k].abs().max()), 1e-6 * gmax) for k in gb)


# == MSL ===================================================================================================
@pytest.mark.parametrize("epoch,expected", [
    # S=5, E=10: non-final max(1/5 - e/50, 0.006), final min(1/5 + 4e/50, 1 - 4*0.006)
    (0, [0.2, 0.2, 0.2, 0.2, 0.2]),
    (1, [0.18, 0.18, 0.18, 0.18, 0.28]),
    (5, [0.1, 0.1, 0.1, 0.1, 0.6]),
    (9, [0.02, 0.02, 0.02, 0.02, 0.92]),
    (10, [0.006, 0.006, 0.006, 0.006, 0.976]),
    (25, [0.006, 0.006, 0.006, 0.006, 0.976]),
])
def test_msl_vector_hand_values(epoch, expected):
    w = msl_importance_vector(5, 10, epoch)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)
    assert w.dtype == np.float64
    assert abs(w.sum() - 1.0) < 1e-12  # these epochs keep the weights a convex combination


def test_msl_vector_of_the_learner_three_steps():
    m = make()
    for epoch, expected in [(0, [1 / 3] * 3), (1, [1 / 3 - 1 / 30, 1 / 3 - 1 / 30, 1 / 3 + 2 / 30]),
                            (5, [1 / 6, 1 / 6, 2 / 3]), (E - 1, [1 / 30, 1 / 30, 14 / 15]),
                            (E, [0.01, 0.01, 0.98]), (E + 7, [0.01, 0.01, 0.98])]:
        m.current_epoch = epoch
        v = m.get_per_step_loss_importance_vector()
        assert v.dtype == torch.float32 and v.shape == (S,)
        np.testing.assert_allclose(v.numpy(), np.float32(expected), rtol=0, atol=1e-7)


@pytest.mark.parametrize("epoch", [0, 5, E - 1, E, E + 3])
def test_msl_loss_weighting_and_final_step_only_from_E(epoch):
    m = make(dtype="float64")
    batch = as_tensors(learnable_batch(m.args, seed=epoch))
    m.current_epoch = epoch
    losses, preds = m.train_forward_prop(batch, epoch)
    expected = float(functional_meta_loss(m, batch, epoch, second_order=True).detach())
    assert abs(float(losses["loss"].detach()) - expected) <= F64_TOL * abs(expected)
    # reported weights: the vector of the epoch, whether or not MSL is active
    for i, wi in enumerate(msl_importance_vector(S, E, epoch)):
        assert abs(float(losses[f"loss_importance_vector_{i}"]) - wi) < 1e-15
    if epoch >= E:  # only the final step's target loss, unweighted: same as MSL switched off
        m2 = make(dtype="float64", use_multi_step_loss_optimization=False)
        m2.load_state_dict(m.state_dict())
        l2, _ = m2.train_forward_prop(batch, epoch)
        assert float(l2["loss"].detach()) == float(losses["loss"].detach())


def test_without_msl_only_the_final_target_loss_counts_at_epoch_0():
    m = make(dtype="float64", use_multi_step_loss_optimization=False)
    batch = as_tensors(learnable_batch(m.args, seed=3))
    losses, _ = m.train_forward_prop(batch, 0)
    expected = float(functional_meta_loss(m, batch, 0, second_order=True, msl=False).detach())
    assert abs(float(losses["loss"].detach()) - expected) <= F64_TOL * expected


def test_logits_accuracy_and_loss_keys():
    m = make(dtype="float64")
    raw = learnable_batch(m.args, seed=4)
    batch = as_tensors(raw)
    losses, preds = m.train_forward_prop(batch, 0)
    assert isinstance(preds, list) and len(preds) == m.args.batch_size
    n, t = m.args.num_classes_per_set, m.args.num_target_samples
    for i, p in enumerate(preds):
        assert isinstance(p, np.ndarray) and p.shape == (n * t, n)
        c, h, w = batch[0].shape[-3:]
        _, logits = functional_task(m, batch[0][i].reshape(-1, c, h, w), batch[2][i].reshape(-1),
                                    batch[1][i].reshape(-1, c, h, w), batch[3][i].reshape(-1), S, False)
        np.testing.assert_allclose(p, logits.detach().numpy(), rtol=1e-9, atol=1e-12)
    acc = np.mean([np.argmax(p, 1) == raw[3][i].reshape(-1) for i, p in enumerate(preds)])
    assert losses["accuracy"] == pytest.approx(acc, abs=1e-7)
    assert set(losses) == {"loss", "accuracy"} | {f"loss_importance_vector_{i}" for i in range(S)}


@pytest.mark.parametrize("kw", [dict(), dict(max_pooling=False), dict(per_step_bn_statistics=False),
                                dict(num_stages=2, image_height=20, image_width=20, image_channels=3)])
def test_learner_matches_the_functional_spec(kw):
    m = make(dtype="float64", **kw)
    batch = as_tensors(learnable_batch(m.args, seed=21))
    m.current_epoch = 2  # the MSL weights follow current_epoch (set by run_train_iter), as in the original
    losses, _ = m.train_forward_prop(batch, 2)
    assert fl(losses["loss"]) == pytest.approx(fl(functional_meta_loss(m, batch, 2, True)), rel=F64_TOL)


def test_running_statistics_never_used_for_outputs():
    m = make(dtype="float64")
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = m.classifier(x, 1).detach()
    with torch.no_grad():
        for nl in m.classifier.norm_layers():
            nl.running_mean.fill_(123.0)
            nl.running_var.fill_(1e-3)
    m.eval()  # even in eval mode batch norm normalises with the batch's statistics
    assert torch.equal(m.classifier(x, 1).detach(), out)


# == cosine schedule =========================================================================================
@pytest.mark.parametrize("epoch,expected", [
    (0, 1e-3),
    (25, 1e-5 + (1e-3 - 1e-5) * (1 + math.sqrt(0.5)) / 2),
    (50, (1e-3 + 1e-5) / 2),
    (75, 1e-5 + (1e-3 - 1e-5) * (1 - math.sqrt(0.5)) / 2),
    (100, 1e-5),
])
def test_cosine_lr_hand_values(epoch, expected):
    assert cosine_lr(epoch, 1e-3, 1e-5, 100) == pytest.approx(expected, rel=1e-14, abs=1e-18)


def test_cosine_lr_matches_torch_scheduler_stepped_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=1e-4)
    for epoch in range(41):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(epoch, 2e-3, 1e-4, 40), rel=1e-9)
        opt.step()
        sch.step()


def test_run_train_iter_sets_the_epoch_learning_rate_and_truncates_epoch():
    m = make(num_stages=1)
    batch = learnable_batch(m.args, seed=5)
    for epoch in (0, 3.7, 12):
        losses, _ = m.run_train_iter(batch, epoch)
        lr = cosine_lr(int(epoch), m.args.meta_learning_rate, m.args.min_learning_rate, m.args.total_epochs)
        assert m.optimizer.param_groups[0]["lr"] == lr
        assert losses["learning_rate"] == lr
        assert m.current_epoch == int(epoch)
        # the original's keys; "skipped" (ours: a withheld non-finite update) is the only extra one allowed
        assert set(losses) - {"skipped"} == {"loss", "accuracy", "learning_rate"} | {
            f"loss_importance_vector_{i}" for i in range(S)}
        assert not losses.get("skipped", False)
        assert losses["loss"].dim() == 0 and not losses["loss"].requires_grad
        w = msl_importance_vector(S, E, int(epoch))
        for i in range(S):
            assert float(losses[f"loss_importance_vector_{i}"]) == pytest.approx(w[i], abs=1e-7)


# == LSLR ===================================================================================================
def test_lslr_names_shapes_and_init_values():
    m = make(task_learning_rate=0.05, init_inner_loop_learning_rate=0.7)  # the latter is dead, as theirs
    d = m.inner_loop_optimizer.names_learning_rates_dict
    expected = [f"layer_dict-conv{i}-conv-{p}" for i in range(4) for p in ("weight", "bias")]
    expected += ["layer_dict-linear-weights", "layer_dict-linear-bias"]
    assert list(d.keys()) == expected and len(d) == 10
    for v in d.values():
        assert v.shape == (S + 1,)
        assert v.requires_grad
        assert torch.equal(v.detach(), torch.full((S + 1,), 0.05, dtype=torch.float32))
    m2 = make(learnable_per_layer_per_step_inner_loop_learning_rate=False)
    d2 = m2.inner_loop_optimizer.names_learning_rates_dict
    assert all(not v.requires_grad for v in d2.values())
    assert all(torch.all(v == torch.tensor(0.1, dtype=torch.float32)) for v in d2.values())
    assert not any(p is v for p in m2.trainable_parameters() for v in d2.values())


def test_lslr_update_rule_by_hand():
    m = make(dtype="float64", num_stages=1)
    opt = m.inner_loop_optimizer
    with torch.no_grad():
        opt.names_learning_rates_dict["layer_dict-linear-bias"].copy_(torch.tensor([0.5, 0.25, 2.0, 9.0]))
    w = {"layer_dict.linear.bias": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)}
    g = {"layer_dict.linear.bias": torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0], dtype=torch.float64)}
    for step, lr in enumerate([0.5, 0.25, 2.0]):
        out = opt.update_params(w, g, step)["layer_dict.linear.bias"]
        assert torch.equal(out.detach(), w["layer_dict.linear.bias"] - lr * g["layer_dict.linear.bias"])


def test_lslr_last_entry_unused_and_step_entries_learn():
    m = make(num_stages=2)
    rec = grad_recorder(m)
    m.run_train_iter(learnable_batch(m.args, seed=6), 0)
    g = rec["inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-weights"]
    assert g.shape == (S + 1,)
    assert float(g[S]) == 0.0
    assert torch.all(g[:S] != 0)


def test_inner_loop_bn_params_are_adapted():
    m = make(dtype="float64", enable_inner_loop_optimizable_bn_params=True)
    d = m.inner_loop_optimizer.names_learning_rates_dict
    assert len(d) == 18
    for i in range(4):
        for p in ("weight", "bias"):
            assert f"layer_dict-conv{i}-norm_layer-{p}" in d
            assert getattr(m.classifier.layer_dict[f"conv{i}"].norm_layer, p).shape == (8,)
    assert m.classifier.layer_dict["conv0"].norm_layer.running_mean.shape == (S, 8)
    adapted = m.get_inner_loop_parameter_dict(m.classifier.named_parameters())
    assert "layer_dict.conv2.norm_layer.weight" in adapted and "layer_dict.conv2.norm_layer.bias" in adapted
    batch = as_tensors(learnable_batch(m.args, seed=7))
    l1 = fl(m.train_forward_prop(batch, 0)[0]["loss"])
    assert l1 == pytest.approx(fl(functional_meta_loss(m, batch, 0, True)), rel=F64_TOL)
    with torch.no_grad():  # stop adapting gamma/beta: the loss must change
        for k, v in d.items():
            if "norm_layer" in k:
                v.zero_()
    l2 = fl(m.train_forward_prop(batch, 0)[0]["loss"])
    assert abs(l1 - l2) > 1e-8


def test_bn_not_adapted_by_default():
    m = make()
    assert not any("norm_layer" in k for k in m.get_inner_loop_parameter_dict(m.classifier.named_parameters()))


# == state_dict =============================================================================================
def expected_keys(stages):
    keys = []
    for i in range(stages):
        keys += [f"classifier.layer_dict.conv{i}.conv.weight", f"classifier.layer_dict.conv{i}.conv.bias"]
        keys += [f"classifier.layer_dict.conv{i}.norm_layer.{p}" for p in ("running_mean", "running_var", "bias",
                                                                           "weight")]
    keys += ["classifier.layer_dict.linear.weights", "classifier.layer_dict.linear.bias"]
    for i in range(stages):
        keys += [f"inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv{i}-conv-{p}"
                 for p in ("weight", "bias")]
    keys += ["inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-weights",
             "inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-bias"]
    return keys


def test_state_dict_keys_shapes_and_initial_values():
    m = make()
    sd = m.state_dict()
    assert list(sd) == expected_keys(4)
    assert sd["classifier.layer_dict.conv0.conv.weight"].shape == (8, 1, 3, 3)
    assert sd["classifier.layer_dict.conv1.conv.weight"].shape == (8, 8, 3, 3)
    assert torch.all(sd["classifier.layer_dict.conv0.conv.bias"] == 0)
    for i in range(4):
        pre = f"classifier.layer_dict.conv{i}.norm_layer."
        for p in ("running_mean", "running_var", "bias", "weight"):
            assert sd[pre + p].shape == (S, 8)
        assert torch.all(sd[pre + "running_mean"] == 0)
        # the build-time dummy passes (zeros, twice) move row 0 of running_var to 0.9 * 0.9
        assert torch.allclose(sd[pre + "running_var"][0], torch.full((8,), 0.81), atol=1e-7, rtol=0)
        assert torch.all(sd[pre + "running_var"][1:] == 1)
        assert torch.all(sd[pre + "weight"] == 1) and torch.all(sd[pre + "bias"] == 0)
    # omniglot 28 -> 14 -> 7 -> 3 -> 1: 8 features
    assert sd["classifier.layer_dict.linear.weights"].shape == (5, 8)
    assert torch.all(sd["classifier.layer_dict.linear.bias"] == 0)
    # parameters are nn.Parameters with requires_grad only where trainable
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert not any("running_" in n for n in trainable)
    assert len(trainable) == 4 * 4 + 2 + 10


def test_same_seed_same_init_and_seed_matters():
    a, b, c = make(), make(), make(seed=105)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.state_dict()["classifier.layer_dict.conv0.conv.weight"],
                           c.state_dict()["classifier.layer_dict.conv0.conv.weight"])


@pytest.mark.parametrize("kw,features", [
    (dict(), 8),
    (dict(max_pooling=False), 8),  # 28 -> 14 -> 7 -> 4 -> 2, global average pool
    (dict(image_height=84, image_width=84, image_channels=3), 8 * 25),  # mini-ImageNet 84 -> ... -> 5
])
def test_linear_input_size(kw, features):
    m = make(**kw)
    assert m.state_dict()["classifier.layer_dict.linear.weights"].shape == (5, features)


def test_without_per_step_bn_statistics():
    m = make(per_step_bn_statistics=False)
    sd = m.state_dict()
    nl = "classifier.layer_dict.conv0.norm_layer."
    assert sd[nl + "weight"].shape == (8,) and sd[nl + "bias"].shape == (8,)
    assert torch.all(sd[nl + "running_var"] == 0) and torch.all(sd[nl + "running_mean"] == 0)
    before = stats(m)
    m.run_train_iter(learnable_batch(m.args, seed=8), 0)
    for k, v in stats(m).items():  # not tracked
        assert torch.equal(v, before[k])


# == batch norm: per-step rows and running statistics ========================================================
def test_batch_norm_by_hand():
    a = tiny_args(number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2)
    bn = MetaBatchNormLayer(1, a)
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    y = bn(x, 1)
    # batch mean 2, biased variance 1 for the output; unbiased variance 2 for the running estimate
    np.testing.assert_allclose(y.detach().view(-1).numpy(), np.array([-1, 1]) / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert bn.running_mean[1].item() == pytest.approx(0.2, abs=1e-7)
    assert bn.running_var[1].item() == pytest.approx(0.9 * 1 + 0.1 * 2, abs=1e-7)
    assert bn.running_mean[0].item() == 0 and bn.running_var[0].item() == 1
    with torch.no_grad():
        bn.weight[1].fill_(3.0)
        bn.bias[1].fill_(-1.0)
    y = bn(x, 1)
    np.testing.assert_allclose(y.detach().view(-1).numpy(), 3 * np.array([-1, 1]) / np.sqrt(1 + 1e-5) - 1,
                               rtol=1e-6)
    y0 = bn(x, 0)  # row 0 still identity
    np.testing.assert_allclose(y0.detach().view(-1).numpy(), np.array([-1, 1]) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_bn_row_s_is_used_at_step_s_only():
    m = make(dtype="float64")
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = [m.classifier(x, s).detach() for s in range(S)]
    nl = m.classifier.layer_dict["conv1"].norm_layer
    with torch.no_grad():
        nl.weight[1].mul_(2.0)
        nl.bias[1].add_(0.5)
    outs2 = [m.classifier(x, s).detach() for s in range(S)]
    assert torch.equal(outs2[0], outs[0]) and torch.equal(outs2[2], outs[2])
    assert (outs2[1] - outs[1]).abs().max() > 1e-3


def test_bn_last_row_does_not_touch_earlier_steps_of_the_learner():
    m = make(dtype="float64")
    batch = as_tensors(learnable_batch(m.args, seed=9))
    # MSL over the first two steps only: uses rows 0 and 1
    args = dict(epoch=0, use_second_order=False, use_multi_step_loss_optimization=True, num_steps=2,
                training_phase=True)
    base = fl(m.forward(batch, **args)[0]["loss"])
    with torch.no_grad():
        for i in range(4):
            nl = m.classifier.layer_dict[f"conv{i}"].norm_layer
            nl.weight[2].mul_(3.0)
            nl.bias[2].add_(1.0)
    assert fl(m.forward(batch, **args)[0]["loss"]) == base
    with torch.no_grad():
        m.classifier.layer_dict["conv0"].norm_layer.bias[1].add_(1.0)
    assert abs(fl(m.forward(batch, **args)[0]["loss"]) - base) > 1e-6


class BNInputs:
    """Records (num_step, input) of every call of one batch-norm layer."""

    def __init__(self, layer):
        self.calls = []
        layer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        step = args[1] if len(args) > 1 else kwargs["num_step"]
        self.calls.append((int(step), args[0].detach().clone()))


def expected_running_stats(before_mean, before_var, calls):
    rm, rv = before_mean.clone(), before_var.clone()
    for step, x in calls:
        rm[step] = 0.9 * rm[step] + 0.1 * x.mean(dim=(0, 2, 3))
        rv[step] = 0.9 * rv[step] + 0.1 * x.var(dim=(0, 2, 3), unbiased=True)
    return rm, rv


@pytest.mark.parametrize("epoch,order", [
    (0, [(0, "s"), (0, "t"), (1, "s"), (1, "t"), (2, "s"), (2, "t")]),  # MSL: a target pass after every step
    (E, [(0, "s"), (1, "s"), (2, "s"), (2, "t")]),  # only the final target pass
])
def test_running_stats_rows_momentum_and_unbiased_variance(epoch, order):
    m = make(dtype="float64")
    nl = m.classifier.layer_dict["conv1"].norm_layer
    rec = BNInputs(nl)
    rm0, rv0 = nl.running_mean.detach().clone(), nl.running_var.detach().clone()
    n, k, t = m.args.num_classes_per_set, m.args.num_samples_per_class, m.args.num_target_samples
    m.run_train_iter(learnable_batch(m.args, seed=10), epoch)
    got = [(s, "s" if x.shape[0] == n * k else "t") for s, x in rec.calls]
    assert got == order * m.args.batch_size
    assert all(x.shape[0] == (n * k if kind == "s" else n * t) for (_, x), (_, kind) in zip(rec.calls, got))
    rm, rv = expected_running_stats(rm0, rv0, rec.calls)
    torch.testing.assert_close(nl.running_mean.detach(), rm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nl.running_var.detach(), rv, rtol=1e-12, atol=1e-14)


# == derivative-order annealing ===========================================================================
def test_first_order_meta_gradient_matches_manual_and_differs_from_second_order():
    m = make(dtype="float64", num_stages=2)
    batch = as_tensors(learnable_batch(m.args, seed=11))
    kw = dict(use_multi_step_loss_optimization=True, num_steps=S, training_phase=True)
    g1 = grads_of(m, m.forward(batch, 0, use_second_order=False, **kw)[0]["loss"])
    g2 = grads_of(m, m.forward(batch, 0, use_second_order=True, **kw)[0]["loss"])
    m1 = grads_of(m, functional_meta_loss(m, batch, 0, second_order=False))
    m2 = grads_of(m, functional_meta_loss(m, batch, 0, second_order=True))
    assert max_rel(g1, m1) < 1e-9
    assert max_rel(g2, m2) < 1e-9
    key = "inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv0-conv-weight"
    assert abs(float(g1[key][0]) - float(g2[key][0])) > 1e-6 * abs(float(g2[key][0]))
    assert float(g1[key][0]) != 0.0  # first order still gives the rate of step 0 a gradient


@pytest.mark.parametrize("second_order,switch,epoch,expect_second", [
    (True, -1, 0, True),
    (True, 2, 1, False),
    (True, 2, 2, False),  # strictly greater than the switch epoch
    (True, 2, 3, True),
    (False, -1, 5, False),
])
def test_second_order_iff_enabled_and_epoch_after_switch(second_order, switch, epoch, expect_second):
    m = make(dtype="float64", num_stages=2, second_order=second_order, first_order_to_second_order_epoch=switch)
    batch = as_tensors(learnable_batch(m.args, seed=12))
    m.current_epoch = epoch
    g = grads_of(m, m.train_forward_prop(batch, epoch)[0]["loss"])
    ref = grads_of(m, m.forward(batch, epoch, use_second_order=expect_second, use_multi_step_loss_optimization=True,
                                num_steps=S, training_phase=True)[0]["loss"])
    other = grads_of(m, m.forward(batch, epoch, use_second_order=not expect_second,
                                  use_multi_step_loss_optimization=True, num_steps=S, training_phase=True)[0]["loss"])
    assert max_rel(g, ref) < 1e-12
    assert max_rel(g, other) > 1e-6


# == imagenet gradient clamp ==============================================================================
def test_imagenet_clamps_classifier_gradients_before_adam():
    recs, models = {}, {}
    for ds in ("mini_imagenet", "omniglot_dataset"):
        m = make(dataset_name=ds, num_stages=2)
        with torch.no_grad():  # tiny first-layer weights and huge images: huge meta-gradients
            m.classifier.layer_dict["conv0"].conv.weight.mul_(1e-3)
        recs[ds], models[ds] = grad_recorder(m), m
        m.run_train_iter(learnable_batch(m.args, seed=13, scale=1e3), 0)
    clamped, raw = recs["mini_imagenet"], recs["omniglot_dataset"]
    cls = [k for k in raw if k.startswith("classifier.")]
    assert max(float(raw[k].abs().max()) for k in cls) > 10  # the case is a real one
    assert max(float(clamped[k].abs().max()) for k in cls) <= 10
    assert sum(int((clamped[k].abs() == 10).sum()) for k in cls) > 0
    for k in raw:
        if k.startswith("classifier."):
            assert torch.equal(clamped[k], raw[k].clamp(-10, 10)), k
        else:  # LSLR rates are not clamped
            assert torch.equal(clamped[k], raw[k]), k


# == BN backup around evaluation ===========================================================================
@pytest.mark.parametrize("aliasing", [False, True])
def test_validation_and_running_stats_backup(aliasing):
    m = make(bn_backup_aliasing=aliasing)
    batch = learnable_batch(m.args, seed=14)
    m.run_train_iter(batch, 0)
    before_stats, before = stats(m), params(m)
    losses, preds = m.run_validation_iter(batch)
    assert set(losses) - {"skipped"} == {"loss", "accuracy"} | {f"loss_importance_vector_{i}" for i in range(S)}
    assert len(preds) == m.args.batch_size
    after = params(m)
    for k, v in before.items():
        if "running_" not in k:
            assert torch.equal(after[k], v), k  # evaluation never changes parameters
    changed = any(not torch.equal(after[k], v) for k, v in before_stats.items())
    assert changed == aliasing  # real copies restore the statistics; the original's aliasing does not
    assert all(p.grad is None for p in m.parameters())


def test_validation_outputs_do_not_depend_on_backup_mode():
    a, b = make(dtype="float64"), make(dtype="float64", bn_backup_aliasing=True)
    batch = learnable_batch(a.args, seed=15)
    la, pa = a.run_validation_iter(batch)
    lb, pb = b.run_validation_iter(batch)
    assert float(la["loss"]) == float(lb["loss"])
    np.testing.assert_array_equal(np.stack(pa), np.stack(pb))
    # evaluation: final-step target loss after number_of_evaluation_steps_per_iter steps, unweighted
    tb = as_tensors(batch)
    expected = functional_meta_loss(a, tb, 0, second_order=False, msl=False)
    assert float(la["loss"]) == pytest.approx(fl(expected), rel=F64_TOL)


def test_fewer_evaluation_steps_score_after_the_last_one():
    m = make(dtype="float64", number_of_evaluation_steps_per_iter=2)
    batch = learnable_batch(m.args, seed=16)
    losses, _ = m.run_validation_iter(batch)
    expected = functional_meta_loss(m, as_tensors(batch), 0, second_order=False, msl=False, num_steps=2)
    assert float(losses["loss"]) == pytest.approx(fl(expected), rel=F64_TOL)


# == checkpoints ===========================================================================================
def test_save_and_load_round_trip(tmp_path):
    m = make(num_stages=2)
    m.run_train_iter(learnable_batch(m.args, seed=17), 1)
    state = {"best_val_acc": 0.25, "current_iter": 7, "per_epoch_statistics": {"train_loss_mean": [1.5]}}
    m.save_model(str(tmp_path / "train_model_3"), dict(state))
    assert os.listdir(tmp_path) == ["train_model_3"]  # atomic: no temporary file left behind
    fresh = make(num_stages=2, seed=999)
    got = fresh.load_model(str(tmp_path), "train_model", 3)
    for k, v in state.items():
        assert got[k] == v
    assert "network" in got and "optimizer" in got
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    so, sf = m.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert so["state"].keys() == sf["state"].keys()
    for i in so["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(so["state"][i][k]), torch.as_tensor(sf["state"][i][k]))
    # and both continue identically
    batch = learnable_batch(m.args, seed=18)
    l1, _ = m.run_train_iter(batch, 2)
    l2, _ = fresh.run_train_iter(batch, 2)
    assert float(l1["loss"]) == float(l2["loss"])
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_failed_save_keeps_the_previous_file_and_no_temp(tmp_path):
    m = make(num_stages=1)
    path = tmp_path / "train_model_latest"
    m.save_model(str(path), {"current_iter": 1})
    content = path.read_bytes()
    with pytest.raises(Exception):
        m.save_model(str(path), {"current_iter": 2, "bad": lambda: None})  # cannot be pickled
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["train_model_latest"]


def test_corrupt_truncated_missing_or_mismatched_checkpoint(tmp_path):
    m = make(num_stages=1)
    (tmp_path / "train_model_1").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="train_model_1"):
        m.load_model(str(tmp_path), "train_model", 1)
    m.save_model(str(tmp_path / "train_model_2"), {})
    data = (tmp_path / "train_model_2").read_bytes()
    (tmp_path / "train_model_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="train_model_2"):
        m.load_model(str(tmp_path), "train_model", 2)
    with pytest.raises(CheckpointError, match="train_model_9"):
        m.load_model(str(tmp_path), "train_model", 9)
    torch.save({"something": 1}, str(tmp_path / "train_model_4"))
    with pytest.raises(CheckpointError, match="train_model_4"):
        m.load_model(str(tmp_path), "train_model", 4)
    make(num_stages=1, cnn_num_filters=4).save_model(str(tmp_path / "train_model_5"), {})
    with pytest.raises(CheckpointError, match="train_model_5"):
        m.load_model(str(tmp_path), "train_model", 5)


# == data batches ==========================================================================================
def batch_variants(raw):
    xs, xt, ys, yt = raw
    return {
        "numpy int64": raw,
        "numpy float32 labels": (xs, xt, ys.astype(np.float32), yt.astype(np.float32)),
        "numpy int32 labels, float64 images": (xs.astype(np.float64), xt.astype(np.float64), ys.astype(np.int32),
                                               yt.astype(np.int32)),
        "torch int": tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in raw),
        "torch float labels": (torch.from_numpy(xs), torch.from_numpy(xt), torch.from_numpy(ys).float(),
                               torch.from_numpy(yt).float()),
    }


def test_batch_types_give_identical_results():
    base = make(num_stages=2)
    raw = learnable_batch(base.args, seed=19)
    results = {}
    for name, batch in batch_variants(raw).items():
        m = copy.deepcopy(base)
        lt, pt = m.run_train_iter(batch, 0)
        lv, pv = m.run_validation_iter(batch)
        results[name] = (float(lt["loss"]), np.stack(pt), float(lv["loss"]), np.stack(pv), params(m))
    ref = results["numpy int64"]
    for name, r in results.items():
        assert r[0] == ref[0] and r[2] == ref[2], name
        np.testing.assert_array_equal(r[1], ref[1])
        np.testing.assert_array_equal(r[3], ref[3])
        for k, v in ref[4].items():
            assert torch.equal(r[4][k], v), (name, k)


def _bad(raw, what):
    xs, xt, ys, yt = (np.array(a) for a in raw)
    if what == "ndim":
        return xs[0], xt, ys, yt
    if what == "n_mismatch":
        return xs[:, :3], xt[:, :3], ys[:, :3], yt[:, :3]
    if what == "label_range":
        ys = ys.copy()
        ys[0, 0, 0] = 5
        return xs, xt, ys, yt
    if what == "negative_label":
        yt = yt.copy()
        yt[1, 2, 0] = -1
        return xs, xt, ys, yt
    if what == "float_label":
        yt = yt.astype(np.float32)
        yt[0, 1, 0] = 0.5
        return xs, xt, ys, yt
    if what == "image_size":
        return xs[..., :24, :24], xt[..., :24, :24], ys, yt
    if what == "support_target_images":
        return xs, xt[..., :24, :24], ys, yt
    if what == "y_shape":
        return xs, xt, ys[:, :, :0], yt
    if what == "yt_shape":
        return xs, xt, ys, yt[:, :, :1]
    if what == "tasks":
        return xs, xt[:1], ys, yt[:1]
    if what == "too_few":
        return xs, xt, ys
    raise AssertionError(what)


@pytest.mark.parametrize("what,pattern", [
    ("ndim", "x_support"), ("n_mismatch", "N=3"), ("label_range", "y_support"), ("negative_label", "y_target"),
    ("float_label", "y_target"), ("image_size", r"images are \(1, 24, 24\)"),
    ("support_target_images", "target images"), ("y_shape", "y_support"), ("yt_shape", "y_target"),
    ("tasks", "x_target"), ("too_few", "x_support, x_target, y_support, y_target"),
])
def test_bad_batches_raise_batch_error_naming_the_part(what, pattern):
    m = make(num_stages=1)
    raw = learnable_batch(m.args, seed=20)
    before = params(m)
    bad = _bad(raw, what)
    with pytest.raises(BatchError, match=pattern):
        m.run_train_iter(bad, 0)
    with pytest.raises(BatchError, match=pattern):
        m.run_validation_iter(bad)
    for k, v in params(m).items():  # nothing was changed by the rejected batch
        assert torch.equal(v, before[k]), k


# == it learns ===========================================================================================
def test_learns_a_tiny_synthetic_task():
    """Tasks built from 5 fixed classes (prototype + heavy noise), labels consistent across tasks: one inner
    loop from a random init cannot solve them, a meta-learned init can. The held-out loss must fall."""
    m = make(num_stages=2, cnn_num_filters=8, meta_learning_rate=0.005, number_of_training_steps_per_iter=2,
             number_of_evaluation_steps_per_iter=2, image_height=12, image_width=12, num_target_samples=3,
             batch_size=4)
    a = m.args
    rng = np.random.RandomState(0)
    protos = rng.randn(a.num_classes_per_set, 1, a.image_height, a.image_width)

    def sample(seed):
        r = np.random.RandomState(seed)
        n, k, t = a.num_classes_per_set, a.num_samples_per_class, a.num_target_samples
        xs = protos[None, :, None] + 1.5 * r.randn(a.batch_size, n, k, 1, a.image_height, a.image_width)
        xt = protos[None, :, None] + 1.5 * r.randn(a.batch_size, n, t, 1, a.image_height, a.image_width)
        ys = np.broadcast_to(np.arange(n)[None, :, None], (a.batch_size, n, k))
        yt = np.broadcast_to(np.arange(n)[None, :, None], (a.batch_size, n, t))
        return xs.astype(np.float32), xt.astype(np.float32), ys.copy(), yt.copy()

    held_out = [sample(10_000 + i) for i in range(3)]

    def held_out_loss():
        return float(np.mean([float(m.run_validation_iter(b)[0]["loss"]) for b in held_out]))

    before = held_out_loss()
    train = [float(m.run_train_iter(sample(i), 0)[0]["loss"]) for i in range(20)]
    after = held_out_loss()
    assert after < 0.6 * before, (before, after, train)  # ~1.8 -> ~0.7 for several seeds
    assert np.mean(train[-5:]) < np.mean(train[:5]), train
