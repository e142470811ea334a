"""python -m bench.fused_verdict JUNIT.xml: which fused ops a device run's tests allow `auto` to take.

The fast learner's config keys first_block, bn_pool and head choose between an op's fused Triton kernels
and the unfused ops; their value "auto" takes the fused kernels on a CUDA device only where
`mamlpp_fast.fast.AUTO_FUSES_ON_CUDA[op]` is on, and each entry stays off until the op's own device
tests pass. `EVIDENCE` names those tests per op: the kernels against their PyTorch implementation at
the learner's shapes (float64 and float32), its in-kernel ticket sums bit-reproducible over repeated
launches, and the learner with that op fused against the unfused learner, captured in a CUDA graph.
This reads the junit XML that `scripts/gpu_session.sh`'s tests stage writes and prints one line per op:

    first_block: may fuse (8 cases passed)
    bn_pool: keep unfused: failed test_bn_pool_kernels_on_cuda[f32-omniglot-layer1]
    head: keep unfused: not run test_fused_head_on_cuda_matches_unfused

"may fuse" needs every named test to have run at least one case and no case of them to have failed,
errored or been skipped; anything else keeps the op unfused, with the reason. It decides nothing by
itself: a session that reads "may fuse" turns that entry on in a commit of its own (tests/gpu/RESULTS.md).
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

# per fused op: the device tests ("file::function" or "file::function[id]": that case only) that must all
# pass before "auto" may take its kernels on CUDA
EVIDENCE = {
    "first_block": ("tests/gpu/test_gpu_conv.py::test_fused_block_kernels_on_cuda",
                    "tests/gpu/test_gpu_head.py::test_ticket_sums_deterministic_on_cuda[first_block]",
                    "tests/gpu/test_gpu_conv.py::test_fused_op_on_cuda_matches_unfused[first_block]"),
    "bn_pool": ("tests/gpu/test_gpu_conv.py::test_bn_pool_kernels_on_cuda",
                "tests/gpu/test_gpu_head.py::test_ticket_sums_deterministic_on_cuda[bn_pool]",
                "tests/gpu/test_gpu_conv.py::test_fused_op_on_cuda_matches_unfused[bn_pool]"),
    "head": ("tests/gpu/test_gpu_head.py::test_head_kernels_on_cuda",
             "tests/gpu/test_gpu_head.py::test_ticket_sums_deterministic_on_cuda[head]",
             "tests/gpu/test_gpu_head.py::test_fused_head_on_cuda_matches_unfused"),
}


def read_junit(path: str) -> dict:
    """{"file::name[id]": "passed" | "failed" | "error" | "skipped"} for every test case of a pytest junit
    XML file (classname "tests.gpu.test_gpu_conv" -> "tests/gpu/test_gpu_conv.py")."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"cannot read the junit XML {path!r}: {e}") from e
    cases = {}
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        if not name:
            continue
        node = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                break
        cases[node] = outcome
    return cases


def _matches(node: str, wanted: str) -> bool:
    """Whether test case `node` ("file::function[id]") belongs to `wanted` ("file::function" for all its
    cases, "file::function[id]" for one)."""
    if "[" in wanted:
        return node == wanted
    return node == wanted or node.startswith(wanted + "[")


def outcomes(cases: dict, wanted) -> tuple[list, list, int]:
    """(the wanted test cases that did not pass, as "<outcome> <name>"; the wanted tests with no case;
    how many cases ran) of the test outcomes `cases` (read_junit)."""
    bad, missing, ran = [], [], 0
    for w in wanted:
        mine = {n: o for n, o in cases.items() if _matches(n, w)}
        if not mine:
            missing.append(w.split("::", 1)[1])
        ran += len(mine)
        bad += [f"{o} {n.split('::', 1)[1]}" for n, o in sorted(mine.items()) if o != "passed"]
    return bad, missing, ran


def verdict(cases: dict, evidence: dict | None = None) -> dict:
    """Per op: (may_fuse, reason) from the test outcomes `cases` (read_junit)."""
    out = {}
    for op, wanted in (evidence or EVIDENCE).items():
        bad, missing, ran = outcomes(cases, wanted)
        if bad or missing:
            reason = "; ".join(bad + [f"not run {m}" for m in missing])
            out[op] = (False, f"keep unfused: {reason}")
        else:
            out[op] = (True, f"may fuse ({ran} cases passed)")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m bench.fused_verdict JUNIT.xml", file=sys.stderr)
        return 2
    try:
        cases = read_junit(argv[0])
    except ValueError as e:
        print(f"bench.fused_verdict: {e}", file=sys.stderr)
        return 2
    from mamlpp_fast.fast import AUTO_FUSES_ON_CUDA
    for op, (ok, reason) in verdict(cases).items():
        now = "on" if AUTO_FUSES_ON_CUDA.get(op) else "off"
        print(f"{op}: {reason} (AUTO_FUSES_ON_CUDA[{op!r}] is {now} in this tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
