"""The fast learner's op backend is its own choice: constructing a learner changes nothing
process-wide, and its ops run on the backend of its config key `backend`."""
import pytest
import torch

from _batches import learnable_batch
from mamlpp_fast import ops
from mamlpp_fast.config import default_args
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
from mamlpp_fast.ops import backend as registry
from mamlpp_fast.ops import torch_backend


def _learner(backend):
    args = default_args(dtype="float64", backend=backend, cnn_num_filters=4, num_stages=2, batch_size=2,
                        image_height=14, image_width=14, number_of_training_steps_per_iter=2,
                        number_of_evaluation_steps_per_iter=2)
    return Fast((2, args.image_channels, args.image_height, args.image_width), "cpu", args), args


def _spy_torch_backend(monkeypatch):
    """Count the BN forwards of the torch backend (loaded afresh so that the registry sees the spy)."""
    calls = []
    real = torch_backend.bn_forward

    def bn_forward(*args):
        calls.append(args[0].device.type)
        return real(*args)
    monkeypatch.setattr(torch_backend, "bn_forward", bn_forward)
    registry.clear_cache()
    return calls


def test_constructing_a_learner_sets_no_process_wide_backend(fresh_registry):
    auto_choice = ops.get_backend(device="cpu").name
    learner, _ = _learner("torch")
    assert registry.set_backend(None) is None           # nothing was set for the process
    assert ops.get_backend(device="cpu").name == auto_choice
    assert learner.backend_name == "torch"


@pytest.mark.skipif("native" not in ops.available_backends("cpu"), reason="mamlpp_fast._C not built")
def test_each_learner_runs_its_own_backend(fresh_registry):
    calls = _spy_torch_backend(fresh_registry)
    on_torch, args = _learner("torch")
    on_native, _ = _learner("native")     # built second: it must not redirect the first one's ops
    batch = learnable_batch(2, args.num_classes_per_set, args.num_samples_per_class, args.num_target_samples,
                            args.image_channels, args.image_height, args.image_width, 0)
    on_native.run_validation_iter(batch)
    assert calls == []                     # the native learner never reached the torch backend
    on_torch.run_validation_iter(batch)
    assert calls and set(calls) == {"cpu"}
    assert (on_torch.backend_name, on_native.backend_name) == ("torch", "native")


def test_cli_logs_the_backend_choice_with_v(capsys, fresh_registry):
    """The CLI configures logging once: with -v the registry's INFO line about the backend shows."""
    import logging

    from mamlpp_fast import cli
    log = logging.getLogger("mamlpp_fast")
    saved = (log.level, list(log.handlers))
    try:
        cli._configure_logging(1)
        cli._configure_logging(1)                    # configuring again adds no second handler
        ops.get_backend("torch", device="cpu")
        err = capsys.readouterr().err
        assert err.count("mamlpp: mamlpp_fast ops: backend 'torch' runs cpu tensors") == 1, err
        cli._configure_logging(0)
        registry.clear_cache()
        ops.get_backend("torch", device="cpu")
        assert "backend" not in capsys.readouterr().err
    finally:
        log.setLevel(saved[0])
        log.handlers[:] = saved[1]


def test_cli_bench_is_removed_with_a_pointer():
    from mamlpp_fast import cli
    assert cli.main(["bench", "--quick"]) == 2


@pytest.mark.skipif("native" not in ops.available_backends("cpu"), reason="mamlpp_fast._C not built")
@pytest.mark.parametrize("fixed", ["learnable_bn_gamma", "learnable_bn_beta"])
def test_inner_loop_bn_with_one_fixed_parameter_runs_on_the_native_backend(fixed):
    """With enable_inner_loop_optimizable_bn_params and one of gamma/beta not learnable, the fast learner
    passes a per-task (B, C) parameter beside a shared (C,) one: valid op input, which the op hands to
    the native kernels in their layout (it used to stop inside the backend: 'beta must have the shape
    of gamma'). The meta-update equals the reference's (float64)."""
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference

    args = default_args(dtype="float64", backend="native", cnn_num_filters=4, num_stages=2, batch_size=2,
                        image_height=14, image_width=14, number_of_training_steps_per_iter=2,
                        number_of_evaluation_steps_per_iter=2, per_step_bn_statistics=True,
                        enable_inner_loop_optimizable_bn_params=True, **{fixed: False})
    batch = learnable_batch(2, args.num_classes_per_set, 1, 1, 1, 14, 14, 3)
    fast = Fast((2, 1, 14, 14), "cpu", args)
    ref = Reference((2, 1, 14, 14), "cpu", args)
    lf, lr = float(fast.run_train_iter(batch, 0)[0]["loss"]), float(ref.run_train_iter(batch, 0)[0]["loss"])
    assert abs(lf - lr) <= 1e-12 * abs(lr)
    step = args.meta_learning_rate
    for key, want in ref.state_dict().items():
        # conv biases feed batch norm: their exact meta-gradient is 0 and Adam turns rounding noise into
        # steps of at most the learning rate, so they are compared to a bound far below one step
        tol = 1e-3 * step if key.endswith(("conv.bias", "conv-bias")) else 1e-9 * max(float(want.abs().max()), 1.0)
        assert float((fast.state_dict()[key] - want).abs().max()) <= tol, key


def test_cli_log_handler_follows_the_current_stderr(monkeypatch):
    """main() may run several times in one process (tests, notebooks) with sys.stderr swapped in between: the
    one handler the CLI installs writes to the stderr of the moment, never to a stream that has been closed."""
    import io
    import logging

    from mamlpp_fast import cli
    log = logging.getLogger("mamlpp_fast")
    saved = (log.level, list(log.handlers))
    try:
        first = io.StringIO()
        monkeypatch.setattr("sys.stderr", first)
        cli._configure_logging(1)
        first.close()
        second = io.StringIO()
        monkeypatch.setattr("sys.stderr", second)
        cli._configure_logging(1)
        log.info("after the swap")
        assert second.getvalue() == "mamlpp: after the swap\n"
    finally:
        log.setLevel(saved[0])
        log.handlers[:] = saved[1]
