"""The L1/L2 penalty of Dask arrays: lazy, chunk by chunk, with the same bits on any cluster.

>>> import dask.array as da, l1l2_rs.dask
>>> x = da.arange(10.0, chunks=3)
>>> l1l2_rs.dask.penalty(x, l1=0.5).compute()
np.float64(22.5)

Each chunk is reduced by the native core to a ``SumsPartial`` (compensated float64 sums, or exact
integer sums), the partials are merged along ``da.reduction``'s tree with ``split_every`` fixed
(16 unless given), and the merged partial is rounded once at the end. A chunk's partial depends
on its values only (not on its memory layout, address or the threads that read it), and the tree
on the block grid and ``split_every`` only, so the result has the same bits for any number of
workers, threads per worker and any scheduling order, and for any rechunking that keeps the
chunk boundaries. Everything returned is lazy (a Dask array); ``.compute()`` it.

``import l1l2_rs.dask`` imports Dask (``pip install 'l1l2-rs[dask]'``); ``import l1l2_rs`` never
does. ``l1l2_rs.L1L2(...)(x)`` and ``l1l2_rs.penalty(x, ...)`` on a Dask array return
``penalty``'s lazy result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

try:
    import dask.array as da
except ImportError as error:  # pragma: no cover - the test environment has Dask
    raise ImportError(
        "l1l2_rs.dask needs Dask's arrays: install the extra with pip install 'l1l2-rs[dask]'"
    ) from error

from . import _l1l2_rs
from ._arrays import call, coerce
from ._l1l2_rs import SumsPartial
from .regularizers import _factor, _l1l2_terms

#: Dask's array functions, called untyped (Dask's annotations are partial).
_dask: Any = da

__all__ = ["SumsPartial", "partial_sums", "penalty", "prox", "sums", "value_and_grad"]

#: Partials merged per node of the reduction tree: fixed, so that the tree (and with it the
#: result's bits) does not follow ``dask.config``'s ``split_every``.
SPLIT_EVERY = 16

NumpyArray = np.ndarray[Any, np.dtype[Any]]


def partial_sums(x: da.Array, *, split_every: int | None = None) -> da.Array:
    """The merged ``SumsPartial`` of ``x``, as a lazy 0-d Dask array of dtype object."""
    _check_array(x)
    return _reduce(x, _merged, np.dtype(object), split_every)


def penalty(
    x: da.Array, l1: float | None = 0.0, l2: float | None = 0.0, *, split_every: int | None = None
) -> da.Array:
    """``L1L2(l1, l2)(x)`` as a lazy 0-d Dask array of ``x``'s float dtype (float64 for integer
    and bool data); a factor of exactly zero drops its term."""
    return _penalty(x, *_l1l2_terms(l1, l2), split_every=split_every)


def sums(x: da.Array, *, split_every: int | None = None) -> tuple[da.Array, da.Array]:
    """``(sum(|x|), sum(x**2))`` as two lazy 0-d float64 Dask arrays of one reduction
    (``dask.compute(*sums(x))`` reads ``x`` once)."""
    merged = partial_sums(x, split_every=split_every)
    sum_abs, sum_squares = (
        _dask.map_blocks(_sum_of, merged, index, dtype=np.float64, meta=np.empty((), np.float64))
        for index in (0, 1)
    )
    return sum_abs, sum_squares


def value_and_grad(
    x: da.Array,
    l1: float | None = 0.0,
    l2: float | None = 0.0,
    *,
    scale: float = 1.0,
    split_every: int | None = None,
) -> tuple[da.Array, da.Array]:
    """``(penalty(x, l1, l2), scale * gradient)``: the gradient ``l1 * sign(x) + 2 * l2 * x`` is a
    lazy Dask array with ``x``'s chunks, each chunk with the bits of ``l1l2_rs.value_and_grad``
    on it. ``dask.compute(value, gradient)`` makes each chunk of ``x`` once and reads it twice
    (once per output); computed one after the other, ``x`` is made twice (persist it first)."""
    terms = _l1l2_terms(l1, l2)
    _check_float(x, "value_and_grad")
    scale = _finite("scale", scale)
    value = _penalty(x, *terms, split_every=split_every)
    gradient: da.Array = _dask.map_blocks(_grad_block, x, x.dtype, *terms, scale, dtype=x.dtype)
    return value, gradient


def prox(x: da.Array, lr: float, l1: float | None = 0.0, l2: float | None = 0.0) -> da.Array:
    """The proximal step of ``lr * L1L2(l1, l2)`` as a new lazy Dask array (Dask arrays are
    immutable): each chunk is copied and stepped with ``l1l2_rs.prox_``, whose bits it has."""
    terms = _l1l2_terms(l1, l2)
    _check_float(x, "prox")
    lr = _factor("lr", lr, 0.0)
    stepped: da.Array = _dask.map_blocks(_prox_block, x, x.dtype, lr, *terms, dtype=x.dtype)
    return stepped


# ---------------------------------------------------------------------------------------------
# The graph.


def _penalty(
    x: da.Array, l1: float | None, l2: float | None, *, split_every: int | None
) -> da.Array:
    _check_array(x)
    result = _result_dtype(x.dtype)
    aggregate = partial(_penalty_of, l1=l1, l2=l2, result=result)
    return _reduce(x, aggregate, result, split_every)


def _reduce(x: da.Array, finish: Any, dtype: np.dtype[Any], split_every: int | None) -> da.Array:
    every = SPLIT_EVERY if split_every is None else split_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    meta = np.empty((), dtype=dtype)
    reduced: da.Array = _dask.reduction(
        x,
        partial(_chunk_partial, dtype=x.dtype),
        partial(_aggregate, finish=finish),
        combine=_combine,
        dtype=dtype,
        split_every=every,
        concatenate=False,
        meta=meta,
        name="l1l2-partial-sums",
    )
    return reduced


def _chunk_partial(block: Any, *_: Any, dtype: np.dtype[Any], **__: Any) -> SumsPartial:
    return call(SumsPartial.of, _checked_block(block, dtype))


def _combine(parts: Any, *_: Any, **__: Any) -> SumsPartial:
    """Merges the partials of one tree node, in block order."""
    merged = SumsPartial()
    for part in _in_order(parts):
        merged = merged.merge(part)
    return merged


def _aggregate(parts: Any, *_: Any, finish: Any, **__: Any) -> Any:
    return finish(_combine(parts))


def _in_order(parts: Any) -> Iterator[SumsPartial]:
    """The partials of ``da.reduction``'s nested lists (one level per axis), in C block order."""
    if isinstance(parts, (list, tuple)):
        for part in parts:
            yield from _in_order(part)
    else:
        yield parts


