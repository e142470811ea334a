"""bench.conv_ab (the device A/B of the convolutions' launch configurations): on a CPU, the pieces that do
not need a device. The timing itself runs in `make gpu-session`."""
import subprocess
import sys

import pytest
import torch

from bench.conv_ab import LAYERS, cases, doubled_split, kmajor_configs, more_splits, more_warps, to_markdown


def test_kmajor_configs_are_those_of_triton_37_and_restored(monkeypatch):
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))  # as on the device machines
    real_f, real_w = C.conv_block_config, C.wgrad_block_config
    cur_f = C.conv_block_config("fwd", 20 * 196, 64, 64, 9, 8, 132)
    cur_w = C.wgrad_block_config(64, 64, 9, 20 * 196, 8, 132)
    assert cur_f["GATHER_MK"] and cur_f["BLOCK_K"] == 32 and cur_w["TAP_MAJOR"]
    with kmajor_configs():
        old_f = C.conv_block_config("fwd", 20 * 196, 64, 64, 9, 8, 132)
        old_w = C.wgrad_block_config(64, 64, 9, 20 * 196, 8, 132)
        assert C._TRITON_VERSION == (3, 6)  # the ptxas options (`_register_cap`) stay the installed version's
    assert not old_f["GATHER_MK"] and old_f["BLOCK_K"] == 16 and not old_w["TAP_MAJOR"]
    assert (C.conv_block_config, C.wgrad_block_config) == (real_f, real_w)


def test_markdown_rows():
    rep = dict(device="X", date="d", torch="t", triton="3.6.0", git="g", command="c", iters=5,
               rows=[dict(layer="omniglot-14x14", kernel="forward",
                          ms={"current": 0.05, "programs target": None, "k-major": 0.06, "2x warps": 0.04,
                              "2x split": None},
                          speedup={"programs target": None, "k-major": 0.05 / 0.06, "2x warps": 1.25, "2x split": None},
                          max_rel_diff=3e-7)])
    md = to_markdown(rep)
    assert "| omniglot-14x14 | forward | 0.0500 | = | = | 0.0600 | 0.83x | 0.0400 | 1.25x | = | = | 3.0e-07 |" in md
    assert "Triton 3.6.0" in md


def test_more_warps_doubles_the_warps_only_and_restores(monkeypatch):
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    real_f, real_w = C.conv_block_config, C.wgrad_block_config
    args_f, args_w = ("fwd", 20 * 196, 64, 64, 9, 8, 132), (64, 64, 9, 20 * 196, 8, 132)
    cur_f, cur_w = C.conv_block_config(*args_f), C.wgrad_block_config(*args_w, strict_fp32=True)
    with more_warps():
        wide_f, wide_w = C.conv_block_config(*args_f), C.wgrad_block_config(*args_w, strict_fp32=True)
    assert wide_f["num_warps"] == min(8, 2 * cur_f["num_warps"]) and wide_w["num_warps"] == 2 * cur_w["num_warps"]
    assert {k: v for k, v in wide_f.items() if k != "num_warps"} == {k: v for k, v in cur_f.items() if k != "num_warps"}
    assert {k: v for k, v in wide_w.items() if k != "num_warps"} == {k: v for k, v in cur_w.items() if k != "num_warps"}
    assert (C.conv_block_config, C.wgrad_block_config) == (real_f, real_w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
@pytest.mark.parametrize("args, word", [([], "needs a CUDA device"), (["--iters", "0"], "--iters")])
def test_one_line_error_without_a_device(args, word):
    p = subprocess.run([sys.executable, "-m", "bench.conv_ab", *args], capture_output=True, text=True)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_two_warp_weight_gradient_tiles_only_for_strict_fp32_under_triton_36(monkeypatch):
    """The tap-major 64 x 64 weight-gradient tiles with 32 lanes per step run on 2 warps under Triton < 3.7
    in strict float32 only (`wgrad_block_config`): tl.dot's TF32 path needs a 4-warp group, float64 twice
    the registers; the tiles do not change, and the 2-warp launches split into more chunks where the
    reduction allows (`split_target` counts warps)."""
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    for red in (20 * 196, 20 * 49):  # Omniglot's 14x14 and 7x7 layers: 32 lanes per step
        strict = C.wgrad_block_config(64, 64, 9, red, 8, 132, strict_fp32=True)
        other = C.wgrad_block_config(64, 64, 9, red, 8, 132)
        assert strict["TAP_MAJOR"] and strict["BLOCK_K"] == 32
        assert strict["num_warps"] == 2 and other["num_warps"] == 4 and strict["SPLIT"] > other["SPLIT"]
        same = ("num_warps", "SPLIT", "CHUNK")
        assert {k: v for k, v in strict.items() if k not in same} == {k: v for k, v in other.items() if k not in same}
    # 3x3: 16 lanes per step on 4 warps, but 32 on 2 in strict fp32 (216 programs balance over 132 SMs as
    # well as 16 lanes' 432)
    small = C.wgrad_block_config(64, 64, 9, 20 * 9, 8, 132)
    assert small["BLOCK_K"] == 16 and small["num_warps"] == 4 and small["SPLIT"] == 6
    small = C.wgrad_block_config(64, 64, 9, 20 * 9, 8, 132, strict_fp32=True)
    assert small["BLOCK_K"] == 32 and small["num_warps"] == 2 and small["SPLIT"] == 3
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 7))
    assert (C.wgrad_block_config(64, 64, 9, 20 * 196, 8, 132, strict_fp32=True)
            == C.wgrad_block_config(64, 64, 9, 20 * 196, 8, 132))


