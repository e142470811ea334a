"""What the precision options of our Triton products cost in accuracy, emulated on a CPU (or measured
on a GPU with --device cuda).

    python -m bench.precision [--workload omniglot_5w1s] [--batch-size 2] [--filters 32] [--seeds 20]
                              [--modes ieee,tf32,tf32x3] [--device cpu|cuda] [--out FILE.json]

Config key `conv_precision` chooses the input precision of the Triton convolution and fused-block
products on a GPU: "ieee" (strict float32, the default), "tf32" (operands read as TF32, 10 mantissa
bits, products accumulated in float32 by the tensor cores), "tf32x3" (each operand split into a TF32
high part and a TF32 low part, three products hi*hi + hi*lo + lo*hi: close to float32). No CPU has TF32
units, so this script **emulates** them: it runs the fast learner in float32 with conv_impl "triton"
whose three launchers (forward, data gradient, weight gradient; mamlpp_fast.ops.conv_triton_autograd)
are replaced by PyTorch convolutions on the operands as the tensor cores read them, accumulated by
oneDNN in float32. The kernels hand the tensor cores float32 bits (no conversion instruction: the
compiled PTX of a TF32 launch has no cvt.rna.tf32.f32), and a TF32 product reads only the top 19 bits of
each operand, so an operand the kernel did not round is truncated (`trunc_tf32`: the 13 low mantissa bits
cleared, toward zero): both operands in "tf32", the low part in "tf32x3". tf32x3's high part is rounded
to nearest by the kernels themselves (`round_tf32`: ties away from zero, as `_tf32_split` in
mamlpp_fast/triton/conv.py), so its low part x - hi is exact before the product truncates it. The first
layer runs unfused (its products are the same convolutions). The device's accumulation order differs;
this measures the operand rounding, which dominates TF32's error (up to 2^-10 relative per truncated
operand against float32's 2^-24). That truncation is how we read the hardware, not a measurement: the
device's table (--device cuda) settles it.

For each of `--seeds` fresh batches and the same initial state: one meta-update's meta-gradient
(second order, MSL, epoch 0: what bench.run times) in float32 under each mode and in float64 with the
grouped convolution (the oracle); reported per mode: the distribution over seeds of the relative error
of the meta-gradient (all parameters but the conv biases, whose exact gradient is 0, concatenated) and of
the meta-loss. The same numbers on a GPU, with the device's own TF32, are what the GPU session owes.

With `--real-updates N` (and real Omniglot zips in `--omniglot-dir`, default bench.trainer_bench's): a
short training run per mode from the same initial state on the same real Omniglot tasks (the fast
learner, conv_impl "triton" emulated as above): N meta-updates, then the mean validation accuracy and
loss on `--val-tasks` tasks, and the training loss of the last quarter of the updates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import workloads as W

MODES = ("ieee", "tf32", "tf32x3")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 explicit mantissa bits), ties away from zero, as float32."""
    i = x.contiguous().view(torch.int32)
    r = (i + 0x1000) & ~0x1FFF  # add half an ulp of TF32 to the magnitude bits, clear the 13 low bits
    finite = torch.isfinite(x)
    return torch.where(finite, r.view(torch.float32), x)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 by truncation toward zero (the 13 low mantissa bits cleared), as float32: how a TF32
    product reads a float32 operand that was not rounded first. Infinities and NaNs are kept."""
    i = x.contiguous().view(torch.int32)
    return torch.where(torch.isfinite(x), (i & ~0x1FFF).view(torch.float32), x)


def _split(x):
    """tf32x3's operand split as the kernels form it: hi rounded to nearest TF32, lo = x - hi (exact in
    float32), and lo as the product reads it (truncated)."""
    hi = round_tf32(x)
    return hi, trunc_tf32(x - hi)


def product(mode: str, f, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """f(a, b), f bilinear, with the operands as the tensor cores see them in `mode`."""
    if mode == "ieee":
        return f(a, b)
    if mode == "tf32":
        return f(trunc_tf32(a), trunc_tf32(b))
    if mode == "tf32x3":
        ah, al = _split(a)
        bh, bl = _split(b)
        return f(ah, bh) + (f(ah, bl) + f(al, bh))
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def emulated_launchers(mode: str):
    """The three launchers of mamlpp_fast.triton.conv (same signatures), as PyTorch convolutions whose
    operands are rounded as `mode` says."""
    def fwd(x, w, bias, meta, x2=None, w2=None):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        conv = lambda a, c: F.conv2d(a, c.reshape(-1, ci, kh, kw), None, s, p, groups=b)  # noqa: E731
        out = product(mode, conv, x, w)
        if x2 is not None:  # the dual launch: one reduction over both pairs
            out = out + product(mode, conv, x2, w2)
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)

    def dgrad(g, w, meta):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        return product(mode, lambda a, c: conv2d_input((g.shape[0], b * ci, h, wd), c.reshape(-1, ci, kh, kw), a,
                                                       s, p, groups=b), g, w)

    def wgrad(x, g, meta, with_bias=False):
        b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
        dw = product(mode, lambda a, c: conv2d_weight(a, (b * co, ci, kh, kw), c, s, p, groups=b), x, g)
        dw = dw.view(b, co, ci, kh, kw)
        if not with_bias:
            return dw
        return dw, g.reshape(g.shape[0], b, co, -1).sum((0, 3))

    return fwd, dgrad, wgrad


@contextlib.contextmanager
def emulation(mode: str, launchers=None):
    """conv_impl "triton" runs the emulated launchers of `mode` (or the given three) inside the block."""
    from mamlpp_fast.ops import conv as conv_mod
    from mamlpp_fast.ops import conv_triton_autograd as ta
    names = ("conv_forward", "conv_data_grad", "conv_weight_grad")
    saved = [getattr(ta, n) for n in names] + [conv_mod._IMPLS["triton"]]
    try:
        for n, f in zip(names, launchers if launchers is not None else emulated_launchers(mode)):
            setattr(ta, n, f)
        conv_mod._IMPLS["triton"] = conv_mod.triton_unchecked
        yield
    finally:
        for n, f in zip(names, saved[:3]):
            setattr(ta, n, f)
        conv_mod._IMPLS["triton"] = saved[3]


def _model(w, dtype, conv_impl, device="cpu"):
    from mamlpp_fast.fast import MAMLFewShotClassifier
    if device != "cpu":  # the learner as it runs there: default backend, fused ops where they run
        return MAMLFewShotClassifier(W.im_shape(w), device, W.make_args(w, dtype=dtype, conv_impl=conv_impl))
    args = W.make_args(w, dtype=dtype, backend="torch", conv_impl="grouped", first_block="unfused")
    model = MAMLFewShotClassifier(W.im_shape(w), "cpu", args)
    model.args.conv_impl = conv_impl  # set after construction: "triton" needs no device check here
    return model


def _meta_gradient(model, batch):
    model.current_epoch = 0
    with model.core.precision():
        losses, _ = model.train_forward_prop(model._batch(batch), 0)
        model.zero_grad(set_to_none=True)
        losses["loss"].backward()
    grads = [p.grad.detach().double().reshape(-1) for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None and not n.endswith("conv.bias")]
    return float(losses["loss"].detach()), torch.cat(grads)


def measure(w, seeds: int, modes=MODES, first_seed: int = 0, device: str = "cpu") -> dict:
    """Per mode, the meta-gradient's and meta-loss's relative errors against float64 over `seeds`
    batches. device "cpu": the products emulated (`emulation`); "cuda": measured, the device's own
    products (config key conv_precision; our Triton convolutions, and the fused block where it runs),
    against the float64 learner with cuDNN's convolutions on the same device."""
    torch.manual_seed(first_seed)
    oracle = _model(w, "float64", "grouped", device)
    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    fast = _model(w, "float32", "triton", device)
    fast.load_state_dict(state)
    errors = {m: {"grad": [], "loss": []} for m in modes}
    for k in range(seeds):
        batch = W.make_batch_numpy(w, seed=first_seed + k)
        oracle.load_state_dict(state)
        loss64, g64 = _meta_gradient(oracle, batch)
        for m in modes:
            fast.load_state_dict(state)
            if device == "cpu":
                with emulation(m):
                    loss32, g32 = _meta_gradient(fast, batch)
            else:
                fast.args.conv_precision = m  # applied per call by LearnerCore.precision
                loss32, g32 = _meta_gradient(fast, batch)
            errors[m]["grad"].append(float((g32 - g64).norm() / g64.norm()))
            errors[m]["loss"].append(abs(loss32 - loss64) / abs(loss64))
    summary = {}
    for m in modes:
        summary[m] = {}
        for what in ("grad", "loss"):
            v = sorted(errors[m][what])
            summary[m][what] = dict(median=statistics.median(v), p90=v[min(len(v) - 1, int(0.9 * len(v)))],
                                    max=v[-1], min=v[0])
    return dict(errors=errors, summary=summary)