def _merged(partial: SumsPartial) -> SumsPartial:
    return partial


def _penalty_of(
    partial: SumsPartial, *, l1: float | None, l2: float | None, result: np.dtype[Any]
) -> Any:
    return result.type(partial.penalty(l1, l2))


def _sum_of(partial: SumsPartial, index: int) -> Any:
    return np.float64(partial.sums()[index])


def _grad_block(
    block: Any, dtype: np.dtype[Any], l1: float | None, l2: float | None, scale: float
) -> NumpyArray:
    gradient: NumpyArray = _l1l2_rs.value_and_grad(
        _checked_block(block, dtype), l1, l2, None, False, scale
    )[1]
    return gradient


def _prox_block(
    block: Any, dtype: np.dtype[Any], lr: float, l1: float | None, l2: float | None
) -> NumpyArray:
    stepped = np.array(_checked_block(block, dtype), copy=True)  # a chunk may be shared
    _l1l2_rs.prox_(stepped, lr, l1, l2)
    return stepped


# ---------------------------------------------------------------------------------------------
# Checks, made when the graph is built where they can be.


def _check_array(x: object) -> None:
    if not isinstance(x, da.Array):
        raise TypeError(f"l1l2_rs.dask: x must be a dask.array.Array, got {type(x).__name__}")
    SumsPartial.of(np.empty(0, dtype=x.dtype))  # a TypeError naming an unsupported dtype


def _check_float(x: da.Array, operation: str) -> None:
    _check_array(x)
    if x.dtype.kind not in "fV":
        raise TypeError(
            f"l1l2_rs.dask: {operation} is written in x's float dtype; got {x.dtype} "
            "(convert with x.astype(...) first)"
        )


def _checked_block(block: Any, dtype: np.dtype[Any]) -> NumpyArray:
    """A chunk as a numpy array the core reads, refused when its dtype is not the array's."""
    array = block if isinstance(block, np.ndarray) else coerce(block)
    if array.dtype != dtype:
        raise TypeError(
            f"l1l2_rs.dask: a chunk of x has dtype {array.dtype} but x has dtype {dtype}: "
            "every chunk of an array must have its dtype (cast them with x.astype(...))"
        )
    return array


def _result_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a penalty is reported in: the float dtype itself, else float64."""
    return dtype if dtype.kind in "fV" else np.dtype(np.float64)


def _finite(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a real number, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number