def test_48_channel_weight_gradient_tiles_pad_least_in_strict_fp32_under_triton_36(monkeypatch):
    """At 48 channels (K = 48 * 9 = 432 columns) the strict-fp32 weight gradient under Triton < 3.7 takes,
    of the column widths that reach 2 waves, the one whose tiles pad least: 7 x 64 columns (3.6% padding,
    2 warps) instead of 4 x 128 (16%, 4 warps); still >= 2 waves of programs. TF32 / float64 and Triton
    3.7 keep the widest; a layer where only 32 reaches 2 waves (10 x 10 support set) is unchanged."""
    import triton

    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    for red in (75 * 42 * 42, 5 * 42 * 42, 75 * 21 * 21, 75 * 10 * 10):
        strict = C.wgrad_block_config(48, 48, 9, red, 2, 132, strict_fp32=True)
        other = C.wgrad_block_config(48, 48, 9, red, 2, 132)
        assert (strict["BLOCK_N"], strict["num_warps"], strict["NSUB"]) == (64, 2, 3)
        assert (other["BLOCK_N"], other["num_warps"]) == (128, 4)
        assert triton.cdiv(432, 64) * 2 * strict["SPLIT"] >= 2 * 132
    small = 5 * 10 * 10  # the same tiles; only strict fp32 reads the lanes inside the image unmasked (INSIDE)
    strict, other = (C.wgrad_block_config(48, 48, 9, small, 2, 132, strict_fp32=True),
                     C.wgrad_block_config(48, 48, 9, small, 2, 132))
    assert strict.pop("INSIDE") and not other.pop("INSIDE") and strict == other
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 7))
    assert (C.wgrad_block_config(48, 48, 9, 75 * 42 * 42, 2, 132, strict_fp32=True)
            == C.wgrad_block_config(48, 48, 9, 75 * 42 * 42, 2, 132))


def test_block_configuration_is_the_same_under_both_triton_versions(monkeypatch):
    """The fused block's launch configuration does not depend on triton/conv.py's _TRITON_VERSION (which
    bench.trace --triton-configs and the tests set): 16-window steps in its forward's pass (and the double
    backward's d(gout) pass), on 8 warps with Omniglot's 16-wide patches and 4 with mini-ImageNet's
    32-wide ones; its backward's one pass on 8 warps."""
    from mamlpp_fast.triton import conv as C
    from mamlpp_fast.triton import conv_block as B
    for version in ((3, 6), (3, 7)):
        monkeypatch.setattr(C, "_TRITON_VERSION", version)
        for kp, fwd_warps in ((16, 8), (32, 4)):
            cfg = B.block_config(20 * 14 * 14, 8, 64, kp, torch.device("cpu"), sms=132)
            assert cfg["RBLOCK_W"] == 16 and cfg["BLOCK_W"] == 16
            assert cfg["BWD_WARPS"] == 8 and cfg["FWD_WARPS"] == fwd_warps


