"""The trainer's data pipeline and evaluation: prefetched batches, grouped evaluation, no hidden
synchronisation.

- Prefetching (mamlpp_fast.data.prefetch, `MetaLearningSystemDataLoader.batch_loader`) hands out the
  same tasks in the same order as the one-thread generators, for 0 and 2 worker processes, any tasks per
  batch, resumed streams, Omniglot rotations and images decoded lazily from disk in the workers.
- Evaluation groups `evaluation_batch_size` tasks per call of the fast learner. Batch statistics are per
  task, so a task's logits do not depend on its group: validation and the test ensemble give the same
  per-task logits (float64, to 1e-12 relative: differently shaped kernels may round differently in the
  last bits, measured ~2e-15) and the same per-task predictions and accuracies (exactly) for group sizes
  1, B and all tasks, and the same as the original's one-batch-per-call path; the summary files agree
  likewise (time columns aside).
- One device-to-host transfer per meta-update and one per evaluation pass: counted by wrapping every
  Tensor method that reads values back to the host (.cpu, .item, .tolist, .numpy, float/int/bool), with
  the trainer treating every tensor as a device tensor (what it does with CUDA tensors), on a CPU run.
"""
from __future__ import annotations

import csv
import json
import os
import weakref

import numpy as np
import pytest
import torch

from _tiny import tiny_config
from mamlpp_fast.config import ConfigError, load_args
from mamlpp_fast.data import MetaLearningSystemDataLoader
from mamlpp_fast.data.prefetch import TaskBatchDataset, prefetch_to_device, regroup_batches
from mamlpp_fast.trainer import ExperimentBuilder, learner_class

CFG = tiny_config(experiment_name="pipe", image_height=14, image_width=14, num_classes_per_set=5,
                  num_target_samples=2, cnn_num_filters=6, number_of_training_steps_per_iter=2,
                  number_of_evaluation_steps_per_iter=2, total_epochs=2, total_iter_per_epoch=3,
                  num_evaluation_tasks=12, batch_size=4, dtype="float64", device="cpu", seed=3,
                  synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6, num_dataprovider_workers=0,
                  max_models_to_save=2)
TIME_COLUMNS = {"epoch_run_time", "epoch_train_seconds", "epoch_val_seconds", "epoch_checkpoint_seconds"}
RTOL = 1e-12


def _args(tmp_path, **kw):
    return load_args(dict(CFG, experiment_dir=str(tmp_path), **kw))


def _builder(args, **kw):
    model = learner_class(args.learner)((2, args.image_channels, args.image_height, args.image_width), "cpu", args)
    return ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=False, log=lambda m: None,
                             **kw)


def _as_np(batch):
    return [np.asarray(t) for t in batch[:4]]


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(_as_np(x), _as_np(y)):
            assert u.dtype == v.dtype and np.array_equal(u, v)


# ---------------------------------------------------------------- the task stream
@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_gives_the_generators_tasks(workers):
    args = _args("/nonexistent")
    for start in (0, 5):  # a fresh stream and one resumed at iteration 5
        old = MetaLearningSystemDataLoader(args, current_iter=start)
        new = MetaLearningSystemDataLoader(args, current_iter=start)
        want = list(old.get_train_batches(total_batches=7, augment_images=True))
        got = list(new.batch_loader("train", 7, augment_images=True, num_workers=workers))
        _same_batches(want, got)
        assert new.total_train_iters_produced == old.total_train_iters_produced == (start + 7) * args.batch_size
        assert all(isinstance(t, torch.Tensor) for b in got for t in b)
    loader = MetaLearningSystemDataLoader(args)
    for set_name in ("val", "test"):
        want = list(getattr(loader, f"get_{set_name}_batches")(total_batches=3))
        flat = [np.concatenate([b[i] for b in want]) for i in range(4)]
        for per in (1, 4, 5, 12):  # regrouped: same tasks, in order, the last group smaller
            got = list(loader.batch_loader(set_name, 3, tasks_per_item=per, num_workers=workers))
            assert [len(b[0]) for b in got] == [min(per, 12 - i) for i in range(0, 12, per)]
            for i in range(4):
                assert np.array_equal(np.concatenate([np.asarray(b[i]) for b in got]), flat[i])
            regrouped = list(regroup_batches(want, per))
            _same_batches(regrouped, got)


