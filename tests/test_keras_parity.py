"""Cross-checks against real Keras 3 (numpy backend): configs, values, dtypes, layers.

Each deliberate deviation from Keras is asserted here too, with the reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

import keras  # the test extra installs it: a missing Keras fails, never skips
import numpy as np
import pytest
from keras import regularizers as kr

import l1l2_rs
from conftest import assert_within_ulps, exact_penalty

PAIRS = [
    (l1l2_rs.L1(0.01), kr.L1(0.01)),
    (l1l2_rs.L2(0.02), kr.L2(0.02)),
    (l1l2_rs.L1L2(0.01, 0.02), kr.L1L2(0.01, 0.02)),
    (l1l2_rs.L1L2(0.0, 0.3), kr.L1L2(0.0, 0.3)),
    (l1l2_rs.L1L2(), kr.L1L2()),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=repr)
def test_serialize_matches_keras(ours: Any, theirs: Any) -> None:
    expected = kr.serialize(theirs)
    got = l1l2_rs.serialize(ours)
    assert got.keys() == expected.keys()
    assert {k: v for k, v in got.items() if k != "config"} == {
        k: v for k, v in expected.items() if k != "config"
    }
    # Keras 3 stores L1's factor as a float32 tensor (0.01 -> 0.009999999776482582); we keep the
    # double the user gave. Every other factor is identical.
    for key, value in expected["config"].items():
        if isinstance(ours, l1l2_rs.L1):
            assert value == float(np.float32(got["config"][key]))
        else:
            assert value == got["config"][key]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=repr)
def test_configs_round_trip_both_ways(ours: Any, theirs: Any) -> None:
    loaded_by_keras = kr.deserialize(json.loads(json.dumps(l1l2_rs.serialize(ours))))
    assert type(loaded_by_keras).__name__ == type(ours).__name__
    assert loaded_by_keras.get_config().keys() == ours.get_config().keys()
    loaded_by_us = l1l2_rs.deserialize(json.loads(json.dumps(kr.serialize(theirs))))
    assert type(loaded_by_us) is type(ours)
    for key, value in loaded_by_us.get_config().items():
        assert value == pytest.approx(ours.get_config()[key], rel=1e-7)


def test_dense_layer_config_json_both_ways() -> None:
    layer = keras.layers.Dense(
        4, kernel_regularizer=kr.L1L2(0.01, 0.02), bias_regularizer=kr.L2(0.5)
    )
    text = json.dumps(keras.saving.serialize_keras_object(layer))
    config = json.loads(text)["config"]
    assert l1l2_rs.deserialize(config["kernel_regularizer"]) == l1l2_rs.L1L2(0.01, 0.02)
    assert l1l2_rs.deserialize(config["bias_regularizer"]) == l1l2_rs.L2(0.5)
    # And a layer config we write, loaded by Keras.
    config["kernel_regularizer"] = l1l2_rs.serialize(l1l2_rs.L1L2(0.25, 0.125))
    rebuilt = keras.saving.deserialize_keras_object(
        json.loads(
            json.dumps(
                {
                    "module": "keras.layers",
                    "class_name": "Dense",
                    "config": config,
                    "registered_name": None,
                }
            )
        )
    )
    assert rebuilt.kernel_regularizer.get_config() == {"l1": 0.25, "l2": 0.125}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=repr)
def test_values_and_dtypes_match_keras(ours: Any, theirs: Any, dtype: Any) -> None:
    x = np.random.default_rng(0).standard_normal((64, 33)).astype(dtype)
    got = ours(x)
    expected = np.asarray(theirs(x))
    assert got.dtype == expected.dtype == np.dtype(dtype)
    # Keras' float32 result carries float32 summation error and (L1) a float32 factor; ours is
    # the exactly rounded value. They agree to Keras' own accuracy ...
    assert float(got) == pytest.approx(float(expected), rel=2e-6 if dtype == np.float32 else 1e-7)
    # ... and ours is within 1 ulp of the exact penalty.
    config = ours.get_config()
    l1, l2 = config.get("l1", 0.0), config.get("l2", 0.0)
    assert_within_ulps(got, exact_penalty(x, l1, l2), dtype, 1)


def test_model_losses_with_our_regularizer_in_a_dense_layer() -> None:
    kernel = keras.initializers.Constant(np.linspace(-1, 1, 12).reshape(3, 4))
    ours = keras.layers.Dense(
        4, kernel_initializer=kernel, kernel_regularizer=l1l2_rs.L1L2(0.01, 0.02)
    )
    theirs = keras.layers.Dense(
        4, kernel_initializer=kernel, kernel_regularizer=kr.L1L2(0.01, 0.02)
    )
    x = np.ones((2, 3), dtype=np.float32)
    ours(x)
    theirs(x)
    assert len(ours.losses) == len(theirs.losses) == 1
    assert float(ours.losses[0]) == pytest.approx(float(theirs.losses[0]), rel=1e-6)
    model = keras.Sequential([keras.Input((3,)), ours])
    model(x)
    assert float(model.losses[0]) == pytest.approx(float(theirs.losses[0]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Intended deviations, each asserted against what Keras does.


def test_deviation_float16_finite_where_keras_overflows() -> None:
    x = np.full(100, 60000.0, dtype=np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        keras_l1 = np.asarray(kr.L1(1e-3)(x))  # sum(|x|) = 6e6 overflows float16: inf
        keras_l2 = np.asarray(kr.L2(1e-8)(x))  # inf * (1e-8 underflowed to 0): nan
    assert np.isinf(keras_l1) and np.isnan(keras_l2)
    for ours, l1, l2 in [(l1l2_rs.L1(1e-3)(x), 1e-3, 0.0), (l1l2_rs.L2(1e-8)(x), 0.0, 1e-8)]:
        assert ours.dtype == np.float16 and np.isfinite(ours)  # true values 6000 and 3600
        assert_within_ulps(ours, exact_penalty(x, l1, l2), np.float16, 1)


def test_deviation_integer_inputs() -> None:
    x = np.arange(-5, 5, dtype=np.int32)
    keras_value = np.asarray(kr.L1(0.01)(x))
    assert keras_value.dtype == np.int32 and keras_value == 0  # factor truncated to int 0
    ours = l1l2_rs.L1(0.01)(x)
    assert ours.dtype == np.float64 and ours == pytest.approx(0.25, rel=1e-15)


def test_deviation_l1_l2_string() -> None:
    with pytest.raises(ValueError):
        kr.get("l1_l2")  # Keras 3 documents but rejects it
    assert l1l2_rs.get("l1_l2") == l1l2_rs.L1L2(0.01, 0.01)


def test_deviation_float32_factor_rounding() -> None:
    # Keras 3's L1 (and TF 2.4's every class) rounds the factor to float32.
    assert kr.L1(0.1).get_config()["l1"] == float(np.float32(0.1)) != 0.1
    assert l1l2_rs.L1(0.1).get_config()["l1"] == 0.1
    x = np.ones(1, dtype=np.float64)
    assert float(np.asarray(kr.L1(0.1)(x))) == float(np.float32(0.1))
    assert float(l1l2_rs.L1(0.1)(x)) == 0.1


def test_negative_and_non_finite_factors_rejected_like_keras_3() -> None:
    for value in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            kr.L1(value)
        with pytest.raises(ValueError, match="l1"):
            l1l2_rs.L1(value)


def test_deviation_legacy_l_keyword() -> None:
    with pytest.raises(TypeError):
        kr.L1(l=0.1)  # Keras 3 dropped TF 2.4's spelling
    with pytest.warns(DeprecationWarning):
        assert l1l2_rs.L1(l=0.1) == l1l2_rs.L1(0.1)


def test_same_keras_semantics_for_zero_factors_and_nan() -> None:
    x = np.array([1.0, np.nan], dtype=np.float32)
    for ours, theirs in [
        (l1l2_rs.L1L2(0.0, 0.0), kr.L1L2(0.0, 0.0)),
        (l1l2_rs.L1(0.0), kr.L1(0.0)),
        (l1l2_rs.L2(0.0), kr.L2(0.0)),
    ]:
        a, b = float(ours(x)), float(np.asarray(theirs(x)))
        assert (math.isnan(a) and math.isnan(b)) or a == b


def test_deviation_numpy_scalar_and_exact_number_factors() -> None:
    from decimal import Decimal
    from fractions import Fraction

    for value in [np.float32(0.5), np.int64(2), Fraction(1, 4), Decimal("0.5"), np.array(0.5)]:
        with pytest.raises(ValueError):
            kr.L2(value)  # Keras 3 accepts only Python int/float
        assert l1l2_rs.L2(value).l2 == float(value)


def test_deviation_value_semantics() -> None:
    assert kr.L1L2(0.1, 0.1) != kr.L1L2(0.1, 0.1)  # identity only
    assert "object at" in repr(kr.L1L2(0.1, 0.1))
    assert l1l2_rs.L1L2(0.1, 0.1) == l1l2_rs.L1L2(0.1, 0.1)
    assert repr(l1l2_rs.L1L2(0.1, 0.1)) == "L1L2(l1=0.1, l2=0.1)"


# ----------------------------------------------------------------------------------------------
# serialize(None), the factor error class, None factors, and config hardening.


def test_serialize_none_is_none_as_in_keras() -> None:
    import tf_keras

    assert kr.serialize(None) is None
    assert tf_keras.regularizers.serialize(None) is None
    assert l1l2_rs.serialize(None) is None
    assert l1l2_rs.serialize(None, format="tf2") is None


BAD_FACTORS: list[Any] = [-5, -0.1, math.nan, math.inf, "0.1", b"1", [0.1], {"l1": 1}, 1j, object()]


@pytest.mark.parametrize("bad", BAD_FACTORS, ids=lambda bad: type(bad).__name__ + str(bad)[:8])
def test_every_bad_factor_raises_one_class_that_keras_and_type_checks_catch(bad: Any) -> None:
    assert issubclass(l1l2_rs.FactorError, ValueError)
    assert issubclass(l1l2_rs.FactorError, TypeError)
    if not isinstance(bad, complex):
        with pytest.raises(ValueError):
            kr.L1(bad)  # what code written for Keras catches
    for build, name in [
        (lambda: l1l2_rs.L1(bad), "l1"),
        (lambda: l1l2_rs.L2(bad), "l2"),
        (lambda: l1l2_rs.L1L2(0.1, bad), "l2"),
        (lambda: l1l2_rs.l1_l2(bad), "l1"),
        (lambda: l1l2_rs.OrthogonalRegularizer(bad), "factor"),
        (lambda: l1l2_rs.penalty(np.ones(2), bad), "l1"),
    ]:
        with pytest.raises(l1l2_rs.FactorError, match=name) as caught:
            build()
        assert type(caught.value) is l1l2_rs.FactorError


def test_bool_factors_are_numbers_as_in_keras_3() -> None:
    assert kr.L1(True).get_config()["l1"] == 1.0
    assert kr.OrthogonalRegularizer(True).get_config()["factor"] == 1.0
    assert l1l2_rs.L1(True).l1 == 1.0
    assert l1l2_rs.OrthogonalRegularizer(True).factor == 1.0
    assert l1l2_rs.L1L2(l2=np.bool_(False)).l2 == 0.0


def test_none_factors_follow_keras_3_and_tf_keras() -> None:
    import tf_keras

    frameworks = [kr, tf_keras.regularizers]
    for l1, l2 in [(None, None), (None, 0.25), (0.25, None)]:
        expected = {"l1": 0.0 if l1 is None else l1, "l2": 0.0 if l2 is None else l2}
        for framework in frameworks:
            got = framework.l1_l2(l1=l1, l2=l2).get_config()
            assert got == pytest.approx(expected, rel=1e-7)
            assert framework.L1L2(l1=l1, l2=l2).get_config() == pytest.approx(expected, rel=1e-7)
        assert l1l2_rs.l1_l2(l1=l1, l2=l2).get_config() == expected
        assert l1l2_rs.L1L2(l1=l1, l2=l2).get_config() == expected
    # L1(None) and L2(None) are the 0.01 default in both.
    for framework in frameworks:
        assert framework.L1(None).get_config()["l1"] == pytest.approx(0.01, rel=1e-7)
        assert framework.L2(None).get_config()["l2"] == pytest.approx(0.01, rel=1e-7)
    assert l1l2_rs.L1(None).l1 == l1l2_rs.L2(None).l2 == 0.01
    # Keras 3's OrthogonalRegularizer refuses factor=None, and so do we.
    with pytest.raises(ValueError):
        kr.OrthogonalRegularizer(None)
    with pytest.raises(l1l2_rs.FactorError, match="factor"):
        l1l2_rs.OrthogonalRegularizer(None)  # type: ignore[arg-type]


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": [leaf]}
    return leaf


@pytest.mark.parametrize(
    "call",
    [
        lambda deep: l1l2_rs.deserialize({"class_name": deep}),
        lambda deep: l1l2_rs.get({"class_name": deep}),
        lambda deep: l1l2_rs.deserialize(deep),
        lambda deep: l1l2_rs.deserialize({"class_name": "L1L2", "config": {"l1": deep}}),
        lambda deep: l1l2_rs.L1L2.from_config({"l2": deep}),
        lambda deep: l1l2_rs.get(deep),
        lambda deep: l1l2_rs.deserialize({"class_name": "L1", "config": [deep]}),
    ],
)
def test_deeply_nested_configs_raise_a_short_value_error(call: Any) -> None:
    deep = _nested(50_000, 0)
    with pytest.raises(ValueError) as caught:
        call(deep)
    assert len(str(caught.value)) < 2000


def test_a_huge_class_name_is_not_echoed_whole() -> None:
    name = "x" * 50_000_000
    for call in (
        lambda: l1l2_rs.deserialize({"class_name": name}),
        lambda: l1l2_rs.get(name),
        lambda: l1l2_rs.deserialize(name),
        lambda: l1l2_rs.deserialize({"class_name": "L1", "config": {"l1": name}}),
    ):
        with pytest.raises(ValueError) as caught:
            call()
        message = str(caught.value)
        assert len(message) < 2000
        assert "x" * 100 in message and "50000000" in message


def test_a_huge_integer_factor_gets_a_short_factor_error() -> None:
    with pytest.raises(l1l2_rs.FactorError, match=r"l1 .*an int of 33220 bits"):
        l1l2_rs.L1(10**10000)
    with pytest.raises(l1l2_rs.FactorError, match="l2"):
        l1l2_rs.deserialize({"class_name": "L2", "config": {"l2": -(10**50)}})


@pytest.mark.parametrize("bad", [0, [], "", False, 0.0, [("l1", 0.1)], "l1=0.1", 1])
def test_a_config_that_is_not_a_dict_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError):
        kr.deserialize({"class_name": "L1L2", "config": bad, "module": "keras.regularizers"})
    with pytest.raises(ValueError, match="'config' of a regularizer must be a dict"):
        l1l2_rs.deserialize({"class_name": "L1L2", "config": bad})
    with pytest.raises(ValueError, match="must be a dict"):
        l1l2_rs.get({"class_name": "L1", "config": bad})
    with pytest.raises(ValueError, match="config of L1L2 must be a dict"):
        l1l2_rs.L1L2.from_config(bad)


def test_a_missing_or_none_config_means_the_defaults_as_in_keras() -> None:
    for config in ({"class_name": "L1"}, {"class_name": "L1", "config": None}):
        assert l1l2_rs.deserialize(config) == l1l2_rs.L1()
    keras_loaded = kr.deserialize(
        {"class_name": "L1", "config": None, "module": "keras.regularizers"}
    )
    assert keras_loaded.get_config()["l1"] == pytest.approx(0.01, rel=1e-7)


@pytest.mark.parametrize(
    "regularizer, name",
    [
        (l1l2_rs.L1(0.1), "l1"),
        (l1l2_rs.L2(0.1), "l2"),
        (l1l2_rs.L1L2(0.1, 0.2), "l1"),
        (l1l2_rs.L1L2(0.1, 0.2), "l2"),
        (l1l2_rs.OrthogonalRegularizer(0.1), "factor"),
    ],
    ids=repr,
)
def test_factors_are_validated_on_assignment_too(regularizer: Any, name: str) -> None:
    x = np.array([[3.0, -4.0], [1.0, 2.0]])
    before = float(regularizer(x))
    for bad in (-5, math.nan, "0.5", None if name == "factor" else -1):
        with pytest.raises(l1l2_rs.FactorError, match=name):
            setattr(regularizer, name, bad)
        assert float(regularizer(x)) == before  # the refused value was not stored
    setattr(regularizer, name, 0.5)
    assert getattr(regularizer, name) == 0.5
    assert regularizer.get_config()[name] == 0.5
    rebuilt = type(regularizer).from_config(regularizer.get_config())
    assert float(regularizer(x)) == float(rebuilt(x))  # the next call uses the new factor
    assert float(regularizer(x)) != before


def test_orthogonal_mode_is_validated_on_assignment_too() -> None:
    regularizer = l1l2_rs.OrthogonalRegularizer(0.1)
    with pytest.raises(ValueError, match="mode"):
        regularizer.mode = "diagonal"
    assert regularizer.mode == "rows"
    regularizer.mode = "columns"
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert float(regularizer(x)) == float(l1l2_rs.OrthogonalRegularizer(0.1, "columns")(x))
