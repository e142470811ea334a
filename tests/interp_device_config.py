"""The device tests of the fused block (tests/gpu/test_gpu_conv.py `test_fused_block_kernels_on_cuda`'s body)
on the CPU under the Triton interpreter, with the launch configuration a CUDA device of SMS multiprocessors
gets (many chunks per column): tells a wrong formula or configuration apart from a device-only fault (not
part of the default run; minutes at the learner's shapes).

    python tests/interp_device_config.py "(8, 64, 1, 20, 28, 3, 1, False, True)" [--sms 132] [--poison]

--poison: every torch.empty / empty_like / new_empty filled with NaN first (tests/poison_empty.py), so
that a kernel that reads memory nothing wrote shows it. Prints each result's error against the PyTorch implementation in
float64 (max |got - ref| / max(1, max |ref|))."""
import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help="(T, C, Ci, n, H, k, pad, per-task gamma, bias), as BLOCK_GPU_SHAPES")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--poison", action="store_true")
    a = p.parse_args()
    if a.poison:
        from poison_empty import poison_empty
        poison_empty()
    import ast

    import torch
    from test_triton_interp import _block_all, _block_case

    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton import conv_block as tcb
    orig = tcb.block_config
    tcb.block_config = lambda mw, t, c, kp, device, sms=None: orig(mw, t, c, kp, device, sms=a.sms)
    case = _block_case(ast.literal_eval(a.shape), a.seed, torch.float64)
    print("config", tcb._geometry(case[0], case[1].shape, (case[5], 1, case[6], 1e-5, 0.01))["cfg"])
    ref, _ = _block_all(torch_impl, *case, a.seed)
    got, _ = _block_all(tcb, *case, a.seed)
    for (n, g), (_, r) in zip(got, ref):
        print(f"{n:8s} {float((g - r).abs().max()) / max(1.0, float(r.abs().max())):.3e}")


if __name__ == "__main__":
    main()
