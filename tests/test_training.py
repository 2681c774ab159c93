"""The training API: grad, value_and_grad, prox_, the _many variants and the regularizer methods.

Every value is checked against an exact rational reference built here with ``fractions.Fraction``
(the float inputs and factors are exact rationals; the formula is evaluated exactly and rounded
once to the output dtype by ``round_to_dtype``), never against l1l2_rs's own output, except where
bit-equality to a single call (or to ``l1l2_rs.penalty``) is the point of the test.

The accuracy rule of the spec, as implemented by the ``expected_*`` builders:

* float16, bfloat16, float32: the exact value rounded once, except that any rounding of a value
  within 2^-50 (relative) of the exact one is accepted. That admits the neighbour exactly when the
  exact value lies within 2^-50 of a rounding tie (double rounding through float64).
* float64 ``grad`` without ``accumulate``: exactly the correctly rounded value (one fused
  multiply-add).
* ``accumulate``, every dtype: as above (float64: within 2 ulp) of the exact
  ``g_old + scale * t(x)``, plus an absolute slack of 2^-52 * (|g_old| + |scale * t(x)|) (one
  float64 ulp of the terms): the sum is computed in float64 and rounded there before the final
  rounding, so cancellation between ``g_old`` and ``scale * t(x)`` costs float64 precision, never
  more (and an intermediate never overflows when the scaled gradient is finite).
* float64 ``prox_``: within 2 ulp of the exact value.
* NaN expected -> NaN; an infinity from an infinite input -> that same infinity. The sign of a zero
  result is not specified and not checked (``-0.0 == 0.0``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import l1l2_rs
from conftest import BFLOAT16, FLOAT_DTYPES, INT_DTYPES, exact_sums, ulp_of

# ---------------------------------------------------------------------------------------------
# Exact rounding of a rational to each float format.

#: (significand bits, the implicit one included; smallest normal exponent) of each format. The
#: largest exponent is 1 - the smallest; the largest finite value is (2 - 2^(1-p)) * 2^emax.
FORMATS: dict[str, tuple[int, int]] = {
    "float16": (11, -14),
    "bfloat16": (8, -126),
    "float32": (24, -126),
    "float64": (53, -1022),
}

#: The spec's tie window: double rounding through float64 may pick the neighbour this near a tie.
TIE_WINDOW = Fraction(1, 2**50)


def _name(dtype: Any) -> str:
    return str(np.dtype(dtype).name)


def dtype_id(dtype: Any) -> str:
    return _name(dtype)


def _pow2(exponent: int) -> Fraction:
    return Fraction(2**exponent) if exponent >= 0 else Fraction(1, 2**-exponent)


def max_finite(dtype: Any) -> Fraction:
    """The largest finite value of ``dtype``, exactly."""
    precision, min_exp = FORMATS[_name(dtype)]
    return (2 - _pow2(1 - precision)) * _pow2(1 - min_exp)


def smallest_subnormal(dtype: Any) -> float:
    precision, min_exp = FORMATS[_name(dtype)]
    return math.ldexp(1.0, min_exp - (precision - 1))


def round_to_dtype(value: Fraction, dtype: Any) -> float:
    """``value`` rounded once to ``dtype``: round half to even, gradual underflow (subnormals) and
    overflow to infinity, computed from the format parameters alone. Returns the Python float equal
    to the rounded value (exact: every value of these formats is a float64)."""
    precision, min_exp = FORMATS[_name(dtype)]
    if value == 0:
        return 0.0
    magnitude = abs(value)
    # 2**exponent <= magnitude < 2**(exponent + 1)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if _pow2(exponent) > magnitude:
        exponent -= 1
    quantum = max(exponent, min_exp) - (precision - 1)  # the ulp: fixed below the normal range
    count = round(magnitude / _pow2(quantum))  # Fraction.__round__ rounds half to even
    if count * _pow2(quantum) > max_finite(dtype):
        result = math.inf
    else:
        result = math.ldexp(count, quantum)
    return -result if value < 0 else result


def ulp64(value: Fraction) -> Fraction:
    """One float64 ulp at ``value`` (the subnormal spacing at and near zero)."""
    magnitude = float(min(abs(value), max_finite(np.float64)))
    if magnitude == 0:
        return _pow2(-1074)
    return Fraction(ulp_of(magnitude, np.float64))


# ---------------------------------------------------------------------------------------------
# Exact references of the elementwise formulas. A float is returned only for NaN and infinities.

Exact = Fraction | float


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def grad_term(value: float, l1: float, l2: float, keep_l1: bool, keep_l2: bool) -> Exact:
    """t(x) = l1*sign(x) + 2*l2*x with the terms kept as given (IEEE rules for NaN and inf)."""
    if math.isnan(value):
        return math.nan if keep_l1 or keep_l2 else Fraction(0)
    if math.isinf(value):
        if keep_l2:
            return math.nan if l2 == 0 else value  # 0 * inf is NaN
        return Fraction(l1) * _sign(value) if keep_l1 else Fraction(0)
    total = Fraction(0)
    if keep_l1:
        total += Fraction(l1) * _sign(value)
    if keep_l2:
        total += 2 * Fraction(l2) * Fraction(value)
    return total


def accumulate_exact(old: float, term: Exact, scale: float) -> Exact:
    """g_old + scale * t exactly, with IEEE rules for NaN and infinities."""
    scaled: Exact = term * scale if isinstance(term, float) else Fraction(scale) * term
    if math.isnan(old) or (isinstance(scaled, float) and math.isnan(scaled)):
        return math.nan
    if math.isinf(old):
        if isinstance(scaled, float) and scaled != old:
            return math.nan  # inf - inf
        return old
    if isinstance(scaled, float):
        return scaled
    return Fraction(old) + scaled


def prox_exact(value: float, lr: float, l1: float, l2: float) -> Exact:
    """sign(x) * max(|x| - lr*l1, 0) / (1 + 2*lr*l2); NaN stays NaN, +-inf stays +-inf."""
    if not math.isfinite(value):
        return value
    shrunk = max(abs(Fraction(value)) - Fraction(lr) * Fraction(l1), Fraction(0))
    return _sign(value) * shrunk / (1 + 2 * Fraction(lr) * Fraction(l2))


class Expected(NamedTuple):
    """Per element, the smallest and largest acceptable result (NaN in ``lo``: NaN expected)."""

    lo: np.ndarray
    hi: np.ndarray

    def view(self, layout: Callable[[np.ndarray], np.ndarray]) -> Expected:
        return Expected(layout(self.lo), layout(self.hi))


def _bounds(exacts: list[Exact], tolerances: list[Fraction], shape: Any, dtype: Any) -> Expected:
    lo: list[float] = []
    hi: list[float] = []
    for exact, tolerance in zip(exacts, tolerances, strict=True):
        if isinstance(exact, float):
            lo.append(exact)
            hi.append(exact)
        else:
            lo.append(round_to_dtype(exact - tolerance, dtype))
            hi.append(round_to_dtype(exact + tolerance, dtype))
    return Expected(np.array(lo, dtype=np.float64).reshape(shape), np.array(hi).reshape(shape))


def _is_narrow(dtype: Any) -> bool:
    return bool(np.dtype(dtype) != np.dtype(np.float64))


def _flat(x: np.ndarray) -> list[float]:
    values: list[float] = np.asarray(x).astype(np.float64).ravel().tolist()
    return values


def _tie_tolerance(exact: Exact) -> Fraction:
    return TIE_WINDOW * abs(exact) if isinstance(exact, Fraction) else Fraction(0)


def expected_grad(
    x: np.ndarray, l1: float, l2: float, keep: tuple[bool, bool] | None = None
) -> Expected:
    """The acceptable grad of ``x``; ``keep``: the terms kept (default: a zero factor drops one)."""
    keep_l1, keep_l2 = keep if keep is not None else (l1 != 0, l2 != 0)
    exacts = [grad_term(v, l1, l2, keep_l1, keep_l2) for v in _flat(x)]
    if _is_narrow(x.dtype):
        tolerances = [_tie_tolerance(e) for e in exacts]
    else:
        tolerances = [Fraction(0)] * len(exacts)  # float64: correctly rounded
    return _bounds(exacts, tolerances, x.shape, x.dtype)


def expected_accumulate(
    x: np.ndarray, old: np.ndarray, l1: float, l2: float, scale: float
) -> Expected:
    exacts: list[Exact] = []
    tolerances: list[Fraction] = []
    for value, previous in zip(_flat(x), _flat(old), strict=True):
        term = grad_term(value, l1, l2, l1 != 0, l2 != 0)
        exact = accumulate_exact(previous, term, scale)
        exacts.append(exact)
        if not isinstance(exact, Fraction):
            tolerances.append(Fraction(0))
        else:
            assert isinstance(term, Fraction)
            terms = abs(Fraction(previous)) + abs(Fraction(scale) * term)
            rounding = _tie_tolerance(exact) if _is_narrow(x.dtype) else 2 * ulp64(exact)
            tolerances.append(rounding + terms / 2**52)
    return _bounds(exacts, tolerances, x.shape, x.dtype)


def expected_prox(x: np.ndarray, lr: float, l1: float, l2: float) -> Expected:
    exacts = [prox_exact(v, lr, l1, l2) for v in _flat(x)]
    if _is_narrow(x.dtype):
        tolerances = [_tie_tolerance(e) for e in exacts]
    else:
        tolerances = [2 * ulp64(e) if isinstance(e, Fraction) else Fraction(0) for e in exacts]
    return _bounds(exacts, tolerances, x.shape, x.dtype)


def assert_matches(got: Any, expected: Expected, x: Any, what: str) -> None:
    """``got`` (an array of ``x``'s dtype and shape) lies within ``expected`` element by element."""
    x = np.asarray(x)
    got_array = np.asarray(got)
    assert got_array.dtype == x.dtype, f"{what}: dtype {got_array.dtype}, expected {x.dtype}"
    assert got_array.shape == expected.lo.shape, f"{what}: shape {got_array.shape}"
    values = got_array.astype(np.float64).ravel()
    lo = expected.lo.ravel()
    hi = expected.hi.ravel()
    ok = np.where(np.isnan(lo), np.isnan(values), (lo <= values) & (values <= hi))
    if not ok.all():
        inputs = x.astype(np.float64).ravel()
        bad = np.flatnonzero(~ok)
        lines = [
            f"  [{i}] x={inputs[i]!r} ({float(inputs[i]).hex()}): got {values[i]!r} "
            f"({float(values[i]).hex()}), expected "
            + (f"{lo[i]!r}" if lo[i] == hi[i] or np.isnan(lo[i]) else f"[{lo[i]!r}, {hi[i]!r}]")
            for i in bad[:6]
        ]
        pytest.fail(f"{what} ({x.dtype}): {bad.size} of {values.size} wrong\n" + "\n".join(lines))


def assert_nearest(got: Any, ref: np.ndarray, dtype: Any, slack: np.ndarray, what: str) -> None:
    """For large arrays: ``got`` is a nearest ``dtype`` value of the float64 reference ``ref``,
    whose own error (plus the spec's tie window) is at most ``slack``: |got - ref| <= half an ulp of
    ``dtype`` + slack, or an infinity of ref's sign when ref is at or beyond the overflow threshold.
    Away from ties only the correctly rounded value passes."""
    precision, min_exp = FORMATS[_name(dtype)]
    values = np.asarray(got).astype(np.float64).ravel()
    ref = ref.ravel()
    slack = np.broadcast_to(slack, ref.shape).ravel()
    overflow_at = float(max_finite(dtype)) + math.ldexp(1.0, 1 - min_exp - precision)
    with np.errstate(invalid="ignore", over="ignore"):
        _, exponent = np.frexp(np.abs(ref))
        half_ulp = np.ldexp(0.5, np.maximum(exponent - 1, min_exp) - (precision - 1))
        finite = np.abs(values - ref) <= half_ulp + slack
        overflowing = (
            np.isinf(values)
            & (np.sign(values) == np.sign(ref))
            & (np.abs(ref) + slack >= overflow_at)
        )
        ok = np.where(np.isnan(ref), np.isnan(values), finite | overflowing)
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {values.size} wrong, first at {bad[:5].tolist()}: "
        f"got {values[bad[:5]].tolist()}, reference {ref[bad[:5]].tolist()}"
    )


