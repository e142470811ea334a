"""A synthetic few-shot dataset: procedurally generated image classes, no files needed.

Why: tests, benchmarks and smoke runs need tasks with real class structure (a MAML learner must be able
to learn them well above chance in a few hundred meta-updates) on any N, K, T, C, H, W, without a
download. Each class is a fixed random "drawing" made of a few Gaussian blobs (position, width and a
signed per-channel amplitude per blob). Each image of a class is that drawing moved by a small global
shift, with each blob jittered a little, its contrast scaled, and pixel noise added. Telling classes
apart needs the blob layout, not a single pixel, and shifts make a pure pixel template imperfect, so a
convolutional learner has something to learn while a nearest-class-mean baseline is already clearly
above chance.

Everything is a deterministic function of (seed, pool sizes, images per class, C, H, W): the class
parameters, per-image variations and a bank of noise images are drawn once, at construction, from
`np.random.RandomState(seed)`; rendering an image is then a pure function of (class id, image index)
and is vectorised over a whole batch (separable blobs, one batched matmul).

Class pools: class ids 0..P_train-1 are the training classes, the next P_val the validation classes,
the last P_test the test classes (default 1000/200/200), so the pools are disjoint by construction.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SyntheticFewShotData", "SyntheticSplit"]

SET_NAMES = ("train", "val", "test")


class SyntheticSplit:
    """One pool of synthetic classes, with the interface the task sampler uses.

    Attributes: `name`, `class_names` (list of str), `counts` (images per class, int64 array).
    `gather(classes, samples)` renders float32 images (..., C, H, W) for class positions in this pool
    and image indexes within each class.
    """

    def __init__(self, data: "SyntheticFewShotData", name: str, first_class: int, num_classes: int):
        self.data, self.name = data, name
        self.first_class = int(first_class)
        self.class_ids = np.arange(first_class, first_class + num_classes, dtype=np.int64)
        self.class_names = [f"synthetic/{name}/{i:05d}" for i in self.class_ids]
        self.counts = np.full(num_classes, data.images_per_class, dtype=np.int64)

    def gather(self, classes: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Images for `classes` (shape A, positions in this pool) and `samples` (shape A + (S,))."""
        classes = np.asarray(classes)
        samples = np.asarray(samples)
        class_ids = np.broadcast_to((self.class_ids[classes])[..., None], samples.shape)
        return self.data.render(class_ids, samples)

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())


class SyntheticFewShotData:
    """Generator of the synthetic classes; see the module docstring.

    Parameters: `num_classes` (train, val, test) pool sizes; `images_per_class` (distinct images per
    class, at least K+T of the tasks); `channels`, `height`, `width`; `seed`; `num_blobs` per class;
    `noise_std` of the pixel noise; `max_shift` of the global shift, as a fraction of the image size.
    """

    def __init__(self, num_classes: Sequence[int] = (1000, 200, 200), images_per_class: int = 20,
                 channels: int = 1, height: int = 28, width: int = 28, seed: int = 0, num_blobs: int = 5,
                 noise_std: float = 0.35, max_shift: float = 0.2, noise_bank_size: int = 256):
        num_classes = [int(n) for n in num_classes]
        if len(num_classes) != 3 or min(num_classes) < 1:
            raise ValueError(f"num_classes must be 3 positive pool sizes (train, val, test), got {num_classes}")
        if images_per_class < 1 or channels < 1 or height < 1 or width < 1:
            raise ValueError("images_per_class, channels, height and width must be positive")
        self.num_classes = tuple(num_classes)
        self.images_per_class = int(images_per_class)
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.seed, self.num_blobs = int(seed), int(num_blobs)
        total, nb, P, C = sum(num_classes), self.num_blobs, self.images_per_class, self.channels

        rng = np.random.RandomState(self.seed)
        # Class parameters first, so that a class looks the same whatever the image count or size.
        self.centers = rng.uniform(0.2, 0.8, size=(total, nb, 2)).astype(np.float32)   # (y, x) fractions
        self.sigmas = rng.uniform(0.06, 0.14, size=(total, nb)).astype(np.float32)      # fraction of size
        signs = np.where(rng.rand(total, nb, C) < 0.5, -1.0, 1.0)
        self.amps = (signs * rng.uniform(0.6, 1.2, size=(total, nb, C))).astype(np.float32)
        # Per-image variations.
        self.shifts = rng.uniform(-max_shift, max_shift, size=(total, P, 2)).astype(np.float32)
        self.jitter = rng.normal(0.0, 0.02, size=(total, P, nb, 2)).astype(np.float32)
        self.gains = rng.uniform(0.8, 1.2, size=(total, P)).astype(np.float32)
        # Pixel noise: a bank of noise images, each image picks one (cheap and deterministic).
        # (capped at about 8M floats = 32 MB so that large images stay cheap)
        bank = int(max(1, min(noise_bank_size, max(16, 8_000_000 // (C * self.height * self.width)))))
        self.noise_bank = (rng.standard_normal(size=(bank, C, self.height, self.width)) * noise_std).astype(np.float32)
        self.noise_index = rng.randint(0, bank, size=(total, P))
        self._ys = ((np.arange(self.height, dtype=np.float32) + 0.5) / self.height)
        self._xs = ((np.arange(self.width, dtype=np.float32) + 0.5) / self.width)

        starts = np.concatenate([[0], np.cumsum(num_classes)[:-1]])
        self.splits = {name: SyntheticSplit(self, name, int(s), n)
                       for name, s, n in zip(SET_NAMES, starts, num_classes)}

    def render(self, class_ids: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """Images of (global class id, image index) pairs: float32 array of shape ids.shape + (C, H, W)."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        shape = np.broadcast_shapes(class_ids.shape, sample_ids.shape)
        cls = np.broadcast_to(class_ids, shape).reshape(-1)
        smp = np.broadcast_to(sample_ids, shape).reshape(-1)
        C, H, W = self.channels, self.height, self.width
        M = cls.size
        if M == 0:
            return np.zeros(shape + (C, H, W), dtype=np.float32)
        centers = self.centers[cls] + self.shifts[cls, smp][:, None, :] + self.jitter[cls, smp]  # (M, nb, 2)
        inv_sig = 1.0 / self.sigmas[cls][..., None]                                               # (M, nb, 1)
        gy = np.exp(-0.5 * np.square((self._ys[None, None, :] - centers[..., 0:1]) * inv_sig))    # (M, nb, H)
        gx = np.exp(-0.5 * np.square((self._xs[None, None, :] - centers[..., 1:2]) * inv_sig))    # (M, nb, W)
        amps = self.amps[cls] * self.gains[cls, smp][:, None, None]                                # (M, nb, C)
        # img[m, c, h, w] = sum_b amps[m, b, c] * gy[m, b, h] * gx[m, b, w]
        # as one batched matmul (M, C*H, nb) @ (M, nb, W); `left` is built contiguous, because numpy's
        # matmul leaves BLAS for a much slower loop on transposed operands.
        left = amps.transpose(0, 2, 1)[:, :, None, :] * gy.transpose(0, 2, 1)[:, None, :, :]   # (M, C, H, nb)
        img = np.matmul(left.reshape(M, C * H, self.num_blobs), gx).reshape(M, C, H, W)
        img += self.noise_bank[self.noise_index[cls, smp]]
        return img.astype(np.float32, copy=False).reshape(shape + (C, H, W))

    def split(self, name: str) -> SyntheticSplit:
        return self.splits[name]
