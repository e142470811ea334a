"""A run killed with SIGKILL in the middle of an epoch and started again with the same command ends
exactly where an uninterrupted run ends.

Why: MAML++ runs last days; machines get preempted. Resuming must not merely "work" but be invisible:
same final parameters (bit for bit, torch.equal, in float64 on the CPU where every op is
deterministic) and the same per-epoch logs. Anything the checkpoint forgets (the data stream
position, Adam's moments and step count, the MSL epoch, BN running statistics, an RNG) shows up here
as a difference.

The trainer is a real `python -m mamlpp_fast train` subprocess; progress is detected by polling
saved_models/ for train_model_1 (epoch 1 done) and the kill lands while epoch 2 is running (the test
checks that train_model_2 did not exist yet, retrying with a different delay if it was too late).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _tiny import tiny_config

CONFIG = tiny_config(experiment_name='kr', synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6,
                     image_height=14, image_width=14, num_classes_per_set=5, num_target_samples=2,
                     cnn_num_filters=6, number_of_training_steps_per_iter=2,
                     number_of_evaluation_steps_per_iter=2, total_epochs=3, total_iter_per_epoch=10,
                     num_evaluation_tasks=4, max_models_to_save=5, meta_learning_rate=0.001,
                     min_learning_rate=1e-05, task_learning_rate=0.1, dtype='float64', device='cpu', seed=7)
# Columns that measure wall-clock time, not training.
TIME_COLUMNS = {"epoch_run_time", "epoch_train_seconds", "epoch_val_seconds", "epoch_checkpoint_seconds"}


def _cmd(config_path, experiment_dir):
    return [sys.executable, "-m", "mamlpp_fast", "train", "--config", str(config_path),
            "--experiment-dir", str(experiment_dir), "--no-progress"]


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # same thread count in every run (and faster on 2 cores)
    return env


def _run(config_path, experiment_dir):
    p = subprocess.run(_cmd(config_path, experiment_dir), env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _kill_in_epoch_2(config_path, experiment_dir, delay):
    """Start the trainer, wait for train_model_1, sleep `delay`, SIGKILL. Returns True when the kill
    landed inside epoch 2 (train_model_2 not yet written, process still running)."""
    saved = os.path.join(experiment_dir, "kr", "saved_models")
    proc = subprocess.Popen(_cmd(config_path, experiment_dir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not os.path.exists(os.path.join(saved, "train_model_1")):
            assert proc.poll() is None, "the trainer exited before finishing epoch 1"
            assert time.time() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.005)
        time.sleep(delay)
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return alive and not os.path.exists(os.path.join(saved, "train_model_2"))


def _summary(root):
    with open(os.path.join(root, "logs", "summary_statistics.csv"), newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    keep = [i for i, h in enumerate(header) if h not in TIME_COLUMNS]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows[1:]]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(CONFIG))

    # The uninterrupted run.
    _run(config_path, tmp_path / "straight")
    straight = tmp_path / "straight" / "kr"

    # Killed during epoch 2 (epoch 1's checkpoint on disk, epoch 2's not yet), then the same command.
    for attempt, delay in enumerate((0.15, 0.05, 0.0, 0.0)):
        killed_dir = tmp_path / f"killed{attempt}"
        if _kill_in_epoch_2(config_path, killed_dir, delay):
            break
    else:
        pytest.fail("could not kill the trainer during epoch 2")
    killed = killed_dir / "kr"
    assert not (killed / "logs" / "test_summary.csv").exists()
    header, rows = _summary(killed)
    assert len(rows) == 1, "the killed run should have logged exactly epoch 1"
    p = _run(config_path, killed_dir)
    assert "resuming from" in p.stdout, p.stdout

    # Same parameters, running statistics and optimizer state, bit for bit.
    for name in ("train_model_1", "train_model_2", "train_model_3", "train_model_latest"):
        a = torch.load(straight / "saved_models" / name, map_location="cpu", weights_only=False)
        b = torch.load(killed / "saved_models" / name, map_location="cpu", weights_only=False)
        assert a["network"].keys() == b["network"].keys()
        for key in a["network"]:
            assert a["network"][key].dtype == torch.float64
            assert torch.equal(a["network"][key], b["network"][key]), f"{name}: {key} differs after resume"
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"{name}: Adam {k} of {i}"
        assert a["current_iter"] == b["current_iter"]
        assert a["per_epoch_statistics"] == b["per_epoch_statistics"], name

    # Same logs, except wall-clock columns.
    ha, ra = _summary(straight)
    hb, rb = _summary(killed)
    assert ha == hb
    assert len(ra) == len(rb) == 3
    assert ra == rb
    assert (straight / "logs" / "summary_statistics.json").read_text() == \
        (killed / "logs" / "summary_statistics.json").read_text()
    assert (straight / "logs" / "test_summary.csv").read_text() == (killed / "logs" / "test_summary.csv").read_text()