def test_doubled_split_covers_the_reduction_in_twice_the_chunks(monkeypatch):
    """bench.conv_ab's "2x split": the same tiles with the reduction in about twice the chunks, each of at
    least two k-steps, SPLIT x CHUNK covering the reduction and no chunk empty; the first layer's one-block
    forward is left alone; the config functions are restored afterwards."""
    import triton

    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    real_f, real_w = C.conv_block_config, C.wgrad_block_config
    for kind, rows, c, h in (("fwd", 20 * 49, 64, 7), ("dgrad", 20 * 196, 64, 14), ("fwd", 75 * 42 * 42, 48, 42)):
        args = (kind, rows, c, c, 9, 8, 132)
        cur = C.conv_block_config(*args)
        with more_splits():
            new = C.conv_block_config(*args)
        steps = 9 * triton.cdiv(c, cur["BLOCK_K"])
        assert new["SPLIT"] > cur["SPLIT"] and new["CHUNK"] >= 2
        assert (new["SPLIT"] - 1) * new["CHUNK"] < steps <= new["SPLIT"] * new["CHUNK"]
        assert {k: v for k, v in new.items() if k not in ("SPLIT", "CHUNK")} == \
            {k: v for k, v in cur.items() if k not in ("SPLIT", "CHUNK")}
    for red in (20 * 196, 20 * 49, 75 * 42 * 42):
        args = (64, 64, 9, red, 8, 132)
        cur = C.wgrad_block_config(*args, strict_fp32=True)
        with more_splits():
            new = C.wgrad_block_config(*args, strict_fp32=True)
        assert new["SPLIT"] > cur["SPLIT"] and new["CHUNK"] % cur["BLOCK_K"] == 0 and new["CHUNK"] >= 2 * cur["BLOCK_K"]
        assert (new["SPLIT"] - 1) * new["CHUNK"] < red <= new["SPLIT"] * new["CHUNK"]
    small = C.conv_block_config("fwd", 20 * 28 * 28, 64, 1, 9, 8, 132)
    assert small["SMALL"] and doubled_split(small, "block", ("fwd", 20 * 28 * 28, 64, 1, 9, 8, 132)) == small
    assert (C.conv_block_config, C.wgrad_block_config) == (real_f, real_w)


def test_cases_run_a_variant_only_where_its_configuration_differs(monkeypatch):
    """Every layer and kernel runs its current configuration; a variant runs only where it changes the
    configuration: under Triton 3.6 Omniglot's 3x3 weight gradient cannot split further (its chunks are
    at two steps already), and under Triton 3.7 "k-major" is the current configuration everywhere."""
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    got = cases(list(LAYERS))
    for name in LAYERS:
        for kernel in ("forward", "data gradient", "weight gradient"):
            assert (name, kernel, "current") in got and (name, kernel, "2x warps") in got
    assert ("omniglot-3x3", "weight gradient", "2x split") not in got
    assert ("omniglot-14x14", "weight gradient", "2x split") in got
    assert ("omniglot-14x14", "forward", "k-major") in got
    # the previous split target differs for the weight gradients whose programs have fewer than 4 warps
    assert ("omniglot-14x14", "weight gradient", "programs target") in got
    assert ("miniimagenet-target-42x42", "weight gradient", "programs target") in got
    assert not [c for c in got if c[2] == "programs target" and c[1] != "weight gradient"]
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 7))
    assert not [c for c in cases(list(LAYERS)) if c[2] == "k-major"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
def test_unknown_layer_is_named():
    p = subprocess.run([sys.executable, "-m", "bench.conv_ab", "--layers", "omniglot-14x14,nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "nope" in p.stderr and "omniglot-14x14" in p.stderr


def test_the_ab_times_strict_fp32_products_whatever_torch_allows(monkeypatch):
    """torch turns cudnn.allow_tf32 on by default, and the launchers follow it unless a precision is
    forced: the A/B forces strict float32 (the learner's default), so that it times those kernels."""
    from bench.conv_ab import strict_products
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert C._precision(torch.float32) == "tf32"
    with strict_products():
        assert C._precision(torch.float32) == "ieee"
    assert C._precision(torch.float32) == "tf32"


def test_split_target_counts_warps(monkeypatch):
    """`split_target`: RESIDENT_WARPS warps per SM, never fewer than 2 programs per SM; the weight
    gradients of the layers whose chunks allow it then supply at least that many warps per SM (Triton 3.6
    rules, 132 SMs), and the previous target ("programs target") gives the old, smaller grids back."""
    import triton

    from bench.conv_ab import layer_configs, variant
    from mamlpp_fast.triton import conv as C
    assert C.split_target(132, 4) == 264 and C.split_target(132, 2) == 528 and C.split_target(132, 1) == 1056
    assert C.split_target(132, 8) == 264
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    for name, kernel, tiles in (("omniglot-14x14", "weight gradient", 9 * 8), ("omniglot-7x7", "weight gradient", 9 * 8),
                                ("miniimagenet-target-42x42", "weight gradient", 7 * 2)):
        cfg = layer_configs(name, kernel)
        programs = tiles * cfg["SPLIT"]
        assert programs * cfg["num_warps"] >= C.RESIDENT_WARPS * 132, (name, kernel, cfg)
        with variant("programs target"):
            old = layer_configs(name, kernel)
        assert old["SPLIT"] < cfg["SPLIT"] and tiles * old["SPLIT"] >= 2 * 132
        assert {k: v for k, v in old.items() if k not in ("SPLIT", "CHUNK")} == \
            {k: v for k, v in cfg.items() if k not in ("SPLIT", "CHUNK")}
    # where the chunks' two-step minimum binds (Omniglot's 3x3 weight gradient: 180 lanes, 32 per step)
    cfg = layer_configs("omniglot-3x3", "weight gradient")
    assert cfg["SPLIT"] == triton.cdiv(20 * 9, 2 * cfg["BLOCK_K"])
