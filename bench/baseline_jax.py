"""MAML++ meta-update in JAX: jax.vmap over tasks, jax.grad for the inner and outer gradients, jax.jit.

Written the way a JAX user would write MAML++: parameters in a dict pytree, the network as a pure
function (lax.conv_general_dilated in NCHW/OIHW, batch norm with the batch's statistics and per-step
gamma/beta, leaky ReLU 0.01, 2x2 max pool with lax.reduce_window, linear), the inner loop unrolled in
Python inside the jitted function (5 steps, second order: jax.grad is differentiated again by the outer
jax.value_and_grad), LSLR per-layer per-step learning rates, MSL weights, the mean over tasks with
jax.vmap, the original's gradient clamp on mini-ImageNet, and Adam (optax when installed, else the same
formula by hand). The whole meta-update, optimizer included, is one jitted function with the parameter
and optimizer-state buffers donated. No batch-norm running statistics (they never affect training
outputs or gradients).

Imports neither torch nor anything else of this project besides bench.workloads (numpy only), so it
runs in an environment that has jax but not torch. bench/run.py runs it in a subprocess per workload
(XLA preallocates most of the GPU memory by default, and its peak-memory counter cannot be reset):

    python -m bench.baseline_jax --workload omniglot_20w1s --device gpu --json-out result.json

Timing: host timer (time.perf_counter) around each call followed by block_until_ready(), median over
the timed iterations after warm-up; the first call's compile time is reported separately. Peak
memory: the device's memory_stats()['peak_bytes_in_use'] (GPU), else "n/a".
"""
from __future__ import annotations

import os

# Before jax is imported: do not grab 75% of the GPU at start-up (the torch side of the benchmark
# shares the device, and the peak-memory number should mean something).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["init_params", "net_apply", "meta_loss", "make_update", "params_from_reference", "run", "main"]

BN_EPS = 1e-5
SLOPE = 0.01


def _jax():
    import jax
    import jax.numpy as jnp
    from jax import lax
    return jax, jnp, lax


def msl_weights(num_steps: int, msl_epochs: int, epoch: int) -> np.ndarray:
    """MAML++ multi-step loss weights (floor 0.03/S, as the authors' code)."""
    decay, floor = 1.0 / num_steps / msl_epochs, 0.03 / num_steps
    w = [max(1.0 / num_steps - epoch * decay, floor) for _ in range(num_steps - 1)]
    w.append(min(1.0 / num_steps + epoch * (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor))
    return np.asarray(w)


def init_params(w, seed: int = 0, dtype=np.float32) -> dict:
    """{'fast': conv/linear weights and biases (adapted), 'bn': per-step gamma/beta (S, C),
    'lslr': a (S+1,) learning-rate vector per adapted tensor}; Xavier-uniform weights, zero biases."""
    rng = np.random.RandomState(seed)

    def xavier(shape, fan_in, fan_out):
        a = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, size=shape).astype(dtype)

    fast, bn = {}, {}
    c, h, wd = w.channels, w.height, w.width
    for i in range(w.num_stages):
        fast[f"conv{i}_w"] = xavier((w.filters, c, 3, 3), c * 9, w.filters * 9)
        fast[f"conv{i}_b"] = np.zeros(w.filters, dtype)
        bn[f"gamma{i}"] = np.ones((w.steps, w.filters), dtype)
        bn[f"beta{i}"] = np.zeros((w.steps, w.filters), dtype)
        c, h, wd = w.filters, h // 2, wd // 2
    feats = c * h * wd
    fast["lin_w"] = xavier((w.n_way, feats), feats, w.n_way)
    fast["lin_b"] = np.zeros(w.n_way, dtype)
    lslr = {k: np.full(w.steps + 1, w.task_learning_rate, dtype) for k in fast}
    return {"fast": fast, "bn": bn, "lslr": lslr}


def params_from_reference(state: dict, num_stages: int) -> dict:
    """Our pytree from a reference learner's {name: numpy array} (tests: same weights in both)."""
    fast, bn, lslr = {}, {}, {}
    lr_prefix = "inner_loop_optimizer.names_learning_rates_dict.layer_dict-"
    for i in range(num_stages):
        p = f"classifier.layer_dict.conv{i}."
        fast[f"conv{i}_w"], fast[f"conv{i}_b"] = state[p + "conv.weight"], state[p + "conv.bias"]
        bn[f"gamma{i}"], bn[f"beta{i}"] = state[p + "norm_layer.weight"], state[p + "norm_layer.bias"]
        lslr[f"conv{i}_w"] = state[lr_prefix + f"conv{i}-conv-weight"]
        lslr[f"conv{i}_b"] = state[lr_prefix + f"conv{i}-conv-bias"]
    fast["lin_w"], fast["lin_b"] = state["classifier.layer_dict.linear.weights"], state["classifier.layer_dict.linear.bias"]
    lslr["lin_w"], lslr["lin_b"] = state[lr_prefix + "linear-weights"], state[lr_prefix + "linear-bias"]
    return {"fast": fast, "bn": bn, "lslr": lslr}


