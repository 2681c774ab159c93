"""Values, dtypes and layouts against exact references (tests/conftest.py), never our own output."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import l1l2_rs
from conftest import (
    BFLOAT16,
    FLOAT_DTYPES,
    INT_DTYPES,
    assert_within_ulps,
    exact_penalty,
    exact_sums,
    penalty_ulps,
    sum_ulps,
)
from l1l2_rs._arrays import coerce

ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + [np.bool_]


def make(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Random data of ``dtype`` spanning its range sensibly (no overflow in the penalty itself)."""
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    scale = 1e3 if np.dtype(dtype).itemsize > 2 else 30.0
    return (rng.standard_normal(shape) * scale).astype(dtype)


def layouts(base: np.ndarray) -> dict[str, np.ndarray]:
    """The same kind of data in every layout the core must read in place."""
    cube = base[: 4 * 5 * 6].reshape(4, 5, 6)
    return {
        "C": base,
        "F": np.asfortranarray(base[: 7 * 11].reshape(7, 11)),
        "step3": base[::3],
        "reversed": base[::-1],
        "transposed3d": cube.transpose(2, 0, 1),
        "negative2d": cube[:, ::-2, 1::2],
        "broadcast": np.broadcast_to(base[:7], (9, 7)),
        "zero_d": base[3].reshape(()),
        "empty": base[:0],
        "empty2d": base[:0].reshape(0, 3),
    }


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_and_layout_against_exact_reference(
    dtype: Any, rng: np.random.Generator
) -> None:
    base = make(rng, (1000,), dtype)
    out_dtype = np.dtype(dtype) if np.dtype(dtype).kind in "fV" else np.dtype(np.float64)
    for name, view in layouts(base).items():
        abs_sum, squares = exact_sums(view)
        got_abs, got_squares = l1l2_rs.sums(view)
        assert isinstance(got_abs, float) and isinstance(got_squares, float)
        assert_within_ulps(got_abs, float(abs_sum), np.float64, sum_ulps(dtype))
        assert_within_ulps(got_squares, float(squares), np.float64, sum_ulps(dtype))
        result = l1l2_rs.L1L2(0.01, 0.001)(view)
        assert result.dtype == out_dtype, name
        expected = exact_penalty(view, 0.01, 0.001)
        assert_within_ulps(result, expected, out_dtype, penalty_ulps(out_dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [1, 15, 16, 17, 1023, 1025, 40_000, 300_001])
def test_lengths_across_lane_block_and_chunk_boundaries(
    dtype: Any, size: int, rng: np.random.Generator
) -> None:
    x = make(rng, (size,), dtype)
    ulps = penalty_ulps(dtype)
    for l1, l2 in [(0.01, 0.0), (0.0, 0.01), (1e-3, 7e-4)]:
        assert_within_ulps(l1l2_rs.L1L2(l1, l2)(x), exact_penalty(x, l1, l2), dtype, ulps)


def test_float64_is_within_4_ulp_on_hard_data(rng: np.random.Generator) -> None:
    # Values over 30 decades: plain float64 summation loses many ulp here.
    x = rng.standard_normal(200_000) * 10.0 ** rng.integers(-15, 15, 200_000)
    abs_sum, squares = exact_sums(x)
    got_abs, got_squares = l1l2_rs.sums(x)
    assert_within_ulps(got_abs, float(abs_sum), np.float64, 4)
    assert_within_ulps(got_squares, float(squares), np.float64, 4)


def test_float16_penalty_that_fits_is_finite() -> None:
    # Keras computes sum(x**2) in float16 here and returns inf; the true penalty is ~4.3e3.
    x = np.full(1000, 65504.0, dtype=np.float16)
    result = l1l2_rs.L2(1e-9)(x)
    assert result.dtype == np.float16
    assert np.isfinite(result)
    assert_within_ulps(result, exact_penalty(x, 0.0, 1e-9), np.float16, 1)
    # ... and one that does not fit overflows to inf, as float16 must.
    assert np.isinf(l1l2_rs.L2(1.0)(x))


def test_factor_is_not_rounded_to_float32_and_result_is_rounded_once() -> None:
    # l1 = 1 + 2**-11 + 2**-30 lies just above a float16 tie. Rounded to float32 first (as TF 2.4
    # rounds factors, or a float64 -> float32 -> float16 cast), the 2**-30 is lost and the tie goes
    # to even, 1.0. Rounded once, the result is the next float16 up.
    factor = 1 + 2**-11 + 2**-30
    result = l1l2_rs.L1(factor)(np.ones(1, dtype=np.float16))
    assert result.dtype == np.float16
    assert float(result) == 1 + 2**-10


@pytest.mark.parametrize("dtype", [*INT_DTYPES, np.bool_], ids=lambda d: np.dtype(d).name)
def test_integer_inputs_use_the_full_factor(dtype: Any) -> None:
    x = np.array([1, 0, 1, 1], dtype=dtype)
    result = l1l2_rs.L1(0.01)(x)  # Keras truncates 0.01 to int 0 and returns 0
    assert result.dtype == np.float64
    assert result == 0.01 * 3
    assert l1l2_rs.L1L2(0.25, 0.5)(x) == 0.25 * 3 + 0.5 * 3


def test_int64_extremes_are_exact() -> None:
    x = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1] * 3, dtype=np.int64)
    abs_sum, squares = exact_sums(x)
    assert l1l2_rs.sums(x) == (float(abs_sum), float(squares))
    u = np.full(5, np.iinfo(np.uint64).max, dtype=np.uint64)
    assert l1l2_rs.sums(u) == tuple(float(v) for v in exact_sums(u))


