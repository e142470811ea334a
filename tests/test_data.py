"""Tests of mamlpp_fast.data: task semantics, seeds and streams as the authors' data.py, readers
(Omniglot folders and zips, mini-ImageNet folders), the synthetic generator, and error handling.

The "original_*" helpers below restate the random-number calls of the original's load_dataset and
get_set literally (string class keys, dict orders), so that our vectorised sampler is checked against
the authors' sequence rather than against itself.
"""
from __future__ import annotations

import argparse
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mamlpp_fast.data import (
    DatasetError,
    FewShotTaskSampler,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MetaLearningSystemDataLoader,
    SyntheticFewShotData,
    derive_seed,
    draw_task,
    find_images,
    resolve_dataset_path,
    split_class_labels,
)

OMNIGLOT_SPLIT = [0.70918052988, 0.03080714725, 0.2606284658]


def _omniglot_dir() -> Path:
    env = os.environ.get("MAMLPP_OMNIGLOT_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


OMNIGLOT_DIR = _omniglot_dir()
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT_DIR.is_dir() and any(OMNIGLOT_DIR.glob("*.zip"))),
    reason=f"real Omniglot zips not found at {OMNIGLOT_DIR} (set MAMLPP_OMNIGLOT_DIR)")


def make_args(**kw) -> argparse.Namespace:
    base = dict(dataset_name="synthetic", dataset_path="synthetic", batch_size=4, num_classes_per_set=5,
                num_samples_per_class=1, num_target_samples=2, image_height=28, image_width=28,
                image_channels=1, train_seed=0, val_seed=0, num_of_gpus=1, samples_per_iter=1,
                indexes_of_folders_indicating_class=[-3, -2], train_val_test_split=OMNIGLOT_SPLIT,
                sets_are_pre_split=False, load_into_memory=True, num_evaluation_tasks=20)
    base.update(kw)
    return argparse.Namespace(**base)


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, size and mtime: what 'unchanged' means."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def batches_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- literal restatements of the original
def original_split(sorted_labels, split, val_seed):
    """The original's load_dataset (not pre-split), with its JSON-keyed dict of classes."""
    seed = np.random.RandomState(seed=val_seed).randint(1, 999999)
    rng = np.random.RandomState(seed=seed)
    data_image_paths = {str(i): label for i, label in enumerate(sorted_labels)}
    total_label_types = len(data_image_paths)
    num_classes_idx = np.arange(len(data_image_paths.keys()), dtype=np.int32)
    rng.shuffle(num_classes_idx)
    keys, values = list(data_image_paths.keys()), list(data_image_paths.values())
    data_image_paths = dict(zip([keys[i] for i in num_classes_idx], [values[i] for i in num_classes_idx]))
    a = int(split[0] * total_label_types)
    b = int(np.sum(split[:2]) * total_label_types)
    k = list(data_image_paths.keys())
    return {"train": [data_image_paths[c] for c in k[:a]], "val": [data_image_paths[c] for c in k[a:b]],
            "test": [data_image_paths[c] for c in k[b:total_label_types]]}


def original_get_set(size_dict, seed, n_way, n_samples):
    """The original's get_set random calls; size_dict: class key -> number of images, in split order."""
    rng = np.random.RandomState(seed)
    selected_classes = rng.choice(list(size_dict.keys()), size=n_way, replace=False)
    rng.shuffle(selected_classes)
    k_list = rng.randint(0, 4, size=n_way)
    samples = [rng.choice(size_dict[c], size=n_samples, replace=False) for c in selected_classes]
    return list(selected_classes), k_list, np.array(samples)


# ---------------------------------------------------------------- small datasets written in tmp_path
def _stroke_image(rng, size=105) -> Image.Image:
    img = Image.new("1", (size, size), 1)  # white background = 1, as Omniglot
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        pts = [tuple(int(v) for v in rng.randint(5, size - 5, 2)) for _ in range(3)]
        draw.line(pts, fill=0, width=int(rng.randint(3, 8)))
    return img


