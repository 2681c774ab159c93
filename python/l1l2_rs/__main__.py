"""``l1l2`` / ``python -m l1l2_rs``: the penalty of ``.npy`` files, or a demo against numpy.

With files, each is memory-mapped (never read into memory as a copy) and its penalty printed, then
the total. Without files, a model-sized set of float32 weights is generated and the penalty and its
time are printed next to numpy's for the same data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import L1L2, get_num_threads, simd_isa


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l1l2",
        description="Print the L1/L2 regularization penalty l1*sum(|x|) + l2*sum(x**2) of .npy "
        "files (memory-mapped), and their total. Without files, run a demo on generated "
        "model-sized weights and compare with numpy.",
    )
    parser.add_argument("files", nargs="*", help=".npy files holding weight arrays")
    parser.add_argument("--l1", type=float, default=0.01, help="L1 factor (default 0.01)")
    parser.add_argument("--l2", type=float, default=0.01, help="L2 factor (default 0.01)")
    parser.add_argument(
        "--size",
        type=_count,
        default=25_000_000,
        help="demo only: number of float32 weights to generate (default 25e6, ~100 MB)",
    )
    return parser


def _count(text: str) -> int:
    """A positive element count: ``1000``, ``1e6`` or ``25_000_000``."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of weights, got {text!r}") from None
    if not (value >= 1 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def _load(path: str) -> np.ndarray[Any, np.dtype[Any]]:
    """The array of a ``.npy`` file, memory-mapped; ``ValueError`` for anything else.

    numpy maps the size its header promises and refuses a file shorter than that; a file that is
    truncated while it is being read still ends the process with SIGBUS, as any mapped read does.
    """
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:
        raise ValueError("empty or truncated file (no .npy header)") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise ValueError("a .npz archive: pass the .npy arrays it holds (unzip it)")
    return loaded


def _best_time(function: Callable[[], Any], repeat: int = 7) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def _demo(regularizer: L1L2, size: int) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(size, dtype=np.float32) * np.float32(0.05)
    l1, l2 = regularizer.l1, regularizer.l2
    ours_time, ours = _best_time(lambda: regularizer(weights))
    numpy_time, reference = _best_time(
        lambda: l1 * np.abs(weights).sum() + l2 * np.square(weights).sum()
    )
    print(f"weights: {size:,} float32 ({weights.nbytes / 1e6:.0f} MB), generated")
    print(f"{regularizer!r}, SIMD: {simd_isa()}, threads: {get_num_threads()}")
    print(f"l1l2_rs: {float(ours):.9g}  in {ours_time * 1e3:8.3f} ms")
    print(f"numpy:   {float(reference):.9g}  in {numpy_time * 1e3:8.3f} ms")
    print(f"speed-up: {numpy_time / ours_time:.1f}x")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        regularizer = L1L2(arguments.l1, arguments.l2)
    except (TypeError, ValueError) as error:
        print(f"l1l2: {error}", file=sys.stderr)
        return 2
    if not arguments.files:
        try:
            _demo(regularizer, arguments.size)
        except MemoryError:
            gigabytes = arguments.size * 4 / 2**30
            print(
                f"l1l2: not enough memory for {arguments.size:,} float32 weights "
                f"({gigabytes:.1f} GiB); pass a smaller --size",
                file=sys.stderr,
            )
            return 1
        return 0
    total = 0.0
    for path in arguments.files:
        try:
            weights = _load(path)
            value = regularizer(weights)
        except (OSError, ValueError, TypeError) as error:
            print(f"l1l2: {path}: {error}", file=sys.stderr)
            return 1
        total += float(value)
        print(f"{path}\t{weights.dtype}\t{weights.shape}\t{float(value):.9g}")
    print(f"total\t{total:.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
