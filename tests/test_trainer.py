"""The experiment loop end to end on tiny synthetic experiments: files, columns, resume, corrupt
checkpoints, the test ensemble, and never overwriting an earlier experiment."""
from __future__ import annotations

import csv
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch

from mamlpp_fast.common import CheckpointError
from mamlpp_fast.config import load_args
from mamlpp_fast.data import MetaLearningSystemDataLoader
from mamlpp_fast.trainer import ExperimentBuilder, ExperimentError, learner_class
from _tiny import tiny_config

TINY = tiny_config(experiment_name='tiny', image_height=28, image_width=28, num_classes_per_set=5,
                   num_target_samples=2, cnn_num_filters=8, number_of_training_steps_per_iter=2,
                   number_of_evaluation_steps_per_iter=2, total_epochs=2, total_iter_per_epoch=3,
                   num_evaluation_tasks=4, max_models_to_save=5, meta_learning_rate=0.001,
                   min_learning_rate=1e-05, task_learning_rate=0.1, train_seed=0, val_seed=0,
                   continue_from_epoch='latest', total_epochs_before_pause=100)


def make_args(tmp_path, **kw):
    cfg = dict(TINY, experiment_dir=str(tmp_path / "exp"))
    cfg.update(kw)
    return load_args(cfg)


def build(args, **kw):
    model = learner_class(args.learner)(im_shape=(2, args.image_channels, args.image_height, args.image_width),
                                       device="cpu", args=args)
    return ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=False, log=lambda m: None, **kw)


def run(args, **kw):
    b = build(args, **kw)
    return b, b.run_experiment()


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def network(path):
    return torch.load(path, map_location="cpu", weights_only=False)["network"]


def folder_snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_end_to_end_files_and_columns(tmp_path):
    args = make_args(tmp_path)
    builder, result = run(args)
    root = tmp_path / "exp" / "tiny"
    assert result["status"] == "done" and result["current_iter"] == 6
    for name in ("train_model_1", "train_model_2", "train_model_latest"):
        assert (root / "saved_models" / name).is_file(), name
    assert not [n for n in os.listdir(root / "saved_models") if n.startswith(".tmp")], "temp files left behind"

    header, rows = read_csv(root / "logs" / "summary_statistics.csv")
    S = args.number_of_training_steps_per_iter
    metrics = ["loss", "accuracy"] + [f"loss_importance_vector_{i}" for i in range(S)]
    expected = {f"{p}_{m}_{s}" for p in ("train", "val") for m in metrics for s in ("mean", "std")}
    expected |= {"train_learning_rate_mean", "train_learning_rate_std", "epoch", "epoch_run_time",
                 "epoch_train_seconds", "epoch_val_seconds", "epoch_checkpoint_seconds"}
    assert set(header) == expected, set(header) ^ expected
    assert header[0] == "train_loss_mean" and header[-5:] == ["epoch", "epoch_run_time", "epoch_train_seconds",
                                                              "epoch_val_seconds", "epoch_checkpoint_seconds"]
    assert header.index("val_loss_mean") > header.index("train_learning_rate_std")
    assert [int(r[header.index("epoch")]) for r in rows] == [1, 2]
    for r in rows:
        acc = float(r[header.index("val_accuracy_mean")])
        assert 0.0 <= acc <= 1.0
        assert float(r[header.index("epoch_run_time")]) > 0

    with open(root / "logs" / "summary_statistics.json") as f:
        per_epoch = json.load(f)
    assert set(per_epoch) == expected - {"epoch", "epoch_run_time", "epoch_train_seconds", "epoch_val_seconds",
                                         "epoch_checkpoint_seconds"}
    assert all(len(v) == 2 for v in per_epoch.values())
    # MSL weights of epoch 0 are all 1/S.
    assert per_epoch["train_loss_importance_vector_0_mean"][0] == pytest.approx(1 / S)

    test_header, test_rows = read_csv(root / "logs" / "test_summary.csv")
    assert test_header == ["test_accuracy_mean", "test_accuracy_std"] and len(test_rows) == 1
    acc, std = map(float, test_rows[0])
    assert 0.0 <= acc <= 1.0 and std == pytest.approx(np.sqrt(acc * (1 - acc)))
    assert result["test_accuracy_mean"] == pytest.approx(acc)

    state = torch.load(root / "saved_models" / "train_model_2", map_location="cpu", weights_only=False)
    for key in ("best_val_acc", "best_val_iter", "current_iter", "best_epoch", "per_epoch_statistics",
                "network", "optimizer", "train_loss_mean", "val_accuracy_mean"):
        assert key in state, key
    assert state["current_iter"] == 6
    assert len(state["per_epoch_statistics"]["val_accuracy_mean"]) == 2
    best = int(np.argmax(per_epoch["val_accuracy_mean"])) + 1  # first best (strict > as the original)
    assert state["best_epoch"] == best and state["best_val_iter"] == best * 3
    # Checkpoints load with the learner's own API.
    loaded = builder.model.load_model(str(root / "saved_models"), "train_model", 1)
    assert loaded["current_iter"] == 3


