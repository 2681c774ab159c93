"""Never silently wrong: a penalty of a tracked tensor has its gradient, or is refused.

l1l2_rs computes with numpy. A penalty that converted a tracked tensor would enter the loss as a
constant and the weights would train exactly as if there were no regularizer. So the regularizer
call and ``penalty`` compute a symbolic or taped TensorFlow tensor with tf ops (value and gradient
checked here against float64 references); a torch tensor that requires grad or a JAX tracer met
outside Keras is refused, naming the framework adapter; every numpy-only function (sums,
gradients, the ``_many`` forms) refuses all of them. Keras training on every backend is in
test_keras_training.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import l1l2_rs

REFUSED = r"(?i)gradient"


def differentiable_entry_points() -> dict[str, Callable[[Any], Any]]:
    """The penalty's entry points: differentiable for TF tensors and inside Keras."""
    return {
        "penalty": lambda t: l1l2_rs.penalty(t, 0.1, 0.2),
        "L1L2()": lambda t: l1l2_rs.L1L2(0.1, 0.2)(t),
        "L1()": lambda t: l1l2_rs.L1(0.1)(t),
    }


def numpy_only_entry_points() -> dict[str, Callable[[Any], Any]]:
    """Every other public way of handing a tensor to l1l2_rs: numpy results only."""
    return {
        "sums": lambda t: l1l2_rs.sums(t),
        "value_and_grad": lambda t: l1l2_rs.value_and_grad(t, 0.1, 0.2),
        "grad": lambda t: l1l2_rs.grad(t, 0.1, 0.2),
        "L2.grad": lambda t: l1l2_rs.L2(0.1).grad(t),
        "sums_many": lambda t: l1l2_rs.sums_many([np.ones(2), t]),
        "penalty_many": lambda t: l1l2_rs.penalty_many([t], 0.1, 0.2),
        "value_and_grad_many": lambda t: l1l2_rs.value_and_grad_many([t], 0.1, 0.2),
    }


def entry_points() -> dict[str, Callable[[Any], Any]]:
    return {**differentiable_entry_points(), **numpy_only_entry_points()}


VALUES = np.linspace(-2.0, 3.0, 37, dtype=np.float32)


def assert_refused(tensor: Any, entry: dict[str, Callable[[Any], Any]], match: str) -> None:
    for name, function in entry.items():
        with pytest.raises(TypeError, match=match):
            function(tensor)
        assert name


def assert_refused_everywhere(tensor: Any, adapter: str) -> None:
    assert_refused(tensor, entry_points(), rf"(?is)gradient.*{re.escape(adapter)}")


def assert_same_as_numpy(tensor: Any) -> None:
    assert float(l1l2_rs.penalty(tensor, 0.1, 0.2)) == float(l1l2_rs.penalty(VALUES, 0.1, 0.2))
    got = l1l2_rs.grad(tensor, 0.1, 0.2)
    assert got.tobytes() == l1l2_rs.grad(VALUES, 0.1, 0.2).tobytes()


# ---------------------------------------------------------------------------------------------
# PyTorch


def test_torch_tensor_that_requires_grad_is_refused() -> None:
    import torch

    # Outside Keras: the PyTorch adapter, not a guessed formula, is the way to a gradient.
    parameter = torch.nn.Parameter(torch.tensor(VALUES))
    assert_refused_everywhere(parameter, "l1l2_rs.torch")
    assert_refused_everywhere(torch.tensor(VALUES, requires_grad=True) * 2, "l1l2_rs.torch")
    with pytest.raises(TypeError):
        l1l2_rs.prox_(parameter, 0.1, 0.1, 0.1)


def test_torch_tensors_outside_autograd_still_work() -> None:
    import torch

    assert_same_as_numpy(torch.tensor(VALUES))
    parameter = torch.nn.Parameter(torch.tensor(VALUES))
    with torch.no_grad():  # nothing records: the value is read without its (unused) graph
        assert_same_as_numpy(parameter)
    assert_same_as_numpy(parameter.detach())


# ---------------------------------------------------------------------------------------------
# TensorFlow: the penalty is differentiable with tf ops; numpy-only functions refuse.

#: (entry point, l1, l2) of the differentiable entry points, for the float64 references.
FACTORS = {"penalty": (0.1, 0.2), "L1L2()": (0.1, 0.2), "L1()": (0.1, 0.0)}


def reference_value_and_grad(x: np.ndarray, l1: float, l2: float) -> tuple[float, np.ndarray]:
    """The penalty and its gradient in float64 from the formula (d|x|/dx = sign(x), 0 at 0)."""
    wide = x.astype(np.float64)
    value = math.fsum((l1 * np.abs(wide) + l2 * wide * wide).tolist())
    return value, l1 * np.sign(wide) + 2.0 * l2 * wide


