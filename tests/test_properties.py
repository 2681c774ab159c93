"""Property tests of the binding: random shapes, slices, transposes and dtypes vs exact sums."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import l1l2_rs
from conftest import (
    FLOAT_DTYPES,
    INT_DTYPES,
    assert_within_ulps,
    exact_penalty,
    exact_sums,
    penalty_ulps,
    sum_ulps,
)

DTYPES = FLOAT_DTYPES + INT_DTYPES + [np.bool_]


@st.composite
def strided_views(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
    size = int(np.prod(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "b":
        base = rng.random(size) < 0.5
    elif np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        base = rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True)
    else:
        base = (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 3, size)).astype(dtype)
    x = base.reshape(shape)
    # Random slices (any step, negative included) on every axis, then a random axis order.
    slices = tuple(
        slice(draw(st.integers(0, 2)), None, draw(st.sampled_from([1, 2, 3, -1, -2])))
        for _ in shape
    )
    x = x[slices]
    axes = draw(st.permutations(list(range(x.ndim))))
    x = x.transpose(axes)
    if draw(st.booleans()) and x.ndim >= 1:
        x = np.broadcast_to(x, (draw(st.integers(1, 3)), *x.shape))
    return x


@settings(max_examples=300, deadline=None)
@given(strided_views())
def test_sums_of_random_views_match_exact_sums(x: Any) -> None:
    abs_sum, squares = exact_sums(x)
    got_abs, got_squares = l1l2_rs.sums(x)
    assert_within_ulps(got_abs, float(abs_sum), np.float64, sum_ulps(x.dtype))
    assert_within_ulps(got_squares, float(squares), np.float64, sum_ulps(x.dtype))
    result = l1l2_rs.L1L2(0.03, 0.002)(x)
    out_dtype = x.dtype if x.dtype.kind in "fV" else np.dtype(np.float64)
    assert result.dtype == out_dtype
    assert_within_ulps(result, exact_penalty(x, 0.03, 0.002), out_dtype, penalty_ulps(out_dtype))
