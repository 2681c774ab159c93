"""The comparison harness itself: its spread statistics and its C reference."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from compare import Timing, build_c_reference, make, views_of_one_buffer


def test_timing_quartiles_match_numpy_percentiles() -> None:
    samples = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0, 5.5]
    timing = Timing.of(samples)
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    assert (timing.q1, timing.median, timing.q3) == pytest.approx((q1, median, q3))
    assert timing.iqr_percent == pytest.approx(100 * (q3 - q1) / median)


def test_views_of_one_buffer_are_disjoint_aligned_arrays_of_the_shapes() -> None:
    shapes = [(3, 5), (64,), (7, 1, 2), (1,), (4096, 3)]
    views = views_of_one_buffer(shapes)
    assert [view.shape for view in views] == shapes
    assert all(view.dtype == np.float32 and view.flags.c_contiguous for view in views)
    assert all(view.ctypes.data % 64 == 0 for view in views)
    buffer = views[0].base
    assert all(view.base is buffer for view in views)
    starts = [view.ctypes.data for view in views]
    assert all(a + v.nbytes <= b for a, v, b in zip(starts, views, starts[1:], strict=False))


@pytest.fixture(scope="module")
def c_reference() -> Any:
    module, how = build_c_reference()
    assert module is not None, how  # gcc and the Python headers are part of the dev setup
    return module


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_c_reference_penalty_is_the_exact_penalty(
    c_reference: Any, dtype: type, threads: int
) -> None:
    x = make(50_001, dtype)
    exact_abs = sum(Fraction(abs(float(v))) for v in x)
    exact_sq = sum(Fraction(float(v)) ** 2 for v in x)
    found_abs, found_sq = c_reference.sums(x, threads)
    assert math.isclose(found_abs, float(exact_abs), rel_tol=1e-13)
    assert math.isclose(found_sq, float(exact_sq), rel_tol=1e-13)
    penalty = c_reference.penalty(x, 0.25, 0.5, threads)
    assert math.isclose(penalty, float(exact_abs / 4 + exact_sq / 2), rel_tol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_c_reference_copy_copies(c_reference: Any, threads: int) -> None:
    source = make(100_003, np.float64)
    destination = np.zeros_like(source)
    c_reference.copy(destination, source, threads)
    assert np.array_equal(destination, source)


def test_c_reference_refuses_bad_input(c_reference: Any) -> None:
    with pytest.raises(TypeError, match="x: expected a float32 or float64"):
        c_reference.sums(np.ones(4, np.float16), 1)
    with pytest.raises(ValueError, match="threads"):
        c_reference.sums(np.ones(4), 0)
    with pytest.raises(ValueError, match="dst"):
        c_reference.copy(np.ones(3), np.ones(4), 1)
