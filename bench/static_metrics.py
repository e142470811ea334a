"""Static metrics of the GPU kernels at the learner's shapes, compiled for sm_90a without a GPU.

    python -m bench.static_metrics [--workloads omniglot_20w1s,miniimagenet_5w1s] [--quick]
                                   [--no-cuda] [--out PREFIX]

Triton kernels (mamlpp_fast/triton/*.py): the launches of one meta-update come from bench.trace
(backend triton, conv_impl triton); each distinct custom-op call is replayed through the package's own
host wrapper with meta tensors (no memory, no device) while `JITFunction.run` is replaced by a recorder,
so the launch arguments, block sizes and specialisations are exactly those the wrappers choose (launch
heuristics evaluated for a 132-SM device). Each distinct specialisation is compiled with the installed
Triton for `GPUTarget("cuda", 90, 32)` (sm_90a), in strict fp32 (`input_precision="ieee"`, the learner's
default) and, for the convolutions and the fused first block, also with TF32 and 3xTF32 (tf32x3). Then,
from Triton's own ptxas / cuobjdump (the tools Triton uses on the device):
- registers, spill stores / loads, stack frame (`ptxas -v --gpu-name sm_90a` on the PTX), shared memory
  (Triton's metadata);
- the instruction mix of the innermost hot loop: the backward branch whose loop body (in SASS) holds
  the most FFMA / HGMMA instructions, and its PTX counterpart (LLVM's "Inner Loop Header"): total
  instructions, FFMA (fma.rn.f32), HGMMA / wgmma, LDS / LDSM, global loads, integer arithmetic.

CUDA kernels (kernels/*.cu): `nvcc -arch=sm_90 -Xptxas -v` registers / spills per kernel instantiation.

Output: PREFIX.json and PREFIX.md (default bench/results/static_metrics_sm90a_triton<version>). A tool
that is missing (no ptxas, no nvcc) is reported and its part skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

__all__ = ["collect_calls", "capture_launches", "compile_launch", "kernel_metrics", "cuda_kernel_metrics",
           "triton_tools", "ptx_loops", "main"]

SMS = 132


# ---- which launches ------------------------------------------------------------------------------------
_TRACE_CALLS: dict = {}


def traced_calls(workload: str, quick: bool = False, unfused: bool = False) -> list:
    """Distinct custom-op calls (bench.trace Kernel.call, in first-use order) of one meta-update of
    `workload`, triton backend and triton convolutions, as the learner runs it by default or (`unfused`)
    with the fused first block and bn_pool unfused. A call names an op and its operands' shapes, which
    depend on the learner's structure only (not on launch heuristics), so each trace runs once per process
    (a copy of the list is returned)."""
    key = (workload, quick, unfused)
    if key not in _TRACE_CALLS:
        from .trace import _unfused_kw, trace_meta_update
        res = trace_meta_update(workload, None, "triton", "triton", True, sms=SMS, quick=quick,
                                **(_unfused_kw() if unfused else {}))
        calls = []
        for k in res.kernels:
            if k.call is not None and k.call not in calls:
                calls.append(k.call)
        _TRACE_CALLS[key] = calls
    return list(_TRACE_CALLS[key])


def collect_calls(workloads, quick: bool = False) -> list:
    """Distinct custom-op calls (bench.trace Kernel.call) of one meta-update per workload, triton backend
    and triton convolutions: as the learner runs them by default (the fused first block and bn_pool) and
    with those unfused (the per-step batch norm's own kernels, which the unfused layers and networks
    without max pooling run)."""
    calls = []
    for w in workloads:
        for unfused in (False, True):
            for c in traced_calls(w, quick, unfused):
                if c not in calls:
                    calls.append(c)
    return calls


class Launch(tuple):
    """One recorded launch, (JITFunction, args, kwargs), and its grid (`grid`: the launcher's tuple or
    callable, as passed to the kernel)."""

    def __new__(cls, items, grid):
        obj = super().__new__(cls, items)
        obj.grid = grid
        return obj

    def programs_grid(self) -> tuple:
        """The grid as three integers (x, y, z), missing axes 1; a callable grid evaluated on the
        launch's constexpr keywords, as Triton does."""
        g = self.grid(self[2]) if callable(self.grid) else self.grid
        g = tuple(int(v) for v in (g if isinstance(g, (tuple, list)) else (g,)))
        return g + (1,) * (3 - len(g))


