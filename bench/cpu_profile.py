"""Where the CPU time of one meta-update goes: a per-op profile (torch.profiler, CPU activities).

    python -m bench.cpu_profile [--learner native|torch|reference] [--workload omniglot_20w1s]
                                [--batch-size 4] [--threads 1] [--out FILE]

One untimed meta-update, one timed without the profiler (wall seconds), then one under the profiler; prints
the ops sorted by self CPU time (the table torch.profiler's key_averages gives) and, with --out, writes it
with the date, versions and command. `native` and `torch` are the fast learner on that backend;
`reference` is the per-task reference learner (the original's structure).

    python -m bench.cpu_profile --bn-ops [--batch-size 4] [--threads 1]

instead times single calls of the native CPU BN kernels (torch.ops.mamlpp.native_bn_forward, _backward,
_double_backward) at the workload's four layer shapes, beside ATen's batch_norm forward on the same tensor
and a clone (the copy bandwidth), median of 10 calls after one untimed.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

from . import workloads as W


def profile(learner: str, workload: str, batch_size: int | None, threads: int, rows: int = 25) -> str:
    import torch
    torch.set_num_threads(threads)
    w = W.workload_by_name(workload)
    if batch_size:
        w = w.with_(batch_size=batch_size)
    if learner == "reference":
        from mamlpp_fast.reference import MAMLFewShotClassifier as Learner
        args = W.make_args(w)
    else:
        from mamlpp_fast.fast import MAMLFewShotClassifier as Learner
        args = W.make_args(w, backend=learner)
    model = Learner(W.im_shape(w), torch.device("cpu"), args)
    batch = W.make_batch(w, "cpu")
    model.run_train_iter(batch, 0)
    t = time.perf_counter()
    model.run_train_iter(batch, 0)
    wall = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.run_train_iter(batch, 0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    return (f"{w.name} B={w.batch_size}, learner {learner}, {threads} thread(s): one meta-update {wall:.3f} s "
            f"(without the profiler)\n{table}")


def bn_ops(workload: str, batch_size: int | None, threads: int) -> str:
    import torch

    import mamlpp_fast.ops.library  # noqa: F401  (registers torch.ops.mamlpp)
    torch.set_num_threads(threads)
    w = W.workload_by_name(workload)
    if batch_size:
        w = w.with_(batch_size=batch_size)
    ops = torch.ops.mamlpp
    eps, slope = 1e-5, 0.01

    def ms(fn, reps=10):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e3

    gen = torch.Generator().manual_seed(0)
    n, t, c = w.n_way * w.k_shot, w.batch_size, w.filters
    lines = [f"{w.name} B={t}, {threads} thread(s), ms per call (median of 10), support-set shapes (n={n})",
             "| x shape | MB | native fwd | native bwd | native double bwd | ATen batch_norm fwd | clone |",
             "|---|---|---|---|---|---|---|"]
    h = w.height
    for _ in range(w.num_stages):
        x = torch.randn(n, t * c, h, h, generator=gen)
        dy, u = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        g, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
        ug, ub = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
        _, mean, invstd = ops.native_bn_forward(x, g, b, t, eps, slope)
        row = [ms(lambda: ops.native_bn_forward(x, g, b, t, eps, slope)),
               ms(lambda: ops.native_bn_backward(dy, x, g, b, mean, invstd, t, slope)),
               ms(lambda: ops.native_bn_double_backward(u, ug, ub, dy, x, g, b, mean, invstd, t, slope)),
               ms(lambda: torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)),
               ms(lambda: x.clone())]
        lines.append(f"| {tuple(x.shape)} | {x.numel() * x.element_size() / 1e6:.1f} | "
                     + " | ".join(f"{v:.2f}" for v in row) + " |")
        h //= 2
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learner", default="native", choices=["native", "torch", "reference"])
    ap.add_argument("--workload", default="omniglot_20w1s")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--bn-ops", action="store_true", help="time the native BN kernels' single calls instead")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args(argv)
    import torch
    text = (bn_ops(a.workload, a.batch_size, a.threads) if a.bn_ops
            else profile(a.learner, a.workload, a.batch_size, a.threads, a.rows))
    print(text)
    if a.out:
        from .run import _git, revision
        rev = revision()
        dirty = " (working tree modified)" if _git("status", "--porcelain", "--untracked-files=no") else ""
        head = (f"# CPU per-op profile, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
                f"# torch {torch.__version__}, git {rev}{dirty}\n"
                f"# command: python -m bench.cpu_profile {' '.join(sys.argv[1:] if argv is None else argv)}\n")
        with open(a.out, "w") as f:
            f.write(head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
