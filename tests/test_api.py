"""The Keras-compatible API: classes, factors, identifiers, configs, registry, value semantics."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

import l1l2_rs
from l1l2_rs import L1, L1L2, L2, Regularizer, deserialize, get, serialize
from l1l2_rs import regularizers as reg


class TestClasses:
    def test_defaults(self) -> None:
        assert L1().l1 == 0.01
        assert L2().l2 == 0.01
        assert (L1L2().l1, L1L2().l2) == (0.0, 0.0)
        assert (l1l2_rs.l1_l2().l1, l1l2_rs.l1_l2().l2) == (0.01, 0.01)
        assert l1l2_rs.l1 is L1 and l1l2_rs.l2 is L2
        assert L1(None).l1 == 0.01 and L1L2(None, 0.5).l1 == 0.0

    def test_base_class(self) -> None:
        base = Regularizer()
        assert base(np.ones(3)) == 0.0
        with pytest.raises(NotImplementedError, match="Regularizer"):
            base.get_config()

    def test_user_subclass_like_keras(self) -> None:
        class Scaled(Regularizer):
            def __init__(self, scale: float = 1.0) -> None:
                self.scale = scale

            def __call__(self, x: Any) -> Any:
                return self.scale * l1l2_rs.sums(x)[0]

            def get_config(self) -> dict[str, Any]:
                return {"scale": self.scale}

        rebuilt = Scaled.from_config(Scaled(3.0).get_config())
        assert rebuilt(np.array([1.0, -1.0])) == 6.0
        with pytest.raises(NotImplementedError, match="Unconfigured"):
            type("Unconfigured", (Regularizer,), {})().get_config()

    def test_legacy_l_keyword(self) -> None:
        with pytest.warns(DeprecationWarning, match="l1="):
            assert L1(l=0.3).l1 == 0.3
        with pytest.warns(DeprecationWarning, match="l2="):
            assert L2(l=0.4).l2 == 0.4
        with pytest.raises(TypeError, match="both"):
            L1(0.1, l=0.2)

    def test_call_semantics(self) -> None:
        x = np.array([3.0, -4.0], dtype=np.float32)
        assert L1(0.5)(x) == np.float32(3.5)
        assert L2(0.5)(x) == np.float32(12.5)
        assert L1L2(0.5, 0.5)(x) == np.float32(16.0)
        assert l1l2_rs.penalty(x, l1=0.5, l2=0.5) == np.float32(16.0)
        assert l1l2_rs.penalty(x).dtype == np.float32
        assert l1l2_rs.sums(x) == (7.0, 25.0)


class TestFactors:
    @pytest.mark.parametrize(
        "value, stored",
        [
            (1, 1.0),
            (0.1, 0.1),
            (True, 1.0),
            (False, 0.0),
            (np.float32(0.5), 0.5),
            (np.float64(0.1), 0.1),
            (np.int64(2), 2.0),
            (np.bool_(True), 1.0),
            (Fraction(1, 3), 1 / 3),
            (Decimal("0.1"), 0.1),
            (np.array(0.25), 0.25),
            (-0.0, 0.0),
        ],
    )
    def test_accepted_and_stored_as_full_precision_float(self, value: Any, stored: float) -> None:
        for regularizer, attribute in (
            (L1(value), "l1"),
            (L2(value), "l2"),
            (L1L2(value, value), "l1"),
        ):
            got = getattr(regularizer, attribute)
            assert type(got) is float and got == stored

    def test_float32_factor_keeps_its_exact_value(self) -> None:
        # np.float32(0.1) is 0.100000001490116...; it is stored as that exact double.
        assert L1(np.float32(0.1)).l1 == float(np.float32(0.1))

    @pytest.mark.parametrize(
        "value", [-0.1, float("nan"), float("inf"), -np.inf, 1j, np.complex64(1), 10**400]
    )
    def test_bad_numbers_raise_value_error_naming_argument_and_value(self, value: Any) -> None:
        with pytest.raises(ValueError, match=r"l1 .*got") as info:
            L1(value)
        assert "l1" in str(info.value) and repr(value)[:6] in str(info.value)
        with pytest.raises(ValueError, match="l2"):
            L1L2(0.0, value)

    @pytest.mark.parametrize(
        "value",
        [
            "0.1",
            b"1",
            [0.1],
            (0.1,),
            {"a": 1},
            object(),
            np.array([0.1, 0.2]),
            np.datetime64("2020-01-01"),
            np.str_("0.1"),
            np.array("0.1"),
        ],
    )
    def test_non_numbers_raise_type_error(self, value: Any) -> None:
        with pytest.raises(TypeError, match="l2"):
            L2(value)
        with pytest.raises(TypeError, match="l1"):
            l1l2_rs.penalty(np.ones(2), l1=value)


class TestValueSemantics:
    def test_repr(self) -> None:
        assert repr(L1L2(0.01, 0.01)) == "L1L2(l1=0.01, l2=0.01)"
        assert repr(L1(0.5)) == "L1(l1=0.5)"
        assert repr(L2()) == "L2(l2=0.01)"

    def test_equality_and_hash(self) -> None:
        assert L1L2(0.1, 0.2) == L1L2(0.1, 0.2)
        assert hash(L1L2(0.1, 0.2)) == hash(L1L2(np.float64(0.1), Fraction(1, 5)))
        assert L1L2(0.1, 0.2) != L1L2(0.2, 0.1)
        assert L1(0.1) != L2(0.1)
        assert L1L2(0.1, 0.0) != L1(0.1)
        assert len({L1(0.1), L1(0.1), L2(0.1)}) == 2

    @pytest.mark.parametrize("regularizer", [L1(0.3), L2(0.7), L1L2(1e-5, 3e-4), l1l2_rs.l1_l2()])
    def test_pickle_deepcopy_and_json(self, regularizer: Regularizer) -> None:
        assert pickle.loads(pickle.dumps(regularizer)) == regularizer
        assert copy.deepcopy(regularizer) == regularizer
        # The native call of a rebuilt object uses the rebuilt factors (state restored, not
        # `__init__` run): the exact penalty, rounded to float64.
        x = np.array([3.0, -4.0, 0.5, 1e-3])
        config = regularizer.get_config()
        exact = Fraction(config.get("l1", 0.0)) * sum(abs(Fraction(v)) for v in x) + Fraction(
            config.get("l2", 0.0)
        ) * sum(Fraction(v) ** 2 for v in x)
        for rebuilt in (
            pickle.loads(pickle.dumps(regularizer)),
            copy.deepcopy(regularizer),
            copy.copy(regularizer),
        ):
            assert float(rebuilt(x)) == pytest.approx(float(exact), rel=4e-16)
            assert float(rebuilt(x)) == float(regularizer(x))
        text = json.dumps(serialize(regularizer))
        assert deserialize(json.loads(text)) == regularizer
        assert json.loads(json.dumps(regularizer.get_config())) == regularizer.get_config()

    def test_native_call_follows_subclasses(self) -> None:
        """A subclass's own ``__call__`` wins over the native one, and can call it."""

        class Doubled(L1L2):
            def __call__(self, x: Any) -> Any:
                return 2 * super().__call__(x)

        x = np.array([1.0, -2.0])
        assert float(Doubled(0.5, 0.25)(x)) == 2 * (0.5 * 3.0 + 0.25 * 5.0)
        assert float(Doubled(0.5, 0.25)([1.0, -2.0])) == 2 * (0.5 * 3.0 + 0.25 * 5.0)

    def test_a_subclass_that_sets_no_factor_is_not_a_zero_penalty(self) -> None:
        """Terms never set must not read as "no terms" (a penalty of 0): the call raises for the
        missing factor, as it did before the call was native."""

        class Forgetful(L1L2):
            def __init__(self, scale: float) -> None:
                self.scale = scale  # no super().__init__: l1 and l2 are never set

        with pytest.raises(AttributeError, match="l1"):
            Forgetful(2.0)(np.array([1.0, -2.0]))