def write_omniglot_folder(root: Path, alphabets=2, chars=4, images=5, seed=0) -> Path:
    rng = np.random.RandomState(seed)
    for a in range(alphabets):
        for c in range(chars):
            d = root / "images_background" / f"Alphabet_{a}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for i in range(images):
                _stroke_image(rng).save(d / f"{a:02d}{c:02d}_{i + 1:02d}.png")
    return root


def write_imagenet_folder(root: Path, classes=(3, 2, 2), images=4, size=10, seed=0) -> Path:
    rng = np.random.RandomState(seed)
    for set_name, n_cls in zip(("train", "val", "test"), classes):
        for c in range(n_cls):
            d = root / set_name / f"n{set_name}{c:04d}"
            d.mkdir(parents=True)
            for i in range(images):
                arr = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                img = Image.fromarray(arr, "RGB")
                if i == 0:
                    img = img.convert("L")  # a grey JPEG, as ImageNet has a few
                img.save(d / f"n{c:04d}_{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def real_omniglot_5way():
    if not (OMNIGLOT_DIR.is_dir() and any(OMNIGLOT_DIR.glob("*.zip"))):
        pytest.skip(f"real Omniglot zips not found at {OMNIGLOT_DIR}")
    before = snapshot(OMNIGLOT_DIR)
    loader = MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=5,
                                                    batch_size=8, num_target_samples=1),
                                          data_dir=OMNIGLOT_DIR)
    return loader, before


@pytest.fixture(scope="module")
def real_omniglot_20way():
    if not (OMNIGLOT_DIR.is_dir() and any(OMNIGLOT_DIR.glob("*.zip"))):
        pytest.skip(f"real Omniglot zips not found at {OMNIGLOT_DIR}")
    return MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=20, batch_size=8,
                                                  num_target_samples=1, train_val_test_split=[0.6, 0.2, 0.2]),
                                        data_dir=OMNIGLOT_DIR)


# ---------------------------------------------------------------- shapes, labels, task structure
@pytest.mark.parametrize("n,k,t,c,h,w,b", [(5, 1, 2, 1, 28, 28, 4), (20, 5, 1, 1, 28, 28, 2),
                                             (5, 1, 15, 3, 84, 84, 2), (3, 2, 3, 2, 12, 20, 3)])
def test_shapes_dtypes_and_class_major_labels(n, k, t, c, h, w, b):
    loader = MetaLearningSystemDataLoader(make_args(num_classes_per_set=n, num_samples_per_class=k,
                                                    num_target_samples=t, image_channels=c, image_height=h,
                                                    image_width=w, batch_size=b))
    assert loader.im_shape == (2, c, h, w)
    assert loader.dataset_name == "synthetic"
    for gen in (loader.get_train_batches(2), loader.get_val_batches(2), loader.get_test_batches(2)):
        batches = list(gen)
        assert len(batches) == 2
        xs, xt, ys, yt = batches[0]
        assert xs.shape == (b, n, k, c, h, w) and xt.shape == (b, n, t, c, h, w)
        assert ys.shape == (b, n, k) and yt.shape == (b, n, t)
        assert xs.dtype == np.float32 and xt.dtype == np.float32
        assert ys.dtype == np.int64 and yt.dtype == np.int64
        assert all(a.flags.c_contiguous for a in batches[0])
        expected = np.arange(n)[None, :, None]
        assert (ys == expected).all() and (yt == expected).all()
        assert np.isfinite(xs).all() and np.isfinite(xt).all()


def test_tasks_have_distinct_classes_and_disjoint_support_target():
    loader = MetaLearningSystemDataLoader(make_args(num_classes_per_set=20, num_samples_per_class=5,
                                                    num_target_samples=5))
    for set_name in ("train", "val", "test"):
        classes, rotations, samples = loader.dataset.draw_tasks(set_name, range(100, 130))
        for b in range(classes.shape[0]):
            assert len(set(classes[b])) == 20
            for n in range(20):
                assert len(set(samples[b, n])) == 10  # K+T distinct images: support and target disjoint
        assert rotations.min() >= 0 and rotations.max() <= 3
    # Pixel level as well: no target image equals a support image of its class.
    xs, xt, _, _ = next(loader.get_train_batches(1))
    for b in range(xs.shape[0]):
        for n in range(20):
            for i in range(xt.shape[2]):
                assert not any(np.array_equal(xt[b, n, i], xs[b, n, j]) for j in range(xs.shape[2]))


