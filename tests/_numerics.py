"""The float32 criterion of the learner-equivalence tests: as exact as the reference, against float64 truth.

Why not compare the float32 fast learner with the float32 reference directly: the MAML++ meta-gradient is a
badly conditioned function of its inputs (docs/NUMERICS.md). Two correct float32 implementations that sum in
different orders usually agree to ~1e-6, but now and then rounding puts an activation on the other side of a
discrete choice (a max-pool near-tie, the leaky-ReLU kink); the gradient is rerouted there and the second-order
inner loop amplifies the difference to 1e-3..1e-1. Such an event hits either learner, so any fixed tolerance
between the two is either loose or flaky.

What is compared instead. From one float32 state and batch, three learners run one meta-update (outer forward,
backward, Adam step): the float64 reference learner (the truth, started from the same float32 values), the
float32 reference learner and the float32 fast learner. For each group of results (`GROUPS`), each float32
learner gets an error against the truth (`learner_errors`). A seed counts against the fast learner when, for some
group, its error exceeds `FACTOR` times the reference learner's own error plus a floor of a few float32 roundings
(`worse_groups`). A rounding event that hits the reference learner as hard as the fast learner does not count;
one that hits only the fast learner does, and happens on a fraction of seeds measured by
`tests/tolerance_sweep.py` (docs/NUMERICS.md has the numbers). The test (`assert_as_exact_as_reference`) draws
up to `NUM_SEEDS` fresh seeds and fails only when at least `MAX_WORSE + 1` of them count against the fast
learner: with the per-seed rate p measured over >= 1000 seeds, a correct implementation fails with the binomial
tail probability P[Bin(NUM_SEEDS, p) > MAX_WORSE] (below 1e-6 for every covered configuration), while a real
fault makes (nearly) every seed count.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch

from _batches import fresh_seed, learnable_batch
from mamlpp_fast.config import default_args
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference

GROUPS = ("loss", "logits", "grad_median", "grad_total", "running_stats", "adam_signs")

# The decision rule, derived with tests/tolerance_sweep.py (docs/NUMERICS.md has the numbers).
# - FACTOR: a seed counts against the fast learner when its error in some group exceeds FACTOR x the reference
#   learner's error plus the group's floor. Over 1000 seeds per configuration the fraction of such seeds changes
#   by at most 1% between factors 2 and 10: they are rounding events (a discrete choice flipped in the fast
#   learner only, errors 1e2..1e5 x the reference's), not a spread of ordinary rounding. 3 keeps the test
#   sensitive; the measured rate at 3 is 4.8% (native), 5.6% (torch), 6.8% (native with im2col convolutions).
# - FLOORS: errors relative to the truth's norm below ~16 float32 unit roundoffs (1e-6) are not told apart (a
#   reference error of exactly 0 happens); adam_signs is a fraction of elements: 2e-3.
# - NUM_SEEDS, MAX_WORSE: the test fails when more than MAX_WORSE of NUM_SEEDS fresh seeds count against the
#   fast learner. With the per-seed rate at its 99.9% upper confidence bound from the sweep (7.3% native, 8.2%
#   torch, 9.6% native with im2col convolutions), a correct learner fails one run with probability
#   P[Bin(16, p) >= 10] <= 3.1e-7; an injected fault counts on every seed (tests/test_fast_equivalence.py,
#   test_float32_criterion_catches_faults).
FACTOR = 3.0
FLOORS = {"loss": 1e-6, "logits": 1e-6, "grad_median": 1e-6, "grad_total": 1e-6, "running_stats": 1e-6,
          "adam_signs": 2e-3}
NUM_SEEDS = 16
MAX_WORSE = 9

# The covered float32 configurations: (name, backend, config overrides, tasks per batch, epoch).
FP32_CONFIG = dict(cnn_num_filters=16, num_classes_per_set=5, number_of_training_steps_per_iter=5,
                   number_of_evaluation_steps_per_iter=5)
FP32_CASES = {
    "native": ("native", dict(FP32_CONFIG, conv_impl="grouped"), 2, 0),
    "torch": ("torch", dict(FP32_CONFIG, conv_impl="grouped"), 2, 0),
    "native-unfold": ("native", dict(FP32_CONFIG, conv_impl="unfold"), 2, 0),
}


def rel(a, b, floor: float = 0.0) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def is_noise_param(key: str) -> bool:
    """Conv biases feed batch norm, which removes any per-channel constant: their exact meta-gradient is 0 and
    autograd returns rounding noise; so does the gradient of their LSLR rates."""
    return key.endswith("conv.bias") or key.endswith("conv-bias")


def _one_update(model, batch, epoch):
    """One meta-update as run_train_iter does it (forward, backward, Adam step), keeping what is compared:
    (loss, target logits, meta-gradients, state before, state after), all as float64 CPU tensors."""
    before = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    model.current_epoch = epoch
    model._set_epoch_learning_rate(epoch)
    with model._precision():
        data = model._batch(batch)
        losses, preds = model.train_forward_prop(data, epoch)
        assert model.meta_update(losses["loss"]), "the meta-update was withheld (non-finite)"
    grads = {n: (p.grad.detach().to("cpu", torch.float64).clone() if p.grad is not None
                 else torch.zeros(p.shape, dtype=torch.float64))
             for n, p in model.named_parameters() if p.requires_grad}
    after = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    logits = torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(-1) for p in preds])
    return float(losses["loss"].detach()), logits, grads, before, after


def _errors(run, truth, trainable) -> dict:
    loss, logits, grads, before, after = run
    t_loss, t_logits, t_grads, _, t_after = truth
    floor = 1e-3 * max(float(g.norm()) for g in t_grads.values())
    per_tensor = sorted(rel(grads[n], t_grads[n], floor) for n in t_grads)
    signal = [n for n in t_grads if not is_noise_param(n)]
    flips, moved = 0, 0
    for key in signal:
        if key not in trainable:
            continue
        d_truth, d_run = t_after[key] - before[key], after[key] - before[key]
        mask = d_truth != 0
        moved += int(mask.sum())
        flips += int((torch.sign(d_run) != torch.sign(d_truth))[mask].sum())
    return {
        "loss": abs(loss - t_loss) / max(abs(t_loss), 1e-300),
        "logits": rel(logits, t_logits),
        "grad_median": per_tensor[len(per_tensor) // 2],
        "grad_total": rel(torch.cat([grads[n].reshape(-1) for n in signal]),
                          torch.cat([t_grads[n].reshape(-1) for n in signal])),
        "running_stats": max(rel(after[k], t_after[k]) for k in t_after if "running" in k) if any(
            "running" in k for k in t_after) else 0.0,
        "adam_signs": flips / max(moved, 1),
    }


def learner_errors(backend: str, cfg: dict, b: int, epoch: int, seed: int,
                   fault: Callable[[], contextlib.AbstractContextManager] | None = None, device: str = "cpu") -> dict:
    """{group: (reference error, fast error)} of one meta-update in float32 against the float64 reference.

    The parameters are initialised from `seed` (config key seed), the batch is `learnable_batch(seed)`.
    `fault`, when given, is entered around the fast learner's meta-update only (fault injection). All three
    learners run on `device`."""
    args32 = default_args(dtype="float32", backend=backend, seed=seed % (2 ** 31), **cfg)
    args64 = default_args(dtype="float64", backend=backend, seed=seed % (2 ** 31), **cfg)
    im_shape = (2, args32.image_channels, args32.image_height, args32.image_width)
    ref32 = Reference(im_shape, device, args32)
    state = copy.deepcopy(ref32.state_dict())
    fast32 = Fast(im_shape, device, args32)
    fast32.load_state_dict(state)
    ref64 = Reference(im_shape, device, args64)
    ref64.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
    batch = learnable_batch(b, args32.num_classes_per_set, args32.num_samples_per_class, args32.num_target_samples,
                            args32.image_channels, args32.image_height, args32.image_width, seed)
    truth = _one_update(ref64, batch, epoch)
    ref = _one_update(ref32, batch, epoch)
    with (fault() if fault is not None else contextlib.nullcontext()):
        fast = _one_update(fast32, batch, epoch)
    trainable = {n for n, p in ref64.named_parameters() if p.requires_grad}
    e_ref, e_fast = _errors(ref, truth, trainable), _errors(fast, truth, trainable)
    return {g: (e_ref[g], e_fast[g]) for g in GROUPS}


def worse_groups(errors: dict, factor: float = FACTOR, floors: dict = FLOORS) -> list:
    """The groups in which the fast learner is less exact than the reference learner by more than
    `factor` (plus the group's floor) on this seed."""
    return [g for g in GROUPS if errors[g][1] > factor * errors[g][0] + floors[g]]


def binomial_tail(n: int, k: int, p: float) -> float:
    """P[Bin(n, p) > k]."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1, n + 1))


def assert_as_exact_as_reference(backend: str, cfg: dict, b: int, epoch: int, fault=None, label: str = "",
                                 device: str = "cpu"):
    """The float32 test: fails when more than MAX_WORSE of NUM_SEEDS fresh seeds find the fast learner less
    exact than the reference (`worse_groups`). Stops as soon as the outcome is decided."""
    worse, passed, report = 0, 0, []
    while worse <= MAX_WORSE and passed < NUM_SEEDS - MAX_WORSE:
        seed = fresh_seed()
        errors = learner_errors(backend, cfg, b, epoch, seed, fault, device)
        groups = worse_groups(errors)
        if groups:
            worse += 1
            report.append(f"seed {seed}: " + ", ".join(
                f"{g} {errors[g][1]:.2e} vs reference {errors[g][0]:.2e}" for g in groups))
        else:
            passed += 1
    assert worse <= MAX_WORSE, (
        f"{label}: the float32 fast learner was less exact than the float32 reference (more than {FACTOR:g}x "
        f"its error against float64 truth, plus floors) on {worse} seeds out of {worse + passed}:\n"
        + "\n".join(report))
