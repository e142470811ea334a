"""Tests of mamlpp_fast.config: the original's JSON files and defaults, checked and reported by name."""
from __future__ import annotations

import argparse
import glob
import json
import os
import warnings

import pytest

from mamlpp_fast.config import DEFAULTS, REQUIRED, ConfigError, default_args, load_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The keys an experiment file of the original must set (REQUIRED), as in its omniglot MAML++ files.
BASE = {
    "num_stages": 4, "conv_padding": True, "first_order_to_second_order_epoch": -1,
    "use_multi_step_loss_optimization": True, "multi_step_loss_num_epochs": 10,
    "learnable_per_layer_per_step_inner_loop_learning_rate": True,
    "enable_inner_loop_optimizable_bn_params": False, "learnable_bn_gamma": True, "learnable_bn_beta": True,
}


def load_quiet(args=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-key warning expected
        return load_args(args, **kw)


def test_required_keys_are_the_ones_of_base():
    assert set(REQUIRED) == set(BASE)


def test_defaults_of_the_original():
    a = load_quiet(BASE)
    assert isinstance(a, argparse.Namespace)
    # values of the original's parser (utils/parser_utils.py)
    assert a.seed == 104
    assert a.task_learning_rate == 0.1
    assert a.meta_learning_rate == 0.001
    assert a.min_learning_rate == 0.00001
    assert a.batch_size == 32
    assert a.number_of_training_steps_per_iter == 1
    assert a.second_order is False
    assert a.norm_layer == "batch_norm"
    # our own keys
    assert a.bn_backup_aliasing is False
    assert a.learner == "fast"
    assert a.dtype == "float32"
    for key in DEFAULTS:
        assert hasattr(a, key), key


def test_json_file_with_true_false_strings(tmp_path):
    cfg = dict(BASE)
    cfg.update({"conv_padding": "true", "use_multi_step_loss_optimization": "True",
                "learnable_per_layer_per_step_inner_loop_learning_rate": "TRUE",
                "enable_inner_loop_optimizable_bn_params": "false", "learnable_bn_gamma": "False",
                "learnable_bn_beta": "true", "second_order": "true", "max_pooling": "false",
                "per_step_bn_statistics": "true", "batch_size": 8, "dataset_name": "omniglot_dataset"})
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(cfg))
    a = load_quiet(str(path))
    assert a.conv_padding is True
    assert a.use_multi_step_loss_optimization is True
    assert a.learnable_per_layer_per_step_inner_loop_learning_rate is True
    assert a.enable_inner_loop_optimizable_bn_params is False
    assert a.learnable_bn_gamma is False
    assert a.learnable_bn_beta is True
    assert a.second_order is True and a.max_pooling is False and a.per_step_bn_statistics is True
    assert a.batch_size == 8 and a.dataset_name == "omniglot_dataset"
    # a pathlib.Path works as well
    assert load_quiet(path).batch_size == 8


def test_dict_namespace_and_overrides():
    a = load_quiet(BASE, batch_size=3)
    assert a.batch_size == 3
    b = load_quiet(argparse.Namespace(**BASE), second_order="false")
    assert b.second_order is False
    c = load_quiet(None, **BASE)
    assert c.num_stages == 4
    # load_args of a loaded Namespace is idempotent
    assert vars(load_quiet(a)) == vars(a)


def test_unknown_key_warns_naming_it():
    with pytest.warns(UserWarning, match="my_unknown_key"):
        a = load_args(dict(BASE, my_unknown_key=1))
    assert a.num_stages == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_args(dict(BASE, my_unknown_key=1), warn_unknown=False)


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_missing_required_key_names_it(key):
    cfg = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(ConfigError, match=key):
        load_args(cfg)


