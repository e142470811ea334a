"""Task batches prepared in the background and copied to the device ahead of the learner.

Why: drawing a batch (task seeds, image gather, Omniglot rotations, float conversion) takes the main
thread ~1.5 ms for Omniglot 20-way 1-shot B=8 and more for mini-ImageNet; done in series with the
meta-update it is lost time. Here it overlaps with the learner in two stages:

1. `task_batch_loader`: a `torch.utils.data.DataLoader` over `TaskBatchDataset`, a map-style dataset
   whose item i is the whole batch of the tasks with seeds first_seed + i*per_item ... (the original's
   seeds, unchanged). `num_workers` processes (the config key `num_dataprovider_workers`; 0 = in the
   main process, as torch does) prepare items `prefetch_factor` ahead each and send them as numpy
   arrays (see task_batch_loader for why not as tensors). Items are whole batches
   (`batch_size=None`: no collation) because the sampler gathers and converts a batch's images in one
   vectorised call, cheaper than collating tasks one by one as the original's loader does. The
   DataLoader returns items in index order whatever the number of workers, so the task stream is the
   same as the one-thread generators of `MetaLearningSystemDataLoader`. Workers are forked where the
   platform allows it, so that the decoded images are shared with the parent instead of pickled.
   We use the DataLoader rather than a hand-written pool: it is the ecosystem's tool for this, handles
   worker failures, ordering and shutdown, and its per-batch cost (one pickled tuple of arrays
   through a pipe) is small next to a meta-update; threads would contend for the interpreter lock
   with the learner's own Python work.
2. `receive_in_background`: with workers, a thread of this process receives their batches (and pins
   them for a CUDA device) while the main thread is inside the learner, so that the main thread only
   takes ready tensors from a queue.
3. `prefetch_to_device`: copies each host batch to the device `depth` batches ahead: into pinned
   memory (which asynchronous copies need), then non-blocking copies on a side CUDA stream; the
   learner's stream waits on an event before using a batch (and the tensors are marked as used by
   that stream, so the caching allocator does not reuse them early). On a CPU device the batches
   pass through unchanged.

Nothing here synchronises the device with the host.
"""
from __future__ import annotations

import collections
import multiprocessing
import functools
import os
import queue
import sys
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["TaskBatchDataset", "task_batch_loader", "prefetch_to_device", "regroup_batches"]


