"""python -m bench.decisions [--junit JUNIT.xml] [--bench BENCH.json] [--precision PRECISION.json]:
the decision rules written before a device run (tests/gpu/RESULTS.md), applied to its files.

Two settings wait for device numbers:

- config key **conv_streams** (default off): on only if its device tests passed
  (`CONV_STREAMS_TESTS`) and the captured update with it is at least 3% faster than without on both
  Omniglot 20w1s B=8 and mini-ImageNet 5w1s B=2, in the same benchmark run (`bench.run
  --conv-streams default,on`: rows that differ in conv_streams only).
- config key **conv_precision**'s `auto` becoming tf32x3 (default: strict fp32) only if (1) the device
  precision table's tf32x3 meta-gradient error is within 2x of strict fp32's at the median and at the
  p90, (2) the tensor-core tests passed (`TF32X3_TESTS`) and (3) the captured update in tf32x3 is at
  least 1.2x faster than in strict fp32 on Omniglot 20w1s B=8 (the same run).

The first device call writes the junit XML (tests), the second the benchmark and precision files, so a
call's summary may hold only part of the evidence: a rule whose files are missing prints "undecided"
and what is missing. Each rule prints one line: "<setting>: <decision> (<the numbers>)". Like
bench.fused_verdict it decides nothing by itself: a session that reads "turn on" changes the default in
a commit of its own that quotes the line.
"""
from __future__ import annotations

import argparse
import json
import sys

from .fused_verdict import outcomes, read_junit

CONV_STREAMS_TESTS = ("tests/gpu/test_gpu_conv.py::test_conv_streams_same_bits_on_cuda",
                      "tests/gpu/test_gpu_conv.py::test_fast_learner_conv_streams_matches_reference_on_cuda")
TF32X3_TESTS = ("tests/gpu/test_gpu_conv.py::test_triton_conv_tensor_core_tiles_on_cuda",)
STREAMS_WORKLOADS = (("omniglot_20w1s", 8), ("miniimagenet_5w1s", 2))
STREAMS_MIN_GAIN = 1.03
TF32X3_MIN_GAIN = 1.2
TF32X3_MAX_ERROR_RATIO = 2.0
_KEYS = ("backend", "conv_impl", "first_block", "conv_precision", "conv_streams")


def tests_passed(cases: dict | None, wanted) -> tuple[bool | None, str]:
    """(all passed, why): None when there is no junit file; False when a wanted test failed, errored,
    was skipped or did not run."""
    if cases is None:
        return None, "no junit file (the tests ran in the first device call)"
    bad, missing, ran = outcomes(cases, wanted)
    if bad or missing:
        return False, "; ".join(bad + [f"not run {m}" for m in missing])
    return True, f"{ran} test cases passed"


def _captured(rows, workload, batch, **want):
    """The ok captured fast rows of `workload` at `batch` whose keys in `want` have those values (a None
    wanted value matches None only)."""
    out = []
    for r in rows:
        if (r.get("section") == "main" and r.get("learner") == "fast" and r.get("variant") == "cuda_graph"
                and r.get("workload") == workload and r.get("batch_size") == batch and r.get("status") == "ok"
                and all(r.get(k) == v for k, v in want.items())):
            out.append(r)
    return out


def _twin(rows, row, **change):
    """The ok captured row that differs from `row` in the keys of `change` only (None if none)."""
    want = {k: row.get(k) for k in _KEYS}
    want.update(change)
    found = _captured(rows, row["workload"], row["batch_size"], **want)
    return found[0] if found else None


