"""The L1/L2 penalty as a differentiable JAX function, and optax-style transformations.

``penalty`` runs the l1l2-rs core inside jitted code as an XLA FFI custom call on CPU (registered
with XLA on first use), and XLA's own ops elsewhere; both have the same gradient rule (0 at 0).

``import l1l2_rs.jax`` imports JAX; ``import l1l2_rs`` never does. Optax is optional: the
transformations are ``optax.GradientTransformation`` objects when optax is installed, and the same
``(init, update)`` named tuple otherwise, so they work in ``optax.chain`` either way.

>>> import jax, jax.numpy as jnp
>>> from l1l2_rs.jax import penalty
>>> params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.0])}
>>> float(penalty(params, l1=0.5, l2=0.25))
2.75
>>> jax.grad(penalty)(params, 0.5, 0.25)["b"]  # the gradient of |x| at 0 is 0 here, 1 in JAX
Array([0.], dtype=float32)
"""

from __future__ import annotations

import functools
import importlib
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _l1l2_rs
from .regularizers import _factor

__all__ = [
    "AddL1L2GradsState",
    "ApplyL1L2ProxState",
    "GradientTransformation",
    "add_l1l2_grads",
    "apply_l1l2_prox",
    "penalty",
    "prox",
]

Array = Any  # jax.Array or a tracer of one; jax's own annotations are not precise enough here
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct  # untyped in jax's annotations

#: Leaf dtypes the penalty takes, and the dtype each is computed in.
_COMPUTE_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(jnp.float16): np.dtype(np.float32),
    np.dtype(jnp.bfloat16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}

_IMPLEMENTATIONS = ("auto", "native", "jnp")


# ---------------------------------------------------------------------------------------------
# Arguments


def _static_factor(name: str, value: object) -> float:
    """A regularization factor as a Python float; it must be concrete (it is baked into the
    compiled computation, as Keras' factors are fixed at construction)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"l1l2_rs.jax: {name} must be a concrete number, not a traced value: the factors are "
            "static (close over them or mark them static in jax.jit)"
        )
    if isinstance(value, jax.Array):
        value = np.asarray(value)
    return _factor(name, value, 0.0)


def _leaves(params: Any, caller: str) -> tuple[list[Array], Any]:
    """The leaves of ``params`` as float arrays, and the tree structure; refuses other dtypes
    with a ``TypeError`` that names the leaf."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, leaf in with_paths:
        array = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if np.dtype(array.dtype) not in _COMPUTE_DTYPES:
            where = f"params{jax.tree_util.keystr(path)}" if path else "params"
            raise TypeError(
                f"l1l2_rs.jax.{caller}: {where} has dtype {np.dtype(array.dtype).name}; expected "
                "float16, bfloat16, float32 or float64"
            )
        leaves.append(array)
    return leaves, treedef


def _compute_dtype(x: Array) -> np.dtype[Any]:
    return _COMPUTE_DTYPES[np.dtype(x.dtype)]


def _result_dtype(leaves: list[Array]) -> np.dtype[Any]:
    """float64 when a leaf is float64, else float32 (also for float16 and bfloat16 leaves)."""
    wide = any(_compute_dtype(x) == np.float64 for x in leaves)
    return np.dtype(np.float64 if wide else np.float32)


# ---------------------------------------------------------------------------------------------
# The penalty: jnp formulas


def _leaf_penalty(x: Array, l1: float, l2: float) -> Array:
    """``l1 * sum|x| + l2 * sum x**2`` in the leaf's compute dtype; a zero factor drops its
    term (so NaN or inf in ``x`` cannot leak through it)."""
    wide = x.astype(_compute_dtype(x))
    total = jnp.zeros((), wide.dtype)
    if l1:
        total = total + l1 * jnp.sum(jnp.abs(wide))
    if l2:
        total = total + l2 * jnp.sum(wide * wide)
    return total


