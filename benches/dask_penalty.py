"""``l1l2_rs.dask.penalty`` against Dask's own ``abs(x).sum()`` and ``(x**2).sum()`` on a local
cluster, and a check that the result has the same bits on 1 and 2 worker processes.

    python benches/dask_penalty.py                      # 4e8 float32 in 8 chunks, 2 workers
    python benches/dask_penalty.py --size 4e7 --rounds 3

The array is generated inside the workers (``da.random`` with a fixed seed) and persisted there,
so that nothing large crosses processes and every round reads the same chunks from the workers'
memory. The candidates are timed interleaved (each round runs both, in alternating order); the
table gives the median over the rounds of ``compute()`` from the client. Dask's sums run as one
graph (``dask.compute`` of both), ours as one reduction of the partial sums.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

import l1l2_rs.dask

L1, L2 = 1e-4, 1e-3


def generated(size: int, chunks: int) -> Any:
    """The benchmark's float32 array, generated and kept in the workers."""
    rng = da.random.default_rng(20261206)
    x = rng.standard_normal(size, chunks=-(-size // chunks), dtype=np.float32)
    return x.persist()


def ours(x: Any) -> Callable[[], Any]:
    return lambda: l1l2_rs.dask.penalty(x, L1, L2).compute()


def dask_sums(x: Any) -> Callable[[], Any]:
    def run() -> Any:
        abs_sum, squares = dask.compute(abs(x).sum(), (x**2).sum())
        return L1 * abs_sum + L2 * squares

    return run


def timed_rounds(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    for run in candidates.values():
        run()  # warm up: imports and pools in the workers
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def cluster(workers: int) -> LocalCluster:
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=4e8, help="float32 elements")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = int(args.size)
    print(f"load average before: {os.getloadavg()}")
    bits = {}
    for workers in (2, 1):
        with cluster(workers) as local, Client(local):
            x = generated(size, args.chunks)
            wait(x)
            result = ours(x)()
            bits[workers] = np.asarray(result).tobytes()
            if workers == 2:
                times = timed_rounds(
                    {"l1l2_rs.dask": ours(x), "dask sums": dask_sums(x)}, args.rounds
                )
                reference = dask_sums(x)()
                print(f"penalty: ours {result!r}, dask's float32 sums {reference!r}")
    print(f"load average after: {os.getloadavg()}")
    print(
        f"\n{size:.0e} float32 in {args.chunks} chunks, 2 worker processes x 1 thread, "
        f"{args.rounds} rounds\n"
    )
    print("| candidate | median | min | max |")
    print("|---|---:|---:|---:|")
    for name, samples in times.items():
        print(
            f"| {name} | {statistics.median(samples) * 1e3:.0f} ms | "
            f"{min(samples) * 1e3:.0f} ms | {max(samples) * 1e3:.0f} ms |"
        )
    ratio = statistics.median(times["dask sums"]) / statistics.median(times["l1l2_rs.dask"])
    print(f"\nratio (dask sums / ours): {ratio:.1f}x")
    same = bits[1] == bits[2]
    print(f"same bits on 1 and 2 workers: {same}")
    if not same:
        raise SystemExit("the penalty differs between 1 and 2 workers")


if __name__ == "__main__":
    main()