@pytest.mark.parametrize("learner", ["fast", "reference"])
def test_training_statistics_are_those_of_the_learners_values(tmp_path, learner):
    """The loop keeps each meta-update's losses as the learner returned them and summarises the epoch at
    its end: train_<metric>_mean/_std are numpy's mean and std of the returned values, per epoch."""
    args = make_args(tmp_path, learner=learner)
    b = build(args)
    returned = []
    real = b.model.run_train_iter

    def recording(*a, **kw):
        losses, preds = real(*a, **kw)
        returned.append({k: float(v) for k, v in losses.items() if k != "skipped"})
        return losses, preds

    b.model.run_train_iter = recording
    assert b.train() == "done"
    header, rows = read_csv(tmp_path / "exp" / "tiny" / "logs" / "summary_statistics.csv")
    n = args.total_iter_per_epoch
    assert len(returned) == 2 * n and len(rows) == 2
    for e, row in enumerate(rows):
        epoch_values = returned[e * n:(e + 1) * n]
        for key in epoch_values[0]:
            values = [v[key] for v in epoch_values]
            assert float(row[header.index(f"train_{key}_mean")]) == float(np.mean(values)), key
            assert float(row[header.index(f"train_{key}_std")]) == float(np.std(values)), key
    assert len({v["loss"] for v in returned}) == len(returned)  # distinct updates, not one value repeated


def test_progress_bar_shows_every_meta_update_and_the_last_loss(tmp_path, monkeypatch):
    """The training bar is advanced in steps (at most once per refresh interval); when an epoch's bar
    closes it shows all of the epoch's meta-updates and the last one's loss and accuracy."""
    args = make_args(tmp_path, total_iter_per_epoch=4)
    model = learner_class(args.learner)(im_shape=(2, 1, 28, 28), device="cpu", args=args)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    b = ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=True, log=lambda m: None)
    returned = []
    real = b.model.run_train_iter

    def recording(*a, **kw):
        losses, preds = real(*a, **kw)
        returned.append((float(losses["loss"]), float(losses["accuracy"])))
        return losses, preds

    b.model.run_train_iter = recording
    assert b.train() == "done"
    text = err.getvalue().replace("\r", "\n")
    for epoch in (1, 2):
        shown = [ln for ln in text.split("\n") if ln.startswith(f"train epoch {epoch}/2")]
        loss, acc = returned[4 * epoch - 1]
        assert "4/4" in shown[-1] and f"loss={loss:.4f}, acc={acc:.4f}" in shown[-1], shown