def test_missing_keys_take_the_originals_defaults():
    loader = MetaLearningSystemDataLoader(argparse.Namespace(dataset_name="synthetic"))
    xs, xt, ys, yt = next(loader.get_val_batches(1))
    # batch_size 32, 20-way, 1-shot, 15 targets, 28x28x1: the original parser's defaults.
    assert xs.shape == (32, 20, 1, 1, 28, 28) and xt.shape == (32, 20, 15, 1, 28, 28)
    as_dict = MetaLearningSystemDataLoader({"dataset_name": "synthetic", "batch_size": 2,
                                            "num_target_samples": "3", "reverse_channels": "false"})
    assert next(as_dict.get_train_batches(1))[1].shape == (2, 20, 3, 1, 28, 28)


def test_num_batches_and_tasks_per_batch():
    loader = MetaLearningSystemDataLoader(make_args(batch_size=3, synthetic_num_classes=[30, 10, 10],
                                                    synthetic_images_per_class=6))
    assert len(list(loader.get_val_batches(5))) == 5
    assert len(list(loader.get_val_batches(0))) == 0
    # -1: one task per image of the split, as the original's data_length.
    assert len(list(loader.get_val_batches(-1))) == (10 * 6) // 3
    # num_of_gpus * batch_size * samples_per_iter tasks per batch, as the original's DataLoader batch.
    loader2 = MetaLearningSystemDataLoader(make_args(batch_size=3, samples_per_iter=2))
    out = list(loader2.get_val_batches(4))
    assert len(out) == 2 and out[0][0].shape[0] == 6


# ---------------------------------------------------------------- seeds, streams, determinism
def test_same_seed_same_tasks_different_seed_different_tasks():
    a = MetaLearningSystemDataLoader(make_args())
    b = MetaLearningSystemDataLoader(make_args())
    c = MetaLearningSystemDataLoader(make_args(train_seed=1, val_seed=1))
    ta, tb, tc = list(a.get_train_batches(3)), list(b.get_train_batches(3)), list(c.get_train_batches(3))
    assert all(batches_equal(x, y) for x, y in zip(ta, tb))
    assert not batches_equal(ta[0], tc[0])
    assert not batches_equal(next(a.get_val_batches(1)), next(c.get_val_batches(1)))
    # Consecutive training batches differ.
    assert not batches_equal(ta[0], ta[1])


def test_seeds_are_the_originals_derived_seeds():
    loader = MetaLearningSystemDataLoader(make_args(train_seed=3, val_seed=7, batch_size=2))
    ts, vs = derive_seed(3), derive_seed(7)
    assert ts == np.random.RandomState(3).randint(1, 999999)
    assert loader.dataset.init_seed == {"train": ts, "val": vs, "test": vs}
    batches = list(loader.get_train_batches(3))
    for j, batch in enumerate(batches):
        assert batches_equal(batch, loader.get_batch("train", [ts + 2 * j, ts + 2 * j + 1]))
    val = list(loader.get_val_batches(2))
    assert batches_equal(val[1], loader.get_batch("val", [vs + 2, vs + 3]))
    test = list(loader.get_test_batches(2))
    assert batches_equal(test[0], loader.get_batch("test", [vs, vs + 1]))


def test_val_and_test_tasks_fixed_across_calls():
    loader = MetaLearningSystemDataLoader(make_args())
    v1, t1 = list(loader.get_val_batches(3)), list(loader.get_test_batches(3))
    list(loader.get_train_batches(5))  # training in between must not move the evaluation tasks
    v2, t2 = list(loader.get_val_batches(3)), list(loader.get_test_batches(3))
    assert all(batches_equal(x, y) for x, y in zip(v1, v2))
    assert all(batches_equal(x, y) for x, y in zip(t1, t2))
    assert not batches_equal(v1[0], t1[0])  # same seeds, but different class pools


