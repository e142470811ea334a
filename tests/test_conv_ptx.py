"""bench/conv_ptx.py: the innermost-loop instruction count on hand-written PTX, and one run of the script
on the quick workload (Triton compiles for sm_90a without a GPU; skipped without triton or ptxas). The
run is a subprocess: this process never imports triton (tests/test_triton_interp.py needs
TRITON_INTERPRET set before the first import)."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PTX = """
.visible .entry k(
{
\tmov.u32 \t%r1, 0;
$L__BB0_1:
\tadd.s32 \t%r1, %r1, 1;
$L__BB0_2:
\tfma.rn.f32 \t%f1, %f2, %f3, %f1;
\tfma.rn.f32 \t%f4, %f2, %f3, %f4;
\tld.shared.v4.b32 \t{%r2, %r3, %r4, %r5}, [%r6];
\tsetp.lt.s32 \t%p1, %r1, 8;
\t@%p1 bra \t$L__BB0_2;
\tfma.rn.f32 \t%f5, %f2, %f3, %f5;
\tdiv.s32 \t%r7, %r1, %r8;
\tsetp.lt.s32 \t%p2, %r1, 9;
\t@%p2 bra \t$L__BB0_1;
\tret;
}
"""


def test_innermost_loop_and_mix():
    from bench.conv_ptx import innermost_loop, loop_mix

    ins = innermost_loop(PTX)  # the inner loop: $L__BB0_2 .. its backward branch
    assert ins == ["fma.rn.f32", "fma.rn.f32", "ld.shared.v4.b32", "setp.lt.s32", "bra"]
    mix = loop_mix(ins)
    assert (mix["instrs"], mix["fma"], mix["ld_shared"], mix["ld_shared_vec"], mix["int_divrem"]) == (5, 2, 1, 1, 0)
    assert mix["fma_share"] == pytest.approx(0.4)
    # no loop: the whole kernel is counted
    flat = loop_mix(innermost_loop(PTX.replace("@%p1 bra", "//").replace("@%p2 bra", "//")))
    assert flat["fma"] == 3 and flat["int_divrem"] == 1


def test_conv_ptx_runs_on_the_quick_workload():
    if importlib.util.find_spec("triton") is None or shutil.which("ptxas") is None:
        pytest.skip("needs triton and ptxas")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.conv_ptx", "--workloads", "quick_omniglot_3w1s"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| quick_omniglot_3w1s")]
    # 4 layers x 2 sets x (forward, weight gradient, data gradient except at layer 0)
    assert len(rows) == 4 * 2 * 3 - 2, proc.stdout
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert "failed" not in r and int(cells[11]) > 0, r  # compiled; ptxas reported registers
        assert cells[12] == "0/0", r  # no spills at these tiny shapes
    bad = subprocess.run([sys.executable, "-m", "bench.conv_ptx", "--workloads", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown workload 'nope'" in bad.stderr
