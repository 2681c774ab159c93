"""How inputs become arrays the native core can read in place.

The native functions take numpy arrays of a supported dtype (float16, bfloat16, float32, float64,
integer, bool) in native byte order and aligned, without copying. Anything else comes here first:
array-likes are converted with ``numpy.asarray`` (zero-copy for the buffer protocol and
``__array__`` where the producer allows it), DLPack producers with ``numpy.from_dlpack``;
byte-swapped and unaligned arrays are copied once, since no kernel can read them in place.

An array made here, rather than a view of the caller's memory, is placed on a 64-byte boundary:
the kernel's lanes start at the first cache-line-aligned element, so the bits of a result depend
on the data's address modulo 64 bytes, and a list converted afresh on every call must give the
same bits on every call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SUPPORTED = "float16, bfloat16, float32, float64, an integer or bool dtype"


def _is_bfloat16(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def coerce(x: object) -> np.ndarray[Any, np.dtype[Any]]:
    """Return ``x`` as a numpy array the native core reads in place, or raise ``TypeError``."""
    if isinstance(x, np.ndarray):
        array = x
    elif hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        array = np.from_dlpack(x)
    else:
        array = np.asarray(x)
    dtype = array.dtype
    supported = (dtype.kind in "fiub" and dtype.itemsize <= 8) or _is_bfloat16(dtype)
    if not supported:
        raise TypeError(
            f"l1l2_rs: unsupported dtype {dtype} of the input array (expected {_SUPPORTED})"
        )
    readable = (
        dtype.isnative
        and array.flags.aligned
        and not any(s % dtype.itemsize for s in array.strides)
    )
    if not readable or (array is not x and array.flags.owndata):
        array = _on_cache_line(array, dtype.newbyteorder("="))
    return array


def _on_cache_line(
    array: np.ndarray[Any, np.dtype[Any]], dtype: np.dtype[Any]
) -> np.ndarray[Any, np.dtype[Any]]:
    """``array`` as ``dtype``, C-contiguous from a 64-byte boundary (itself if it is already)."""
    if array.dtype == dtype and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        return array
    nbytes = array.size * dtype.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start: int = -raw.ctypes.data % 64
    placed: np.ndarray[Any, np.dtype[Any]] = raw[start : start + nbytes].view(dtype)
    placed = placed.reshape(array.shape)
    placed[...] = array
    return placed