def test_continue_from_iter_reproduces_uninterrupted_stream():
    full = list(MetaLearningSystemDataLoader(make_args()).get_train_batches(7))
    resumed = list(MetaLearningSystemDataLoader(make_args(), current_iter=3).get_train_batches(4))
    assert all(batches_equal(x, y) for x, y in zip(full[3:], resumed))
    late = MetaLearningSystemDataLoader(make_args())
    late.continue_from_iter(5)
    assert all(batches_equal(x, y) for x, y in zip(full[5:], list(late.get_train_batches(2))))
    # Training split over several calls (or a generator left early) continues the stream.
    split = MetaLearningSystemDataLoader(make_args())
    part = list(split.get_train_batches(2))
    gen = split.get_train_batches(10)
    part.append(next(gen))
    gen.close()
    part += list(split.get_train_batches(4))
    assert all(batches_equal(x, y) for x, y in zip(full, part))


def test_split_matches_original_load_dataset():
    labels = sorted(f"alpha{a}/character{c:02d}" for a in range(7) for c in range(1, 1 + 5 + a))
    for split in (OMNIGLOT_SPLIT, [0.6, 0.2, 0.2], [0.64, 0.16, 0.20]):
        for seed in (0, 1, 42):
            ours = split_class_labels(labels, split, derive_seed(seed))
            assert ours == original_split(labels, split, seed)


def test_draw_task_matches_original_get_set():
    rng = np.random.RandomState(0)
    size_dict = {str(k): int(rng.randint(12, 30)) for k in rng.permutation(60)}  # shuffled keys, uneven
    counts = np.array(list(size_dict.values()))
    keys = list(size_dict.keys())
    reuse = np.random.RandomState(123)
    for seed in [1, 2, 985773, 985774, 2 ** 31 + 5]:
        for n_way, n_samples in [(5, 2), (20, 6), (60, 12)]:
            sel, k_list, samples = original_get_set(size_dict, seed, n_way, n_samples)
            for r in (None, reuse):
                classes, rotations, ours = draw_task(seed, counts, n_way, n_samples, rng=r)
                assert [keys[c] for c in classes] == sel
                assert np.array_equal(rotations, k_list)
                assert np.array_equal(ours, samples)


# ---------------------------------------------------------------- rotation augmentation
def test_rotation_only_in_training_and_by_multiples_of_90(tmp_path):
    root = write_omniglot_folder(tmp_path / "omni", alphabets=3, chars=4, images=4)
    args = make_args(dataset_name="omniglot", num_classes_per_set=3, num_target_samples=2, batch_size=6,
                     train_val_test_split=[0.5, 0.25, 0.25])
    plain = MetaLearningSystemDataLoader(args, data_dir=root)
    aug = MetaLearningSystemDataLoader(args, data_dir=root)
    xs0, xt0, _, _ = next(plain.get_train_batches(1, augment_images=False))
    xs1, xt1, _, _ = next(aug.get_train_batches(1, augment_images=True))
    seeds = range(plain.dataset.init_seed["train"], plain.dataset.init_seed["train"] + 6)
    _, rotations, _ = plain.dataset.draw_tasks("train", seeds)
    assert (rotations != 0).any()
    for b in range(6):
        for n in range(3):
            k = rotations[b, n]
            assert np.array_equal(xs1[b, n], np.rot90(xs0[b, n], k, axes=(-2, -1)))
            assert np.array_equal(xt1[b, n], np.rot90(xt0[b, n], k, axes=(-2, -1)))
    # Evaluation batches (the trainer passes augment_images=False) are never rotated.
    val = next(aug.get_val_batches(1))
    seeds = range(aug.dataset.init_seed["val"], aug.dataset.init_seed["val"] + 6)
    assert batches_equal(val, aug.get_batch("val", seeds, augment_images=False))
    # No rotation for non-Omniglot datasets, even when asked to augment.
    syn = MetaLearningSystemDataLoader(make_args())
    assert batches_equal(next(syn.get_train_batches(1, augment_images=True)),
                         next(MetaLearningSystemDataLoader(make_args()).get_train_batches(1)))