@pytest.mark.parametrize("key,value", [
    ("batch_size", "abc"), ("batch_size", 2.5), ("batch_size", True), ("second_order", "yes"),
    ("second_order", 1), ("cnn_num_filters", 3.5), ("meta_learning_rate", "fast"),
    ("dataset_name", 3), ("num_stages", "four"), ("use_multi_step_loss_optimization", "maybe"),
    ("conv_padding", "same"), ("train_val_test_split", 0.5), ("task_learning_rate", None),
])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_args(dict(BASE, **{key: value}))


def test_harmless_coercions():
    a = load_quiet(dict(BASE, meta_learning_rate=1, batch_size=4.0, conv_padding=1))
    assert isinstance(a.meta_learning_rate, float) and a.meta_learning_rate == 1.0
    assert isinstance(a.batch_size, int) and a.batch_size == 4
    assert a.conv_padding == 1


@pytest.mark.parametrize("key,value", [
    ("batch_size", 0), ("batch_size", -1), ("num_classes_per_set", 1), ("number_of_training_steps_per_iter", 0),
    ("number_of_evaluation_steps_per_iter", 0), ("cnn_num_filters", 0), ("num_stages", 0), ("total_epochs", 0),
    ("multi_step_loss_num_epochs", 0), ("meta_learning_rate", -0.1), ("min_learning_rate", -1.0),
    ("dtype", "float16"), ("learner", "slow"), ("backend", "opencl"), ("norm_layer", "layer_norm"),
    ("conv_impl", "winograd"), ("conv_impl", 3), ("first_block", "always"), ("first_block", True),
    ("conv_precision", "fp16"), ("conv_streams", "sometimes"),
    ("image_height", 0), ("train_val_test_split", [0.5, 0.5]),
])
def test_range_checks_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_args(dict(BASE, **{key: value}))


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_more_evaluation_than_training_steps_with_per_step_bn_raises():
    cfg = dict(BASE, per_step_bn_statistics=True, number_of_training_steps_per_iter=3,
               number_of_evaluation_steps_per_iter=5)
    with pytest.raises(ConfigError, match="number_of_evaluation_steps_per_iter"):
        load_args(cfg)
    # fewer or equal evaluation steps: fine; without per-step BN more are fine too (the original allows it)
    load_quiet(dict(cfg, number_of_evaluation_steps_per_iter=3))
    load_quiet(dict(cfg, number_of_evaluation_steps_per_iter=2))
    load_quiet(dict(cfg, per_step_bn_statistics=False))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_args(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_args(str(bad))
    arr = tmp_path / "list.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json"):
        load_args(str(arr))
    with pytest.raises(ConfigError):
        load_args(42)


def test_default_args_is_the_paper_omniglot_setting():
    a = default_args()
    assert (a.num_classes_per_set, a.num_samples_per_class, a.number_of_training_steps_per_iter) == (5, 1, 5)
    assert a.per_step_bn_statistics and a.second_order and a.use_multi_step_loss_optimization
    assert a.first_order_to_second_order_epoch == -1
    b = default_args(cnn_num_filters=8)
    assert b.cnn_num_filters == 8


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.json"))))
def test_shipped_configs_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experiment files may carry keys of other tools
        a = load_args(path)
    assert a.num_stages >= 1
    assert isinstance(a.second_order, bool)


def test_cuda_graph_is_on_by_default_and_ignored_on_a_cpu():
    """Config key cuda_graph defaults to on (a captured meta-update on one CUDA device); on a CPU the
    learner stays uncaptured (no capturable optimizer) and trains as before."""
    from mamlpp_fast.config import DEFAULTS
    from mamlpp_fast.fast import MAMLFewShotClassifier

    assert DEFAULTS["cuda_graph"] is True
    args = default_args(cnn_num_filters=4, num_classes_per_set=2, number_of_training_steps_per_iter=1,
                        number_of_evaluation_steps_per_iter=1)
    assert args.cuda_graph is True
    model = MAMLFewShotClassifier((1, 1, 28, 28), "cpu", args)
    assert not model._graph_mode()
    assert all(not g.get("capturable", False) for g in model.core.optimizer.param_groups)
