"""Run the tests that draw fresh random inputs many times and count failures per test (not part of the default run).

Usage, from the repository root (needs the pytest-repeat plugin: `pip install pytest-repeat`):

    python tests/repeat_random.py --count 200 tests/test_ops_lslr.py tests/test_conv.py ...
    python tests/repeat_random.py --count 40 --whole-file tests/test_fast_equivalence.py

Each target is run in one pytest process with `--count N` (every collected test N times, each time with fresh
inputs: the tests draw their seeds from os.urandom). With --whole-file the file is instead run N times as a whole,
in consecutive pytest processes (what a CI run does), each run's result line appended to <out>.progress as it
ends. The per-test counts (runs, failures, skips) and the failing
seeds' messages are appended to --out (default bench/results/repeat_runs.txt) with the date, the versions and the
command.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pytest(args, junit):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True), cmd


def parse(junit, counts, failures):
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = re.sub(r"-\d+-\d+\]$", "]", re.sub(r"\[\d+-\d+\]$", "", f"{case.get('classname')}::{case.get('name')}"))
        c = counts[name]
        c["runs"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append(f"{name}: {(node.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            c["skipped"] += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--whole-file", action="store_true")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "repeat_runs.txt"))
    opts = ap.parse_args(argv)
    import torch
    counts = collections.defaultdict(lambda: {"runs": 0, "failed": 0, "skipped": 0})
    failures: list = []
    start = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        extra = ["-k", opts.k] if opts.k else []
        if opts.whole_file:
            failed_runs = 0
            for i in range(opts.count):
                result, cmd = run_pytest([*extra, *opts.targets], junit)
                parse(junit, counts, failures)
                failed_runs += result.returncode != 0
                summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
                with open(opts.out + ".progress", "a") as f:  # one line per run, so that a stopped loop keeps them
                    f.write(f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} run {i + 1}: rc "
                            f"{result.returncode}: {summary}\n")
            runs_line = f"{opts.count} consecutive pytest runs of {' '.join(opts.targets)}: {failed_runs} failed"
        else:
            result, cmd = run_pytest([f"--count={opts.count}", *extra, *opts.targets], junit)
            parse(junit, counts, failures)
            runs_line = f"one pytest run with --count={opts.count}, rc {result.returncode}"
    end = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"## {start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC, torch {torch.__version__}, python {sys.version.split()[0]}, "
             f"{os.cpu_count()} CPUs, no GPU",
             f"command: python tests/repeat_random.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             runs_line,
             f"tests: {len(counts)}, runs: {sum(c['runs'] for c in counts.values())}, failed: "
             f"{sum(c['failed'] for c in counts.values())}, skipped: {sum(c['skipped'] for c in counts.values())}"]
    for name, c in sorted(counts.items()):
        lines.append(f"  {name}: {c['runs']} runs, {c['failed']} failed, {c['skipped']} skipped")
    lines += [f"  FAILURE {f}" for f in failures]
    text = "\n".join(lines) + "\n\n"
    with open(opts.out, "a") as f:
        f.write(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
