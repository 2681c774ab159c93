"""Where a second thread starts to pay, per op, measured: the parallel thresholds from data.

    MATURIN_PEP517_ARGS="--features probe" pip install .   # or: maturin develop -r -F probe
    python benches/threshold.py            # float32 and float64, 46 Ki .. 8 Mi elements
    python benches/threshold.py --asleep   # each call 2 ms after the last: the workers asleep
    python benches/threshold.py --quick

For each op (the reduction ``penalty``, ``value_and_grad`` into a preallocated ``out``, ``prox_``
in place), dtype and size, one thread and two threads are timed interleaved (the same harness as
compare.py: median and interquartile range over the rounds) with the library's parallel
thresholds lowered to one byte (``_set_parallel_min_bytes``, a measuring aid of the ``probe``
build), so that two threads are used at every size. The derived threshold of an op is the
smallest size from which two threads beat one by ``--margin`` (default 1.10x) at that size and
every larger one; it is given in elements and in bytes of work, the unit of the thresholds (bytes
read plus bytes written: 1x the array for the reduction, 2x for value_and_grad and prox_).

Back to back (the default), each call finds the pool's workers awake, still lingering after the
last one: that gives ``PARALLEL_MIN_BYTES``. With ``--asleep`` every call comes ``--gap-us``
(default 2000, four times the linger) after the previous one, spent spinning as a training step's
other work would, and only the call is timed: the worker has gone to sleep and must be woken,
which gives ``PARALLEL_MIN_BYTES_ASLEEP``.

Only meaningful on a quiet machine: on a loaded one the second thread often waits for a CPU, and
the derived thresholds come out too high (or "never"). The load average is recorded with the data.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import l1l2_rs
from l1l2_rs import _l1l2_rs

sys.path.insert(0, str(Path(__file__).parent))
from compare import (
    L1,
    L2,
    Timing,
    make,
    seconds_after_pause,
    time_interleaved,
    write_results,
)

# Bytes of work per byte of input, as the library counts them for its thresholds.
WORK_PER_BYTE = {"penalty": 1, "value_and_grad": 2, "prox_": 2}


def op_call(op: str, x: np.ndarray) -> Callable[[], Any]:
    if op == "penalty":
        return lambda: l1l2_rs.penalty(x, L1, L2)
    if op == "value_and_grad":
        out = np.empty_like(x)
        return lambda: l1l2_rs.value_and_grad(x, L1, L2, out=out)
    shrunk = x.copy()  # prox_ shrinks it by ~1e-7 a call: never near zero in a run
    return lambda: l1l2_rs.prox_(shrunk, 1e-3, L1, L2)


def with_threads(threads: int, call: Callable[[], Any]) -> Callable[[], Any]:
    def timed() -> Any:
        l1l2_rs.set_num_threads(threads)
        return call()

    return timed


def after_gap(call: Callable[[], Any], gap: float) -> Callable[[], float]:
    """``call`` timed alone, after spinning for ``gap`` seconds: returns its seconds."""
    return lambda: seconds_after_pause(call, gap)


def time_after_gaps(
    table: dict[str, Callable[[], float]], rounds: int, calls: int
) -> dict[str, Timing]:
    """Median and quartiles of the per-call times of each candidate (``after_gap`` calls),
    interleaved by rounds of ``calls`` calls."""
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds):
        for name, timed in table.items():
            samples[name] += [timed() for _ in range(calls)]
    return {name: Timing.of(values) for name, values in samples.items()}


def derived_threshold(points: list[dict[str, Any]], margin: float, key: str) -> int | None:
    """The smallest size from which 2 threads beat 1 by `margin` at every larger size too."""
    found = None
    for point in sorted(points, key=lambda p: -p["size"]):
        if point[f"one_{key}"] < margin * point[f"two_{key}"]:
            break
        found = point["size"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few sizes and rounds")
    parser.add_argument("--asleep", action="store_true", help="each call after a gap")
    parser.add_argument("--gap-us", type=float, default=2000.0)
    parser.add_argument("--margin", type=float, default=1.10)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--ops", default=",".join(WORK_PER_BYTE))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    set_min_bytes = getattr(_l1l2_rs, "_set_parallel_min_bytes", None)
    if set_min_bytes is None:
        print("needs a build with the probe feature (see the module docs)", file=sys.stderr)
        return 2
    # From 2^15.5: a tensor of at most 2^15 elements is one chunk, which never runs in parallel.
    exponents = range(16, 21) if args.quick else [e / 2 for e in range(31, 47)]
    sizes = sorted({int(2**e) for e in exponents})
    rounds, budget = (7, 0.05) if args.quick else (21, 0.3)
    load_before = os.getloadavg()
    set_min_bytes(1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for dtype in args.dtypes.split(","):
            for op in args.ops.split(","):
                points = []
                for size in sizes:
                    call = op_call(op, make(size, np.dtype(dtype)))
                    one, two = with_threads(1, call), with_threads(2, call)
                    if args.asleep:
                        gap = args.gap_us * 1e-6
                        table = {"one": after_gap(one, gap), "two": after_gap(two, gap)}
                        times = time_after_gaps(table, rounds, 3 if args.quick else 10)
                    else:
                        times = time_interleaved({"one": one, "two": two}, rounds, budget)
                    points.append(point(size, times["one"], times["two"]))
                    print(
                        f"{dtype:8} {op:15} {size:>9,}  1 thread {times['one'].median * 1e6:9.1f}"
                        f" us ({times['one'].iqr_percent:3.0f}%)  2 threads "
                        f"{times['two'].median * 1e6:9.1f} us ({times['two'].iqr_percent:3.0f}%)"
                        f"  speed-up {times['one'].median / times['two'].median:.2f}",
                        flush=True,
                    )
                results[f"{dtype} {op}"] = {
                    "points": points,
                    "threshold_elements_median": derived_threshold(points, args.margin, "median"),
                    "threshold_elements_q1": derived_threshold(points, args.margin, "q1"),
                    "work_bytes_per_element": WORK_PER_BYTE[op] * np.dtype(dtype).itemsize,
                }
    finally:
        set_min_bytes(0)
        l1l2_rs.set_num_threads(0)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "workers": f"asleep (calls {args.gap_us:g} us apart)" if args.asleep else "awake",
        "margin": args.margin,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "parallel_min_bytes_now": _l1l2_rs.PARALLEL_MIN_BYTES,
        "parallel_min_bytes_asleep_now": _l1l2_rs.PARALLEL_MIN_BYTES_ASLEEP,
        "results": results,
    }
    write_results(
        args.out, "threshold_asleep" if args.asleep else "threshold", report, markdown(report)
    )
    return 0


def point(size: int, one: Timing, two: Timing) -> dict[str, Any]:
    return {
        "size": size,
        "one_median": one.median,
        "two_median": two.median,
        "one_iqr_percent": one.iqr_percent,
        "two_iqr_percent": two.iqr_percent,
        "one_q1": one.q1,
        "two_q1": two.q1,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Workers {report['workers']}. Two threads beat one by {report['margin']:.2f}x from "
        "(elements / bytes of work; by medians, and by first quartiles):",
        "",
        "| dtype op | from (median) | work bytes | from (q1) | work bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in report["results"].items():
        cells = [name]
        for key in ("threshold_elements_median", "threshold_elements_q1"):
            elements = result[key]
            if elements is None:
                cells += ["never", "-"]
            else:
                cells += [f"{elements:,}", f"{elements * result['work_bytes_per_element']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Two threads / one thread, median time per call:",
        "",
        "| dtype op | "
        + " | ".join(f"{p['size']:,}" for p in next(iter(report["results"].values()))["points"])
        + " |",
        "|---|" + "---:|" * len(next(iter(report["results"].values()))["points"]),
    ]
    for name, result in report["results"].items():
        ratios = [f"{p['two_median'] / p['one_median']:.2f}" for p in result["points"]]
        lines.append(f"| {name} | " + " | ".join(ratios) + " |")
    before = "/".join(f"{v:.2f}" for v in report["load_average_before"])
    after = "/".join(f"{v:.2f}" for v in report["load_average_after"])
    lines += [
        "",
        f"Current PARALLEL_MIN_BYTES: {report['parallel_min_bytes_now']:,} (workers awake),"
        f" PARALLEL_MIN_BYTES_ASLEEP: {report['parallel_min_bytes_asleep_now']:,}. Load average"
        f" (1, 5, 15 min) before {before}, after {after}. Command: `{report['command']}`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
