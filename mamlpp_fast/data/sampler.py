"""Task sampling with the authors' random-number sequence, and the data loader they expose.

How the original (data.py, FewShotLearningDatasetParallel + MetaLearningSystemDataLoader) draws tasks,
and how this module maps it:

Seeds. The configured `train_seed` / `val_seed` are not used directly: each becomes
`RandomState(seed).randint(1, 999999)` (`derive_seed`). The test set uses the seed derived from
`val_seed` too (the original's `init_seed['test'] = args.val_seed`; `args.test_seed` is computed but
never read), so test task i and validation task i share a seed but draw from different class pools.

Class split (sets not pre-split). Labels are sorted; an index array `np.arange(n, dtype=int32)` is
shuffled with `RandomState(derived val seed)`; the first `int(split[0] * n)` shuffled classes are the
training classes, up to `int(sum(split[:2]) * n)` the validation classes, the rest the test classes.
The order of the classes inside a split is that shuffled order, and it matters: task sampling picks
class *positions* in this list. With pre-split sets ({train,val,test}/<class>/...), the first label
part is the set name, and classes stay in sorted order.

Rotations are not extra classes: Omniglot's 4 rotations are applied on the fly, per class of a training
task, so the class pools hold the characters only (1623 for full Omniglot: 1150/50/423 with the
shipped split; 242 for the two "small" zips: 171/8/63, too few validation classes for 20-way).

Task i of a set (`draw_task`): `rng = RandomState(set_seed + i)`; `rng.choice(n_classes, N,
replace=False)`; `rng.shuffle(classes)`; `k = rng.randint(0, 4, size=N)` (drawn for every set, used
only to rotate Omniglot training images); then per class, in task order,
`rng.choice(n_images_of_class, K + T, replace=False)`: the first K are the support images, the rest the
target images. Label i is the i-th class of the task (class-major order). `rng.choice` over the
original's list of string keys consumes exactly the same random numbers as over the class count, so
the drawn positions are identical.

Streams. Training task seeds run on: the loader keeps `total_train_iters_produced` (in tasks), which
`continue_from_iter(it)` advances by `it * batch` tasks, as the original, so a run resumed at iteration
`it` draws the tasks an uninterrupted run draws from iteration `it` on. Validation and test batches
always restart at task 0 of their seed: the same fixed task list at every evaluation.
One deliberate difference: the original advances the training counter by a single batch per call of
`get_train_batches`, whatever the number of batches the call yields (harmless in its trainer, which
calls it once for the whole run; a second call would repeat almost all tasks shifted by one batch).
Here the counter advances by the batches actually yielded, which is identical for the original's
single-call use and gives fresh tasks when training is split over several calls.
"""
from __future__ import annotations

import argparse
import logging
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .readers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecoder,
    find_images,
    group_by_class,
    resolve_dataset_path,
)
from .synthetic import SyntheticFewShotData

__all__ = [
    "MetaLearningSystemDataLoader",
    "FewShotTaskSampler",
    "derive_seed",
    "draw_task",
    "rotate_classes",
    "split_class_labels",
]

log = logging.getLogger(__name__)

SET_NAMES = ("train", "val", "test")

# The original's defaults (utils/parser_utils.py and the keys every shipped config sets), used for any
# key missing from `args`; mamlpp_fast.config.DEFAULTS holds the same values.
_DEFAULTS = {
    "dataset_name": "omniglot_dataset",
    "dataset_path": "datasets/omniglot_dataset",
    "dataset_dir": None,
    "batch_size": 32,
    "num_of_gpus": 1,
    "samples_per_iter": 1,
    "num_classes_per_set": 20,
    "num_samples_per_class": 1,
    "num_target_samples": 15,
    "image_height": 28,
    "image_width": 28,
    "image_channels": 1,
    "reverse_channels": False,
    "labels_as_int": False,
    "indexes_of_folders_indicating_class": [-2, -3],
    "train_val_test_split": [0.73982737361, 0.26, 0.13008631319],
    "sets_are_pre_split": False,
    "load_into_memory": True,
    "train_seed": 0,
    "val_seed": 0,
    # Our keys for the synthetic dataset.
    "synthetic_seed": 0,
    "synthetic_num_classes": [1000, 200, 200],
    "synthetic_images_per_class": 20,
}


