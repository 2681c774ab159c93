"""A/B of two builds of the extension, each in its own processes, alternated.

    cp python/l1l2_rs/_l1l2_rs*.so /tmp/ab/a/       # build A (e.g. main)
    ... rebuild ...
    cp python/l1l2_rs/_l1l2_rs*.so /tmp/ab/b/       # build B (the change)
    python benches/ab_builds.py /tmp/ab/a /tmp/ab/b [--gaps-us 0,300,2000] [--sizes 1e5,1e6]

Each build's ``_l1l2_rs`` is loaded from its own file in a fresh process, which times the penalty,
value_and_grad (into ``out``) and prox_ on float32 and float64 and prints its figures; the
processes alternate A B A B .. (``--reps`` each), so that a machine that drifts during the run
drifts for both. One process per build, never both in one: two builds loaded side by side each
have their own thread pool, and one's lingering workers took CPU time from the other's calls
(float32 1e5 ``value_and_grad`` read 43 us in a shared process and 22 us alone).

In a process every figure is the median over ``--rounds`` samples of many calls, with its
interquartile range (IQR) as a percentage of the median; the table shows, per build, the median
over the processes of those medians and of those IQRs. ``--gaps-us`` puts a pause before every
call, spent spinning as a training step's other work would, and times the call alone: 0 is the
back-to-back pattern of a benchmark, a few hundred microseconds keeps the workers awake (they
linger 500 us), a few milliseconds lets them fall asleep. Records the load average beside the
figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare import L1, L2, Timing, make, seconds_after_pause


def load_build(directory: Path) -> ModuleType:
    found = sorted(directory.glob("_l1l2_rs*.so"))
    if not found:
        raise SystemExit(f"{directory}: no _l1l2_rs*.so")
    spec = importlib.util.spec_from_file_location("l1l2_rs._l1l2_rs", found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def op(module: ModuleType, name: str, x: np.ndarray) -> Callable[[], Any]:
    if name == "penalty":
        return lambda: module.penalty(x, L1, L2)
    if name == "value_and_grad":
        out = np.empty_like(x)
        return lambda: module.value_and_grad(x, L1, L2, out)
    shrunk = x.copy()  # prox_ shrinks it by ~1e-7 a call: never near zero in a run
    return lambda: module.prox_(shrunk, 1e-3, L1, L2)


def seconds_per_call(call: Callable[[], Any], gap: float, count: int) -> float:
    """Mean seconds of `count` calls, each after spinning for `gap` seconds (not timed)."""
    if gap == 0:
        start = time.perf_counter()
        for _ in range(count):
            call()
        return (time.perf_counter() - start) / count
    return sum(seconds_after_pause(call, gap) for _ in range(count)) / count


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """One build's figures in this process: key -> [median, IQR %]."""
    module = load_build(args.worker)
    figures = {}
    for gap_us in [float(g) for g in args.gaps_us.split(",")]:
        gap = gap_us / 1e6
        for dtype in (np.float32, np.float64):
            for size in [int(float(s)) for s in args.sizes.split(",")]:
                x = make(size, dtype)
                for name in args.ops.split(","):
                    call = op(module, name, x)
                    call()
                    once = max(seconds_per_call(call, 0, 1), 1e-7)
                    count = 10 if gap else max(5, min(2000, int(0.01 / once)))
                    samples = []
                    for _ in range(args.rounds):
                        call()  # untimed: warm the caches (and the pool, without a gap)
                        samples.append(seconds_per_call(call, gap, count))
                    timing = Timing.of(samples)
                    key = f"gap {gap_us:6.0f} us {np.dtype(dtype).name:8} {size:>11,} {name:15}"
                    figures[key] = [timing.median, timing.iqr_percent]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("a", type=Path, nargs="?")
    parser.add_argument("b", type=Path, nargs="?")
    parser.add_argument("--sizes", default="1e5,3e5,1e6,1e7")
    parser.add_argument("--gaps-us", default="0,300,2000")
    parser.add_argument("--ops", default="penalty,value_and_grad,prox_")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=3, help="processes per build")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args)))
        return 0
    if args.a is None or args.b is None:
        parser.error("give the directories of build A and build B")
    forwarded = ["--sizes", args.sizes, "--gaps-us", args.gaps_us, "--ops", args.ops]
    forwarded += ["--rounds", str(args.rounds)]
    print(f"A = {args.a}, B = {args.b}; load average {os.getloadavg()}", flush=True)
    runs: dict[str, list[dict[str, list[float]]]] = {"A": [], "B": []}
    for _ in range(args.reps):
        for label, directory in (("A", args.a), ("B", args.b)):
            command = [sys.executable, __file__, "--worker", str(directory), *forwarded]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout))
    for key in runs["A"][0]:
        a_us, b_us = (statistics.median(run[key][0] for run in runs[x]) * 1e6 for x in "AB")
        a_iqr, b_iqr = (statistics.median(run[key][1] for run in runs[x]) for x in "AB")
        print(
            f"{key} A {a_us:9.1f} us ({a_iqr:3.0f}%)  B {b_us:9.1f} us ({b_iqr:3.0f}%)"
            f"  B/A {b_us / a_us:.2f}"
        )
    print(f"load average {os.getloadavg()}; {args.reps} processes per build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