def per_layer(w, seeds: int, first_seed: int = 0) -> dict:
    """TF32 in one convolution layer at a time (the layer whose input is H x H; the others strict):
    the meta-gradient and meta-loss relative errors against float64 per batch, keyed by H."""
    torch.manual_seed(first_seed)
    oracle = _model(w, "float64", "grouped")
    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    fast = _model(w, "float32", "triton")
    tf32, strict = emulated_launchers("tf32"), emulated_launchers("ieee")
    sizes, h = [], w.height
    for _ in range(w.num_stages):
        sizes.append(h)
        h //= 2
    out = {str(h): [] for h in sizes}
    for k in range(seeds):
        batch = W.make_batch_numpy(w, seed=first_seed + k)
        oracle.load_state_dict(state)
        loss64, g64 = _meta_gradient(oracle, batch)
        for h in sizes:
            def pick(meta, h=h):
                return tf32 if meta[5] == h else strict
            launchers = (lambda x, w_, b, meta, x2=None, w2=None: pick(meta)[0](x, w_, b, meta, x2=x2, w2=w2),
                         lambda g, w_, meta: pick(meta)[1](g, w_, meta),
                         lambda x, g, meta, with_bias=False: pick(meta)[2](x, g, meta, with_bias))
            fast.load_state_dict(state)
            with emulation("ieee", launchers):
                loss32, g32 = _meta_gradient(fast, batch)
            out[str(h)].append(dict(grad=float((g32 - g64).norm() / g64.norm()),
                                    loss=abs(loss32 - loss64) / abs(loss64)))
    return out


