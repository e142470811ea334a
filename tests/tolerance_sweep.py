"""Derive and check the float32 criterion of the learner-equivalence tests over many fresh seeds.

Not part of the default test run (each seed costs about a second of one CPU core). Usage, from the
repository root:

    python tests/tolerance_sweep.py --case native --seeds 1000 --out bench/results/tolerance_sweep/native.jsonl
    python tests/tolerance_sweep.py --summary bench/results/tolerance_sweep/*.jsonl

Each line of the output holds one fresh seed: {group: [reference error, fast error]} against float64 truth
(tests/_numerics.py, `learner_errors`). A file that exists is appended to (a sweep can be resumed). The
summary prints, per case: the distribution of the fast/reference error ratios per group (the reference error
floored at the group's floor), the fraction p of
seeds that count against the fast learner under the rule of tests/_numerics.py (FACTOR, FLOORS), how many of
the sweep's consecutive blocks of NUM_SEEDS seeds would have failed the test (must be 0), and the probability
that one run of the test fails a correct implementation, P[Bin(NUM_SEEDS, p) > MAX_WORSE], computed with an
upper 99.9% confidence bound of p (so a rate of 0 in 1000 seeds is not read as 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _upper_bound(k: int, n: int, conf: float = 0.999) -> float:
    """One-sided upper confidence bound of a binomial rate (Clopper-Pearson, by bisection)."""
    from _numerics import binomial_tail
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        # P[X <= k | p=mid] = 1 - P[X > k]
        if 1.0 - binomial_tail(n, k, mid) > 1 - conf:
            lo = mid
        else:
            hi = mid
    return hi


def summarise(path: str) -> dict:
    from _numerics import FACTOR, FLOORS, GROUPS, MAX_WORSE, NUM_SEEDS, binomial_tail, worse_groups
    rows = [json.loads(line) for line in open(path) if line.strip()]
    n = len(rows)
    out = {"file": path, "case": rows[0]["case"] if rows else None, "seeds": n, "groups": {}}
    for g in GROUPS:
        ratios = sorted(r["errors"][g][1] / max(r["errors"][g][0], FLOORS[g]) for r in rows)
        fast = sorted(r["errors"][g][1] for r in rows)
        worse = sum(1 for r in rows if g in worse_groups(r["errors"]))
        q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
        out["groups"][g] = {"ratio_median": q(ratios, 0.5), "ratio_p99": q(ratios, 0.99), "ratio_max": ratios[-1],
                            "fast_error_median": q(fast, 0.5), "fast_error_max": fast[-1], "seeds_worse": worse}
    flags = [bool(worse_groups(r["errors"])) for r in rows]
    k = sum(flags)
    blocks = [flags[i:i + NUM_SEEDS] for i in range(0, n - NUM_SEEDS + 1, NUM_SEEDS)]
    p_hi = _upper_bound(k, n)
    out.update({"rule": {"factor": FACTOR, "floors": FLOORS, "num_seeds": NUM_SEEDS, "max_worse": MAX_WORSE},
                "seeds_worse": k, "rate": k / n, "rate_upper_99.9": p_hi,
                "blocks": len(blocks), "blocks_failed": sum(1 for b in blocks if sum(b) > MAX_WORSE),
                "max_worse_in_a_block": max((sum(b) for b in blocks), default=0),
                "p_test_fails": binomial_tail(NUM_SEEDS, MAX_WORSE, p_hi),
                "seconds_per_seed": sum(r["seconds"] for r in rows) / n})
    return out


def print_summary(s: dict) -> None:
    print(f"== {s['case']}: {s['seeds']} seeds ({s['file']}), {s['seconds_per_seed']:.2f} s/seed")
    for g, d in s["groups"].items():
        print(f"  {g:14s} fast/ref ratio median {d['ratio_median']:.2f} p99 {d['ratio_p99']:.3g} "
              f"max {d['ratio_max']:.3g}; fast error median {d['fast_error_median']:.2e} max "
              f"{d['fast_error_max']:.2e}; seeds worse {d['seeds_worse']}")
    print(f"  seeds counting against the fast learner: {s['seeds_worse']} ({s['rate']:.2%}; 99.9% upper bound "
          f"{s['rate_upper_99.9']:.2%}); blocks of {s['rule']['num_seeds']}: {s['blocks']}, failed "
          f"{s['blocks_failed']}, most worse seeds in a block {s['max_worse_in_a_block']}; "
          f"P[one test run fails a correct learner] <= {s['p_test_fails']:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="a key of tests/_numerics.py FP32_CASES")
    ap.add_argument("--seeds", type=int, default=1000)
    ap.add_argument("--out", help="JSON-lines file (appended to)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary", nargs="*", help="summarise these files and exit")
    ap.add_argument("--json", action="store_true", help="with --summary: print JSON")
    opts = ap.parse_args(argv)
    if opts.summary is not None:
        sums = [summarise(p) for p in opts.summary]
        if opts.json:
            print(json.dumps(sums, indent=1))
        else:
            for s in sums:
                print_summary(s)
        return 0
    import torch
    torch.set_num_threads(opts.threads)
    from _batches import fresh_seed
    from _numerics import FP32_CASES, learner_errors
    backend, cfg, b, epoch = FP32_CASES[opts.case]
    done = sum(1 for _ in open(opts.out)) if os.path.exists(opts.out) else 0
    with open(opts.out, "a") as f:
        for i in range(done, opts.seeds):
            seed = fresh_seed()
            t0 = time.perf_counter()
            errors = learner_errors(backend, cfg, b, epoch, seed)
            f.write(json.dumps({"case": opts.case, "seed": seed, "seconds": time.perf_counter() - t0,
                                "errors": errors}) + "\n")
            f.flush()
    print_summary(summarise(opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
