"""bench.conv_ab (the device A/B of the convolutions' launch configurations): on a CPU, the pieces that do
not need a device. The timing itself runs in `make gpu-session`."""
import subprocess
import sys

import pytest
import torch

from bench.conv_ab import kmajor_configs, to_markdown


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
               rows=[dict(layer="14x14", kernel="forward", ms_current=0.05, ms_kmajor=0.06, speedup=1.2,
                          max_rel_diff=3e-7)])
    md = to_markdown(rep)
    assert "| 14x14 | forward | 0.0500 | 0.0600 | 1.20x | 3.0e-07 |" in md and "Triton 3.6.0" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
@pytest.mark.parametrize("args, word", [([], "needs a CUDA device"), (["--iters", "0"], "--iters")])
def test_one_line_error_without_a_device(args, word):
    p = subprocess.run([sys.executable, "-m", "bench.conv_ab", *args], capture_output=True, text=True)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and word in err[0]