def _opt(args, key):
    """args.key, or the original's default when the key is missing or None."""
    if isinstance(args, dict):
        value = args.get(key)
    else:
        value = getattr(args, key, None)
    return _DEFAULTS[key] if value is None else value


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def _as_list(value) -> list:
    if isinstance(value, str):
        value = value.replace(",", " ").replace("[", " ").replace("]", " ").split()
    return list(value)


def derive_seed(seed) -> int:
    """The original's seed transform: `RandomState(seed).randint(1, 999999)`."""
    return int(np.random.RandomState(int(seed)).randint(1, 999999))


def split_class_labels(labels: Sequence, train_val_test_split: Sequence[float], seed: int,
                       sets_are_pre_split: bool = False, root=None) -> dict:
    """Assign class labels to the train/val/test splits exactly as the original's `load_dataset`.

    `labels` must be in sorted order (the original's class index order). Returns
    {"train": [...], "val": [...], "test": [...]} lists of labels, in the order task sampling uses.
    Not pre-split: shuffle `np.arange(n, dtype=np.int32)` with RandomState(seed) and cut at
    `int(split[0] * n)` and `int(np.sum(split[:2]) * n)`. Pre-split: the first "/" part of a label is
    its set name.
    """
    labels = list(labels)
    if sets_are_pre_split:
        out: dict = {}
        for label in labels:
            bits = str(label).split("/")
            if len(bits) < 2:
                raise DatasetError(
                    f"sets_are_pre_split is set but the label {label!r} (under {root}) has no set part; "
                    f"indexes_of_folders_indicating_class must select <set>/<class> folders")
            out.setdefault(bits[0], []).append(label)
        missing = [s for s in SET_NAMES if s not in out]
        if missing:
            raise DatasetError(
                f"sets_are_pre_split is set but {root} has no {', '.join(repr(m) for m in missing)} set "
                f"(set names found: {sorted(out)[:10]}); expected {{train,val,test}}/<class>/<image> folders")
        return {s: out[s] for s in SET_NAMES}
    split = [float(v) for v in _as_list(train_val_test_split)]
    if len(split) < 2:
        raise DatasetError(f"train_val_test_split must have 3 fractions, got {split}")
    n = len(labels)
    order = np.arange(n, dtype=np.int32)
    np.random.RandomState(seed=seed).shuffle(order)
    shuffled = [labels[i] for i in order]
    train_end = int(split[0] * n)
    val_end = int(np.sum(split[:2]) * n)
    return {"train": shuffled[:train_end], "val": shuffled[train_end:val_end], "test": shuffled[val_end:n]}


def draw_task(seed: int, class_counts, num_classes: int, num_samples: int,
              rng: Optional[np.random.RandomState] = None):
    """Draw one task with the original's `get_set` random-number sequence.

    Returns (classes (N,) positions in the split's class list, rotations (N,) in 0..3, samples (N, S)
    image indexes within each class, first K support then T target). `class_counts[c]` is the number of
    images of class position c.

    `rng`, when given, is re-seeded with `rng.seed(seed)`, which puts it in exactly the state of a new
    `RandomState(seed)` about 100 times faster (a new RandomState first gathers OS entropy).
    Per class, `rng.permutation(n)[:S]` is what legacy `rng.choice(n, S, replace=False)` computes
    (same random numbers), without choice's argument checks.
    """
    if rng is None:
        rng = np.random.RandomState(seed)
    else:
        rng.seed(seed)
    classes = rng.choice(len(class_counts), size=num_classes, replace=False)
    rng.shuffle(classes)
    rotations = rng.randint(0, 4, size=num_classes)
    samples = np.empty((num_classes, num_samples), dtype=np.int64)
    for i, c in enumerate(classes):
        n = int(class_counts[c])
        if n < num_samples:
            raise DatasetError(f"class position {c} has {n} images, fewer than the {num_samples} a task needs")
        samples[i] = rng.permutation(n)[:num_samples]
    return classes.astype(np.int64), rotations.astype(np.int64), samples