# ---------------------------------------------------------------- real Omniglot (the official zips)
@needs_omniglot
def test_real_omniglot_zips(real_omniglot_5way):
    loader, before = real_omniglot_5way
    ds = loader.dataset
    sizes = {s: len(ds.splits[s].class_names) for s in ("train", "val", "test")}
    # 242 characters (Greek and Latin are in both zips; counted once), rotations applied on the fly, not
    # as classes: int(0.709*242)=171, int(0.740*242)=179.
    assert sizes == {"train": 171, "val": 8, "test": 63}
    names = [set(ds.splits[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert len(names[0] | names[1] | names[2]) == 242
    assert all(len(n.split("/")) == 2 for n in names[0])  # alphabet/character
    for s in ("train", "val", "test"):
        assert (ds.class_counts(s) == 20).all()
    assert ds.data_length == {"train": 171 * 20, "val": 8 * 20, "test": 63 * 20}
    # Same split as the original's procedure on the sorted labels.
    all_labels = sorted(names[0] | names[1] | names[2])
    ref = original_split(all_labels, OMNIGLOT_SPLIT, 0)
    assert {s: ds.splits[s].class_names for s in ref} == ref
    xs, xt, ys, yt = next(loader.get_train_batches(1, augment_images=True))
    assert xs.shape == (8, 5, 1, 1, 28, 28) and xt.shape == (8, 5, 1, 1, 28, 28)
    for x in (xs, xt, *next(loader.get_val_batches(1))[:2]):
        assert set(np.unique(x)) <= {0.0, 1.0}
        assert x.mean() > 0.5  # white background = 1
    assert snapshot(OMNIGLOT_DIR) == before


@needs_omniglot
def test_real_omniglot_20_way_needs_a_larger_val_split(real_omniglot_20way):
    # The shipped Omniglot split leaves 8 validation characters of these 242: a clear error for 20-way.
    with pytest.raises(DatasetError, match=r"val split .* 8 classes.*num_classes_per_set = 20"):
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=20),
                                     data_dir=OMNIGLOT_DIR)
    loader = real_omniglot_20way
    assert {s: len(loader.dataset.splits[s].class_names) for s in ("train", "val", "test")} == \
        {"train": 145, "val": 48, "test": 49}
    xs, xt, ys, yt = next(loader.get_train_batches(1, augment_images=True))
    assert xs.shape == (8, 20, 1, 1, 28, 28)
    # Timing: a batch of 8 tasks of 20-way 1-shot takes a few ms (generous bound for slow CI machines).
    gen = loader.get_train_batches(40, augment_images=True)
    next(gen)
    t0 = time.perf_counter()
    for _ in range(30):
        next(gen)
    per_batch = (time.perf_counter() - t0) / 30
    assert per_batch < 0.05, f"{per_batch * 1e3:.1f} ms per batch"


@needs_omniglot
def test_real_omniglot_lazy_matches_eager(real_omniglot_5way):
    eager, _ = real_omniglot_5way
    lazy = MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=5, batch_size=8,
                                                  num_target_samples=1, load_into_memory=False),
                                        data_dir=OMNIGLOT_DIR)
    assert batches_equal(next(lazy.get_val_batches(1)), next(eager.get_val_batches(1)))
    assert batches_equal(next(lazy.get_test_batches(1)), next(eager.get_test_batches(1)))


