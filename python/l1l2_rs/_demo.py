"""The ``l1l2`` command without files: the penalty of generated model-sized float32 weights,
timed next to numpy's for the same data."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import get_num_threads, simd_isa
from .regularizers import L1L2


def _best_time(function: Callable[[], Any], repeat: int = 7) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_demo(regularizer: L1L2, size: int) -> None:
    """Print the penalty of ``size`` generated float32 weights, ours and numpy's, with timings.

    ``MemoryError`` or ``ValueError`` (numpy's) if ``size`` weights do not fit."""
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
