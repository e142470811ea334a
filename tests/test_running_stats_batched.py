"""The fast learner's running-statistics update in one stacked computation per meta-update
(`_update_running_stats`) against the reference's semantics: the sequential momentum updates
r <- (1-m) r + m v, one per task and forward in the reference's order (support, then target), and
against the per-row closed form (`_update_running_stats_rows`), in float64. Whole-learner equivalence
with the reference (running statistics included) is tests/test_fast_equivalence.py; this file adds
structures the learner produces only in some configurations (one or two forwards per row, rows in any
order) and the launch count on the trace.
"""
import copy

import pytest
import torch

from _batches import fresh_seed
from mamlpp_fast.config import default_args
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
from mamlpp_fast.reference import BN_EPS, BN_MOMENTUM

B, C = 3, 8


@pytest.fixture(autouse=True)
def _keep_process_backend():
    """The learner sets the process-wide op backend (config key `backend`): restore it afterwards."""
    from mamlpp_fast.ops.backend import set_backend
    previous = set_backend(None)
    set_backend(previous)
    yield
    set_backend(previous)


def _model(seed):
    args = default_args(dtype="float64", backend="torch", cnn_num_filters=C, number_of_training_steps_per_iter=3,
                        number_of_evaluation_steps_per_iter=3,
                        num_stages=2, image_height=8, image_width=8)
    model = Fast((2, args.image_channels, args.image_height, args.image_width), "cpu", args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in model.classifier.norm_layers():
            n.running_mean.copy_(torch.randn(n.running_mean.shape, generator=gen, dtype=torch.float64))
            n.running_var.copy_(torch.rand(n.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return model, gen


def _pending(gen, structure):
    """structure: list of ((layer, step), [M of each forward]) -> pending as _forward_tensors builds it."""
    out = {}
    for key, ms in structure:
        out[key] = [(torch.randn(B * C, generator=gen, dtype=torch.float64),
                     torch.rand(B * C, generator=gen, dtype=torch.float64) + 0.3, m) for m in ms]
    return out


def _sequential(model, pending):
    """The reference's order: for each task, each forward of the row, one momentum update."""
    m = BN_MOMENTUM
    for (layer, step), entries in pending.items():
        norm = model.classifier.layer_dict[f"conv{layer}"].norm_layer
        for t in range(B):
            for mean, invstd, count in entries:
                mu = mean.view(B, C)[t]
                var = (invstd.view(B, C)[t].pow(-2) - BN_EPS) * (count / (count - 1))
                norm.running_mean[step] = (1 - m) * norm.running_mean[step] + m * mu
                norm.running_var[step] = (1 - m) * norm.running_var[step] + m * var


STRUCTURES = [
    # MSL: support + target forward for every (layer, step), in the learner's insertion order
    [((l, s), [50, 30]) for s in range(3) for l in range(2)],
    # no MSL: target forward only at the last step; rows inserted out of layer order
    [((1, 0), [50]), ((0, 0), [50]), ((0, 1), [50]), ((1, 1), [50]), ((0, 2), [50, 7]), ((1, 2), [50, 7])],
    # a single row with one forward
    [((1, 2), [2])],
]


@pytest.mark.parametrize("structure", STRUCTURES, ids=["msl", "no_msl", "one_row"])
def test_batched_update_equals_sequential_float64(structure):
    seed = fresh_seed()
    model, gen = _model(seed)
    pending = _pending(gen, structure)
    seq, rows = copy.deepcopy(model), copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    _sequential(seq, pending)
    rows._update_running_stats_rows(pending)
    model._update_running_stats(pending)
    changed = 0
    for key, ref in seq.state_dict().items():
        if "running" not in key:
            continue
        got, alt = model.state_dict()[key], rows.state_dict()[key]
        scale = float(ref.abs().max())
        assert float((got - ref).abs().max()) <= 1e-12 * scale, f"{key} (seed {seed})"
        assert float((alt - ref).abs().max()) <= 1e-12 * scale, f"{key} per-row form (seed {seed})"
        changed += int(not torch.equal(got, before[key]))
    assert changed > 0


def test_cached_constants_reused_and_keyed_by_structure():
    model, gen = _model(fresh_seed())
    a, b = STRUCTURES[0], STRUCTURES[1]
    model._update_running_stats(_pending(gen, a))
    model._update_running_stats(_pending(gen, a))
    assert len(model._running_stats_consts) == 1
    model._update_running_stats(_pending(gen, b))
    assert len(model._running_stats_consts) == 2


def test_trace_running_stats_launches():
    # one meta-update of the quick Omniglot workload: 4 stages x 2 steps = 8 rows. On a CUDA device the
    # update is one Triton launch (mamlpp_fast/triton/running_stats.py); the stacked PyTorch form
    # (the torch backend's trace, and a device without Triton) a fixed 7, whatever the number of rows
    # (it was 17 per row)
    from bench.trace import summarize, trace_meta_update
    res = trace_meta_update("quick_omniglot_3w1s", None, "cuda", "triton", True, quick=True)
    assert [(k.name, k.launches) for k in res.kernels if k.kind == "running_stats"] == [("triton running_stats", 1)]
    s = summarize(trace_meta_update("quick_omniglot_3w1s", None, "torch", "grouped", True, quick=True))
    assert s["by_kind"]["running_stats"]["kernels"] == 7
