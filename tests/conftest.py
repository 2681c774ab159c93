"""Shared test helpers: exact references that do not use l1l2_rs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

# Keras 3 needs a backend that is installed; the numpy one is enough for values and configs.
os.environ.setdefault("KERAS_BACKEND", "numpy")

try:
    import ml_dtypes

    BFLOAT16: Any = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - the test extra installs it
    BFLOAT16 = None

FLOAT_DTYPES = [np.float16, np.float32, np.float64] + ([BFLOAT16] if BFLOAT16 else [])
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _exact_square_terms(values: np.ndarray) -> list[float]:
    """x*x as two doubles whose sum is exact (Veltkamp/Dekker split; no FMA needed)."""
    x = values.astype(np.float64)
    product = x * x
    split = 134217729.0 * x  # 2**27 + 1
    high = split - (split - x)
    low = x - high
    error = ((high * high - product) + 2 * high * low) + low * low
    return [*product.tolist(), *error.tolist()]


def exact_sums(x: np.ndarray) -> tuple[Fraction, Fraction]:
    """(sum |x|, sum x**2) of an array, exactly, as Fractions.

    Floats are widened to float64 (exact for every float dtype); integers are summed as Python ints.
    """
    x = np.asarray(x)
    if x.dtype.kind in "iub":
        ints = [int(v) for v in x.ravel().tolist()]
        return Fraction(sum(abs(v) for v in ints)), Fraction(sum(v * v for v in ints))
    wide = x.astype(np.float64).ravel()
    abs_sum = Fraction(math.fsum(np.abs(wide).tolist()))
    if x.dtype.itemsize <= 4:  # squares of <= 24-bit significands are exact in float64
        squares = Fraction(math.fsum((wide * wide).tolist()))
    else:
        squares = Fraction(math.fsum(_exact_square_terms(wide)))
    return abs_sum, squares


def exact_penalty(x: np.ndarray, l1: float, l2: float) -> float:
    """The L1L2 penalty with exactly computed sums, combined exactly, rounded once to float64."""
    abs_sum, squares = exact_sums(x)
    total = Fraction(0)
    if l1:
        total += Fraction(l1) * abs_sum
    if l2:
        total += Fraction(l2) * squares
    return float(total)


#: (significand bits, smallest normal exponent) of each float format.
_FORMATS = {
    "float16": (11, -14),
    "bfloat16": (8, -126),
    "float32": (24, -126),
    "float64": (53, -1022),
}


def ulp_of(value: float, dtype: Any) -> float:
    """One ulp of ``value`` in ``dtype`` (float64 for integer and bool dtypes)."""
    name = np.dtype(dtype).name
    precision, min_exp = _FORMATS.get(name, _FORMATS["float64"])
    _, exponent = math.frexp(abs(value))  # value = m * 2**exponent, 0.5 <= m < 1
    return math.ldexp(1.0, max(exponent - 1, min_exp) - (precision - 1))


def assert_within_ulps(got: Any, expected: float, dtype: Any, ulps: float) -> None:
    got_value = float(got)
    if math.isnan(expected):
        assert math.isnan(got_value)
        return
    with np.errstate(over="ignore"):
        in_dtype = float(np.array(expected, dtype=np.float64).astype(dtype)) if expected else 0.0
    if math.isinf(expected) or math.isinf(in_dtype):
        assert got_value == in_dtype, (
            f"got {got_value!r}, exact {expected!r} overflows to {in_dtype}"
        )
        return
    tolerance = ulps * ulp_of(expected, dtype)
    off_by = abs(got_value - expected) / ulp_of(expected, dtype)
    assert abs(got_value - expected) <= tolerance, (
        f"got {got_value!r}, exact {expected!r}, off by {off_by:.2f} ulp"
    )


def sum_ulps(dtype: Any) -> float:
    """The documented bound on the float64 sums' relative error, in float64 ulp: 4 for float64
    (compensated every 4 plain additions per lane) and exact integers; 64 for float16, bfloat16 and
    float32, whose lanes add 64 values plainly first (2^-47 relative, far below their own ulp)."""
    dt = np.dtype(dtype)
    return 64.0 if (dt.kind == "f" and dt.itemsize < 8) or dt.name == "bfloat16" else 4.0


def penalty_ulps(out_dtype: Any) -> float:
    """The promised accuracy of a penalty in its output dtype: 1 ulp for float16, bfloat16 and
    float32; 4 ulp for float64 (float64 and integer inputs), whose sums and the final
    ``l1 * sum|x| + l2 * sum x**2`` are themselves float64 roundings."""
    return 4.0 if np.dtype(out_dtype) == np.float64 else 1.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


def run_python(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> str:
    """The standard output of ``script`` run by a fresh interpreter, which must succeed (its
    error output's end is the failure message otherwise)."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