class TestNanAndZeroFactors:
    x = np.array([1.0, np.nan, -2.0], dtype=np.float32)

    def test_l1l2_zero_factors_skip_terms(self) -> None:
        assert l1l2_rs.L1L2(0.0, 0.0)(self.x) == 0
        assert l1l2_rs.L1L2(0.0, 0.0)(self.x).dtype == np.float32
        assert np.isnan(l1l2_rs.L1L2(0.0, 0.1)(self.x))

    def test_l1_l2_zero_factor_still_propagates_nan(self) -> None:
        assert np.isnan(l1l2_rs.L1(0.0)(self.x))
        assert np.isnan(l1l2_rs.L2(0.0)(self.x))

    def test_infinity_propagates(self) -> None:
        y = np.array([1.0, -np.inf], dtype=np.float16)
        assert l1l2_rs.L1(0.5)(y) == np.inf
        assert l1l2_rs.L2(0.5)(y) == np.inf

    def test_empty_gives_zero_of_input_dtype(self) -> None:
        for dtype in FLOAT_DTYPES:
            result = l1l2_rs.L1L2(0.1, 0.1)(np.zeros(0, dtype=dtype))
            assert result == 0 and result.dtype == np.dtype(dtype)


def test_signed_zeros_and_subnormals() -> None:
    tiny = np.finfo(np.float64).smallest_subnormal
    x = np.array([-0.0, 0.0, tiny, -tiny])
    assert l1l2_rs.sums(x) == (2 * tiny, 0.0)
    h = np.array([np.finfo(np.float16).smallest_subnormal] * 2, dtype=np.float16)
    assert l1l2_rs.sums(h) == (2.0**-23, 2.0**-47)


@pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes is not installed")
def test_bfloat16_result_type() -> None:
    x = np.arange(-8, 8).astype(BFLOAT16)
    result = l1l2_rs.L1L2(0.5, 0.0)(x)
    assert result.dtype == np.dtype(BFLOAT16)
    assert float(result) == 0.5 * 64


def test_array_likes_are_accepted() -> None:
    assert l1l2_rs.sums([1, -2, 3]) == (6.0, 14.0)
    assert l1l2_rs.sums(-3.0) == (3.0, 9.0)
    assert l1l2_rs.sums(memoryview(np.array([1.5, -2.5]))) == (4.0, 8.5)
    assert l1l2_rs.L1(0.5)([[1.0, -1.0]]).dtype == np.float64

    class ArrayLike:
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return np.array([3.0, 4.0], dtype=np.float32)

    assert l1l2_rs.L2(1.0)(ArrayLike()) == np.float32(25.0)


