"""Experiment configuration: the original's keys, defaults and JSON files, checked.

The authors' code reads its settings from argparse defaults (utils/parser_utils.py) overlaid with an
experiment JSON file, turning the strings "true"/"false" into booleans. `load_args` accepts the same
JSON files unchanged, or a dict, or an argparse.Namespace, and returns a Namespace with every key the
learners, the data loader and the trainer read.

Differences from the original, on purpose:
- a key we do not know is reported by name (one UserWarning listing them) instead of being ignored;
- a value of the wrong type, or out of range, raises `ConfigError` naming the key;
- keys the original reads without a default (so a missing one crashes deep inside its code with an
  AttributeError) are `REQUIRED`: a missing one raises `ConfigError` naming it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from typing import Any, Mapping
from .errors import ConfigError  # noqa: F401 (re-exported)

__all__ = ["ConfigError", "DEFAULTS", "REQUIRED", "load_args", "default_args"]




# Defaults of the original's argparse parser (utils/parser_utils.py), plus the keys of its experiment
# JSON files that have an obvious neutral default, plus our own keys (at the end).
DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "image_height": 28,
    "image_width": 28,
    "image_channels": 1,
    "reset_stored_filepaths": False,
    "reverse_channels": False,
    "num_of_gpus": 1,
    "indexes_of_folders_indicating_class": [-2, -3],
    "train_val_test_split": [0.73982737361, 0.26, 0.13008631319],
    "samples_per_iter": 1,
    "labels_as_int": False,
    "seed": 104,
    "gpu_to_use": None,
    "num_dataprovider_workers": 4,
    "max_models_to_save": 5,
    "dataset_name": "omniglot_dataset",
    "dataset_path": "datasets/omniglot_dataset",
    "reset_stored_paths": False,
    "experiment_name": None,
    "architecture_name": None,
    "continue_from_epoch": "latest",
    "dropout_rate_value": 0.3,
    "num_target_samples": 15,
    "second_order": False,
    "hypernetwork_scale": 1.0,
    "total_epochs": 200,
    "total_iter_per_epoch": 500,
    "min_learning_rate": 0.00001,
    "meta_learning_rate": 0.001,
    "meta_opt_bn": False,
    "task_learning_rate": 0.1,
    "full_context_unroll_k": 5,
    "norm_layer": "batch_norm",
    "max_pooling": False,
    "per_step_bn_statistics": False,
    "num_classes_per_set": 20,
    "use_gdrive": False,
    "cnn_num_blocks": 4,
    "number_of_training_steps_per_iter": 1,
    "number_of_evaluation_steps_per_iter": 1,
    "cnn_num_filters": 64,
    "cnn_blocks_per_stage": 1,
    "num_samples_per_class": 1,
    "use_full_context_embeddings": False,
    "grad_penalty": False,
    "name_of_args_json_file": "None",
    # Keys of the experiment JSON files (read by the original, several of them never used).
    "train_seed": 0,
    "val_seed": 0,
    "test_seed": 0,
    "load_from_npz_files": False,
    "sets_are_pre_split": False,
    "load_into_memory": True,
    "init_inner_loop_learning_rate": 0.1,  # dead in the original: task_learning_rate is used
    "train_in_stages": False,
    "minimum_per_task_contribution": 0.01,  # dead in the original: 0.03 is hard-coded
    "num_evaluation_tasks": 600,
    "total_epochs_before_pause": 100,
    "evaluate_on_test_set_only": False,
    "evalute_on_test_set_only": False,
    "learnable_batch_norm_momentum": False,
    "weight_decay": 0.0,
    "use_cuda": False,
    # Our own keys.
    "learner": "fast",  # "fast" | "reference"
    "backend": "auto",  # "auto" | "native" | "triton" | "torch" (former names "cpp", "cuda": native on one device)
    "device": "auto",  # "auto" | "cpu" | "cuda" | "cuda:N"
    "dtype": "float32",  # "float32" | "float64" (float64 for exact comparisons)
    "bn_backup_aliasing": False,  # True: reproduce the original's aliased BN backup (its issue #42)
    "dataset_dir": None,
    "experiment_dir": None,
    "synthetic_seed": 0,  # built-in synthetic tasks (dataset_name "synthetic")
    "synthetic_num_classes": [1000, 200, 200],  # train/val/test class pools
    "synthetic_images_per_class": 20,
    "nonfinite_policy": "skip",  # "skip" | "stop": what a non-finite meta-loss or gradient does
    "cuda_graph": True,  # capture the whole meta-update in a CUDA graph (fast learner on one CUDA device;
    # ignored on a CPU and under torchrun data parallelism, whose collectives are not captured)
    "cudnn_benchmark": True,  # fast learner: cuDNN picks convolution algorithms by timing them
    "allow_tf32": False,  # TF32 convolutions/matmuls on GPUs that have them (faster, ~1e-3 less exact)
    "conv_precision": "auto",  # Triton conv / fused-block products: "auto" (follows allow_tf32) | "ieee" | "tf32" | "tf32x3"
    "conv_streams": False,  # fast learner on CUDA: independent Triton convolution launches on two streams
    "conv_impl": "auto",  # fast learner: how the per-task convolutions run (mamlpp_fast.ops.conv)
    "first_block": "auto",  # fast learner: "fused" | "unfused" | "auto" (mamlpp_fast.ops.conv_block)
    "bn_pool": "auto",  # fast learner, layers after the first: "fused" | "unfused" | "auto" (mamlpp_fast.ops.bn_pool)
    "head": "auto",  # fast learner, linear head + cross-entropy: "fused" | "unfused" | "auto" (mamlpp_fast.ops.head)
    "evaluation_batch_size": 32,  # fast learner: validation/test tasks per evaluation call (trainer)
}

# Keys the learner reads that the original's parser gives no default: its experiment files must set them.
REQUIRED: dict[str, type] = {
    "num_stages": int,
    "conv_padding": bool,
    "first_order_to_second_order_epoch": int,
    "use_multi_step_loss_optimization": bool,
    "multi_step_loss_num_epochs": int,
    "learnable_per_layer_per_step_inner_loop_learning_rate": bool,
    "enable_inner_loop_optimizable_bn_params": bool,
    "learnable_bn_gamma": bool,
    "learnable_bn_beta": bool,
}

_CHOICES = {
    "learner": ("fast", "reference"),
    "backend": ("auto", "native", "triton", "torch", "cpp", "cuda"),  # = mamlpp_fast.ops.backend.BACKEND_NAMES
    "dtype": ("float32", "float64"),
    "norm_layer": ("batch_norm",),
    "nonfinite_policy": ("skip", "stop"),
    "conv_impl": ("auto", "grouped", "channels_last", "unfold", "unfold_bmm", "per_task", "triton"),
    "first_block": ("auto", "fused", "unfused"),
    "bn_pool": ("auto", "fused", "unfused"),
    "head": ("auto", "fused", "unfused"),
    "conv_precision": ("auto", "ieee", "tf32", "tf32x3"),
}
_POSITIVE_INT = (
    "batch_size", "image_height", "image_width", "image_channels", "num_classes_per_set",
    "num_samples_per_class", "num_target_samples", "number_of_training_steps_per_iter",
    "number_of_evaluation_steps_per_iter", "cnn_num_filters", "num_stages", "total_epochs",
    "total_iter_per_epoch", "multi_step_loss_num_epochs", "num_evaluation_tasks", "max_models_to_save",
    "samples_per_iter", "num_of_gpus",  # tasks per batch = num_of_gpus * batch_size * samples_per_iter
    "evaluation_batch_size",
)
_NONNEGATIVE_INT = ("num_dataprovider_workers",)
_NONNEGATIVE_FLOAT = ("meta_learning_rate", "min_learning_rate")
# conv_padding is a bool in every shipped file, but it is used as the padding (an int) of the conv.
_BOOL_OR_INT = ("conv_padding",)
_INT_OR_STR = ("continue_from_epoch",)
_OPTIONAL = ("gpu_to_use", "experiment_name", "architecture_name", "dataset_dir", "experiment_dir")


def _to_bool_if_string(value: Any) -> Any:
    # The original turns any value whose str() is "true"/"false" (any case) into a bool.
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _expected_type(key: str) -> type | None:
    if key in REQUIRED:
        return REQUIRED[key]
    if key in DEFAULTS and DEFAULTS[key] is not None:
        return type(DEFAULTS[key])
    return None


def _check_type(key: str, value: Any) -> Any:
    """Return the value coerced where harmless (int -> float), else raise ConfigError."""
    if value is None and (key in _OPTIONAL or DEFAULTS.get(key, 0) is None):
        return value
    if key in _BOOL_OR_INT:
        if isinstance(value, (bool, int)):
            return value
        raise ConfigError(f"config key '{key}' must be a boolean or an integer, got {value!r}")
    if key in _INT_OR_STR:
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer or a string, got {value!r}")
    expected = _expected_type(key)
    if expected is None:
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be a boolean (or \"true\"/\"false\"), got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if expected is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
    return value


def _check_ranges(d: dict[str, Any]) -> None:
    for key in _POSITIVE_INT:
        if d[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {d[key]!r}")
    for key in _NONNEGATIVE_INT:
        if d[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0: in the main process), got {d[key]!r}")
    for key in _NONNEGATIVE_FLOAT:
        if d[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {d[key]!r}")
    for key, choices in _CHOICES.items():
        if d[key] not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {d[key]!r}")
    if d["num_classes_per_set"] < 2:
        raise ConfigError(f"config key 'num_classes_per_set' must be >= 2, got {d['num_classes_per_set']!r}")
    if d["per_step_bn_statistics"] and (
        d["number_of_evaluation_steps_per_iter"] > d["number_of_training_steps_per_iter"]
    ):
        # Per-step BN has one row per training step: more evaluation steps would index past the end
        # (the original crashes there, its issue #28).
        raise ConfigError(
            "config key 'number_of_evaluation_steps_per_iter' "
            f"({d['number_of_evaluation_steps_per_iter']}) exceeds 'number_of_training_steps_per_iter' "
            f"({d['number_of_training_steps_per_iter']}), but per_step_bn_statistics keeps one batch-norm "
            "row per training step")
    split = d["train_val_test_split"]
    if len(split) != 3 or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0
                              for v in split):
        raise ConfigError(f"config key 'train_val_test_split' must be 3 non-negative numbers, got {split!r}")
    _check_values_downstream(d)


# Values that a library further down (numpy's RandomState, torch.optim.Adam, torch.device, the
# convolutions) would reject with a traceback: checked here, named by their config key.
_SEED_KEYS = ("seed", "train_seed", "val_seed", "test_seed", "synthetic_seed")
_POSITIVE_FLOAT = ("task_learning_rate",)
_NONNEGATIVE_FLOAT_MORE = ("weight_decay",)
_DEVICE_RE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def _check_values_downstream(d: dict[str, Any]) -> None:
    for key, value in d.items():
        if isinstance(value, float) and not math.isfinite(value) and (key in DEFAULTS or key in REQUIRED):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    for key in _POSITIVE_FLOAT:
        if not d[key] > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {d[key]!r}")
    for key in _NONNEGATIVE_FLOAT_MORE:
        if d[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {d[key]!r}")
    for key in _SEED_KEYS:
        if not 0 <= d[key] <= 2 ** 32 - 1:
            raise ConfigError(f"config key '{key}' must be between 0 and 2**32 - 1 (a numpy RandomState seed), "
                              f"got {d[key]!r}")
    device = d["device"]
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ConfigError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    _check_network_fits(d)


def _check_network_fits(d: dict[str, Any]) -> None:
    """Each stage is a 3x3 convolution (stride 1 with max pooling, else 2; padding conv_padding) and,
    with max_pooling, a 2x2 max pool: the feature map must keep at least one pixel through every stage."""
    h, w = int(d["image_height"]), int(d["image_width"])
    pad = int(d["conv_padding"])
    stride = 1 if d["max_pooling"] else 2
    if pad < 0:
        raise ConfigError(f"config key 'conv_padding' must be >= 0, got {d['conv_padding']!r}")
    for stage in range(int(d["num_stages"])):
        h2, w2 = (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1
        if d["max_pooling"]:
            h2, w2 = h2 // 2, w2 // 2
        if h2 < 1 or w2 < 1:
            raise ConfigError(
                f"config key 'num_stages' ({d['num_stages']}) is too deep for {d['image_height']}x"
                f"{d['image_width']} images: stage {stage + 1} would shrink its {h}x{w} input to {max(h2, 0)}x"
                f"{max(w2, 0)} (conv_padding={d['conv_padding']}, max_pooling={d['max_pooling']}); use fewer "
                "stages or larger images")
        h, w = h2, w2


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: pass the experiment's JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a text (JSON) file: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_args(args: Any = None, warn_unknown: bool = True, **overrides: Any) -> argparse.Namespace:
    """Build a complete, checked Namespace from a Namespace, a dict, or a path to a JSON file.

    Arguments:
        args: argparse.Namespace (any object with __dict__), a mapping, a path to the original's
            experiment JSON, or None (defaults only; then REQUIRED keys must come in `overrides`).
        warn_unknown: warn (UserWarning) once, naming every key that neither the original nor we read.
        overrides: keys applied last (e.g. from the command line).

    Returns: argparse.Namespace with all DEFAULTS and REQUIRED keys.
    Raises: ConfigError naming the key that is missing, of the wrong type or out of range.

    Example:
        >>> a = load_args({"num_stages": 4, "conv_padding": True, "first_order_to_second_order_epoch": -1,
        ...                "use_multi_step_loss_optimization": True, "multi_step_loss_num_epochs": 10,
        ...                "learnable_per_layer_per_step_inner_loop_learning_rate": True,
        ...                "enable_inner_loop_optimizable_bn_params": False, "learnable_bn_gamma": True,
        ...                "learnable_bn_beta": True, "second_order": "true"})
        >>> a.second_order, a.task_learning_rate
        (True, 0.1)
    """
    if args is None:
        given: dict[str, Any] = {}
    elif isinstance(args, (str, os.PathLike)):
        given = _read_json(args)
    elif isinstance(args, Mapping):
        given = dict(args)
    elif hasattr(args, "__dict__"):
        given = dict(vars(args))
    else:
        raise ConfigError(f"args must be a Namespace, a dict or a JSON path, got {type(args).__name__}")
    given.update(overrides)

    unknown = sorted(k for k in given if k not in DEFAULTS and k not in REQUIRED)
    if unknown and warn_unknown:
        warnings.warn(f"unknown config keys (ignored by mamlpp_fast): {', '.join(unknown)}", UserWarning,
                      stacklevel=2)

    merged: dict[str, Any] = dict(DEFAULTS)
    for key, value in given.items():
        merged[key] = _to_bool_if_string(value)
    missing = [k for k in REQUIRED if k not in merged]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    for key in list(merged):
        if key in DEFAULTS or key in REQUIRED:
            merged[key] = _check_type(key, merged[key])
    _check_ranges(merged)
    return argparse.Namespace(**merged)


def default_args(**overrides: Any) -> argparse.Namespace:
    """A complete MAML++ configuration (Omniglot 5-way 1-shot settings of the paper), for the API and tests."""
    base = {
        "batch_size": 8, "num_classes_per_set": 5, "num_samples_per_class": 1, "num_target_samples": 1,
        "image_height": 28, "image_width": 28, "image_channels": 1, "cnn_num_filters": 64, "num_stages": 4,
        "conv_padding": True, "max_pooling": True, "per_step_bn_statistics": True, "learnable_bn_gamma": True,
        "learnable_bn_beta": True, "enable_inner_loop_optimizable_bn_params": False,
        "learnable_per_layer_per_step_inner_loop_learning_rate": True, "use_multi_step_loss_optimization": True,
        "multi_step_loss_num_epochs": 10, "second_order": True, "first_order_to_second_order_epoch": -1,
        "number_of_training_steps_per_iter": 5, "number_of_evaluation_steps_per_iter": 5,
        "total_epochs": 100, "total_iter_per_epoch": 500, "meta_learning_rate": 0.001,
        "min_learning_rate": 0.00001, "task_learning_rate": 0.1, "dataset_name": "synthetic",
        "num_evaluation_tasks": 600,
    }
    base.update(overrides)
    return load_args(base)