def test_workers_decode_lazily_from_disk_and_rotate(tmp_path):
    from test_data import write_omniglot_folder

    root = write_omniglot_folder(tmp_path / "omni", alphabets=3, chars=4, images=4)
    kw = dict(dataset_name="omniglot", dataset_path=str(root), num_classes_per_set=3, num_target_samples=2,
              batch_size=2, train_val_test_split=[0.5, 0.25, 0.25], indexes_of_folders_indicating_class=[-3, -2],
              load_into_memory=False)
    args = load_args(dict(CFG, **kw))
    want = list(MetaLearningSystemDataLoader(args).get_train_batches(total_batches=6, augment_images=True))
    got = list(MetaLearningSystemDataLoader(args).batch_loader("train", 6, augment_images=True, num_workers=2))
    _same_batches(want, got)


def test_prefetch_to_device_on_cpu_passes_batches_through_in_order():
    args = _args("/nonexistent")
    ds = TaskBatchDataset(MetaLearningSystemDataLoader(args).dataset, "val", 100, 10, 3)
    assert len(ds) == 4 and list(ds.seeds(3)) == [109]
    items = [ds[i] for i in range(len(ds))]
    out = list(prefetch_to_device(iter(items), "cpu", depth=2))
    assert len(out) == 4 and all(a is b for x, y in zip(items, out) for a, b in zip(x, y))


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="num_dataprovider_workers"):
        load_args(dict(CFG, num_dataprovider_workers=-1))
    with pytest.raises(ConfigError, match="evaluation_batch_size"):
        load_args(dict(CFG, evaluation_batch_size=0))


# ---------------------------------------------------------------- grouping does not change results
def _evaluations(tmp_path, group):
    """Validation and test results of one fresh model (seeded), tasks `group` per call (None: the
    original's path, one run_validation_iter call per batch)."""
    args = _args(tmp_path / f"g{group}", evaluation_batch_size=group or 1)
    b = _builder(args)
    if group is None:
        b.evaluation_group_size = lambda: None
    return {s: b.evaluate_tasks(s, s, keep_logits=True) for s in ("val", "test")}


def test_evaluation_grouping_gives_the_same_per_task_results(tmp_path):
    results = {g: _evaluations(tmp_path, g) for g in (None, 1, 4, 5, 12)}
    base = results[None]
    for g, res in results.items():
        for s in ("val", "test"):
            a, b = base[s], res[s]
            assert len(a["logits"]) == len(b["logits"]) == 12
            for t, (x, y) in enumerate(zip(a["logits"], b["logits"])):
                assert x.dtype == y.dtype == np.float64 and x.shape == y.shape == (10, 5)
                scale = np.abs(x).max()
                assert np.abs(x - y).max() <= RTOL * scale, (g, s, t, np.abs(x - y).max())
                assert np.array_equal(x.argmax(-1), y.argmax(-1)), (g, s, t)  # per-task accuracy
            for ya, yb in zip(a["targets"], b["targets"]):
                assert np.array_equal(ya, yb)
            assert len(a["losses"]) == len(b["losses"]) == 3  # one entry per batch of batch_size tasks
            for la, lb in zip(a["losses"], b["losses"]):
                assert list(la) == list(lb)
                assert la["accuracy"] == lb["accuracy"]
                for k in la:
                    assert abs(float(la[k]) - float(lb[k])) <= RTOL * max(1.0, abs(float(la[k]))), (g, s, k)


def _summary_files(root):
    with open(os.path.join(root, "logs", "summary_statistics.csv"), newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, h in enumerate(rows[0]) if h not in TIME_COLUMNS]
    csv_rows = [[r[i] for i in keep] for r in rows]
    with open(os.path.join(root, "logs", "summary_statistics.json")) as f:
        per_epoch = json.load(f)
    with open(os.path.join(root, "logs", "test_summary.csv"), newline="") as f:
        test = list(csv.reader(f))
    return csv_rows, per_epoch, test


def _close_rows(a, b):
    assert a[0] == b[0]  # same header
    for ra, rb in zip(a[1:], b[1:]):
        for x, y in zip(ra, rb):
            assert abs(float(x) - float(y)) <= RTOL * max(1.0, abs(float(x))), (x, y)
    assert len(a) == len(b)


