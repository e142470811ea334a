"""bench.precision's emulation of the Triton products' input precisions (config key conv_precision) on a
CPU: TF32 rounding of single values, and the error of each emulated convolution launcher against float64
on fresh random inputs.

Margins: TF32 keeps 10 mantissa bits, so each rounded operand is off by at most 2^-11 relative (mean
|error| ~2^-13); a sum of products of independent operands then has a relative error of the order of
2^-12 ~ 2.4e-4 whatever the length of the sum, measured 2.5e-4 to 2.9e-4 here: asserted inside
[2e-5, 2e-3] (a factor of ~10 each side). tf32x3 drops only the lo*lo product (2^-22 relative) and sums in
float32: asserted below 1e-5, like strict float32 (the launchers' float32 error is ~2e-7 to 5e-7).
"""
import pytest
import torch

from _batches import fresh_seed
from bench.precision import emulated_launchers, round_tf32


def test_round_tf32_values():
    x = torch.tensor([1.0, 1 + 2 ** -11, 1 + 2 ** -10 + 2 ** -11, 1 + 3 * 2 ** -12, -(1 + 3 * 2 ** -12),
                      1 + 2 ** -12, 2.0 ** -130, float("inf"), float("-inf")], dtype=torch.float32)
    want = [1.0, 1 + 2 ** -10, 1 + 2 ** -9, 1 + 2 ** -10, -(1 + 2 ** -10), 1.0, 2.0 ** -130, float("inf"),
            float("-inf")]
    got = round_tf32(x).tolist()
    assert got == want
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()
    y = torch.randn(1000)
    r = round_tf32(y)
    assert ((r - y).abs() <= y.abs() * 2 ** -11).all()
    assert (r.view(torch.int32) & 0x1FFF == 0).all()  # 13 low mantissa bits cleared


@pytest.mark.parametrize("which", ["forward", "data_grad", "weight_grad"])
def test_emulated_launcher_errors(which):
    seed = fresh_seed() % 2 ** 31
    g = torch.Generator().manual_seed(seed)
    b, co, ci, n, h = 2, 16, 24, 3, 10
    meta = (b, co, ci, 3, 3, h, h, h, h, 1, 1)
    x = torch.randn(n, b * ci, h, h, generator=g)
    w = torch.randn(b, co, ci, 3, 3, generator=g)
    gy = torch.randn(n, b * co, h, h, generator=g)
    args = {"forward": lambda f, d: f(x.to(d), w.to(d), None, meta),
            "data_grad": lambda f, d: f(gy.to(d), w.to(d), meta),
            "weight_grad": lambda f, d: f(x.to(d), gy.to(d), meta)}[which]
    idx = {"forward": 0, "data_grad": 1, "weight_grad": 2}[which]
    ref = args(emulated_launchers("ieee")[idx], torch.float64)
    err = {}
    for mode in ("ieee", "tf32", "tf32x3"):
        out = args(emulated_launchers(mode)[idx], torch.float32)
        assert out.dtype == torch.float32
        err[mode] = float((out.double() - ref).norm() / ref.norm())
    assert err["ieee"] < 1e-5 and err["tf32x3"] < 1e-5, (err, seed)
    assert 2e-5 < err["tf32"] < 2e-3, (err, seed)


def test_device_mode_refusals(capsys):
    """--device cuda measures on a GPU (scripts/gpu_session.sh runs it); here it refuses with a message
    that names the cause, as do an unknown device and the CPU-only options beside it."""
    import torch
    from bench.precision import main
    with pytest.raises(SystemExit):
        main(["--device", "tpu", "--seeds", "0"])
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--device", "cuda", "--seeds", "0"])
        assert "no CUDA device here" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit):
            main(["--device", "cuda", "--seeds", "0", "--per-layer"])
        assert "meta-gradient errors only" in capsys.readouterr().err


def test_learner_run_through_the_emulated_launchers(tmp_path):
    """bench.precision's own run: the fast learner with conv_impl="triton" on the emulated launchers (its
    `emulation` stands in for the Triton implementation, whatever arguments the op passes it) against
    the float64 oracle, one seed (the default first seed: deterministic) of a reduced Omniglot 5-way
    1-shot. Strict float32 (ieee) stays at float32 rounding: measured 8e-7 relative on the meta-gradient,
    asserted < 1e-4 (a wrong gradient is off by O(1)); TF32 rounds every operand to 10 bits: coarser."""
    import json

    from bench.precision import main
    out = tmp_path / "prec.json"
    assert main(["--workload", "omniglot_5w1s", "--batch-size", "2", "--filters", "8", "--steps", "2",
                 "--seeds", "1", "--modes", "ieee,tf32", "--real-updates", "0", "--out", str(out)]) in (0, None)
    grad = {m: v["grad"]["max"] for m, v in json.loads(out.read_text())["summary"].items()}
    assert grad["ieee"] < 1e-4 and grad["tf32"] > grad["ieee"], grad