class TestGet:
    def test_none_instances_callables_and_classes(self) -> None:
        assert get(None) is None
        regularizer = L1(0.2)
        assert get(regularizer) is regularizer

        def function(x: Any) -> float:
            return 0.0

        assert get(function) is function
        assert get(L1L2) == L1L2()

    @pytest.mark.parametrize(
        "identifier, expected",
        [
            ("l1", L1(0.01)),
            ("L1", L1(0.01)),
            ("l2", L2(0.01)),
            ("L2", L2(0.01)),
            ("l1_l2", L1L2(0.01, 0.01)),
            ("L1L2", L1L2(0.0, 0.0)),
            ("l1l2", L1L2(0.0, 0.0)),
        ],
    )
    def test_strings(self, identifier: str, expected: Regularizer) -> None:
        assert get(identifier) == expected

    def test_unknown_string_lists_accepted_names(self) -> None:
        with pytest.raises(ValueError, match="Could not interpret regularizer identifier") as info:
            get("l3")
        assert "'l1_l2'" in str(info.value) and "'L1L2'" in str(info.value)

    @pytest.mark.parametrize("identifier", [3, 0.5, [L1()], b"l1"])
    def test_anything_else(self, identifier: Any) -> None:
        with pytest.raises(ValueError, match="Could not interpret regularizer identifier"):
            get(identifier)

    def test_dicts_in_both_formats(self) -> None:
        tf2 = {"class_name": "L1L2", "config": {"l1": 0.5, "l2": 0.25}}
        keras3 = {"module": "keras.regularizers", "registered_name": None, **tf2}
        assert get(tf2) == get(keras3) == L1L2(0.5, 0.25)
        assert get({"class_name": "L2"}) == L2()  # missing config: defaults
        assert get({"class_name": "L1", "config": None}) == L1()

    def test_unknown_config_key_is_a_type_error_naming_it(self) -> None:
        with pytest.raises(TypeError, match="l3"):
            get({"class_name": "L1L2", "config": {"l1": 0.1, "l3": 0.2}})

    def test_unknown_class_lists_accepted(self) -> None:
        with pytest.raises(ValueError, match=r"Unknown regularizer class 'Orthogonal'.*L1L2"):
            deserialize({"class_name": "Orthogonal", "config": {}})
        with pytest.raises(ValueError, match="class_name"):
            deserialize({"config": {}})


