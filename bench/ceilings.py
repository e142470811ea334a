"""python -m bench.ceilings: the device ceilings that bench.trace's prediction is priced with, measured.

bench.trace prices each kernel of a meta-update with five numbers of the device (`bench.trace.CEILINGS`):
the strict-fp32 and TF32 matrix rates, the streaming bandwidth, and the cost of one launch inside a CUDA
graph and in eager mode. This measures all five on the device at hand, each as the best of several
timed repetitions (CUDA events, after a warm-up), and writes them as one JSON object whose keys are
CEILINGS' keys, with how each was measured:

- fp32_tflops / tf32_tflops: torch.mm of two random n x n float32 matrices (n = 8192), 2 n^3 FLOPs
  (bench.run's `matmul_ceiling`, which the benchmark reports too);
- bandwidth_tbs: a device-to-device copy of a random float32 tensor of 2 GiB, counting the bytes read and
  the bytes written (2 x 2 GiB) over the copy's time;
- graph_launch_us: L launches of a one-element add captured in a CUDA graph; the graph's replay time over
  L (an upper bound of the cost per launch: it includes the tiny kernel's own run);
- eager_launch_us: the same L adds launched from Python without a graph, timed from the host, over L.

The copy bandwidth is the ceiling bench.trace's byte counts are divided by; the 2026-11-26 H100 entry
had only a lower bound from the batch-norm kernels (CEILINGS['h100']['sources']).

Usage: python -m bench.ceilings [--out FILE.json] [--quick]. Refuses (exit status 2) without CUDA.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

__all__ = ["measure", "main"]


def _best_ms(fn, reps: int) -> float:
    """The best of `reps` CUDA-event timings of fn() after two untimed calls, in milliseconds
    (bench.run's `time_loop`)."""
    import torch

    from .run import time_loop
    times, _, _ = time_loop(fn, torch.device("cuda"), 2, reps, reps, 1e9)
    return min(times) * 1e3


def measure(quick: bool = False) -> dict:
    """The five ceilings of bench.trace.CEILINGS on the current CUDA device, with their sources."""
    import torch
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(0), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    src: dict = {}
    reps = 5 if quick else 10
    from .run import matmul_ceiling
    mm = matmul_ceiling(dev, quick)  # strict fp32 and TF32, best of its repetitions
    for key in ("fp32", "tf32"):
        out[f"{key}_tflops"] = mm[key]["tflops"]
        src[f"{key}_tflops"] = (f"best of {mm[key]['reps']} torch.mm {mm[key]['n']}^3, random float32, "
                                f"{mm[key]['setting']} (bench.run.matmul_ceiling)")
    numel = (2 ** 25 if quick else 2 ** 29)  # 128 MiB / 2 GiB of float32
    x = torch.randn(numel, device=dev)
    y = torch.empty_like(x)
    ms = _best_ms(lambda: y.copy_(x), reps)
    out["bandwidth_tbs"] = 2 * x.numel() * 4 / (ms * 1e-3) / 1e12
    src["bandwidth_tbs"] = (f"best of {reps} device-to-device copies of {x.numel() * 4 / 2 ** 30:.3g} GiB of "
                            "random float32, bytes read + written over the copy's time")
    del x, y
    torch.cuda.empty_cache()
    launches = 200 if quick else 2000
    t = torch.randn(1, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            t.add_(1.0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            t.add_(1.0)
    ms = _best_ms(g.replay, reps)
    out["graph_launch_us"] = ms * 1e3 / launches
    src["graph_launch_us"] = (f"replay of a CUDA graph of {launches} one-element adds, best of {reps}, over "
                              f"{launches} (an upper bound: each add's own run is in it)")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(launches):
            t.add_(1.0)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    out["eager_launch_us"] = best * 1e6 / launches
    src["eager_launch_us"] = (f"{launches} one-element adds launched from Python, host clock, best of 3, over "
                              f"{launches} (torch's own dispatch included; the learner's Python per launch is not)")
    out["sources"] = src
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the JSON here (it is printed too)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: bench.ceilings measures a CUDA device and there is none here", file=sys.stderr)
        return 2
    res = measure(a.quick)
    res.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
               command="python -m bench.ceilings " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
