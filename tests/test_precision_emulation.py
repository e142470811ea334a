"""bench.precision's emulation of the Triton products' input precisions (config key conv_precision) on a
CPU: TF32 rounding and truncation of single values, and the error of each emulated convolution launcher
against float64 on fresh random inputs.

Margins. A TF32 product reads the top 19 bits of each float32 operand: truncation toward zero, which
takes off a fraction u * 2^-10 / m of an operand of mantissa m in [1, 2) (u uniform in [0, 1)), on
average 2^-11 * E[1/m] = 2^-11 * 0.72 = 3.5e-4 for normally distributed values (mantissas close to
log-uniform). Every product then shrinks by ~7.0e-4 on average: a systematic error of that size relative
to the whole sum, plus a random part of a few 1e-4 (measured in total: 7.5e-4 to 7.9e-4 over 60 seeds of
all three launchers, `python tests/tf32_margins.py launchers --seeds 60`). Asserted inside [3.5e-4, 2e-3]: a factor ~2 below the mean shrink and 2.6 above
the measured total; operands rounded to nearest instead (no bias; 2.5e-4 to 2.9e-4) fail the lower
bound. tf32x3 rounds hi to nearest (|lo| <= 2^-11 |x|), truncates lo in the product (<= 2^-21 of the
operand) and drops lo*lo (<= 2^-22 of the product), then sums in float32: asserted below 1e-5, like strict
float32 (the launchers' float32 error is ~1.5e-7 to 3e-7).
"""
import pytest
import torch

from _batches import fresh_seed
from bench.precision import emulated_launchers, round_tf32, trunc_tf32


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


def test_trunc_tf32_values():
    x = torch.tensor([1.0, 1 + 2 ** -11, 1 + 2 ** -10 + 2 ** -11, 1 + 2 ** -10 - 2 ** -20, -(1 + 3 * 2 ** -12),
                      2.0 ** -130, float("inf"), float("-inf")], dtype=torch.float32)
    want = [1.0, 1.0, 1 + 2 ** -10, 1.0, -1.0, 2.0 ** -130, float("inf"), float("-inf")]
    assert trunc_tf32(x).tolist() == want
    assert torch.isnan(trunc_tf32(torch.tensor([float("nan")]))).all()
    y = torch.randn(1000)
    t = trunc_tf32(y)
    assert (t.abs() <= y.abs()).all() and ((y - t).abs() < y.abs() * 2 ** -10).all()
    assert (t.view(torch.int32) & 0x1FFF == 0).all()


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
    assert 3.5e-4 < err["tf32"] < 2e-3, (err, seed)


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


def test_per_layer_run_puts_tf32_in_one_layer_at_a_time(tmp_path):
    """--per-layer: TF32 in the convolutions of one layer, the others strict, for every layer (the forward's
    dual launch too, which passes a second operand pair). One deterministic batch (the default first
    seed) of a reduced Omniglot 5-way 1-shot: every layer's entry exists, and each differs from the
    float64 oracle far more than strict float32 does on the same batch (8e-7, see the test above):
    measured 3e-2 to 0.5; asserted > 1e-4, which a run that never reached the TF32 launchers fails."""
    import json

    from bench.precision import main
    out = tmp_path / "per_layer.json"
    assert main(["--workload", "omniglot_5w1s", "--batch-size", "2", "--filters", "8", "--steps", "2",
                 "--seeds", "1", "--modes", "tf32", "--per-layer", "--real-updates", "0",
                 "--out", str(out)]) in (0, None)
    per = json.loads(out.read_text())["per_layer"]
    assert sorted(per, key=int) == ["3", "7", "14", "28"]
    for h, runs in per.items():
        assert len(runs) == 1 and runs[0]["grad"] > 1e-4, (h, runs)


def test_margin_script_measures_the_launchers():
    """tests/tf32_margins.py, which measures the numbers the margins above are derived from: per mode one
    error per (seed, launcher), TF32 inside its window and far above strict and tf32x3 on the same draws."""
    import tf32_margins
    errs = tf32_margins.launcher_errors(2)
    assert set(errs) == {"ieee", "tf32", "tf32x3"} and all(len(v) == 6 for v in errs.values())
    assert min(errs["tf32"]) > 3.5e-4 > 1e-5 > max(errs["ieee"] + errs["tf32x3"])