def net_apply(fast: dict, bn: dict, x, step: int, num_stages: int, precision=None):
    """Logits (n, classes) of one task; x is (n, C, H, W)."""
    jax, jnp, lax = _jax()
    for i in range(num_stages):
        x = lax.conv_general_dilated(x, fast[f"conv{i}_w"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=precision)
        x = x + fast[f"conv{i}_b"][None, :, None, None]
        mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(0, 2, 3), keepdims=True)  # biased, as batch norm
        gamma = bn[f"gamma{i}"][step][None, :, None, None]
        beta = bn[f"beta{i}"][step][None, :, None, None]
        x = (x - mean) * lax.rsqrt(var + BN_EPS) * gamma + beta
        x = jax.nn.leaky_relu(x, SLOPE)
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    x = x.reshape(x.shape[0], -1)
    return jnp.dot(x, fast["lin_w"].T, precision=precision) + fast["lin_b"]


def _xent(logits, labels):
    jax, jnp, _ = _jax()
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def task_loss(params, xs, ys, xt, yt, msl, num_steps: int, num_stages: int, precision=None):
    """MAML++ loss of one task: second-order inner loop with LSLR, MSL-weighted target losses."""
    jax, _, _ = _jax()
    bn, lslr = params["bn"], params["lslr"]
    fast = params["fast"]

    def support_loss(f, step):
        return _xent(net_apply(f, bn, xs, step, num_stages, precision), ys)

    loss = 0.0
    for step in range(num_steps):
        g = jax.grad(support_loss)(fast, step)
        fast = {k: fast[k] - lslr[k][step] * g[k] for k in fast}
        loss = loss + msl[step] * _xent(net_apply(fast, bn, xt, step, num_stages, precision), yt)
    return loss


def meta_loss(params, batch, msl, num_steps: int, num_stages: int, precision=None):
    """Mean over tasks (jax.vmap) of task_loss; batch = (xs (B,n,C,H,W), ys (B,n), xt, yt)."""
    jax, jnp, _ = _jax()
    xs, ys, xt, yt = batch
    per_task = jax.vmap(partial(task_loss, num_steps=num_steps, num_stages=num_stages, precision=precision),
                        in_axes=(None, 0, 0, 0, 0, None))(params, xs, ys, xt, yt, msl)
    return jnp.mean(per_task)


def _optimizer(lr: float):
    """optax.adam when installed, else the same Adam by hand (torch.optim.Adam's defaults)."""
    jax, jnp, _ = _jax()
    try:
        import optax
        opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
        return opt.init, opt.update, optax.apply_updates, "optax.adam"
    except ImportError:
        pass
    b1, b2, eps = 0.9, 0.999, 1e-8
    tmap = jax.tree_util.tree_map

    def init(params):
        return {"t": jnp.zeros((), jnp.int32), "m": tmap(jnp.zeros_like, params), "v": tmap(jnp.zeros_like, params)}

    def update(grads, state, params=None):
        t = state["t"] + 1
        m = tmap(lambda m_, g: b1 * m_ + (1 - b1) * g, state["m"], grads)
        v = tmap(lambda v_, g: b2 * v_ + (1 - b2) * g * g, state["v"], grads)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        upd = tmap(lambda m_, v_: -lr * (m_ / c1) / (jnp.sqrt(v_ / c2) + eps), m, v)
        return upd, {"t": t, "m": m, "v": v}

    def apply(params, updates):
        return tmap(lambda p, u: p + u, params, updates)

    return init, update, apply, "hand-written Adam"


