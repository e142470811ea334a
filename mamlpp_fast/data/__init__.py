"""Few-shot task data for MAML++: readers, the task sampler and a synthetic task generator.

The entry point is `MetaLearningSystemDataLoader(args, current_iter=0, data_dir=None)`, with the
interface of the authors' data provider (their data.py): `get_train_batches`, `get_val_batches` and
`get_test_batches` yield `(x_support, x_target, y_support, y_target)` numpy batches, and
`continue_from_iter` moves the training task stream forward so that a resumed run draws the same tasks
as an uninterrupted one. The tasks themselves are drawn with the same random-number calls, in the same
order, as the original's `get_set`, so a given (seed, class list) gives the same classes, rotations and
image indexes.

Datasets:
- Omniglot (`dataset_name` contains "omniglot"): `<root>/<alphabet>/<character>/*.png` folders, found
  recursively, and/or the official `.zip` files read in place (never extracted);
- mini-ImageNet (and other RGB sets): `{train,val,test}/<class>/*.jpg` when `sets_are_pre_split`;
- "synthetic": procedurally generated classes, no files needed (see `synthetic.py`).

Every problem with the data (missing folder, no images, too few classes or images, unreadable file,
wrong image mode) raises `DatasetError`, whose message names the path and the cause. Nothing in the
dataset folder is ever written, extracted into, or deleted.
"""
from ..errors import DatasetError
from .readers import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecoder,
    ImageRef,
    find_images,
    group_by_class,
    label_from_path,
    resolve_dataset_path,
)
from .sampler import (
    FewShotTaskSampler,
    MetaLearningSystemDataLoader,
    derive_seed,
    draw_task,
    rotate_classes,
    split_class_labels,
)
from .synthetic import SyntheticFewShotData

__all__ = [
    "DatasetError",
    "MetaLearningSystemDataLoader",
    "FewShotTaskSampler",
    "SyntheticFewShotData",
    "ImageDecoder",
    "ImageRef",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "derive_seed",
    "draw_task",
    "find_images",
    "group_by_class",
    "label_from_path",
    "resolve_dataset_path",
    "rotate_classes",
    "split_class_labels",
]