def test_jax_arrays_are_accepted() -> None:
    import jax.numpy as jnp  # the test extra installs jax

    x = jnp.arange(6, dtype=jnp.float32) - 2.5
    result = l1l2_rs.L1L2(0.1, 0.2)(x)
    assert result.dtype == np.float32
    assert_within_ulps(result, exact_penalty(np.asarray(x), 0.1, 0.2), np.float32, 1)


def test_byte_swapped_and_unaligned_arrays() -> None:
    swapped = np.arange(10, dtype=">f8")
    assert l1l2_rs.sums(swapped) == (45.0, 285.0)
    raw = np.zeros(8 * 10 + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float64)
    unaligned[:] = np.arange(10)
    assert not unaligned.flags.aligned
    assert l1l2_rs.sums(unaligned) == (45.0, 285.0)


def _on_cache_line(values: np.ndarray) -> np.ndarray:
    raw = np.empty(values.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    placed = raw[start : start + values.nbytes].view(values.dtype)
    placed[:] = values
    return placed


def test_converted_inputs_give_the_same_bits_on_every_call(rng: np.random.Generator) -> None:
    # The bits depend on the data's address modulo 64 bytes. Inputs converted afresh on every call
    # (lists, byte-swapped copies) are placed on a line, whatever the allocator returns: the same
    # bits as the values on a line, call after call, with other allocations in between.
    values = rng.standard_normal(1001) * 10.0 ** rng.integers(-8, 8, 1001)
    expected = l1l2_rs.sums(_on_cache_line(values))
    as_list = values.tolist()
    swapped = values.astype(">f8")
    padding = []
    for size in rng.integers(1, 3000, 40):
        padding.append(np.empty(int(size), dtype=np.uint8))
        assert l1l2_rs.sums(as_list) == expected
        assert l1l2_rs.sums(swapped) == expected
        for converted in (as_list[: int(size)], swapped[: int(size)], float(size)):
            assert coerce(converted).ctypes.data % 64 == 0


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.ones(3, dtype=np.complex128), "complex128"),
        (np.array([object()]), "object"),
        (np.array(["a", "b"]), "<U1"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
        ("weights", "<U7"),
        # ml_dtypes' other types get the same message (bfloat16 is the one they add that we read)
        (np.ones(3, dtype=ml_dtypes.float8_e5m2), "unsupported dtype float8_e5m2"),
        (np.ones(3, dtype=ml_dtypes.int4), "unsupported dtype int4"),
    ],
)
def test_unsupported_dtypes_raise_type_error_naming_the_dtype(bad: Any, fragment: str) -> None:
    with pytest.raises(TypeError, match=fragment.replace("[", r"\[")):
        l1l2_rs.sums(bad)
    with pytest.raises(TypeError, match=fragment.replace("[", r"\[")):
        l1l2_rs.L1L2(0.1, 0.1)(bad)


def test_longdouble_is_refused() -> None:
    x = np.ones(3, dtype=np.longdouble)
    if x.dtype.itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(TypeError, match="float128"):
        l1l2_rs.sums(x)


def test_mutably_borrowed_arrays_and_read_only_arrays() -> None:
    x = np.arange(100.0)
    x.setflags(write=False)
    assert l1l2_rs.sums(x) == (4950.0, float(sum(i * i for i in range(100))))