@contextlib.contextmanager
def _recording_launches(store: list):
    """JITFunction.run records (fn, args, kwargs) instead of compiling and launching; the launch
    heuristics see a CUDA device with SMS multiprocessors."""
    import torch
    from triton.runtime.jit import JITFunction

    from mamlpp_fast.triton import conv as tconv
    from mamlpp_fast.triton import per_step_bn as tbn
    try:
        from mamlpp_fast.triton import conv_block as tblock
    except ImportError:  # a tree without the fused first block
        tblock = None
    try:
        from mamlpp_fast.triton import head as thead
    except ImportError:  # a tree without the fused head
        thead = None
    orig_run, orig_bn_cfg = JITFunction.run, tbn.bn_block_config
    orig_bn_sms = tbn.num_sms
    cuda0 = torch.device("cuda", 0)
    # the convolution's launch heuristic reads the SM count through `_sms` (its block configurations
    # take it as an argument); a tree from before the kernel rework split only on CUDA tensors, from
    # `num_sms` and `_split_for`
    conv_patches = {"_sms": lambda device: SMS} if hasattr(tconv, "_sms") else {"num_sms": lambda device: SMS}
    if hasattr(tconv, "_split_for"):
        orig_split = tconv._split_for
        conv_patches["_split_for"] = lambda tiles, red, block_r, device: orig_split(tiles, red, block_r, cuda0)
    conv_saved = {name: getattr(tconv, name) for name in conv_patches}

    def run(self, *args, grid, warmup, **kwargs):
        store.append(Launch((self, args, kwargs), grid))
        return None

    JITFunction.run = run
    if tblock is not None:
        orig_block_cfg = tblock.block_config
        tblock.block_config = lambda *a, sms=None: orig_block_cfg(*a, sms=SMS)
    tbn.num_sms = lambda device: SMS
    if thead is not None:
        orig_head_sms = thead._sms
        thead._sms = lambda device: SMS
    tbn.bn_block_config = lambda M, TC, device, sms=None: orig_bn_cfg(M, TC, cuda0)
    for name, val in conv_patches.items():
        setattr(tconv, name, val)
    try:
        yield store
    finally:
        JITFunction.run = orig_run
        if tblock is not None:
            tblock.block_config = orig_block_cfg
        tbn.bn_block_config = orig_bn_cfg
        tbn.num_sms = orig_bn_sms
        if thead is not None:
            thead._sms = orig_head_sms
        for name, val in conv_saved.items():
            setattr(tconv, name, val)


# the float32 input precisions of the Triton products that the tables compile (config key conv_precision):
# strict, TF32 (allow_tf32) and 3xTF32; the labels of their rows
PRECISIONS = {"fp32": "ieee", "tf32": "tf32", "tf32x3": "tf32x3"}


def _precision_mode(tf32) -> str | None:
    """capture_launches' `tf32` as the conv_precision mode it forces: None for a bool (torch's allow_tf32
    alone then decides, under whatever mode the caller forces), else the label's mode in `PRECISIONS`."""
    if isinstance(tf32, bool):
        return None
    if tf32 in PRECISIONS:
        return PRECISIONS[tf32]
    raise ValueError(f"capture_launches: precision must be one of {sorted(PRECISIONS)} or a bool, got {tf32!r}")


