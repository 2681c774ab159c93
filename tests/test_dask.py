"""l1l2_rs.dask: lazy penalties of Dask arrays against exact references, the same bits on every
scheduler and cluster shape, gradients and prox steps against the in-memory ops, and the
picklable partial they are built on."""

from __future__ import annotations

import importlib
import math
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

import l1l2_rs
import l1l2_rs.dask as l1l2_dask
from conftest import (
    BFLOAT16,
    assert_within_ulps,
    exact_penalty,
    exact_sums,
    penalty_ulps,
    sum_ulps,
)
from l1l2_rs import SumsPartial

L1, L2 = 1e-3, 2.5e-2


def _bits(value: Any) -> bytes:
    """The bits of a computed result."""
    return np.asarray(value).tobytes()


def _random(shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iub":
        info = np.iinfo(dtype) if np.dtype(dtype).kind != "b" else None
        if info is None:
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    scale = rng.choice([1e-3, 1.0, 50.0], shape)
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Values against the exact references


@pytest.mark.parametrize(
    "dtype",
    [np.float16, BFLOAT16, np.float32, np.float64, np.int64, np.uint8, np.int32, np.bool_],
    ids=lambda dt: np.dtype(dt).name,
)
def test_penalty_and_sums_against_the_exact_reference(dtype: Any) -> None:
    values = _random((301, 157), dtype, seed=1)
    x = da.from_array(values, chunks=(64, 50))
    abs_sum, squares = exact_sums(values)
    got_abs, got_squares = dask.compute(*l1l2_dask.sums(x), scheduler="sync")
    assert_within_ulps(got_abs, float(abs_sum), np.float64, sum_ulps(dtype))
    assert_within_ulps(got_squares, float(squares), np.float64, sum_ulps(dtype))
    if np.dtype(dtype).kind in "iub":  # integers are summed exactly
        assert (got_abs, got_squares) == (float(abs_sum), float(squares))
    out_dtype = values.dtype if values.dtype.kind in "fV" else np.dtype(np.float64)
    penalty = l1l2_dask.penalty(x, L1, L2)
    assert penalty.dtype == out_dtype and penalty.shape == ()
    result = penalty.compute(scheduler="sync")
    assert result.dtype == out_dtype
    assert_within_ulps(result, exact_penalty(values, L1, L2), out_dtype, penalty_ulps(out_dtype))


@pytest.mark.parametrize(
    "values, l1, l2",
    [
        ([1e-160] * 7, 0.0, 1e300),  # every square underflows
        ([3e-170] * 4 + [1e-300] * 3, 0.0, 1e290),
        ([1e200] * 5, 0.0, 1e-300),  # every square overflows
        ([1e308] * 40, 1e-10, 0.0),  # the sum overflows across chunks, not in one
        ([1e300, -1e-300, 5e299, 2.0, 1e-200, -3e-170], 1e-310, 1e-320),
        ([2.0**-600, -(2.0**-700), 3 * 2.0**-650, 0.0, 0.0], 0.5, 2.0**900),
        ([1e-160, 1e-160, 0.5, 1e-170, 1e200, 1e-170], 1e-300, 1e-300),  # every scale merged
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_float64_extremes_merged_across_chunks(
    values: list[float], l1: float, l2: float, chunk: int
) -> None:
    x = da.from_array(np.array(values), chunks=chunk)
    abs_sum = sum((abs(Fraction(v)) for v in values), Fraction(0))
    squares = sum((Fraction(v) ** 2 for v in values), Fraction(0))
    expected = float(Fraction(l1) * abs_sum + Fraction(l2) * squares)
    assert math.isfinite(expected) and expected >= 2.0**-1022
    for split_every in (2, 16):
        got = l1l2_dask.penalty(x, l1, l2, split_every=split_every).compute(scheduler="sync")
        assert_within_ulps(got, expected, np.float64, penalty_ulps(np.float64))


# ---------------------------------------------------------------------------------------------
# The same bits everywhere


def _cases() -> dict[str, Any]:
    """Lazy results whose bits must not depend on where and how they are computed."""
    base = _random((400, 300), np.float64, seed=2)
    generated = da.random.default_rng(7).standard_normal((600, 500), chunks=(128, 100))
    sum_abs, sum_squares = l1l2_dask.sums(da.from_array(base, chunks=(100, 64)))
    return {
        "float32 generated in the workers": l1l2_dask.penalty(generated.astype(np.float32), L1, L2),
        "float64 C order": l1l2_dask.penalty(da.from_array(base, chunks=(100, 64)), L1, L2),
        "float64 Fortran order": l1l2_dask.penalty(
            da.from_array(np.asfortranarray(base), chunks=(100, 64)), L1, L2
        ),
        "float64 sum_abs": sum_abs,
        "float64 sum_squares": sum_squares,
        "float64 tiny": l1l2_dask.penalty(
            da.from_array(base * 1e-170, chunks=(37, 300)), 0.0, 1e300
        ),
        "int64": l1l2_dask.penalty(
            da.from_array(_random((5000,), np.int64, seed=3), chunks=700), L1, L2
        ),
        "broadcast": l1l2_dask.penalty(
            da.broadcast_to(da.from_array(base[0], chunks=64), (50, 300)).rechunk((20, 64)),
            L1,
            L2,
        ),
    }


@pytest.fixture(scope="module")
def reference_bits() -> dict[str, bytes]:
    """The bits of every case on the synchronous scheduler, in this process."""
    cases = _cases()
    values = dask.compute(*cases.values(), scheduler="sync")
    return {name: _bits(value) for name, value in zip(cases, values, strict=True)}


@pytest.fixture(
    scope="module",
    params=[(1, 1), (1, 2), (2, 1), (2, 2)],
    ids=lambda shape: f"{shape[0]}-workers-{shape[1]}-threads",
)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    n_workers, threads = request.param
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_same_bits_on_a_local_cluster(client: Client, reference_bits: dict[str, bytes]) -> None:
    cases = _cases()
    values = client.gather(client.compute(list(cases.values())))
    for name, value in zip(cases, values, strict=True):
        assert _bits(value) == reference_bits[name], name


def test_same_bits_on_the_threaded_scheduler(reference_bits: dict[str, bytes]) -> None:
    cases = _cases()
    for _ in range(3):
        values = dask.compute(*cases.values(), scheduler="threads", num_workers=4)
        for name, value in zip(cases, values, strict=True):
            assert _bits(value) == reference_bits[name], name


def test_bits_follow_the_chunk_boundaries_only() -> None:
    values = _random((257, 300), np.float32, seed=4)
    x = da.from_array(values, chunks=(64, 100))
    reference = _bits(l1l2_dask.penalty(x, L1, L2).compute(scheduler="sync"))
    same_boundaries = [
        x.rechunk(x.chunks),
        x.rechunk((32, 50)).rechunk((64, 100)),  # split and joined back
        da.from_array(np.asfortranarray(values), chunks=(64, 100)),
        da.from_array(values.T.copy(), chunks=(100, 64)).T,  # every chunk a transposed view
        x.map_blocks(lambda block: block[::-1][::-1].copy(order="F")),  # copies at new addresses
    ]
    with dask.config.set(split_every=3):  # our tree does not follow dask's setting
        for y in same_boundaries:
            assert _bits(l1l2_dask.penalty(y, L1, L2).compute(scheduler="sync")) == reference
    # Other boundaries or another tree may change the last bits, within the bounds.
    expected = exact_penalty(values, L1, L2)
    for y, split_every in [(x.rechunk((100, 300)), None), (x, 2), (x, 4)]:
        got = l1l2_dask.penalty(y, L1, L2, split_every=split_every).compute(scheduler="sync")
        assert_within_ulps(got, expected, np.float32, penalty_ulps(np.float32))


def test_a_broadcast_array_has_the_bits_of_its_values_written_out() -> None:
    row = _random((300,), np.float64, seed=5)
    written = da.from_array(np.tile(row, (40, 1)), chunks=(16, 128))
    broadcast = da.broadcast_to(da.from_array(row, chunks=128), (40, 300)).rechunk((16, 128))
    for y in (broadcast, da.ones((40, 300), chunks=(16, 128))):
        materialised = da.from_array(y.compute(), chunks=(16, 128))
        assert _bits(l1l2_dask.penalty(y, L1, L2).compute(scheduler="sync")) == _bits(
            l1l2_dask.penalty(materialised, L1, L2).compute(scheduler="sync")
        )
    assert _bits(l1l2_dask.penalty(written, L1, L2).compute(scheduler="sync")) == _bits(
        l1l2_dask.penalty(broadcast, L1, L2).compute(scheduler="sync")
    )


# ---------------------------------------------------------------------------------------------
# Gradient and prox, chunk for chunk


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64])
def test_gradient_and_prox_equal_the_in_memory_ops(dtype: Any) -> None:
    values = _random((123, 77), dtype, seed=6)
    values[0, :3] = [0.0, -0.0, np.nan]
    x = da.from_array(values, chunks=(50, 30))
    value, gradient = l1l2_dask.value_and_grad(x, L1, L2, scale=0.25)
    assert gradient.chunks == x.chunks and gradient.dtype == values.dtype
    expected = l1l2_rs.value_and_grad(values, L1, L2, scale=0.25)[1]
    assert gradient.compute(scheduler="sync").tobytes() == expected.tobytes()
    assert _bits(value.compute(scheduler="sync")) == _bits(
        l1l2_dask.penalty(x, L1, L2).compute(scheduler="sync")
    )
    stepped = l1l2_dask.prox(x, 0.1, L1, L2)
    in_memory = l1l2_rs.prox_(values.copy(), 0.1, L1, L2)
    assert stepped.compute(scheduler="sync").tobytes() == in_memory.tobytes()
    assert x.compute(scheduler="sync").tobytes() == values.tobytes()  # x itself is unchanged


# ---------------------------------------------------------------------------------------------
# The partial


def test_partial_pickles_merges_and_rejects_malformed_bytes() -> None:
    left = SumsPartial.of(np.array([1.5, -2.0]))
    right = SumsPartial.of(np.array([[3.0], [-0.5]]).T)
    for partial in (left, right, SumsPartial(), SumsPartial.of(np.arange(5, dtype=np.int8))):
        again = pickle.loads(pickle.dumps(partial))
        assert again == partial and again.to_bytes() == partial.to_bytes()
    merged = left.merge(right)
    assert merged.sums() == (7.0, 2.25 + 4.0 + 9.0 + 0.25)
    assert merged.penalty(0.5, None) == 3.5 and merged.dtype == "float64"
    assert SumsPartial().merge(left) == left and SumsPartial().dtype is None
    encoded = merged.to_bytes()
    for malformed in (
        b"",
        b"L1L2",
        encoded[:-1],
        encoded + b"\0",
        b"XXXX" + encoded[4:],
        encoded[:4] + b"\x02" + encoded[5:],  # an unknown version
        encoded[:5] + b"\x63" + encoded[6:],  # an unknown dtype
        # float64 sums of 0 with error parts -1 and -5: negative sums of magnitudes
        encoded[:8] + struct.pack("<4d", 0.0, -1.0, 0.0, -5.0),
    ):
        with pytest.raises(ValueError, match="partial"):
            SumsPartial.from_bytes(malformed)
    with pytest.raises(ValueError, match="float32 and float64"):
        SumsPartial.of(np.ones(2, np.float32)).merge(left)
    with pytest.raises(TypeError, match="complex"):
        SumsPartial.of(np.ones(2, np.complex64))
    # Read in place only: anything else is refused with what to pass instead, never guessed at.
    for unreadable, what in (
        ([1.0, 2.0], "np.asarray"),
        (np.arange(4.0).astype(">f8"), "byte-swapped"),
        (np.ma.array([1.0, 1e30], mask=[0, 1]), "masked"),
    ):
        with pytest.raises(TypeError, match=f"SumsPartial.of reads a numpy array in place.*{what}"):
            SumsPartial.of(unreadable)


def test_partials_have_the_same_bits_on_every_kernel() -> None:
    # Workers on machines with AVX-512, AVX2 or neither compute the same partials.
    code = (
        "import numpy as np; from l1l2_rs import SumsPartial; "
        "x = np.random.default_rng(9).standard_normal(300_001); "
        "print(SumsPartial.of(x[1:]).to_bytes().hex(), "
        "SumsPartial.of(x.astype(np.float32)).to_bytes().hex(), "
        "SumsPartial.of(x.astype(np.float16)).to_bytes().hex())"
    )
    outputs = set()
    for isa in ("avx512", "avx2", "baseline"):
        env = {**os.environ, "L1L2_MAX_ISA": isa}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1


# ---------------------------------------------------------------------------------------------
# Arguments and routing


def test_mixed_chunk_dtypes_are_an_error() -> None:
    x = da.from_array(np.ones((10, 10), np.float32), chunks=5)
    lying = x.map_blocks(
        lambda block, block_info=None: (
            block.astype(np.float64) if block_info[0]["chunk-location"] == (1, 1) else block
        ),
        dtype=np.float32,
    )
    with pytest.raises(TypeError, match="chunk of x has dtype float64 but x has dtype float32"):
        l1l2_dask.penalty(lying, L1, L2).compute(scheduler="sync")
    with pytest.raises(TypeError, match="chunk of x has dtype"):
        l1l2_dask.value_and_grad(lying, L1, L2)[1].compute(scheduler="sync")


def test_bad_arguments_raise_when_the_graph_is_built() -> None:
    x = da.ones(10, chunks=4)
    with pytest.raises(TypeError, match=r"dask\.array\.Array"):
        l1l2_dask.penalty(np.ones(3), L1, L2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="complex"):
        l1l2_dask.penalty(da.ones(3, dtype=np.complex64), L1, L2)
    with pytest.raises(ValueError, match="l1 must be a finite non-negative"):
        l1l2_dask.penalty(x, -1.0, L2)
    with pytest.raises(TypeError, match="l2 must be a real number"):
        l1l2_dask.value_and_grad(x, L1, "0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be a finite non-negative"):
        l1l2_dask.prox(x, math.inf, L1, L2)
    with pytest.raises(ValueError, match="scale must be a finite"):
        l1l2_dask.value_and_grad(x, L1, L2, scale=math.nan)
    for integers in (da.arange(10, chunks=3), da.ones(4, dtype=bool, chunks=2)):
        with pytest.raises(TypeError, match="float dtype"):
            l1l2_dask.prox(integers, 0.1, L1, L2)
        with pytest.raises(TypeError, match="float dtype"):
            l1l2_dask.value_and_grad(integers, L1, L2)
    with pytest.raises(ValueError, match="split_every"):
        l1l2_dask.penalty(x, L1, L2, split_every=1)


def test_regularizer_calls_and_penalty_stay_lazy_on_dask_arrays() -> None:
    values = _random((90, 40), np.float32, seed=8)
    x = da.from_array(values, chunks=(30, 40))
    reference = _bits(l1l2_dask.penalty(x, L1, L2).compute(scheduler="sync"))
    for lazy in (l1l2_rs.L1L2(L1, L2)(x), l1l2_rs.penalty(x, L1, L2)):
        assert isinstance(lazy, da.Array)
        assert _bits(lazy.compute(scheduler="sync")) == reference
    # L1(0) keeps its term, as on numpy arrays: NaN shows.
    with_nan = da.from_array(np.array([1.0, np.nan]), chunks=1)
    assert math.isnan(l1l2_rs.L1(0.0)(with_nan).compute(scheduler="sync"))
    assert l1l2_rs.L1L2(0.0, 0.5)(with_nan[:1]).compute(scheduler="sync") == 0.5


def test_a_missing_dask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "l1l2_rs.dask")
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r"l1l2-rs\[dask\]"):
        importlib.import_module("l1l2_rs.dask")
