"""bench.fused_verdict: the per-op reading of a device run's junit XML that decides which entries of
mamlpp_fast.fast.AUTO_FUSES_ON_CUDA a session may turn on. The junit file here is pytest's own, written
by a run of stand-in test files laid out as tests/gpu/ is (so that the classname-to-path mapping is
pytest's, not an assumption), with chosen cases passing, failing, erroring and skipped."""
import ast
import subprocess
import sys
from pathlib import Path

from bench import fused_verdict as fv

ROOT = Path(__file__).resolve().parents[1]

STAND_IN_CONV = '''
import pytest

@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_fused_block_kernels_on_cuda(dtype):
    pass

@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_bn_pool_kernels_on_cuda(dtype):
    assert dtype == "f64"

@pytest.mark.parametrize("op", ["first_block", "bn_pool"])
def test_fused_op_on_cuda_matches_unfused(op):
    pass
'''

STAND_IN_HEAD = '''
import pytest

@pytest.fixture
def broken(request):
    if request.node.callspec.params["op"] == "head":
        raise RuntimeError("set-up failed")

def test_head_kernels_on_cuda():
    pass

@pytest.mark.parametrize("op", ["head", "bn_pool", "first_block"])
def test_ticket_sums_deterministic_on_cuda(op, broken):
    pass

@pytest.mark.skip(reason="stand-in")
def test_fused_head_on_cuda_matches_unfused():
    pass
'''


def test_verdict_from_pytest_junit(tmp_path):
    gpu = tmp_path / "tests" / "gpu"
    gpu.mkdir(parents=True)
    (gpu / "test_gpu_conv.py").write_text(STAND_IN_CONV)
    (gpu / "test_gpu_head.py").write_text(STAND_IN_HEAD)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu",
                    f"--junitxml={junit}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    cases = fv.read_junit(str(junit))
    assert cases["tests/gpu/test_gpu_conv.py::test_bn_pool_kernels_on_cuda[f32]"] == "failed"
    assert cases["tests/gpu/test_gpu_head.py::test_ticket_sums_deterministic_on_cuda[head]"] == "error"
    assert cases["tests/gpu/test_gpu_head.py::test_fused_head_on_cuda_matches_unfused"] == "skipped"
    got = fv.verdict(cases)
    assert got["first_block"] == (True, "may fuse (4 cases passed)")
    ok, reason = got["bn_pool"]
    assert not ok and "failed test_bn_pool_kernels_on_cuda[f32]" in reason
    assert "bn_pool]" not in reason  # its learner case passed
    ok, reason = got["head"]
    assert not ok and "error test_ticket_sums_deterministic_on_cuda[head]" in reason
    assert "skipped test_fused_head_on_cuda_matches_unfused" in reason


def test_missing_cases_keep_the_op_unfused():
    """A test that never ran (cut by the stage's limit, renamed) is no evidence: only an op all of whose
    named tests ran and passed may fuse; a bracketed name matches that case only."""
    cases = {"tests/gpu/test_gpu_conv.py::test_fused_block_kernels_on_cuda[f64]": "passed",
             "tests/gpu/test_gpu_conv.py::test_fused_op_on_cuda_matches_unfused[bn_pool]": "passed"}
    got = fv.verdict(cases)
    assert got["first_block"] == (False, "keep unfused: not run test_ticket_sums_deterministic_on_cuda[first_block]; "
                                         "not run test_fused_op_on_cuda_matches_unfused[first_block]")
    assert not got["head"][0] and got["head"][1].count("not run") == 3


def test_cli(tmp_path, capsys):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.gpu.test_gpu_head" name="test_head_kernels_on_cuda[f32]"/>'
                     '</testsuite></testsuites>')
    assert fv.main([str(junit)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["first_block", "bn_pool", "head"]
    assert all("keep unfused" in line and "is off in this tree" in line for line in out)
    (tmp_path / "bad.xml").write_text("<testsuites>")
    assert fv.main([str(tmp_path / "bad.xml")]) == 2
    assert "cannot read the junit XML" in capsys.readouterr().err
    assert fv.main([]) == 2


def test_evidence_names_real_device_tests():
    """Every test EVIDENCE names exists in tests/gpu (a renamed test would otherwise keep its op unfused
    for ever, "not run"), a bracketed case is one of the test's parameters, and the ops are exactly the
    entries of AUTO_FUSES_ON_CUDA."""
    from mamlpp_fast.fast import AUTO_FUSES_ON_CUDA
    assert set(fv.EVIDENCE) == set(AUTO_FUSES_ON_CUDA)
    for op, names in fv.EVIDENCE.items():
        for name in names:
            path, func = name.split("::")
            func, _, case = func.partition("[")
            tree = ast.parse((ROOT / path).read_text())
            fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert func in fns, (op, name)
            if case:
                consts = {c.value for d in fns[func].decorator_list for c in ast.walk(d)
                          if isinstance(c, ast.Constant)}
                assert case.rstrip("]") in consts, (op, name)