class TaskBatchDataset(torch.utils.data.Dataset):
    """Item i = the tasks with seeds first_seed + [i*per_item, min((i+1)*per_item, num_tasks)) of one
    set, as C-contiguous numpy arrays (x_support, x_target, y_support, y_target); the last item may be
    smaller.

    `sampler` is a `FewShotTaskSampler` (anything with `get_batch(set_name, seeds, augment_images)`).
    """

    def __init__(self, sampler: Any, set_name: str, first_seed: int, num_tasks: int, per_item: int,
                 augment_images: bool = False):
        if per_item < 1:
            raise ValueError(f"tasks per item must be >= 1, got {per_item}")
        self.sampler, self.set_name = sampler, set_name
        self.first_seed, self.num_tasks, self.per_item = int(first_seed), int(num_tasks), int(per_item)
        self.augment_images = bool(augment_images)

    def __len__(self) -> int:
        return -(-self.num_tasks // self.per_item)

    def seeds(self, index: int) -> range:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.per_item
        stop = min(start + self.per_item, self.num_tasks)
        return range(self.first_seed + start, self.first_seed + stop)

    def __getitem__(self, index: int):
        batch = self.sampler.get_batch(self.set_name, self.seeds(index), self.augment_images)
        return tuple(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C") for a in batch)


def _as_is(item):
    """The DataLoader's collate_fn: keep the worker's numpy arrays (see task_batch_loader)."""
    return item


def as_tensors(batch) -> tuple:
    """numpy batch -> torch tensors sharing its memory."""
    return tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in batch)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when the process that started it dies (prctl
    PR_SET_PDEATHSIG). A worker blocked on a full pipe never runs the DataLoader's own parent check: after
    a SIGKILL of the trainer such workers were seen waiting for 20 minutes. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(_worker_id: int, parent: int) -> None:
    """In a worker process: die with the trainer (`_die_with_parent`), and open files afresh (a forked copy
    of the parent's zip handles would share their file offsets with it)."""
    _die_with_parent(parent)
    info = torch.utils.data.get_worker_info()
    after_fork = getattr(getattr(info.dataset, "sampler", None), "after_fork", None)
    if after_fork is not None:
        after_fork()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def task_batch_loader(dataset: TaskBatchDataset, num_workers: int = 0,
                      prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """The DataLoader of `dataset`'s items, in order, prepared by `num_workers` processes (no more
    than there are items, so that a short evaluation pass does not start idle workers, nor than this
    process may use CPU cores, the DataLoader's own advice).

    Items stay numpy arrays until they reach this process (collate_fn keeps them): a worker then sends
    a batch's bytes through the DataLoader's pipe, one copy, where torch tensors would each travel as a
    shared-memory file descriptor with its own socket handshake (profiled here: that handshake made
    receiving a batch cost the main thread about as much CPU as drawing it). `receive_in_background`
    then takes the receiving (and pinning) off the main thread."""
    num_workers = max(0, min(int(num_workers), len(dataset), _cpu_count()))
    if num_workers and torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun the process runs the collective library's threads; forking worker processes then can
        # copy a lock another thread holds (a fresh-clone test run hung in the torchrun experiment test). Data
        # parallelism already splits the batch drawing over the ranks: draw in the main thread.
        num_workers = 0
    kwargs: dict[str, Any] = {"collate_fn": _as_is}
    if num_workers > 0:
        kwargs["prefetch_factor"] = int(prefetch_factor)
        kwargs["worker_init_fn"] = functools.partial(_worker_init, parent=os.getpid())
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, **kwargs)


class _End:
    def __init__(self, error: BaseException | None = None):
        self.error = error


def receive_in_background(items: Iterable[Any], pin: bool = False, ahead: int = 2) -> Iterator[tuple]:
    """Iterate `items` (the DataLoader of worker processes) in a background thread of this process and
    hand out its batches as torch tensors (pinned with `pin`), in order, up to `ahead` of them ready.

    Why: receiving a batch from a worker (reading its bytes from the pipe, unpickling) and pinning it
    take the main thread about a millisecond per batch; here they run while the main thread is inside
    the learner (whose kernels release the interpreter lock), the role the DataLoader's own pinning
    thread plays for tensors. The thread stops when the consumer stops; an error in it (a worker's
    DatasetError) is raised in the consumer."""
    # Two C-level queues rather than one queue.Queue, whose get() is Python code (a lock and a condition):
    # the consumer's side of a batch is one get() and one put(), the least work in the main thread.
    ready: queue.SimpleQueue = queue.SimpleQueue()  # batches (and the _End), in order
    slots: queue.SimpleQueue = queue.SimpleQueue()  # one token per batch the thread may still queue
    for _ in range(max(1, int(ahead))):
        slots.put(None)
    stop = threading.Event()
    it = iter(items)

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                continue
            ready.put(obj)
            return True
        return False

    def run() -> None:
        try:
            for batch in it:
                batch = as_tensors(batch)
                if pin:
                    batch = tuple(t.pin_memory() for t in batch)
                if not put(batch):
                    return
            put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_End(e))

    thread = threading.Thread(target=run, name="mamlpp-batch-receiver", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item.__class__ is _End:
                if item.error is not None:
                    raise item.error
                return
            slots.put(None)
            yield item
    finally:
        stop.set()


def regroup_batches(batches: Iterable[Sequence[Any]], per_item: int) -> Iterator[tuple]:
    """Re-cut a stream of task batches (arrays or tensors with the task dimension first) into batches
    of `per_item` tasks (the last may be smaller), keeping the task order. For data loaders that only
    have the original's get_*_batches generators."""
    pending: list[tuple] = []
    count = 0

    def cat(parts):
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return np.concatenate([np.asarray(p) for p in parts])

    def take(n):
        nonlocal pending, count
        out, rest, got = [], [], 0
        for part in pending:
            b = len(part[0])
            if got >= n:
                rest.append(part)
            elif got + b <= n:
                out.append(part)
                got += b
            else:
                k = n - got
                out.append(tuple(a[:k] for a in part))
                rest.append(tuple(a[k:] for a in part))
                got = n
        pending, count = rest, count - got
        return tuple(cat([p[i] for p in out]) for i in range(4))

    for batch in batches:
        pending.append(tuple(batch[:4]))
        count += len(batch[0])
        while count >= per_item:
            yield take(per_item)
    if count:
        yield take(count)


def prefetch_to_device(batches: Iterable[Sequence[Any]], device: Any, depth: int = 2) -> Iterator[tuple]:
    """Yield the batches of `batches` on `device`, the copies of the next `depth` issued ahead.

    CUDA: each tensor is copied with `non_blocking=True` on a side stream (asynchronous when the host
    tensor is pinned), an event marks the copy's end, and the consumer's current stream waits on it
    when the batch is handed out. Other devices: `.to(device)` when a tensor is elsewhere, else as is.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    it = iter(batches)
    try:
        yield from _prefetch(it, device, depth)
    finally:
        close = getattr(it, "close", None)  # stops the source (and its worker processes) now
        if close is not None:
            close()


def _prefetch(it: Iterator, device: torch.device, depth: int) -> Iterator[tuple]:
    if device.type != "cuda":
        for batch in it:
            yield tuple(t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t
                        for t in batch[:4])
        return
    side = torch.cuda.Stream(device=device)
    queue: collections.deque = collections.deque()

    def issue() -> bool:
        host = next(it, None)
        if host is None:
            return False
        host = [torch.as_tensor(t) for t in host[:4]]
        # asynchronous copies need pinned host memory (receive_in_background pins already)
        host = [t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t for t in host]
        with torch.cuda.stream(side):
            moved = tuple(t.to(device, non_blocking=True) for t in host)
            done = torch.cuda.Event()
            done.record(side)
        queue.append((moved, done))
        return True

    for _ in range(max(1, int(depth))):
        if not issue():
            break
    while queue:
        moved, done = queue.popleft()
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        for t in moved:
            t.record_stream(current)
        issue()
        yield moved
