"""l1l2-rs: the L1/L2 regularization penalty on a Rust SIMD core, with Keras' regularizer API.

>>> import numpy as np, l1l2_rs
>>> l1l2_rs.L1L2(l1=0.5, l2=0.25)(np.array([1.0, -2.0]))
np.float64(2.75)
"""

from __future__ import annotations

import operator
import sys

from . import _l1l2_rs
from ._l1l2_rs import SumsPartial, get_num_threads, simd_isa
from .regularizers import (
    L1,
    L1L2,
    L2,
    FactorError,
    OrthogonalRegularizer,
    Regularizer,
    deserialize,
    get,
    grad,
    l1,
    l1_l2,
    l2,
    orthogonal_regularizer,
    penalty,
    penalty_many,
    prox_,
    prox_many_,
    register_regularizer,
    serialize,
    sums,
    sums_many,
    value_and_grad,
    value_and_grad_many,
)

__version__ = "0.1.0"


def set_num_threads(threads: int) -> None:
    """Use ``threads`` threads for large inputs (0 restores the default: ``L1L2_NUM_THREADS``, else
    ``RAYON_NUM_THREADS``, else the CPU count). Results are bit-identical for any count.

    Counts above 4 per CPU (at least 4) are capped there: ``get_num_threads()`` reports the count
    in use. If the threads cannot be started, a ``RuntimeWarning`` says so once and calls run on
    the calling thread."""
    if isinstance(threads, bool):
        raise TypeError(f"threads must be an int, got {threads!r}")
    try:
        count = operator.index(threads)
    except TypeError:
        raise TypeError(f"threads must be an int, got {threads!r}") from None
    if count < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {count}")
    _l1l2_rs.set_num_threads(min(count, sys.maxsize))  # the core caps it further


def _register_with_threadpoolctl() -> None:
    """Register with threadpoolctl >= 3.2 when it is installed (it is optional)."""
    import importlib.util

    if importlib.util.find_spec("threadpoolctl") is None:
        return
    import threadpoolctl

    if hasattr(threadpoolctl, "register"):
        from ._threadpoolctl import register

        register()


_register_with_threadpoolctl()

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "FactorError",
    "OrthogonalRegularizer",
    "Regularizer",
    "SumsPartial",
    "__version__",
    "deserialize",
    "get",
    "get_num_threads",
    "grad",
    "l1",
    "l1_l2",
    "l2",
    "orthogonal_regularizer",
    "penalty",
    "penalty_many",
    "prox_",
    "prox_many_",
    "register_regularizer",
    "serialize",
    "set_num_threads",
    "simd_isa",
    "sums",
    "sums_many",
    "value_and_grad",
    "value_and_grad_many",
]
