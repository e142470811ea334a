"""Pieces shared by the reference and the fast learner: seeds, MSL weights, the cosine schedule,
batch checking and checkpoint files. Keeping them in one place is what lets the two learners agree
to the last bit on everything that is not the inner loop itself.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch
from .errors import BatchError, CheckpointError  # noqa: F401 (re-exported)

__all__ = [
    "BatchError", "CheckpointError", "set_torch_seed", "msl_importance_vector", "cosine_lr",
    "resolve_device", "resolve_dtype", "coerce_batch", "atomic_torch_save", "load_checkpoint",
    "float32_precision", "atomic_write", "atomic_write_text", "fsync_dir",
]






def set_torch_seed(seed: int) -> np.random.RandomState:
    """Seed torch as the original does: torch seed = RandomState(seed).randint(0, 999999).

    Returns the RandomState (the original keeps it as `self.rng`)."""
    rng = np.random.RandomState(seed=seed)
    torch.manual_seed(int(rng.randint(0, 999999)))
    return rng


def msl_importance_vector(num_steps: int, msl_epochs: int, epoch: int) -> np.ndarray:
    """The MSL weights of the S target losses at `epoch`, exactly as the original computes them.

    All 1/S at epoch 0; each non-final weight decays by 1/(S*E) per epoch to a floor of 0.03/S; the
    final weight grows by (S-1)/(S*E) per epoch to a cap of 1 - (S-1)*0.03/S (E = msl_epochs; the 0.03
    is hard-coded in the original). float64, as numpy computes it there.
    """
    s = num_steps
    w = np.ones(s) * (1.0 / s)
    decay = 1.0 / s / msl_epochs
    floor = 0.03 / s
    for i in range(s - 1):
        w[i] = np.maximum(w[i] - epoch * decay, floor)
    w[-1] = np.minimum(w[-1] + epoch * (s - 1) * decay, 1.0 - (s - 1) * floor)
    return w


def cosine_lr(epoch: int, base_lr: float, min_lr: float, total_epochs: int) -> float:
    """CosineAnnealingLR's closed form: min + (base - min) * (1 + cos(pi * epoch / T_max)) / 2.

    The original steps its scheduler with `step(epoch=epoch)` (the closed form) before each update."""
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0


def resolve_device(device: Any) -> torch.device:
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(args: Any) -> torch.dtype:
    return torch.float64 if getattr(args, "dtype", "float32") == "float64" else torch.float32


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as e:  # noqa: BLE001 - report what could not be converted
        raise BatchError(f"{name} cannot be converted to a tensor: {e}") from None


def _in_host_memory(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _labels(a: Any, name: str, n_way: int, device: torch.device) -> torch.Tensor:
    # The values are checked where they are in host memory; labels that already live on an accelerator
    # (the trainer's prefetched batches, built from class positions) are not read back, since reading
    # them would make the host wait for the device at every batch.
    t = _as_tensor(a, name)
    on_host = _in_host_memory(t)
    if t.is_floating_point():
        if on_host and (not torch.isfinite(t).all() or not torch.equal(t, t.round())):
            raise BatchError(f"{name} must hold whole class indices, got non-integer values")
    elif t.dtype == torch.bool or t.is_complex():
        raise BatchError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if on_host and t.numel():
        lab = t.numpy()  # host memory: read there (no tensor op, nothing a device would run)
        if lab.min() < 0 or lab.max() >= n_way:
            raise BatchError(f"{name} holds labels outside [0, {n_way}): min {int(lab.min())}, max {int(lab.max())}")
    return t.to(device)


def coerce_batch(data_batch: Sequence[Any], device: torch.device, dtype: torch.dtype,
                 im_shape: Sequence[int] | None = None, n_way: int | None = None):
    """Check a data batch and move it to `device`: images to `dtype`, labels to int64.

    data_batch = (x_support (B,N,K,C,H,W), x_target (B,N,T,C,H,W), y_support (B,N,K), y_target (B,N,T)),
    numpy arrays or tensors, labels float or int. Raises BatchError naming the inconsistent part.
    """
    if not isinstance(data_batch, (tuple, list)) or len(data_batch) < 4:
        raise BatchError("data_batch must be (x_support, x_target, y_support, y_target)")
    xs, xt = _as_tensor(data_batch[0], "x_support"), _as_tensor(data_batch[1], "x_target")
    if xs.dim() != 6 or xt.dim() != 6:
        raise BatchError(f"x_support and x_target must be 6-d (B,N,K,C,H,W), got shapes "
                         f"{tuple(xs.shape)} and {tuple(xt.shape)}")
    b, n, k = xs.shape[:3]
    if xt.shape[:2] != (b, n):
        raise BatchError(f"x_target {tuple(xt.shape)} does not match x_support {tuple(xs.shape)} in (B, N)")
    if xs.shape[3:] != xt.shape[3:]:
        raise BatchError(f"support images {tuple(xs.shape[3:])} and target images {tuple(xt.shape[3:])} differ")
    if im_shape is not None and tuple(xs.shape[3:]) != tuple(im_shape[1:]):
        raise BatchError(f"images are {tuple(xs.shape[3:])} (C,H,W) but the model was built for "
                         f"{tuple(im_shape[1:])}")
    if n_way is not None and n != n_way:
        raise BatchError(f"batch has N={n} classes per task but the model has {n_way} outputs")
    if not xs.is_floating_point() and xs.dtype not in (torch.uint8, torch.int32, torch.int64):
        raise BatchError(f"images must be numeric, got dtype {xs.dtype}")
    ys = _labels(data_batch[2], "y_support", n, device)
    yt = _labels(data_batch[3], "y_target", n, device)
    if tuple(ys.shape) != (b, n, k):
        raise BatchError(f"y_support shape {tuple(ys.shape)} does not match x_support (B,N,K)=({b},{n},{k})")
    if tuple(yt.shape) != tuple(xt.shape[:3]):
        raise BatchError(f"y_target shape {tuple(yt.shape)} does not match x_target (B,N,T)="
                         f"{tuple(xt.shape[:3])}")
    xs = xs.to(device=device, dtype=dtype)
    xt = xt.to(device=device, dtype=dtype)
    return xs, xt, ys, yt


def fsync_dir(folder: str) -> None:
    """fsync a folder so that a rename inside it survives a crash (best effort: not every file system
    allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file object that remembers the OSError of a failed write. torch.save turns the OSError of its
    file's write (no space left, file too large) into an unrelated RuntimeError ("unexpected pos"), so
    atomic_write re-raises the recorded OSError instead: the real cause, naming the file."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> None:
    """Write a file through `write(f)` into a temporary file in the same folder, fsync it, rename it
    over `path`, and fsync the folder: a crash mid-write leaves the previous file intact instead of a
    truncated one. A failed write raises its OSError with `filename` = `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    recorder = None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            recorder = _RecordingWriter(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else (
            recorder.error if recorder is not None and isinstance(e, Exception) else None)
        if cause is None:
            raise
        if cause.filename is None:
            cause.filename = path  # a failed write (no space, ...) names the file it was for
        if cause is e:
            raise
        raise cause from None
    fsync_dir(folder)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A text file written through `atomic_write`."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict written by either learner or by the original; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Checkpoints hold experiment statistics (numpy scalars, lists) besides tensors, as in the
        # original, so the full unpickler is needed: load only checkpoints you trust.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "network" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'network' entry (not a MAML++ checkpoint)")
    return state


@contextlib.contextmanager
def float32_precision(allow_tf32: bool, cudnn_benchmark: bool | None = None):
    """Run convolutions and matmuls in strict float32 unless `allow_tf32` (config key `allow_tf32`).

    cuDNN convolutions use TF32 by default on Ampere and newer GPUs (torch.backends.cudnn.allow_tf32),
    which rounds operands to 10 mantissa bits: ~5e-4 relative error in a MAML++ loss, enough to make
    two learners disagree. The learners keep float32 semantics by default and restore the caller's
    settings afterwards."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if cudnn_benchmark is not None:  # let cuDNN time its algorithms per shape (cached after the first call)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = old