def test_memory_mapped_files(tmp_path: Any) -> None:
    path = tmp_path / "w.npy"
    np.save(path, np.arange(-50, 50, dtype=np.float32))
    mapped = np.load(path, mmap_mode="r")
    assert l1l2_rs.sums(mapped) == (2500.0, float(sum(i * i for i in range(-50, 50))))
    assert math.isfinite(float(l1l2_rs.L1L2(0.1, 0.1)(mapped)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_strided_views_never_read_skipped_values(dtype: Any) -> None:
    x = np.ones(4001, dtype=dtype)
    x[1::2] = np.nan
    x[3::4] = np.inf
    assert l1l2_rs.sums(x[::2]) == (2001.0, 2001.0)
    assert l1l2_rs.sums(x[::4]) == (1001.0, 1001.0)
    assert l1l2_rs.sums(x[::-2]) == (2001.0, 2001.0)
    matrix = x[:4000].reshape(40, 100)[:, ::2]
    assert l1l2_rs.sums(matrix) == (2000.0, 2000.0)


def test_bool_views_of_arbitrary_bytes_count_truth_values() -> None:
    raw = np.array([0, 1, 2, 255, 0, 7], dtype=np.uint8)
    as_bool = raw.view(np.bool_)  # bytes other than 0/1: numpy treats them as True
    expected = float(np.count_nonzero(raw))
    assert l1l2_rs.sums(as_bool) == (expected, expected)
    assert l1l2_rs.L1(1.0)(as_bool) == expected
    assert l1l2_rs.sums(as_bool[::-2]) == (3.0, 3.0)  # bytes 7, 255, 1


def test_zero_d_bool_view_of_a_non_canonical_byte() -> None:
    as_bool = np.array(9, dtype=np.uint8).view(np.bool_)
    assert as_bool.ndim == 0
    assert l1l2_rs.sums(as_bool) == (1.0, 1.0)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_broadcast_views_are_summed_as_copies_of_one(dtype: Any, rng: np.random.Generator) -> None:
    # k copies of a row: k times the row's exact sums, within the usual bounds (exact for
    # integers), whichever axes repeat it.
    row = make(rng, (37,), dtype)
    for shape, view in [
        ((5, 37), np.broadcast_to(row, (5, 37))),
        ((37, 6), np.broadcast_to(row[:, None], (37, 6))),
        ((3, 37, 4), np.broadcast_to(row[None, :, None], (3, 37, 4))),
        ((4, 18), np.broadcast_to(row[::2], (4, 19))[:, 1:]),
    ]:
        materialised = np.ascontiguousarray(view)
        assert materialised.shape == shape
        got_abs, got_squares = l1l2_rs.sums(view)
        exact_abs, exact_squares = exact_sums(materialised)
        assert_within_ulps(got_abs, float(exact_abs), np.float64, sum_ulps(dtype))
        assert_within_ulps(got_squares, float(exact_squares), np.float64, sum_ulps(dtype))
        expected = exact_penalty(materialised, 0.01, 0.02)
        out_dtype = dtype if dtype in FLOAT_DTYPES else np.float64
        penalty = l1l2_rs.L1L2(0.01, 0.02)(view)
        assert_within_ulps(penalty, expected, out_dtype, penalty_ulps(out_dtype))
        assert l1l2_rs.sums_many([view, row]) == [l1l2_rs.sums(view), l1l2_rs.sums(row)]


def test_huge_broadcasts_take_the_time_of_one_copy() -> None:
    # 10**12 elements (3.6 TB if materialised), walked element by element before: ~100 s.
    ones = np.broadcast_to(np.float32(1.5), (10**6, 10**6))
    assert l1l2_rs.sums(ones) == (1.5e12, 2.25e12)
    ints = np.broadcast_to(np.array([-(2**62), 3]), (2**29, 2**28, 2))  # 2**57 copies
    abs_sum, squares = l1l2_rs.sums(ints)
    assert abs_sum == float(2**57 * (2**62 + 3))  # exact, then rounded once
    assert squares == float(2**57 * (2**124 + 9))
    swapped = np.broadcast_to(np.array([1.0, -2.0], dtype=">f8"), (10**9, 2))
    assert l1l2_rs.sums(swapped) == (3e9, 5e9)  # one copy converted, not 16 GB
    bools = np.broadcast_to(np.array([9], dtype=np.uint8).view(np.bool_), (10**12,))
    assert l1l2_rs.sums(bools) == (1e12, 1e12)


def test_gradient_at_a_broadcast_input_keeps_the_penalty_bits(rng: np.random.Generator) -> None:
    row = rng.standard_normal(33).astype(np.float32)
    x = np.broadcast_to(row, (40, 33))
    penalty, grad = l1l2_rs.value_and_grad(x, 0.01, 0.02)
    assert penalty.tobytes() == l1l2_rs.penalty(x, 0.01, 0.02).tobytes()
    # Exactly, then rounded to float64 and float32, as documented (one fused multiply-add).
    exact = [
        Fraction(0.01) * int(np.sign(v)) + 2 * Fraction(0.02) * Fraction(float(v)) for v in row
    ]
    expected_row = np.array([float(e) for e in exact]).astype(np.float32)
    assert grad.shape == (40, 33)
    assert (grad == expected_row).all()


def test_masked_arrays_leave_masked_elements_out() -> None:
    x = np.ma.array([1.0, 1e30, -2.0], mask=[False, True, False])
    assert l1l2_rs.sums(x) == (3.0, 5.0)
    assert l1l2_rs.L1L2(0.5, 0.25)(x) == 0.5 * 3.0 + 0.25 * 5.0
    assert l1l2_rs.sums_many([x, np.ones(2)]) == [(3.0, 5.0), (2.0, 2.0)]
    _, grad = l1l2_rs.value_and_grad(x, 0.5, 0.25)
    assert grad.tolist() == [0.5 + 0.5, 0.0, -0.5 - 1.0]  # nothing at the masked element


def test_masked_arrays_are_not_written_in_place() -> None:
    x = np.ma.array([1.0, 5.0, -2.0], mask=[False, True, False])
    before = x.data.copy()
    with pytest.raises(TypeError, match="masked"):
        l1l2_rs.prox_(x, 0.1, 0.5, 0.25)
    with pytest.raises(TypeError, match="masked"):
        l1l2_rs.value_and_grad(np.ones(3), 0.5, 0.25, out=x)
    assert (x.data == before).all()


def _exact_float64_penalty(values: list[float], l1: float, l2: float) -> float:
    abs_sum = sum((abs(Fraction(v)) for v in values), Fraction(0))
    squares = sum((Fraction(v) ** 2 for v in values), Fraction(0))
    return float(Fraction(l1) * abs_sum + Fraction(l2) * squares)


@pytest.mark.parametrize(
    "values, l1, l2",
    [
        ([1e-160], 0.0, 1e300),  # the square underflows; the penalty is 1e-20
        ([3e-170] * 4, 0.0, 1e290),  # squares of 0 before: 3.6e-49
        ([1e200], 0.0, 1e-300),  # the square overflows; the penalty is 1e100
        ([1e308] * 10_000, 1e-10, 0.0),  # the sum overflows; the penalty is 1e302
        ([1e300, -1e-300, 5e299], 1e-310, 1e-320),
        ([2.0**-600, -(2.0**-700), 3 * 2.0**-650], 0.5, 2.0**900),
    ],
)
def test_float64_penalties_at_the_ends_of_the_range(
    values: list[float], l1: float, l2: float
) -> None:
    x = np.array(values)
    expected = _exact_float64_penalty(values, l1, l2)
    assert math.isfinite(expected) and abs(expected) >= 2.0**-1022
    for got in (
        l1l2_rs.L1L2(l1, l2)(x),
        l1l2_rs.penalty(x, l1, l2),
        l1l2_rs.value_and_grad(x, l1, l2)[0],
        np.float64(l1l2_rs.penalty_many([x, np.zeros(3)], l1, l2)),
        l1l2_rs.L1L2(l1, l2)(np.broadcast_to(x, (2, len(values)))) / 2,
    ):
        assert_within_ulps(got, expected, np.float64, penalty_ulps(np.float64))


def test_float64_sums_that_underflow_are_rescaled() -> None:
    x = np.full(1000, 1.5e-162)
    abs_sum, squares = l1l2_rs.sums(x)
    assert abs_sum == 1.5e-159
    exact = float(1000 * Fraction(1.5e-162) ** 2)  # 2.25e-321, subnormal: within one subnormal
    assert abs(squares - exact) <= 2.0**-1074
    # In range, nothing changes: the same bits as before the rescue existed (the fast path).
    y = np.array([1e-100, 2e-100])
    assert l1l2_rs.sums(y)[1] == float(Fraction(1e-100) ** 2 + Fraction(2e-100) ** 2)
