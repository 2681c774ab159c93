"""How inputs become arrays the native core can read in place.

The native functions take numpy arrays of a supported dtype (float16, bfloat16, float32, float64,
integer, bool) in native byte order and aligned, without copying. Anything else comes here first:
array-likes are converted with ``numpy.asarray`` (zero-copy for the buffer protocol and
``__array__`` where the producer allows it), DLPack producers with ``numpy.from_dlpack``;
byte-swapped and unaligned arrays are copied once, since no kernel can read them in place.
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
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    if not array.flags.aligned or any(s % dtype.itemsize for s in array.strides):
        array = array.copy()
    return array
