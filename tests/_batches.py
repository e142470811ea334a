"""Learnable few-shot batches for numerical comparisons.

docs/NUMERICS.md: random-noise images with arbitrary labels make the inner loop far more sensitive than
learnable tasks, so comparisons use class prototypes plus noise: each class of a task has a random
smooth prototype image and its examples are that prototype plus small noise.
"""
from __future__ import annotations

import os

import numpy as np


def fresh_seed() -> int:
    """A new seed each run (inputs are never fixed); tests print it in their messages."""
    return int.from_bytes(os.urandom(4), "little")


def learnable_batch(b, n, k, t, c, h, w, seed, noise=0.3):
    """(x_support, x_target, y_support, y_target) numpy float32/int64, class-major labels."""
    rng = np.random.RandomState(seed)
    coarse = rng.randn(b, n, c, max(2, h // 4), max(2, w // 4))
    # nearest upsampling then a light blur gives smooth prototypes with real spatial structure
    proto = np.repeat(np.repeat(coarse, int(np.ceil(h / coarse.shape[-2])), -2),
                      int(np.ceil(w / coarse.shape[-1])), -1)[..., :h, :w]
    xs = proto[:, :, None] + noise * rng.randn(b, n, k, c, h, w)
    xt = proto[:, :, None] + noise * rng.randn(b, n, t, c, h, w)
    ys = np.broadcast_to(np.arange(n)[None, :, None], (b, n, k)).copy()
    yt = np.broadcast_to(np.arange(n)[None, :, None], (b, n, t)).copy()
    return xs.astype(np.float32), xt.astype(np.float32), ys.astype(np.int64), yt.astype(np.int64)