def _leaf_grad(x: Array, l1: float, l2: float) -> Array:
    """``l1 * sign(x) + 2 * l2 * x`` (``sign(0) = 0``) in the leaf's compute dtype."""
    wide = x.astype(_compute_dtype(x))
    terms = ([l1 * jnp.sign(wide)] if l1 else []) + ([(2 * l2) * wide] if l2 else [])
    if not terms:
        return jnp.zeros_like(wide)
    # No `0 + ...`: it would turn the gradient -0.0 at x = -0.0 into +0.0.
    return terms[0] + terms[1] if len(terms) == 2 else terms[0]


def _jnp_value(l1: float, l2: float, leaves: list[Array]) -> Array:
    dtype = _result_dtype(leaves)
    total = jnp.zeros((), dtype)
    for x in leaves:
        total = total + _leaf_penalty(x, l1, l2).astype(dtype)
    return total


def _jnp_value_and_grads(l1: float, l2: float, leaves: list[Array]) -> tuple[Array, list[Array]]:
    return _jnp_value(l1, l2, leaves), [_leaf_grad(x, l1, l2) for x in leaves]


# ---------------------------------------------------------------------------------------------
# The penalty: the native implementation, the l1l2-rs core as XLA FFI custom calls (CPU)

_PENALTY_TARGET = "l1l2_rs_penalty"
_VALUE_AND_GRAD_TARGET = "l1l2_rs_value_and_grad"
_registration = threading.Lock()
#: Empty until the first use; then ``[None]`` when the handlers are registered, or
#: ``[message]`` when registering them failed (then "auto" uses jnp, "native" raises).
_registration_outcome: list[str | None] = []


def _native_unavailable() -> str | None:
    """Registers the handlers with XLA, once, on first use; the reason it failed, if it did."""
    if not _registration_outcome:
        with _registration:
            if not _registration_outcome:
                _registration_outcome.append(_register_handlers())
    return _registration_outcome[0]