# ---------------------------------------------------------------- Omniglot folder layout and zips
def test_omniglot_folder_layout(tmp_path):
    root = write_omniglot_folder(tmp_path / "omniglot", alphabets=2, chars=4, images=5)
    (root / "README.txt").write_text("not an image")
    before = snapshot(root)
    loader = MetaLearningSystemDataLoader(
        make_args(dataset_name="omniglot", num_classes_per_set=2, num_target_samples=2,
                  train_val_test_split=[0.5, 0.25, 0.25]), data_dir=root)
    ds = loader.dataset
    assert {s: len(ds.splits[s].class_names) for s in ("train", "val", "test")} == {"train": 4, "val": 2, "test": 2}
    assert ds.splits["train"].class_names[0].startswith("Alphabet_")
    # Each sampled image is the PNG of its class, resized with nearest neighbour, values 0/1.
    seeds = [ds.init_seed["val"]]
    classes, _, samples = ds.draw_tasks("val", seeds)
    xs, xt, _, _ = ds.get_batch("val", seeds)
    images = np.concatenate([xs, xt], axis=2)[0]
    for n in range(2):
        label = ds.splits["val"].class_names[classes[0, n]]
        files = sorted((root / "images_background" / label).glob("*.png"))
        for j, s in enumerate(samples[0, n]):
            expected = np.asarray(Image.open(files[s]).resize((28, 28), Image.NEAREST), dtype=np.float32)
            assert np.array_equal(images[n, j, 0], expected)
    assert set(np.unique(images)) <= {0.0, 1.0}
    assert snapshot(root) == before


def test_omniglot_zip_read_in_place_and_deduplicated(tmp_path):
    src = write_omniglot_folder(tmp_path / "src", alphabets=2, chars=3, images=4)
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "images_background.zip", "w") as zf:
        for p in sorted((src / "images_background").rglob("*.png")):
            zf.write(p, p.relative_to(src).as_posix())
    # The same characters again as a folder next to the zip: counted once.
    (data / "images_background").mkdir()
    alpha = sorted((src / "images_background").iterdir())[0]
    os.symlink(alpha, data / "images_background" / alpha.name)
    before = snapshot(data)
    assert len(find_images(data)) == 6 * 4 + 3 * 4  # the zip's images, then the linked folder's again
    args = make_args(dataset_name="omniglot", num_classes_per_set=2, num_target_samples=1,
                     train_val_test_split=[0.34, 0.33, 0.33])
    from_zip = MetaLearningSystemDataLoader(args, data_dir=data)
    from_folder = MetaLearningSystemDataLoader(args, data_dir=src)
    for s in ("train", "val", "test"):
        assert from_zip.dataset.splits[s].class_names == from_folder.dataset.splits[s].class_names
        assert (from_zip.dataset.class_counts(s) == 4).all()
    assert batches_equal(next(from_zip.get_train_batches(1, True)), next(from_folder.get_train_batches(1, True)))
    assert snapshot(data) == before
    assert sorted(p.name for p in data.iterdir()) == ["images_background", "images_background.zip"]


# ---------------------------------------------------------------- mini-ImageNet layout
def test_mini_imagenet_layout_and_normalisation(tmp_path):
    root = write_imagenet_folder(tmp_path / "mini_imagenet")
    before = snapshot(root)
    args = make_args(dataset_name="mini_imagenet", sets_are_pre_split=True, image_channels=3, image_height=8,
                     image_width=8, num_classes_per_set=2, num_samples_per_class=1, num_target_samples=2,
                     batch_size=3, indexes_of_folders_indicating_class=[-3, -2])
    loader = MetaLearningSystemDataLoader(args, data_dir=root)
    ds = loader.dataset
    for s, n in (("train", 3), ("val", 2), ("test", 2)):
        assert ds.splits[s].class_names == [f"{s}/n{s}{c:04d}" for c in range(n)]  # sorted, own folder only
    assert loader.im_shape == (2, 3, 8, 8)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    for set_name, gen in (("train", loader.get_train_batches(1, augment_images=True)),
                          ("test", loader.get_test_batches(1))):
        xs, xt, ys, yt = next(gen)
        assert xs.shape == (3, 2, 1, 3, 8, 8) and xt.shape == (3, 2, 2, 3, 8, 8)
        first = ds.seed[set_name]
        classes, _, samples = ds.draw_tasks(set_name, range(first, first + 3))
        images = np.concatenate([xs, xt], axis=2)
        for b in range(3):
            for n in range(2):
                label = ds.splits[set_name].class_names[classes[b, n]]
                files = sorted((root / label).glob("*.jpg"))
                for j, s in enumerate(samples[b, n]):
                    pil = Image.open(files[s]).resize((8, 8)).convert("RGB")  # the original's order
                    arr = np.asarray(pil, np.float32).transpose(2, 0, 1) / 255.0
                    expected = (arr - mean) / std  # torchvision Normalize, float32
                    assert np.array_equal(images[b, n, j], expected)  # no rotation, exact values
    assert snapshot(root) == before


