"""Device facts of the Triton kernels' launch heuristics (a leaf module: the kernel modules import it,
and the package's __init__ re-exports it, so that no module of triton/ imports its own package)."""
from __future__ import annotations

import contextlib
import functools
import os


def _interpret() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: the kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device (cached; used by the kernels' launch heuristics)."""
    return _sm_count(device.index if device.index is not None else 0)


_PRECISION = [None]  # the forced input precision of the Triton products, None: follow allow_tf32
PRECISIONS = ("ieee", "tf32", "tf32x3")


def conv_precision() -> str | None:
    """The input precision forced on the Triton convolution and fused-block products (float32 inputs),
    or None: "tf32" when torch.backends.cudnn.allow_tf32 is on, else "ieee" (strict float32)."""
    return _PRECISION[0]


@contextlib.contextmanager
def forced_conv_precision(mode: str | None):
    """Force `mode` ("ieee", "tf32", "tf32x3" or None) for the launches made inside the block (config key
    conv_precision; the learner sets it around each iteration, with the rest of its numerics)."""
    if mode is not None and mode not in PRECISIONS:
        raise ValueError(f"conv precision must be one of {PRECISIONS} or None, got {mode!r}")
    old = _PRECISION[0]
    _PRECISION[0] = mode
    try:
        yield
    finally:
        _PRECISION[0] = old


# the in-kernel tickets (the convolutions' split sums, the head's loss, bn_pool's shared-gamma sums)
_counters: dict = {}


def _tile_counters(device, tiles: int):
    """An int32 buffer of >= `tiles` zeros: the tickets of the kernels that elect the last program of a
    group (triton/conv.py `_last_chunk`, triton/head.py, triton/bn_pool.py). Every launch
    leaves its counters at zero (the last program of a tile resets its own), so one buffer per device and
    stream serves all launches, which run one after another on their stream, CUDA-graph replays
    included. Kept (and grown) outside graph capture only, so that no cached tensor lives in a graph's
    private pool; a capture that needs a larger buffer allocates and zeroes one of its own (one more node
    in the graph: `capture_allocations`; a capture on a stream that ran the same launches before finds
    the cached one). A buffer replaced by a larger one stays alive (`_retired`): a graph may use it."""
    import torch

    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    old = _counters.get(key)
    if old is not None and old.numel() >= tiles:
        return old
    size = max(tiles, 4096, 2 * (old.numel() if old is not None else 0))
    buf = torch.zeros(size, dtype=torch.int32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _capture_allocations[0] += 1
    else:
        _counters[key] = buf
        if old is not None:  # a graph captured on this stream may use it: never freed
            _retired.append(old)
    return buf


# buffers of `_tile_counters` replaced by larger ones, kept alive for the CUDA graphs that may use them
_retired: list = []
# how many buffers `_tile_counters` allocated (and zeroed) inside a CUDA-graph capture: one graph node each,
# on a stream whose buffer no run outside the capture had cached (the learner warms up on its capture
# stream so that this stays 0; tests/gpu checks it)
_capture_allocations = [0]


def capture_allocations() -> int:
    """Ticket buffers `_tile_counters` has allocated inside CUDA-graph captures in this process."""
    return _capture_allocations[0]


# ---- independent launches side by side (config key conv_streams) ----------------------------------------
_STREAMS = [False]   # whether `side_by_side` forks (the learner sets it around each iteration)
_side_streams: dict = {}
# bench.trace's observer: `side_by_side` on a CPU tensor with conv_streams on calls observer(branch) around
# each of its two launches (a context manager; branch 0 on the current stream, 1 on the side stream), so
# that the trace can tell which launches a device would run side by side
_OBSERVER = [None]


def conv_streams() -> bool:
    """Whether independent convolution launches run on two streams (`side_by_side`; config key
    conv_streams)."""
    return _STREAMS[0]


@contextlib.contextmanager
def forced_conv_streams(on: bool):
    """Set `conv_streams` for the launches made inside the block (the learner sets it around each
    iteration from its config key conv_streams)."""
    old = _STREAMS[0]
    _STREAMS[0] = bool(on)
    try:
        yield
    finally:
        _STREAMS[0] = old


def _side_stream(device, parent):
    """The side stream of `parent` on `device`: one per (device, parent stream), created on first use."""
    import torch

    key = (str(device), parent.cuda_stream)
    s = _side_streams.get(key)
    if s is None:
        s = _side_streams[key] = torch.cuda.Stream(device=device)
    return s


def side_by_side(device, first, second):
    """(first(), second()): two thunks whose launches are independent of each other (neither reads what
    the other writes). With `conv_streams` on a CUDA device, second's launches go to a side stream forked
    from the current one and joined back before returning, so that the device may run both at once; a
    CUDA-graph capture records the fork and the join as graph edges (two branches). Otherwise in order.

    Why it is safe without `record_stream`: the side stream belongs to one parent stream and takes work
    only inside this function, after waiting for everything queued on the parent so far. A tensor that
    second() allocates lives in the side stream's pool; when it is freed, the caching allocator may hand
    its memory out again only to a later allocation on the same side stream, which comes after a later
    fork, so after every use of it queued on the parent before the fork. The inputs, allocated on the
    parent, cannot be freed and reused before the join, which is queued on the parent before this
    function returns. The two thunks must not share lazily made data: `first` may, for example, make
    and cache a re-laid copy of a weight that `second` would read before the copy's kernel has run; the
    callers pair a weight gradient (which reads no weight) with launches that do."""
    obs = _OBSERVER[0]
    if not _STREAMS[0]:
        return first(), second()
    if device.type != "cuda":
        if obs is None:
            return first(), second()
        with obs(0):
            a = first()
        with obs(1):
            b = second()
        return a, b
    import torch

    parent = torch.cuda.current_stream(device)
    side = _side_stream(device, parent)
    side.wait_stream(parent)
    with torch.cuda.stream(side):
        b = second()
    a = first()
    parent.wait_stream(side)
    return a, b
