"""Measure how far a tiny perturbation travels through a MAML++ meta-update (the facts behind docs/NUMERICS.md).

Not part of the default test run. Usage, from the repository root:

    python tests/sensitivity_probe.py --seeds 20 > bench/results/sensitivity_probe.txt

For fresh seeds on the float32 test configuration of tests/_numerics.py (16 filters, 5-way, 5 second-order
steps with MSL, B=2), it prints, per dtype and relative perturbation eps of one inner learning rate (the first
layer's weight at inner step 0, or at the last step), the minimum, median and maximum over seeds of
- the relative change of the meta-gradients (all tensors but the noise-gradient conv biases, concatenated);
- the relative change of the parameter updates after three Adam steps on the same batch (the trajectory);
and the float64 rounding difference between the fast and the reference learner (the largest per-tensor
meta-gradient error, conv biases floored as in the tests).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _batches import fresh_seed, learnable_batch  # noqa: E402
from _numerics import FP32_CONFIG, is_noise_param, rel  # noqa: E402
from mamlpp_fast.config import default_args  # noqa: E402
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast  # noqa: E402
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference  # noqa: E402


@contextlib.contextmanager
def scaled_inner_lr(model, scale, step):
    """Multiply entry `step` of the first adapted tensor's LSLR vector by `scale` (restored afterwards)."""
    lr = next(iter(model.inner_loop_optimizer.names_learning_rates_dict.values()))
    old = lr.detach().clone()
    with torch.no_grad():
        lr[step] = lr[step] * scale
    try:
        yield
    finally:
        with torch.no_grad():
            lr.copy_(old)


def meta_gradient(model, batch):
    model.current_epoch = 0
    with model._precision():
        losses, _ = model.train_forward_prop(model._batch(batch), 0)
        model.zero_grad(set_to_none=True)
        losses["loss"].backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def signal(grads):
    return torch.cat([g.reshape(-1) for n, g in grads.items() if not is_noise_param(n)])


def trajectory(model, batch, steps=3):
    start = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for _ in range(steps):
        model.run_train_iter(batch, 0)
    end = model.state_dict()
    return torch.cat([(end[k].double() - start[k]).reshape(-1) for k in start
                      if not is_noise_param(k) and "running" not in k])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    opts = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# tests/sensitivity_probe.py --seeds {opts.seeds}; torch {torch.__version__}; config {FP32_CONFIG}")
    rows = {}
    fp64_rounding = []
    for _ in range(opts.seeds):
        seed = fresh_seed()
        for dtype in ("float64", "float32"):
            args = default_args(dtype=dtype, backend="torch", seed=seed % 2 ** 31, **FP32_CONFIG)
            im = (2, 1, 28, 28)
            batch = learnable_batch(2, 5, 1, 1, 1, 28, 28, seed)
            model = Reference(im, "cpu", args)
            state = copy.deepcopy(model.state_dict())
            base = signal(meta_gradient(model, batch))
            base_traj = trajectory(model, batch)
            for step in (0, 4):
                for eps in ((1e-13, 1e-10, 1e-6, 1e-4) if dtype == "float64" else (1e-6, 1e-4)):
                    model.load_state_dict(state)
                    with scaled_inner_lr(model, 1 + eps, step):
                        g = signal(meta_gradient(model, batch))
                    model = Reference(im, "cpu", args)
                    model.load_state_dict(state)
                    with torch.no_grad():
                        lr = next(iter(model.inner_loop_optimizer.names_learning_rates_dict.values()))
                        lr[step] = lr[step] * (1 + eps)
                    t = trajectory(model, batch)
                    rows.setdefault((dtype, step, eps), []).append((rel(g, base), rel(t, base_traj)))
                    model = Reference(im, "cpu", args)
                    model.load_state_dict(state)
            if dtype == "float64":
                fast = Fast(im, "cpu", args)
                fast.load_state_dict(state)
                ref = Reference(im, "cpu", args)
                ref.load_state_dict(state)
                gr, gf = meta_gradient(ref, batch), meta_gradient(fast, batch)
                floor = 1e-3 * max(float(g.norm()) for g in gr.values())
                fp64_rounding.append(max(rel(gf[n], gr[n], floor) for n in gr))
    print("dtype    step  eps      meta-gradient change (min / median / max)   3-Adam-step update change (median / max)")
    for (dtype, step, eps), v in sorted(rows.items()):
        g, t = [x[0] for x in v], [x[1] for x in v]
        print(f"{dtype:8s} {step:4d}  {eps:7.0e}  {min(g):.2e} / {statistics.median(g):.2e} / {max(g):.2e}"
              f"                  {statistics.median(t):.2e} / {max(t):.2e}")
    print(f"float64 fast vs reference, largest per-tensor meta-gradient error: median "
          f"{statistics.median(fp64_rounding):.2e}, max {max(fp64_rounding):.2e} over {len(fp64_rounding)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