def assert_same_scalar(got: Any, expected: Any, what: str = "") -> None:
    """Bit-for-bit the same numpy scalar (dtype too)."""
    assert isinstance(got, np.generic), f"{what}: {type(got).__name__} is not a numpy scalar"
    assert got.dtype == np.asarray(expected).dtype, f"{what}: {got.dtype} vs {expected.dtype}"
    assert np.asarray(got).tobytes() == np.asarray(expected).tobytes(), f"{what}: {got!r}"


def assert_same_bits(got: Any, expected: Any, what: str = "") -> None:
    got_array = np.asarray(got)
    expected_array = np.asarray(expected)
    assert got_array.dtype == expected_array.dtype, f"{what}: {got_array.dtype}"
    assert got_array.shape == expected_array.shape, f"{what}: {got_array.shape}"
    assert got_array.tobytes() == expected_array.tobytes(), f"{what}: bits differ"


# ---------------------------------------------------------------------------------------------
# Data: random values over each format's range, with NaN, infinities, zeros and subnormals.


def special_values(dtype: Any, *, moderate: bool = False) -> list[float]:
    min_exp = FORMATS[_name(dtype)][1]
    biggest = float(max_finite(dtype))
    normal = math.ldexp(1.0, min_exp)
    tiny = smallest_subnormal(dtype)
    if moderate and not _is_narrow(dtype):
        biggest = 1e300  # float64 accumulate: keep t(x) itself finite in float64
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, biggest, -biggest, normal, -normal]
    values += [tiny, -tiny, 3 * tiny, -5 * tiny, normal - tiny, 1.0, -1.0, 0.5, -0.75]
    if _name(dtype) == "float16":
        values += [65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5]
    return values


