"""bench.triton_cache: Triton's kernel cache filled on a CPU machine for a device run. On this machine:
a real kernel compiled for sm_90 into a cache, pruned to what a lookup reads, moved to another folder,
relocated, and found there by the same compile (no new entry); and the CLI's refusals."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile_accuracy_kernel():
    from bench.static_metrics import capture_launches, compile_launch
    (fn, args, kwargs), = capture_launches(("accuracy", (6, 3)))
    return compile_launch(fn, args, kwargs)[1]


def test_a_pruned_moved_cache_answers_the_same_compile(tmp_path, monkeypatch):
    from bench.triton_cache import prune, relocate
    first = tmp_path / "here"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(first))
    ck = _compile_accuracy_kernel()
    entries = os.listdir(first)
    assert entries and any(n.endswith(".ptx") for e in entries for n in os.listdir(first / e))
    info = prune(str(first))
    assert info["kernels"] >= 1 and info["bytes"] > 0
    for e in entries:
        names = os.listdir(first / e)
        assert all(n.endswith((".json", ".cubin")) for n in names), names
        for g in (n for n in names if n.startswith("__grp__")):
            kept = json.loads((first / e / g).read_text())["child_paths"]
            assert kept and all(c.endswith((".json", ".cubin")) for c in kept)
    moved = tmp_path / "there"
    shutil.move(str(first), str(moved))  # the old paths no longer exist
    assert relocate(str(moved)) == sum(1 for e in entries for n in os.listdir(moved / e) if n.startswith("__grp__"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(moved))
    again = _compile_accuracy_kernel()
    assert sorted(os.listdir(moved)) == sorted(entries)  # found: nothing compiled anew
    assert again.kernel == ck.kernel and "ptx" not in again.asm  # loaded from the pruned entry


@pytest.mark.parametrize("args, word", [([], "one of"), (["--out", "a", "--relocate", "b"], "one of"),
                                        (["--relocate", "/nonexistent/cache"], "not a folder")])
def test_refusals(args, word):
    p = subprocess.run([sys.executable, "-m", "bench.triton_cache", *args], capture_output=True, text=True)
    assert p.returncode == 2 and word in p.stderr and len(p.stderr.strip().splitlines()) == 1
