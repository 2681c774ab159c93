"""Type stubs of the native module (checked with ``python -m mypy.stubtest``)."""

from typing import Any, Final, final

import numpy as np
from typing_extensions import disjoint_base

__all__ = [
    "CHUNK_LEN",
    "PARALLEL_MIN_BYTES",
    "PARALLEL_MIN_BYTES_ASLEEP",
    "NotReadable",
    "PenaltyTerms",
    "SumsPartial",
    "get_num_threads",
    "orthogonal_penalty",
    "penalty",
    "penalty_many",
    "prox_",
    "prox_many_",
    "safetensors_layout",
    "set_num_threads",
    "simd_isa",
    "sums",
    "sums_many",
    "value_and_grad",
    "value_and_grad_many",
    "xla_ffi_handlers",
]

CHUNK_LEN: Final[int]
PARALLEL_MIN_BYTES: Final[int]
PARALLEL_MIN_BYTES_ASLEEP: Final[int]

class NotReadable(TypeError):
    """The input is not a numpy array the core reads in place: convert it and call again."""

@final
class SumsPartial:
    """The mergeable state of ``(sum(|x|), sum(x**2))`` of a piece of an array."""

    def __new__(cls) -> SumsPartial: ...
    @staticmethod
    def of(x: object) -> SumsPartial: ...
    def merge(self, other: SumsPartial) -> SumsPartial: ...
    def sums(self) -> tuple[float, float]: ...
    def penalty(self, l1: float | None, l2: float | None) -> float: ...
    @property
    def dtype(self) -> str | None: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> SumsPartial: ...
    def __reduce__(self) -> tuple[Any, tuple[bytes]]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@disjoint_base
class PenaltyTerms:
    """The native base of the built-in L1/L2 regularizers: their terms and ``__call__``."""

    def __new__(cls, *_args: Any, **_kwargs: Any) -> PenaltyTerms: ...
    def _set_terms(self, l1: float | None, l2: float | None) -> None: ...
    def __call__(self, x: object) -> Any: ...

def sums(x: object) -> tuple[float, float]: ...
def penalty(x: object, l1: float | None, l2: float | None) -> np.generic: ...
def value_and_grad(
    x: object,
    l1: float | None,
    l2: float | None,
    out: object | None = None,
    accumulate: bool = False,
    scale: float = 1.0,
) -> tuple[np.generic, Any]: ...
def prox_(x: object, lr: float, l1: float | None, l2: float | None) -> Any: ...
def sums_many(xs: object) -> list[tuple[float, float]]: ...
def penalty_many(xs: object, l1: float | None, l2: float | None) -> float: ...
def value_and_grad_many(
    xs: object,
    l1: float | None,
    l2: float | None,
    outs: object | None = None,
    accumulate: bool = False,
    scale: float = 1.0,
) -> tuple[float, list[Any]]: ...
def prox_many_(xs: object, lr: float, l1: float | None, l2: float | None) -> Any: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def simd_isa() -> str: ...
def orthogonal_penalty(x: object, factor: float, mode: str) -> Any: ...
def safetensors_layout(path: str) -> list[tuple[str, str, list[int], int, int]]:
    """The tensors of a ``.safetensors`` file in file order: (name, dtype, shape, start, end), the
    byte range absolute in the file; ``ValueError`` for a malformed header."""

def xla_ffi_handlers() -> tuple[dict[str, Any], tuple[int, int]]:
    """The XLA FFI handlers by target name (PyCapsules for ``jax.ffi.register_ffi_target``,
    platform "cpu") and the XLA FFI API version they were written against."""
