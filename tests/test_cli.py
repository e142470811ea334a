"""The `mamlpp` command in a subprocess: both command-line forms, and clean exits on bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamlpp_fast.cli import parse_overrides
from _tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]

TINY = tiny_config(experiment_name='tiny_cli', image_height=28, image_width=28, num_classes_per_set=5,
                   num_target_samples=2, cnn_num_filters=8, number_of_training_steps_per_iter=2,
                   number_of_evaluation_steps_per_iter=2, total_epochs=1, total_iter_per_epoch=2,
                   num_evaluation_tasks=4, train_seed=0, val_seed=0, continue_from_epoch=-2)


def write_config(tmp_path, name="tiny.json", **kw):
    cfg = dict(TINY)
    cfg.update(kw)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def mamlpp(*argv, cwd=None, env_extra=None, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DATASET_DIR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mamlpp_fast", *map(str, argv)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_then_test(tmp_path):
    cfg = write_config(tmp_path)
    exp = tmp_path / "exp"
    p = mamlpp("train", "--config", cfg, "--experiment-dir", exp, "--device", "cpu", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    root = exp / "tiny_cli"
    assert (root / "saved_models" / "train_model_1").is_file()
    assert (root / "logs" / "summary_statistics.csv").is_file()
    with open(root / "logs" / "test_summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["test_accuracy_mean", "test_accuracy_std"]
    # The start-up line names learner, backend, device, dataset, config and output folder.
    first = next(line for line in p.stdout.splitlines() if line.startswith("mamlpp: learner="))
    for part in ("backend=", "device=cpu", "dataset=synthetic", f"config={cfg}", f"output={root}"):
        assert part in first, (part, first)
    assert "test_accuracy_mean=" in p.stdout

    t = mamlpp("test", "--config", cfg, "--experiment-dir", exp, "--device", "cpu", "--no-progress")
    assert t.returncode == 0, t.stdout + t.stderr
    assert f"test_accuracy_mean={float(rows[1][0]):.4f}" in t.stdout

    # Starting again from scratch would destroy the run: refused, exit 2, one line.
    s = mamlpp("train", "--config", cfg, "--experiment-dir", exp, "--continue_from_epoch", "from_scratch")
    assert s.returncode == 2 and "--overwrite" in s.stderr and "Traceback" not in s.stderr


def test_original_command_line(tmp_path):
    # The original's form: python train_maml_system.py --name_of_args_json_file X --gpu_to_use 0, plus
    # its other flags as overrides (here --batch_size and a list-valued flag) and DATASET_DIR.
    cfg = write_config(tmp_path, batch_size=4)
    p = mamlpp("--name_of_args_json_file", cfg, "--gpu_to_use", "-1", "--batch_size", "2",
               "--experiment_dir", tmp_path / "exp", "--train_val_test_split", "0.5", "0.25", "0.25",
               "--no-progress", env_extra={"DATASET_DIR": str(tmp_path / "datasets")})
    assert p.returncode == 0, p.stdout + p.stderr
    snapshot = json.loads((tmp_path / "exp" / "tiny_cli" / "config.json").read_text())
    assert snapshot["batch_size"] == 2  # the flag wins over the JSON
    assert snapshot["train_val_test_split"] == [0.5, 0.25, 0.25]
    assert snapshot["dataset_dir"] == str(tmp_path / "datasets")
    assert snapshot["device"] == "cpu"  # --gpu_to_use -1
    assert (tmp_path / "exp" / "tiny_cli" / "logs" / "test_summary.csv").is_file()


def test_wrong_type_exits_2_naming_the_key(tmp_path):
    cfg = write_config(tmp_path, cnn_num_filters="many")
    p = mamlpp("train", "--config", cfg, "--experiment-dir", tmp_path / "exp")
    assert p.returncode == 2
    assert "cnn_num_filters" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "exp").exists()
    # A wrong type given as an original-style flag is reported the same way.
    p = mamlpp("--name_of_args_json_file", write_config(tmp_path, "ok.json"), "--batch_size", "two")
    assert p.returncode == 2 and "batch_size" in p.stderr and "Traceback" not in p.stderr


def test_missing_dataset_exits_2_naming_the_path(tmp_path):
    cfg = write_config(tmp_path, dataset_name="omniglot", dataset_path="omniglot_nowhere")
    p = mamlpp("train", "--config", cfg, "--dataset-dir", tmp_path / "datasets", "--experiment-dir", tmp_path / "exp")
    assert p.returncode == 2, p.stdout + p.stderr
    assert str(tmp_path / "datasets" / "omniglot_nowhere") in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "exp").exists()


def test_missing_config_and_no_arguments(tmp_path):
    p = mamlpp("train", "--config", tmp_path / "nope.json")
    assert p.returncode == 2 and "nope.json" in p.stderr and "Traceback" not in p.stderr
    p = mamlpp()
    assert p.returncode == 2 and "usage" in p.stderr.lower()


def test_parse_overrides():
    assert parse_overrides(["--batch_size", "4", "--second_order", "True", "--seed=3", "--flag",
                            "--split", "0.5", "0.5", "--name", "omniglot_1_8", "--gpu-to-use", "-1"]) == {
        "batch_size": 4, "second_order": "True", "seed": 3, "flag": True, "split": [0.5, 0.5],
        "name": "omniglot_1_8", "gpu_to_use": -1}
    with pytest.raises(ValueError):
        parse_overrides(["stray"])