def sample(
    rng: np.random.Generator,
    size: int,
    dtype: Any,
    *,
    specials: bool = True,
    moderate: bool = False,
) -> np.ndarray:
    """``size`` values of ``dtype``: half over the whole exponent range (subnormals included), half
    within 2^+-8; ``specials`` inserts the special values at random positions."""
    precision, min_exp = FORMATS[_name(dtype)]
    top = 990 if moderate and not _is_narrow(dtype) else (1 - min_exp) - 4
    wide = rng.integers(min_exp - precision - 2, top, size)
    near = rng.integers(-8, 9, size)
    exponents = np.where(rng.random(size) < 0.5, wide, near)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(size) * np.ldexp(1.0, exponents)).astype(dtype)
    if specials and size:
        chosen = special_values(dtype, moderate=moderate)[: max(size // 3, 1)]
        positions = rng.choice(size, len(chosen), replace=False)
        x[positions] = np.array(chosen, dtype=np.float64).astype(dtype)
    return x


def moderate_sample(rng: np.random.Generator, shape: Any, dtype: Any) -> np.ndarray:
    """Finite values of moderate size (no NaN, no overflow of penalties): for the _many tests."""
    values: np.ndarray = (rng.standard_normal(shape) * 3.0).astype(dtype)
    return values


BASE_SIZE = 320

#: Layouts of a 1-D base array (of at least BASE_SIZE elements): views where possible.
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "contiguous": lambda a: a,
    "step2": lambda a: a[::2],
    "reversed": lambda a: a[::-1],
    "step3": lambda a: a[::3],
    "fortran2d": lambda a: np.asfortranarray(a[: 12 * 17].reshape(12, 17)),
    "transposed": lambda a: a[: 12 * 17].reshape(12, 17).T,
    "negative2d": lambda a: a[: 10 * 24].reshape(10, 24)[::-2, 1::3],
    "zero_d": lambda a: a[5:6].reshape(()),
    "empty": lambda a: a[:0],
    "empty2d": lambda a: a[:0].reshape(0, 4),
}

OUT_KINDS = ["none", "C", "F", "strided"]
SENTINEL = -7.25


def make_out(kind: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    """An ``out`` array of ``kind``, filled with SENTINEL. "strided" is every other element of a
    larger buffer (its ``.base``), whose other elements must stay SENTINEL."""
    if kind == "none":
        return None
    if kind == "C":
        out = np.empty(shape, dtype=dtype)
    elif kind == "F":
        out = np.empty(shape, dtype=dtype, order="F")
    else:
        full = np.full((*shape, 2), SENTINEL, dtype=dtype)
        out = full[..., 0]
    out[...] = SENTINEL
    return out


def assert_parent_untouched(out: np.ndarray | None, kind: str) -> None:
    if kind == "strided":
        assert out is not None and out.base is not None
        assert (np.asarray(out.base)[..., 1].astype(np.float64) == SENTINEL).all()


GRAD_FACTORS = [(0.01, 0.0), (0.0, 0.003), (0.1, 0.2), (1.0, 1.0)]


# ---------------------------------------------------------------------------------------------
# The reference helper itself.


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_format_parameters_match_numpy(dtype: Any) -> None:
    if _name(dtype) == "bfloat16":
        import ml_dtypes

        info: Any = ml_dtypes.finfo(dtype)
    else:
        info = np.finfo(dtype)
    assert float(max_finite(dtype)) == float(info.max)
    assert math.ldexp(1.0, FORMATS[_name(dtype)][1]) == float(info.smallest_normal)
    assert smallest_subnormal(dtype) == float(info.smallest_subnormal)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_round_to_dtype_agrees_with_single_roundings_from_float64(
    dtype: Any, rng: np.random.Generator
) -> None:
    # A float64 value rounded by numpy (float64 -> dtype is one rounding) must agree.
    values = rng.standard_normal(3000) * np.ldexp(1.0, rng.integers(-1074, 1020, 3000))
    values = np.concatenate([values, sample(rng, 3000, np.float64, specials=False)])
    with np.errstate(over="ignore"):
        rounded = values.astype(dtype).astype(np.float64)
    for value, expected in zip(values.tolist(), rounded.tolist(), strict=True):
        assert round_to_dtype(Fraction(value), dtype) == expected, value


def test_round_to_dtype_rounds_once_ties_to_even_subnormals_and_overflow() -> None:
    # 1 + 2^-11 + 2^-60 is not a float64: float() then astype would round twice (to the tie 1+2^-11,
    # then to even, 1.0). Rounded once it is the next float16 up.
    value = 1 + Fraction(1, 2**11) + Fraction(1, 2**60)
    assert round_to_dtype(value, np.float16) == 1 + 2**-10
    assert float(np.float64(float(value)).astype(np.float16)) == 1.0
    assert round_to_dtype(1 + Fraction(1, 2**11), np.float16) == 1.0  # a tie: to even
    assert round_to_dtype(1 + Fraction(3, 2**11), np.float16) == 1 + 2**-9
    assert round_to_dtype(-(1 + Fraction(3, 2**11)), np.float16) == -(1 + 2**-9)
    tiny = Fraction(1, 2**24)  # float16's smallest subnormal
    assert round_to_dtype(tiny / 2, np.float16) == 0.0
    assert round_to_dtype(tiny * 3 / 4, np.float16) == 2**-24
    assert round_to_dtype(tiny * 3 / 2, np.float16) == 2**-23  # tie between 1 and 2 -> 2
    assert round_to_dtype(tiny * 5 / 2, np.float16) == 2**-23  # tie between 2 and 3 -> 2
    assert round_to_dtype(Fraction(65519), np.float16) == 65504.0
    assert round_to_dtype(Fraction(65520), np.float16) == math.inf  # the tie goes to inf
    assert round_to_dtype(-(Fraction(10) ** 400), np.float64) == -math.inf
    assert round_to_dtype(Fraction(1, 2**1075), np.float64) == 0.0
    assert round_to_dtype(Fraction(3, 2**1076), np.float64) == 2**-1074
    assert round_to_dtype(1 + Fraction(1, 2**8) + Fraction(1, 2**30), BFLOAT16) == 1 + 2**-7


# ---------------------------------------------------------------------------------------------
# 1, 4. grad and value_and_grad: every dtype, layout and kind of out against the exact reference.


@pytest.mark.parametrize("l1, l2", GRAD_FACTORS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_grad_every_layout_and_out_against_exact_reference(
    dtype: Any, l1: float, l2: float, rng: np.random.Generator
) -> None:
    base = sample(rng, BASE_SIZE, dtype)
    expected = expected_grad(base, l1, l2)
    for name, layout in LAYOUTS.items():
        x = layout(base)
        want = expected.view(layout)
        before = x.tobytes()
        for kind in OUT_KINDS:
            what = f"grad {name} out={kind} l1={l1} l2={l2}"
            out = make_out(kind, x.shape, dtype)
            got = l1l2_rs.grad(x, l1, l2, out=out)
            if out is not None:
                assert got is out, what
            assert isinstance(got, np.ndarray), what
            assert_matches(got, want, x, what)
            assert_parent_untouched(out, kind)

            out = make_out(kind, x.shape, dtype)
            penalty, got = l1l2_rs.value_and_grad(x, l1, l2, out=out)
            if out is not None:
                assert got is out, what
            assert_matches(got, want, x, "value_and_grad " + what)
            assert_same_scalar(penalty, l1l2_rs.penalty(x, l1, l2), "penalty " + what)
            assert_parent_untouched(out, kind)
        assert x.tobytes() == before, f"{name}: x was modified"


@pytest.mark.parametrize("size", [0, 1, 2, 15, 16, 17, 63, 64, 65, 299])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_lengths_against_exact_reference(dtype: Any, size: int, rng: np.random.Generator) -> None:
    x = sample(rng, size, dtype)
    l1, l2 = 0.1, 0.2
    want = expected_grad(x, l1, l2)
    assert_matches(l1l2_rs.grad(x, l1, l2), want, x, f"grad n={size}")
    penalty, got = l1l2_rs.value_and_grad(x, l1, l2)
    assert_matches(got, want, x, f"value_and_grad n={size}")
    assert_same_scalar(penalty, l1l2_rs.penalty(x, l1, l2))

    old = sample(rng, size, dtype, moderate=True)
    y = sample(rng, size, dtype, moderate=True)
    out = old.copy()
    penalty, got = l1l2_rs.value_and_grad(y, l1, l2, out=out, accumulate=True, scale=0.5)
    assert got is out
    assert_matches(out, expected_accumulate(y, old, l1, l2, 0.5), y, f"accumulate n={size}")
    assert_same_scalar(penalty, l1l2_rs.penalty(y, l1, l2))

    z = x.copy()
    assert l1l2_rs.prox_(z, 0.05, 0.3, 0.2) is z
    assert_matches(z, expected_prox(x, 0.05, 0.3, 0.2), x, f"prox_ n={size}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_large_array_grad_and_prox(dtype: Any, rng: np.random.Generator) -> None:
    """200_003 elements: all of them against a float64 numpy reference, a sample exactly.

    The numpy references round a few times in float64: grad ``l1*sign(x) + 2*l2*x`` (no
    cancellation: both terms have x's sign) is within 2^-52 relative of the exact value, so for the
    narrow dtypes a nearest value of it within half an ulp + 2^-49 |ref| (the spec's 2^-50 tie
    window widened by that error) is required. prox's reference also loses up to 2^-52 (|x| + lr*l1)
    absolutely in the subtraction. float64 results, whose accuracy the sample checks exactly, must
    be within 1 ulp of the two-rounding grad reference, and for prox within the library's 2 ulp plus
    the reference's own error (2 ulp + that absolute loss) of the prox reference."""
    size = 200_003
    x = sample(rng, size, dtype)
    l1, l2, lr = 0.1, 0.2, 0.01
    wide = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        grad_ref = l1 * np.sign(wide) + 2 * l2 * wide
        threshold = lr * l1
        denominator = 1 + 2 * lr * l2
        prox_ref = np.sign(wide) * np.maximum(np.abs(wide) - threshold, 0) / denominator
        prox_slack = 2.0**-49 * np.abs(prox_ref) + 2.0**-51 * (np.abs(wide) + threshold)

    got = l1l2_rs.grad(x, l1, l2)
    z = x.copy()
    l1l2_rs.prox_(z, lr, l1, l2)
    if _is_narrow(dtype):
        assert_nearest(got, grad_ref, dtype, 2.0**-49 * np.abs(grad_ref), "grad")
        assert_nearest(z, prox_ref, dtype, prox_slack, "prox_")
    else:
        with np.errstate(invalid="ignore"):
            grad_close = np.abs(got - grad_ref) <= np.spacing(np.maximum(np.abs(got), grad_ref))
            prox_close = np.abs(z - prox_ref) <= 4 * np.spacing(np.abs(prox_ref)) + prox_slack
        for result, ref, close, what in [
            (got, grad_ref, grad_close, "grad"),
            (z, prox_ref, prox_close, "prox_"),
        ]:
            same = (result == ref) | (np.isnan(result) & np.isnan(ref))
            assert (close | same).all(), what

    picked = np.concatenate(
        [rng.choice(size, 1500, replace=False), np.flatnonzero(~np.isfinite(x))]
    )
    assert_matches(got[picked], expected_grad(x[picked], l1, l2), x[picked], "grad sample")
    assert_matches(z[picked], expected_prox(x[picked], lr, l1, l2), x[picked], "prox_ sample")


def test_float64_grad_is_one_fused_multiply_add() -> None:
    # 2*l2*x = (1 + 2^-52)^2 = 1 + 2^-51 + 2^-104; + l1 = 2^-53 lands just above a tie. Rounding the
    # product first gives the tie 1 + 2^-51 + 2^-53 and then the even 1 + 2^-51: one ulp low.
    x = np.array([1 + 2**-52, -(1 + 2**-52)])
    l2 = 0.5 * (1 + 2**-52)
    got = l1l2_rs.grad(x, 2.0**-53, l2)
    assert got.tolist() == [1 + 3 * 2**-52, -(1 + 3 * 2**-52)]
    assert_matches(got, expected_grad(x, 2.0**-53, l2), x, "fma")


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if _is_narrow(d)], ids=dtype_id)
def test_narrow_grad_is_rounded_once(dtype: Any) -> None:
    # l1 = 1 + 2^-p + 2^-(p+20) lies just above a tie of a p-bit format: rounded once, the next
    # value up; through an intermediate of fewer than p+20 bits (float32 for float16, bfloat16) it
    # would be the tie, then the even 1.0.
    precision = FORMATS[_name(dtype)][0]
    factor = 1 + 2.0**-precision + 2.0 ** -(precision + 20)
    x = np.array([1.0, -1.0, 0.0, 2.0], dtype=dtype)
    got = l1l2_rs.grad(x, factor, 0.0)
    step = 2.0 ** (1 - precision)
    assert got.astype(np.float64).tolist() == [1 + step, -(1 + step), 0.0, 1 + step]
    assert_matches(got, expected_grad(x, factor, 0.0), x, "rounded once")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_overflow_of_the_gradient_rounds_to_infinity(dtype: Any) -> None:
    biggest = float(max_finite(dtype))
    x = np.array([biggest, -biggest, biggest / 2], dtype=dtype)
    got = l1l2_rs.grad(x, 0.0, 1.0)  # 2 * x
    assert got.astype(np.float64).tolist() == [math.inf, -math.inf, biggest]
    assert_matches(got, expected_grad(x, 0.0, 1.0), x, "overflow")


def test_float16_extremes() -> None:
    x = np.array([65504.0, 6e-8, -6e-8, 6.1e-5, -65504.0], dtype=np.float16)
    for l1, l2 in [(0.0, 0.5), (0.0, 0.25), (1e-8, 0.0), (3e-8, 0.0), (0.0, 0.51), (1e-3, 1e-3)]:
        assert_matches(l1l2_rs.grad(x, l1, l2), expected_grad(x, l1, l2), x, f"{l1} {l2}")
    # 2 * 0.5 * x is x itself; 2 * 0.25 * x halves it (6e-8 -> a tie between 0 and 2^-24: to 0).
    assert l1l2_rs.grad(x, 0.0, 0.5).tolist() == x.tolist()
    assert l1l2_rs.grad(x, 0.0, 0.25).astype(np.float64).tolist()[:3] == [32752.0, 0.0, 0.0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    size=st.integers(0, 40),
    step=st.sampled_from([1, 2, 3, -1, -2]),
    l1=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.0**-7, 1 / 3]),
    l2=st.sampled_from([0.0, 0.002, 0.25, 1.0, 0.1]),
    accumulate=st.booleans(),
    scale=st.sampled_from([1.0, 0.5, -1.0, 1 / 32, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_views_against_exact_reference(
    dtype: Any,
    size: int,
    step: int,
    l1: float,
    l2: float,
    accumulate: bool,
    scale: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    x = sample(rng, size * abs(step), dtype, moderate=accumulate)[::step]
    if accumulate:
        old = sample(rng, x.size, dtype, moderate=True)
        out = old.copy()
        penalty, got = l1l2_rs.value_and_grad(x, l1, l2, out=out, accumulate=True, scale=scale)
        assert got is out
        assert_matches(got, expected_accumulate(x, old, l1, l2, scale), x, "accumulate")
    else:
        penalty, got = l1l2_rs.value_and_grad(x, l1, l2)
        assert_matches(got, expected_grad(x, l1, l2), x, "value_and_grad")
    assert_same_scalar(penalty, l1l2_rs.penalty(x, l1, l2))


# ---------------------------------------------------------------------------------------------
# 2. accumulate=True with scale.

ACCUMULATE_LAYOUTS = [
    "contiguous",
    "reversed",
    "step3",
    "fortran2d",
    "transposed",
    "negative2d",
    "zero_d",
    "empty",
]


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "overwrite"])
@pytest.mark.parametrize("scale", [0.5, 1 / 32, -1.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_against_exact_reference(
    dtype: Any, scale: float, accumulate: bool, rng: np.random.Generator
) -> None:
    # Without accumulate, out = scale * gradient: what adding it to zeros gives.
    base = sample(rng, BASE_SIZE, dtype, moderate=True)
    old_base = sample(rng, BASE_SIZE, dtype, moderate=True)
    zeros = np.zeros_like(base)
    for l1, l2 in [(0.1, 0.2), (0.0, 0.05), (0.03, 0.0)]:
        added_to = old_base if accumulate else zeros
        expected = expected_accumulate(base, added_to, l1, l2, scale)
        for name in ACCUMULATE_LAYOUTS:
            layout = LAYOUTS[name]
            x = layout(base)
            want = expected.view(layout)
            for out_layout in ("same", "C"):
                old_copy = old_base.copy()
                out = layout(old_copy)
                if out_layout == "C":
                    out = np.array(out, order="C", copy=True)
                what = f"{accumulate=} {name} out={out_layout} l1={l1} l2={l2} scale={scale}"
                penalty, got = l1l2_rs.value_and_grad(
                    x, l1, l2, out=out, accumulate=accumulate, scale=scale
                )
                assert got is out, what
                assert_matches(got, want, x, what)
                # scale multiplies the gradient only, never the penalty
                assert_same_scalar(penalty, l1l2_rs.penalty(x, l1, l2), what)
                if out_layout == "same" and name in ("step3", "reversed", "negative2d"):
                    touched = np.zeros(BASE_SIZE, dtype=bool)
                    layout(touched)[...] = True
                    assert old_copy[~touched].tobytes() == old_base[~touched].tobytes(), what


def _accumulate_cancellation_cases(dtype: Any) -> list[tuple[float, float, float, float, float]]:
    """(x, g_old, l1, l2, scale) whose exact results are 2^-60, -0.25, 0.25, 2^-61."""
    biggest = float(max_finite(dtype))
    return [
        (2.0**-60, -1.0, 1.0, 0.5, 1.0),
        (-biggest, biggest, 0.5, 1.0, 0.5),
        (biggest, -biggest, 0.5, 1.0, 0.5),
        (2.0**-60, -0.5, 1.0, 0.5, 0.5),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_accumulate_with_cancellation(dtype: Any) -> None:
    # g_old cancels most of scale*t(x): the exact value is small. The result is within the
    # documented float64 slack of it, and finite: 2*l2*x overflowing float64 (x = +-max of
    # float64) must not leak an infinity into a finite result.
    for x_value, old_value, l1, l2, scale in _accumulate_cancellation_cases(dtype):
        x = np.array([x_value], dtype=dtype)
        old = np.array([old_value], dtype=dtype)
        out = old.copy()
        l1l2_rs.value_and_grad(x, l1, l2, out=out, accumulate=True, scale=scale)
        what = f"x={x_value!r} g_old={old_value!r} l1={l1} l2={l2} scale={scale}"
        assert np.isfinite(out).all(), what
        assert_matches(out, expected_accumulate(x, old, l1, l2, scale), x, what)


def test_accumulate_scale_one_and_regularizer_method(rng: np.random.Generator) -> None:
    x = sample(rng, 200, np.float32, moderate=True)
    old = sample(rng, 200, np.float32, moderate=True)
    out = old.copy()
    reg = l1l2_rs.L1L2(0.1, 0.2)
    penalty, got = reg.value_and_grad(x, out=out, accumulate=True)  # scale defaults to 1.0
    assert got is out
    assert_matches(out, expected_accumulate(x, old, 0.1, 0.2, 1.0), x, "scale=1")
    assert_same_scalar(penalty, reg(x))


# ---------------------------------------------------------------------------------------------
# 3. prox_.

PROX_CASES = [
    (0.1, 0.3, 0.2),
    (0.05, 0.5, 0.0),  # l1 only
    (0.05, 0.0, 0.4),  # l2 only
    (2.0, 1.0, 1.0),  # shrinks most values to zero
    (1e-3, 1 / 3, 0.0),
]


@pytest.mark.parametrize("lr, l1, l2", PROX_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_prox_every_layout_against_exact_reference(
    dtype: Any, lr: float, l1: float, l2: float, rng: np.random.Generator
) -> None:
    base = sample(rng, BASE_SIZE, dtype)
    expected = expected_prox(base, lr, l1, l2)
    for name, layout in LAYOUTS.items():
        copy = base.copy()
        x = layout(copy)
        original = x.copy()
        assert l1l2_rs.prox_(x, lr, l1, l2) is x, name
        assert_matches(x, expected.view(layout), original, f"prox_ {name} lr={lr} l1={l1} l2={l2}")
        touched = np.zeros(BASE_SIZE, dtype=bool)
        view = layout(touched)
        if np.shares_memory(view, touched):
            view[...] = True
            assert copy[~touched].tobytes() == base[~touched].tobytes(), f"{name}: wrote outside"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_prox_with_zero_lr_leaves_x_unchanged(dtype: Any, rng: np.random.Generator) -> None:
    base = sample(rng, BASE_SIZE, dtype)
    for name, layout in LAYOUTS.items():
        copy = base.copy()
        x = layout(copy)
        l1l2_rs.prox_(x, 0.0, 0.5, 0.5)
        assert np.array_equal(copy, base, equal_nan=True), name
        # nonzero values and infinities keep their exact bits
        kept = (base != 0) & ~np.isnan(base)
        assert copy[kept].tobytes() == base[kept].tobytes(), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_prox_threshold_is_not_rounded_before_subtracting(dtype: Any) -> None:
    # lr*l1 = 0.7*10 is exactly 7 - 2^-51 (the float64 product rounds to 7.0): |x| - lr*l1 for
    # x = 7 is 2^-51, a float32/bfloat16 normal number (0 in float16) and 2^-51 in float64.
    lr, l1 = 0.7, 10.0
    assert Fraction(lr) * Fraction(l1) == 7 - Fraction(1, 2**51)
    x = np.array([7.0, -7.0, 6.5, 8.0, 7.0], dtype=dtype)
    original = x.copy()
    l1l2_rs.prox_(x, lr, l1, 0.0)
    assert_matches(x, expected_prox(original, lr, l1, 0.0), original, "threshold")
    y = original.copy()
    l1l2_rs.prox_(y, lr, l1, 0.25)
    assert_matches(y, expected_prox(original, lr, l1, 0.25), original, "threshold with l2")


def test_float64_prox_divides_correctly_rounded(rng: np.random.Generator) -> None:
    # The documented computation: kept = max(|x| - lr*l1, 0) and d = 1 + 2*lr*l2, each rounded
    # once, then kept / d correctly rounded (by the reciprocal and one exact-remainder correction)
    # wherever the quotient is a normal number.
    for _ in range(20):
        lr, l1, l2 = (float(10.0 ** rng.uniform(-6, 2)) for _ in range(3))
        x = rng.standard_normal(2000) * 10.0 ** rng.uniform(-300, 300, 2000)
        stepped = x.copy()
        l1l2_rs.prox_(stepped, lr, l1, l2)
        d = float(1 + 2 * Fraction(lr) * Fraction(l2))
        for value, result in zip(x.tolist(), stepped.tolist(), strict=True):
            kept = float(max(abs(Fraction(value)) - Fraction(lr) * Fraction(l1), Fraction(0)))
            expected = math.copysign(float(Fraction(kept) / Fraction(d)), value)
            if abs(expected) >= np.finfo(np.float64).tiny:
                assert result == expected, (value, lr, l1, l2)


@pytest.mark.parametrize("lr", [-0.1, -1e-300, math.nan, math.inf, -math.inf])
def test_prox_rejects_bad_learning_rates(lr: float) -> None:
    x = np.array([1.0, -2.0, 3.0])
    with pytest.raises(ValueError):
        l1l2_rs.prox_(x, lr, 0.1, 0.1)
    assert x.tolist() == [1.0, -2.0, 3.0]
    with pytest.raises(ValueError):
        l1l2_rs.prox_many_([x], lr, 0.1, 0.1)
    with pytest.raises(ValueError):
        l1l2_rs.L1(0.1).prox_(x, lr)
    assert x.tolist() == [1.0, -2.0, 3.0]


# ---------------------------------------------------------------------------------------------
# 5. The _many variants: bit-equal to single calls; totals in list order.


def mixed_tensors(rng: np.random.Generator, *, count: int = 300, large: bool = True) -> list[Any]:
    """``count`` small tensors (1..50 elements) of every float dtype and many layouts, and a few
    large ones (> 1e6 elements), interleaved."""
    tensors: list[np.ndarray] = []
    for i in range(count):
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        size = int(rng.integers(1, 51))
        values = moderate_sample(rng, 2 * size, dtype)
        kind = (i // len(FLOAT_DTYPES)) % 6
        if kind == 0:
            x = values[:size]
        elif kind == 1:
            x = values[::-2]
        elif kind == 2:
            rows = 2 if size % 2 == 0 else 1
            x = np.asfortranarray(values[:size].reshape(rows, size // rows))
        elif kind == 3:
            rows = 2 if size % 2 == 0 else 1
            x = values[:size].reshape(rows, size // rows).T
        elif kind == 4:
            x = values[1:2].reshape(())
        else:
            x = values[:size].reshape(size, 1, 1)
        tensors.append(x)
    if large:
        big = [
            moderate_sample(rng, 1_100_000, np.float32),
            moderate_sample(rng, 2_100_000, np.float64)[::2],
            (moderate_sample(rng, 1_000_003, np.float16) / 8)[::-1],
            np.asfortranarray(moderate_sample(rng, (1000, 1100), FLOAT_DTYPES[-1])),
        ]
        for position, tensor in zip([0, count // 3, 2 * count // 3, count], big, strict=True):
            tensors.insert(position, tensor)
    return tensors


def test_many_lists_are_mixed(rng: np.random.Generator) -> None:
    tensors = mixed_tensors(rng)
    assert len(tensors) == 304
    assert {np.dtype(t.dtype).name for t in tensors} == {_name(d) for d in FLOAT_DTYPES}
    assert sum(t.size > 1_000_000 for t in tensors) == 4
    assert any(not t.flags.c_contiguous for t in tensors)


def test_sums_many_and_penalty_many_are_the_single_calls(rng: np.random.Generator) -> None:
    tensors: list[Any] = mixed_tensors(rng)
    tensors.insert(7, np.arange(-5, 9, dtype=np.int32))  # integers and bools mix in too
    tensors.insert(150, np.array([True, False, True]))
    assert l1l2_rs.sums_many(tensors) == [l1l2_rs.sums(x) for x in tensors]
    for l1, l2 in [(0.01, 0.02), (0.0, 0.3), (0.2, 0.0), (0.0, 0.0)]:
        total = 0.0
        for x in tensors:
            total += float(l1l2_rs.penalty(x, l1, l2))
        got = l1l2_rs.penalty_many(tensors, l1, l2)
        assert isinstance(got, float)
        assert got == total, (l1, l2)


def test_many_of_empty_lists() -> None:
    assert l1l2_rs.sums_many([]) == []
    assert l1l2_rs.penalty_many([], 0.1, 0.1) == 0.0
    total, grads = l1l2_rs.value_and_grad_many([], 0.1, 0.1)
    assert total == 0.0 and list(grads) == []
    empty: list[np.ndarray] = []
    assert l1l2_rs.prox_many_(empty, 0.1, 0.1, 0.1) is empty


def test_value_and_grad_many_is_the_single_calls(rng: np.random.Generator) -> None:
    tensors = mixed_tensors(rng)
    l1, l2 = 0.01, 0.02
    total, grads = l1l2_rs.value_and_grad_many(tensors, l1, l2)
    assert len(grads) == len(tensors)
    expected_total = 0.0
    for i, (x, g) in enumerate(zip(tensors, grads, strict=True)):
        penalty, single = l1l2_rs.value_and_grad(x, l1, l2)
        expected_total += float(penalty)
        assert_same_bits(g, single, f"tensor {i}")
    assert isinstance(total, float)
    assert total == expected_total
    # the small ones against the exact reference too
    for i, (x, g) in enumerate(zip(tensors[1:60], grads[1:60], strict=True)):
        assert_matches(g, expected_grad(x, l1, l2), x, f"tensor {i + 1}")


@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0])
def test_value_and_grad_many_with_outs_and_accumulate(
    scale: float, rng: np.random.Generator
) -> None:
    tensors = mixed_tensors(rng)
    l1, l2 = 0.03, 0.01
    outs: list[np.ndarray] = []
    singles: list[np.ndarray] = []
    for i, x in enumerate(tensors):
        kind = ["C", "F", "strided"][i % 3]
        out = make_out(kind, x.shape, x.dtype)
        assert out is not None
        out[...] = moderate_sample(rng, x.shape, x.dtype)
        outs.append(out)
        singles.append(out.copy())
    total, grads = l1l2_rs.value_and_grad_many(
        tensors, l1, l2, outs=outs, accumulate=True, scale=scale
    )
    expected_total = 0.0
    for i, (x, single) in enumerate(zip(tensors, singles, strict=True)):
        penalty, _ = l1l2_rs.value_and_grad(x, l1, l2, out=single, accumulate=True, scale=scale)
        expected_total += float(penalty)
        assert_same_bits(outs[i], single, f"out {i}")
        assert_same_bits(grads[i], single, f"grad {i}")
    assert total == expected_total
    # and without accumulate, into the same outs
    total, grads = l1l2_rs.value_and_grad_many(tensors, l1, l2, outs=outs)
    assert total == expected_total
    for i, x in enumerate(tensors):
        assert_same_bits(outs[i], l1l2_rs.grad(x, l1, l2), f"plain out {i}")


def test_prox_many_is_the_single_calls(rng: np.random.Generator) -> None:
    tensors = mixed_tensors(rng)
    singles = [np.array(x, copy=True) for x in tensors]
    lr, l1, l2 = 0.1, 0.5, 0.2
    assert l1l2_rs.prox_many_(tensors, lr, l1, l2) is tensors
    for i, (x, single) in enumerate(zip(tensors, singles, strict=True)):
        assert l1l2_rs.prox_(single, lr, l1, l2) is single
        assert_same_bits(x, single, f"tensor {i}")


def test_prox_many_of_interleaved_views_is_refused_and_writes_nothing(
    rng: np.random.Generator,
) -> None:
    # buffer[::2] and buffer[1::2] share no element, but their memory ranges overlap: the check is
    # by range (documented as conservative), and a refusal writes nothing.
    buffer = moderate_sample(rng, 40, np.float64)
    before = buffer.tobytes()
    with pytest.raises(ValueError, match="memory ranges"):
        l1l2_rs.prox_many_([buffer[::2], buffer[1::2]], 0.1, 0.5, 0.2)
    assert buffer.tobytes() == before


# ---------------------------------------------------------------------------------------------
# 6. Bit-identical results for any number of threads.


@pytest.fixture
def restore_threads() -> Iterator[None]:
    try:
        yield
    finally:
        l1l2_rs.set_num_threads(0)


def test_results_are_bit_identical_for_any_thread_count(
    restore_threads: None, rng: np.random.Generator
) -> None:
    x = (rng.standard_normal(2_000_003) * 10.0 ** rng.integers(-6, 6, 2_000_003)).astype(np.float32)
    old = rng.standard_normal(x.size).astype(np.float32)
    others = [
        x[::-1],
        rng.standard_normal(2_100_000).astype(np.float32).reshape(1500, 1400).T,
        rng.standard_normal(1000),
    ]
    results: dict[int, list[bytes]] = {}
    for threads in (1, 2, 3, 8):
        l1l2_rs.set_num_threads(threads)
        penalty, g = l1l2_rs.value_and_grad(x, 0.01, 0.02)
        out = old.copy()
        penalty2, _ = l1l2_rs.value_and_grad(x, 0.01, 0.02, out=out, accumulate=True, scale=0.5)
        total, grads = l1l2_rs.value_and_grad_many([x, *others], 0.01, 0.02)
        y = x.copy()
        l1l2_rs.prox_(y, 0.05, 0.3, 0.1)
        ys = [np.array(o, copy=True) for o in others]
        l1l2_rs.prox_many_(ys, 0.05, 0.3, 0.1)
        results[threads] = [
            np.asarray(penalty).tobytes(),
            g.tobytes(),
            np.asarray(penalty2).tobytes(),
            out.tobytes(),
            np.float64(total).tobytes(),
            *(np.asarray(grad).tobytes() for grad in grads),
            y.tobytes(),
            *(v.tobytes() for v in ys),
        ]
    for threads in (2, 3, 8):
        assert results[threads] == results[1], threads


# ---------------------------------------------------------------------------------------------
# 7. Errors, with nothing written.


def _grad_calls() -> dict[str, Callable[..., Any]]:
    return {
        "grad": lambda x, **kw: l1l2_rs.grad(x, 0.1, 0.2, **kw),
        "value_and_grad": lambda x, **kw: l1l2_rs.value_and_grad(x, 0.1, 0.2, **kw),
        "L1L2.grad": lambda x, **kw: l1l2_rs.L1L2(0.1, 0.2).grad(x, **kw),
        "L2.value_and_grad": lambda x, **kw: l1l2_rs.L2(0.2).value_and_grad(x, **kw),
    }


GRAD_CALLS = _grad_calls()


def _writeable_broadcast(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    row = np.full(shape[1], SENTINEL, dtype=dtype)
    view: np.ndarray = np.lib.stride_tricks.as_strided(
        row, shape=shape, strides=(0, row.itemsize), writeable=True
    )
    return view


def _names_shape(message: str, shape: tuple[int, ...]) -> bool:
    """``message`` names ``shape`` as a Python tuple or as a list: (3, 4), [3, 4], (12,)."""
    dims = ", ".join(str(n) for n in shape)
    return re.search(rf"[\[(]{dims},?[\])]", message) is not None


@pytest.mark.parametrize("call", list(GRAD_CALLS), ids=str)
def test_bad_outs_raise_value_error_and_write_nothing(call: str) -> None:
    function = GRAD_CALLS[call]
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    x_before = x.tobytes()

    wrong_dtype = np.full((3, 4), SENTINEL, dtype=np.float64)
    with pytest.raises(ValueError) as info:
        function(x, out=wrong_dtype)
    assert "float32" in str(info.value) and "float64" in str(info.value), info.value
    assert (wrong_dtype == SENTINEL).all()

    for shape in [(4, 3), (12,), (3, 4, 1), ()]:
        wrong_shape = np.full(shape, SENTINEL, dtype=np.float32)
        with pytest.raises(ValueError) as info:
            function(x, out=wrong_shape)
        message = str(info.value)
        assert _names_shape(message, shape) and _names_shape(message, (3, 4)), message
        assert (wrong_shape == SENTINEL).all()

    read_only = np.full((3, 4), SENTINEL, dtype=np.float32)
    read_only.setflags(write=False)
    with pytest.raises(ValueError):
        function(x, out=read_only)
    assert (read_only == SENTINEL).all()

    row = np.full(4, SENTINEL, dtype=np.float32)
    with pytest.raises(ValueError):
        function(x, out=np.broadcast_to(row, (3, 4)))
    broadcast = _writeable_broadcast((3, 4), np.float32)
    assert broadcast.flags.writeable
    with pytest.raises(ValueError):
        function(x, out=broadcast)
    assert (row == SENTINEL).all() and (broadcast.base is not None)
    assert (np.asarray(broadcast) == SENTINEL).all()

    with pytest.raises(ValueError):
        function(x, out=x)
    assert x.tobytes() == x_before

    buffer = np.linspace(-3, 3, 13)
    before = buffer.tobytes()
    with pytest.raises(ValueError):
        function(buffer[:-1], out=buffer[1:])
    with pytest.raises(ValueError):
        function(buffer[1:], out=buffer[:-1])
    with pytest.raises(ValueError):
        function(buffer[::-1], out=buffer)
    matrix = buffer[:12].reshape(3, 4)
    with pytest.raises(ValueError):
        function(matrix, out=matrix.T.T)  # the same memory through another view object
    assert buffer.tobytes() == before
    assert x.tobytes() == x_before


@pytest.mark.parametrize("call", list(GRAD_CALLS), ids=str)
def test_out_that_is_not_an_ndarray_raises_type_error(call: str) -> None:
    # numpy's convention for out= of the wrong type (a list): TypeError, naming out
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(TypeError, match="out"):
        GRAD_CALLS[call](x, out=[[0.0] * 4] * 3)


def test_out_interleaved_with_x_is_refused_and_writes_nothing() -> None:
    buffer = np.linspace(-3, 3, 26)
    before = buffer.tobytes()
    with pytest.raises(ValueError, match="memory ranges"):
        l1l2_rs.grad(buffer[::2], 0.1, 0.2, out=buffer[1::2])
    assert buffer.tobytes() == before


@pytest.mark.parametrize("call", [c for c in GRAD_CALLS if "value_and_grad" in c], ids=str)
def test_accumulate_errors(call: str) -> None:
    function = GRAD_CALLS[call]
    x = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError):
        function(x, accumulate=True)
    out = np.full(5, SENTINEL)
    for scale in (math.nan, math.inf, -math.inf):
        for accumulate in (True, False):
            with pytest.raises(ValueError, match="scale"):
                function(x, out=out, accumulate=accumulate, scale=scale)
    assert (out == SENTINEL).all()


@pytest.mark.parametrize("dtype", [*INT_DTYPES, np.bool_], ids=dtype_id)
def test_integer_and_bool_inputs_raise_type_error(dtype: Any) -> None:
    x = np.array([1, 0, 1, 1], dtype=dtype)
    before = x.tobytes()
    with pytest.raises(TypeError):
        l1l2_rs.grad(x, 0.1, 0.1)
    with pytest.raises(TypeError):
        l1l2_rs.value_and_grad(x, 0.1, 0.1)
    with pytest.raises(TypeError):
        l1l2_rs.prox_(x, 0.1, 0.1, 0.1)
    with pytest.raises(TypeError):
        l1l2_rs.L1(0.1).grad(x)
    with pytest.raises(TypeError):
        l1l2_rs.prox_many_([np.ones(3), x], 0.1, 0.1, 0.1)
    assert x.tobytes() == before
    assert l1l2_rs.penalty(x, 0.25, 0.0) == 0.75  # the penalty of integers still works


def test_prox_rejects_lists_read_only_and_broadcast_arrays() -> None:
    with pytest.raises(TypeError):
        l1l2_rs.prox_([1.0, -2.0], 0.1, 0.1, 0.1)
    with pytest.raises(TypeError):
        l1l2_rs.L1(0.1).prox_([1.0, -2.0], 0.1)
    read_only = np.array([1.0, -2.0])
    read_only.setflags(write=False)
    with pytest.raises(ValueError):
        l1l2_rs.prox_(read_only, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError):
        l1l2_rs.prox_(np.broadcast_to(np.ones(3), (2, 3)), 0.1, 0.1, 0.1)
    assert read_only.tolist() == [1.0, -2.0]


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf])
def test_bad_factors_raise_value_error(bad: float) -> None:
    x = np.linspace(-1, 1, 5)
    out = np.full(5, SENTINEL)
    before = x.tobytes()
    for l1, l2 in [(bad, 0.1), (0.1, bad)]:
        with pytest.raises(ValueError):
            l1l2_rs.grad(x, l1, l2, out=out)
        with pytest.raises(ValueError):
            l1l2_rs.value_and_grad(x, l1, l2, out=out)
        with pytest.raises(ValueError):
            l1l2_rs.prox_(x, 0.1, l1, l2)
        with pytest.raises(ValueError):
            l1l2_rs.penalty_many([x], l1, l2)
        with pytest.raises(ValueError):
            l1l2_rs.value_and_grad_many([x], l1, l2, outs=[out])
        with pytest.raises(ValueError):
            l1l2_rs.prox_many_([x], 0.1, l1, l2)
    assert (out == SENTINEL).all() and x.tobytes() == before


def _many_setup(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    xs = [moderate_sample(rng, (i % 3 + 1, 3), np.float32) for i in range(9)]
    outs = [np.full(x.shape, SENTINEL, dtype=np.float32) for x in xs]
    return xs, outs


def test_value_and_grad_many_one_bad_out_writes_nothing(rng: np.random.Generator) -> None:
    xs, outs = _many_setup(rng)
    x_before = [x.tobytes() for x in xs]

    def check(bad_outs: list[Any], error: type[Exception] = ValueError, **kw: Any) -> None:
        before = [np.asarray(o).tobytes() for o in bad_outs]
        with pytest.raises(error):
            l1l2_rs.value_and_grad_many(xs, 0.1, 0.2, outs=bad_outs, **kw)
        assert [np.asarray(o).tobytes() for o in bad_outs] == before
        assert [x.tobytes() for x in xs] == x_before

    middle = len(outs) // 2
    wrong_dtype = [*outs[:middle], outs[middle].astype(np.float64), *outs[middle + 1 :]]
    check(wrong_dtype)
    check(wrong_dtype, accumulate=True, scale=0.5)
    wrong_shape = [*outs[:middle], outs[middle].T.copy(), *outs[middle + 1 :]]
    check(wrong_shape)
    read_only = outs[middle].copy()
    read_only.setflags(write=False)
    check([*outs[:middle], read_only, *outs[middle + 1 :]])
    # an out sharing memory with another tensor (same shape and dtype) or with another out
    same_shape = next(j for j in range(len(xs)) if j != middle and xs[j].shape == xs[middle].shape)
    check([*outs[:middle], xs[same_shape], *outs[middle + 1 :]])
    check([*outs[:middle], xs[middle], *outs[middle + 1 :]])
    other = next(j for j in range(middle + 1, len(xs)) if xs[j].shape == xs[middle].shape)
    shared = [*outs]
    shared[other] = shared[middle]
    check(shared)
    check(outs[:-1])
    check([*outs, np.zeros(3, dtype=np.float32)])
    with pytest.raises(ValueError):
        l1l2_rs.value_and_grad_many(xs, 0.1, 0.2, accumulate=True)
    for scale in (math.nan, math.inf):
        check(outs, accumulate=True, scale=scale)
    # a bad tensor in the middle: nothing written to the outs either
    bad_xs = [*xs[:middle], xs[middle].astype(np.int32), *xs[middle + 1 :]]
    before = [o.tobytes() for o in outs]
    with pytest.raises(TypeError):
        l1l2_rs.value_and_grad_many(bad_xs, 0.1, 0.2, outs=outs)
    assert [o.tobytes() for o in outs] == before
    # and finally the good outs work
    l1l2_rs.value_and_grad_many(xs, 0.1, 0.2, outs=outs)
    for x, out in zip(xs, outs, strict=True):
        assert_same_bits(out, l1l2_rs.grad(x, 0.1, 0.2))


def test_prox_many_errors_write_nothing(rng: np.random.Generator) -> None:
    xs, _ = _many_setup(rng)
    before = [x.tobytes() for x in xs]

    def check(bad: list[Any], error: type[Exception] = ValueError) -> None:
        with pytest.raises(error):
            l1l2_rs.prox_many_(bad, 0.1, 0.5, 0.1)
        assert [x.tobytes() for x in xs] == before

    middle = len(xs) // 2
    check([*xs[:middle], xs[0], *xs[middle:]])  # the same array twice
    check([*xs, xs[-1]])
    check([*xs[:middle], xs[middle][1:], *xs[middle:]])  # overlapping views
    check([*xs[:middle], xs[middle].T, *xs[middle:]])
    read_only = xs[middle].copy()
    read_only.setflags(write=False)
    check([*xs[:middle], read_only, *xs[middle + 1 :]])
    check([*xs[:middle], [1.0, 2.0], *xs[middle + 1 :]], TypeError)
    check([*xs[:middle], np.arange(3), *xs[middle + 1 :]], TypeError)
    with pytest.raises(ValueError):
        l1l2_rs.prox_many_(xs, -1.0, 0.5, 0.1)
    assert [x.tobytes() for x in xs] == before


# ---------------------------------------------------------------------------------------------
# 8. Regularizer methods and the factor semantics of each class.


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_regularizer_grads_against_exact_reference(dtype: Any, rng: np.random.Generator) -> None:
    x = sample(rng, 200, dtype)
    assert_matches(l1l2_rs.L1(0.3).grad(x), expected_grad(x, 0.3, 0.0, keep=(True, False)), x, "L1")
    assert_matches(l1l2_rs.L2(0.2).grad(x), expected_grad(x, 0.0, 0.2, keep=(False, True)), x, "L2")
    reg = l1l2_rs.L1L2(0.1, 0.2)
    penalty, got = reg.value_and_grad(x)
    assert_matches(got, expected_grad(x, 0.1, 0.2), x, "L1L2")
    assert_same_scalar(penalty, reg(x))
    out = make_out("F", x.shape, dtype)
    assert reg.grad(x, out=out) is out
    assert_matches(out, expected_grad(x, 0.1, 0.2), x, "L1L2 out")
    for reg_zero, keep in [(l1l2_rs.L1(0.0), (True, False)), (l1l2_rs.L2(0.0), (False, True))]:
        penalty, got = reg_zero.value_and_grad(x)
        assert_matches(got, expected_grad(x, 0.0, 0.0, keep=keep), x, repr(reg_zero))
        assert_same_scalar(penalty, reg_zero(x))
    # prox_ with each class's terms
    for reg_prox, l1, l2 in [
        (l1l2_rs.L1(0.3), 0.3, 0.0),
        (l1l2_rs.L2(0.2), 0.0, 0.2),
        (l1l2_rs.L1L2(0.1, 0.2), 0.1, 0.2),
    ]:
        y = x.copy()
        assert reg_prox.prox_(y, 0.5) is y
        assert_matches(y, expected_prox(x, 0.5, l1, l2), x, f"{reg_prox!r}.prox_")


def test_nan_and_inf_with_zero_factors() -> None:
    nan = np.array([np.nan])
    inf = np.array([np.inf, -np.inf])
    # the objects L1(0) / L2(0) keep their term: 0*sign(NaN) and 2*0*inf are NaN
    assert np.isnan(l1l2_rs.L1(0.0).grad(nan)).all()
    assert np.isnan(l1l2_rs.L2(0.0).grad(nan)).all()
    assert np.isnan(l1l2_rs.L2(0.0).grad(inf)).all()
    assert l1l2_rs.L1(0.0).grad(inf).tolist() == [0.0, 0.0]
    assert l1l2_rs.L1(0.5).grad(inf).tolist() == [0.5, -0.5]
    # L1L2 and the functions drop a zero term entirely
    assert np.isnan(l1l2_rs.L1L2(0.0, 0.1).grad(nan)).all()  # via the l2 term
    got = l1l2_rs.L1L2(0.1, 0.0).grad(np.array([np.nan, 1.0]))
    assert np.isnan(got[0]) and got[1] == 0.1  # sign(NaN) is NaN
    assert l1l2_rs.L1L2(0.0, 0.0).grad(np.array([np.nan, np.inf])).tolist() == [0.0, 0.0]
    assert l1l2_rs.grad(nan, 0.0, 0.0).tolist() == [0.0]
    assert l1l2_rs.L1L2(0.0, 0.5).grad(np.array([np.inf])).tolist() == [np.inf]
    assert l1l2_rs.grad(np.array([np.inf]), l1=0.5, l2=0.0).tolist() == [0.5]
    assert l1l2_rs.grad(np.array([-np.inf]), l1=0.5, l2=0.0).tolist() == [-0.5]
    assert l1l2_rs.grad(np.array([np.inf]), l1=0.5, l2=0.25).tolist() == [np.inf]
    penalty, got = l1l2_rs.L1(0.0).value_and_grad(nan)
    assert np.isnan(penalty) and np.isnan(got).all()
    penalty, got = l1l2_rs.L1L2(0.0, 0.0).value_and_grad(nan)
    assert penalty == 0.0 and got.tolist() == [0.0]
    # sign(+-0) is 0: the l1 gradient at zero is 0 (torch's convention, not JAX's 1)
    zeros = np.array([0.0, -0.0])
    assert l1l2_rs.L1(0.5).grad(zeros).tolist() == [0.0, 0.0]
    # lists work for grad (converted to float64 arrays)
    assert l1l2_rs.grad([1.5, -2.0], 0.1, 0.25).tolist() == [0.1 + 0.75, -0.1 - 1.0]


def test_regularizer_many_methods(rng: np.random.Generator) -> None:
    tensors = mixed_tensors(rng, count=60, large=False)
    for reg in [l1l2_rs.L1(0.3), l1l2_rs.L2(0.2), l1l2_rs.L1L2(0.1, 0.2), l1l2_rs.L1L2(0.0, 0.1)]:
        total = 0.0
        for x in tensors:
            total += float(reg(x))
        assert reg.penalty_many(tensors) == total, reg
        got_total, grads = reg.value_and_grad_many(tensors)
        assert got_total == total, reg
        for x, g in zip(tensors, grads, strict=True):
            assert_same_bits(g, reg.value_and_grad(x)[1], repr(reg))
        outs = [np.full(x.shape, 0.25, dtype=x.dtype) for x in tensors]
        singles = [o.copy() for o in outs]
        reg.value_and_grad_many(tensors, outs=outs, accumulate=True, scale=-0.5)
        for x, out, single in zip(tensors, outs, singles, strict=True):
            reg.value_and_grad(x, out=single, accumulate=True, scale=-0.5)
            assert_same_bits(out, single, repr(reg))
        copies = [np.array(x, copy=True) for x in tensors]
        singles = [np.array(x, copy=True) for x in tensors]
        assert reg.prox_many_(copies, 0.2) is copies
        for copy, single in zip(copies, singles, strict=True):
            reg.prox_(single, 0.2)
            assert_same_bits(copy, single, repr(reg))
    # NaN semantics of the totals follow each class
    nan = [np.ones(3), np.array([np.nan])]
    assert math.isnan(l1l2_rs.L1(0.0).penalty_many(nan))
    assert l1l2_rs.L1L2(0.0, 0.0).penalty_many(nan) == 0.0


# ---------------------------------------------------------------------------------------------
# 9. Plain numpy training loops.


def _logistic_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    features = rng.standard_normal((200, 10))
    true_w = rng.standard_normal(10) * np.array([3, 0, 0, 2, 0, -1, 0, 0, 0.5, 0])
    labels = (features @ true_w + 0.5 * rng.standard_normal(200) > 0).astype(np.float64)
    return features, labels, rng.standard_normal(10) * 0.1


def _data_gradient(features: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    probabilities = 1.0 / (1.0 + np.exp(-(features @ w)))
    gradient: np.ndarray = features.T @ (probabilities - labels) / len(labels)
    return gradient


def _batches(steps: int) -> list[np.ndarray]:
    order = np.random.default_rng(99).permutation(np.tile(np.arange(200), 5))
    return [order[20 * i : 20 * (i + 1)] for i in range(steps)]


def test_sgd_with_accumulated_penalty_gradient_matches_numpy() -> None:
    features, labels, w0 = _logistic_problem()
    l1, l2, lr = 0.01, 0.005, 0.5
    w = w0.copy()
    reference = w0.copy()
    penalties: list[float] = []
    for batch in _batches(50):
        g = _data_gradient(features[batch], labels[batch], w)
        penalty, same = l1l2_rs.value_and_grad(w, l1, l2, out=g, accumulate=True, scale=1.0)
        assert same is g
        assert_same_scalar(penalty, l1l2_rs.penalty(w, l1, l2))
        abs_sum, squares = exact_sums(w)
        exact = float(Fraction(l1) * abs_sum + Fraction(l2) * squares)
        assert math.isclose(float(penalty), exact, rel_tol=2e-15)
        penalties.append(float(penalty))
        w -= lr * g

        g_ref = _data_gradient(features[batch], labels[batch], reference)
        g_ref += l1 * np.sign(reference) + 2 * l2 * reference
        reference -= lr * g_ref
    assert np.max(np.abs(w - reference)) <= 1e-12 * np.max(np.abs(reference))
    assert not np.array_equal(w, w0)
    assert penalties[-1] != penalties[0]


def test_proximal_sgd_matches_numpy() -> None:
    features, labels, w0 = _logistic_problem()
    l1, l2, lr = 0.05, 0.01, 0.5
    w = w0.copy()
    reference = w0.copy()
    for batch in _batches(50):
        w -= lr * _data_gradient(features[batch], labels[batch], w)
        assert l1l2_rs.prox_(w, lr, l1, l2) is w
        reference -= lr * _data_gradient(features[batch], labels[batch], reference)
        shrunk = np.maximum(np.abs(reference) - lr * l1, 0)
        reference = np.sign(reference) * shrunk / (1 + 2 * lr * l2)
    assert np.max(np.abs(w - reference)) <= 1e-12 * np.max(np.abs(reference))
    assert np.array_equal(w == 0, reference == 0)  # the same weights are exactly zero
    assert (w == 0).any()  # the l1 prox made the solution sparse


def test_proximal_sgd_with_a_list_of_parameters() -> None:
    features, labels, w0 = _logistic_problem()
    l1, l2, lr = 0.05, 0.01, 0.5
    # the weights split into three parameters (one strided view, one 2-D F-order array)
    storage = np.zeros(8)
    params = [storage[::2], np.asfortranarray(w0[4:8].reshape(2, 2)), w0[8:].copy()]
    params[0][...] = w0[:4]
    reference = w0.copy()
    for batch in _batches(30):
        full = np.concatenate([p.ravel(order="C") for p in params])
        g = _data_gradient(features[batch], labels[batch], full)
        params[0] -= lr * g[:4]
        params[1] -= lr * g[4:8].reshape(2, 2)
        params[2] -= lr * g[8:]
        assert l1l2_rs.prox_many_(params, lr, l1, l2) is params
        reference -= lr * _data_gradient(features[batch], labels[batch], reference)
        reference = (
            np.sign(reference) * np.maximum(np.abs(reference) - lr * l1, 0) / (1 + 2 * lr * l2)
        )
    full = np.concatenate([p.ravel(order="C") for p in params])
    assert np.max(np.abs(full - reference)) <= 1e-12 * np.max(np.abs(reference))
    assert (storage[1::2] == 0).all()  # the skipped elements were never written


# ---------------------------------------------------------------------------------------------
# 10. Never silently wrong: autograd objects raise TypeError naming an adapter.


def _on_cache_line(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` starting on a 64-byte boundary (where converted inputs are placed)."""
    raw = np.empty(values.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    placed: np.ndarray = raw[start : start + values.nbytes].view(values.dtype)
    placed = placed.reshape(values.shape)
    placed[...] = values
    return placed


ADAPTER = r"(?i)adapter"


def _traced_calls() -> dict[str, Callable[[Any], Any]]:
    return {
        "penalty": lambda t: l1l2_rs.penalty(t, 0.1, 0.2),
        "L1L2()": lambda t: l1l2_rs.L1L2(0.1, 0.2)(t),
        "L2()": lambda t: l1l2_rs.L2(0.1)(t),
        "value_and_grad": lambda t: l1l2_rs.value_and_grad(t, 0.1, 0.2)[0],
        "grad": lambda t: l1l2_rs.grad(t, 0.1, 0.2).sum(),
        "L1L2.value_and_grad": lambda t: l1l2_rs.L1L2(0.1, 0.2).value_and_grad(t)[0],
        "sums": lambda t: l1l2_rs.sums(t)[0],
        "penalty_many": lambda t: l1l2_rs.penalty_many([np.ones(2), t], 0.1, 0.2),
        "value_and_grad_many": lambda t: l1l2_rs.value_and_grad_many([t], 0.1, 0.2)[0],
    }


def test_jax_tracers_raise_type_error_naming_an_adapter() -> None:
    import jax
    import jax.numpy as jnp

    x = jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float32)
    for name, function in _traced_calls().items():
        for transform in (jax.jit, jax.grad):
            with pytest.raises(TypeError, match=ADAPTER):
                transform(function)(x)
        assert name
    with pytest.raises(TypeError):
        jax.jit(lambda t: l1l2_rs.prox_(t, 0.1, 0.1, 0.1))(x)


def test_concrete_jax_arrays_still_work() -> None:
    import jax.numpy as jnp

    values = np.linspace(-2.0, 3.0, 37, dtype=np.float32)
    x = jnp.asarray(values)
    aligned = _on_cache_line(values)
    assert_same_scalar(l1l2_rs.penalty(x, 0.1, 0.2), l1l2_rs.penalty(aligned, 0.1, 0.2))
    assert_same_scalar(l1l2_rs.L1L2(0.1, 0.2)(x), l1l2_rs.L1L2(0.1, 0.2)(aligned))
    penalty, got = l1l2_rs.value_and_grad(x, 0.1, 0.2)
    assert_same_scalar(penalty, l1l2_rs.penalty(aligned, 0.1, 0.2))
    assert_same_bits(got, l1l2_rs.grad(values, 0.1, 0.2))
    assert_matches(got, expected_grad(values, 0.1, 0.2), values, "jax array")
    assert_same_bits(l1l2_rs.grad(x, 0.1, 0.2), got)


def test_keras_variables_without_a_recording_tape_still_work() -> None:
    import keras  # the numpy backend (conftest): nothing records gradients

    values = np.linspace(-2.0, 3.0, 37, dtype=np.float32)
    variable = keras.Variable(values)
    aligned = _on_cache_line(values)
    assert_same_scalar(l1l2_rs.L1L2(0.1, 0.2)(variable), l1l2_rs.L1L2(0.1, 0.2)(aligned))
    penalty, got = l1l2_rs.value_and_grad(variable, 0.1, 0.2)
    assert_same_scalar(penalty, l1l2_rs.penalty(aligned, 0.1, 0.2))
    assert_same_bits(got, l1l2_rs.grad(values, 0.1, 0.2))
    assert_matches(got, expected_grad(values, 0.1, 0.2), values, "keras variable")


def test_many_forms_take_any_iterable_including_generators() -> None:
    # A generator is consumed by the first attempt; a conversion retry must not see it empty.
    arrays = [np.linspace(-1.0, 1.0, 9), np.arange(4)]
    expected = l1l2_rs.sums_many(arrays)
    assert l1l2_rs.sums_many(x for x in arrays) == expected
    assert l1l2_rs.sums_many(x.tolist() for x in arrays) == [
        l1l2_rs.sums(x.tolist()) for x in arrays
    ]
    total = l1l2_rs.penalty_many((x.tolist() for x in arrays), 0.1, 0.2)
    assert total == sum(float(l1l2_rs.penalty(x.tolist(), 0.1, 0.2)) for x in arrays)
