"""python -m bench.diagnose_fused: where the fused ops' Triton kernels go wrong on a CUDA device.

The first device run (H200, 2026-12-04) failed the fused block's kernel tests at every learner shape,
in float64 too. Found since without a device: the float64 backward did not compile (fixed), the float32
tests ran into their time limit (fixed); whether the kernels compute the right numbers on the device
has not been seen yet. This script shows it first in a device call, per op, shape and launch variant,
in float64 (where every difference beyond ~1e-13 is a fault, not rounding):

- the largest error of each result (forward: out, mean, invstd; backward; double backward) against the
  op's PyTorch implementation on the same device, relative to max(1, max |reference|);
- whether two runs on the same inputs give bitwise equal results (a difference is a race);
- for the block, the image's Gram terms (`image_stats`) against the same sums formed by PyTorch;
- launch variants that isolate a cause: the device's configuration; one chunk per column (no chunk
  merge); the interpreter's (at most 3 chunks); every pass on 4 warps.

Usage: python -m bench.diagnose_fused [--out FILE.json] [--quick]. Refuses (exit status 2) without CUDA;
`--device cpu` with TRITON_INTERPRET=1 runs tiny shapes under the interpreter (a test of the script).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

__all__ = ["main"]

EPS, SLOPE = 1e-5, 0.01
# (T, C, Ci, n, H, k, pad, per-task gamma/beta, bias): the learner's first layers
BLOCK_SHAPES = {"omniglot-20w": (8, 64, 1, 20, 28, 3, 1, False, True),
                "miniimagenet-support": (2, 48, 3, 5, 84, 3, 1, True, True),
                "miniimagenet-target": (2, 48, 3, 75, 84, 3, 1, False, True)}
# (T, C, n, H, W, per-task gamma, per-task beta)
POOL_SHAPES = {"omniglot-layer1": (8, 64, 20, 14, 14, False, False),
               "miniimagenet-layer2-support": (2, 48, 5, 21, 21, False, True),
               "miniimagenet-layer1-target": (2, 48, 75, 42, 42, True, True)}


def _err(a, r) -> float:
    return float((a.double() - r.double()).abs().max()) / max(1.0, float(r.abs().max()))


def _block_inputs(shape, seed, dev):
    import torch
    T, C, Ci, n, H, k, pad, per_task, has_bias = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev)  # noqa: E731
    x = rnd(n, T * Ci, H, H)
    w = rnd(T, C, Ci, k, k)
    bias = rnd(T, C) if has_bias else None
    ps = (T, C) if per_task else (C,)
    return x, w, bias, 1 + 0.5 * rnd(*ps), rnd(*ps), T, pad


def _block_run(impl, x, w, bias, gamma, beta, T, pad, seed):
    import torch
    meta = (T, 1, pad, EPS, SLOPE)
    out, mean, invstd, aux = impl.forward(x, w, bias, gamma, beta, meta)
    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    gout = rnd(out)
    bwd = impl.backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta)
    u = [rnd(w), rnd(bias) if bias is not None else None, rnd(gamma), rnd(beta)]
    dbwd = impl.double_backward(*u, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta)
    names = ["out", "mean", "invstd", "dw", "dbias", "dgamma", "dbeta", "ddgout", "ddw", "ddbias", "ddgamma"]
    return [(n, r) for n, r in zip(names, [out, mean, invstd, *bwd, *dbwd]) if r is not None]


def _gram_reference(x, w_shape, pad, rho):
    """(C_D, S_D) per task from PyTorch: the patches of every output of the pooled region (2Hp x 2Wp),
    the bias column 1, minus the kernel's rho'."""
    import torch
    import torch.nn.functional as F
    T, C, Ci, kh, kw = w_shape
    n, _, H, W = x.shape
    ho, wo = H + 2 * pad - kh + 1, W + 2 * pad - kw + 1
    out = []
    for t in range(T):
        cols = F.unfold(x[:, t * Ci:(t + 1) * Ci], (kh, kw), padding=pad)  # (n, K, ho*wo)
        cols = cols.reshape(n, -1, ho, wo)[:, :, :ho // 2 * 2, :wo // 2 * 2].reshape(n, cols.shape[1], -1)
        P = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])
        K = P.shape[1]
        Pp = torch.zeros(P.shape[0], rho.shape[1], dtype=x.dtype, device=x.device)
        Pp[:, :K] = P
        Pp[:, K] = 1.0
        D = Pp - rho[t][None, :]
        out.append((D.T @ D, D.sum(0)))
    return out


def diagnose_block(name, shape, variants, dev, seed=1234) -> list[dict]:
    import torch
    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton import conv_block as tcb
    case = _block_inputs(shape, seed, dev)
    ref = _block_run(torch_impl, *case, seed)
    rows = []
    orig = tcb.block_config
    for vname, patch in variants:
        try:
            tcb.block_config = patch(orig)
            got = _block_run(tcb, *case, seed)
            again = _block_run(tcb, *case, seed)
            x, w = case[0], case[1]
            gram, rho = tcb.image_stats(x.contiguous(), tuple(w.shape), (case[5], 1, case[6], EPS, SLOPE))
            kp = rho.shape[1]
            gerr = 0.0
            for t, (cd, sd) in enumerate(_gram_reference(x, tuple(w.shape), case[6], rho)):
                gerr = max(gerr, _err(gram[t, :kp * kp].reshape(kp, kp), cd), _err(gram[t, kp * kp:], sd))
            cfg = tcb._geometry(x, tuple(w.shape), (case[5], 1, case[6], EPS, SLOPE))["cfg"]
            rows.append(dict(op="conv_bn_pool", shape=name, variant=vname, config=cfg, gram_err=gerr,
                             errors={n: _err(a, r) for (n, a), (_, r) in zip(got, ref)},
                             deterministic=all(torch.equal(a, b) for (_, a), (_, b) in zip(got, again))))
        except Exception as e:  # noqa: BLE001 - one variant's failure must not hide the others
            rows.append(dict(op="conv_bn_pool", shape=name, variant=vname, error=f"{type(e).__name__}: {e}"[:300]))
        finally:
            tcb.block_config = orig
    return rows


def diagnose_pool(name, shape, variants, dev, seed=1234) -> list[dict]:
    import torch
    from mamlpp_fast.ops.bn_pool import torch_impl
    from mamlpp_fast.triton import bn_pool as tbp
    T, C, n, H, W, gt, bt = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev)  # noqa: E731
    x = rnd(n, T * C, H, W) * 2 + 0.5
    gamma, beta = 1 + 0.5 * rnd(*((T, C) if gt else (C,))), rnd(*((T, C) if bt else (C,)))
    if gamma.shape != beta.shape:  # the implementations take one shape (the op expands a shared one)
        gamma, beta = (p.expand(T, -1).contiguous() if p.dim() == 1 else p for p in (gamma, beta))

    def run(impl):
        meta = (T, EPS, SLOPE)
        out, mean, invstd, aux = impl.forward(x, gamma, beta, meta)
        gg = torch.Generator().manual_seed(seed + 7)
        r = lambda t: torch.randn(t.shape, generator=gg, dtype=torch.float64).to(t.device)  # noqa: E731
        gout = r(out)
        bwd = impl.backward(gout, x, gamma, beta, mean, invstd, aux, meta)
        dbwd = impl.double_backward(r(x), r(gamma), r(beta), gout, x, gamma, beta, mean, invstd, aux, meta)
        names = ["out", "mean", "invstd", "dx", "dgamma", "dbeta", "ddgout", "ddx", "ddgamma"]
        return [(nm, v) for nm, v in zip(names, [out, mean, invstd, *bwd, *dbwd]) if v is not None]

    ref = run(torch_impl)
    rows = []
    orig = tbp.pool_config
    for vname, patch in variants:
        try:
            tbp.pool_config = patch(orig)
            got, again = run(tbp), run(tbp)
            rows.append(dict(op="bn_pool", shape=name, variant=vname, config=tbp.pool_config(*x.shape, x.device),
                             errors={nm: _err(a, r) for (nm, a), (_, r) in zip(got, ref)},
                             deterministic=all(torch.equal(a, b) for (_, a), (_, b) in zip(got, again))))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(op="bn_pool", shape=name, variant=vname, error=f"{type(e).__name__}: {e}"[:300]))
        finally:
            tbp.pool_config = orig
    return rows


def _block_variants():
    def device(orig):
        return orig

    def one_chunk(orig):
        def cfg(mw, t, c, kp, device, sms=None):
            d = orig(mw, t, c, kp, device, sms)
            return dict(d, CHUNK=mw, CHUNKS=1, GRAM_CHUNK=mw, GRAM_CHUNKS=1)
        return cfg

    def interp(orig):
        def cfg(mw, t, c, kp, device, sms=None):
            import torch
            return orig(mw, t, c, kp, torch.device("cpu"), None)
        return cfg

    def warps4(orig):
        def cfg(mw, t, c, kp, device, sms=None):
            return dict(orig(mw, t, c, kp, device, sms), FWD_WARPS=4, BWD_WARPS=4, num_warps=4)
        return cfg
    return [("device", device), ("one-chunk", one_chunk), ("interpreter-config", interp), ("4-warps", warps4)]


def _pool_variants():
    def device(orig):
        return orig

    def interp(orig):
        def cfg(n, tc, h, w, device, sms=None):
            import torch
            return orig(n, tc, h, w, torch.device("cpu"), None)
        return cfg
    return [("device", device), ("interpreter-config", interp)]


def to_text(rows) -> str:
    lines = []
    for r in rows:
        head = f"{r['op']:12s} {r['shape']:28s} {r['variant']:18s}"
        if "error" in r:
            lines.append(f"{head} ERROR {r['error']}")
            continue
        bad = {k: v for k, v in r["errors"].items() if v > 1e-10}
        worst = max(r["errors"].items(), key=lambda kv: kv[1])
        lines.append(f"{head} {'ok ' if not bad else 'BAD'} det={r['deterministic']!s:5s} "
                     + (f"gram={r['gram_err']:.1e} " if "gram_err" in r else "")
                     + f"worst {worst[0]}={worst[1]:.1e}"
                     + ("" if not bad else " bad: " + ", ".join(f"{k}={v:.1e}" for k, v in bad.items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.diagnose_fused", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="the Omniglot shapes only")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1 (tiny shapes)")
    a = p.parse_args(argv)
    import os

    import torch
    if a.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
        blocks, pools = {"tiny": (2, 16, 1, 3, 8, 3, 1, False, True)}, {"tiny": (2, 16, 3, 6, 6, False, True)}
    elif not torch.cuda.is_available():
        print("error: bench.diagnose_fused runs the kernels on a CUDA device and there is none here",
              file=sys.stderr)
        return 2
    else:
        blocks = {k: v for k, v in BLOCK_SHAPES.items() if not a.quick or k.startswith("omniglot")}
        pools = {k: v for k, v in POOL_SHAPES.items() if not a.quick or k.startswith("omniglot")}
    dev = torch.device(a.device)
    rows = []
    for name, shape in blocks.items():
        rows += diagnose_block(name, shape, _block_variants(), dev)
        print(to_text(rows[-len(_block_variants()):]), flush=True)
    for name, shape in pools.items():
        rows += diagnose_pool(name, shape, _pool_variants(), dev)
        print(to_text(rows[-len(_pool_variants()):]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (interpreter)",
                           torch=torch.__version__, rows=rows), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