class TestSerialize:
    def test_keras3_format(self) -> None:
        assert serialize(L1L2(0.01, 0.02)) == {
            "module": "keras.regularizers",
            "class_name": "L1L2",
            "config": {"l1": 0.01, "l2": 0.02},
            "registered_name": None,
        }

    def test_tf2_format(self) -> None:
        assert serialize(L1(0.5), format="tf2") == {"class_name": "L1", "config": {"l1": 0.5}}
        with pytest.raises(ValueError, match="format"):
            serialize(L1(), format="keras2")

    def test_configs_hold_plain_python_floats(self) -> None:
        for value in serialize(L1L2(np.float32(0.5), Fraction(1, 4)))["config"].values():
            assert type(value) is float


class TestRegistry:
    def test_register_get_serialize_deserialize(self) -> None:
        @l1l2_rs.register_regularizer(package="Tests", name="Scaled")
        class ScaledL1(Regularizer):
            def __init__(self, scale: float = 2.0) -> None:
                self.scale = scale

            def __call__(self, x: Any) -> Any:
                return self.scale * l1l2_rs.sums(x)[0]

            def get_config(self) -> dict[str, Any]:
                return {"scale": self.scale}

        assert isinstance(get("Tests>Scaled"), ScaledL1)
        assert isinstance(get("Scaled"), ScaledL1)
        config = serialize(ScaledL1(3.0))
        assert config == {
            "module": None,
            "class_name": "ScaledL1",
            "config": {"scale": 3.0},
            "registered_name": "Tests>Scaled",
        }
        rebuilt = deserialize(json.loads(json.dumps(config)))
        assert isinstance(rebuilt, ScaledL1) and rebuilt.scale == 3.0
        assert serialize(ScaledL1(), format="tf2")["class_name"] == "Tests>Scaled"
        assert isinstance(deserialize(serialize(ScaledL1(), format="tf2")), ScaledL1)
        # Re-registering the same class is a no-op; another class under the key is refused.
        l1l2_rs.register_regularizer(package="Tests", name="Scaled")(ScaledL1)
        with pytest.raises(ValueError, match="already registered"):
            l1l2_rs.register_regularizer(package="Tests", name="Scaled")(
                type("Other", (Regularizer,), {})
            )
        with pytest.raises(TypeError, match="Regularizer subclass"):
            l1l2_rs.register_regularizer()(int)  # type: ignore[type-var]

    def test_custom_objects(self) -> None:
        class Local(Regularizer):
            def get_config(self) -> dict[str, Any]:
                return {}

        config = {"class_name": "Local", "config": {}}
        assert isinstance(deserialize(config, custom_objects={"Local": Local}), Local)
        with pytest.raises(ValueError, match="Unknown regularizer class"):
            deserialize(config)


def test_public_names_are_exported() -> None:
    for name in l1l2_rs.__all__:
        assert hasattr(l1l2_rs, name), name
    assert set(reg.__all__) <= set(l1l2_rs.__all__)


def test_no_warnings_on_normal_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L1L2(0.1, 0.1)(np.ones(10))
        get("l1_l2")