def conv_streams_decision(cases: dict | None, rows: list | None) -> tuple[str, str]:
    """("turn on" | "keep off" | "undecided", the numbers and reasons)."""
    notes, ok = [], True
    passed, why = tests_passed(cases, CONV_STREAMS_TESTS)
    notes.append(f"tests: {why}")
    if passed is False:
        ok = False
    if rows is None:
        notes.append("no benchmark file")
        return ("keep off" if passed is False else "undecided"), "; ".join(notes)
    complete = True
    for workload, batch in STREAMS_WORKLOADS:
        ons = _captured(rows, workload, batch, conv_streams=True)
        pair = next(((on, off) for on in ons for off in (_twin(rows, on, conv_streams=None),
                                                         _twin(rows, on, conv_streams=False)) if off), None)
        if pair is None:
            notes.append(f"{workload} B={batch}: no captured pair with conv_streams on and off")
            complete = False
            continue
        on, off = pair
        gain = off["median_s"] / on["median_s"]
        notes.append(f"{workload} B={batch}: {off['median_s'] * 1e3:.2f} -> {on['median_s'] * 1e3:.2f} ms "
                     f"({gain:.3f}x, needs >= {STREAMS_MIN_GAIN})")
        if gain < STREAMS_MIN_GAIN:
            ok = False
    if not ok:
        return "keep off", "; ".join(notes)
    if not complete or passed is None:
        return "undecided", "; ".join(notes)
    return "turn on", "; ".join(notes)


def tf32x3_decision(cases: dict | None, rows: list | None, precision: dict | None) -> tuple[str, str]:
    """("make auto tf32x3" | "keep strict fp32" | "undecided", the numbers and reasons)."""
    notes, ok, complete = [], True, True
    if precision is None:
        notes.append("no precision file")
        complete = False
    else:
        s = precision.get("summary", {})
        if precision.get("device") == "cpu":
            notes.append("the precision file is the CPU emulation, not the device's")
            complete = False
        elif "tf32x3" not in s or "ieee" not in s:
            notes.append("the precision file lacks the ieee or tf32x3 rows")
            complete = False
        else:
            for stat in ("median", "p90"):
                a, b = s["tf32x3"]["grad"][stat], s["ieee"]["grad"][stat]
                within = a <= TF32X3_MAX_ERROR_RATIO * b
                notes.append(f"meta-gradient error {stat}: tf32x3 {a:.2e} vs strict {b:.2e}"
                             f"{'' if within else ' (over 2x)'}")
                ok = ok and within
    passed, why = tests_passed(cases, TF32X3_TESTS)
    notes.append(f"tests: {why}")
    if passed is False:
        ok = False
    elif passed is None:
        complete = False
    if rows is None:
        notes.append("no benchmark file")
        complete = False
    else:
        fast = _captured(rows, "omniglot_20w1s", 8, conv_precision="tf32x3")
        pair = next(((r, t) for r in fast for t in (_twin(rows, r, conv_precision=None),
                                                    _twin(rows, r, conv_precision="ieee")) if t), None)
        if pair is None:
            notes.append("omniglot_20w1s B=8: no captured pair in tf32x3 and strict fp32")
            complete = False
        else:
            t3, strict = pair
            gain = strict["median_s"] / t3["median_s"]
            notes.append(f"omniglot_20w1s B=8: {strict['median_s'] * 1e3:.2f} -> {t3['median_s'] * 1e3:.2f} ms "
                         f"({gain:.3f}x, needs >= {TF32X3_MIN_GAIN})")
            ok = ok and gain >= TF32X3_MIN_GAIN
    if not ok:
        return "keep strict fp32", "; ".join(notes)
    if not complete:
        return "undecided", "; ".join(notes)
    return "make auto tf32x3", "; ".join(notes)


def _load_json(path: str | None, what: str):
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the {what} file {path!r}: {e}") from e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decisions", description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", default=None, help="the tests stage's junit XML (first device call)")
    p.add_argument("--bench", default=None, help="bench.run's JSON of the device run (second call)")
    p.add_argument("--precision", default=None, help="bench.precision's JSON of the device run (second call)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cases = read_junit(a.junit) if a.junit else None
        bench = _load_json(a.bench, "benchmark")
        precision = _load_json(a.precision, "precision")
        rows = bench.get("results") if isinstance(bench, dict) else None
        if bench is not None and not isinstance(rows, list):
            raise ValueError(f"the benchmark file {a.bench!r} has no 'results' list")
    except ValueError as e:
        print(f"bench.decisions: {e}", file=sys.stderr)
        return 2
    decision, why = conv_streams_decision(cases, rows)
    print(f"conv_streams: {decision} ({why})")
    decision, why = tf32x3_decision(cases, rows, precision)
    print(f"conv_precision auto -> tf32x3: {decision} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
