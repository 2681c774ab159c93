"""Never silently wrong: objects that carry autograd state are refused, concrete ones still work.

l1l2_rs computes with numpy, so it cannot carry a gradient back into a framework. A penalty that
converted a tracked tensor would enter the loss as a constant and the weights would train exactly as
if there were no regularizer. These tests run against the frameworks themselves (installed by the
test command's ``frameworks`` extra), including real Keras training on each backend, each in a
fresh process because Keras picks its backend once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import l1l2_rs

REFUSED = r"(?i)gradient"


def entry_points() -> dict[str, Callable[[Any], Any]]:
    """Every public way of handing a tensor to l1l2_rs."""
    return {
        "penalty": lambda t: l1l2_rs.penalty(t, 0.1, 0.2),
        "sums": lambda t: l1l2_rs.sums(t),
        "L1L2()": lambda t: l1l2_rs.L1L2(0.1, 0.2)(t),
        "L1()": lambda t: l1l2_rs.L1(0.1)(t),
        "value_and_grad": lambda t: l1l2_rs.value_and_grad(t, 0.1, 0.2),
        "grad": lambda t: l1l2_rs.grad(t, 0.1, 0.2),
        "L2.grad": lambda t: l1l2_rs.L2(0.1).grad(t),
        "sums_many": lambda t: l1l2_rs.sums_many([np.ones(2), t]),
        "penalty_many": lambda t: l1l2_rs.penalty_many([t], 0.1, 0.2),
        "value_and_grad_many": lambda t: l1l2_rs.value_and_grad_many([t], 0.1, 0.2),
    }


VALUES = np.linspace(-2.0, 3.0, 37, dtype=np.float32)


def assert_refused_everywhere(tensor: Any) -> None:
    for name, function in entry_points().items():
        with pytest.raises(TypeError, match=REFUSED):
            function(tensor)
        assert name


def assert_same_as_numpy(tensor: Any) -> None:
    assert float(l1l2_rs.penalty(tensor, 0.1, 0.2)) == float(l1l2_rs.penalty(VALUES, 0.1, 0.2))
    got = l1l2_rs.grad(tensor, 0.1, 0.2)
    assert got.tobytes() == l1l2_rs.grad(VALUES, 0.1, 0.2).tobytes()


# ---------------------------------------------------------------------------------------------
# PyTorch


def test_torch_tensor_that_requires_grad_is_refused() -> None:
    import torch

    parameter = torch.nn.Parameter(torch.tensor(VALUES))
    assert_refused_everywhere(parameter)
    assert_refused_everywhere(torch.tensor(VALUES, requires_grad=True) * 2)
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
# TensorFlow


def test_symbolic_tensorflow_tensors_are_refused() -> None:
    import tensorflow as tf

    for name, function in entry_points().items():

        @tf.function
        def traced(t: Any, function: Callable[[Any], Any] = function) -> Any:
            function(t)
            return t

        with pytest.raises(TypeError, match=REFUSED):
            traced(tf.constant(VALUES))
        assert name


def test_tensorflow_tensors_while_a_tape_records_are_refused() -> None:
    import tensorflow as tf

    variable = tf.Variable(VALUES)
    constant = tf.constant(VALUES)
    with tf.GradientTape() as tape:
        tape.watch(constant)
        assert_refused_everywhere(variable)
        assert_refused_everywhere(constant)
    assert tape is not None


def test_eager_tensorflow_tensors_without_a_tape_still_work() -> None:
    import tensorflow as tf

    assert_same_as_numpy(tf.constant(VALUES))
    assert_same_as_numpy(tf.Variable(VALUES))


# ---------------------------------------------------------------------------------------------
# Keras 3 on every backend, and tf-keras: real training with the regularizer.

TRAIN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import l1l2_rs
    {imports}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = rng.standard_normal((64, 8)).astype("float32")
    layer = layers.Dense(8, kernel_regularizer=l1l2_rs.L1L2(0.1, 0.1))
    model = Sequential([Input((4,)), layer])
    model.compile(optimizer="sgd", loss="mse"{eager})
    try:
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    except TypeError as error:
        print(json.dumps({{"refused": str(error)}}))
        sys.exit(0)
    print(json.dumps({{"trained": True}}))
    """
)

BACKENDS = {
    "keras-torch": ("torch", "import keras\nfrom keras import Input, Sequential, layers", ""),
    "keras-jax": ("jax", "import keras\nfrom keras import Input, Sequential, layers", ""),
    "keras-tensorflow": (
        "tensorflow",
        "import keras\nfrom keras import Input, Sequential, layers",
        "",
    ),
    "keras-tensorflow-eager": (
        "tensorflow",
        "import keras\nfrom keras import Input, Sequential, layers",
        ", run_eagerly=True",
    ),
    "tf-keras": (
        "tensorflow",
        "import tf_keras as keras\nfrom tf_keras import Input, Sequential, layers",
        ", run_eagerly=True",
    ),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keras_training_with_the_regularizer_fails_loudly(backend: str) -> None:
    keras_backend, imports, eager = BACKENDS[backend]
    code = TRAIN.format(imports=imports, eager=eager)
    environment = {**os.environ, "KERAS_BACKEND": keras_backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    # Before: the penalty entered the loss as a constant and the kernel trained as if it had no
    # regularizer. Now training stops with an error that says why.
    assert "refused" in outcome, f"{backend} trained with a penalty that has no gradient"
    assert "gradient" in outcome["refused"]
