"""bench.decisions: the conv_streams and tf32x3 decision rules of tests/gpu/RESULTS.md applied to a
device run's files (junit XML, bench.run JSON, bench.precision JSON), on synthetic files: each rule's
"turn on", "keep" and "undecided" outcomes, the pairing of benchmark rows that differ in one key only,
and one-line errors for unreadable files."""
import json

import pytest

from bench import decisions as D

CONV = "tests/gpu/test_gpu_conv.py::"


def _row(workload, batch, ms, **kw):
    r = dict(section="main", learner="fast", variant="cuda_graph", workload=workload, batch_size=batch,
             status="ok", median_s=ms / 1e3, backend="native", conv_impl="auto", first_block="unfused",
             conv_precision=None, conv_streams=None)
    r.update(kw)
    return r


def _rows(omni_off=20.0, omni_on=19.0, mini_off=36.0, mini_on=34.0, t3=15.0):
    return [_row("omniglot_20w1s", 8, omni_off), _row("omniglot_20w1s", 8, omni_on, conv_streams=True),
            _row("omniglot_20w1s", 8, 99.0, first_block="fused"),  # another configuration: not a twin
            _row("omniglot_20w1s", 8, 25.0, variant="eager"),
            _row("omniglot_20w1s", 8, t3, conv_precision="tf32x3"),
            _row("miniimagenet_5w1s", 2, mini_off), _row("miniimagenet_5w1s", 2, mini_on, conv_streams=True),
            dict(section="main", learner="reference", variant="eager", workload="omniglot_20w1s", batch_size=8,
                 status="ok", median_s=0.7)]


def _cases(fail=None):
    names = [CONV + "test_conv_streams_same_bits_on_cuda[omniglot-layer3]",
             CONV + "test_conv_streams_same_bits_on_cuda[miniimagenet-layer3]",
             CONV + "test_fast_learner_conv_streams_matches_reference_on_cuda",
             CONV + "test_triton_conv_tensor_core_tiles_on_cuda[omniglot-14x14-tf32x3]",
             CONV + "test_triton_conv_tensor_core_tiles_on_cuda[omniglot-14x14-tf32]"]
    return {n: ("failed" if fail and fail in n else "passed") for n in names}


PRECISION = dict(device="cuda", summary={"ieee": {"grad": dict(median=2e-6, p90=3e-6)},
                                          "tf32x3": {"grad": dict(median=2.5e-6, p90=5e-6)},
                                          "tf32": {"grad": dict(median=0.3, p90=0.4)}})


def test_conv_streams_turn_on_keep_off_and_undecided():
    d, why = D.conv_streams_decision(_cases(), _rows())
    assert d == "turn on", why
    assert "omniglot_20w1s B=8: 20.00 -> 19.00 ms (1.053x" in why and "miniimagenet_5w1s B=2" in why
    # 2% on one workload is under the 3% asked
    d, why = D.conv_streams_decision(_cases(), _rows(mini_on=35.3))
    assert d == "keep off" and "1.020x" in why
    # a failed test keeps it off whatever the numbers
    d, why = D.conv_streams_decision(_cases(fail="same_bits_on_cuda[mini"), _rows())
    assert d == "keep off" and "failed test_conv_streams_same_bits_on_cuda[miniimagenet-layer3]" in why
    # the numbers without the tests (the second device call alone), or tests without the numbers
    assert D.conv_streams_decision(None, _rows())[0] == "undecided"
    assert D.conv_streams_decision(_cases(), None)[0] == "undecided"
    # a workload without its pair
    rows = [r for r in _rows() if r["workload"] != "miniimagenet_5w1s"]
    d, why = D.conv_streams_decision(_cases(), rows)
    assert d == "undecided" and "miniimagenet_5w1s B=2: no captured pair" in why
    # a not-run test is not a pass
    cases = {k: v for k, v in _cases().items() if "learner" not in k}
    d, why = D.conv_streams_decision(cases, _rows())
    assert d == "keep off" and "not run test_fast_learner_conv_streams_matches_reference_on_cuda" in why


def test_tf32x3_rule():
    d, why = D.tf32x3_decision(_cases(), _rows(), PRECISION)
    assert d == "make auto tf32x3", why
    assert "20.00 -> 15.00 ms (1.333x" in why
    slow = _rows(t3=18.0)  # 1.11x
    assert D.tf32x3_decision(_cases(), slow, PRECISION)[0] == "keep strict fp32"
    worse = json.loads(json.dumps(PRECISION))
    worse["summary"]["tf32x3"]["grad"]["p90"] = 7e-6  # over 2x strict's p90
    d, why = D.tf32x3_decision(_cases(), _rows(), worse)
    assert d == "keep strict fp32" and "p90" in why and "over 2x" in why
    assert D.tf32x3_decision(_cases(fail="tf32x3"), _rows(), PRECISION)[0] == "keep strict fp32"
    emulated = dict(PRECISION, device="cpu")
    d, why = D.tf32x3_decision(_cases(), _rows(), emulated)
    assert d == "undecided" and "emulation" in why
    assert D.tf32x3_decision(None, _rows(), PRECISION)[0] == "undecided"
    assert D.tf32x3_decision(_cases(), _rows(), None)[0] == "undecided"


def test_cli_reads_the_files_and_refuses_bad_ones(tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    cases = "".join(f'<testcase classname="tests.gpu.test_gpu_conv" name="{n.split("::")[1]}"/>' for n in _cases())
    junit.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": _rows()}))
    prec = tmp_path / "precision.json"
    prec.write_text(json.dumps(PRECISION))
    assert D.main(["--junit", str(junit), "--bench", str(bench), "--precision", str(prec)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("conv_streams: turn on (") and out[1].startswith("conv_precision auto -> tf32x3: make auto tf32x3 (")
    assert D.main(["--bench", str(bench)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("conv_streams: undecided (tests: no junit file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert D.main(["--bench", str(bad)]) == 2
    assert "cannot read the benchmark file" in capsys.readouterr().err
    bad.write_text(json.dumps({"rows": []}))
    assert D.main(["--bench", str(bad)]) == 2
    assert "no 'results' list" in capsys.readouterr().err