def capture_launches(call, tf32=False, dtype=None) -> list:
    """(JITFunction, args, kwargs) of every Triton launch of one custom-op call (each a `Launch`, which
    also holds its grid), from the package's host wrapper on meta tensors of `dtype` (default float32;
    `compile_check` passes float64 too). tf32: torch's allow_tf32 while the wrappers run (False / True:
    strict or TF32 unless the caller forces a conv_precision), or a label of `PRECISIONS`, forced as config
    key conv_precision forces it (`forced_conv_precision`; "tf32x3": three TF32 products)."""
    import torch

    from mamlpp_fast.triton import conv as tconv
    from mamlpp_fast.triton import lslr as tlslr
    from mamlpp_fast.triton import per_step_bn as tbn

    dtype = torch.float32 if dtype is None else dtype

    def t(shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    from mamlpp_fast.triton._device import forced_conv_precision

    store: list = []
    old = torch.backends.cudnn.allow_tf32
    mode = _precision_mode(tf32)
    # mamlpp_fast.triton.conv._precision reads it
    torch.backends.cudnn.allow_tf32 = tf32 is True or mode == "tf32"
    try:
        with _recording_launches(store), (forced_conv_precision(mode) if mode else contextlib.nullcontext()):
            op = call[0]
            if op == "bn_pool":  # batch norm + pooling of layers 1-3: forward, backward, double backward
                from mamlpp_fast.triton import bn_pool as tpool
                xs, gs, meta = call[1], call[2], call[3]
                x, g = t(xs), t(gs)
                out, mean, inv, sel = tpool.forward(x, g, g, meta)
                tpool.backward(t(tuple(out.shape)), x, g, g, mean, inv, sel, meta)
                # the outer pass: the input alias's gradient added to dx (HAS_DX2), with (layers 1-2) and without
                # (layer 3) the output alias's gradient beside gout (HAS_G2)
                tpool.backward(t(tuple(out.shape)), x, g, g, mean, inv, sel, meta, gout2=t(tuple(out.shape)),
                               dx2=t(xs))
                tpool.backward(t(tuple(out.shape)), x, g, g, mean, inv, sel, meta, dx2=t(xs))
                tpool.double_backward(t(xs), g, g, t(tuple(out.shape)), x, g, g, mean, inv, sel, meta)
            elif op.startswith("bn_"):
                xs, gs, nt = call[1], call[2], call[3]
                x, g, b = t(xs), t(gs), t(gs)
                mean, inv = t((xs[1],)), t((xs[1],))
                if op == "bn_forward":
                    tbn.bn_forward(x, g, b, nt, 1e-5, 0.01)
                elif op == "bn_backward":
                    tbn.bn_backward(t(xs), x, g, b, mean, inv, nt, 0.01)
                else:
                    has_u, has_ug, has_ub = call[4:7]
                    tbn.bn_double_backward(t(xs) if has_u else None, t(gs) if has_ug else None,
                                           t(gs) if has_ub else None, t(xs), x, g, b, mean, inv, nt, 0.01)
            elif op == "lslr_forward":
                thetas = [t(s) for s in call[1]]
                grads = [t(s) for s in call[2]]
                tlslr.lslr_forward(thetas, grads, [t((6,)) for _ in grads], 1)
            elif op == "lslr_backward":
                grads = [t(s) for s in call[1]]
                tlslr.lslr_backward([t(s) for s in call[1]], grads, [t((6,)) for _ in grads], 1, list(call[2]))
            elif op == "conv_forward":
                meta = call[2]
                b, co, ci, kh, kw = meta[:5]
                dual = {"x2": t(call[1]), "w2": t((b, co, ci, kh, kw))} if len(call) > 4 and call[4] else {}
                tconv.conv_forward(t(call[1]), t((b, co, ci, kh, kw)), t((b, co)) if call[3] else None, meta,
                                   **dual)
            elif op == "conv_data_grad":
                meta = call[2]
                tconv.conv_data_grad(t(call[1]), t(tuple(meta[:5])), meta)
            elif op == "conv_weight_grad":
                meta = call[2]
                b, co, ci, kh, kw, h, wd, ho, wo = meta[:9]
                x = t(call[1])
                with_bias = bool(call[3]) if len(call) > 3 else False  # the trace records it (later trees)
                tconv.conv_weight_grad(x, t((x.shape[0], b * co, ho, wo)), meta, **(
                    {"with_bias": True} if with_bias else {}))
            elif op == "conv_bn_pool":  # the fused first block: forward, backward, double backward
                from mamlpp_fast.triton import conv_block as tblock
                xs, ws, meta = call[1], call[2], call[3]
                x, w, bias, g = t(xs), t(ws), t(ws[:2]), t(ws[1:2])
                out, mean, inv, aux = tblock.forward(x, w, bias, g, g, meta)
                tblock.backward(t(tuple(out.shape)), x, w, bias, g, g, mean, inv, aux, meta)
                tblock.backward(t(tuple(out.shape)), x, w, bias, g, g, mean, inv, aux, meta,
                                gout2=t(tuple(out.shape)))  # the outer pass's two gradients (HAS_G2)
                tblock.double_backward(t(ws), t(ws[:2]), g, g, t(tuple(out.shape)), x, w, bias, g, g, mean, inv, aux,
                                       meta)
            elif op == "head":  # the linear head and its loss: forward (with and without the MSL weight and
                # sum), backward, double backward (all upstream gradients, as the learner's support passes)
                from mamlpp_fast.triton import head as thead
                n, c, f, nt = call[1]
                x, w, b = t((n, nt * f)), t((nt, c, f)), t((nt, c))
                labels = torch.empty(nt * n, device="meta", dtype=torch.int64)
                meta = (nt, 0.5)
                _, logits, lse = thead.forward(x, w, b, labels, None, None, meta)
                thead.forward(x, w, b, labels, t(()), t(()), meta)
                thead.backward(t(()), x, w, logits, lse, labels, t(()), meta)
                thead.double_backward(t((n, nt * f)), t((nt, c, f)), t((nt, c)), t(()), x, w, logits, lse, labels,
                                      None, meta, need_g=False)
            elif op == "fanout_sum":  # a fan-out node's sums: (size, uses) of each tensor
                from mamlpp_fast.triton import fanout as tfan
                tfan.sum_uses([[t((numel,)) for _ in range(uses)] for numel, uses in call[1]],
                              [t((numel,)) for numel, _ in call[1]])
            elif op == "expand_sum":  # step 0's expansion summed over the tasks: (shape, strides) per tensor
                from mamlpp_fast.triton import fanout as tfan
                tfan.sum_tasks([torch.empty_strided(shape, strides, device="meta", dtype=dtype)
                                for shape, strides in call[1]])
            elif op == "accuracy":  # the meta-update's accuracy: (rows, classes)
                from mamlpp_fast.triton import metrics as tmet
                rows, classes = call[1]
                tmet.accuracy(t((rows, classes)), torch.empty(rows, device="meta", dtype=torch.int64))
            elif op == "running_stats":  # the one-launch running-statistics update: E forwards onto G rows
                from mamlpp_fast.triton import running_stats as trs
                e, g, b, c = call[1]
                rows = tuple(i * g // e for i in range(e))  # the learner's order: each row's forwards together
                trs.running_stats_update([t((b * c,)) for _ in range(e)], [t((b * c,)) for _ in range(e)],
                                         [t((c,)) for _ in range(g)], [t((c,)) for _ in range(g)], t((2, e, b)),
                                         t((g + 1,)), rows)
            else:
                raise ValueError(f"unknown call {op!r}")
    finally:
        torch.backends.cudnn.allow_tf32 = old
    return store


# ---- compiling for sm_90a -------------------------------------------------------------------------------
def compile_launch(fn, args, kwargs, arch: int = 90):
    """Compile one launch's specialisation for GPUTarget('cuda', arch, 32) without a GPU. Returns
    (key, CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted((k, repr(v)) for k, v in attrs.items())), options.num_warps, options.num_stages,
           getattr(options, "maxnreg", None))
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return key, ck


def triton_tools() -> dict:
    """Paths of the ptxas / cuobjdump that the installed Triton ships (what it uses on a device)."""
    import triton
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = {}
    for name in ("ptxas", "cuobjdump"):
        p = os.path.join(base, name)
        tools[name] = p if os.path.exists(p) else shutil.which(name)
    return tools


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_verbose(ptxas: str, ptx: str, arch: str = "sm_90a") -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", "--gpu-name", arch, src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")
    return {k: int(r.search(text).group(1)) if r.search(text) else 0 for k, r in _PTXAS_RE.items()}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_INT_OPS = ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "IMNMX", "SEL", "IABS", "I2F", "F2I", "IMUL",
            "PRMT", "SGXT", "BMSK", "POPC", "FLO", "VIMNMX", "UIMAD", "UIADD3", "ULOP3", "USHF", "ULEA",
            "UISETP", "USEL", "UMOV", "MOV", "PLOP3", "P2R", "R2P", "IDP", "VIADD", "UIMNMX")


def _classify_sass(op: str) -> str:
    base = op.split(".")[0]
    if base == "FFMA":
        return "ffma"
    if base in ("HGMMA", "WGMMA"):
        return "hgmma"
    if base in ("HMMA",):
        return "hmma"
    if base in ("LDSM", "LDS", "LDSU"):
        return "lds"
    if base in ("LDG", "LDGSTS", "UTMALDG", "LD"):
        return "ldg"
    if base in ("STS", "STG", "ST"):
        return "store"
    if base in _INT_OPS:
        return "int"
    if base in ("FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "MUFU"):
        return "fp_other"
    if base in ("BAR", "DEPBAR", "SYNCS", "WARPGROUP", "NOP", "BRA", "EXIT", "WARPSYNC", "BSSY", "BSYNC"):
        return "control"
    return "other"


def sass_loops(cuobjdump: str, cubin: bytes) -> tuple:
    """(instructions [(address, opcode, operands)], loops [(first, last address)]): the cubin's SASS and
    the body of every backward branch, outer loops included (a loop nested in another lies inside its
    range)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        p = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True)
    instrs = []
    for line in p.stdout.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            tm = re.search(r"0x([0-9a-f]+)", rest)
            if tm:
                tgt = int(tm.group(1), 16)
                if tgt < addr:
                    loops.append((tgt, addr))
    return instrs, loops


def sass_hot_loop(cuobjdump: str, cubin: bytes) -> dict:
    """Instruction mix of the SASS loop (a backward branch's body) holding the most FFMA + HGMMA (of those,
    the shortest); ffma_loop_shares: the FFMA share of each loop holding as many, loop_instructions their
    instruction counts. A loop with an inner
    loop counts that body once: unroll inner loops whose trip count matters (bench.probe_tiles --loops
    lists every loop)."""
    instrs, loops = sass_loops(cuobjdump, cubin)
    best, bodies = None, []
    for lo, hi in loops:
        body = [op for a, op, _ in instrs if lo <= a <= hi]
        mix = Counter(_classify_sass(op) for op in body)
        score = (mix["ffma"] + mix["hgmma"] * 64, -len(body))
        bodies.append((score[0], mix["ffma"] / len(body) if body else 0.0, len(body)))
        if best is None or score > best[0]:
            best = (score, len(body), mix)
    total = len(instrs)
    whole = Counter(_classify_sass(op) for _, op, _ in instrs)
    if best is None:
        return {"loop": False, "instructions": total, **{f"all_{k}": v for k, v in whole.items()}}
    _, n, mix = best
    out = {"loop": True, "instructions": n}
    for k in ("ffma", "hgmma", "hmma", "lds", "ldg", "store", "int", "fp_other", "control", "other"):
        out[k] = mix.get(k, 0)
    out["ffma_share"] = mix.get("ffma", 0) / n if n else 0.0
    # every loop with as many FMAs as the hot one (a kernel that runs one step in two loops, e.g. the weight
    # gradient's lanes inside the image without a tap mask and the others with: INSIDE), best share first
    out["ffma_loop_shares"] = sorted((sh for sc, sh, _n in bodies if sc == best[0][0]), reverse=True)
    # and their instruction counts, fewest first (what prices such a launch's tensor-core loops: bench.trace
    # `tensor_loop_efficiency`)
    out["loop_instructions"] = sorted(n_ for sc, _sh, n_ in bodies if sc == best[0][0])
    return out


_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_PTX_INSTR = re.compile(r"^\s*(@!?%\w+\s+)?([a-z][\w.]*)")


def ptx_loops(ptx: str) -> list:
    """The loops of a PTX listing, one per backward branch (``bra`` to a label above it): a list of
    (mnemonics of the body from the label to the branch, whether no other loop lies inside it). The
    one PTX loop parser of bench/ (this module and bench/conv_ptx.py)."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        m = _PTX_BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans.append((labels[m.group(1)], i))
    loops = []
    for a, b in spans:
        ins = []
        for line in lines[a + 1:b + 1]:
            text = line.strip()
            if not text or text.startswith(("//", "{", "}")) or text.endswith(":"):
                continue
            m = _PTX_INSTR.match(text)
            if m:
                ins.append(m.group(2))
        innermost = not any(a < c and d <= b and (c, d) != (a, b) for c, d in spans)
        loops.append((ins, innermost))
    return loops


def ptx_hot_loop(ptx: str) -> dict:
    """Instruction count and FMA / mma count of the PTX loop whose body holds the most fma / mma."""
    best = None
    for body, _ in ptx_loops(ptx):
        fma = sum(1 for op in body if op.startswith("fma.rn.f32"))
        mma = sum(1 for op in body if op.startswith(("wgmma", "mma.")))
        if best is None or (fma + 64 * mma, -len(body)) > best[0]:
            best = ((fma + 64 * mma, -len(body)), len(body), fma, mma)
    if best is None:
        return {"ptx_loop_instructions": 0, "ptx_loop_fma": 0, "ptx_loop_mma": 0}
    return {"ptx_loop_instructions": best[1], "ptx_loop_fma": best[2], "ptx_loop_mma": best[3]}


def _call_str(call) -> str:
    if call[0].startswith("lslr") or call[0] in ("fanout_sum", "expand_sum"):
        return f"{call[0]} ({len(call[1])} tensors)"
    return f"{call[0]} {tuple(call[1])}"


def launch_consts(kwargs: dict) -> dict:
    """The compile-time part of a launch's keyword arguments (constexprs, num_warps, num_stages,
    maxnreg): what a row's ``config`` records and identifies a specialisation's configuration by."""
    return {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages", "maxnreg")}


def kernel_metrics(calls, tf32_variants: bool = True, tools: dict | None = None, sass: bool = True,
                   distinct_configs: bool = False) -> list:
    """One row per distinct compiled specialisation of the Triton kernels behind `calls`.
    sass: also the SASS / PTX loop mix (needs cuobjdump); distinct_configs: compile one specialisation
    per (kernel, constexpr arguments, num_warps) only (the integer arguments' divisibility aside)."""
    tools = tools or triton_tools()
    rows, seen, configs = [], {}, set()
    for call in calls:
        # strict fp32 for every kernel; the convolutions' and the fused block's products also in TF32 and
        # 3xTF32 (tf32x3: opt-in, but shipped, so its tiles are held to the same no-spill rule)
        variants = ["fp32"] + (["tf32", "tf32x3"] if tf32_variants and call[0].startswith("conv_") else [])
        for tf32 in variants:
            for fn, args, kwargs in capture_launches(call, tf32):
                if distinct_configs:
                    ckey = (fn.__name__, repr(sorted(kwargs.items())))
                    if ckey in configs:
                        continue
                    configs.add(ckey)
                key, ck = compile_launch(fn, args, kwargs)
                if key in seen:
                    seen[key]["calls"] += 1
                    continue
                consts = launch_consts(kwargs)
                row = dict(kernel=fn.__name__, precision=tf32,
                           config=consts, call=_call_str(call), calls=1,
                           shared_bytes=int(getattr(ck.metadata, "shared", 0)),
                           num_warps=int(ck.metadata.num_warps))
                if tools.get("ptxas"):
                    row.update(ptxas_verbose(tools["ptxas"], ck.asm["ptx"]))
                if sass and tools.get("cuobjdump"):
                    row.update(sass_hot_loop(tools["cuobjdump"], ck.asm["cubin"]))
                if sass:
                    row.update(ptx_hot_loop(ck.asm["ptx"]))
                seen[key] = row
                rows.append(row)
    return rows


def compile_check(calls, dtype) -> list:
    """Compile every distinct launch configuration of the Triton kernels behind `calls` on `dtype` meta
    tensors (float32: strict and, for the convolutions, TF32; float64) for sm_90a; returns one row per
    configuration, {kernel, call, dtype, ok, error}. A kernel the installed Triton cannot lower fails
    its first launch on a device; the interpreter never compiles, so only this catches it without one
    (the fused block's float64 backward did, 2026-12-04: bench/NOTES.md)."""
    import torch
    rows, configs = [], set()
    for call in calls:
        variants = ["fp32"] + (["tf32", "tf32x3"] if dtype == torch.float32 and call[0].startswith("conv_") else [])
        for tf32 in variants:
            for fn, args, kwargs in capture_launches(call, tf32, dtype=dtype):
                ckey = (fn.__name__, repr(sorted(kwargs.items())))
                if ckey in configs:
                    continue
                configs.add(ckey)
                row = dict(kernel=fn.__name__, call=_call_str(call), dtype=str(dtype).replace("torch.", ""),
                           precision="strict" if tf32 == "fp32" else tf32, config=launch_consts(kwargs), ok=True,
                           error=None)
                try:
                    compile_launch(fn, args, kwargs)
                except Exception as e:  # noqa: BLE001 - the failure is the result
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
    return rows


# ---- CUDA kernels ---------------------------------------------------------------------------------------------
def cuda_kernel_metrics(root: str, arch: str = "sm_90") -> list:
    """nvcc -Xptxas -v for every kernels/*.cu: one row per kernel instantiation."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    rows = []
    for name in sorted(os.listdir(os.path.join(root, "kernels"))):
        if not name.endswith(".cu"):
            continue
        with tempfile.TemporaryDirectory() as d:
            p = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-c",
                                os.path.join(root, "kernels", name), "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
        text = p.stdout + p.stderr
        if p.returncode != 0:
            rows.append(dict(file=name, kernel="(build failed)", error=text.strip()[-300:]))
            continue
        current = None
        for line in text.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = dict(file=name, kernel=_demangle(m.group(1)), registers=0, spill_stores=0,
                               spill_loads=0, stack=0)
                rows.append(current)
                continue
            if current is not None:
                for k, r in _PTXAS_RE.items():
                    mm = r.search(line)
                    if mm:
                        current[k] = int(mm.group(1))
    return rows


def _demangle(sym: str) -> str:
    cf = shutil.which("c++filt")
    if cf is None:
        return sym
    out = subprocess.run([cf, sym], capture_output=True, text=True).stdout.strip()
    out = re.sub(r"mamlpp::cuda::\(anonymous namespace\)::", "", out)
    return re.sub(r"^void |\(.*\)$", "", out) or sym  # name<template args> only


# ---- report ---------------------------------------------------------------------------------------------------------
def _cfg_str(cfg: dict) -> str:
    keep = ("BLOCK", "BLOCK_W", "NSUM", "BLOCK_M", "BLOCK_N", "BLOCK_K", "NSUB", "SPLIT", "CBLOCK", "PBLOCK", "num_warps", "maxnreg", "KH",
            "HAS_U", "HAS_DTHETA", "GAMMA_PER_TASK", "HAS_BIAS", "GATHER_MK", "TAP_MAJOR", "STORE_KO", "INSIDE", "W_FWD", "DUAL",
            "TRANS", "HAS_G2", "HAS_DX2")
    # TRANS (tf32x3's turned tiles), HAS_G2, HAS_DX2 (the outer pass's extra gradients): shown where set only
    return " ".join(f"{k}={cfg[k]}" for k in keep if k in cfg and (k not in ("TRANS", "HAS_G2", "HAS_DX2") or cfg[k]))


def _row_key(r: dict) -> tuple:
    return (r["kernel"], r["precision"], _cfg_str(r["config"]), r.get("registers"), r.get("spill_stores"),
            r.get("spill_loads"), r["shared_bytes"], r.get("loop"), r.get("instructions"), r.get("ffma"),
            r.get("hgmma"), r.get("hmma"), r.get("lds"), r.get("int"), r.get("ptx_loop_instructions"), r.get("ptx_loop_fma"))


COMPARED = ("registers", "spill_stores", "spill_loads", "instructions", "ffma", "hgmma", "hmma", "lds", "ldg",
            "int", "fp_other", "store", "control", "other")


def compare_tables(old: dict, new: dict) -> dict:
    """Two reports' Triton rows joined on (kernel, precision, configuration, call): {"same": n, "changed":
    [(key, {field: (old, new)})], "only_old": [key], "only_new": [key]} over the `COMPARED` fields
    (registers, spills, the hot loop's instruction mix). What a change that should not touch the compiled
    code (a refactor) or only some launches (a configuration rule) is checked with."""
    def key(r):
        return (r["kernel"], r["precision"], json.dumps(r["config"], sort_keys=True), r["call"])
    a = {key(r): r for r in old["triton_kernels"]}
    b = {key(r): r for r in new["triton_kernels"]}
    out = dict(same=0, changed=[], only_old=sorted(set(a) - set(b)), only_new=sorted(set(b) - set(a)))
    for k in sorted(set(a) & set(b)):
        d = {f: (a[k].get(f), b[k].get(f)) for f in COMPARED if a[k].get(f) != b[k].get(f)}
        if d:
            out["changed"].append((k, d))
        else:
            out["same"] += 1
    return out


def compare_markdown(cmp: dict) -> str:
    """`compare_tables`' result as lines: the counts, then each changed row and each row only one side has."""
    lines = [f"{cmp['same']} rows the same, {len(cmp['changed'])} changed, {len(cmp['only_old'])} only in the "
             f"first, {len(cmp['only_new'])} only in the second"]
    lines += [f"changed: {k[0]} {k[1]} {k[3]} {k[2]}: " + ", ".join(f"{f} {o} -> {n}" for f, (o, n) in d.items())
              for k, d in cmp["changed"]]
    lines += [f"only in the first: {k[0]} {k[1]} {k[3]} {k[2]}" for k in cmp["only_old"]]
    lines += [f"only in the second: {k[0]} {k[1]} {k[3]} {k[2]}" for k in cmp["only_new"]]
    return "\n".join(lines)


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident warps per SM on sm_90 (the theoretical occupancy's numerator; 64 at most) for a kernel of
    `registers` per thread, `shared_bytes` per CTA and `num_warps` warps per CTA: the fewest CTAs that the
    register file (65,536 per SM, allocated per warp in units of 256), shared memory (228 KB per SM, 1 KB
    of it reserved per CTA), the warp limit (64) and the CTA limit (32) allow, times num_warps.

    The first H200 run found the convolutions at ~32% of the fp32 peak where their loops' FFMA share is
    ~79%; most of their configurations keep 8 warps per SM (200-255 registers on 2 or 4 warps), too few
    to hide the gathers' latency, which the FFMA share does not see (bench/NOTES.md)."""
    if not registers or not num_warps:
        return 0
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_smem = 233472 // (shared_bytes + 1024)
    ctas = min(by_regs, by_smem, 64 // num_warps, 32)
    return ctas * num_warps


def occupancy_summary(rep: dict, precision: str = "fp32") -> dict:
    """{kernel family: {resident warps per SM: [specialisations, calls]}} of a static-metrics report's
    Triton kernels of one precision (calls: the distinct op calls of the traced meta-updates that launch
    each specialisation, its row's `calls`); families: "conv" (_conv_*), "block" (the fused block's
    window passes), "other"."""
    block = {"_fwd_kernel", "_bwd_kernel", "_gram_kernel", "_dbwd_dgout_kernel"}
    out: dict = {}
    for r in rep["triton_kernels"]:
        if r["precision"] != precision:
            continue
        fam = "conv" if r["kernel"].startswith("_conv") else "block" if r["kernel"] in block else "other"
        occ = occupancy(r.get("registers") or 0, r["shared_bytes"], r["num_warps"])
        cell = out.setdefault(fam, {}).setdefault(occ, [0, 0])
        cell[0] += 1
        cell[1] += r.get("calls", 1)
    return {f: dict(sorted(v.items())) for f, v in sorted(out.items())}


def to_markdown(rep: dict) -> str:
    """The table; specialisations with identical metrics (they differ only in the integer arguments'
    divisibility) are one row, with their count and the first call's tensor shape. warps/SM:
    `occupancy` (resident warps per SM of 64)."""
    lines = [f"Compiled for sm_90a without a GPU: Triton {rep['triton']} (its ptxas {rep['ptxas_version']}), "
             f"nvcc {rep['nvcc_version']}; the launches of one meta-update of {', '.join(rep['workloads'])} "
             f"(triton backend and convolutions). Command: `{rep['command']}`", "",
             "| Triton kernel | prec | config | specs | first call | regs | spill st/ld B | smem B | warps/SM | "
             "loop instr (SASS) | FFMA | HGMMA | HMMA | LDS | int | FFMA share | PTX loop instr / fma |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rep["triton_kernels"]:
        groups.setdefault(_row_key(r), []).append(r)
    for rs in groups.values():
        r = rs[0]
        loop = r.get("loop")
        lines.append(
            f"| {r['kernel']} | {r['precision']} | {_cfg_str(r['config'])} | {len(rs)} | {r['call']} | "
            f"{r.get('registers', 'n/a')} | {r.get('spill_stores', 'n/a')}/{r.get('spill_loads', 'n/a')} | "
            f"{r['shared_bytes']} | {occupancy(r.get('registers') or 0, r['shared_bytes'], r['num_warps'])} | "
            + (f"{r['instructions']} | {r['ffma']} | {r['hgmma']} | {r['hmma']} | {r['lds']} | {r['int']} | "
               f"{r['ffma_share']:.0%} | " if loop else "no loop (one step) | | | | | | | ")
            + f"{r['ptx_loop_instructions']} / {r['ptx_loop_fma']} |")
    if rep["cuda_kernels"]:
        lines += ["", "| CUDA kernel (nvcc -arch=sm_90 -O3 -Xptxas -v) | file | regs | spill st/ld B | stack B |",
                  "|---|---|---|---|---|"]
        for r in rep["cuda_kernels"]:
            lines.append(f"| `{r['kernel']}` | {r['file']} | {r.get('registers', '')} | "
                         f"{r.get('spill_stores', '')}/{r.get('spill_loads', '')} | {r.get('stack', '')} |")
    return "\n".join(lines) + "\n"


def _version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else "unknown"
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    """python -m bench.static_metrics: registers, spills and inner-loop instruction mix for sm_90a."""
    import triton
    p = argparse.ArgumentParser(prog="python -m bench.static_metrics", description=main.__doc__)
    p.add_argument("--workloads", default="omniglot_20w1s,miniimagenet_5w1s")
    p.add_argument("--quick", action="store_true", help="the --quick workloads (tiny shapes)")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    p.add_argument("--no-tf32", action="store_true", help="compile the convolutions in strict fp32 only")
    p.add_argument("--out", default=None, help="PREFIX for PREFIX.json / PREFIX.md")
    p.add_argument("--from-json", default=None, help="only rewrite the markdown of an earlier PREFIX.json")
    p.add_argument("--occupancy-from", default=None, metavar="JSON",
                   help="only print how many strict-fp32 specialisations of an earlier PREFIX.json keep each "
                        "number of resident warps per SM, per kernel family")
    p.add_argument("--compile-check", action="store_true",
                   help="only compile every distinct launch configuration in float32 and float64 and list the "
                        "ones the installed Triton cannot lower for sm_90a (exit status 1 if any)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("OLD_JSON", "NEW_JSON"),
                   help="only compare two reports' Triton rows (registers, spills, loop mix) by kernel, "
                        "precision, configuration and call, and list what differs")
    a = p.parse_args(argv)
    if a.compare:
        with open(a.compare[0]) as f, open(a.compare[1]) as g:
            print(compare_markdown(compare_tables(json.load(f), json.load(g))))
        return 0
    if a.occupancy_from:
        with open(a.occupancy_from) as f:
            summary = occupancy_summary(json.load(f))
        for fam, counts in summary.items():
            print(f"{fam}: " + ", ".join(f"{w} warps/SM: {n} specialisations ({c} calls)"
                                         for w, (n, c) in counts.items()))
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            rep = json.load(f)
        md = to_markdown(rep)
        with open(a.from_json[:-len(".json")] + ".md", "w") as f:
            f.write(md)
        print(md)
        return 0
    tools = triton_tools()
    if not tools.get("ptxas"):
        print("error: no ptxas (Triton's bundled one or on PATH): cannot compile for sm_90a", file=sys.stderr)
        return 2
    workloads = a.workloads.split(",")
    if a.quick and a.workloads == p.get_default("workloads"):
        from .workloads import QUICK_MAIN
        workloads = [w.name for w in QUICK_MAIN]
    calls = collect_calls(workloads, a.quick)
    if a.compile_check:
        import torch
        rows = compile_check(calls, torch.float32) + compile_check(calls, torch.float64)
        bad = [r for r in rows if not r["ok"]]
        print(f"compile check, Triton {triton.__version__}, sm_90a: {len(rows)} launch configurations, "
              f"{len(bad)} failed")
        for r in bad:
            print(f"  FAILED {r['kernel']} {r['dtype']} {r['precision']} {r['call']}: {r['error'][:160]}")
        return 1 if bad else 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rep = dict(triton=triton.__version__, ptxas_version=_version([tools["ptxas"], "--version"]),
               nvcc_version=_version(["nvcc", "--version"]) if shutil.which("nvcc") else "n/a",
               target="cuda sm_90a (GPUTarget('cuda', 90, 32))", workloads=workloads,
               command="python -m bench.static_metrics " + " ".join(sys.argv[1:] if argv is None else argv),
               triton_kernels=kernel_metrics(calls, not a.no_tf32, tools),
               cuda_kernels=[] if a.no_cuda else cuda_kernel_metrics(root))
    prefix = a.out or os.path.join(root, "bench", "results", f"static_metrics_sm90a_triton{triton.__version__}")
    with open(prefix + ".json", "w") as f:
        json.dump(rep, f, indent=1)
    md = to_markdown(rep)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
