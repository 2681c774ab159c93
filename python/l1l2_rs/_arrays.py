"""How inputs become arrays the native core can read in place.

The native functions read numpy arrays in native byte order and aligned, without copying, and
decide themselves which dtypes they support. Anything else makes them raise ``NotReadable``, and
the Python layer passes the input through ``coerce`` and calls again: array-likes are converted
with ``numpy.asarray`` (zero-copy for the buffer protocol and ``__array__`` where the producer
allows it), DLPack producers with ``numpy.from_dlpack``; byte-swapped and unaligned arrays are
copied once, since no kernel can read them in place.

An array made here, rather than a view of the caller's memory, is placed on a 64-byte boundary:
the kernel's lanes start at the first cache-line-aligned element, so the bits of a result depend
on the data's address modulo 64 bytes, and a list converted afresh on every call must give the
same bits on every call.

Never silently wrong: converting an object that carries autograd state (a torch tensor that
requires grad, a JAX tracer, a symbolic or taped TensorFlow tensor, a Keras variable holding one)
would compute the value and drop the gradient without a word. A penalty of such an object
(``penalty_of_unreadable``: the regularizer call and ``penalty``) takes the differentiable path
``_backend.route`` picks for it; every other operation refuses it with a ``TypeError``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from ._backend import differentiable_orthogonal_penalty, differentiable_penalty, refusal, route
from ._l1l2_rs import NotReadable

_R = TypeVar("_R")


def penalty_of_unreadable(
    native: Callable[..., Any], x: Any, l1: float | None, l2: float | None
) -> Any:
    """The penalty of an ``x`` the native kernel could not read: converted to numpy for the
    kernel when it is a concrete value, else computed by the differentiable backend formula; a
    Dask array's is ``l1l2_rs.dask``'s lazy penalty (never computed here)."""
    if _is_dask_array(x):
        from .dask import _penalty

        return _penalty(x, l1, l2, split_every=None)
    path = route(x)
    if path is None:
        return native(_readable(x), l1, l2)
    return differentiable_penalty(path, x, l1, l2)


def orthogonal_penalty_of_unreadable(
    native: Callable[..., Any], x: Any, factor: float, mode: str
) -> Any:
    """The orthogonality penalty of an ``x`` the native kernel could not read: converted to numpy
    (integers to float64) for the kernel when it is a concrete value, else computed by the
    differentiable backend formula."""
    try:
        path = route(x)
    except TypeError:  # a torch tensor that requires grad, or a JAX tracer, outside Keras
        raise TypeError(
            f"l1l2_rs: OrthogonalRegularizer got a {type(x).__name__} that carries autograd "
            "state outside Keras. It is differentiable inside a Keras layer or training step "
            "and for TensorFlow tensors; converting this one to numpy would drop its gradient "
            "silently. Pass a detached value (x.detach() for torch, a concrete array for JAX)."
        ) from None
    if path is None:
        array = _readable(x)
        if array.dtype.kind in "biu":
            array = array.astype(np.float64)
        return native(array, factor, mode)
    shape = tuple(x.shape)
    if len(shape) != 2:
        raise ValueError(
            f"Inputs to OrthogonalRegularizer must have rank 2 (a matrix); got x of shape {shape}"
        )
    return differentiable_orthogonal_penalty(path, x, factor, mode == "rows")


def _is_dask_array(x: object) -> bool:
    """Whether ``x`` is a Dask array (without importing Dask: none exists before it is)."""
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(x, dask_array.Array)


def call(function: Callable[..., _R], x: Any, *args: Any, **kwargs: Any) -> _R:
    """``function(x, ...)``, converting ``x`` with ``coerce`` if the core cannot read it as is."""
    try:
        return function(x, *args, **kwargs)
    except NotReadable:
        return function(coerce(x), *args, **kwargs)


def call_many(function: Callable[..., _R], xs: Any, *args: Any, **kwargs: Any) -> _R:
    """``function(xs, ...)`` for a list of inputs, converting them if the core cannot read one."""
    if not isinstance(xs, Sequence):
        xs = list(xs)  # a generator would be used up by the first attempt
    try:
        return function(xs, *args, **kwargs)
    except NotReadable:
        return function([coerce(x) for x in xs], *args, **kwargs)


def coerce(x: object) -> np.ndarray[Any, np.dtype[Any]]:
    """Return ``x`` as a numpy array the native core can read in place (dtypes are its call)."""
    if not isinstance(x, np.ndarray):
        refuse_tracked(x)
    return _readable(x)


def _readable(x: object) -> np.ndarray[Any, np.dtype[Any]]:
    """``coerce`` of an ``x`` known to carry no autograd state."""
    if isinstance(x, np.ma.MaskedArray):
        # Masked elements are left out, as numpy.ma's reductions leave them out: zeros add
        # nothing to sum(|x|) or sum(x**2), and their gradient is 0.
        array = np.ma.filled(x, 0)
    elif isinstance(x, np.ndarray):
        array = x
    elif hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        array = np.from_dlpack(x)
    else:
        array = np.asarray(_detached(x))
    dtype = array.dtype
    if dtype.hasobject:
        return array  # the core refuses it with a TypeError that names the dtype
    readable = (
        dtype.isnative
        and array.flags.aligned
        and not any(s % dtype.itemsize for s in array.strides)
    )
    if not readable and 0 in array.strides and array.size:
        # Convert one copy of a broadcast array and broadcast it again: materialising all of it
        # could take terabytes, and the core sums the broadcast view in the time of one copy.
        one_copy = array[tuple(slice(0, 1) if s == 0 else slice(None) for s in array.strides)]
        return np.broadcast_to(_on_cache_line(one_copy, dtype.newbyteorder("=")), array.shape)
    if not readable or (array is not x and array.flags.owndata):
        array = _on_cache_line(array, dtype.newbyteorder("="))
    return array


def _on_cache_line(
    array: np.ndarray[Any, np.dtype[Any]], dtype: np.dtype[Any]
) -> np.ndarray[Any, np.dtype[Any]]:
    """``array`` as ``dtype``, C-contiguous from a 64-byte boundary (itself if it is already)."""
    if array.dtype == dtype and array.flags.c_contiguous and _address(array) % 64 == 0:
        return array
    nbytes = array.size * dtype.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start: int = -_address(raw) % 64
    placed: np.ndarray[Any, np.dtype[Any]] = raw[start : start + nbytes].view(dtype)
    placed = placed.reshape(array.shape)
    placed[...] = array
    return placed


def _address(array: np.ndarray[Any, np.dtype[Any]]) -> int:
    """The address of ``array``'s first element (``.ctypes`` would import ctypes on first use, and a
    child forked while another thread holds that import's lock would hang)."""
    address: int = array.__array_interface__["data"][0]
    return address


def refuse_tracked(x: object) -> None:
    """Raise ``TypeError`` if converting ``x`` to numpy would drop autograd state."""
    if route(x) is not None:
        raise TypeError(refusal(x))


def _detached(x: object) -> object:
    """A torch tensor that requires grad outside autograd (``torch.no_grad``) is read detached."""
    if type(x).__module__.startswith("torch") and getattr(x, "requires_grad", False):
        detach: Callable[[], object] = x.detach  # type: ignore[attr-defined]
        return detach()
    return x