def test_training_bar_is_drawn_off_the_loop_thread(tmp_path, monkeypatch):
    """While an epoch trains, the loop's thread never draws the bar: it draws it when the bar is created
    and when it closes (the epoch's final state), and every draw in between happens on the bar's own
    thread. A refresh interval of 10 ms and meta-updates of >= 40 ms make draws between updates certain."""
    import threading
    import time as _time

    import tqdm as _tqdm

    args = make_args(tmp_path, total_iter_per_epoch=5)
    model = learner_class(args.learner)(im_shape=(2, 1, 28, 28), device="cpu", args=args)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    b = ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=True, log=lambda m: None)
    make_bar = b._bar

    def fast_bar(**kw):
        bar = make_bar(**kw)
        bar.mininterval = 0.01
        return bar

    b._bar = fast_bar
    draws = []
    real_refresh = _tqdm.tqdm.refresh

    def recording_refresh(self, *a, **kw):
        if str(self.desc).startswith("train epoch"):
            draws.append((threading.current_thread().name, self.n))
        return real_refresh(self, *a, **kw)

    monkeypatch.setattr(_tqdm.tqdm, "refresh", recording_refresh)
    real = b.model.run_train_iter

    def slow(*a, **kw):
        out = real(*a, **kw)
        _time.sleep(0.04)
        return out

    b.model.run_train_iter = slow
    assert b.train() == "done"
    on_loop = [n for name, n in draws if name == threading.main_thread().name]
    on_bar = [n for name, n in draws if name == "mamlpp-progress"]
    assert len(on_bar) >= 2, draws
    # On the loop's thread: tqdm's first draw when each epoch's bar is created (n = 0) and, at most once per
    # epoch, the final step at close when the bar's thread had not yet shown the last update (n = 5).
    assert on_loop.count(0) == 2 and all(n in (0, 5) for n in on_loop) and len(on_loop) <= 4, draws
    assert not any(t.name == "mamlpp-progress" for t in threading.enumerate())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resume_gives_the_same_parameters(tmp_path, dtype):
    # Uninterrupted: 2 epochs.
    a = make_args(tmp_path / "a", dtype=dtype)
    run(a)
    # Interrupted after epoch 1 (the original's total_epochs_before_pause), then resumed by a new
    # learner and a new data loader, as a new process would.
    b = make_args(tmp_path / "b", dtype=dtype, total_epochs_before_pause=1)
    _, first = run(b)
    assert first["status"] == "paused" and first["current_iter"] == 3
    assert not (tmp_path / "b" / "exp" / "tiny" / "saved_models" / "train_model_2").exists()
    b2 = make_args(tmp_path / "b", dtype=dtype)
    builder = build(b2)
    assert builder.state["current_iter"] == 3 and builder.epoch == 1
    assert builder.resumed_from.endswith("train_model_latest")
    result = builder.run_experiment()
    assert result["status"] == "done" and result["current_iter"] == 6

    na = network(tmp_path / "a" / "exp" / "tiny" / "saved_models" / "train_model_2")
    nb = network(tmp_path / "b" / "exp" / "tiny" / "saved_models" / "train_model_2")
    assert set(na) == set(nb)
    # Every computation is deterministic on the CPU and the resumed run restores parameters, Adam
    # state, BN running statistics and the task stream exactly, so the parameters agree to the bit
    # (in float32 as well as float64).
    for key in na:
        assert torch.equal(na[key], nb[key]), (key, (na[key] - nb[key]).abs().max().item())
    ha, ra = read_csv(tmp_path / "a" / "exp" / "tiny" / "logs" / "summary_statistics.csv")
    hb, rb = read_csv(tmp_path / "b" / "exp" / "tiny" / "logs" / "summary_statistics.csv")
    assert ha == hb and len(rb) == 2
    t = ha.index("epoch_run_time")
    assert [r[:t] for r in ra] == [r[:t] for r in rb]