def make_update(w, lr: float, precision=None):
    """(opt_init, jitted update(params, opt_state, batch, msl) -> (params, opt_state, loss), optimizer name)."""
    jax, jnp, _ = _jax()
    opt_init, opt_update, apply_updates, opt_name = _optimizer(lr)
    clamp = "imagenet" in w.dataset_name

    def update(params, opt_state, batch, msl):
        loss, grads = jax.value_and_grad(meta_loss)(params, batch, msl, w.steps, w.num_stages, precision)
        if clamp:  # the original clamps the network's gradients (not the LSLR rates) on mini-ImageNet
            grads = {"fast": jax.tree_util.tree_map(lambda g: jnp.clip(g, -10, 10), grads["fast"]),
                     "bn": jax.tree_util.tree_map(lambda g: jnp.clip(g, -10, 10), grads["bn"]),
                     "lslr": grads["lslr"]}
        updates, opt_state = opt_update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state, loss

    return opt_init, jax.jit(update, donate_argnums=(0, 1)), opt_name


def device_batch(w, seed: int = 0, dtype=np.float32):
    """The benchmark batch (bench.workloads.make_batch_numpy) in the (B, n, C, H, W) / (B, n) layout."""
    from .workloads import make_batch_numpy
    xs, xt, ys, yt = make_batch_numpy(w, seed)
    b = w.batch_size
    return (xs.reshape(b, -1, *xs.shape[-3:]).astype(dtype), ys.reshape(b, -1),
            xt.reshape(b, -1, *xt.shape[-3:]).astype(dtype), yt.reshape(b, -1))


def run(w, device: str = "gpu", warmup: int = 3, iters: int = 50, max_time: float = 5.0, min_iters: int = 5,
        precision: str = "default", lr: float = 1e-3) -> dict[str, Any]:
    """Time the jitted meta-update on workload `w`; returns a result dict (see module docstring)."""
    jax, jnp, _ = _jax()
    want = "cpu" if device == "cpu" else "gpu"
    try:
        dev = jax.devices(want)[0]
    except RuntimeError as e:
        return {"status": "n/a", "reason": f"jax has no {want} device: {e}", "jax": jax.__version__}
    prec = None if precision == "default" else precision
    params = jax.device_put(init_params(w), dev)
    batch = jax.device_put(device_batch(w), dev)
    msl = jax.device_put(np.asarray(msl_weights(w.steps, w.msl_epochs, 0), np.float32), dev)
    opt_init, update, opt_name = make_update(w, lr, prec)
    # committed to the device like the parameters: an uncommitted leaf (optax's step count) would make
    # the second call compile the update again for the committed outputs of the first
    opt_state = jax.device_put(opt_init(params), dev)
    t0 = time.perf_counter()
    params, opt_state, loss = update(params, opt_state, batch, msl)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        params, opt_state, loss = update(params, opt_state, batch, msl)
    loss.block_until_ready()
    times = []
    start = time.perf_counter()
    while len(times) < iters and (len(times) < min_iters or time.perf_counter() - start < max_time):
        t = time.perf_counter()
        params, opt_state, loss = update(params, opt_state, batch, msl)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak = stats.get("peak_bytes_in_use") if stats else None
    med = statistics.median(times)
    return {"status": "ok", "times_s": times, "median_s": med, "updates_per_s": 1.0 / med, "iters": len(times),
            "warmup": warmup, "compile_s": compile_s, "peak_mem_bytes": peak,
            "mem_kind": "jax peak_bytes_in_use" if peak is not None else "n/a", "loss": float(loss),
            "optimizer": opt_name, "precision": precision, "timer": "perf_counter + block_until_ready",
            "jax": jax.__version__, "jax_device": str(dev), "jax_platform": dev.platform,
            "jax_device_kind": getattr(dev, "device_kind", "")}


def main(argv=None) -> int:
    from .workloads import workload_by_name
    p = argparse.ArgumentParser(prog="python -m bench.baseline_jax")
    p.add_argument("--workload", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-time", type=float, default=5.0)
    p.add_argument("--precision", default="default", choices=("default", "high", "highest"))
    p.add_argument("--json-out", default=None)
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPUs this process was restricted to (recorded in the result)")
    a = p.parse_args(argv)
    w = workload_by_name(a.workload, a.quick)
    if a.batch_size:
        w = w.with_(batch_size=a.batch_size)
    if a.steps:
        w = w.with_(steps=a.steps)
    try:
        res = run(w, a.device, a.warmup, a.iters, a.max_time, a.min_iters, a.precision)
    except ImportError as e:
        res = {"status": "n/a", "reason": f"jax is not installed: {e}"}
    res["workload"] = w.name
    if a.cpus:
        res["cpus"] = [int(c) for c in a.cpus.split(",")]
    text = json.dumps(res)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text)
    print(text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