def assert_value_and_gradient(name: str, value: Any, gradient: Any) -> None:
    l1, l2 = FACTORS[name]
    expected_value, expected_gradient = reference_value_and_grad(VALUES, l1, l2)
    assert value.dtype.name == "float32"
    assert float(value) == pytest.approx(expected_value, rel=8 * EPS32)
    np.testing.assert_allclose(np.asarray(gradient), expected_gradient, rtol=2 * EPS32, atol=0)


EPS32 = float(np.finfo(np.float32).eps)


def test_symbolic_tensorflow_tensors_are_differentiable() -> None:
    import tensorflow as tf

    for name, function in differentiable_entry_points().items():

        @tf.function
        def traced(t: Any, function: Callable[[Any], Any] = function) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(t)
                value = function(t)
            return value, tape.gradient(value, t)

        value, gradient = traced(tf.constant(VALUES))
        assert_value_and_gradient(name, value, gradient)


def test_symbolic_tensorflow_tensors_are_refused_by_numpy_only_functions() -> None:
    import tensorflow as tf

    for name, function in numpy_only_entry_points().items():

        @tf.function
        def traced(t: Any, function: Callable[[Any], Any] = function) -> Any:
            function(t)
            return t

        with pytest.raises(TypeError, match=REFUSED):
            traced(tf.constant(VALUES))
        assert name


def test_tensorflow_tensors_while_a_tape_records() -> None:
    import tensorflow as tf

    variable = tf.Variable(VALUES)
    constant = tf.constant(VALUES)
    for name, function in differentiable_entry_points().items():
        for source in (variable, constant):
            with tf.GradientTape() as tape:
                tape.watch(source)
                value = function(source)
            assert_value_and_gradient(name, value, tape.gradient(value, source))
    with tf.GradientTape() as tape:
        tape.watch(constant)
        assert_refused(variable, numpy_only_entry_points(), REFUSED)
        assert_refused(constant, numpy_only_entry_points(), REFUSED)
    assert tape is not None


def test_tensorflow_narrow_and_integer_tensors_keep_the_native_semantics() -> None:
    import tensorflow as tf

    # float16: summed in float32, so 100 * 60000**2 does not overflow (Keras' own gives inf).
    big = np.full(100, 60000.0, dtype=np.float16)
    source = tf.constant(big)
    with tf.GradientTape() as tape:
        tape.watch(source)
        value = l1l2_rs.L2(1e-8)(source)
    gradient = tape.gradient(value, source)
    assert value.dtype == tf.float16 and math.isfinite(float(value))
    assert float(value) == pytest.approx(3600.0, rel=2**-10)
    assert gradient.dtype == tf.float16
    assert np.all(np.asarray(gradient, dtype=np.float64) == pytest.approx(2e-8 * 60000, rel=2**-10))
    # Integers: a float64 penalty (Keras' own truncates the factor to an int 0).
    with tf.GradientTape():
        whole = l1l2_rs.L1(0.01)(tf.constant(np.arange(-5, 5, dtype=np.int32)))
    assert whole.dtype == tf.float64 and float(whole) == pytest.approx(0.25, rel=1e-15)
    # Zero factors: L1L2 drops the term; L1(0) keeps it, so NaN shows.
    nan = tf.constant(np.array([1.0, np.nan], dtype=np.float32))
    with tf.GradientTape():
        assert float(l1l2_rs.L1L2(0.0, 0.0)(nan)) == 0.0
        assert math.isnan(float(l1l2_rs.L1(0.0)(nan)))


def test_eager_tensorflow_tensors_without_a_tape_still_work() -> None:
    import tensorflow as tf

    assert_same_as_numpy(tf.constant(VALUES))
    assert_same_as_numpy(tf.Variable(VALUES))


# ---------------------------------------------------------------------------------------------
# JAX: tracers outside Keras are refused, naming the adapter; concrete arrays still work.


def test_jax_tracers_outside_keras_are_refused() -> None:
    import jax

    for name, function in entry_points().items():
        with pytest.raises(TypeError, match=r"(?s)gradient.*l1l2_rs\.jax"):
            jax.jit(function)(VALUES)
        assert name
    with pytest.raises(TypeError, match=r"l1l2_rs\.jax"):
        jax.grad(lambda w: l1l2_rs.L1L2(0.1, 0.1)(w))(VALUES)


def test_concrete_jax_arrays_still_work() -> None:
    import jax.numpy as jnp

    assert_same_as_numpy(jnp.asarray(VALUES))
