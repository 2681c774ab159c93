"""Run in a fresh process per Keras backend by test_keras_training.py (Keras picks its backend once
per process from KERAS_BACKEND). Trains small models with l1l2_rs' regularizers, with Keras' own and
with none, and prints every result as one JSON line; the test process makes the assertions.

Usage: python keras_training_child.py keras|tf_keras
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import l1l2_rs

FLAVOUR = sys.argv[1]
if FLAVOUR == "tf_keras":
    import tensorflow as tf
    import tf_keras as keras

    BACKEND = "tf_keras"
else:
    import keras

    BACKEND = keras.backend.backend()

RNG = np.random.default_rng(20261202)
X = RNG.standard_normal((48, 5)).astype("float32")
X2 = RNG.standard_normal((48, 5)).astype("float32")
Y = RNG.standard_normal((48, 3)).astype("float32")

#: (kernel, bias, activity) regularizer pairs: ours, and Keras' own with the same factors.
PAIRS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "L1L2": (lambda: l1l2_rs.L1L2(0.1, 0.05), lambda: keras.regularizers.L1L2(0.1, 0.05)),
    "L1": (lambda: l1l2_rs.L1(0.05), lambda: keras.regularizers.L1(0.05)),
    "L2": (lambda: l1l2_rs.L2(0.2), lambda: keras.regularizers.L2(0.2)),
    "L1L2-l2-only": (lambda: l1l2_rs.L1L2(0.0, 0.3), lambda: keras.regularizers.L1L2(0.0, 0.3)),
    "l1_l2-string": (lambda: l1l2_rs.get("l1_l2"), lambda: keras.regularizers.L1L2(0.01, 0.01)),
    "zero": (lambda: l1l2_rs.L1L2(0.0, 0.0), lambda: None),
}

#: The compile modes of this backend: Keras' jit on and off, and eager where Keras has it.
MODES: dict[str, dict[str, Any]] = {
    "jax": {"jit": {"jit_compile": True}, "no-jit": {"jit_compile": False}},
    # Keras' jit_compile=True on torch is torch.compile: ~1 min of compilation per model.
    "torch": {"no-jit": {"jit_compile": False}, "eager": {"run_eagerly": True}},
    "tensorflow": {
        "no-jit": {"jit_compile": False},
        "jit": {"jit_compile": True},
        "eager": {"run_eagerly": True},
    },
    "numpy": {"no-jit": {}},  # the numpy backend evaluates and predicts; it does not train
    "tf_keras": {"graph": {"run_eagerly": False}, "eager": {"run_eagerly": True}},
}[BACKEND]


def weights(model: Any) -> list[list[float]]:
    return [np.asarray(w, dtype=np.float64).ravel().tolist() for w in model.get_weights()]


def dense(kernel: Any, bias: Any, activity: Any, units: int = 3) -> Any:
    """No weight starts at exactly 0, where JAX's abs (Keras' own L1 there) has gradient 1."""
    return keras.layers.Dense(
        units,
        kernel_initializer=keras.initializers.Constant(
            np.linspace(-0.6, 0.7, 5 * units).reshape(5, units)
        ),
        bias_initializer=keras.initializers.Constant(np.linspace(0.45, -0.55, units)),
        kernel_regularizer=kernel,
        bias_regularizer=bias,
        activity_regularizer=activity,
    )


def to_float(value: Any) -> float:
    if FLAVOUR == "tf_keras":
        return float(value)
    return float(keras.ops.convert_to_numpy(value))


def train(
    make: Callable[[], Any], mode: dict[str, Any], where: str, *, check_inference: bool
) -> dict[str, Any]:
    """A model with the regularizer at ``where`` (k, b, a or all), trained three steps (but on
    the numpy backend, which does not train), with its penalties after training; evaluate and
    predict with ``check_inference`` (the numpy backend's evaluate fails with any regularizer)."""
    chosen = {part: make() if where in (part, "all") else None for part in ("k", "b", "a")}
    model = keras.Sequential([keras.Input((5,)), dense(chosen["k"], chosen["b"], chosen["a"])])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", **mode)
    if BACKEND != "numpy":
        model.fit(X, Y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    model(X[:16])
    result: dict[str, Any] = {
        "weights": weights(model),
        "losses": sorted(to_float(loss) for loss in model.losses),
    }
    if check_inference:
        if BACKEND != "numpy":
            result["evaluate"] = float(model.evaluate(X, Y, batch_size=16, verbose=0))
        predicted = model.predict(X, batch_size=16, verbose=0)
        result["predict"] = np.asarray(predicted, dtype=np.float64).ravel().tolist()
    return result


def training_cases() -> dict[str, Any]:
    """Every pair and place in the first mode; the main pairs in the others (CI time)."""
    results: dict[str, Any] = {}
    for index, (mode_name, mode) in enumerate(MODES.items()):
        none = train(lambda: None, mode, "all", check_inference=not index)
        for pair_name, (ours, theirs) in PAIRS.items():
            if index and pair_name != "L1L2":
                continue
            everywhere = pair_name == "L1L2" and not index
            for where in ("k", "b", "a", "all") if everywhere else ("all",):
                inference = not index and where == "all"
                results[f"{mode_name}/{pair_name}/{where}"] = {
                    "ours": train(ours, mode, where, check_inference=inference),
                    "theirs": train(theirs, mode, where, check_inference=inference),
                    "none": none,
                }
    return results


def shared_layer_losses() -> dict[str, int]:
    """Loss counts of a layer and a model shared between two inputs, ours and Keras'."""
    counts = {}
    for name, make in (("ours", lambda: l1l2_rs.L1L2(0.1, 0.1)), ("theirs", keras.regularizers.l2)):
        shared = dense(make(), None, make(), units=2)
        first, second = keras.Input((5,)), keras.Input((5,))
        model = keras.Model(
            [first, second], keras.layers.Average()([shared(first), shared(second)])
        )
        model.compile(optimizer="sgd", loss="mse")
        model([X, X2])
        counts[name] = len(model.losses)
        if BACKEND != "numpy":
            model.fit([X, X2], Y[:, :2], epochs=1, batch_size=16, verbose=0)
    return counts


def variable_values() -> dict[str, Any]:
    """Direct calls on a Keras/TF variable: value and dtype, for the parent to check exactly."""
    value = np.abs(RNG.standard_normal((4, 4))).astype("float32") - 0.5
    if FLAVOUR == "tf_keras":
        variable = tf.Variable(value)
    else:
        variable = keras.Variable(value)
    calls = {
        "L1(0.1)": l1l2_rs.L1(0.1),
        "L2(0.1)": l1l2_rs.L2(0.1),
        "L1L2(0.1,0.2)": l1l2_rs.L1L2(0.1, 0.2),
        "L1(0)": l1l2_rs.L1(0.0),
        "L1L2(0,0)": l1l2_rs.L1L2(0.0, 0.0),
    }
    out: dict[str, Any] = {"x": value.astype(np.float64).ravel().tolist()}
    for name, regularizer in calls.items():
        result = regularizer(variable)
        array = np.asarray(result if FLAVOUR == "tf_keras" else keras.ops.convert_to_numpy(result))
        out[name] = [float(array), str(array.dtype)]
    make = tf.Variable if FLAVOUR == "tf_keras" else keras.Variable
    negated, zeros = make(-value), make(np.zeros_like(value))
    for name in ("L1(0.1)", "L1L2(0.1,0.2)"):
        out[f"negated {name}"] = to_float(calls[name](negated))
        out[f"zeros {name}"] = to_float(calls[name](zeros))
    return out


def gradients_at_zero() -> dict[str, list[float]]:
    """The gradient of L1(0.1), ours and Keras' own, at [0, -2, 3] as Keras' trainers take it."""
    start = np.array([0.0, -2.0, 3.0], dtype="float32")
    out: dict[str, list[float]] = {}
    for name, regularizer in (("ours", l1l2_rs.L1(0.1)), ("theirs", keras.regularizers.L1(0.1))):
        if BACKEND == "jax":
            import jax

            with keras.StatelessScope():  # as in the JAX trainer's step
                gradient = jax.grad(lambda w, r=regularizer: r(w))(start)
        elif BACKEND == "torch":
            variable = keras.Variable(start)
            regularizer(variable).backward()
            gradient = variable.value.grad
        elif BACKEND == "numpy":
            continue  # no gradients
        else:
            import tensorflow

            variable = (
                tensorflow.Variable(start) if FLAVOUR == "tf_keras" else keras.Variable(start)
            )
            with tensorflow.GradientTape() as tape:
                value = regularizer(variable)
            gradient = tape.gradient(value, variable)
        out[name] = np.asarray(gradient, dtype=np.float64).tolist()
    return out


def mixed_precision_activity() -> dict[str, Any]:
    """float16 activations whose squares overflow float16: the activity penalty (and training)."""
    policy = "mixed_float16"
    if FLAVOUR == "tf_keras":
        policy = keras.mixed_precision.Policy(policy)
    out: dict[str, Any] = {}
    for name, make in (("ours", lambda: l1l2_rs.L2(1e-6)), ("theirs", keras.regularizers.L2)):
        layer = keras.layers.Dense(
            4,
            dtype=policy,
            kernel_initializer=keras.initializers.Constant(60.0),
            activity_regularizer=make(1e-6) if name == "theirs" else make(),
        )
        model = keras.Sequential([keras.Input((5,)), layer])
        inputs = np.abs(X[:16]) + 1.0  # outputs of a few hundred: squares > 65504
        outputs = np.asarray(model.predict(inputs, verbose=0), dtype=np.float64)
        model(inputs)
        penalty = model.losses[0]
        out[name] = to_float(penalty)
        out[f"{name} dtype"] = (
            penalty.dtype.name
            if FLAVOUR == "tf_keras"
            else keras.backend.standardize_dtype(penalty.dtype)
        )
        out["reference"] = 1e-6 * float(np.sum(outputs * outputs)) / len(inputs)
        # Keras 3's tensorflow backend cannot fit a mixed_float16 activity penalty, its own
        # included (it stacks the float16 penalty with float32 losses); numpy does not train.
        if BACKEND not in ("numpy", "tensorflow") and name == "ours":
            model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="mse")
            model.fit(inputs, np.full((16, 4), 100.0), epochs=1, batch_size=16, verbose=0)
            out["trained finite"] = bool(np.all(np.isfinite(flat_weights(model))))
    return out


def flat_weights(model: Any) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(w, dtype=np.float64)) for w in model.get_weights()])


def main() -> None:
    report = {
        "backend": BACKEND,
        "training": training_cases(),
        "shared": shared_layer_losses(),
        "variables": variable_values(),
        "mixed precision": mixed_precision_activity(),
        "gradients at zero": gradients_at_zero(),
    }
    print(json.dumps(report))


main()