# ---------------------------------------------------------------- synthetic data
def _nearest_class_mean_accuracy(batch) -> float:
    xs, xt, ys, yt = batch
    B, N, K = ys.shape
    means = xs.reshape(B, N, K, -1).mean(axis=2)
    queries = xt.reshape(B, -1, means.shape[-1])
    dist = ((queries[:, :, None, :] - means[:, None, :, :]) ** 2).sum(-1)
    return float((dist.argmin(-1) == yt.reshape(B, -1)).mean())


@pytest.mark.parametrize("n,k", [(5, 1), (20, 1), (5, 5)])
def test_synthetic_is_learnable(n, k):
    loader = MetaLearningSystemDataLoader(make_args(num_classes_per_set=n, num_samples_per_class=k,
                                                    num_target_samples=3, batch_size=8))
    acc = np.mean([_nearest_class_mean_accuracy(b) for b in loader.get_test_batches(5)])
    assert acc > 2.0 / n, f"nearest-class-mean accuracy {acc:.2f} for {n}-way {k}-shot"


def test_synthetic_classes_distinct_pools_disjoint_and_deterministic():
    data = SyntheticFewShotData(num_classes=(50, 20, 20), images_per_class=6, channels=1, height=28, width=28,
                                seed=3)
    ids = {s: set(data.splits[s].class_names) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert [len(ids[s]) for s in ("train", "val", "test")] == [50, 20, 20]
    cls = np.repeat(np.arange(90), 6)
    smp = np.tile(np.arange(6), 90)
    imgs = data.render(cls, smp).reshape(90, 6, -1)
    means = imgs.mean(axis=1)
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    within = ((imgs - means[:, None]) ** 2).sum(-1).mean()
    off_diag = d[~np.eye(90, dtype=bool)]
    assert off_diag.min() > 0 and np.median(off_diag) > 0.5 * within  # classes differ by more than noise
    assert not np.array_equal(imgs[0, 0], imgs[0, 1])  # images of a class differ
    again = SyntheticFewShotData(num_classes=(50, 20, 20), images_per_class=6, seed=3)
    assert np.array_equal(again.render(cls, smp).reshape(90, 6, -1), imgs)
    other = SyntheticFewShotData(num_classes=(50, 20, 20), images_per_class=6, seed=4)
    assert not np.array_equal(other.render(cls, smp).reshape(90, 6, -1), imgs)


def test_synthetic_supports_more_images_than_default_per_class():
    loader = MetaLearningSystemDataLoader(make_args(num_classes_per_set=5, num_samples_per_class=10,
                                                    num_target_samples=15, batch_size=2))
    xs, xt, _, _ = next(loader.get_train_batches(1))
    assert xs.shape[2] == 10 and xt.shape[2] == 15
    assert (loader.dataset.class_counts("train") == 25).all()


# ---------------------------------------------------------------- path resolution
def test_dataset_path_resolution(tmp_path, monkeypatch):
    root = write_omniglot_folder(tmp_path / "datasets" / "omniglot", alphabets=2, chars=2, images=3)
    monkeypatch.setenv("DATASET_DIR", str(tmp_path / "datasets"))
    assert resolve_dataset_path("omniglot") == root
    assert resolve_dataset_path(str(root)) == root  # absolute paths are kept
    assert resolve_dataset_path("anything", data_dir=tmp_path) == tmp_path
    assert resolve_dataset_path("omniglot", dataset_dir=str(tmp_path / "datasets")) == root
    args = make_args(dataset_name="omniglot", dataset_path="omniglot", num_classes_per_set=1,
                     train_val_test_split=[0.5, 0.25, 0.25], num_target_samples=1)
    loader = MetaLearningSystemDataLoader(args)
    assert loader.dataset.dataset_path == root
    monkeypatch.delenv("DATASET_DIR")
    with pytest.raises(DatasetError, match="not found"):
        MetaLearningSystemDataLoader(args)
    assert MetaLearningSystemDataLoader(args, data_dir=root).dataset.dataset_path == root


# ---------------------------------------------------------------- errors
def test_error_missing_folder(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetError, match="not found") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot"), data_dir=missing)
    assert str(missing) in str(err.value)
    assert not missing.exists()


def test_error_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot"), data_dir=empty)
    assert str(empty) in str(err.value)


def test_error_fewer_classes_than_n_way(tmp_path):
    root = write_omniglot_folder(tmp_path / "omni", alphabets=1, chars=3, images=3)
    with pytest.raises(DatasetError, match=r"train split .* 1 classes.*num_classes_per_set = 2") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=2, num_target_samples=1,
                                               train_val_test_split=[0.34, 0.33, 0.33]), data_dir=root)
    assert str(root) in str(err.value)
    with pytest.raises(DatasetError, match="num_classes_per_set = 300"):
        MetaLearningSystemDataLoader(make_args(num_classes_per_set=300))  # synthetic val pool: 200


