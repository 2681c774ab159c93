"""OrthogonalRegularizer: the native penalty against an independent float64 reference, against
Keras 3 and tf-keras where they are right, its edge cases, its API, and the differentiable path
for traced tensors.

TensorFlow and tf-keras are imported inside the tests that use them, not at collection: imported
before torch (which collecting test_torch.py imports), TensorFlow makes torch's import abort.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any

import keras  # the test extra installs Keras 3, tf-keras and TensorFlow: never skipped
import numpy as np
import pytest
from keras import regularizers as kr

import l1l2_rs
from conftest import assert_within_ulps, run_python

MODES = ("rows", "columns")


def reference(x: Any, factor: float, mode: str) -> float:
    """The penalty from its definition, one number at a time in float64 with exact sums: the
    rows (columns) scaled to unit norm (a zero one stays zero), then the mean over the pairs of
    distinct rows (columns) of |dot product|; 0 when there is no pair."""
    matrix = np.asarray(x, dtype=np.float64)
    vectors = matrix.tolist() if mode == "rows" else matrix.T.tolist()
    units = []
    for vector in vectors:
        norm = math.sqrt(math.fsum(value * value for value in vector))
        units.append([value / norm if norm else 0.0 for value in vector])
    count = len(units)
    if count < 2:
        return 0.0
    dots = [
        abs(math.fsum(a * b for a, b in zip(units[i], units[j], strict=True)))
        for i in range(count)
        for j in range(i + 1, count)
    ]
    return factor * math.fsum(dots) / (count * (count - 1) / 2)


def matrix(rows: int, columns: int, dtype: Any, seed: int = 0) -> Any:
    return np.random.default_rng(seed).standard_normal((rows, columns)).astype(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("columns", [1, 2, 3, 7, 17])
def test_matches_the_float64_reference(mode: str, dtype: Any, rows: int, columns: int) -> None:
    x = matrix(rows, columns, dtype, seed=rows * 100 + columns)
    got = l1l2_rs.OrthogonalRegularizer(0.3, mode)(x)
    assert got.dtype == np.dtype(dtype)
    expected = reference(x, 0.3, mode)
    if dtype == np.float32:
        assert_within_ulps(got, expected, dtype, 1)  # float64 inside, rounded once
    else:
        assert float(got) == pytest.approx(expected, rel=1e-13, abs=1e-16)


@pytest.mark.parametrize("mode", MODES)
def test_strided_views_and_integer_input(mode: str) -> None:
    base = matrix(9, 12, np.float64, seed=3)
    view = base[::-2, 1::3]
    assert float(l1l2_rs.OrthogonalRegularizer(0.2, mode)(view)) == pytest.approx(
        reference(view, 0.2, mode), rel=1e-13
    )
    integers = np.arange(-6, 6, dtype=np.int32).reshape(4, 3)
    got = l1l2_rs.OrthogonalRegularizer(0.2, mode)(integers)
    assert got.dtype == np.float64
    assert float(got) == pytest.approx(reference(integers, 0.2, mode), rel=1e-13)
    as_list = integers.tolist()
    assert float(l1l2_rs.OrthogonalRegularizer(0.2, mode)(as_list)) == float(got)


def test_a_large_matrix_gives_the_same_bits_for_any_thread_count() -> None:
    # 400 rows: 160 000 index pairs, several pieces of the parallel reduction.
    x = matrix(400, 24, np.float64, seed=9)
    expected = reference(x, 1.0, "rows")
    values = set()
    try:
        for threads in (1, 2, 3):
            l1l2_rs.set_num_threads(threads)
            values.add(float(l1l2_rs.OrthogonalRegularizer(1.0)(x)))
    finally:
        l1l2_rs.set_num_threads(0)
    assert len(values) == 1
    assert values.pop() == pytest.approx(expected, rel=1e-13)


def test_the_scale_of_a_row_does_not_matter() -> None:
    directions = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 1.0], [0.0, 2.0, -1.0]])
    expected = reference(directions, 1.0, "rows")
    for scale in (1e-300, 1e-160, 1.0, 1e160, 1e300):
        got = float(l1l2_rs.OrthogonalRegularizer(1.0)(directions * scale))
        assert got == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_mode_matches_keras_3_and_tf_keras(dtype: Any) -> None:
    import tensorflow as tf
    import tf_keras

    x = matrix(6, 4, dtype, seed=11)
    ours = float(l1l2_rs.OrthogonalRegularizer(0.05, "rows")(x))
    # Keras keeps the factor as a float32 tensor and computes in float32 for float32 input.
    assert float(np.asarray(kr.OrthogonalRegularizer(0.05, "rows")(x))) == pytest.approx(
        ours, rel=2e-6
    )
    theirs = tf_keras.regularizers.OrthogonalRegularizer(0.05, "rows")(tf.constant(x))
    assert float(theirs) == pytest.approx(ours, rel=2e-6)


@pytest.mark.parametrize("shape", [(6, 4), (4, 4), (3, 7)])
def test_columns_mode_matches_tf_keras_on_a_tensor(shape: tuple[int, int]) -> None:
    import tensorflow as tf
    import tf_keras

    x = matrix(*shape, np.float32, seed=12)
    ours = float(l1l2_rs.OrthogonalRegularizer(0.05, "columns")(x))
    theirs = tf_keras.regularizers.OrthogonalRegularizer(0.05, "columns")(tf.constant(x))
    assert float(theirs) == pytest.approx(ours, rel=2e-6)
    assert ours == pytest.approx(reference(x, 0.05, "columns"), rel=1e-6)


def test_deviation_keras_3_columns_mode_on_numpy_input() -> None:
    # Keras 3's numpy path normalises along the wrong axis in columns mode: it raises for a
    # non-square matrix and gives a wrong value for a square one. Ours follows the definition.
    square = matrix(3, 3, np.float64, seed=0)
    keras_value = float(np.asarray(kr.OrthogonalRegularizer(1.0, "columns")(square)))
    ours = float(l1l2_rs.OrthogonalRegularizer(1.0, "columns")(square))
    expected = reference(square, 1.0, "columns")
    assert ours == pytest.approx(expected, rel=1e-13)
    assert keras_value != pytest.approx(expected, rel=1e-3)
    tall = matrix(5, 3, np.float64, seed=1)
    with pytest.raises(ValueError):
        kr.OrthogonalRegularizer(1.0, "columns")(tall)
    assert float(l1l2_rs.OrthogonalRegularizer(1.0, "columns")(tall)) == pytest.approx(
        reference(tall, 1.0, "columns"), rel=1e-13
    )


@pytest.mark.parametrize("mode, shape", [("rows", (1, 5)), ("columns", (5, 1)), ("rows", (0, 3))])
def test_deviation_a_single_vector_has_no_pair_and_penalty_zero(
    mode: str, shape: tuple[int, int]
) -> None:
    x = np.ones(shape, dtype=np.float32)
    if shape[0]:
        with np.errstate(invalid="ignore", divide="ignore"):
            keras_value = float(np.asarray(kr.OrthogonalRegularizer(0.1, mode)(x)))
        assert math.isnan(keras_value)  # Keras: 0 / 0 pairs
    got = l1l2_rs.OrthogonalRegularizer(0.1, mode)(x)
    assert got.dtype == np.float32 and float(got) == 0.0


def test_zero_rows_add_nothing_but_count_in_the_pairs_as_in_keras() -> None:
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    ours = float(l1l2_rs.OrthogonalRegularizer(1.0, "rows")(x))
    # One non-zero pair among the 6: its |cos| / 6.
    cosine = abs(np.dot(x[1], x[2])) / (np.linalg.norm(x[1]) * np.linalg.norm(x[2]))
    assert ours == pytest.approx(cosine / 6, rel=1e-14)
    assert ours == pytest.approx(reference(x, 1.0, "rows"), rel=1e-14)
    assert float(np.asarray(kr.OrthogonalRegularizer(1.0, "rows")(x))) == pytest.approx(
        ours, rel=1e-6
    )
    assert float(l1l2_rs.OrthogonalRegularizer(1.0, "rows")(np.zeros((3, 4)))) == 0.0
    assert float(l1l2_rs.OrthogonalRegularizer(1.0, "rows")(np.zeros((3, 0)))) == 0.0
    # Many vectors of no element: no pair has a product to sum (this once walked all 10^10 pairs).
    assert float(l1l2_rs.OrthogonalRegularizer(1.0, "rows")(np.zeros((100_000, 0)))) == 0.0
    assert float(l1l2_rs.OrthogonalRegularizer(1.0, "columns")(np.zeros((0, 100_000)))) == 0.0


def test_nan_and_infinity_give_nan() -> None:
    for bad in (math.nan, math.inf):
        x = np.array([[1.0, bad], [2.0, 3.0], [0.5, -1.0]])
        for mode in MODES:
            assert math.isnan(float(l1l2_rs.OrthogonalRegularizer(1.0, mode)(x)))


@pytest.mark.parametrize("shape", [(), (3,), (2, 3, 4), (1, 1, 1, 1)])
def test_input_that_is_not_a_matrix_is_refused(shape: tuple[int, ...]) -> None:
    import tensorflow as tf

    x = np.ones(shape, dtype=np.float32)
    with pytest.raises(ValueError, match="rank 2"):
        kr.OrthogonalRegularizer()(x)
    with pytest.raises(ValueError, match=r"x must have rank 2"):
        l1l2_rs.OrthogonalRegularizer()(x)
    with tf.GradientTape():
        with pytest.raises(ValueError, match=r"rank 2.*x of shape"):
            l1l2_rs.OrthogonalRegularizer()(tf.ones(shape))


def test_bad_mode_and_factor_are_refused_as_keras_does() -> None:
    for bad in ("diagonal", "Rows", None, 0):
        with pytest.raises(ValueError, match="mode"):
            kr.OrthogonalRegularizer(0.1, bad)
        with pytest.raises(ValueError, match="mode"):
            l1l2_rs.OrthogonalRegularizer(0.1, bad)  # type: ignore[arg-type]
    for bad in (-1.0, math.nan, math.inf, "0.1"):
        with pytest.raises(ValueError, match="factor"):
            kr.OrthogonalRegularizer(bad)
        with pytest.raises(l1l2_rs.FactorError, match="factor"):
            l1l2_rs.OrthogonalRegularizer(bad)


def test_get_serialize_and_deserialize() -> None:
    ours = l1l2_rs.OrthogonalRegularizer(0.25, "columns")
    default = l1l2_rs.OrthogonalRegularizer()
    assert default.get_config() == {"factor": 0.01, "mode": "rows"}
    assert l1l2_rs.orthogonal_regularizer is l1l2_rs.OrthogonalRegularizer
    for name in ("orthogonal_regularizer", "OrthogonalRegularizer"):
        assert l1l2_rs.get(name) == default
        assert type(kr.get(name)).__name__ == "OrthogonalRegularizer"
    assert l1l2_rs.get(l1l2_rs.OrthogonalRegularizer) == default
    config = l1l2_rs.serialize(ours)
    keras_config = kr.serialize(kr.OrthogonalRegularizer(0.25, "columns"))
    assert config == keras_config  # 0.25 is exact in float32, Keras' storage
    assert l1l2_rs.deserialize(json.loads(json.dumps(config))) == ours
    assert l1l2_rs.deserialize(keras_config) == ours
    assert l1l2_rs.get(keras_config) == ours
    assert l1l2_rs.OrthogonalRegularizer.from_config(ours.get_config()) == ours
    loaded_by_keras = kr.deserialize(config)
    assert type(loaded_by_keras) is kr.OrthogonalRegularizer
    assert loaded_by_keras.get_config() == {"factor": 0.25, "mode": "columns"}
    assert l1l2_rs.serialize(ours, format="tf2") == {
        "class_name": "OrthogonalRegularizer",
        "config": {"factor": 0.25, "mode": "columns"},
    }
    assert repr(ours) == "OrthogonalRegularizer(factor=0.25, mode='columns')"
    assert ours == l1l2_rs.OrthogonalRegularizer(0.25, "columns") != default
    assert hash(ours) == hash(l1l2_rs.OrthogonalRegularizer(0.25, "columns"))


def test_registered_with_keras_and_tf_keras() -> None:
    import tf_keras

    key = "l1l2_rs>OrthogonalRegularizer"
    assert keras.saving.get_registered_object(key) is l1l2_rs.OrthogonalRegularizer
    assert tf_keras.utils.get_registered_object(key) is l1l2_rs.OrthogonalRegularizer
    layer = keras.layers.Dense(3, kernel_regularizer=l1l2_rs.OrthogonalRegularizer(0.5, "columns"))
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert rebuilt.kernel_regularizer == l1l2_rs.OrthogonalRegularizer(0.5, "columns")


# ----------------------------------------------------------------------------------------------
# Traced tensors: the same penalty, differentiable, in the framework's ops.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_under_a_gradient_tape_value_and_gradient_match_tf_keras(mode: str, dtype: Any) -> None:
    import tensorflow as tf
    import tf_keras

    x = tf.Variable(matrix(5, 4, np.float64, seed=21), dtype=dtype)
    with tf.GradientTape(persistent=True) as tape:
        ours = l1l2_rs.OrthogonalRegularizer(0.3, mode)(x)
        theirs = tf_keras.regularizers.OrthogonalRegularizer(0.3, mode)(x)
    assert isinstance(ours, tf.Tensor) and ours.dtype == tf.as_dtype(dtype)
    tolerance = 2e-6 if dtype == "float32" else 1e-12
    assert float(ours) == pytest.approx(reference(x.numpy(), 0.3, mode), rel=tolerance)
    assert float(ours) == pytest.approx(float(theirs), rel=2e-6)
    gradient, keras_gradient = tape.gradient(ours, x), tape.gradient(theirs, x)
    assert gradient is not None
    np.testing.assert_allclose(gradient.numpy(), keras_gradient.numpy(), rtol=1e-4, atol=1e-7)


def test_under_a_tape_zero_rows_and_a_single_row_have_finite_gradients() -> None:
    import tensorflow as tf

    x = tf.Variable([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, -1.0, 0.5]], dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = l1l2_rs.OrthogonalRegularizer(1.0)(x)
    assert float(value) == pytest.approx(reference(x.numpy(), 1.0, "rows"), rel=1e-14)
    assert np.all(np.isfinite(tape.gradient(value, x).numpy()))
    single = tf.Variable([[1.0, 2.0, 3.0]])
    with tf.GradientTape() as tape:
        value = l1l2_rs.OrthogonalRegularizer(1.0)(single)
    assert float(value) == 0.0
    np.testing.assert_array_equal(tape.gradient(value, single).numpy(), 0.0)


def test_inside_tf_function() -> None:
    import tensorflow as tf

    x = matrix(4, 3, np.float32, seed=5)

    @tf.function
    def penalty(weights: Any) -> Any:
        return l1l2_rs.OrthogonalRegularizer(0.2, "columns")(weights)

    assert float(penalty(tf.constant(x))) == pytest.approx(reference(x, 0.2, "columns"), rel=2e-6)


def test_tracked_torch_tensors_and_jax_tracers_outside_keras_are_refused() -> None:
    import jax
    import torch

    regularizer = l1l2_rs.OrthogonalRegularizer(0.1)
    weights = torch.ones((3, 2), requires_grad=True)
    with pytest.raises(TypeError, match=r"OrthogonalRegularizer.*x\.detach\(\)"):
        regularizer(weights)
    assert float(regularizer(weights.detach())) == float(np.float32(0.1))  # all rows alike
    with torch.no_grad():
        assert float(regularizer(weights)) == float(np.float32(0.1))
    with pytest.raises(TypeError, match=r"OrthogonalRegularizer.*concrete array"):
        jax.grad(regularizer)(np.ones((3, 2), dtype=np.float32))


#: Run per Keras 3 backend in a fresh process (Keras picks its backend once per process): the
#: penalty of a Keras variable and of a matrix traced by the backend's autodiff, with its
#: gradient, next to Keras' own regularizer on a backend tensor (its tensor path is right).
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import l1l2_rs

    backend = keras.backend.backend()
    rng = np.random.default_rng(7)
    results = {}
    for mode in ("rows", "columns"):
        x = rng.standard_normal((5, 3)).astype("float32")
        ours = l1l2_rs.OrthogonalRegularizer(0.3, mode)
        theirs = keras.regularizers.OrthogonalRegularizer(0.3, mode)
        if backend == "torch":
            import torch

            def value_and_grad(function):
                weights = torch.tensor(x, requires_grad=True)
                value = function(weights)
                value.backward()
                return float(value.detach()), weights.grad.numpy().tolist()

            with keras.StatelessScope():
                got = value_and_grad(ours)
            expected = value_and_grad(lambda w: theirs(w))
        elif backend == "jax":
            import jax

            def value_and_grad(function):
                value, gradient = jax.value_and_grad(function)(x)
                return float(value), np.asarray(gradient).tolist()

            with keras.StatelessScope():
                got = value_and_grad(ours)
            expected = value_and_grad(lambda w: theirs(w))
        else:
            import tensorflow as tf

            def value_and_grad(function):
                weights = tf.Variable(x)
                with tf.GradientTape() as tape:
                    value = function(weights)
                return float(value), tape.gradient(value, weights).numpy().tolist()

            got = value_and_grad(ours)
            expected = value_and_grad(lambda w: theirs(w))
        variable = keras.Variable(x)
        results[mode] = {
            "got": got,
            "expected": expected,
            "variable": float(keras.ops.convert_to_numpy(ours(variable))),
            "x": x.tolist(),
        }
    print(json.dumps(results))
    """
)


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_traced_tensors_of_keras_backends_stay_differentiable(backend: str) -> None:
    environment = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    output = run_python(CHILD, env=environment, timeout=600)
    results = json.loads(output.strip().splitlines()[-1])
    for mode, result in results.items():
        expected_value = reference(result["x"], 0.3, mode)
        (value, gradient), (keras_value, keras_gradient) = result["got"], result["expected"]
        assert value == pytest.approx(expected_value, rel=2e-6)
        assert keras_value == pytest.approx(expected_value, rel=2e-6)
        assert result["variable"] == pytest.approx(expected_value, rel=2e-6)
        assert np.any(np.asarray(gradient) != 0)
        np.testing.assert_allclose(gradient, keras_gradient, rtol=1e-4, atol=1e-6)
