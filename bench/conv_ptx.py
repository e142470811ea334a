"""Static metrics of the Triton convolution kernels (mamlpp_fast/triton/conv.py) at the learner's shapes,
without a GPU: the launches the launchers would make (grid, block sizes, split-K), compiled for sm_90a.

For every convolution layer of the benchmark workloads (bench/workloads.py: support and target sets) and
each of the three kernels (forward, data gradient, weight gradient), the launcher is run on meta tensors
with the kernels' `run` replaced by a recorder, so that the grid and the compile-time parameters are
exactly the ones the launch heuristic picks for a GPU with `--sms` multiprocessors. Each distinct kernel
configuration is then compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
(no device needed), and the script reports:

- the innermost loop of the PTX (a label with a backward branch to it whose range holds no other loop; of
  those, the one with the most FMAs): its instruction count, the FMAs (`fma.rn.f32` / `fma.rn.f64`) and
  their share, shared-memory loads and their vector width, global loads, integer division/remainder;
  with TF32 (`--tf32`), wgmma and ldmatrix counts instead;
- `ptxas -arch=sm_90a -v` of that PTX (the ptxas on PATH, nvcc 13.0 here; `--ptxas triton`: the one the
  installed Triton ships and compiles with on a device, 12.8 for Triton 3.6 and 3.7.1): registers per
  thread, spill stores/loads;
- programs per launch and waves = programs / SMs (one CTA per SM assumed: the kernels use > 128
  registers per thread at 4-8 warps).

Integer arguments equal to 1 are compiled as constants and pointers and integers divisible by 16 get
Triton's divisibility-16 attribute, as Triton's launcher specialises them (tensors are assumed 16-byte
aligned, as fresh torch allocations are).

    python -m bench.conv_ptx [--workloads omniglot_20w1s,miniimagenet_5w1s] [--sms 132] [--tf32]
                             [--module PATH]   # another copy of conv.py, e.g. `git show REV:...` (before/after)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.static_metrics import ptx_loops, ptxas_verbose, triton_tools  # noqa: E402
from bench.workloads import workload_by_name  # noqa: E402


def load_conv_module(path: str | None):
    if path is None:
        from mamlpp_fast.triton import conv
        return conv
    spec = importlib.util.spec_from_file_location("mamlpp_fast.triton._conv_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def conv_layers(wl):
    """(name, n, Ci, Co, H, W) of every convolution of one meta-update's support and target passes."""
    out = []
    ci, h, w = wl.channels, wl.height, wl.width
    for layer in range(wl.num_stages):
        for set_name, n in (("support", wl.n_support), ("target", wl.n_query)):
            out.append((f"L{layer} {set_name}", n, ci, wl.filters, h, w))
        ci, h, w = wl.filters, h // 2, w // 2
    return out


class _FakeCuda:
    type = "cuda"
    index = 0


class Recorder:
    """Stands in for a JITFunction's `run`: records (kernel, args, kwargs, grid) instead of launching."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __call__(self, *args, grid, warmup, **kwargs):
        self.calls.append((self.kernel, args, kwargs, grid))


def record_launches(mod, n, ci, co, h, w, b, sms, dtype):
    """The kernel launches of conv_forward, conv_data_grad and conv_weight_grad at this shape."""
    kernels = {name: getattr(mod, name) for name in dir(mod) if name.startswith("_conv_") and name.endswith("_kernel")}
    calls: list = []
    saved = {}
    for name, k in kernels.items():
        saved[name] = k.__dict__.get("run")
        k.run = Recorder(name, calls)
    patched = {}

    def patch(name, value):
        patched[name] = getattr(mod, name)
        setattr(mod, name, value)

    if hasattr(mod, "_sms"):
        patch("_sms", lambda device: sms)
    else:  # the version before the rework: split only on CUDA tensors, from num_sms
        patch("num_sms", lambda device: sms)
        if hasattr(mod, "_split_for"):
            real = mod._split_for
            patch("_split_for", lambda tiles, red, block_r, device: real(tiles, red, block_r, _FakeCuda()))
    try:
        dev = torch.device("meta")
        x = torch.empty(n, b * ci, h, w, device=dev, dtype=dtype)
        wt = torch.empty(b, co, ci, 3, 3, device=dev, dtype=dtype)
        g = torch.empty(n, b * co, h, w, device=dev, dtype=dtype)
        meta = (b, co, ci, 3, 3, h, w, h, w, 1, 1)
        out = {}
        for what, fn in (("fwd", lambda: mod.conv_forward(x, wt, None, meta)),
                         ("dgrad", lambda: mod.conv_data_grad(g, wt, meta)),
                         ("wgrad", lambda: mod.conv_weight_grad(x, g, meta))):
            calls.clear()
            fn()
            out[what] = list(calls)
        return out
    finally:
        for name, k in kernels.items():
            if saved[name] is None:
                del k.run
            else:
                k.run = saved[name]
        for name, value in patched.items():
            setattr(mod, name, value)


def _sig_type(v):
    if isinstance(v, torch.Tensor):
        return {torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(type(v))


def compile_ptx(kernel, args, kwargs):
    """PTX of one launch, compiled for sm_90a; returns (ptx, key)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    values = dict(zip(names, args))
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values.update(kwargs)
    constexprs, signature, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name not in values:  # a parameter the launch left at its default (e.g. the forward's x2_ptr=None)
            values[name] = kernel.params[i].default
        v = values[name]
        if v is None:
            constexprs[name] = None
            signature[name] = "constexpr"
            continue
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]  # the launcher's specialisation (fresh tensors: aligned)
        if kernel.params[i].is_constexpr:
            attrs.pop((i,), None)
            constexprs[name] = v
            signature[name] = "constexpr"
        elif isinstance(v, int) and not isinstance(v, bool) and v == 1:
            constexprs[name] = 1
            signature[name] = "constexpr"
        else:
            signature[name] = _sig_type(v)
    key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(opts.items())))
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    compile_ptx.last = compiled
    return compiled.asm["ptx"], key