def test_summary_files_do_not_depend_on_the_evaluation_grouping(tmp_path):
    files = {}
    for group in (None, 1, 4, 12):
        args = _args(tmp_path / f"run{group}", evaluation_batch_size=group or 1)
        b = _builder(args)
        if group is None:
            b.evaluation_group_size = lambda: None
        b.run_experiment()
        files[group] = _summary_files(b.root)
    base_csv, base_json, base_test = files[None]
    assert "val_accuracy_mean" in base_csv[0] and "val_loss_std" in base_csv[0]
    for group, (c, j, t) in files.items():
        _close_rows(base_csv, c)
        assert j.keys() == base_json.keys()
        for k in j:
            np.testing.assert_allclose(j[k], base_json[k], rtol=RTOL, atol=RTOL)
        assert t == base_test, group  # ensemble accuracy: exact


# ---------------------------------------------------------------- no hidden synchronisation
CPU_BY_DESIGN = (os.path.join("torch", "optim", ""), os.path.join("torch", "utils", "data", ""))
READ_BACK = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class _ReadBackCounter:
    """Counts the Tensor methods that read values back to the host, with the calling function; a
    tensor returned by .cpu() is host memory already, so reading it further is not counted."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self._host: dict[int, weakref.ref] = {}  # id -> weak reference of tensors returned by .cpu()
        for name in READ_BACK:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, real):
        counter = self

        def wrapper(t, *args, **kwargs):
            import sys
            out = real(t, *args, **kwargs)
            ref = counter._host.get(id(t))
            caller = sys._getframe(1)
            # torch keeps Adam's step count (unless capturable) and the DataLoader's seed generator in host
            # memory whatever the device: reading them is no transfer.
            by_design = any(part in caller.f_code.co_filename for part in CPU_BY_DESIGN)
            if (ref is None or ref() is not t) and not by_design:
                counter.calls.append(f"{name} in {caller.f_code.co_name}")
            if name == "cpu" and isinstance(out, torch.Tensor):
                counter._host[id(out)] = weakref.ref(out)
            return out

        return wrapper


def test_one_transfer_per_meta_update_and_per_evaluation_pass(tmp_path, monkeypatch):
    import mamlpp_fast.common as C
    import mamlpp_fast.trainer as T

    iters = 5
    args = _args(tmp_path, total_epochs=1, total_iter_per_epoch=iters, evaluation_batch_size=5)
    b = _builder(args)
    # What the trainer and the batch checks do with CUDA tensors: every tensor counts as on the device.
    monkeypatch.setattr(T, "_on_device", lambda v: isinstance(v, torch.Tensor))
    monkeypatch.setattr(C, "_in_host_memory", lambda t: False)
    counter = _ReadBackCounter(monkeypatch)
    assert b.train() == "done"
    calls = counter.calls
    per_update = [c for c in calls if c == "cpu in _host_losses"]
    assert len(per_update) == iters, calls
    rest = [c for c in calls if c != "cpu in _host_losses"]
    # once per epoch: the MSL weights' host copy, the epoch's training statistics, the validation pass
    assert sorted(rest) == sorted(["cpu in _importance", "cpu in _host_floats", "cpu in evaluate_tasks"]), rest

    counter.calls.clear()
    b.evaluate_test_set_using_the_best_models()
    assert counter.calls == ["cpu in evaluate_tasks"], counter.calls  # one model: one transfer for 12 tasks


def test_evaluation_group_size_is_capped_by_memory(tmp_path):
    import argparse

    import mamlpp_fast.trainer as T

    b = _builder(_args(tmp_path, evaluation_batch_size=7))
    assert b.evaluation_group_size() == 7
    per_task = 5 * (1 + 2) * 6 * 14 * 14 * 8  # N (K+T) filters H W, float64
    for budget, want in ((per_task * 5, 5), (per_task * 2, 4), (per_task * 100, 7)):  # never below batch_size 4
        b.args = argparse.Namespace(**vars(b.args))
        T.EVAL_ACTIVATION_BYTES, saved = budget, T.EVAL_ACTIVATION_BYTES
        try:
            assert b.evaluation_group_size() == want, budget
        finally:
            T.EVAL_ACTIVATION_BYTES = saved
    b.args.bn_backup_aliasing = True  # evaluation changes running statistics batch by batch: original grouping
    assert b.evaluation_group_size() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_to_cuda_copies_ahead_with_the_same_values():
    args = _args("/nonexistent")
    loader = MetaLearningSystemDataLoader(args)
    want = list(loader.get_val_batches(total_batches=3))
    got = list(prefetch_to_device(loader.batch_loader("val", 3, num_workers=2), "cuda", depth=2))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(t.is_cuda for t in g)
        for t, a in zip(g, w):
            assert np.array_equal(t.cpu().numpy(), a)


class _PlainLoader:
    """A data loader with only the original's interface (no batch_loader): the trainer reads its
    generators in the main process and re-cuts evaluation batches to evaluation_batch_size tasks."""

    def __init__(self, args, current_iter=0):
        self._inner = MetaLearningSystemDataLoader(args, current_iter=current_iter)

    def continue_from_iter(self, current_iter):
        self._inner.continue_from_iter(current_iter)

    def get_train_batches(self, total_batches=-1, augment_images=False):
        return self._inner.get_train_batches(total_batches, augment_images)

    def get_val_batches(self, total_batches=-1, augment_images=False):
        return self._inner.get_val_batches(total_batches, augment_images)

    def get_test_batches(self, total_batches=-1, augment_images=False):
        return self._inner.get_test_batches(total_batches, augment_images)


def test_a_loader_without_batch_loader_gives_the_same_run(tmp_path):
    runs = {}
    for name, data in (("ours", MetaLearningSystemDataLoader), ("plain", _PlainLoader)):
        args = _args(tmp_path / name, evaluation_batch_size=5)
        model = learner_class(args.learner)((2, 1, 14, 14), "cpu", args)
        b = ExperimentBuilder(args, data, model, "cpu", progress=False, log=lambda m: None)
        b.run_experiment()
        runs[name] = (_summary_files(b.root), model.state_dict())
    (csv_a, json_a, test_a), net_a = runs["ours"]
    (csv_b, json_b, test_b), net_b = runs["plain"]
    assert csv_a == csv_b and json_a == json_b and test_a == test_b
    assert all(torch.equal(net_a[k], net_b[k]) for k in net_a)


class _FailingSampler:
    """Tasks whose images are their seed; the seed `bad` raises DatasetError (as a broken image would)."""

    def __init__(self, bad):
        self.bad = bad

    def get_batch(self, set_name, seeds, augment_images):
        from mamlpp_fast.errors import DatasetError
        if self.bad in seeds:
            raise DatasetError(f"cannot read image for seed {self.bad}")
        x = np.asarray(list(seeds), dtype=np.float32).reshape(-1, 1, 1, 1, 1, 1)
        y = np.zeros((len(seeds), 1, 1), dtype=np.int64)
        return x, x.copy(), y, y.copy()


def test_background_receiver_keeps_order_raises_worker_errors_and_stops_early():
    from mamlpp_fast.data.prefetch import receive_in_background, task_batch_loader
    from mamlpp_fast.errors import DatasetError

    ok = task_batch_loader(TaskBatchDataset(_FailingSampler(bad=-1), "val", 0, 40, 3), num_workers=2)
    got = [b[0].reshape(-1).tolist() for b in receive_in_background(ok)]
    assert sum(got, []) == [float(i) for i in range(40)] and all(isinstance(x, float) for x in got[0])
    bad = task_batch_loader(TaskBatchDataset(_FailingSampler(bad=20), "val", 0, 40, 3), num_workers=2)
    with pytest.raises(DatasetError, match="seed 20"):
        list(receive_in_background(bad))
    stream = receive_in_background(task_batch_loader(TaskBatchDataset(_FailingSampler(bad=-1), "val", 0, 400, 1),
                                                     num_workers=2))
    assert next(stream)[0].item() == 0.0
    stream.close()  # the consumer stops: the thread ends instead of filling its queue
    import threading
    import time
    deadline = time.time() + 10
    while any(t.name == "mamlpp-batch-receiver" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "mamlpp-batch-receiver" for t in threading.enumerate())
