"""python -m bench.block_passes: the predicted time of each fused-first-block kernel in one meta-update,
grouped by kernel and image set. No GPU is needed. bench/NOTES.md quotes it when it prices a change
to the block before making it.

    python -m bench.block_passes WORKLOAD BATCH [TABLE]

It runs bench.trace's meta-update with Triton 3.6's launch configurations. It prices every kernel of
layer 0 and every `triton block_*` kernel as `bench.trace --conv-efficiency-from TABLE` does, where TABLE
defaults to the committed 3.6.0 static-metrics table. The output has one line per (kernel, first
dimension of the image: the set's examples): the launches, the predicted ms and the bytes, largest
first, then their sum. That sum equals the trace's conv0 row.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

USAGE = "usage: python -m bench.block_passes WORKLOAD BATCH [TABLE]"
TABLE = os.path.join(os.path.dirname(__file__), "results", "static_metrics_sm90a_triton3.6.0.json")


def block_passes(workload: str, batch: int, table: str = TABLE) -> list:
    """[(kernel name, examples or None, launches, predicted ms, bytes)], largest time first."""
    from mamlpp_fast.triton import conv as tconv

    from . import trace as T
    installed = tconv._TRITON_VERSION
    tconv._TRITON_VERSION = (3, 6)
    try:
        res = T.trace_meta_update(workload, batch)
        eff = T.ffma_efficiencies(res, table)
    finally:
        tconv._TRITON_VERSION = installed
    ceil = T.CEILINGS["h100"]
    agg = defaultdict(lambda: [0, 0.0, 0])
    for k in res.kernels:
        if k.layer == "conv0" or k.name.startswith("triton block_"):
            row = agg[(k.name, k.call[1][0] if k.call else None)]
            row[0] += k.launches
            row[1] += T.predict(k, ceil, False, res.config["cuda_graph"], 1.0, False, eff)
            row[2] += k.bytes
    return sorted(((n, s, *v) for (n, s), v in agg.items()), key=lambda r: -r[3])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or not argv[1].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    rows = block_passes(argv[0], int(argv[1]), *argv[2:])
    for name, n, launches, ms, nbytes in rows:
        print(f"{name:28s} {'' if n is None else n:>4} {launches:4d} launches {ms:7.3f} ms {nbytes / 1e6:9.1f} MB")
    print(f"{'total':28s}      {sum(r[2] for r in rows):4d} launches {sum(r[3] for r in rows):7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