def innermost_loop(ptx: str):
    """Mnemonics of the innermost loop with the most FMAs (see the module docstring); a straight-line
    kernel (the whole reduction in one block) counts as one loop."""
    inner = [body for body, innermost in ptx_loops(ptx) if innermost]
    if not inner:
        inner = [body for body, _ in ptx_loops("$L__whole:\n" + ptx + "\nbra $L__whole;")]
        inner = [body[:-1] for body in inner]  # without the branch added above
    return max(inner, key=lambda body: sum(1 for x in body if x.startswith("fma.")), default=[])


def loop_mix(ins):
    n = len(ins)
    fma = sum(1 for x in ins if x.startswith("fma."))
    lds = [x for x in ins if x.startswith("ld.shared")]
    vec = sum(1 for x in lds if ".v2" in x or ".v4" in x)
    return dict(instrs=n, fma=fma, fma_share=fma / n if n else 0.0, ld_shared=len(lds), ld_shared_vec=vec,
                ld_global=sum(1 for x in ins if x.startswith("ld.global")),
                cp_async=sum(1 for x in ins if x.startswith("cp.async") and "commit" not in x and "wait" not in x),
                int_divrem=sum(1 for x in ins if x.startswith(("div.", "rem.")) and (".s32" in x or ".u32" in x)),
                wgmma=sum(1 for x in ins if x.startswith("wgmma.mma_async")),
                ldmatrix=sum(1 for x in ins if x.startswith("ldmatrix")))


def ptxas_path(which: str) -> str:
    """`which` itself, or for "triton" the ptxas that the installed Triton ships."""
    return triton_tools()["ptxas"] if which == "triton" else which


def ptxas(ptx: str, exe: str = "ptxas"):
    """Registers and spills of `ptx` for sm_90a (bench.static_metrics.ptxas_verbose)."""
    v = ptxas_verbose(exe, ptx)
    return dict(regs=v["registers"], spill_st=v["spill_stores"], spill_ld=v["spill_loads"])


def triton_version() -> str:
    import triton
    return triton.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="omniglot_20w1s,miniimagenet_5w1s")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--module", default=None, help="path of a conv.py to measure instead of the package's")
    ap.add_argument("--tf32", action="store_true", help="compile with allow_tf32 (input_precision tf32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--ptxas", default="ptxas",
                    help="ptxas to run: a path or name on PATH (default ptxas), or 'triton' for the one Triton ships")
    a = ap.parse_args(argv)
    mod = load_conv_module(a.module)
    torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    dtype = getattr(torch, a.dtype)
    cache: dict = {}
    print(f"# conv kernels, sm_90a, {a.dtype}{' tf32' if a.tf32 else ' strict'}, {a.sms} SMs"
          f" ({a.module or 'mamlpp_fast/triton/conv.py'}; triton {triton_version()}, ptxas {a.ptxas})")
    print("| workload | layer | kernel | grid (programs) | waves | config | instrs | FMA | FMA share |"
          " ld.shared (vec) | div/rem | regs | spills |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    workloads = []
    for wname in a.workloads.split(","):
        try:
            workloads.append(workload_by_name(wname))
        except KeyError:
            try:
                workloads.append(workload_by_name(wname, quick=True))
            except KeyError as e:
                ap.error(str(e.args[0]))
    for wl in workloads:
        wname = wl.name
        for lname, n, ci, co, h, w in conv_layers(wl):
            for what, calls in record_launches(mod, n, ci, co, h, w, wl.batch_size, a.sms, dtype).items():
                if lname.startswith("L0") and what == "dgrad":
                    continue  # layer 0's input is data: its data gradient never runs
                for kname, args, kwargs, grid in calls:
                    kernel = getattr(mod, kname)
                    kw = dict(kwargs)
                    try:
                        ptx, key = compile_ptx(kernel, args, dict(kw))
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"| {wname} | {lname} | {what} | compile failed: {type(e).__name__}: {e} |")
                        continue
                    if key not in cache:
                        cache[key] = (loop_mix(innermost_loop(ptx)), ptxas(ptx, ptxas_path(a.ptxas)))
                    mix, pv = cache[key]
                    progs = 1
                    for gdim in grid:
                        progs *= gdim
                    cfg = ",".join(f"{k}={v}" for k, v in sorted(kw.items())
                                   if k.isupper() or k.startswith("num_") or k == "maxnreg"
                                   if k not in ("KH", "KW", "STRIDE", "PAD", "PREC", "HAS_BIAS"))
                    tc = f"wgmma {mix['wgmma']} ldmatrix {mix['ldmatrix']}" if a.tf32 else f"{mix['fma']}"
                    print(f"| {wname} | {lname} n={n} | {what} | {'x'.join(map(str, grid))} ({progs}) |"
                          f" {progs / a.sms:.2f} | {cfg} | {mix['instrs']} | {tc} | {mix['fma_share']:.0%} |"
                          f" {mix['ld_shared']} ({mix['ld_shared_vec']}) | {mix['int_divrem']} | {pv['regs']} |"
                          f" {pv['spill_st']}/{pv['spill_ld']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
