"""`mamlpp_fast.triton._device`'s per-stream launch helpers on a CPU. `side_by_side` (config key
conv_streams) runs in order whatever the setting, tells the observer bench.trace uses of each branch only
when the setting is on, and the learner sets it around each iteration from its config key. The ticket
buffers (`_tile_counters`) are kept, grown and never freed under a graph. The device side (two streams, a
CUDA graph's two branches, the same bits, no buffer allocated inside the learner's capture) is
tests/gpu/test_gpu_conv.py's `test_conv_streams_*` and `test_fast_learner_conv_streams_*`."""
import contextlib

import pytest
import torch

from mamlpp_fast.triton import _device as D


def _calls():
    log = []

    def thunk(name, value):
        def f():
            log.append(name)
            return value
        return f
    return log, thunk


@pytest.mark.parametrize("on", [False, True])
def test_side_by_side_runs_both_in_order_on_a_cpu(on):
    log, thunk = _calls()
    with D.forced_conv_streams(on):
        a, b = D.side_by_side(torch.device("cpu"), thunk("first", 1), thunk("second", [2]))
    assert (a, b) == (1, [2]) and log == ["first", "second"]
    assert D.conv_streams() is False


@pytest.mark.parametrize("on", [False, True])
def test_observer_sees_each_branch_only_when_on(on):
    log, thunk = _calls()
    seen = []

    @contextlib.contextmanager
    def observer(branch):
        seen.append(("enter", branch))
        yield
        seen.append(("exit", branch))

    D._OBSERVER[0] = observer
    try:
        with D.forced_conv_streams(on):
            D.side_by_side(torch.device("cpu"), thunk("first", 1), thunk("second", 2))
    finally:
        D._OBSERVER[0] = None
    assert log == ["first", "second"]
    assert seen == ([("enter", 0), ("exit", 0), ("enter", 1), ("exit", 1)] if on else [])


def test_setting_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with D.forced_conv_streams(True):
            assert D.conv_streams()
            raise RuntimeError("inside")
    assert D.conv_streams() is False


def test_learner_sets_conv_streams_from_its_config():
    from mamlpp_fast.config import ConfigError, default_args
    from mamlpp_fast.fast import MAMLFewShotClassifier

    with pytest.raises(ConfigError, match="conv_streams"):
        default_args(conv_streams="yes please")
    for value in (False, True):
        args = default_args(cnn_num_filters=4, num_classes_per_set=2, number_of_training_steps_per_iter=1,
                            number_of_evaluation_steps_per_iter=1, conv_streams=value)
        model = MAMLFewShotClassifier((1, 1, 28, 28), "cpu", args)
        with model.core.precision():
            assert D.conv_streams() is value
        assert D.conv_streams() is False


def test_ticket_buffer_grows_keeps_the_old_one_alive_and_counts_no_capture_allocation_on_a_cpu():
    """`_tile_counters`: one zeroed buffer per (device, stream), reused while large enough, replaced by a
    larger one (at least twice the size) when not; the replaced one is kept alive, since a CUDA graph
    captured on that stream may use it; a CPU call never counts as an allocation inside a capture."""
    dev = torch.device("cpu")
    key = (str(dev), 0)
    saved_counters, saved_retired, saved_allocs = dict(D._counters), list(D._retired), D.capture_allocations()
    D._counters.pop(key, None)
    try:
        a = D._tile_counters(dev, 10)
        assert a.numel() >= 4096 and int(a.abs().sum()) == 0 and a.dtype == torch.int32
        assert D._tile_counters(dev, 4096) is a
        retired = len(D._retired)
        b = D._tile_counters(dev, 5000)
        assert b is not a and b.numel() >= 8192 and int(b.abs().sum()) == 0
        assert len(D._retired) == retired + 1 and D._retired[-1] is a
        assert D._tile_counters(dev, 7) is b
        assert D.capture_allocations() == saved_allocs
    finally:
        D._counters.clear()
        D._counters.update(saved_counters)
        D._retired[:] = saved_retired

