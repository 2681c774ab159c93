"""Which path a penalty takes, and the differentiable penalty for Keras and TensorFlow tensors.

A regularizer call first hands ``x`` to the native kernel, unchanged: numpy arrays are read in
place and nothing below runs. Only when the kernel cannot read ``x`` does ``route(x)`` decide:

``None``
    a concrete value (a list, an eager TensorFlow tensor with no tape recording, a torch tensor
    that does not require grad, a concrete JAX array, a Keras variable holding one): it is
    converted to numpy and the native kernel computes the penalty.
``"keras"``
    a Keras 3 variable, or a torch tensor / JAX tracer met while Keras is running (inside a
    layer call, or in Keras' stateless or symbolic scope: the JAX trainer's traced step, model
    building), whose gradient Keras needs: ``keras_penalty`` computes it with ``keras.ops``, which
    every backend traces and differentiates.
``"tensorflow"``
    a symbolic TensorFlow tensor, any TensorFlow object inside a ``tf.function`` or while a
    ``GradientTape`` records, and tf-keras' variables in those contexts: ``tensorflow_penalty``
    computes it with ``tf`` ops (tf-keras, and plain TensorFlow training loops).

A torch tensor that requires grad, or a JAX tracer, met outside Keras is refused with a
``TypeError`` that names the framework adapter (``l1l2_rs.torch``, ``l1l2_rs.jax``): converting
it would drop its gradient without a word, and guessing a framework formula for a tensor Keras
did not hand over would hide that the caller wanted the adapter.

Both formulas keep the native semantics: ``None`` factors leave a term out, a present term with
factor 0 still evaluates its sum (NaN shows), float16 and bfloat16 are summed in float32 so their
squares do not overflow, the sums are combined with the exact double factors in float64 (where
the backend has float64: JAX only with ``jax_enable_x64``), and the result is cast to ``x``'s
float dtype (float64 for integer and bool input). The gradient of ``|x|`` at 0 is 0 on every
backend, as in the native training ops (JAX's own ``abs`` has gradient 1 at 0, and so Keras' own
``L1`` on the JAX backend).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

Route = str | None

_NARROW_FLOATS = ("float16", "bfloat16")

_NO_ADAPTER = (
    "l1l2_rs computes with numpy and cannot carry gradients back to {framework} outside Keras; "
    "converting it would drop the gradient silently. Use the {framework} adapter {adapter} for a "
    "differentiable penalty, or pass a detached value ({detach})."
)
_NO_GRADIENT = (
    "This l1l2_rs function computes with numpy and cannot carry gradients back to {framework}; "
    "converting it would drop the gradient silently. Only a regularizer call and "
    "l1l2_rs.penalty are differentiable here; or pass a detached value ({detach})."
)


def _framework(x: object) -> str:
    return (type(x).__module__ or "").split(".", 1)[0]


def route(x: object) -> Route:
    """The path of a penalty of ``x`` the native kernel cannot read; see the module docstring.

    Raises ``TypeError`` for a torch tensor that requires grad, or a JAX tracer, outside Keras.
    """
    framework = _framework(x)
    if framework == "torch":
        tracked = _torch_tracked(x)
        if not tracked and _on_cpu(x):
            return None
        if _keras_running("torch"):
            return "keras"
        if not tracked:
            return None  # an accelerator's tensor: numpy's conversion says why it cannot read it
        raise TypeError(
            "l1l2_rs: got a torch tensor that requires grad. "
            + _NO_ADAPTER.format(framework="PyTorch", adapter="l1l2_rs.torch", detach="x.detach()")
        )
    if framework in ("jax", "jaxlib"):
        if not _is_jax_tracer(x):
            return None
        if _keras_running("jax"):
            return "keras"
        raise TypeError(
            "l1l2_rs: got a JAX tracer (inside jax.jit, jax.grad or jax.vmap). "
            + _NO_ADAPTER.format(
                framework="JAX", adapter="l1l2_rs.jax", detach="a concrete array outside the trace"
            )
        )
    if framework in ("tensorflow", "tf_keras"):
        return "tensorflow" if _tensorflow_tracked(x) else None
    if framework == "keras" and hasattr(x, "value") and hasattr(x, "trainable"):
        return _keras_variable_route(x)
    return None


def _keras_variable_route(variable: Any) -> Route:
    """A Keras 3 variable: what it holds decides (a torch parameter, a tracer, a TF variable)."""
    value = variable.value
    if value is None or value is variable:  # a symbolic scope's placeholder
        return "keras"
    if _framework(value) in ("torch", "jax", "jaxlib"):
        return "keras" if route_inside_keras(value) else None
    return "keras" if route(value) is not None else None


def route_inside_keras(x: object) -> bool:
    """Whether a torch tensor or JAX array a Keras variable holds needs the differentiable path."""
    if _framework(x) == "torch":
        return _torch_tracked(x) or not _on_cpu(x)
    return _is_jax_tracer(x)


def refusal(x: object) -> str:
    """The message of the ``TypeError`` for a tracked ``x`` given to a numpy-only operation."""
    framework = _framework(x)
    names = {
        "torch": ("PyTorch", "x.detach()"),
        "jax": ("JAX", "a concrete array outside the trace"),
        "jaxlib": ("JAX", "a concrete array outside the trace"),
        "tensorflow": ("TensorFlow", "tf.stop_gradient(x).numpy() outside tf.function"),
        "tf_keras": ("TensorFlow", "tf.stop_gradient(x).numpy() outside tf.function"),
    }
    name, detach = names.get(framework, ("Keras", "keras.ops.stop_gradient outside training"))
    return f"l1l2_rs: got a {type(x).__name__} that carries autograd state. " + (
        _NO_GRADIENT.format(framework=name, detach=detach)
    )


def _torch_tracked(x: Any) -> bool:
    """A tensor autograd records: it requires grad while grad mode is on."""
    return bool(getattr(x, "requires_grad", False)) and sys.modules["torch"].is_grad_enabled()


def _on_cpu(x: Any) -> bool:
    """Not a meta tensor (Keras' shape inference on torch) nor an accelerator's."""
    device = getattr(x, "device", None)
    return device is None or device.type == "cpu"


def _is_jax_tracer(x: object) -> bool:
    return any(
        cls.__name__ == "Tracer" and cls.__module__.startswith("jax") for cls in type(x).__mro__
    )


def _keras_running(backend: str) -> bool:
    """Whether Keras 3 runs on ``backend`` and is inside a layer call or a stateless or symbolic
    scope (its training step, its shape inference). Read from Keras' state; never imports it."""
    keras_backend = sys.modules.get("keras.src.backend")
    if keras_backend is None or keras_backend.backend() != backend:
        return False
    global_state = sys.modules.get("keras.src.backend.common.global_state")
    if global_state is not None and global_state.get_global_attribute("current_call_ctx"):
        return True
    symbolic = sys.modules.get("keras.src.backend.common.symbolic_scope")
    in_symbolic = getattr(symbolic, "in_symbolic_scope", None)
    return bool(keras_backend.in_stateless_scope() or (in_symbolic and in_symbolic()))


def _tensorflow_tracked(x: object) -> bool:
    """A symbolic tensor, inside a ``tf.function``, or while a ``GradientTape`` records."""
    tf = sys.modules.get("tensorflow")
    if not hasattr(x, "numpy") or (tf is not None and not tf.executing_eagerly()):
        return True
    return tensorflow_recording()


def tensorflow_recording() -> bool:
    """Whether a TensorFlow GradientTape is recording on this thread (without importing TF)."""
    eager = sys.modules.get("tensorflow.python.pywrap_tfe")
    tape_set_is_empty = getattr(eager, "TFE_Py_TapeSetIsEmpty", None)
    return tape_set_is_empty is not None and not tape_set_is_empty()


# ---------------------------------------------------------------------------------------------
# The differentiable formulas.


def differentiable_penalty(path: str, x: Any, l1: float | None, l2: float | None) -> Any:
    """The penalty of ``x`` on ``path`` (``"keras"`` or ``"tensorflow"``), as a backend tensor."""
    if path == "keras":
        return keras_penalty(x, l1, l2)
    return tensorflow_penalty(x, l1, l2)


def keras_penalty(x: Any, l1: float | None, l2: float | None) -> Any:
    """``l1 * sum(|x|) + l2 * sum(x**2)`` with ``keras.ops``: traceable and differentiable."""
    keras = sys.modules["keras"]
    ops = keras.ops
    dtype = keras.backend.standardize_dtype(x.dtype)
    wide = "float64" if _keras_has_float64(keras) else "float32"
    is_float = keras.backend.is_float_dtype(dtype)
    result_dtype = dtype if is_float else wide
    compute_dtype = "float32" if dtype in _NARROW_FLOATS else result_dtype
    values = x if dtype == compute_dtype else ops.cast(x, compute_dtype)
    total: Any = None
    if l1 is not None:
        total = ops.cast(ops.sum(_absolute(keras, values)), wide) * l1
    if l2 is not None:
        term = ops.cast(ops.sum(ops.square(values)), wide) * l2
        total = term if total is None else total + term
    if total is None:
        return ops.zeros((), dtype=result_dtype)
    return ops.cast(total, result_dtype)


def _absolute(keras: Any, values: Any) -> Any:
    """``|x|`` whose gradient is 0 at 0. torch's and TensorFlow's ``abs`` have that gradient;
    JAX's has 1 at 0, so on JAX ``abs`` gets the rule through a ``custom_jvp`` (as cheap as
    ``abs``: ``x * sign(x)`` costs about 1.6x in a jitted value_and_grad at 1e7 elements)."""
    if keras.backend.backend() == "jax":
        return _jax_absolute()(keras.ops.convert_to_tensor(values))
    return keras.ops.abs(values)


@functools.cache
def _jax_absolute() -> Any:
    jax = sys.modules["jax"]
    jnp = jax.numpy

    def absolute(x: Any) -> Any:
        return jnp.abs(x)

    def absolute_jvp(primals: tuple[Any], tangents: tuple[Any]) -> tuple[Any, Any]:
        (x,), (tangent,) = primals, tangents
        return jnp.abs(x), jnp.sign(x) * tangent

    differentiable: Any = jax.custom_jvp(absolute)
    differentiable.defjvp(absolute_jvp)
    return differentiable


def _keras_has_float64(keras: Any) -> bool:
    if keras.backend.backend() != "jax":
        return True
    return bool(sys.modules["jax"].config.read("jax_enable_x64"))


def tensorflow_penalty(x: Any, l1: float | None, l2: float | None) -> Any:
    """``l1 * sum(|x|) + l2 * sum(x**2)`` with ``tf`` ops: for tf-keras and TF training loops."""
    tf = sys.modules["tensorflow"]
    dtype = tf.as_dtype(x.dtype)
    result_dtype = dtype if dtype.is_floating else tf.float64
    compute_dtype = tf.float32 if dtype in (tf.float16, tf.bfloat16) else result_dtype
    values = x if dtype == compute_dtype else tf.cast(x, compute_dtype)
    total: Any = None
    if l1 is not None:
        total = tf.cast(tf.reduce_sum(tf.abs(values)), tf.float64) * l1
    if l2 is not None:
        term = tf.cast(tf.reduce_sum(tf.square(values)), tf.float64) * l2
        total = term if total is None else total + term
    if total is None:
        return tf.zeros((), dtype=result_dtype)
    return tf.cast(total, result_dtype)


# ---------------------------------------------------------------------------------------------
# The differentiable orthogonality penalty (``OrthogonalRegularizer``).
#
# The native semantics again: every row (column) scaled to unit L2 norm, an all-zero one staying
# zero (a safe ``rsqrt``: the gradient is 0 there, not NaN); the mean over the pairs of distinct
# rows (columns) of their absolute dot product, 0 when there is no pair; float16 and bfloat16
# computed in float32; the result in ``x``'s float dtype (float64 for integer and bool input).
# Computed in the input's float type, as the frameworks compute a matrix product; the native
# float64 result can differ in its last bits, and for rows whose squares underflow the float type.


def differentiable_orthogonal_penalty(path: str, x: Any, factor: float, rows: bool) -> Any:
    """The orthogonality penalty of the matrix ``x`` on ``path`` (``"keras"`` or
    ``"tensorflow"``), as a backend tensor."""
    if path == "keras":
        return keras_orthogonal_penalty(x, factor, rows)
    return tensorflow_orthogonal_penalty(x, factor, rows)


def keras_orthogonal_penalty(x: Any, factor: float, rows: bool) -> Any:
    """The orthogonality penalty with ``keras.ops``: traceable and differentiable."""
    keras = sys.modules["keras"]
    ops = keras.ops
    dtype = keras.backend.standardize_dtype(x.dtype)
    wide = "float64" if _keras_has_float64(keras) else "float32"
    result_dtype = dtype if keras.backend.is_float_dtype(dtype) else wide
    compute_dtype = "float32" if dtype in _NARROW_FLOATS else result_dtype
    values = x if dtype == compute_dtype else ops.cast(x, compute_dtype)
    vectors = values if rows else ops.transpose(values)
    squares = ops.sum(ops.square(vectors), axis=1, keepdims=True)
    nonzero = squares > 0
    inverse_norms = ops.where(nonzero, ops.rsqrt(ops.where(nonzero, squares, 1.0)), 0.0)
    units = vectors * ops.cast(inverse_norms, compute_dtype)
    count = ops.shape(vectors)[0]
    gram = ops.matmul(units, ops.transpose(units))
    off_diagonal = _absolute(keras, gram) * (1.0 - ops.eye(count, dtype=compute_dtype))
    total = ops.cast(ops.sum(off_diagonal), wide) * 0.5
    pairs = ops.cast(count, wide) * (ops.cast(count, wide) - 1.0) * 0.5
    mean = total / ops.maximum(pairs, 1.0)  # no pair: total is 0, and so the penalty
    return ops.cast(mean * factor, result_dtype)


def tensorflow_orthogonal_penalty(x: Any, factor: float, rows: bool) -> Any:
    """The orthogonality penalty with ``tf`` ops: for tf-keras and TF training loops."""
    tf = sys.modules["tensorflow"]
    dtype = tf.as_dtype(x.dtype)
    result_dtype = dtype if dtype.is_floating else tf.float64
    compute_dtype = tf.float32 if dtype in (tf.float16, tf.bfloat16) else result_dtype
    values = x if dtype == compute_dtype else tf.cast(x, compute_dtype)
    vectors = values if rows else tf.transpose(values)
    squares = tf.reduce_sum(tf.square(vectors), axis=1, keepdims=True)
    nonzero = squares > 0
    safe_squares = tf.where(nonzero, squares, tf.ones_like(squares))
    inverse_norms = tf.where(nonzero, tf.math.rsqrt(safe_squares), tf.zeros_like(squares))
    units = vectors * inverse_norms
    count = tf.shape(vectors)[0]
    gram = tf.linalg.matmul(units, units, transpose_b=True)
    off_diagonal = tf.abs(gram) * (1.0 - tf.eye(count, dtype=compute_dtype))
    total = tf.cast(tf.reduce_sum(off_diagonal), tf.float64) * 0.5
    count_wide = tf.cast(count, tf.float64)
    pairs = count_wide * (count_wide - 1.0) * 0.5
    mean = total / tf.maximum(pairs, 1.0)  # no pair: total is 0, and so the penalty
    return tf.cast(mean * factor, result_dtype)
