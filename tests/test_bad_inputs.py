"""Every bad input the product rejects, as one table: what is wrong, which error, and what the message
must name (the config key, the file or folder, the argument).

Why: an error that says "shape mismatch" deep inside a convolution costs a user an afternoon; one that
says "config key 'cnn_num_filters' must be an integer, got 'x'" costs a second. Each row below asserts
the exception type AND that its message names the cause, so a regression to a vague error fails here.
The last rows check that a rejected run loses nothing: an existing experiment folder stays
byte-identical, and the dataset folder is never written.

Each case is `Case(id, exc, make)`; `make(tmp_path, env)` sets the scene and returns
`(call, names[, after])`: `call()` must raise `exc` with every string of `names` in its message, then
`after()` (if given) runs its own checks (e.g. nothing changed on disk).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mamlpp_fast import config as config_mod
from mamlpp_fast.common import BatchError, CheckpointError, coerce_batch, load_checkpoint
from mamlpp_fast.config import DEFAULTS, REQUIRED, ConfigError, load_args
from mamlpp_fast.data import DatasetError, MetaLearningSystemDataLoader
from mamlpp_fast.ops import lslr_update, per_step_batch_norm
from mamlpp_fast.trainer import ExperimentBuilder, ExperimentError, learner_class
from _tiny import tiny_config

EXPECTED_MIN_CASES = 213  # the count reported for this issue; the last test checks the table is at least this long


@dataclass
class Case:
    id: str
    exc: type
    make: Callable[[Path, Any], tuple]


CASES: list[Case] = []


def case(id: str, exc: type):
    def deco(fn):
        CASES.append(Case(id, exc, fn))
        return fn
    return deco


# ------------------------------------------------------------------------------------------- config
BASE = tiny_config(experiment_name='bad', synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6,
                   image_height=14, image_width=14, num_classes_per_set=3, num_target_samples=1,
                   cnn_num_filters=4, number_of_training_steps_per_iter=2,
                   number_of_evaluation_steps_per_iter=2, total_epochs=2, total_iter_per_epoch=2,
                   num_evaluation_tasks=2, max_models_to_save=5, meta_learning_rate=0.001,
                   min_learning_rate=1e-05, task_learning_rate=0.1, dtype='float64', device='cpu', seed=3)

# A value of the wrong type for each expected type (never "true"/"false", which are booleans).
_WRONG = {bool: "maybe", int: "seven", float: "fast", str: 12345, list: 5}


def _wrong_value(key):
    if key in config_mod._BOOL_OR_INT:
        return "yes"
    if key in config_mod._INT_OR_STR:
        return 1.5
    expected = config_mod._expected_type(key)
    return _WRONG.get(expected, None) if expected is not None else None


def _config_call(**kw):
    cfg = dict(BASE)
    for k, v in kw.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    return lambda: load_args(cfg, warn_unknown=False)


_DELETE = object()

for _key in sorted(set(DEFAULTS) | set(REQUIRED)):
    _bad = _wrong_value(_key)
    if _bad is None:  # keys without a type (optional paths/names): anything goes
        continue
    CASES.append(Case(f"config-type-{_key}", ConfigError,
                      (lambda k, v: lambda tmp, env: (_config_call(**{k: v}), [f"'{k}'", repr(v)]))(_key, _bad)))

for _key in sorted(REQUIRED):
    CASES.append(Case(f"config-missing-{_key}", ConfigError,
                      (lambda k: lambda tmp, env: (_config_call(**{k: _DELETE}), [k]))(_key)))

for _key in config_mod._POSITIVE_INT:
    for _v in (0, -3):
        CASES.append(Case(f"config-range-{_key}={_v}", ConfigError,
                          (lambda k, v: lambda tmp, env: (_config_call(**{k: v}), [f"'{k}'", ">= 1"]))(_key, _v)))

for _key in config_mod._NONNEGATIVE_FLOAT:
    CASES.append(Case(f"config-range-{_key}=-1e-3", ConfigError,
                      (lambda k: lambda tmp, env: (_config_call(**{k: -1e-3}), [f"'{k}'", ">= 0"]))(_key)))

for _key, _choices in config_mod._CHOICES.items():
    CASES.append(Case(f"config-choice-{_key}", ConfigError,
                      (lambda k: lambda tmp, env: (_config_call(**{k: "nonsense"}), [f"'{k}'", "nonsense"]))(_key)))


@case("config-range-num_classes_per_set=1", ConfigError)
def _(tmp, env):
    return _config_call(num_classes_per_set=1), ["'num_classes_per_set'", ">= 2"]


@case("config-eval-steps-exceed-train-steps-per-step-bn", ConfigError)
def _(tmp, env):
    return (_config_call(number_of_evaluation_steps_per_iter=3),
            ["'number_of_evaluation_steps_per_iter'", "'number_of_training_steps_per_iter'"])


@case("config-split-two-fractions", ConfigError)
def _(tmp, env):
    return _config_call(train_val_test_split=[0.5, 0.5]), ["'train_val_test_split'"]


@case("config-split-negative", ConfigError)
def _(tmp, env):
    return _config_call(train_val_test_split=[0.9, -0.1, 0.2]), ["'train_val_test_split'", "-0.1"]


@case("config-int-not-whole", ConfigError)
def _(tmp, env):
    return _config_call(batch_size=2.5), ["'batch_size'", "2.5"]


@case("config-bool-for-int", ConfigError)
def _(tmp, env):
    return _config_call(cnn_num_filters=True), ["'cnn_num_filters'"]


@case("config-file-missing", ConfigError)
def _(tmp, env):
    path = tmp / "nope.json"
    return (lambda: load_args(str(path))), [str(path), "not found"]


@case("config-file-not-json", ConfigError)
def _(tmp, env):
    path = tmp / "broken.json"
    path.write_text('{"batch_size": 2,')
    return (lambda: load_args(str(path))), [str(path), "not valid JSON"]


@case("config-file-not-an-object", ConfigError)
def _(tmp, env):
    path = tmp / "list.json"
    path.write_text("[1, 2, 3]")
    return (lambda: load_args(str(path))), [str(path), "JSON object"]


@case("config-args-of-wrong-kind", ConfigError)
def _(tmp, env):
    return (lambda: load_args(42)), ["args must be", "int"]


@case("trainer-no-experiment-name", ConfigError)
def _(tmp, env):
    args = load_args(dict(BASE, experiment_name=None, experiment_dir=str(tmp / "exp")), warn_unknown=False)
    return (lambda: ExperimentBuilder(args, MetaLearningSystemDataLoader, env.model(), "cpu", progress=False,
                                      log=lambda m: None)), ["'experiment_name'"]


@case("trainer-fewer-evaluation-tasks-than-batch", ConfigError)
def _(tmp, env):
    args = load_args(dict(BASE, num_evaluation_tasks=1, experiment_dir=str(tmp / "exp")), warn_unknown=False)
    return (lambda: ExperimentBuilder(args, MetaLearningSystemDataLoader, env.model(), "cpu", progress=False,
                                      log=lambda m: None)), ["'num_evaluation_tasks'", "'batch_size'"]


@case("trainer-continue-from-epoch-garbage", ConfigError)
def _(tmp, env):
    args = load_args(dict(BASE, continue_from_epoch="yesterday", experiment_dir=str(tmp / "exp")),
                     warn_unknown=False)
    return (lambda: ExperimentBuilder(args, MetaLearningSystemDataLoader, env.model(), "cpu", progress=False,
                                      log=lambda m: None)), ["'continue_from_epoch'", "yesterday"]


# -------------------------------------------------------------------------------------------- batches
B, N, K, T, C, H, W = 2, 3, 1, 1, 1, 14, 14


def _batch(**kw):
    rng = np.random.RandomState(0)
    xs = rng.rand(B, N, K, C, H, W).astype(np.float32) + 0.5
    xt = rng.rand(B, N, T, C, H, W).astype(np.float32) + 0.5
    ys = np.tile(np.arange(N)[None, :, None], (B, 1, K))
    yt = np.tile(np.arange(N)[None, :, None], (B, 1, T))
    d = dict(xs=xs, xt=xt, ys=ys, yt=yt)
    d.update(kw)
    return (d["xs"], d["xt"], d["ys"], d["yt"])


def _coerce(batch):
    return lambda: coerce_batch(batch, torch.device("cpu"), torch.float64, (B, C, H, W), N)


_rng = np.random.RandomState(1)
BATCH_CASES = [
    ("batch-not-a-tuple", lambda: "x", ["x_support, x_target, y_support, y_target"]),
    ("batch-three-parts", lambda: _batch()[:3], ["x_support, x_target, y_support, y_target"]),
    ("batch-support-5d", lambda: _batch(xs=_rng.rand(B, N, K, H, W) + 0.5), ["x_support", "6-d"]),
    ("batch-target-5d", lambda: _batch(xt=_rng.rand(B, N, T, H, W) + 0.5), ["x_target", "6-d"]),
    ("batch-target-B-differs", lambda: _batch(xt=_rng.rand(B + 1, N, T, C, H, W) + 0.5), ["x_target", "(B, N)"]),
    ("batch-target-N-differs", lambda: _batch(xt=_rng.rand(B, N + 1, T, C, H, W) + 0.5), ["x_target", "(B, N)"]),
    ("batch-support-target-sizes-differ", lambda: _batch(xt=_rng.rand(B, N, T, C, H + 2, W) + 0.5),
     ["support images", "target images"]),
    ("batch-image-size-wrong-for-model",
     lambda: _batch(xs=_rng.rand(B, N, K, C, 28, 28) + 0.5, xt=_rng.rand(B, N, T, C, 28, 28) + 0.5),
     ["(1, 28, 28)", "(1, 14, 14)", "model"]),
    ("batch-channel-count-wrong-for-model",
     lambda: _batch(xs=_rng.rand(B, N, K, 3, H, W) + 0.5, xt=_rng.rand(B, N, T, 3, H, W) + 0.5),
     ["(3, 14, 14)", "(1, 14, 14)"]),
    ("batch-N-differs-from-model",
     lambda: _batch(xs=_rng.rand(B, N + 1, K, C, H, W) + 0.5, xt=_rng.rand(B, N + 1, T, C, H, W) + 0.5,
                    ys=np.zeros((B, N + 1, K), np.int64) + 1, yt=np.zeros((B, N + 1, T), np.int64) + 1),
     ["N=4", "3 outputs"]),
    ("batch-y_support-K-differs", lambda: _batch(ys=np.ones((B, N, K + 1), np.int64)), ["y_support", "(B,N,K)"]),
    ("batch-y_target-T-differs", lambda: _batch(yt=np.ones((B, N, T + 2), np.int64)), ["y_target", "(B,N,T)"]),
    ("batch-y_support-label-too-large", lambda: _batch(ys=np.full((B, N, K), N, np.int64)),
     ["y_support", "outside [0, 3)", "max 3"]),
    ("batch-y_target-label-negative", lambda: _batch(yt=np.full((B, N, T), -1, np.int64)),
     ["y_target", "outside [0, 3)", "min -1"]),
    ("batch-y_support-non-integer", lambda: _batch(ys=np.full((B, N, K), 0.5, np.float32)),
     ["y_support", "non-integer"]),
    ("batch-y_target-nan", lambda: _batch(yt=np.full((B, N, T), np.nan, np.float32)), ["y_target", "non-integer"]),
    ("batch-y_support-bool", lambda: _batch(ys=np.ones((B, N, K), bool)), ["y_support", "torch.bool"]),
    ("batch-y_target-strings", lambda: _batch(yt=np.full((B, N, T), "a")), ["y_target", "cannot be converted"]),
    ("batch-images-bool", lambda: _batch(xs=np.ones((B, N, K, C, H, W), bool), xt=np.ones((B, N, T, C, H, W), bool)),
     ["images must be numeric", "torch.bool"]),
]
for _id, _make_batch, _names in BATCH_CASES:
    CASES.append(Case(_id, BatchError, (lambda mb, names: lambda tmp, env: (_coerce(mb()), names))(_make_batch, _names)))


@case("learner-train-iter-label-out-of-range", BatchError)
def _(tmp, env):
    model = env.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch(yt=np.full((B, N, T), 7, np.int64))

    def after():
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a rejected batch"
    return (lambda: model.run_train_iter(batch, 0)), ["y_target", "max 7"], after


@case("learner-validation-iter-wrong-image-size", BatchError)
def _(tmp, env):
    batch = _batch(xs=_rng.rand(B, N, K, C, 20, 20) + 0.5, xt=_rng.rand(B, N, T, C, 20, 20) + 0.5)
    return (lambda: env.model().run_validation_iter(batch)), ["(1, 20, 20)", "(1, 14, 14)"]


# -------------------------------------------------------------------------------------------- datasets
def _stroke_image(rng, size=32) -> Image.Image:
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    pts = [tuple(int(v) for v in rng.randint(3, size - 3, 2)) for _ in range(3)]
    draw.line(pts, fill=0, width=3)
    return img


def _omniglot(root: Path, alphabets=2, chars=3, images=3) -> Path:
    rng = np.random.RandomState(0)
    for a in range(alphabets):
        for c in range(chars):
            d = root / "images_background" / f"Alphabet_{a}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for i in range(images):
                _stroke_image(rng).save(d / f"{a}{c}_{i}.png")
    return root


def _imagenet(root: Path, classes=(2, 2, 2), images=3) -> Path:
    rng = np.random.RandomState(0)
    for s, n in zip(("train", "val", "test"), classes):
        for c in range(n):
            d = root / s / f"n{s}{c}"
            d.mkdir(parents=True)
            for i in range(images):
                Image.fromarray(rng.randint(1, 256, (10, 10, 3), dtype=np.uint8), "RGB").save(d / f"{i}.jpg")
    return root


def _bytes_snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _data_args(**kw):
    base = dict(BASE, dataset_name="omniglot_dataset", num_classes_per_set=2, num_target_samples=1,
                image_height=14, image_width=14, train_val_test_split=[0.34, 0.33, 0.33],
                indexes_of_folders_indicating_class=[-3, -2], num_evaluation_tasks=2, load_into_memory=True)
    base.update(kw)
    return load_args(base, warn_unknown=False)


def _loader_call(root: Path, **kw):
    """(call, after): the loader on `root` must fail and leave the folder byte-identical."""
    before = _bytes_snapshot(root) if root.exists() else None
    existed = root.exists()

    def after():
        assert root.exists() == existed, f"{root} was created or deleted"
        if before is not None:
            assert _bytes_snapshot(root) == before, f"{root} was modified by a failed load"
    return (lambda: MetaLearningSystemDataLoader(_data_args(**kw), data_dir=str(root))), after


@case("data-missing-dataset-folder", DatasetError)
def _(tmp, env):
    root = tmp / "no_such_dataset"
    call, after = _loader_call(root)
    return call, [str(root), "not found"], after


@case("data-folder-without-images", DatasetError)
def _(tmp, env):
    root = tmp / "empty"
    (root / "Alphabet_0" / "character01").mkdir(parents=True)  # an empty class folder
    (root / "readme.txt").write_text("no images here")
    call, after = _loader_call(root)
    return call, [str(root), "no images"], after


@case("data-empty-class-folders-too-few-classes", DatasetError)
def _(tmp, env):
    root = _omniglot(tmp / "omni", alphabets=1, chars=2)
    for c in (3, 4, 5):  # empty class folders do not count as classes
        (root / "images_background" / "Alphabet_0" / f"character{c:02d}").mkdir()
    call, after = _loader_call(root)
    return call, [str(root), "num_classes_per_set = 2"], after


@case("data-class-with-too-few-images", DatasetError)
def _(tmp, env):
    root = _omniglot(tmp / "omni", images=2)
    victim = root / "images_background" / "Alphabet_1" / "character02"
    sorted(victim.glob("*.png"))[0].unlink()
    call, after = _loader_call(root)
    return call, [str(victim), "fewer than"], after


@case("data-pre-split-set-folder-missing", DatasetError)
def _(tmp, env):
    root = _imagenet(tmp / "mini")
    shutil.rmtree(root / "test")
    call, after = _loader_call(root, dataset_name="mini_imagenet_full_size", sets_are_pre_split=True,
                               image_channels=3, indexes_of_folders_indicating_class=[-3, -2])
    return call, [str(root), "'test'"], after


for _lim in (True, False):
    CASES.append(Case(f"data-corrupt-png-load_into_memory={_lim}", DatasetError, (lambda lim: lambda tmp, env: (
        lambda root, bad: (lambda ca: (ca[0], [str(bad), "cannot read image"], ca[1]))(
            _loader_call(root, load_into_memory=lim)))(
        *(lambda root: (root, _corrupt(root)))(_omniglot(tmp / "omni"))))(_lim)))


def _corrupt(root: Path) -> Path:
    bad = root / "images_background" / "Alphabet_0" / "character01" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)  # a PNG header, then nonsense
    return bad


@case("data-image-wrong-mode-for-omniglot", DatasetError)
def _(tmp, env):
    root = _omniglot(tmp / "omni")
    bad = root / "images_background" / "Alphabet_1" / "character01" / "zz_colour.png"
    Image.new("RGB", (32, 32), (250, 10, 10)).save(bad)
    call, after = _loader_call(root)
    return call, [str(bad), "mode 'RGB'"], after


@case("data-omniglot-with-3-channels", DatasetError)
def _(tmp, env):
    call, after = _loader_call(_omniglot(tmp / "omni"), image_channels=3)
    return call, ["image_channels=3"], after


@case("data-imagenet-with-1-channel", DatasetError)
def _(tmp, env):
    call, after = _loader_call(_imagenet(tmp / "mini"), dataset_name="mini_imagenet_full_size",
                               sets_are_pre_split=True, image_channels=1)
    return call, ["image_channels=3", "got 1"], after


@case("data-broken-zip", DatasetError)
def _(tmp, env):
    root = tmp / "zipped"
    root.mkdir()
    bad = root / "images_background.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    call, after = _loader_call(root)
    return call, [str(bad), "cannot read zip"], after


@case("data-labels-as-int-non-integer-label", DatasetError)
def _(tmp, env):
    call, after = _loader_call(_omniglot(tmp / "omni"), labels_as_int=True)
    return call, ["labels_as_int", "not an integer"], after


@case("data-class-index-beyond-path-depth", DatasetError)
def _(tmp, env):
    call, after = _loader_call(_omniglot(tmp / "omni"), indexes_of_folders_indicating_class=[-30, -2])
    return call, ["too few folders", "indexes_of_folders_indicating_class"], after


@case("data-synthetic-n-way-beyond-pool", DatasetError)
def _(tmp, env):
    args = load_args(dict(BASE, num_classes_per_set=15), warn_unknown=False)
    return (lambda: MetaLearningSystemDataLoader(args)), ["num_classes_per_set = 15"]


# ----------------------------------------------------------------------------------------- checkpoints
def _good_checkpoint(env, path: Path) -> Path:
    env.model().save_model(str(path), {"current_iter": 0})
    return path


@case("checkpoint-missing-file", CheckpointError)
def _(tmp, env):
    path = tmp / "train_model_9"
    return (lambda: load_checkpoint(path)), [str(path), "not found"]


@case("checkpoint-truncated", CheckpointError)
def _(tmp, env):
    path = _good_checkpoint(env, tmp / "train_model_1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return (lambda: load_checkpoint(path)), [str(path), "truncated or corrupt"]


@case("checkpoint-corrupt-bytes", CheckpointError)
def _(tmp, env):
    path = tmp / "train_model_1"
    path.write_bytes(bytes(range(1, 256)) * 4)
    return (lambda: load_checkpoint(path)), [str(path), "truncated or corrupt"]


@case("checkpoint-empty-file", CheckpointError)
def _(tmp, env):
    path = tmp / "train_model_1"
    path.write_bytes(b"")
    return (lambda: load_checkpoint(path)), [str(path)]


@case("checkpoint-not-a-maml-checkpoint", CheckpointError)
def _(tmp, env):
    path = tmp / "train_model_1"
    torch.save({"weights": torch.ones(3)}, path)
    return (lambda: load_checkpoint(path)), [str(path), "'network'"]


@case("checkpoint-wrong-shapes-for-model", CheckpointError)
def _(tmp, env):
    other = learner_class("fast")(im_shape=(2, 1, 14, 14), device="cpu",
                                  args=load_args(dict(BASE, cnn_num_filters=6), warn_unknown=False))
    other.save_model(str(tmp / "train_model_1"), {"current_iter": 0})
    path = tmp / "train_model_1"
    return (lambda: env.model().load_model(str(tmp), "train_model", 1)), [str(path), "does not fit"]


@case("checkpoint-resume-every-checkpoint-corrupt", CheckpointError)
def _(tmp, env):
    exp = env.experiment(tmp)
    for p in (exp / "saved_models").iterdir():
        p.write_bytes(b"\x80\x02 broken pickle")
    before = _bytes_snapshot(exp)

    def after():
        assert _bytes_snapshot(exp) == before
    def call():
        with pytest.warns(RuntimeWarning, match="truncated or corrupt"):  # one warning per file skipped
            env.builder(tmp)
    return call, [str(exp / "saved_models"), "no readable checkpoint"], after


# ------------------------------------------------------------------------------------------------ ops
def _bn(x=None, gamma=None, beta=None, num_tasks=2, eps=1e-5):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2 * 4, 5, 5, generator=g, dtype=torch.float64) + 0.5 if x is None else x
    gamma = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if gamma is None else gamma
    beta = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if beta is None else beta
    return lambda: per_step_batch_norm(x, gamma, beta, num_tasks, eps)


def _r(*shape, dtype=torch.float64):
    return torch.rand(*shape, dtype=dtype) + 0.5


OP_CASES = [
    ("op-bn-x-3d", ValueError, _bn(x=_r(3, 8, 5)), ["x must be 4-D", "(3, 8, 5)"]),
    ("op-bn-x-5d", ValueError, _bn(x=_r(1, 3, 8, 5, 5)), ["x must be 4-D"]),
    ("op-bn-x-not-tensor", TypeError, _bn(x=np.ones((3, 8, 5, 5))), ["x must be a torch.Tensor"]),
    ("op-bn-x-integer", ValueError, _bn(x=torch.ones(3, 8, 5, 5, dtype=torch.int64)), ["x must be a floating-point"]),
    ("op-bn-channels-not-divisible-by-tasks", ValueError, _bn(num_tasks=3), ["x.shape[1] = 8", "num_tasks = 3"]),
    ("op-bn-num-tasks-zero", ValueError, _bn(num_tasks=0), ["num_tasks must be a positive int"]),
    ("op-bn-num-tasks-float", ValueError, _bn(num_tasks=2.0), ["num_tasks must be a positive int"]),
    ("op-bn-gamma-shape", ValueError, _bn(gamma=_r(5)), ["gamma must have shape (4,) or (2, 4)", "(5,)"]),
    ("op-bn-gamma-per-task-shape", ValueError, _bn(gamma=_r(3, 4)), ["gamma must have shape", "(3, 4)"]),
    ("op-bn-beta-shape", ValueError, _bn(beta=_r(8)), ["beta must have shape", "(8,)"]),
    ("op-bn-gamma-not-tensor", TypeError, _bn(gamma=[1.0] * 4), ["gamma must be a torch.Tensor"]),
    ("op-bn-gamma-beta-dtypes-differ", ValueError, _bn(beta=_r(4, dtype=torch.float32)), ["gamma and beta", "dtype"]),
    ("op-bn-dtype-mismatch-with-x", ValueError,
     _bn(gamma=_r(4, dtype=torch.float32), beta=_r(4, dtype=torch.float32)), ["dtype mismatch", "torch.float64"]),
    ("op-bn-eps-negative", ValueError, _bn(eps=-1e-5), ["eps must be", "-1e-05"]),
    ("op-bn-empty-x", ValueError, _bn(x=torch.ones(0, 8, 5, 5, dtype=torch.float64) + 1), ["at least one element"]),
    ("op-lslr-not-lists", TypeError, lambda: lslr_update(_r(2, 3), [_r(2, 3)], [_r(3)], 0), ["thetas must be a list"]),
    ("op-lslr-element-not-tensor", TypeError, lambda: lslr_update([_r(3)], [np.ones((2, 3))], [_r(3)], 0),
     ["grads[0] must be a torch.Tensor"]),
    ("op-lslr-lengths-differ", ValueError, lambda: lslr_update([_r(3), _r(3)], [_r(2, 3)], [_r(3)], 0),
     ["same length", "2, 1 and 1"]),
    ("op-lslr-step-not-int", ValueError, lambda: lslr_update([_r(3)], [_r(2, 3)], [_r(3)], 0.5),
     ["step must be an int", "0.5"]),
    ("op-lslr-step-out-of-range", ValueError, lambda: lslr_update([_r(3)], [_r(2, 3)], [_r(3)], 3),
     ["step = 3", "alphas[0]", "3 entries"]),
    ("op-lslr-alpha-2d", ValueError, lambda: lslr_update([_r(3)], [_r(2, 3)], [_r(3, 1)], 0),
     ["alphas[0] must be a vector", "(3, 1)"]),
    ("op-lslr-grad-0d", ValueError, lambda: lslr_update([_r(())], [torch.tensor(0.7, dtype=torch.float64)], [_r(3)], 0),
     ["grads[0]", "0-d"]),
    ("op-lslr-task-counts-differ", ValueError,
     lambda: lslr_update([_r(3), _r(4)], [_r(2, 3), _r(5, 4)], [_r(3), _r(3)], 0), ["grads[1] has 5 tasks", "grads[0] has 2"]),
    ("op-lslr-theta-shape", ValueError, lambda: lslr_update([_r(4)], [_r(2, 3)], [_r(3)], 0),
     ["thetas[0] must have shape (2, 3)", "(3,)", "got (4,)"]),
    ("op-lslr-dtype-mismatch", ValueError,
     lambda: lslr_update([_r(3, dtype=torch.float32)], [_r(2, 3)], [_r(3)], 0), ["dtype mismatch at index 0"]),
]
for _id, _exc, _call, _names in OP_CASES:
    CASES.append(Case(_id, _exc, (lambda c, n: lambda tmp, env: (c, n))(_call, _names)))


# ------------------------------------------------------------------------- nothing written is lost
def _refused_run(tmp, env, names, _name_folder=True, **cfg):
    """A builder on an existing experiment that must refuse; the folder stays byte-identical."""
    exp = env.experiment(tmp)
    before = _bytes_snapshot(exp)

    def after():
        assert _bytes_snapshot(exp) == before, "a refused run changed the experiment folder"
    return (lambda: env.builder(tmp, **cfg)), ([str(exp)] if _name_folder else []) + names, after


@case("experiment-from-scratch-over-existing-outputs", ExperimentError)
def _(tmp, env):
    return _refused_run(tmp, env, ["already holds outputs", "--overwrite"], continue_from_epoch="from_scratch")


@case("experiment-resume-with-other-model-shape", ExperimentError)
def _(tmp, env):
    return _refused_run(tmp, env, ["cnn_num_filters", "does not match"], cnn_num_filters=6)


@case("experiment-continue-from-earlier-epoch-would-replace-later", ExperimentError)
def _(tmp, env):
    return _refused_run(tmp, env, ["train_model_2", "--overwrite"], continue_from_epoch=1)


@case("experiment-test-only-without-checkpoints", ExperimentError)
def _(tmp, env):
    exp_dir = tmp / "fresh"
    args = load_args(dict(BASE, experiment_dir=str(exp_dir), evaluate_on_test_set_only=True), warn_unknown=False)
    return (lambda: ExperimentBuilder(args, MetaLearningSystemDataLoader, env.model(), "cpu", progress=False,
                                      log=lambda m: None)), ["no checkpoints to test", str(exp_dir / "bad")]


@case("experiment-overwrite-with-test-only", ExperimentError)
def _(tmp, env):
    return _refused_run(tmp, env, ["--overwrite", "testing only"], evaluate_on_test_set_only=True,
                        _overwrite=True, _name_folder=False)


# ------------------------------------------------------------------------------------------ fixtures
class Env:
    """Lazily built shared pieces: one tiny learner, one 2-epoch experiment (copied per case)."""

    def __init__(self, factory):
        self._factory = factory
        self._model = None
        self._experiment = None

    def model(self):
        if self._model is None:
            self._model = learner_class("fast")(im_shape=(2, 1, 14, 14), device="cpu",
                                                args=load_args(BASE, warn_unknown=False))
        return self._model

    def builder(self, tmp, _overwrite=False, **cfg):
        args = load_args(dict(BASE, experiment_dir=str(tmp / "exp"), **cfg), warn_unknown=False)
        model = learner_class("fast")(im_shape=(2, 1, 14, 14), device="cpu", args=args)
        return ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=False,
                                 log=lambda m: None, overwrite=_overwrite)

    def experiment(self, tmp) -> Path:
        """A copy of a finished 2-epoch experiment at tmp/exp/bad."""
        if self._experiment is None:
            src = self._factory.mktemp("trained")
            b = self.builder(src)
            b.run_experiment()
            self._experiment = src / "exp"
        shutil.copytree(self._experiment, tmp / "exp")
        return tmp / "exp" / "bad"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_naming_its_cause(c: Case, tmp_path, env):
    made = c.make(tmp_path, env)
    call, names = made[0], made[1]
    with pytest.raises(c.exc) as err:
        call()
    msg = str(err.value)
    for name in names:
        assert name in msg, f"{c.id}: message does not name {name!r}: {msg}"
    if len(made) > 2:
        made[2]()


def test_case_ids_unique_and_count_is_what_was_reported():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= EXPECTED_MIN_CASES, len(CASES)
