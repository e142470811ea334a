"""Measure the errors behind two TF32 margins, with bench.precision's emulation of the tensor cores'
operands (TF32 truncated; tf32x3's high part rounded to nearest, its low part truncated).

Not part of the default test run. Usage, from the repository root:

    python tests/tf32_margins.py launchers --seeds 60
    python tests/tf32_margins.py derivatives --seeds 3

`launchers`: the relative error (norm) of each emulated launcher (forward, data gradient, weight
gradient) against float64, at the shape and seeds of tests/test_precision_emulation.py
`test_emulated_launcher_errors`. Its TF32 window [3.5e-4, 2e-3] and tf32x3 bound 1e-5 are derived in
that file's docstring. Prints min / max per mode.

`derivatives`: the worst `rel` per term of tests/test_conv.py `derivatives` (output, first and second
derivatives) at the six layer shapes of tests/gpu/test_gpu_conv.py `test_triton_conv_tensor_core_tiles_on_cuda`,
with conv_impl "triton" running the emulated launchers. `TC_RTOL` there is derived from these numbers.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MODES = ("ieee", "tf32", "tf32x3")
# tests/gpu/test_gpu_conv.py test_triton_conv_tensor_core_tiles_on_cuda's shapes
TC_SHAPES = [(20, 8, 64, 64, 14, 3, 1, 1), (20, 8, 64, 64, 7, 3, 1, 1), (20, 8, 64, 64, 3, 3, 1, 1),
             (5, 2, 48, 48, 21, 3, 1, 1), (5, 2, 48, 48, 10, 3, 1, 1), (20, 8, 1, 64, 28, 3, 1, 1)]


def launcher_errors(seeds: int) -> dict:
    """{mode: [error per (seed, launcher)]} at test_emulated_launcher_errors' shape, seeds 0 .. seeds-1."""
    import torch

    from bench.precision import emulated_launchers
    errs = {m: [] for m in MODES}
    b, co, ci, n, h = 2, 16, 24, 3, 10
    meta = (b, co, ci, 3, 3, h, h, h, h, 1, 1)
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, b * ci, h, h, generator=g)
        w = torch.randn(b, co, ci, 3, 3, generator=g)
        gy = torch.randn(n, b * co, h, h, generator=g)
        calls = (lambda f, d: f(x.to(d), w.to(d), None, meta), lambda f, d: f(gy.to(d), w.to(d), meta),
                 lambda f, d: f(x.to(d), gy.to(d), meta))
        for idx, call in enumerate(calls):
            ref = call(emulated_launchers("ieee")[idx], torch.float64)
            for m in MODES:
                out = call(emulated_launchers(m)[idx], torch.float32)
                errs[m].append(float((out.double() - ref).norm() / ref.norm()))
    return errs


def derivative_errors(seeds: int, modes=("tf32", "tf32x3")) -> dict:
    """{(mode, shape): [worst rel per term over seeds 0 .. seeds-1]} at TC_SHAPES."""
    import torch
    from test_conv import derivatives, make_inputs, per_task_reference, rel

    from bench.precision import emulation
    from mamlpp_fast.ops.conv import task_conv2d
    out = {}
    for mode in modes:
        for shape in TC_SHAPES:
            worst = [0.0] * 7
            for seed in range(seeds):
                x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed)
                ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
                xd, wd, bd = (t.detach().float().requires_grad_(True) for t in (x, w, bias))
                with emulation(mode):
                    got = derivatives(lambda: task_conv2d(xd, wd, bd, b, s, p, "triton"), xd, wd, bd, seed)
                worst = [max(o, rel(a, r)) for o, a, r in zip(worst, got, ref)]
            out[(mode, shape)] = worst
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("launchers", "derivatives"))
    p.add_argument("--seeds", type=int, default=None, help="default: 60 (launchers), 3 (derivatives)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if a.what == "launchers":
        for m, e in launcher_errors(a.seeds or 60).items():
            print(f"{m}: {min(e):.2e} .. {max(e):.2e} over {len(e)} launches")
    else:
        for (mode, shape), worst in derivative_errors(a.seeds or 3).items():
            print(f"{mode} {shape}: " + " ".join(f"{v:.2e}" for v in worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
