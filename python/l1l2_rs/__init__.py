"""l1l2-rs: the L1/L2 regularization penalty on a Rust SIMD core, with Keras' regularizer API.

>>> import numpy as np, l1l2_rs
>>> l1l2_rs.L1L2(l1=0.5, l2=0.25)(np.array([1.0, -2.0]))
np.float64(2.75)
"""

from __future__ import annotations

from ._l1l2_rs import get_num_threads, set_num_threads, simd_isa
from .regularizers import (
    L1,
    L1L2,
    L2,
    Regularizer,
    deserialize,
    get,
    l1,
    l1_l2,
    l2,
    penalty,
    register_regularizer,
    serialize,
    sums,
)

__version__ = "0.1.0"

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "Regularizer",
    "__version__",
    "deserialize",
    "get",
    "get_num_threads",
    "l1",
    "l1_l2",
    "l2",
    "penalty",
    "register_regularizer",
    "serialize",
    "set_num_threads",
    "simd_isa",
    "sums",
]
