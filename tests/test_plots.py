"""`mamlpp plot-lrs`: the LSLR, MSL and loss/accuracy charts are written from an experiment's files and
are real pictures (PNG, not tiny, not one flat colour).

Why: a chart that silently comes out blank (no data found, wrong keys) looks like success; checking
pixel variance catches that. The experiment is a real 2-epoch run of the trainer on tiny synthetic
tasks, built once for the module.
"""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from mamlpp_fast.config import load_args
from mamlpp_fast.data import MetaLearningSystemDataLoader
from mamlpp_fast.plots import main as plots_main
from mamlpp_fast.trainer import ExperimentBuilder, learner_class
from _tiny import tiny_config

TINY = tiny_config(experiment_name='plots', synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6,
                   image_height=14, image_width=14, num_classes_per_set=3, num_target_samples=1,
                   cnn_num_filters=4, number_of_training_steps_per_iter=3,
                   number_of_evaluation_steps_per_iter=3, total_epochs=2, total_iter_per_epoch=3,
                   num_evaluation_tasks=2, max_models_to_save=5, meta_learning_rate=0.01,
                   min_learning_rate=0.0001, task_learning_rate=0.1, seed=5)
NAMES = ("lslr.png", "msl.png", "curves.png")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    base = tmp_path_factory.mktemp("plots")
    args = load_args(dict(TINY, experiment_dir=str(base)))
    model = learner_class("fast")(im_shape=(2, 1, 14, 14), device="cpu", args=args)
    ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=False,
                      log=lambda m: None).run_experiment()
    return base / "plots"


def _copy(experiment, tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(experiment, dst)
    return dst


def assert_real_png(path, min_bytes=8_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 5.0, f"{path} is (nearly) a single colour"
    # not a blank canvas with a title: a good share of pixels is not background white
    assert (img.min(axis=2) < 200).mean() > 0.01, f"{path} has almost nothing drawn"


def test_all_epochs_written_into_plots_folder(experiment, tmp_path, capsys):
    exp = _copy(experiment, tmp_path)
    assert plots_main([str(exp)]) == 0
    printed = capsys.readouterr().out.split()
    for name in NAMES:
        assert_real_png(exp / "plots" / name)
        assert str(exp / "plots" / name) in printed


def test_selected_epochs_and_out_folder(experiment, tmp_path):
    exp = _copy(experiment, tmp_path)
    out = tmp_path / "charts"
    assert plots_main([str(exp), "--epoch", "1", "--epoch", "best", "--out", str(out)]) == 0
    for name in NAMES:
        assert_real_png(out / name)
    assert not (exp / "plots").exists()
    # one panel (epoch 1) gives a narrower chart than every epoch's panels side by side
    assert plots_main([str(exp), "--epoch", "2", "--out", str(tmp_path / "one")]) == 0
    assert plots_main([str(exp), "--out", str(tmp_path / "all")]) == 0
    w_one = Image.open(tmp_path / "one" / "lslr.png").size[0]
    w_all = Image.open(tmp_path / "all" / "lslr.png").size[0]
    assert w_all > w_one


def test_msl_computed_from_config_when_not_logged(experiment, tmp_path):
    exp = _copy(experiment, tmp_path)
    csv_path = exp / "logs" / "summary_statistics.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, h in enumerate(rows[0]) if "importance" not in h]
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([[r[i] for i in keep] for r in rows])
    assert plots_main([str(exp)]) == 0
    assert_real_png(exp / "plots" / "msl.png")


def test_lslr_values_come_from_the_checkpoints(experiment):
    from mamlpp_fast.plots import load_lslr

    lrs = load_lslr(str(experiment / "saved_models" / "train_model_2"), 3)
    assert len(lrs) == 2 * 2 + 2  # conv weight+bias per stage, linear weights+bias
    for name, v in lrs.items():
        assert v.shape == (3,)
    # learned: the weights' rates moved away from the initial 0.1
    assert any(np.abs(v - 0.1).max() > 1e-4 for v in lrs.values())


@pytest.mark.parametrize("argv, needle", [
    (["{missing}"], "experiment folder not found"),
    (["{exp}", "--epoch", "9"], "no checkpoint for epoch 9"),
    (["{exp}", "--epoch", "last"], "'last'"),
])
def test_errors_name_the_cause(experiment, tmp_path, capsys, argv, needle):
    argv = [a.format(missing=tmp_path / "nope", exp=experiment) for a in argv]
    assert plots_main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_plot_lrs_subcommand(experiment, tmp_path):
    """`python -m mamlpp_fast plot-lrs <experiment> --out DIR` writes the three charts."""
    import subprocess
    import sys
    exp = _copy(experiment, tmp_path)
    out = tmp_path / "charts"
    r = subprocess.run([sys.executable, "-m", "mamlpp_fast", "plot-lrs", str(exp), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("lslr.png", "msl.png", "curves.png"):
        assert_real_png(out / name)