def test_error_class_with_too_few_images(tmp_path):
    root = write_omniglot_folder(tmp_path / "omni", alphabets=2, chars=2, images=3)
    victim = root / "images_background" / "Alphabet_1" / "character02"
    sorted(victim.glob("*.png"))[0].unlink()
    with pytest.raises(DatasetError, match=r"2 images .* fewer than .* = 3") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=1, num_target_samples=2,
                                               train_val_test_split=[0.5, 0.25, 0.25]), data_dir=root)
    assert str(victim) in str(err.value)


@pytest.mark.parametrize("load_into_memory", [True, False])
def test_error_unreadable_image(tmp_path, load_into_memory):
    root = write_omniglot_folder(tmp_path / "omni", alphabets=2, chars=2, images=3)
    bad = root / "images_background" / "Alphabet_0" / "character01" / "zz_broken.png"
    bad.write_bytes(b"this is not a png")
    before = snapshot(root)
    with pytest.raises(DatasetError, match="cannot read image") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=1, num_target_samples=1,
                                               train_val_test_split=[0.5, 0.25, 0.25],
                                               load_into_memory=load_into_memory), data_dir=root)
    assert str(bad) in str(err.value)
    assert snapshot(root) == before  # the original would try to "fix" it in place; we never write


def test_error_wrong_image_mode(tmp_path):
    root = write_omniglot_folder(tmp_path / "omni", alphabets=2, chars=2, images=3)
    bad = root / "images_background" / "Alphabet_1" / "character01" / "zz_colour.png"
    Image.new("RGB", (105, 105), (255, 255, 255)).save(bad)
    with pytest.raises(DatasetError, match="mode 'RGB'") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot", num_classes_per_set=1, num_target_samples=1,
                                               train_val_test_split=[0.5, 0.25, 0.25]), data_dir=root)
    assert str(bad) in str(err.value)


def test_error_broken_zip_and_missing_pre_split_set(tmp_path):
    root = tmp_path / "zipped"
    root.mkdir()
    bad = root / "images_background.zip"
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(DatasetError, match="cannot read zip") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="omniglot"), data_dir=root)
    assert str(bad) in str(err.value)
    mini = write_imagenet_folder(tmp_path / "mini", classes=(2, 2, 2))
    for p in sorted((mini / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (mini / "test").rmdir()
    with pytest.raises(DatasetError, match="no 'test' set") as err:
        MetaLearningSystemDataLoader(make_args(dataset_name="mini_imagenet", sets_are_pre_split=True, image_channels=3,
                                               image_height=8, image_width=8, num_classes_per_set=2), data_dir=mini)
    assert str(mini) in str(err.value)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(ValueError):
        FewShotTaskSampler(make_args(dataset_name="omniglot", dataset_path="/nonexistent/omniglot"))
