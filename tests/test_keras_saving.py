"""Saved and reloaded models bring back l1l2_rs' classes with their exact factors.

Keras 3 (the numpy backend, in this process: serialization does not depend on the backend) and
tf-keras: ``.keras`` files, tf-keras' ``.h5``, JSON, ``clone_model`` and layer configs, with no
``custom_objects``. Keras' own classes stay Keras' own. The lazy registration (``import l1l2_rs``
imports neither Keras nor TensorFlow) is checked in fresh processes, in both import orders.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import l1l2_rs

X = np.random.default_rng(7).standard_normal((6, 4)).astype("float32")

#: Factors that float32 would change (0.01 -> 0.009999999776482582): the files must keep them.
KERNEL, BIAS, ACTIVITY = l1l2_rs.L1(0.01), l1l2_rs.L2(0.03), l1l2_rs.L1L2(0.01, 0.07)


@l1l2_rs.register_regularizer(package="SavingTests", name="Doubled")
class DoubledL1(l1l2_rs.Regularizer):
    """A user class registered with l1l2_rs only: Keras must save and load it too."""

    def __init__(self, l1: float = 0.1) -> None:
        self.l1 = l1

    def __call__(self, x: Any) -> Any:
        return l1l2_rs.L1(2 * self.l1)(x)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


def model_with(framework: Any, kernel: Any, bias: Any, activity: Any) -> Any:
    inputs = framework.Input((4,))
    dense = framework.layers.Dense(
        3, kernel_regularizer=kernel, bias_regularizer=bias, activity_regularizer=activity
    )
    return framework.Model(inputs, dense(inputs))


def regularizers_of(model: Any) -> tuple[Any, Any, Any]:
    dense = model.layers[-1]
    return dense.kernel_regularizer, dense.bias_regularizer, dense.activity_regularizer


def assert_ours_with_exact_factors(loaded: tuple[Any, ...], saved: tuple[Any, ...]) -> None:
    for got, original in zip(loaded, saved, strict=True):
        assert type(got) is type(original)
        assert got.get_config() == original.get_config()  # 0.01 stays 0.01


def round_trips(framework: Any, tmp_path: Path) -> dict[str, Callable[[Any], Any]]:
    """Every way a model leaves and comes back, for ``framework`` (Keras 3 or tf-keras)."""

    def saved(model: Any, suffix: str) -> Any:
        path = tmp_path / f"model{suffix}"
        model.save(path)
        return framework.models.load_model(path)

    def by_layer_config(model: Any) -> Any:
        dense = model.layers[-1]
        rebuilt = type(dense).from_config(json.loads(json.dumps(dense.get_config())))
        return framework.Sequential([framework.Input((4,)), rebuilt])

    trips = {
        ".keras": lambda model: saved(model, ".keras"),
        "json": lambda model: framework.models.model_from_json(model.to_json()),
        "clone_model": lambda model: framework.models.clone_model(model),
        "layer config": by_layer_config,
    }
    if framework.__name__ == "tf_keras":
        trips[".h5"] = lambda model: saved(model, ".h5")
    return trips


FRAMEWORKS = ("keras", "tf_keras")


def imported(name: str) -> Any:
    """Keras 3 or tf-keras. tf-keras (TensorFlow) is imported by the tests that use it, not at
    collection: torch.compile's LLVM aborts the process if TensorFlow's was loaded first."""
    return importlib.import_module(name)


TRIPS = [("keras", name) for name in (".keras", "json", "clone_model", "layer config")] + [
    ("tf_keras", name) for name in (".keras", ".h5", "json", "clone_model", "layer config")
]


@pytest.mark.parametrize("framework_name, trip", TRIPS)
def test_round_trip_gives_our_classes_back(framework_name: str, trip: str, tmp_path: Path) -> None:
    framework = imported(framework_name)
    model = model_with(framework, KERNEL, BIAS, ACTIVITY)
    before = np.asarray(model(X))
    loaded = round_trips(framework, tmp_path)[trip](model)
    assert_ours_with_exact_factors(regularizers_of(loaded), (KERNEL, BIAS, ACTIVITY))
    if trip == ".keras" or trip == ".h5":  # the weights come back with the model
        np.testing.assert_array_equal(np.asarray(loaded(X)), before)


@pytest.mark.parametrize("framework_name, trip", TRIPS)
def test_round_trip_of_a_registered_user_class(
    framework_name: str, trip: str, tmp_path: Path
) -> None:
    framework = imported(framework_name)
    saved = (DoubledL1(0.01), l1l2_rs.get("l1_l2"), None)
    loaded = round_trips(framework, tmp_path)[trip](model_with(framework, *saved))
    kernel, bias, activity = regularizers_of(loaded)
    assert type(kernel) is DoubledL1 and kernel.l1 == 0.01
    assert type(bias) is l1l2_rs.L1L2 and bias.get_config() == {"l1": 0.01, "l2": 0.01}
    assert activity is None


@pytest.mark.parametrize("framework_name, trip", TRIPS)
def test_keras_own_classes_stay_keras_own(framework_name: str, trip: str, tmp_path: Path) -> None:
    framework = imported(framework_name)
    own = framework.regularizers
    saved = (own.L1(0.01), own.L2(0.03), own.L1L2(0.01, 0.07))
    loaded = round_trips(framework, tmp_path)[trip](model_with(framework, *saved))
    for got, original in zip(regularizers_of(loaded), saved, strict=True):
        assert type(got) is type(original)


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
@pytest.mark.parametrize("ours", [KERNEL, BIAS, ACTIVITY, l1l2_rs.L1L2()], ids=repr)
def test_keras_serialize_deserialize_and_get(framework_name: str, ours: Any) -> None:
    framework = imported(framework_name)
    config = framework.regularizers.serialize(ours)
    assert config["registered_name"] == f"l1l2_rs>{type(ours).__name__}"
    assert config["config"] == ours.get_config()
    text = json.dumps(config)
    for loaded in (
        framework.regularizers.deserialize(json.loads(text)),
        framework.regularizers.get(json.loads(text)),
        l1l2_rs.deserialize(json.loads(text)),
    ):
        assert type(loaded) is type(ours) and loaded == ours
    rebuilt = type(ours).from_config(ours.get_config())
    assert rebuilt == ours and rebuilt.get_config() == ours.get_config()


def test_l1l2_rs_serialize_stays_a_portable_keras_config() -> None:
    # l1l2_rs.serialize writes Keras' own names: Keras alone loads it as its class, l1l2_rs as
    # ours. Keras' serializer (layer configs, files) writes the registered key instead.
    config = l1l2_rs.serialize(l1l2_rs.L1L2(0.25, 0.125))
    assert config["module"] == "keras.regularizers" and config["registered_name"] is None
    assert type(keras.regularizers.deserialize(config)) is keras.regularizers.L1L2
    assert type(l1l2_rs.deserialize(config)) is l1l2_rs.L1L2


# ---------------------------------------------------------------------------------------------
# Lazy registration, in fresh processes.

CHECK_REGISTERED = textwrap.dedent(
    """
    def registered(framework, key):
        saving = framework.saving if framework.__name__ == "keras" else framework.utils
        return saving.get_registered_object(key)

    def check(framework, user_class):
        for name in ("L1", "L2", "L1L2"):
            assert registered(framework, "l1l2_rs>" + name) is getattr(l1l2_rs, name), name
        assert registered(framework, "Order>User") is user_class
        layer = framework.layers.Dense(2, kernel_regularizer=l1l2_rs.L1(0.01))
        config = json.loads(json.dumps(layer.get_config()))
        rebuilt = type(layer).from_config(config).kernel_regularizer
        assert type(rebuilt) is l1l2_rs.L1 and rebuilt.l1 == 0.01, rebuilt

    def user_class():
        @l1l2_rs.register_regularizer(package="Order", name="User")
        class User(l1l2_rs.Regularizer):
            def get_config(self):
                return {}
        return User
    """
)

ORDERS = {
    "l1l2_rs first": """
        import l1l2_rs
        assert not {"keras", "tf_keras", "tensorflow", "torch", "jax"} & set(sys.modules)
        User = user_class()  # registered with l1l2_rs before any Keras exists
        import keras
        check(keras, User)
        import tf_keras
        check(tf_keras, User)
        assert not [f for f in sys.meta_path if type(f).__module__.startswith("l1l2_rs")]
        print("ok")
    """,
    "Keras first": """
        import keras
        import tf_keras
        import l1l2_rs
        User = user_class()  # registered with both Keras at once
        check(keras, User)
        check(tf_keras, User)
        assert not [f for f in sys.meta_path if type(f).__module__.startswith("l1l2_rs")]
        print("ok")
    """,
}


@pytest.mark.parametrize("order", ORDERS)
def test_registration_in_either_import_order(order: str) -> None:
    code = "import json, sys\n" + CHECK_REGISTERED.replace("l1l2_rs.", "sys.modules['l1l2_rs'].")
    code += textwrap.dedent(ORDERS[order])
    environment = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
