"""A non-finite meta-loss or gradient never reaches the parameters (or the running statistics); the
learner names the task and inner step that produced it, and skips or stops per nonfinite_policy."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from _batches import fresh_seed, learnable_batch
from mamlpp_fast.config import default_args
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference
from mamlpp_fast.reference import NonFiniteError

CFG = dict(cnn_num_filters=8, num_stages=3, image_height=14, image_width=14, batch_size=3,
           number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2)


def poisoned(seed, task=1):
    b = [a.copy() for a in learnable_batch(3, 5, 1, 1, 1, 14, 14, seed)]
    b[0][task, 2, 0, 0, 3, 3] = np.inf
    return tuple(b)


@pytest.mark.parametrize("cls", [Reference, Fast], ids=["reference", "fast"])
def test_nonfinite_batch_is_skipped_and_located(cls):
    seed = fresh_seed()
    model = cls((2, 1, 14, 14), "cpu", default_args(**CFG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _ = model.run_train_iter(poisoned(seed), 0)
    assert losses["skipped"] is True
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1 and "task 1" in msgs[0], msgs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped update (seed {seed})"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses, _ = model.run_train_iter(learnable_batch(3, 5, 1, 1, 1, 14, 14, seed + 1), 0)
    assert losses["skipped"] is False
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", [Reference, Fast], ids=["reference", "fast"])
def test_nonfinite_stop_policy_raises(cls):
    model = cls((2, 1, 14, 14), "cpu", default_args(nonfinite_policy="stop", **CFG))
    with pytest.raises(NonFiniteError, match="task 2"):
        model.run_train_iter(poisoned(fresh_seed(), task=2), 0)


def test_locate_names_inner_step_of_exploding_learning_rate():
    """A huge inner learning rate makes the target loss after step 0 overflow: located at step 0."""
    model = Reference((2, 1, 14, 14), "cpu", default_args(nonfinite_policy="stop", **CFG))
    with torch.no_grad():
        for p in model.inner_loop_optimizer.parameters():
            p.fill_(1e38)
    with pytest.raises(NonFiniteError, match=r"task 0, inner step 0"):
        model.run_train_iter(learnable_batch(3, 5, 1, 1, 1, 14, 14, fresh_seed()), 0)


@pytest.mark.parametrize("where, finite", [("none", True), ("huge", True), ("loss-nan", False), ("loss-inf", False),
                                           ("grad-nan", False), ("grad-inf", False), ("grad-minus-inf", False)])
def test_finite_flag_finds_any_nonfinite_value(where, finite):
    """LearnerCore.finite_flag on the device: false exactly when the loss or one element of one gradient
    is an infinity or a NaN; a large finite gradient (1e18: its squared norm still fits float32) is
    finite."""
    model = Fast((2, 1, 14, 14), "cpu", default_args(**CFG))
    params = list(model.core.trainable_parameters())
    g = torch.Generator().manual_seed(fresh_seed())
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    loss = torch.tensor(1.5)
    last = params[-1].grad.view(-1)
    if where == "huge":
        last[0] = 1e18
    elif where == "none":
        pass
    elif where.startswith("loss"):
        loss = torch.tensor(float("nan") if where.endswith("nan") else float("inf"))
    else:
        last[-1] = {"grad-nan": float("nan"), "grad-inf": float("inf"), "grad-minus-inf": float("-inf")}[where]
    flag = model.core.finite_flag(loss)
    assert flag.dim() == 0 and flag.dtype == torch.bool and bool(flag) == finite