def rotate_classes(x: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Rotate every image of class n of task b by rotations[b, n] * 90 degrees (counter-clockwise).

    x: (B, N, S, C, H, W); rotations: (B, N). Same as the original's `np.rot90(image, k)` on (H, W, C)
    images, here on the (H, W) axes of (C, H, W) images. Odd k needs square images.
    """
    rotations = np.asarray(rotations)
    if not rotations.any():
        return x
    if x.shape[-1] != x.shape[-2] and (rotations % 2 == 1).any():
        raise ValueError(f"rotation by 90 degrees needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    out = x.copy()
    for k in (1, 2, 3):
        mask = rotations == k
        if mask.any():
            out[mask] = np.rot90(x[mask], k, axes=(-2, -1))
    return out


class _ImageSplit:
    """Classes of one split, images held in memory as one shared uint8 array (M, C, H, W)."""

    def __init__(self, name, labels, images, offsets, counts, paths):
        self.name, self.class_names = name, list(labels)
        self.images = images
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.paths = paths  # label -> folder of its images (for messages)

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def gather(self, classes, samples):
        return self.images[self.offsets[classes][..., None] + samples]


class _LazyImageSplit:
    """Classes of one split, images decoded from disk when a task needs them (load_into_memory false)."""

    def __init__(self, name, labels, refs_per_class, decoder: ImageDecoder, paths):
        self.name, self.class_names = name, list(labels)
        self.refs = refs_per_class
        self.decoder = decoder
        self.counts = np.array([len(r) for r in refs_per_class], dtype=np.int64)
        self.paths = paths

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def gather(self, classes, samples):
        classes = np.asarray(classes)
        samples = np.asarray(samples)
        d = self.decoder
        out = np.empty(samples.shape + (d.channels, d.height, d.width), dtype=np.uint8)
        for idx in np.ndindex(*samples.shape):
            out[idx] = d.decode(self.refs[classes[idx[:-1]]][samples[idx]])
        return out


class FewShotTaskSampler:
    """The dataset of the loader: class splits, images, and task drawing for every set.

    Mirrors the original's FewShotLearningDatasetParallel where the trainer may look: `dataset_name`,
    `init_seed` and `seed` (dicts by set name, derived seeds), `data_length` (images per split),
    `dataset_size_dict`-like `class_counts(set_name)`. `get_batch(set_name, seeds, augment_images)`
    builds the tasks of the given seeds. `args` is never modified (the original overwrites its seeds).
    """

    def __init__(self, args, data_dir=None, num_workers: Optional[int] = None):
        if isinstance(args, dict):
            args = argparse.Namespace(**args)
        self.args = args
        self.dataset_name = str(_opt(args, "dataset_name"))
        name = self.dataset_name.lower()
        self.num_classes_per_set = int(_opt(args, "num_classes_per_set"))
        self.num_samples_per_class = int(_opt(args, "num_samples_per_class"))
        self.num_target_samples = int(_opt(args, "num_target_samples"))
        self.image_height = int(_opt(args, "image_height"))
        self.image_width = int(_opt(args, "image_width"))
        self.image_channels = int(_opt(args, "image_channels"))
        if min(self.num_classes_per_set, self.num_samples_per_class, self.image_height, self.image_width,
               self.image_channels) < 1 or self.num_target_samples < 0:
            raise ValueError("num_classes_per_set, num_samples_per_class, image sizes must be positive and "
                             "num_target_samples non-negative")
        self.reverse_channels = _as_bool(_opt(args, "reverse_channels"))
        val_seed = derive_seed(_opt(args, "val_seed"))
        self.init_seed = {"train": derive_seed(_opt(args, "train_seed")), "val": val_seed, "test": val_seed}
        self.seed = dict(self.init_seed)
        self._rng = np.random.RandomState(0)  # re-seeded per task (see draw_task)
        # Omniglot training tasks rotate each class by k*90 degrees when augmenting (the original's
        # transform_train for 'omniglot'); other datasets have no rotation.
        self.rotate_when_augmenting = "omniglot" in name
        self.normalise_imagenet = "imagenet" in name
        self.dataset_path = None
        samples_needed = self.num_samples_per_class + self.num_target_samples

        if "synthetic" in name:
            self.kind = "synthetic"
            pools = [int(v) for v in _as_list(_opt(args, "synthetic_num_classes"))]
            per_class = max(int(_opt(args, "synthetic_images_per_class")), samples_needed)
            self._synthetic = SyntheticFewShotData(
                num_classes=pools, images_per_class=per_class, channels=self.image_channels,
                height=self.image_height, width=self.image_width, seed=int(_opt(args, "synthetic_seed")))
            self.splits = dict(self._synthetic.splits)
            where = "the synthetic dataset"
        else:
            self.kind = "omniglot" if "omniglot" in name else "rgb"
            if self.normalise_imagenet and self.image_channels != 3:
                raise DatasetError(f"ImageNet normalisation needs image_channels=3, got {self.image_channels}")
            root = resolve_dataset_path(_opt(args, "dataset_path"), data_dir=data_dir,
                                        dataset_dir=_opt(args, "dataset_dir"))
            self.dataset_path = root
            where = str(root)
            indexes = [int(i) for i in _as_list(_opt(args, "indexes_of_folders_indicating_class"))]
            labels_as_int = _as_bool(_opt(args, "labels_as_int"))
            classes = group_by_class(find_images(root), indexes, labels_as_int)
            pre_split = _as_bool(_opt(args, "sets_are_pre_split"))
            split_labels = split_class_labels(list(classes), _opt(args, "train_val_test_split"),
                                              self.init_seed["val"], pre_split, root)
            paths = {label: refs[0].path.rsplit("/", 1)[0] for label, refs in classes.items()}
            for set_name in SET_NAMES:  # fail fast, before decoding anything
                for label in split_labels[set_name]:
                    if len(classes[label]) < samples_needed:
                        raise DatasetError(
                            f"class {label!r} of the {set_name} split has {len(classes[label])} images in "
                            f"{paths[label]}, fewer than num_samples_per_class + num_target_samples = "
                            f"{samples_needed}")
            self._check_class_counts({s: len(v) for s, v in split_labels.items()}, where, pre_split)
            decoder = ImageDecoder(self.kind, self.image_height, self.image_width, self.image_channels)
            self._decoder = decoder
            if _as_bool(_opt(args, "load_into_memory")):
                ordered = [label for s in SET_NAMES for label in split_labels[s]]
                refs = [ref for label in ordered for ref in classes[label]]
                counts = np.array([len(classes[label]) for label in ordered], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
                log.info("decoding %d images of %d classes from %s", len(refs), len(ordered), root)
                images = decoder.decode_many(refs, num_workers or 0)
                decoder.close()
                position = {label: i for i, label in enumerate(ordered)}
                self.splits = {}
                for s in SET_NAMES:
                    pos = [position[label] for label in split_labels[s]]
                    self.splits[s] = _ImageSplit(s, split_labels[s], images, offsets[pos], counts[pos], paths)
            else:
                self.splits = {}
                for s in SET_NAMES:
                    refs_per_class = [classes[label] for label in split_labels[s]]
                    for refs in refs_per_class:
                        for ref in refs:
                            decoder.check(ref)
                    self.splits[s] = _LazyImageSplit(s, split_labels[s], refs_per_class, decoder, paths)
        self._check_class_counts({s: len(self.splits[s].class_names) for s in SET_NAMES}, where,
                                 self.kind != "synthetic" and _as_bool(_opt(args, "sets_are_pre_split")))
        self.data_length = {s: self.splits[s].num_images for s in SET_NAMES}
        self._lut = self._make_lut() if self.kind == "rgb" else None

    def after_fork(self) -> None:
        """Called in a data-loader worker process: image files are opened afresh there."""
        for split in self.splits.values():
            decoder = getattr(split, "decoder", None)
            if decoder is not None:
                decoder.after_fork()

    # -- checks and conversion -------------------------------------------------------------------
    def _check_class_counts(self, sizes: dict, where: str, pre_split: bool) -> None:
        for set_name in SET_NAMES:
            if sizes[set_name] < self.num_classes_per_set:
                how = ("its folder" if pre_split else
                       f"train_val_test_split={_opt(self.args, 'train_val_test_split')} of "
                       f"{sum(sizes.values())} classes")
                raise DatasetError(
                    f"the {set_name} split of {where} has {sizes[set_name]} classes ({how}), fewer than "
                    f"num_classes_per_set = {self.num_classes_per_set}; split sizes: {sizes}")

    def _make_lut(self) -> np.ndarray:
        """uint8 -> float32 table per channel: v/255, then (x - mean)/std for ImageNet, in float32.

        Same float32 operations as the original (np.float32 image / 255.0, then torchvision's
        Normalize: sub_(mean).div_(std) with float32 mean/std), so values are bit-identical.
        """
        v = np.arange(256, dtype=np.float32) / np.float32(255.0)
        lut = np.repeat(v[None], self.image_channels, axis=0)
        if self.normalise_imagenet:
            mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None]
            std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None]
            lut = (lut - mean) / std
        return lut.astype(np.float32)

    def _to_float(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "synthetic":
            return x
        if self.kind == "omniglot":
            return x.astype(np.float32)
        if self.reverse_channels:
            x = x[..., ::-1, :, :]
        channel = np.arange(self.image_channels)[:, None, None]
        return self._lut[channel, x]

    # -- tasks -------------------------------------------------------------------------------------
    def class_counts(self, set_name: str) -> np.ndarray:
        """Images per class of a split, in the split's class order."""
        return self.splits[set_name].counts

    def draw_tasks(self, set_name: str, seeds: Sequence[int]):
        """Class positions (B, N), rotations (B, N) and image indexes (B, N, K+T) of the given seeds."""
        counts = self.splits[set_name].counts
        N, S = self.num_classes_per_set, self.num_samples_per_class + self.num_target_samples
        B = len(seeds)
        classes = np.empty((B, N), dtype=np.int64)
        rotations = np.empty((B, N), dtype=np.int64)
        samples = np.empty((B, N, S), dtype=np.int64)
        for b, seed in enumerate(seeds):
            classes[b], rotations[b], samples[b] = draw_task(int(seed), counts, N, S, self._rng)
        return classes, rotations, samples

    def get_batch(self, set_name: str, seeds: Sequence[int], augment_images: bool = False):
        """The tasks of `seeds` as (x_support, x_target, y_support, y_target) numpy arrays.

        Shapes (B,N,K,C,H,W), (B,N,T,C,H,W) float32 and (B,N,K), (B,N,T) int64, label = class position
        in the task. With augment_images on an Omniglot dataset, class n of task b is rotated by
        rotations[b, n] * 90 degrees (the original's training augmentation).
        """
        if set_name not in self.splits:
            raise ValueError(f"unknown set {set_name!r}; expected one of {SET_NAMES}")
        classes, rotations, samples = self.draw_tasks(set_name, seeds)
        x = self.splits[set_name].gather(classes, samples)
        if augment_images and self.rotate_when_augmenting:
            x = rotate_classes(x, rotations)
        x = self._to_float(x)
        K = self.num_samples_per_class
        B, N, S = samples.shape
        y = np.broadcast_to(np.arange(N, dtype=np.int64)[None, :, None], (B, N, S))
        return (np.ascontiguousarray(x[:, :, :K]), np.ascontiguousarray(x[:, :, K:]),
                np.ascontiguousarray(y[:, :, :K]), np.ascontiguousarray(y[:, :, K:]))


class MetaLearningSystemDataLoader:
    """The data provider of the experiment loop, with the original's interface.

    `MetaLearningSystemDataLoader(args, current_iter=0, data_dir=None)`; `data_dir`, when given, is the
    dataset folder and overrides `args.dataset_path`. A batch holds
    `num_of_gpus * batch_size * samples_per_iter` tasks (= batch_size with the defaults), as the
    original's torch DataLoader batch.

    `get_*_batches(total_batches, augment_images)` yield `total_batches * batch_size // tasks_per_batch`
    batches (= total_batches by default); total_batches=-1 means, as the original, one task per image of
    the split.
    """

    def __init__(self, args, current_iter: int = 0, data_dir=None):
        if isinstance(args, dict):
            args = argparse.Namespace(**args)
        self.args = args
        self.num_of_gpus = int(_opt(args, "num_of_gpus"))
        self.batch_size = int(_opt(args, "batch_size"))
        self.samples_per_iter = int(_opt(args, "samples_per_iter"))
        self.tasks_per_batch = self.num_of_gpus * self.batch_size * self.samples_per_iter
        self.dataset = FewShotTaskSampler(args, data_dir=data_dir)
        self.dataset_name = self.dataset.dataset_name
        self.total_train_iters_produced = 0
        self.continue_from_iter(current_iter=current_iter)

    @property
    def im_shape(self) -> tuple:
        """(2, C, H, W), the shape the learner is built with (as the original's train_maml_system.py)."""
        d = self.dataset
        return (2, d.image_channels, d.image_height, d.image_width)

    def continue_from_iter(self, current_iter: int) -> None:
        """Move the training stream forward by `current_iter` meta-batches (the original's rule)."""
        self.total_train_iters_produced += int(current_iter) * self.tasks_per_batch

    def _num_batches(self, set_name: str, total_batches) -> int:
        total_batches = int(total_batches)
        if total_batches == -1:
            n_tasks = self.dataset.data_length[set_name]
        elif total_batches < 0:
            raise ValueError(f"total_batches must be -1 or >= 0, got {total_batches}")
        else:
            n_tasks = total_batches * self.batch_size
        return n_tasks // self.tasks_per_batch

    def get_batch(self, set_name: str, seeds: Sequence[int], augment_images: bool = False):
        """One batch of the tasks with the given (derived) seeds; see FewShotTaskSampler.get_batch."""
        return self.dataset.get_batch(set_name, seeds, augment_images)

    def get_train_batches(self, total_batches=-1, augment_images=False) -> Iterator[tuple]:
        """Training batches continuing the task stream (seed = derived train seed + task counter)."""
        n_batches = self._num_batches("train", total_batches)
        tpb = self.tasks_per_batch
        self.dataset.seed["train"] = self.dataset.init_seed["train"] + self.total_train_iters_produced
        for _ in range(n_batches):
            first = self.dataset.init_seed["train"] + self.total_train_iters_produced
            batch = self.dataset.get_batch("train", range(first, first + tpb), augment_images)
            self.total_train_iters_produced += tpb
            yield batch

    def _fixed_batches(self, set_name: str, total_batches, augment_images) -> Iterator[tuple]:
        n_batches = self._num_batches(set_name, total_batches)
        tpb = self.tasks_per_batch
        first = self.dataset.seed[set_name]
        for i in range(n_batches):
            start = first + i * tpb
            yield self.dataset.get_batch(set_name, range(start, start + tpb), augment_images)

    def batch_loader(self, set_name: str, total_batches=-1, augment_images=False, tasks_per_item=None,
                     num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False) -> Iterator[tuple]:
        """The tasks `get_<set_name>_batches(total_batches, augment_images)` yields, prepared in the
        background (mamlpp_fast.data.prefetch): `num_workers` processes (0: in this process), received
        by a thread of this process (pinned there with `pin_memory`), as CPU torch tensors in batches
        of `tasks_per_item` tasks (default:
        `tasks_per_batch`; the last batch may be smaller). Same tasks, same order. For "train" the
        stream position (`total_train_iters_produced`) advances by the tasks of each batch handed out,
        as with get_train_batches."""
        from .prefetch import TaskBatchDataset, as_tensors, receive_in_background, task_batch_loader

        if set_name not in SET_NAMES:
            raise ValueError(f"unknown set {set_name!r}; expected one of {SET_NAMES}")
        num_tasks = self._num_batches(set_name, total_batches) * self.tasks_per_batch
        per_item = int(tasks_per_item or self.tasks_per_batch)
        if set_name == "train":
            self.dataset.seed["train"] = self.dataset.init_seed["train"] + self.total_train_iters_produced
            first = self.dataset.init_seed["train"] + self.total_train_iters_produced
        else:
            first = self.dataset.seed[set_name]
        dataset = TaskBatchDataset(self.dataset, set_name, first, num_tasks, per_item, augment_images)
        loader = task_batch_loader(dataset, num_workers, prefetch_factor)
        if num_tasks == 0:
            return
        if loader.num_workers > 0:
            batches = receive_in_background(loader, pin=pin_memory)
        else:  # 0 workers: everything in this thread, in series
            batches = (as_tensors(b) for b in loader)
        try:
            for batch in batches:
                if set_name == "train":
                    self.total_train_iters_produced += batch[0].shape[0]
                yield batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def get_val_batches(self, total_batches=-1, augment_images=False) -> Iterator[tuple]:
        """Validation batches: always the same tasks (seed = derived val seed + task index)."""
        return self._fixed_batches("val", total_batches, augment_images)

    def get_test_batches(self, total_batches=-1, augment_images=False) -> Iterator[tuple]:
        """Test batches: always the same tasks (seed = derived val seed + task index, as the original)."""
        return self._fixed_batches("test", total_batches, augment_images)
