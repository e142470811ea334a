"""Quick GPU probe used during development: meta-update times of the reference and the fast learner
(torch op backend, with and without CUDA-graph capture) on Omniglot 20-way 1-shot B=8, and the top
kernels of one fast meta-update. Not a benchmark (see bench/ for that)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _batches import learnable_batch  # noqa: E402

from mamlpp_fast.config import default_args  # noqa: E402
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast  # noqa: E402
from mamlpp_fast.reference import MAMLFewShotClassifier as Ref  # noqa: E402


def timeit(model, batch, n):
    for _ in range(2):
        model.run_train_iter(batch, 0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        model.run_train_iter(batch, 0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


backend = sys.argv[1] if len(sys.argv) > 1 else "torch"
batch = learnable_batch(8, 20, 1, 1, 1, 28, 28, 0)
shape = (2, 1, 28, 28)
for name, cls, extra, n in [("reference", Ref, {}, 3), ("fast", Fast, {"cuda_graph": False}, 10), ("fast+graph", Fast, {"cuda_graph": True}, 10)]:
    args = default_args(num_classes_per_set=20, backend=backend, **extra)
    m = cls(shape, "cuda", args)
    torch.cuda.reset_peak_memory_stats()
    dt = timeit(m, batch, n)
    print(f"{name:12s} backend={backend} {dt*1e3:8.2f} ms/update  {1/dt:7.2f} updates/s  peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB"
          + (f"  graph_failed={m._graph_failed}" if extra else ""), flush=True)
args = default_args(num_classes_per_set=20, backend=backend, cuda_graph=False)  # the profile of an uncaptured update
m = Fast(shape, "cuda", args)
m.run_train_iter(batch, 0)
from torch.profiler import ProfilerActivity, profile  # noqa: E402
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
    m.run_train_iter(batch, 0)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
