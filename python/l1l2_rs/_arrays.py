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

Never silently wrong: an object that carries autograd state (a torch tensor that requires grad, a
JAX tracer, a symbolic or taped TensorFlow tensor, a Keras variable holding one) is refused with a
``TypeError``: converting it to numpy would compute the value and drop the gradient without a word.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from ._l1l2_rs import NotReadable

_R = TypeVar("_R")

_NO_ADAPTER = (
    "l1l2_rs computes with numpy and cannot carry gradients back to {framework}; converting it "
    "would drop the gradient silently. The framework adapters are not part of this release: use "
    "the framework's own ops for a differentiable penalty, or pass a detached value ({detach})."
)


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
    if isinstance(x, np.ndarray):
        array = x
    else:
        refuse_tracked(x)
        if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
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


def _framework(x: object) -> str:
    return (type(x).__module__ or "").split(".", 1)[0]


def refuse_tracked(x: object) -> None:
    """Raise ``TypeError`` if converting ``x`` to numpy would drop autograd state."""
    framework = _framework(x)
    if framework == "torch":
        torch = sys.modules["torch"]
        if getattr(x, "requires_grad", False) and torch.is_grad_enabled():
            raise TypeError(
                "l1l2_rs: got a torch tensor that requires grad. "
                + _NO_ADAPTER.format(framework="PyTorch", detach="x.detach()")
            )
    elif framework in ("jax", "jaxlib"):
        if any(
            cls.__name__ == "Tracer" and cls.__module__.startswith("jax") for cls in type(x).__mro__
        ):
            raise TypeError(
                "l1l2_rs: got a JAX tracer (inside jax.jit, jax.grad or jax.vmap). "
                + _NO_ADAPTER.format(framework="JAX", detach="a concrete array outside the trace")
            )
    elif framework == "tensorflow":
        if not hasattr(x, "numpy"):
            raise TypeError(
                "l1l2_rs: got a symbolic TensorFlow tensor (inside tf.function or a graph). "
                + _NO_ADAPTER.format(framework="TensorFlow", detach="run eagerly")
            )
        if _tensorflow_recording():
            raise TypeError(
                "l1l2_rs: got a TensorFlow tensor while a GradientTape is recording. "
                + _NO_ADAPTER.format(framework="TensorFlow", detach="tf.stop_gradient(x).numpy()")
            )
    elif framework in ("keras", "tf_keras") and hasattr(x, "value"):
        # A Keras variable: what it holds decides (a torch parameter, a tracer, a TF variable).
        value = x.value
        if value is not x:
            refuse_tracked(value)
            if framework == "tf_keras" or _framework(value) == "tensorflow":
                return
        if _tensorflow_recording():
            raise TypeError(
                "l1l2_rs: got a Keras variable while a GradientTape is recording. "
                + _NO_ADAPTER.format(framework="Keras", detach="ops.stop_gradient")
            )


def _detached(x: object) -> object:
    """A torch tensor that requires grad outside autograd (``torch.no_grad``) is read detached."""
    if _framework(x) == "torch" and getattr(x, "requires_grad", False):
        detach: Callable[[], object] = x.detach  # type: ignore[attr-defined]
        return detach()
    return x


def _tensorflow_recording() -> bool:
    """Whether a TensorFlow GradientTape is recording on this thread (without importing TF)."""
    eager = sys.modules.get("tensorflow.python.pywrap_tfe")
    tape_set_is_empty = getattr(eager, "TFE_Py_TapeSetIsEmpty", None)
    return tape_set_is_empty is not None and not tape_set_is_empty()
