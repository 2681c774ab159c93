"""The training ops next to what bounds them: value_and_grad, prox_ and the many-tensor calls.

    python benches/training.py            # full run, writes benches/results/training.{md,json}
    python benches/training.py --quick    # a few seconds

For each float dtype and size the candidates are timed interleaved (every round calls each once;
the figure is the median over the rounds), as in ``compare.py``:

- ``np.copyto(b, a)``: reads ``a`` once and writes ``b`` once, the least any op that reads the
  weights and writes a gradient can do (the read+write limit);
- ``value_and_grad`` into an existing buffer, with and without ``accumulate``, and ``prox_`` in
  place (reads and writes the same buffer, the same traffic as the copy);
- the numpy expression of the same gradient, ``l1 * np.sign(w) + 2 * l2 * w``, and of the prox
  step.

Many tensors: ``value_and_grad_many`` over 1000 tensors of 1e3, 100 of 1e4 and the ResNet-50
parameter shapes (``shared/data/resnet50_shapes.json``: 214 tensors, 25.6 M elements) against
one ``value_and_grad`` call on a single array of the same total size.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from compare import (  # the same interleaved timing as the penalty table
    Timing,
    time_interleaved,
    write_results,
)

import l1l2_rs

L1, L2, LR = 1e-4, 1e-3, 1e-2
Candidate = Callable[[], Any]
SHAPES = Path(__file__).resolve().parents[2] / "shared" / "data" / "resnet50_shapes.json"


def make(size: int, dtype: Any, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(size) * 0.05).astype(dtype)


def single_array_candidates(x: np.ndarray) -> dict[str, Candidate]:
    copy_target = np.empty_like(x)
    grad = np.empty_like(x)
    accumulated = np.zeros_like(x)
    proxed = x.copy()
    return {
        "np.copyto": lambda: np.copyto(copy_target, x),
        "value_and_grad": lambda: l1l2_rs.value_and_grad(x, L1, L2, out=grad),
        "value_and_grad accumulate": lambda: l1l2_rs.value_and_grad(
            x, L1, L2, out=accumulated, accumulate=True, scale=0.0
        ),
        "prox_": lambda: l1l2_rs.prox_(proxed, LR, L1, 0.0),  # l2 = 0: repeated steps stay put
        "numpy grad": lambda: L1 * np.sign(x) + 2 * L2 * x,
        "numpy prox": lambda: np.sign(x) * np.maximum(np.abs(x) - LR * L1, 0) / (1 + 2 * LR * L2),
    }


def many_candidates(xs: list[np.ndarray]) -> dict[str, Candidate]:
    outs = [np.empty_like(x) for x in xs]
    whole = np.concatenate([x.ravel() for x in xs])
    whole_grad = np.empty_like(whole)
    return {
        "value_and_grad_many": lambda: l1l2_rs.value_and_grad_many(xs, L1, L2, outs=outs),
        "one value_and_grad on the concatenation": lambda: l1l2_rs.value_and_grad(
            whole, L1, L2, out=whole_grad
        ),
        "a value_and_grad per tensor": lambda: [
            l1l2_rs.value_and_grad(x, L1, L2, out=out) for x, out in zip(xs, outs, strict=True)
        ],
        "prox_many_": lambda: l1l2_rs.prox_many_(xs, 0.0, L1, L2),
        "one prox_ on the concatenation": lambda: l1l2_rs.prox_(whole, 0.0, L1, L2),
    }


def model_lists(dtype: Any, quick: bool) -> dict[str, list[np.ndarray]]:
    lists = {
        "1000 x 1e3": [make(1_000, dtype, seed) for seed in range(1000)],
        "100 x 1e4": [make(10_000, dtype, seed) for seed in range(100)],
    }
    if not quick and SHAPES.exists():
        shapes = json.loads(SHAPES.read_text())["shapes"]
        lists[f"ResNet-50 ({len(shapes)} tensors)"] = [
            make(math.prod(shape), dtype, seed).reshape(shape) for seed, shape in enumerate(shapes)
        ]
    return lists


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    args = parser.parse_args()
    rounds, budget = (5, 0.05) if args.quick else (21, 0.6)
    sizes = [1_000, 100_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for name in args.dtypes.split(","):
        dtype = np.dtype(name)
        for size in sizes:
            times = medians(
                time_interleaved(single_array_candidates(make(size, dtype)), rounds, budget)
            )
            rows.append({"dtype": name, "case": f"{size:.0e}", "seconds": times})
            print(
                f"{name} {size:.0e} " + "  ".join(f"{c}={s * 1e6:.1f}us" for c, s in times.items())
            )
        for label, xs in model_lists(dtype, args.quick).items():
            times = medians(time_interleaved(many_candidates(xs), rounds, budget))
            rows.append({"dtype": name, "case": label, "seconds": times})
            print(f"{name} {label} " + "  ".join(f"{c}={s * 1e6:.1f}us" for c, s in times.items()))
    report = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "simd": l1l2_rs.simd_isa(),
            "threads": l1l2_rs.get_num_threads(),
        },
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    write_results(args.out, "training", report, markdown(rows))
    return 0


def medians(times: dict[str, Timing]) -> dict[str, float]:
    """Seconds per call of each candidate: the median of its rounds."""
    return {name: timing.median for name, timing in times.items()}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dtype | case | candidate | time | x reference |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        times = row["seconds"]
        reference_name = (
            "np.copyto" if "np.copyto" in times else "one value_and_grad on the concatenation"
        )
        reference = times[reference_name]
        for candidate, seconds in times.items():
            ratio = "" if candidate == reference_name else f"{seconds / reference:.2f}"
            lines.append(
                f"| {row['dtype']} | {row['case']} | {candidate} | {seconds * 1e6:.1f} µs | "
                f"{ratio} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
