"""l1l2_rs calls between torch's own multi-threaded work, as in a training step.

    python benches/beside_torch.py                         # the installed l1l2_rs
    python benches/beside_torch.py --build /tmp/ab/a       # a build's _l1l2_rs*.so (ab_builds.py)

Each step runs two 256x256 float32 matrix products on torch's threads (``--torch-threads``,
default 2), then one float32 penalty. torch's OpenMP workers keep spinning on their CPUs for a
while after a product, so a thread pool that hands work to a worker whose CPU they hold waits for
the OS to run it. Prints, per size, percentiles of the penalty call and of the two products over
``--steps`` steps (after 50 untimed ones), in microseconds, and the load average.
``OMP_WAIT_POLICY=PASSIVE`` in the environment makes torch's workers sleep at once instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

L1, L2 = 1e-3, 1e-2
WARMUP_STEPS = 50
PERCENTILES = (10, 50, 90, 99, 100)


def penalty_function(build: Path | None) -> Callable[[np.ndarray], Any]:
    if build is None:
        import l1l2_rs

        regularizer = l1l2_rs.L1L2(L1, L2)
        return regularizer
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_builds import load_build

    module = load_build(build)
    return lambda x: module.penalty(x, L1, L2)


def percentiles(samples: list[float]) -> str:
    values = np.percentile(samples, PERCENTILES)
    return " ".join(f"{value:8.0f}" for value in values)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--build", type=Path, help="a directory holding a _l1l2_rs*.so")
    parser.add_argument("--sizes", default="1e5,1e6,4e6")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    penalty = penalty_function(args.build)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    print(f"torch threads {args.torch_threads}, load average {os.getloadavg()}")
    header = " ".join(f"{f'p{p}':>8}" for p in PERCENTILES)
    print(f"{'':28} {header}  (us)")
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        products, calls = [], []
        for step in range(WARMUP_STEPS + args.steps):
            start = time.perf_counter()
            for _ in range(2):
                a @ b
            between = time.perf_counter()
            penalty(x)
            end = time.perf_counter()
            if step >= WARMUP_STEPS:
                products.append((between - start) * 1e6)
                calls.append((end - between) * 1e6)
        print(f"{size:>11,} penalty          {percentiles(calls)}")
        print(f"{size:>11,} two products     {percentiles(products)}")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
