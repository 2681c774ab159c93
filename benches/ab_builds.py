"""Interleaved A/B of two builds of the extension, in one process.

    cp python/l1l2_rs/_l1l2_rs*.so /tmp/ab/a/       # build A (e.g. main)
    ... rebuild ...
    cp python/l1l2_rs/_l1l2_rs*.so /tmp/ab/b/       # build B (the change)
    python benches/ab_builds.py /tmp/ab/a /tmp/ab/b [--gaps-us 0,200,2000] [--sizes 1e5,1e6,1e7]

Each build's ``_l1l2_rs`` is loaded from its own file (its own statics, so its own thread pool),
and the two are timed interleaved with compare.py's harness (median and interquartile range over
the rounds, a settle sleep after each sample), for the penalty, value_and_grad (into ``out``) and
prox_ on float32 and float64. ``--gaps-us`` adds a sleep before every call of a sample: 0 is the
back-to-back pattern of a benchmark, a few hundred microseconds the pattern of a training step
(the time per call then excludes the sleep). Records the load average beside the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare import L1, L2, make, time_interleaved


def load_build(directory: Path, label: str) -> ModuleType:
    found = sorted(directory.glob("_l1l2_rs*.so"))
    if not found:
        raise SystemExit(f"{directory}: no _l1l2_rs*.so")
    spec = importlib.util.spec_from_file_location(f"ab_{label}._l1l2_rs", found[0])
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


def with_gap(call: Callable[[], Any], gap: float) -> Callable[[], Any]:
    """`call` after a sleep of `gap` seconds. The harness times both; the caller subtracts the
    mean length of such a sleep (so with a gap, the IQR is a percentage of sleep + call)."""
    if gap == 0:
        return call

    def sleep_then_call() -> Any:
        time.sleep(gap)
        return call()

    return sleep_then_call


def mean_sleep(gap: float, repeats: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        time.sleep(gap)
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--sizes", default="1e5,3e5,1e6,1e7")
    parser.add_argument("--gaps-us", default="0,200")
    parser.add_argument("--ops", default="penalty,value_and_grad,prox_")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    builds = {"A": load_build(args.a, "a"), "B": load_build(args.b, "b")}
    print(f"A = {args.a}, B = {args.b}; load average {os.getloadavg()}")
    for gap_us in [float(g) for g in args.gaps_us.split(",")]:
        gap = gap_us / 1e6
        slept = mean_sleep(gap) if gap else 0.0
        for dtype in (np.float32, np.float64):
            for size in [int(float(s)) for s in args.sizes.split(",")]:
                x = make(size, dtype)
                for name in args.ops.split(","):
                    table = {
                        label: with_gap(op(module, name, x), gap)
                        for label, module in builds.items()
                    }
                    budget = args.rounds * max(0.004, 20 * (gap + size * 1e-9))
                    times = time_interleaved(table, args.rounds, budget, 0.01)
                    a, b = times["A"], times["B"]
                    a_us, b_us = (a.median - slept) * 1e6, (b.median - slept) * 1e6
                    print(
                        f"gap {gap_us:6.0f} us {np.dtype(dtype).name:8} {size:>11,} {name:15}"
                        f" A {a_us:9.1f} us ({a.iqr_percent:3.0f}%)"
                        f"  B {b_us:9.1f} us ({b.iqr_percent:3.0f}%)  B/A {b_us / a_us:.2f}",
                        flush=True,
                    )
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