def _jaxlib_ffi_api_version() -> tuple[int, int] | None:
    """The XLA FFI API version of the running jaxlib, as the ``c_api.h`` it ships states it;
    ``None`` when that header is not there."""
    ffi: Any = jax.ffi
    header = Path(ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    try:
        text = header.read_text()
    except OSError:
        return None
    found = dict(re.findall(r"^#define XLA_FFI_API_(MAJOR|MINOR) (\d+)\b", text, re.M))
    if set(found) != {"MAJOR", "MINOR"}:
        return None
    return int(found["MAJOR"]), int(found["MINOR"])


def _api_version_problem(handlers: tuple[int, int], jaxlib: tuple[int, int] | None) -> str | None:
    """Why handlers written against the XLA FFI API version ``handlers`` cannot run on a jaxlib
    of version ``jaxlib``: another major version (another ABI), or a newer minor one (whose
    additions that jaxlib does not fill in). ``None`` when they can, or when the jaxlib's version
    is unknown: XLA checks the version again when it registers the handlers."""
    if jaxlib is None or (handlers[0] == jaxlib[0] and handlers[1] <= jaxlib[1]):
        return None
    return (
        f"the handlers need the XLA FFI API {handlers[0]}.{handlers[1]}, the running jaxlib has "
        f"{jaxlib[0]}.{jaxlib[1]}"
    )


def _register_handlers() -> str | None:
    try:
        ffi: Any = jax.ffi  # public since jax 0.4.38
        handlers, api_version = _l1l2_rs.xla_ffi_handlers()
        problem = _api_version_problem(api_version, _jaxlib_ffi_api_version())
        if problem is not None:
            return problem
        for name, capsule in handlers.items():
            ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as error:  # an older jax or jaxlib: reported, never a crash
        return f"{type(error).__name__}: {error}"
    return None


def _register_native() -> None:
    problem = _native_unavailable()
    if problem is not None:
        raise RuntimeError(
            f"l1l2_rs.jax: the native implementation could not be registered with XLA ({problem})"
        )


def _native_call(target: str, results: Any, l1: float, l2: float, leaves: list[Array]) -> Any:
    _register_native()
    # expand_dims: under vmap every result gets the batch dimensions in front, and every operand
    # too (1 where it is not batched); the handler reads the penalty result's rank as the number
    # of batch dimensions and reads an unbatched operand in place for every batch element.
    ffi: Any = jax.ffi
    call = ffi.ffi_call(target, results, vmap_method="expand_dims")
    return call(*leaves, l1=np.float64(l1), l2=np.float64(l2))


def _native_value(l1: float, l2: float, leaves: list[Array]) -> Array:
    result = _ShapeDtypeStruct((), _result_dtype(leaves))
    return _native_call(_PENALTY_TARGET, result, l1, l2, leaves)


def _tangent(leaves: list[Array], grads: list[Array], tangents: list[Array], dtype: Any) -> Array:
    """The penalty's tangent, ``sum(grad * dx)`` over the leaves, in the compute dtype. Linear in
    the tangents: reverse mode transposes it into ``cotangent * grad`` per leaf, multiplied in the
    compute dtype and rounded once to the leaf's dtype."""
    total = jnp.zeros((), dtype)
    for x, grad, dx in zip(leaves, grads, tangents, strict=True):
        wide = _compute_dtype(x)
        total = total + jnp.sum(grad.astype(wide) * dx.astype(wide)).astype(dtype)
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _native_value_and_grads(l1: float, l2: float, leaves: list[Array]) -> tuple[Array, list[Array]]:
    results = [_ShapeDtypeStruct((), _result_dtype(leaves))]
    results += [_ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    value, *grads = _native_call(_VALUE_AND_GRAD_TARGET, results, l1, l2, leaves)
    # In the compute dtype, as the jnp implementation's (both feed the same tangent formula).
    return value, [g.astype(_compute_dtype(x)) for x, g in zip(leaves, grads, strict=True)]


@_native_value_and_grads.defjvp
def _native_value_and_grads_jvp(
    l1: float, l2: float, primals: tuple[list[Array]], tangents: tuple[list[Array]]
) -> tuple[tuple[Array, list[Array]], tuple[Array, list[Array]]]:
    """Second derivatives through the native call: the gradient's derivative is ``2 * l2``
    (``sign`` is flat away from 0, and taken as flat at 0)."""
    (leaves,), (leaf_tangents,) = primals, tangents
    value, grads = _native_value_and_grads(l1, l2, leaves)
    grad_tangents = [
        (2 * l2) * dx.astype(grad.dtype) if l2 else jnp.zeros_like(grad)
        for grad, dx in zip(grads, leaf_tangents, strict=True)
    ]
    return (value, grads), (_tangent(leaves, grads, leaf_tangents, value.dtype), grad_tangents)


def _warn_once(problem: str | None) -> None:
    if not _warned:
        _warned.append(True)
        warnings.warn(
            f"l1l2_rs.jax: the native implementation is unavailable ({problem}); using jnp",
            RuntimeWarning,
            stacklevel=4,
        )


_warned: list[bool] = []


def _choose(
    implementation: str,
    leaves: list[Array],
    native: Callable[..., Any],
    portable: Callable[..., Any],
) -> Any:
    """Runs ``native`` or ``portable`` (jnp) on the leaves, as ``implementation`` asks; "auto"
    takes the native one on CPU (it is faster at every size measured: benches/jax_step.py), and
    jnp on other platforms or when the handlers cannot be registered (a warning says why)."""
    if not leaves or implementation == "jnp":
        return portable(*leaves)
    if implementation == "auto" and _native_unavailable() is not None:
        _warn_once(_native_unavailable())
        return portable(*leaves)
    if implementation == "native":
        return native(*leaves)
    return jax.lax.platform_dependent(*leaves, cpu=native, default=portable)


# ---------------------------------------------------------------------------------------------
# The penalty: one differentiable function over the leaves, for either implementation


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _penalty_of_leaves(l1: float, l2: float, implementation: str, leaves: list[Array]) -> Array:
    return _choose(
        implementation,
        leaves,
        lambda *xs: _native_value(l1, l2, list(xs)),
        lambda *xs: _jnp_value(l1, l2, list(xs)),
    )


@_penalty_of_leaves.defjvp
def _penalty_jvp(
    l1: float,
    l2: float,
    implementation: str,
    primals: tuple[list[Array]],
    tangents: tuple[list[Array]],
) -> tuple[Array, Array]:
    (leaves,), (leaf_tangents,) = primals, tangents
    value, grads = _choose(
        implementation,
        leaves,
        lambda *xs: _native_value_and_grads(l1, l2, list(xs)),
        lambda *xs: _jnp_value_and_grads(l1, l2, list(xs)),
    )
    return value, _tangent(leaves, grads, leaf_tangents, value.dtype)


def penalty(params: Any, l1: Any = 0.0, l2: Any = 0.0, *, implementation: str = "auto") -> Array:
    """Keras' ``L1L2(l1, l2)`` penalty of an array or of every leaf of a pytree, differentiable.

    ``l1 * sum(|x|) + l2 * sum(x**2)`` summed over the leaves; a factor of exactly zero drops its
    term (as Keras' ``L1L2``: NaN or inf in ``x`` cannot leak through a disabled term). Works under
    ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``, ``jax.jvp`` and ``jax.vmap``.

    **Gradient.** ``l1 * sign(x) + 2 * l2 * x`` with ``sign(0) = 0``: the gradient at exactly 0 is
    0, as in PyTorch, TensorFlow and ``l1l2_rs.grad``. (JAX's own ``jax.grad(jnp.abs)(0.0)`` is 1,
    so ``jax.grad`` of the plain formula ``l1 * jnp.abs(x).sum()`` gives ``l1`` at 0; this function
    gives 0, a subgradient that keeps exact zeros where they are.)

    **Dtypes.** Leaves must be float16, bfloat16, float32 or float64 (anything else: ``TypeError``
    naming the leaf). The result is a float32 scalar, or float64 when a leaf is float64
    (``jax_enable_x64``); gradients have their leaf's dtype.

    **Implementations.** ``implementation="native"`` runs the l1l2-rs core through an XLA FFI
    custom call (CPU only): the whole pytree in one call, the value and all gradients in one pass
    over the weights. Each leaf's penalty is summed in float64 and rounded once to float32
    (float64 leaves: kept in float64); the leaf penalties are added in float64 and the total
    rounded once. Gradients are correctly rounded (they have ``l1l2_rs.grad``'s bits).
    ``"jnp"`` uses XLA's own ops: each leaf is summed in float32 (float16 and bfloat16 leaves are
    widened to float32 first, so float16 squares do not overflow; the squares of bfloat16 values
    beyond 1.8e19 do, as float32's) or float64, and the leaf penalties are added in the result
    dtype. ``"auto"`` (the default) is the native call on CPU and jnp elsewhere
    (``jax.lax.platform_dependent``).
    Under ``jax.vmap`` the native call batches itself (``vmap_method="expand_dims"``: one call for
    the whole batch; leaves that are not batched are not copied). Reverse mode multiplies the
    gradient by the cotangent with a jnp multiply, which XLA removes when the cotangent is 1
    (``jax.grad`` of the penalty itself, or of ``loss + penalty``).

    ``l1`` and ``l2`` must be concrete, finite numbers >= 0 (they are static: changing them
    recompiles a jitted caller).
    """
    l1f, l2f = _static_factor("l1", l1), _static_factor("l2", l2)
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"l1l2_rs.jax.penalty: implementation must be one of {_IMPLEMENTATIONS}, "
            f"got {implementation!r}"
        )
    leaves, _ = _leaves(params, "penalty")
    return _penalty_of_leaves(l1f, l2f, implementation, leaves)


# ---------------------------------------------------------------------------------------------
# The proximal step


def _prox_leaf(x: Array, lr: Array, l1: float, l2: float) -> Array:
    wide = x.astype(_compute_dtype(x))
    if l1:
        wide = jnp.sign(wide) * jnp.maximum(jnp.abs(wide) - lr * l1, 0)
    if l2:
        wide = wide / (1 + 2 * lr * l2)
    return wide.astype(x.dtype)


def prox(params: Any, lr: Any, l1: Any = 0.0, l2: Any = 0.0) -> Any:
    """The proximal step of ``lr * L1L2(l1, l2)`` on an array or every leaf of a pytree.

    ``sign(x) * max(|x| - lr * l1, 0) / (1 + 2 * lr * l2)``: soft-thresholding, then shrinkage
    (the same as ``l1l2_rs.prox_``, but functional: it returns new arrays). float16 and bfloat16
    leaves are computed in float32 and rounded once. Jit-able; ``lr`` may be traced (a schedule),
    and when concrete must be finite and >= 0.
    """
    l1f, l2f = _static_factor("l1", l1), _static_factor("l2", l2)
    if not isinstance(lr, jax.core.Tracer):
        lr = _factor("lr", np.asarray(lr) if isinstance(lr, jax.Array) else lr, 0.0)
    leaves, treedef = _leaves(params, "prox")
    return jax.tree_util.tree_unflatten(treedef, [_prox_leaf(x, lr, l1f, l2f) for x in leaves])


# ---------------------------------------------------------------------------------------------
# optax-style transformations


class GradientTransformation(NamedTuple):
    """optax's ``GradientTransformation`` shape, used when optax is not installed."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class AddL1L2GradsState(NamedTuple):
    """``add_l1l2_grads`` keeps no state."""


class ApplyL1L2ProxState(NamedTuple):
    """The step count, for a learning-rate schedule."""

    count: Array


def _transformation(init: Callable[[Any], Any], update: Callable[..., Any]) -> Any:
    try:
        optax = importlib.import_module("optax")
    except ImportError:
        return GradientTransformation(init, update)
    return optax.GradientTransformation(init, update)


def _need_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"l1l2_rs.jax.{name} needs the parameters: call update(updates, state, params)"
        )


def add_l1l2_grads(l1: Any = 0.0, l2: Any = 0.0) -> Any:
    """An optax transformation adding the gradient of ``penalty(params, l1, l2)`` to the updates.

    Put it before the optimizer, e.g. ``optax.chain(add_l1l2_grads(1e-5, 1e-4), optax.sgd(0.1))``
    (coupled weight decay: the penalty's gradient goes through the optimizer like the loss's).
    The gradient is 0 where a parameter is exactly 0. ``update`` needs ``params``.
    """
    l1f, l2f = _static_factor("l1", l1), _static_factor("l2", l2)

    def init(params: Any) -> AddL1L2GradsState:
        del params
        return AddL1L2GradsState()

    def update(
        updates: Any, state: AddL1L2GradsState, params: Any = None
    ) -> tuple[Any, AddL1L2GradsState]:
        _need_params("add_l1l2_grads", params)
        grads = jax.grad(penalty)(params, l1f, l2f)
        updates = jax.tree.map(lambda u, g: u + g.astype(u.dtype), updates, grads)
        return updates, state

    return _transformation(init, update)


def apply_l1l2_prox(learning_rate: Any, l1: Any = 0.0, l2: Any = 0.0) -> Any:
    """An optax transformation making the step a proximal one: put it after the optimizer.

    ``optax.chain(optax.sgd(lr), apply_l1l2_prox(lr, l1, l2))`` trains like
    ``params = prox(params - lr * grads, lr, l1, l2)`` (proximal SGD, exact zeros for small
    weights). The prox step needs the parameters, and an optax transformation returns updates, so
    ``update`` computes the new parameters ``prox(params + updates)`` and returns
    ``new_params - params``: ``optax.apply_updates`` then adds it back. That round trip rounds
    once at the parameters' magnitude (exact zeros stay exact: ``p + (0 - p) == 0``).

    ``learning_rate`` is the optimizer's: a number, or a schedule ``count -> lr`` (called with the
    step count, as optax's schedules are). ``update`` needs ``params``.
    """
    l1f, l2f = _static_factor("l1", l1), _static_factor("l2", l2)
    if not callable(learning_rate):
        learning_rate = _factor("learning_rate", learning_rate, 0.0)

    def init(params: Any) -> ApplyL1L2ProxState:
        del params
        return ApplyL1L2ProxState(count=jnp.zeros((), jnp.int32))

    def update(
        updates: Any, state: ApplyL1L2ProxState, params: Any = None
    ) -> tuple[Any, ApplyL1L2ProxState]:
        _need_params("apply_l1l2_prox", params)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        stepped = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        new_params = prox(stepped, lr, l1f, l2f)
        updates = jax.tree.map(lambda n, p: n - p, new_params, params)
        return updates, ApplyL1L2ProxState(count=state.count + 1)

    return _transformation(init, update)
