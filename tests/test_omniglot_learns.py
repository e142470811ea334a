"""Real data: a short MAML++ run on Omniglot learns 5-way 1-shot tasks far above chance.

Reads the two "background small" Omniglot zips in place (242 characters, split 171/8/63 by the
original's shuffle of the classes) from ../shared/data/omniglot next to the repository, or from
$MAMLPP_OMNIGLOT_DIR; skipped only when that folder is absent.

Setting: the paper's MAML++ (second order, multi-step loss, per-step batch norm, learnable per-step
inner learning rates, cosine-annealed Adam, 28x28 inputs, 4 conv stages), made smaller to run in well
under 3 minutes on 2 CPU cores: 32 filters, 2 inner steps, meta-batch 4, 5 target images per class,
2 epochs of 125 meta-updates (250 in all), then validation on 100 fixed tasks after each epoch and the
test protocol (ensemble of the 2 best checkpoints) on 100 test tasks. Chance is 20%.

Measured (fast learner, CPU, this setting, 2026-11-26), final validation accuracy / test accuracy:
    seed 104, train_seed 0: 0.794 / 0.791   (the setting of this test)
    seed 105, train_seed 1: 0.777 / 0.799
    seed 106, train_seed 2: 0.763 / 0.797
  after epoch 1 (125 updates) validation was already 0.73 / 0.74 / 0.71. The reference learner on the
  same setting with 3 inner steps and 300 updates: 0.815. The threshold below, 0.5, leaves a wide
  margin for run-to-run and learner-to-learner differences and is still far above chance.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from mamlpp_fast.config import load_args
from mamlpp_fast.trainer import run_experiment

OMNIGLOT = Path(os.environ.get("MAMLPP_OMNIGLOT_DIR")
                or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot")
CHANCE = 1 / 5
THRESHOLD = 0.5


@pytest.mark.slow
@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot not found at {OMNIGLOT}")
def test_maml_plus_plus_learns_omniglot(tmp_path):
    args = load_args({
        # The paper's Omniglot settings (configs/omniglot_maml++_5_way_1_shot.json) ...
        "dataset_name": "omniglot", "dataset_path": str(OMNIGLOT), "experiment_name": "omniglot_learns",
        "experiment_dir": str(tmp_path), "image_height": 28, "image_width": 28, "image_channels": 1,
        "train_val_test_split": [0.70918052988, 0.03080714725, 0.2606284658],
        "indexes_of_folders_indicating_class": [-3, -2], "train_seed": 0, "val_seed": 0,
        "num_classes_per_set": 5, "num_samples_per_class": 1, "num_stages": 4, "conv_padding": True,
        "max_pooling": True, "per_step_bn_statistics": True, "learnable_bn_gamma": True, "learnable_bn_beta": True,
        "enable_inner_loop_optimizable_bn_params": False,
        "learnable_per_layer_per_step_inner_loop_learning_rate": True, "use_multi_step_loss_optimization": True,
        "second_order": True, "first_order_to_second_order_epoch": -1, "meta_learning_rate": 0.001,
        "min_learning_rate": 0.00001, "task_learning_rate": 0.1,
        # ... made small enough for CI.
        "batch_size": 4, "cnn_num_filters": 32, "number_of_training_steps_per_iter": 2,
        "number_of_evaluation_steps_per_iter": 2, "num_target_samples": 5, "multi_step_loss_num_epochs": 2,
        "total_epochs": 2, "total_iter_per_epoch": 125, "num_evaluation_tasks": 100, "max_models_to_save": 2,
        "device": "cpu",
    })
    result = run_experiment(args, progress=False, log=lambda msg: None)
    assert result["status"] == "done" and result["current_iter"] == 250

    with open(tmp_path / "omniglot_learns" / "logs" / "summary_statistics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_acc = [float(r["val_accuracy_mean"]) for r in rows]
    assert len(val_acc) == 2
    assert val_acc[-1] > THRESHOLD, f"validation accuracy per epoch {val_acc}; chance is {CHANCE}"
    assert result["test_accuracy_mean"] > THRESHOLD, (result, CHANCE)
