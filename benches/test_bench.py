"""pytest-benchmark suite: sizes x dtypes x layouts, l1l2_rs next to numpy.

`python -m pytest benches --benchmark-enable` measures; CI runs the same file with benchmarks
disabled (each body runs once), so the suite cannot rot.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import l1l2_rs

try:
    import ml_dtypes

    DTYPES: list[Any] = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
except ImportError:  # pragma: no cover
    DTYPES = [np.float16, np.float32, np.float64]

SIZES = [1_000, 100_000, 10_000_000]
LAYOUTS = {
    "contiguous": lambda x: x,
    "every_other": lambda x: x[::2],
    "transposed": lambda x: x.reshape(-1, 100 if x.size >= 10_000 else 10).T,
}


def data(size: int, dtype: Any) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(size) * 0.05).astype(dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
def test_l1l2_rs(benchmark: Any, size: int, dtype: Any, layout: str) -> None:
    x = LAYOUTS[layout](data(size, dtype))
    regularizer = l1l2_rs.L1L2(1e-4, 1e-3)
    benchmark.group = f"{np.dtype(dtype).name}-{size}-{layout}"
    result = benchmark(regularizer, x)
    assert np.isfinite(result)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
def test_numpy_naive(benchmark: Any, size: int, dtype: Any) -> None:
    x = data(size, dtype)
    benchmark.group = f"{np.dtype(dtype).name}-{size}-contiguous"
    result = benchmark(lambda: 1e-4 * np.abs(x).sum() + 1e-3 * np.square(x).sum())
    assert np.isfinite(result)
