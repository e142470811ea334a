"""The experiment loop's own work per meta-update on the main thread, with a stand-in learner.

    python -m bench.loop_overhead [--workload omniglot_20w1s] [--updates 30] [--sleep-ms 100]
                                  [--bar-interval 0.05] [--workers 2] [--json]

The trainer item of bench/run.py measures the loop around the real learner; on a CPU that learner takes
seconds per meta-update and its noise buries a fraction of a millisecond. Here the learner's
`run_train_iter` is replaced by a stand-in that sleeps `--sleep-ms` and returns the losses a real
meta-update returned (a small learner of the workload's task shape: 8 filters, one inner step, run once
before the loop). `ExperimentBuilder.train()` then runs two epochs of `--updates` meta-updates on the
built-in synthetic dataset with `--workers` data workers and its progress bar on (written to a file).
Reported: epoch 2's main-thread CPU time (time.thread_time) outside the stand-in, per meta-update. Sleeping
does not use CPU, so the figure is what the loop itself costs the thread that feeds the device, and after
each sleep the loop runs with caches other work has evicted, as it does after a real meta-update.

`--evict-mb 64` makes the stand-in also write a 64 MiB buffer, so that the loop runs with the caches a
real meta-update leaves (without it the loop's code and data stay cached across the sleep, and it
measures the loop's work warm).

`--bar-interval` sets the training bar's refresh interval (seconds; default: one draw per meta-update,
which is what happens when every meta-update takes longer than the bar's own interval, e.g. the full
learner on a CPU); a value out of reach (1e9) leaves the bar's drawing out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from . import workloads as W
from .trainer_bench import trainer_args


def measure(workload: str, updates: int, sleep_ms: float, bar_interval: float | None, workers: int,
            evict_mb: float = 0.0) -> dict[str, Any]:
    import torch

    from mamlpp_fast.data import MetaLearningSystemDataLoader
    from mamlpp_fast.fast import MAMLFewShotClassifier
    from mamlpp_fast.trainer import ExperimentBuilder

    w = W.workload_by_name(workload)
    tmp = tempfile.mkdtemp(prefix="mamlpp_loop_overhead_")
    err = open(os.path.join(tmp, "progress.txt"), "w")
    saved_stderr = sys.stderr
    try:
        args = trainer_args(w, "synthetic", workers, updates, w.batch_size, tmp, torch.device("cpu"), None,
                            cnn_num_filters=8, number_of_training_steps_per_iter=1,
                            number_of_evaluation_steps_per_iter=1)
        model = MAMLFewShotClassifier(W.im_shape(w), torch.device("cpu"), args)
        data = MetaLearningSystemDataLoader(args=args, current_iter=0)
        batch = next(iter(data.get_train_batches(total_batches=1, augment_images=False)))
        data.total_train_iters_produced = 0
        recorded, _ = model.run_train_iter(tuple(torch.as_tensor(t) for t in batch[:4]), 0)
        inside: list[float] = []
        evict = np.zeros(int(evict_mb * 2 ** 20) // 8) if evict_mb > 0 else None

        def standin(*a: Any, **kw: Any):
            c = time.thread_time()
            time.sleep(sleep_ms / 1e3)
            if evict is not None:
                np.add(evict, 1.0, out=evict)  # what a real meta-update does to the caches: evicts the loop's code and data
            inside.append(time.thread_time() - c)
            return dict(recorded), None

        model.run_train_iter = standin
        sys.stderr = err
        builder = ExperimentBuilder(args, data, model, torch.device("cpu"), progress=True, log=lambda m: None)
        make_bar = builder._bar

        def bar(**kw: Any):
            b = make_bar(**kw)
            if str(kw.get("desc", "")).startswith("train"):
                b.mininterval = sleep_ms / 2e3 if bar_interval is None else bar_interval
            return b

        builder._bar = bar
        marks: list[float] = []
        end_of_epoch = builder._end_of_epoch

        def marked(*a: Any, **kw: Any):
            marks.append(time.thread_time())
            out = end_of_epoch(*a, **kw)
            marks.append(time.thread_time())
            return out

        builder._end_of_epoch = marked
        if builder.train() != "done":
            raise RuntimeError("the experiment loop did not finish")
    finally:
        sys.stderr = saved_stderr
        err.close()
        shutil.rmtree(tmp, ignore_errors=True)
    cpu_ms = ((marks[2] - marks[1]) - sum(inside[updates:2 * updates])) / updates * 1e3
    return {"workload": workload, "updates": updates, "sleep_ms": sleep_ms, "evict_mb": evict_mb,
            "bar_interval_s": sleep_ms / 2e3 if bar_interval is None else bar_interval, "workers": workers,
            "main_thread_cpu_ms_per_update": cpu_ms, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="omniglot_20w1s", choices=[w.name for w in W.MAIN if w.dataset_name != "mini_imagenet"])
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--sleep-ms", type=float, default=100.0)
    ap.add_argument("--bar-interval", type=float, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--evict-mb", type=float, default=0.0,
                    help="the stand-in also writes a buffer of this size (MiB) after sleeping, evicting the "
                         "caches as a real meta-update does (its time counts as the learner's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    r = measure(a.workload, a.updates, a.sleep_ms, a.bar_interval, a.workers, a.evict_mb)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['workload']}: {r['main_thread_cpu_ms_per_update']:.3f} ms of main-thread CPU per meta-update "
              f"outside the learner ({r['updates']} updates, stand-in sleeping {r['sleep_ms']:g} ms, bar interval "
              f"{r['bar_interval_s']:g} s, {r['workers']} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
