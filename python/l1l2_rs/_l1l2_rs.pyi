"""Type stubs of the native module (checked with ``python -m mypy.stubtest``)."""

from typing import Any, Final

import numpy as np

__all__ = [
    "CHUNK_LEN",
    "PARALLEL_MIN_BYTES",
    "_read_probe",
    "get_num_threads",
    "penalty",
    "set_num_threads",
    "simd_isa",
    "sums",
]

CHUNK_LEN: Final[int]
PARALLEL_MIN_BYTES: Final[int]

def sums(x: object) -> tuple[float, float]: ...
def penalty(x: object, l1: float | None, l2: float | None) -> np.generic: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def simd_isa() -> str: ...
def _read_probe(array: np.ndarray[Any, np.dtype[Any]]) -> int: ...