def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path):
    args = make_args(tmp_path)
    run(args)
    saved = tmp_path / "exp" / "tiny" / "saved_models"
    for name in ("train_model_latest", "train_model_2"):
        data = (saved / name).read_bytes()
        (saved / name).write_bytes(data[: len(data) // 3])  # truncated, as by a crash mid-write

    # Asking for that checkpoint explicitly: a clear error naming the file.
    with pytest.raises(CheckpointError, match="train_model_2"):
        build(make_args(tmp_path, continue_from_epoch=2))

    # Resuming: a warning naming each bad file, then the newest good checkpoint (epoch 1).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # total_epochs 2 -> 3 changes the cosine schedule of the remaining epochs: allowed explicitly.
        builder = build(make_args(tmp_path, total_epochs=3), allow_config_change=True)
    msgs = " | ".join(str(w.message) for w in caught)
    assert "train_model_latest" in msgs and "train_model_2" in msgs, msgs
    assert builder.resumed_from.endswith("train_model_1")
    assert builder.state["current_iter"] == 3
    result = builder.run_experiment()
    assert result["current_iter"] == 9
    header, rows = read_csv(tmp_path / "exp" / "tiny" / "logs" / "summary_statistics.csv")
    assert [int(r[header.index("epoch")]) for r in rows] == [1, 2, 3]
    # The rows of the abandoned epoch 2 were kept aside, not lost.
    assert any(n.startswith("summary_statistics.csv.before_resume") for n in os.listdir(tmp_path / "exp" / "tiny" / "logs"))
    assert torch.load(saved / "train_model_2", map_location="cpu", weights_only=False)["current_iter"] == 6

    # Every checkpoint unreadable: an error, not a silent restart.
    for name in os.listdir(saved):
        (saved / name).write_bytes(b"not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no readable checkpoint"):
            build(make_args(tmp_path, total_epochs=4))


def test_existing_experiment_is_not_overwritten(tmp_path):
    args = make_args(tmp_path, total_epochs=2)
    run(args)
    root = tmp_path / "exp" / "tiny"

    def outputs():
        snap = folder_snapshot(root / "saved_models")
        snap.update(folder_snapshot(root / "logs"))
        return snap

    before = outputs()
    with pytest.raises(ExperimentError, match="--overwrite"):
        build(make_args(tmp_path, total_epochs=2, continue_from_epoch="from_scratch"))
    with pytest.raises(ExperimentError, match="cnn_num_filters"):
        build(make_args(tmp_path, total_epochs=2, cnn_num_filters=16))
    with pytest.raises(ExperimentError, match="train_model_2"):  # would replace the later checkpoint
        build(make_args(tmp_path, total_epochs=2, continue_from_epoch=1))
    assert outputs() == before

    # Same command again on a finished experiment: nothing is retrained or rewritten.
    _, result = run(make_args(tmp_path, total_epochs=2))
    assert result["current_iter"] == 6 and "test_accuracy_mean" in result
    assert outputs() == before

    # Continuing from epoch 1 with --overwrite replays epoch 2: the same parameters, bit for bit.
    builder = build(make_args(tmp_path, total_epochs=2, continue_from_epoch=1), overwrite=True)
    assert builder.state["current_iter"] == 3
    builder.run_experiment()
    old = torch.load(io.BytesIO(before["train_model_2"]), map_location="cpu", weights_only=False)
    new = torch.load(root / "saved_models" / "train_model_2", map_location="cpu", weights_only=False)
    for key, value in old["network"].items():
        assert torch.equal(value, new["network"][key]), key

    # --overwrite without an epoch starts from scratch.
    builder = build(make_args(tmp_path, total_epochs=1, cnn_num_filters=16), overwrite=True)
    assert builder.state["current_iter"] == 0
    builder.run_experiment()
    assert network(root / "saved_models" / "train_model_1")["classifier.layer_dict.conv0.conv.weight"].shape[0] == 16
    assert not (root / "saved_models" / "train_model_2").exists()


def test_test_protocol_is_an_ensemble_of_the_best_checkpoints(tmp_path):
    args = make_args(tmp_path, total_epochs=7, total_iter_per_epoch=1, max_models_to_save=3, num_evaluation_tasks=4)
    builder, result = run(args)
    val_acc = builder.state["per_epoch_statistics"]["val_accuracy_mean"]
    assert len(val_acc) == 7
    ranked = sorted(range(1, 8), key=lambda e: (val_acc[e - 1], e), reverse=True)[:3]

    # Recompute by hand: each chosen checkpoint on the same test tasks, logits averaged.
    model = builder.model
    preds, targets = [], None
    for epoch in ranked:
        model.load_model(builder.saved_models_filepath, "train_model", epoch)
        p, t = [], []
        for batch in builder.data.get_test_batches(total_batches=2, augment_images=False):
            _, per_task = model.run_validation_iter(batch[:4])
            p += [np.asarray(x, dtype=np.float64) for x in per_task]
            t += [np.asarray(y).reshape(-1) for y in batch[3]]
        preds.append(np.stack(p))
        targets = np.stack(t)
    correct = np.mean(preds, axis=0).argmax(-1) == targets
    assert result["test_accuracy_mean"] == pytest.approx(correct.mean(), abs=1e-12)
    assert result["test_accuracy_std"] == pytest.approx(correct.std(), abs=1e-12)

    # `mamlpp test` semantics: test only, from the checkpoints, same numbers, no training.
    tester = build(make_args(tmp_path, total_epochs=7, total_iter_per_epoch=1, max_models_to_save=3,
                             evaluate_on_test_set_only=True))
    again = tester.run_experiment()
    assert again["status"] == "tested" and again["current_iter"] == 7
    assert again["test_accuracy_mean"] == pytest.approx(result["test_accuracy_mean"])


@pytest.mark.parametrize("learner", ["fast", "reference"])
def test_fused_meta_optimizer_and_checkpoints_of_a_plain_one(tmp_path, learner):
    """The meta-optimizer is torch's fused Adam on a CPU (learner_core.adam_options). A checkpoint written
    by a plain (multi-tensor) Adam, as earlier versions and other devices wrote them, loads into it with
    the core's own flags and the saved learning rate, and the next meta-updates give the parameters the
    plain optimizer gives (float64: the same per-element formulas, compared to 1e-12 relative)."""
    args = make_args(tmp_path, dtype="float64", learner=learner)
    shape = (2, args.image_channels, args.image_height, args.image_width)
    a = learner_class(learner)(im_shape=shape, device="cpu", args=args)
    assert a.optimizer.param_groups[0]["fused"] is True
    # the plain optimizer as an earlier version built it, then two meta-updates with it
    a.core.optimizer = torch.optim.Adam(a.core.trainable_parameters(), lr=args.meta_learning_rate, foreach=True)
    loader = MetaLearningSystemDataLoader(args, current_iter=0)
    batches = [b for _, b in zip(range(4), loader.get_train_batches(total_batches=4))]
    for batch in batches[:2]:
        a.run_train_iter(batch, epoch=0)
    a.core.optimizer.param_groups[0]["lr"] = 0.0007  # the saved rate must be the one that loads
    a.save_model(str(tmp_path / "ckpt_0"), {"current_iter": 2})
    b = learner_class(learner)(im_shape=shape, device="cpu", args=args)
    b.load_model(str(tmp_path), "ckpt", 0)
    group = b.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"] and group["lr"] == 0.0007
    assert all(st["step"].dtype == torch.float32 and float(st["step"]) == 2.0 for st in b.optimizer.state.values())
    trained = list(b.optimizer.param_groups[0]["params"])
    loaded = [p.detach().clone() for p in trained]
    for batch in batches[2:]:
        a.run_train_iter(batch, epoch=0)
        b.run_train_iter(batch, epoch=0)
    # the updates after loading move the weights (the conv biases' meta-gradients are zero: BN cancels
    # them)
    assert sum(not torch.equal(p0, p) for p0, p in zip(loaded, trained)) >= len(trained) // 2
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name.endswith("conv.bias"):
            # zero in exact arithmetic, so their gradients are rounding noise, and Adam divides that
            # noise by its eps (1e-8): each step moves them by up to ~lr * noise / eps, different in
            # the two optimizers' last bits of the other weights (fused and multi-tensor Adam round
            # alike only where the CPU's vector paths do). They stay at the noise's scale in both.
            assert float(pa.abs().max()) < 1e-8 and float(pb.abs().max()) < 1e-8, name
            continue
        assert torch.allclose(pa, pb, rtol=1e-12, atol=1e-15), name