def real_run(w, omniglot_dir: str, modes, updates: int, val_tasks: int) -> dict:
    """Per mode: N meta-updates on real Omniglot tasks from the same initial state, then validation."""
    import tempfile

    from mamlpp_fast.data import MetaLearningSystemDataLoader
    from mamlpp_fast.fast import MAMLFewShotClassifier

    from .trainer_bench import _to_device, trainer_args
    dev = torch.device("cpu")
    out = {}
    with tempfile.TemporaryDirectory(prefix="mamlpp_precision_") as tmp:
        val_tasks = max(1, val_tasks // w.batch_size) * w.batch_size
        args = trainer_args(w, "omniglot_zips", 0, updates, val_tasks, tmp, dev, omniglot_dir,
                            conv_impl="triton", first_block="unfused")
        for m in modes:
            data = MetaLearningSystemDataLoader(args=args, current_iter=0)
            model = MAMLFewShotClassifier(W.im_shape(w), dev, args)  # seeded by args: the same state each time
            losses, t0 = [], time.time()
            with emulation(m):
                for batch in data.get_train_batches(total_batches=updates, augment_images=False):
                    res, _ = model.run_train_iter(_to_device(batch, dev), 0)
                    losses.append(float(res["loss"]))
                val_loss, val_acc = [], []
                for batch in data.get_val_batches(total_batches=val_tasks // w.batch_size, augment_images=False):
                    res, _ = model.run_validation_iter(_to_device(batch, dev))
                    val_loss.append(float(res["loss"]))
                    val_acc.append(float(res["accuracy"]))
            q = losses[-max(1, len(losses) // 4):]
            out[m] = dict(updates=len(losses), train_loss_last_quarter=statistics.fmean(q),
                          val_loss=statistics.fmean(val_loss), val_accuracy=statistics.fmean(val_acc),
                          val_tasks=len(val_acc) * w.batch_size, seconds=time.time() - t0, train_losses=losses)
    return out


def to_markdown(rep: dict) -> str:
    lines = [f"### Precision of the Triton products, emulated on a CPU: {rep['workload']}",
             "", f"{rep['note']}", "",
             "| conv_precision | meta-gradient rel. error: median | p90 | max | meta-loss rel. error: median | max |",
             "|---|---|---|---|---|---|"]
    for m, s in rep["summary"].items():
        g, lo = s["grad"], s["loss"]
        lines.append(f"| {m} | {g['median']:.2e} | {g['p90']:.2e} | {g['max']:.2e} | {lo['median']:.2e} | "
                     f"{lo['max']:.2e} |")
    per = rep.get("per_layer")
    if per:
        lines += ["", "TF32 in one layer only (the others strict), per batch: meta-gradient / meta-loss rel. error:",
                  "", "| layer input | " + " | ".join(f"batch {k}" for k in range(len(next(iter(per.values()))))) + " |",
                  "|---|" + "---|" * len(next(iter(per.values())))]
        for h, v in per.items():
            lines.append(f"| {h} x {h} | " + " | ".join(f"{e['grad']:.2e} / {e['loss']:.2e}" for e in v) + " |")
    real = rep.get("real_run")
    if real:
        lines += ["", f"Short real-Omniglot run ({rep['real_run_config']}), the same initial state and tasks per mode:",
                  "", "| conv_precision | meta-updates | training loss, last quarter | validation loss | "
                      "validation accuracy |", "|---|---|---|---|---|"]
        for m, r in real.items():
            lines.append(f"| {m} | {r['updates']} | {r['train_loss_last_quarter']:.4f} | {r['val_loss']:.4f} | "
                         f"{r['val_accuracy']:.4f} ({r['val_tasks']} tasks) |")
    lines += ["", f"Command: `{rep['command']}`; git {rep['git_revision']}, torch {rep['torch']}, {rep['date']}, "
              f"{rep['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="omniglot_5w1s")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--per-layer", action="store_true",
                   help="also TF32 in one convolution layer at a time, the others strict (same seeds)")
    p.add_argument("--real-updates", type=int, default=0, help="meta-updates of the real-Omniglot run (0: none)")
    p.add_argument("--val-tasks", type=int, default=100, help="validation tasks after the real-Omniglot run")
    p.add_argument("--omniglot-dir", default=None, help="folder of the Omniglot zips (default: bench.trainer_bench's)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default: TF32 emulated) or cuda (measured: the device's own TF32; meta-gradient "
                        "errors only, no --per-layer or --real-updates)")
    p.add_argument("--out", default=None, help="FILE.json (and FILE.md beside it)")
    a = p.parse_args(argv)
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if a.device == "cuda" and (a.per_layer or a.real_updates):
        p.error("--device cuda measures the meta-gradient errors only (no --per-layer, --real-updates)")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {','.join(MODES)}")
    try:
        w = W.workload_by_name(a.workload)
    except KeyError as e:
        p.error(str(e.args[0]))
    over = dict(batch_size=a.batch_size, filters=a.filters)
    if a.steps is not None:
        over["steps"] = a.steps
    w = w.with_(**over)
    t0 = time.time()
    res = measure(w, a.seeds, modes, a.first_seed, a.device) if a.seeds > 0 else dict(errors={}, summary={})
    if a.per_layer:
        res["per_layer"] = per_layer(w, a.seeds, a.first_seed)
    if a.real_updates > 0:
        from .trainer_bench import default_omniglot_dir, omniglot_zips_present
        folder = a.omniglot_dir or default_omniglot_dir()
        if not omniglot_zips_present(folder):
            p.error(f"--real-updates: no Omniglot zip files in {folder}")
        res["real_run"] = real_run(w, folder, modes, a.real_updates, a.val_tasks)
        res["real_run_config"] = (f"{w.n_way}-way {w.k_shot}-shot, B={w.batch_size}, {w.filters} filters, "
                                  f"{w.steps} steps, second order with MSL, epoch 0 schedule, {a.real_updates} "
                                  f"meta-updates, {a.val_tasks} validation tasks")
    from .run import revision
    rep = dict(workload=f"{a.workload} (B={w.batch_size}, {w.filters} filters, {w.steps} steps)",
               note=("EMULATED on a CPU: operands as TF32 products read them (truncated; tf32x3's high part "
                     "rounded to nearest by the kernels), products and sums by oneDNN in float32; not a GPU "
                     "measurement") if a.device == "cpu" else
                    (f"MEASURED on {torch.cuda.get_device_name(0)}: the device's own TF32 products in our Triton "
                     "kernels (conv_precision), against the float64 learner with cuDNN convolutions there"),
               device=a.device,
               command="python -m bench.precision " + " ".join(sys.argv[1:] if argv is None else argv),
               git_revision=revision(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=time.time() - t0, **res)
    md = to_markdown(rep)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
        with open(a.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
