"""The `trainer` item of bench/run.py: end-to-end meta-updates per second of the real experiment loop,
beside the learner alone, and the time-to-result projection of the paper's full runs.

One item = one workload (bench/workloads.py), one data source and one `num_dataprovider_workers` value:

1. learner only: the fast learner's `run_train_iter` on one batch of that data source already on the
   device (`--warmup` untimed, then timed as every item of bench/run.py: CUDA events on a GPU,
   time.perf_counter on a CPU);
2. end to end: a fresh learner in `ExperimentBuilder` with the real `MetaLearningSystemDataLoader`
   (prefetching workers, pinned memory, device copies ahead), logging and tqdm progress on, for two
   epochs of `--trainer-updates` meta-updates, each followed by validation on `--trainer-eval-tasks`
   tasks and a checkpoint. The second epoch is reported (the first one pays the process's one-time
   costs); the per-epoch split comes from the trainer's own columns (epoch_train_seconds,
   epoch_val_seconds, epoch_checkpoint_seconds).

Reported: `end_to_end_ms_per_update` (epoch 2's training seconds / updates), `learner_only_ms`
(median), `overhead_ms_per_update` = the difference of the two (as defined by the issue: the two are
timed separately, so on a noisy machine the difference carries their noise), and
`overhead_in_loop_ms_per_update` = (epoch 2's training seconds - the time spent inside run_train_iter
during it) / updates: everything else the loop does per meta-update (waiting for data, statistics,
progress), measured in the same loop and so free of run-to-run noise; and
`overhead_in_loop_cpu_ms_per_update`, the same in CPU time of the main thread (time.thread_time), which
on a shared machine is not inflated by waiting for a core; split into
`overhead_in_loop_cpu_ms_between_updates` (mean main-thread CPU between the return of one meta-update and
the call of the next within epoch 2: what every meta-update costs) and `loop_cpu_ms_once_per_epoch` (the
rest: the progress bar's set-up and final draws and the like, paid once per epoch, which a benchmark
epoch of a few meta-updates spreads over few and a paper epoch of 500 over many).

Data sources: "synthetic" (the built-in dataset, dataset_name "synthetic": no rotations) and
"omniglot_zips", the official Omniglot zip files read in place from `--omniglot-dir` (default: the
environment variable MAMLPP_OMNIGLOT_DIR, else the data folder tests/test_data.py also looks in), Omniglot
workloads only. The "small" zips hold 242 characters, too few for the configs' split to give 20
validation classes, so the split used there is 0.7/0.15/0.15.

Projection ("time to result"): for each measured workload, the wall time of its paper configuration's
full run (configs/*maml++*.json: total_epochs x total_iter_per_epoch meta-updates, validation on
num_evaluation_tasks tasks and a checkpoint every epoch, then the test protocol: max_models_to_save
models on num_evaluation_tasks tasks), from the rates measured here. Ours: the end-to-end time per
update, the validation time per task and the checkpoint time of epoch 2. The reference learner
(one task at a time, the original's design) in the same loop: its learner-only time per update plus our
in-loop overhead, and its validation time per task (one run_validation_iter call on one batch, after one
warm-up call). A projection is only as good as the rates: the validation time per task includes the
pass's fixed costs spread over few tasks, so it is an upper bound for 600-task passes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from . import workloads as W

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("synthetic", "omniglot_zips")
ZIP_SPLIT = [0.7, 0.15, 0.15]
# bench workload -> the paper configuration it stands for
PAPER_CONFIGS = {
    "omniglot_20w1s": "omniglot_maml++_20_way_1_shot.json",
    "omniglot_5w1s": "omniglot_maml++_5_way_1_shot.json",
    "miniimagenet_5w1s": "mini-imagenet_maml++_5_way_1_shot.json",
    "miniimagenet_5w5s": "mini-imagenet_maml++_5_way_5_shot.json",
}


class NotApplicable(Exception):
    """Raised when this item cannot run here (bench/run.py reports it as n/a)."""


def default_omniglot_dir() -> str:
    return os.environ.get("MAMLPP_OMNIGLOT_DIR") or os.path.join(os.path.dirname(REPO), "shared", "data", "omniglot")


def omniglot_zips_present(folder: str | None) -> bool:
    return bool(folder) and os.path.isdir(folder) and any(n.endswith(".zip") for n in os.listdir(folder))


def sources_for(w, omniglot_dir: str | None) -> list[str]:
    out = ["synthetic"]
    if w.channels == 1 and "omniglot" in w.dataset_name and omniglot_zips_present(omniglot_dir):
        out.append("omniglot_zips")
    return out


def trainer_args(w, source: str, workers: int, updates: int, eval_tasks: int, experiment_dir: str, dev,
                 omniglot_dir: str | None, **extra):
    over: dict[str, Any] = dict(
        experiment_name=f"bench_{w.name}_{source}_w{workers}", experiment_dir=experiment_dir, total_epochs=2,
        total_iter_per_epoch=int(updates), num_evaluation_tasks=int(eval_tasks), max_models_to_save=1,
        num_dataprovider_workers=int(workers), device=str(dev), continue_from_epoch="from_scratch",
        total_epochs_before_pause=100, train_seed=0, val_seed=0)
    if source == "synthetic":
        over.update(dataset_name="synthetic", dataset_path="synthetic")
    elif source == "omniglot_zips":
        if not omniglot_zips_present(omniglot_dir):
            raise NotApplicable(f"no Omniglot zip files in {omniglot_dir}")
        over.update(dataset_name="omniglot_dataset", dataset_path=os.path.abspath(omniglot_dir),
                    train_val_test_split=ZIP_SPLIT, indexes_of_folders_indicating_class=[-3, -2],
                    load_into_memory=True, sets_are_pre_split=False)
    else:
        raise ValueError(f"unknown data source {source!r}")
    over.update(extra)
    return W.make_args(w, **over)


def _to_device(batch, dev):
    import torch
    return tuple(torch.as_tensor(t).to(dev) for t in batch[:4])


def measure_trainer_item(w, dev, a, source: str, workers: int, precision: dict[str, Any],
                         measure_reference: bool = True) -> dict[str, Any]:
    """Learner-only and end-to-end timings of workload `w` on `source` with `workers` data workers."""
    import torch
    from mamlpp_fast.data import MetaLearningSystemDataLoader
    from mamlpp_fast.fast import MAMLFewShotClassifier
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference
    from mamlpp_fast.trainer import ExperimentBuilder
    from .run import summarize, time_loop

    updates = int(a.trainer_updates)
    eval_tasks = max(1, int(a.trainer_eval_tasks) // w.batch_size) * w.batch_size
    tmp = tempfile.mkdtemp(prefix="mamlpp_bench_trainer_")
    try:
        args = trainer_args(w, source, workers, updates, eval_tasks, tmp, dev, a.omniglot_dir, **precision)
        t0 = time.perf_counter()
        data = MetaLearningSystemDataLoader(args=args, current_iter=0)
        data_setup_s = time.perf_counter() - t0
        im_shape = W.im_shape(w)

        # 1. the learner alone, on one batch of this data source already on the device
        model = MAMLFewShotClassifier(im_shape, dev, args)
        batch = _to_device(next(iter(data.get_train_batches(total_batches=1, augment_images=False))), dev)
        data.total_train_iters_produced = 0
        times, _, _ = time_loop(lambda: model.run_train_iter(batch, 0), dev, a.warmup, a.iters, a.min_iters,
                                a.max_time)
        learner = summarize(times)
        del model

        # 2. the experiment loop, two epochs, the second one reported
        model = MAMLFewShotClassifier(im_shape, dev, args)
        inside: list[float] = []
        inside_cpu: list[float] = []
        spans: list[tuple[float, float]] = []  # main-thread CPU time at each call's entry and return
        real = model.run_train_iter

        def timed(*args_, **kw):
            t, c = time.perf_counter(), time.thread_time()
            out = real(*args_, **kw)
            c2 = time.thread_time()
            inside.append(time.perf_counter() - t)
            inside_cpu.append(c2 - c)
            spans.append((c, c2))
            return out

        model.run_train_iter = timed
        lines: list[str] = []
        builder = ExperimentBuilder(args, data, model, dev, progress=True, log=lines.append)
        marks: list[float] = []  # main-thread CPU time at each end of epoch's start and end
        real_end = builder._end_of_epoch

        def end_of_epoch(*args_, **kw):
            marks.append(time.thread_time())
            out = real_end(*args_, **kw)
            marks.append(time.thread_time())
            return out

        builder._end_of_epoch = end_of_epoch
        t0 = time.perf_counter()
        status = builder.train()
        loop_s = time.perf_counter() - t0
        if status != "done":
            raise RuntimeError(f"the experiment loop ended with status {status!r}")
        header, rows = builder.summary_header, builder.summary_rows
        col = {k: header.index(k) for k in ("epoch_train_seconds", "epoch_val_seconds", "epoch_checkpoint_seconds")}
        epochs = [{"train_s": float(r[col["epoch_train_seconds"]]), "val_s": float(r[col["epoch_val_seconds"]]),
                   "checkpoint_s": float(r[col["epoch_checkpoint_seconds"]]), "updates": updates,
                   "val_tasks": eval_tasks} for r in rows]
        last = epochs[-1]
        inside_last = sum(inside[updates:2 * updates])
        e2e_s = last["train_s"] / updates
        # Epoch 2's loop work outside the learner, in main-thread CPU: all of it, and the part between two
        # consecutive meta-updates of the epoch (the steady state); the difference is paid once per epoch
        # (the progress bar's set-up and final draws, the epoch's statistics), which a short benchmark epoch
        # spreads over few meta-updates and a paper epoch (500 meta-updates) over many.
        loop_cpu = (marks[2] - marks[1]) - sum(inside_cpu[updates:2 * updates])
        gaps = [spans[i + 1][0] - spans[i][1] for i in range(updates, 2 * updates - 1)]
        steady_cpu = sum(gaps) / len(gaps) if gaps else float("nan")
        res: dict[str, Any] = {
            "dataset": source, "num_dataprovider_workers": workers,
            "evaluation_batch_size": builder.evaluation_group_size(),
            "data_setup_s": data_setup_s, "experiment_loop_s": loop_s,
            "learner_only": {k: v for k, v in learner.items()},
            "learner_only_ms": learner["median_s"] * 1e3,
            "end_to_end_ms_per_update": e2e_s * 1e3,
            "end_to_end_updates_per_s": 1.0 / e2e_s,
            "end_to_end_vs_learner_only": learner["median_s"] / e2e_s,
            "overhead_ms_per_update": (e2e_s - learner["median_s"]) * 1e3,
            "overhead_in_loop_ms_per_update": (last["train_s"] - inside_last) / updates * 1e3,
            # the same, in CPU time of the main thread (what the loop itself costs it, whatever else runs)
            "overhead_in_loop_cpu_ms_per_update": loop_cpu / updates * 1e3,
            # the same between two meta-updates of one epoch, and what is paid once per epoch
            "overhead_in_loop_cpu_ms_between_updates": steady_cpu * 1e3,
            "loop_cpu_ms_once_per_epoch": (loop_cpu - updates * steady_cpu) * 1e3 if gaps else float("nan"),
            "epochs": epochs,
            "val_ms_per_task": last["val_s"] / eval_tasks * 1e3,
            "checkpoint_s": last["checkpoint_s"],
            "epoch_log": [ln for ln in lines if ln.startswith("mamlpp: epoch")],
        }
        # the generic row fields of bench/run.py: this item's rate is the end-to-end one
        res.update({"iters": updates, "median_s": e2e_s, "mean_s": e2e_s, "min_s": e2e_s, "p10_s": e2e_s,
                    "p90_s": e2e_s, "updates_per_s": 1.0 / e2e_s, "times_s": [], "last_loss": None})

        # 3. the reference learner's rates, for the projection (once per workload: passed in when known)
        if measure_reference:
            ref = Reference(im_shape, dev, args)
            rt, _, _ = time_loop(lambda: ref.run_train_iter(batch, 0), dev, 1, 1, 1, 0.0)
            res["reference_learner_only_ms"] = min(rt) * 1e3
            ref.run_validation_iter(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            ref.run_validation_iter(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            res["reference_val_ms_per_task"] = (time.perf_counter() - t) / w.batch_size * 1e3
            del ref
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _paper_config(name: str) -> dict[str, Any] | None:
    fname = PAPER_CONFIGS.get(name)
    if fname is None:
        return None
    path = os.path.join(REPO, "configs", fname)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    cfg["_file"] = os.path.join("configs", fname)
    return cfg


def projections(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Projected full-run wall time of each measured workload's paper configuration, ours and the
    reference learner's (see the module docstring). Uses, per workload, the trainer item on the real
    Omniglot zips when there is one, else the synthetic one, with the most data workers."""
    out = []
    trainer_rows = [r for r in results if r.get("learner") == "trainer" and r.get("status") == "ok"]
    for name in dict.fromkeys(r["workload"] for r in trainer_rows):
        rows = [r for r in trainer_rows if r["workload"] == name]
        rows.sort(key=lambda r: (r["dataset"] == "omniglot_zips", r["num_dataprovider_workers"]))
        r = rows[-1]
        ref = next((x for x in rows if x.get("reference_learner_only_ms") is not None), None)
        cfg = _paper_config(name)
        if cfg is None:
            continue
        epochs, iters = int(cfg["total_epochs"]), int(cfg["total_iter_per_epoch"])
        n_eval, models = int(cfg["num_evaluation_tasks"]), int(cfg.get("max_models_to_save", 5))
        per_task_eval = n_eval // int(cfg["batch_size"]) * int(cfg["batch_size"])

        def total(update_ms, val_ms_task, ckpt_s):
            train = epochs * iters * update_ms / 1e3
            val = epochs * per_task_eval * val_ms_task / 1e3
            ckpt = epochs * ckpt_s
            test = models * per_task_eval * val_ms_task / 1e3
            return {"train_s": train, "validation_s": val, "checkpoint_s": ckpt, "test_s": test,
                    "total_s": train + val + ckpt + test}

        row = {"workload": name, "config": cfg["_file"], "total_epochs": epochs, "total_iter_per_epoch": iters,
               "meta_updates": epochs * iters, "evaluation_tasks": per_task_eval, "test_models": models,
               "from_item": {"dataset": r["dataset"], "num_dataprovider_workers": r["num_dataprovider_workers"]},
               "ours": total(r["end_to_end_ms_per_update"], r["val_ms_per_task"], r["checkpoint_s"])}
        if ref is not None:
            row["reference"] = total(ref["reference_learner_only_ms"] + max(0.0, r["overhead_in_loop_ms_per_update"]),
                                     ref["reference_val_ms_per_task"], r["checkpoint_s"])
        out.append(row)
    return out


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_markdown(report: dict[str, Any]) -> list[str]:
    rows = [r for r in report["results"] if r.get("learner") == "trainer"]
    if not rows:
        return []
    L = ["## End to end: the experiment loop (ExperimentBuilder + real data loader) vs the learner alone", "",
         "Epoch 2 of 2 (epoch 1 pays one-time costs). overhead = end-to-end - learner-only, timed separately; "
         "in-loop overhead = loop time outside run_train_iter, measured in the same loop.", "",
         "| workload | data | workers | learner-only ms | end-to-end ms | e2e rate / learner-only rate | "
         "overhead ms/update | in-loop overhead ms/update (main-thread CPU ms) | main-thread CPU ms between two "
         "updates / once per epoch | epoch: train / val / checkpoint s | val ms/task | status |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            L.append(f"| {r['workload']} | {r.get('dataset')} | {r.get('num_dataprovider_workers')} | | | | | | | | | "
                     f"{r.get('status')}: {str(r.get('reason', '')).replace('|', '/')[:160]} |")
            continue
        e = r["epochs"][-1]
        L.append(f"| {r['workload']} | {r['dataset']} | {r['num_dataprovider_workers']} | {r['learner_only_ms']:.2f} | "
                 f"{r['end_to_end_ms_per_update']:.2f} | {r['end_to_end_vs_learner_only']:.3f} | "
                 f"{r['overhead_ms_per_update']:.2f} | {r['overhead_in_loop_ms_per_update']:.3f} "
                 f"({r['overhead_in_loop_cpu_ms_per_update']:.3f}) | "
                 f"{r.get('overhead_in_loop_cpu_ms_between_updates', float('nan')):.3f} / "
                 f"{r.get('loop_cpu_ms_once_per_epoch', float('nan')):.2f} | "
                 f"{e['train_s']:.2f} / {e['val_s']:.2f} / {e['checkpoint_s']:.2f} | {r['val_ms_per_task']:.1f} | ok |")
    L.append("")
    proj = report.get("projections") or []
    if proj:
        L += ["## Time to result: projected full runs of the paper's configurations", "",
              "From this run's rates (see bench/trainer_bench.py): meta-updates at the end-to-end rate, every "
              "epoch's validation and checkpoint, then the test protocol.", "",
              "| config | meta-updates | ours: train / validation+test / total | reference learner: total |",
              "|---|---|---|---|"]
        for p in proj:
            o = p["ours"]
            ref = p.get("reference")
            L.append(f"| {p['config']} | {p['meta_updates']} | {_hms(o['train_s'])} / "
                     f"{_hms(o['validation_s'] + o['test_s'])} / **{_hms(o['total_s'])}** | "
                     f"{_hms(ref['total_s']) if ref else 'n/a'} |")
        L.append("")
    return L
