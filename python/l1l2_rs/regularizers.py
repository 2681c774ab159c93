"""Keras-compatible regularizers computed by the l1l2-rs native core.

The classes mirror ``keras.regularizers`` (Keras 3, with TF 2.4's legacy spellings accepted) and fix
what Keras gets wrong: factors are kept at full double precision, integer inputs are not truncated
to a zero penalty, float16 inputs do not overflow, and ``"l1_l2"`` works as documented.
"""

from __future__ import annotations

import math
import numbers
import reprlib
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Any, ClassVar, TypeVar, overload

import numpy as np

from . import _keras_registry, _l1l2_rs
from ._arrays import call, call_many, orthogonal_penalty_of_unreadable, penalty_of_unreadable
from ._l1l2_rs import NotReadable
from ._l1l2_rs import orthogonal_penalty as _native_orthogonal_penalty
from ._l1l2_rs import penalty as _native_penalty
from ._l1l2_rs import value_and_grad as _native_value_and_grad

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "FactorError",
    "OrthogonalRegularizer",
    "Regularizer",
    "deserialize",
    "get",
    "grad",
    "l1",
    "l1_l2",
    "l2",
    "orthogonal_regularizer",
    "penalty",
    "penalty_many",
    "prox_",
    "prox_many_",
    "register_regularizer",
    "serialize",
    "sums",
    "sums_many",
    "value_and_grad",
    "value_and_grad_many",
]

#: What every regularizer call returns: a numpy scalar of the input's float dtype (float64 for
#: integer and bool input); the base class returns the Python float 0.0, as Keras' does.
Penalty = Any

_KERAS_MODULE = "keras.regularizers"
#: The package our built-in classes are registered under with Keras ("l1l2_rs>L1L2").
_KERAS_PACKAGE = "l1l2_rs"
_MISSING: Any = object()


class FactorError(ValueError, TypeError):
    """A regularization factor (``l1``, ``l2``, ``factor``, a learning rate) that is not a finite
    non-negative real number: of another type (a string, a complex, a container), negative, NaN or
    infinite. (Bools are numbers to Python and to Keras: ``True`` is the factor 1.0.)

    It derives from both ``ValueError`` (what Keras raises for a bad factor) and ``TypeError``, so
    code written for either catches it. The message names the argument.
    """


class _ShortRepr(reprlib.Repr):
    """``repr`` for messages about user input: bounded in depth and length, so that a deeply
    nested config cannot exhaust the recursion limit and a huge string is not echoed whole."""

    MAX_STRING = 100

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxother = 200

    def repr_str(self, x: str, level: int) -> str:
        return self._truncated(x)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self._truncated(x)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 10_000:  # str() of a huge int is refused past 4300 digits
            return f"<an int of {x.bit_length()} bits>"
        return super().repr_int(x, level)  # cut to 40 characters

    def _truncated(self, x: str | bytes) -> str:
        if len(x) <= self.MAX_STRING:
            return repr(x)
        return f"{x[: self.MAX_STRING]!r}... ({len(x)} characters)"


def _describe(value: object) -> str:
    """A short ``repr`` of ``value`` for an error message (see ``_ShortRepr``)."""
    return _ShortRepr().repr(value)


def _factor(name: str, value: object, default: float | None) -> float:
    """Validate a regularization factor and return it as a full-precision Python float.

    ``None`` means ``default``; with no default, ``None`` is refused. Raises ``FactorError``.
    """
    if value is None:
        if default is None:
            raise FactorError(f"{name} must be a finite non-negative real number, got None")
        return default
    if type(value) is float and 0.0 <= value < math.inf:  # the common case, checked first
        return value + 0.0  # -0.0 -> 0.0
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    numpy_non_number = isinstance(value, np.generic) and not isinstance(
        value, (np.number, np.bool_)
    )
    if (
        isinstance(value, (str, bytes))
        or numpy_non_number
        or not isinstance(value, (numbers.Number, Decimal, np.generic))
    ):
        raise FactorError(
            f"{name} must be a real number, got {_describe(value)} of type {type(value).__name__}"
        )
    if isinstance(value, (complex, np.complexfloating)):
        raise FactorError(f"{name} must be a finite non-negative real number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as error:
        raise FactorError(
            f"{name} must be a finite non-negative real number, got {_describe(value)}"
        ) from error
    if not math.isfinite(number) or number < 0:
        raise FactorError(
            f"{name} must be a finite non-negative real number, got {_describe(value)}"
        )
    return number + 0.0  # -0.0 -> 0.0


class Regularizer:
    """Base class of regularizers, as ``keras.regularizers.Regularizer``.

    Subclasses override ``__call__(x)`` (returning the penalty of ``x``) and ``get_config()``
    (returning the constructor arguments as a JSON-safe dict); ``from_config`` then rebuilds them.
    """

    def __call__(self, x: Any) -> Penalty:
        return 0.0

    @classmethod
    def from_config(cls: type[_R], config: dict[str, Any]) -> _R:
        """Create a regularizer from the dict ``get_config`` returned."""
        if not isinstance(config, dict):
            raise ValueError(
                f"the config of {cls.__name__} must be a dict of its constructor arguments, "
                f"got {_describe(config)}"
            )
        return cls(**config)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments of this regularizer, JSON-safe."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_config()")


_R = TypeVar("_R", bound=Regularizer)


class _Validated(Regularizer):
    """What every built-in regularizer has: its arguments are validated when set, at construction
    and on any later assignment (``reg.l1 = -5`` raises ``FactorError``; a valid assignment is
    used by the next call), and value semantics (repr, equality and hash by config).

    ``_CHECKS`` maps each validated attribute to its check, which returns the value to store.
    """

    _CHECKS: ClassVar[dict[str, Callable[[object], object]]] = {}

    def __setattr__(self, name: str, value: object) -> None:
        check = self._CHECKS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - every built-in overrides it

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        assert isinstance(other, _Validated)
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, *self.get_config().values()))


def _factor_check(name: str, default: float | None) -> Callable[[object], object]:
    """The check of a factor attribute: ``None`` means ``default`` (refused without one)."""
    return lambda value: _factor(name, value, default)


class _Builtin(_l1l2_rs.PenaltyTerms, _Validated):
    """What the L1/L2 regularizers share: the training ops with the object's terms.

    ``_terms()`` gives the factors of the terms present (``None`` leaves a term out): the penalty,
    its gradient and the prox step all follow it, so ``L1(0)`` keeps its term (NaN shows) and
    ``L1L2(0.1, 0)`` has no L2 term at all.

    The call itself is native (``PenaltyTerms.__call__``, no Python frame on the small-call path):
    the native base holds a copy of the terms, set again whenever a factor is assigned and when
    the object is unpickled or copied. What it cannot read in place, and every call before the
    terms are set, comes back to ``_python_call``.
    """

    def get_config(self) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - every built-in overrides it

    def _terms(self) -> tuple[float | None, float | None]:
        raise NotImplementedError  # pragma: no cover - every built-in overrides it

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in self._CHECKS:
            self._sync_terms()

    def _sync_terms(self) -> None:
        """Copy the terms into the native base, once every factor is set (``__init__`` sets them
        one by one; until then the native call hands every call to ``_python_call``)."""
        if all(name in self.__dict__ for name in self._CHECKS):
            self._set_terms(*self._terms())

    def __getnewargs__(self) -> tuple[()]:
        # Pickled and copied by state (the instance dict): the native base needs no arguments.
        return ()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sync_terms()

    def _python_call(self, x: Any) -> Penalty:
        """The call on what is not a numpy array the core reads in place (converted, or a traced /
        differentiable tensor), and on anything while the terms are not set (a subclass whose
        ``__init__`` set no factor gets the ``AttributeError`` of the missing one)."""
        return penalty_of_unreadable(_native_penalty, x, *self._terms())

    def grad(self, x: Any, *, out: Any = None) -> Any:
        """The gradient of the penalty at ``x``, written into ``out`` (a new array when None)."""
        return self.value_and_grad(x, out=out)[1]

    def value_and_grad(
        self, x: Any, *, out: Any = None, accumulate: bool = False, scale: float = 1.0
    ) -> tuple[Penalty, Any]:
        """``(self(x), gradient)`` in one pass; see ``l1l2_rs.value_and_grad``."""
        return call(_native_value_and_grad, x, *self._terms(), out, accumulate, scale)

    def prox_(self, x: Any, lr: float) -> Any:
        """The proximal step of ``lr * self`` on ``x``, in place; returns ``x``."""
        return _l1l2_rs.prox_(x, lr, *self._terms())

    def penalty_many(self, xs: Any) -> float:
        """The float64 sum, in list order, of ``self(x)`` for every ``x`` of ``xs``."""
        return call_many(_l1l2_rs.penalty_many, xs, *self._terms())

    def value_and_grad_many(
        self, xs: Any, *, outs: Any = None, accumulate: bool = False, scale: float = 1.0
    ) -> tuple[float, list[Any]]:
        """``value_and_grad`` of every ``x`` of ``xs`` in one call: ``(total, gradients)``."""
        return call_many(_l1l2_rs.value_and_grad_many, xs, *self._terms(), outs, accumulate, scale)

    def prox_many_(self, xs: Any, lr: float) -> Any:
        """``prox_`` of every array of ``xs`` in one call; returns ``xs``."""
        return _l1l2_rs.prox_many_(xs, lr, *self._terms())


def _legacy_l(cls_name: str, name: str, value: float | None, legacy: object) -> object:
    """Resolve TF 2.4's ``l=`` keyword of ``L1``/``L2``."""
    if legacy is _MISSING:
        return value
    if value is not None:
        raise TypeError(f"{cls_name}() got both {name}= and its legacy alias l=")
    warnings.warn(
        f"{cls_name}(l=...) is deprecated (TF 2.4 spelling); use {cls_name}({name}=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    return legacy


class L1(_Builtin):
    """``l1 * sum(|x|)``. ``L1(0)`` still evaluates the sum: NaN in ``x`` propagates (as Keras)."""

    _CHECKS: ClassVar[dict[str, Callable[[object], object]]] = {"l1": _factor_check("l1", 0.01)}
    l1: float

    def __init__(self, l1: float | None = None, *, l: Any = _MISSING) -> None:  # noqa: E741
        self.l1 = _legacy_l("L1", "l1", l1, l)  # type: ignore[assignment]

    def _terms(self) -> tuple[float | None, float | None]:
        return self.l1, None

    def get_config(self) -> dict[str, float]:
        return {"l1": self.l1}


class L2(_Builtin):
    """``l2 * sum(x**2)``. ``L2(0)`` still evaluates the sum: NaN in ``x`` propagates (as Keras)."""

    _CHECKS: ClassVar[dict[str, Callable[[object], object]]] = {"l2": _factor_check("l2", 0.01)}
    l2: float

    def __init__(self, l2: float | None = None, *, l: Any = _MISSING) -> None:  # noqa: E741
        self.l2 = _legacy_l("L2", "l2", l2, l)  # type: ignore[assignment]

    def _terms(self) -> tuple[float | None, float | None]:
        return None, self.l2

    def get_config(self) -> dict[str, float]:
        return {"l2": self.l2}


class L1L2(_Builtin):
    """``l1 * sum(|x|) + l2 * sum(x**2)``; a zero factor drops its term entirely (as in Keras)."""

    _CHECKS: ClassVar[dict[str, Callable[[object], object]]] = {
        "l1": _factor_check("l1", 0.0),
        "l2": _factor_check("l2", 0.0),
    }
    l1: float
    l2: float

    def __init__(self, l1: float | None = None, l2: float | None = None) -> None:
        self.l1 = l1  # type: ignore[assignment]
        self.l2 = l2  # type: ignore[assignment]

    def _terms(self) -> tuple[float | None, float | None]:
        return self.l1 or None, self.l2 or None

    def get_config(self) -> dict[str, float]:
        return {"l1": self.l1, "l2": self.l2}


l1 = L1
l2 = L2


def l1_l2(l1: float | None = 0.01, l2: float | None = 0.01) -> L1L2:
    """``L1L2`` with TF 2.4's defaults of 0.01 for both factors; a ``None`` factor is 0.0 (as in
    tf-keras and Keras 3)."""
    return L1L2(l1=l1, l2=l2)


def _mode(value: object) -> str:
    if isinstance(value, str) and value in ("rows", "columns"):
        return value
    raise ValueError(
        f"Invalid value for argument `mode`: expected 'rows' or 'columns', got {_describe(value)}"
    )


class OrthogonalRegularizer(_Validated):
    """Keras 3's ``OrthogonalRegularizer``: how far the rows (``mode="rows"``) or the columns
    (``mode="columns"``) of a matrix are from being orthogonal to each other.

    The penalty is ``factor`` times the mean, over every pair of distinct rows (columns), of the
    absolute dot product of the two rows (columns) scaled to unit L2 norm. It is computed by the
    native core in float64 and returned as a numpy scalar of the input's float dtype (float64 for
    integer and bool input). An all-zero row stays zero (it adds 0 to every pair it is in, as in
    Keras); a matrix with fewer than two rows (columns) has no pair and a penalty of 0.0 (Keras
    divides by zero pairs and returns NaN); NaN or infinity in the matrix gives NaN. The input
    must be a matrix (rank 2). Traced framework tensors get the same formula in the framework's
    ops, so that it stays differentiable (see ``l1l2_rs._backend``).
    """

    _CHECKS: ClassVar[dict[str, Callable[[object], object]]] = {
        "factor": _factor_check("factor", None),
        "mode": _mode,
    }
    factor: float
    mode: str

    def __init__(self, factor: float = 0.01, mode: str = "rows") -> None:
        self.factor = factor
        self.mode = mode

    def __call__(self, x: Any) -> Penalty:
        if isinstance(x, np.ndarray) and x.dtype.kind in "biu":
            x = x.astype(np.float64)  # the core reads floats; integers are exact in float64
        try:
            return _native_orthogonal_penalty(x, self.factor, self.mode)
        except NotReadable:
            return orthogonal_penalty_of_unreadable(
                _native_orthogonal_penalty, x, self.factor, self.mode
            )

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "mode": self.mode}


orthogonal_regularizer = OrthogonalRegularizer


def _l1l2_terms(l1: object, l2: object) -> tuple[float | None, float | None]:
    """The terms of ``L1L2(l1, l2)``: a zero factor drops its term."""
    return _factor("l1", l1, 0.0) or None, _factor("l2", l2, 0.0) or None


def penalty(x: Any, l1: float | None = 0.0, l2: float | None = 0.0) -> Penalty:
    """``L1L2(l1, l2)(x)`` without building an object: a numpy scalar of ``x``'s float dtype (a
    backend tensor for a traced or differentiable ``x``, as the regularizer call)."""
    terms = _l1l2_terms(l1, l2)
    try:
        return _native_penalty(x, *terms)
    except NotReadable:
        return penalty_of_unreadable(_native_penalty, x, *terms)


def sums(x: Any) -> tuple[float, float]:
    """``(sum(|x|), sum(x**2))`` as Python floats, computed in float64 in one pass."""
    return call(_l1l2_rs.sums, x)


def value_and_grad(
    x: Any,
    l1: float | None = 0.0,
    l2: float | None = 0.0,
    *,
    out: Any = None,
    accumulate: bool = False,
    scale: float = 1.0,
) -> tuple[Penalty, Any]:
    """The penalty of ``L1L2(l1, l2)`` at ``x`` and its gradient, in one pass over ``x``.

    The gradient ``l1 * sign(x) + 2 * l2 * x`` (``sign(0) = 0``, as in PyTorch and TensorFlow),
    times ``scale``, is written into ``out`` (a new array like ``x`` when None), or with
    ``accumulate=True`` added to it: ``out += scale * gradient``. ``scale`` (finite; e.g. a backward
    pass's incoming gradient or ``1 / batch``) multiplies the gradient only. The penalty has the
    bits of ``penalty(x, l1, l2)``. ``out`` must have ``x``'s dtype and shape and must not share
    memory with ``x``.
    """
    return call(_native_value_and_grad, x, *_l1l2_terms(l1, l2), out, accumulate, scale)


def grad(x: Any, l1: float | None = 0.0, l2: float | None = 0.0, *, out: Any = None) -> Any:
    """The gradient of ``L1L2(l1, l2)`` at ``x``; see ``value_and_grad``."""
    return value_and_grad(x, l1, l2, out=out)[1]


def prox_(x: Any, lr: float, l1: float | None = 0.0, l2: float | None = 0.0) -> Any:
    """The proximal step of ``lr * L1L2(l1, l2)``, in place; returns ``x``.

    ``x <- sign(x) * max(|x| - lr * l1, 0) / (1 + 2 * lr * l2)``: soft-thresholding, then
    shrinkage. ``x`` must be a writeable float numpy array; ``lr`` finite and >= 0.
    """
    return _l1l2_rs.prox_(x, lr, *_l1l2_terms(l1, l2))


def sums_many(xs: Any) -> list[tuple[float, float]]:
    """``sums(x)`` of every array of ``xs``, in one call (each with the bits of the single call)."""
    return call_many(_l1l2_rs.sums_many, xs)


def penalty_many(xs: Any, l1: float | None = 0.0, l2: float | None = 0.0) -> float:
    """The float64 sum, in list order, of ``penalty(x, l1, l2)`` for every ``x`` of ``xs``."""
    return call_many(_l1l2_rs.penalty_many, xs, *_l1l2_terms(l1, l2))


def value_and_grad_many(
    xs: Any,
    l1: float | None = 0.0,
    l2: float | None = 0.0,
    *,
    outs: Any = None,
    accumulate: bool = False,
    scale: float = 1.0,
) -> tuple[float, list[Any]]:
    """``value_and_grad`` of every array of ``xs`` in one call: ``(total, gradients)``.

    ``total`` is as ``penalty_many``; each gradient has the bits of the single call. Every
    argument is checked before anything is written.
    """
    return call_many(
        _l1l2_rs.value_and_grad_many, xs, *_l1l2_terms(l1, l2), outs, accumulate, scale
    )


def prox_many_(xs: Any, lr: float, l1: float | None = 0.0, l2: float | None = 0.0) -> Any:
    """``prox_`` of every array of ``xs`` in one call; returns ``xs``."""
    return _l1l2_rs.prox_many_(xs, lr, *_l1l2_terms(l1, l2))


# ---------------------------------------------------------------------------------------------
# The identifier registry: one place for every name `get` and `deserialize` understand.

#: Built-in class names, as Keras writes them in configs.
_BUILTIN_CLASSES: dict[str, type[Regularizer]] = {
    "L1": L1,
    "L2": L2,
    "L1L2": L1L2,
    "OrthogonalRegularizer": OrthogonalRegularizer,
}

#: String identifiers and what they build. ``"l1_l2"`` is TF 2.4's function with its 0.01 defaults.
_STRING_IDENTIFIERS: dict[str, Callable[[], Regularizer]] = {
    "l1": L1,
    "L1": L1,
    "l2": L2,
    "L2": L2,
    "l1_l2": l1_l2,
    "L1L2": L1L2,
    "l1l2": L1L2,
    "orthogonal_regularizer": OrthogonalRegularizer,
    "OrthogonalRegularizer": OrthogonalRegularizer,
}

#: User classes registered with `register_regularizer`, by "package>name".
_REGISTERED: dict[str, type[Regularizer]] = {}


def register_regularizer(
    package: str = "Custom", name: str | None = None
) -> Callable[[type[_R]], type[_R]]:
    """Class decorator registering a ``Regularizer`` subclass under ``"package>name"``.

    ``name`` defaults to the class name. The class is then found by ``get``, ``deserialize`` and
    Keras-format configs by that key or by its bare name. Registering the same class again is a
    no-op; a different class under a taken key raises ``ValueError``.
    """
    if not isinstance(package, str) or ">" in package:
        raise ValueError(f"package must be a string without '>', got {package!r}")

    def decorator(cls: type[_R]) -> type[_R]:
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise TypeError(f"register_regularizer expects a Regularizer subclass, got {cls!r}")
        key = f"{package}>{name or cls.__name__}"
        existing = _REGISTERED.get(key)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{key!r} is already registered to {existing.__module__}.{existing.__qualname__}"
            )
        _REGISTERED[key] = cls
        cls._l1l2_registered_name = key  # type: ignore[attr-defined]
        _keras_registry.register(cls, key)
        return cls

    return decorator


def _registered_name(cls: type[Regularizer]) -> str | None:
    key: str | None = cls.__dict__.get("_l1l2_registered_name")
    return key


def _accepted_names() -> str:
    names = [*_STRING_IDENTIFIERS, *_REGISTERED, *(key.split(">", 1)[1] for key in _REGISTERED)]
    return ", ".join(repr(name) for name in dict.fromkeys(names))


def _find_class(
    name: str, custom_objects: dict[str, Any] | None = None
) -> type[Regularizer] | Callable[..., Any] | None:
    if custom_objects and name in custom_objects:
        found: type[Regularizer] | Callable[..., Any] = custom_objects[name]
        return found
    if name in _REGISTERED:
        return _REGISTERED[name]
    package, _, bare_name = name.rpartition(">")
    if package == _KERAS_PACKAGE and bare_name in _BUILTIN_CLASSES:
        return _BUILTIN_CLASSES[bare_name]  # the key Keras writes for our classes
    by_bare_name = [cls for key, cls in _REGISTERED.items() if key.split(">", 1)[1] == name]
    if len(by_bare_name) == 1:
        return by_bare_name[0]
    return _BUILTIN_CLASSES.get(name)


@overload
def serialize(regularizer: Regularizer, format: str = "keras3") -> dict[str, Any]: ...
@overload
def serialize(regularizer: None, format: str = "keras3") -> None: ...


def serialize(regularizer: Regularizer | None, format: str = "keras3") -> dict[str, Any] | None:
    """The config dict of a regularizer: Keras 3's format, or TF 2.4's with ``format="tf2"``;
    ``None`` for ``None`` (no regularizer), as in Keras.

    Built-in classes serialize under Keras' own names (``module: "keras.regularizers"``): a
    portable config that Keras alone loads as its class, and ``deserialize`` as ours. Keras itself
    (a layer's ``get_config``, ``.keras`` files, ``clone_model``) writes our classes under their
    registered key ``"l1l2_rs>L1L2"`` and loads them back as l1l2_rs' classes.
    """
    if format not in ("keras3", "tf2"):
        raise ValueError(f"format must be 'keras3' or 'tf2', got {_describe(format)}")
    if regularizer is None:
        return None
    if not isinstance(regularizer, Regularizer):
        raise TypeError(f"serialize expects a Regularizer or None, got {_describe(regularizer)}")
    cls = type(regularizer)
    config = regularizer.get_config()
    builtin = _BUILTIN_CLASSES.get(cls.__name__) is cls
    registered = None if builtin else (_registered_name(cls) or cls.__name__)
    if format == "tf2":
        return {"class_name": registered or cls.__name__, "config": config}
    return {
        "module": _KERAS_MODULE if builtin else None,
        "class_name": cls.__name__,
        "config": config,
        "registered_name": registered,
    }


def deserialize(
    config: dict[str, Any] | str, custom_objects: dict[str, Any] | None = None
) -> Regularizer | Callable[..., Any]:
    """A regularizer from a config in Keras 3's or TF 2.4's format (or a string identifier).

    A missing (or ``None``) ``"config"`` means the class defaults, as in Keras; anything else that
    is not a dict raises ``ValueError``, and unknown keys in it raise ``TypeError``. Messages show
    bad values shortened (nesting and long strings cut), whatever their size or depth.
    """
    if isinstance(config, str):
        if custom_objects and config in custom_objects:
            return _instantiate(custom_objects[config], {})
        return _from_string(config)
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ValueError(
            "a regularizer config must be a dict with a string 'class_name', got "
            + _describe(config)
        )
    class_name: str = config["class_name"]
    registered_name = config.get("registered_name")
    cls = None
    if isinstance(registered_name, str):
        cls = _find_class(registered_name, custom_objects)
    if cls is None:
        cls = _find_class(class_name, custom_objects)
    if cls is None:
        raise ValueError(
            f"Unknown regularizer class {_describe(class_name)}; accepted: "
            f"{', '.join(map(repr, _BUILTIN_CLASSES))}, registered classes and custom_objects "
            f"({_accepted_names()})"
        )
    arguments = config.get("config")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(
            f"'config' of a regularizer must be a dict (or None for the defaults), got "
            f"{_describe(arguments)}"
        )
    return _instantiate(cls, arguments)


def _instantiate(cls: Any, arguments: dict[str, Any]) -> Regularizer | Callable[..., Any]:
    if isinstance(cls, type) and issubclass(cls, Regularizer):
        return cls.from_config(dict(arguments))
    if callable(cls) and not arguments:
        function: Callable[..., Any] = cls  # a plain function registered as a custom object
        return function
    raise ValueError(
        f"cannot build a regularizer from {_describe(cls)} with config {_describe(arguments)}"
    )


def _from_string(identifier: str) -> Regularizer:
    factory = _STRING_IDENTIFIERS.get(identifier)
    if factory is not None:
        return factory()
    cls = _find_class(identifier)
    if isinstance(cls, type) and issubclass(cls, Regularizer):
        return cls()
    raise ValueError(
        f"Could not interpret regularizer identifier: {_describe(identifier)}; "
        f"accepted names: {_accepted_names()}"
    )


def get(identifier: Any) -> Regularizer | Callable[..., Any] | None:
    """Resolve a regularizer identifier the way Keras' ``regularizers.get`` does.

    ``None`` -> ``None``; a regularizer or any callable -> itself; a ``Regularizer`` subclass -> an
    instance with default arguments; a string -> the named regularizer (see the README); a dict ->
    ``deserialize(identifier)``.
    """
    if identifier is None:
        return None
    if isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Regularizer):
        return identifier()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        return _from_string(identifier)
    if callable(identifier):
        function: Callable[..., Any] = identifier
        return function
    raise ValueError(f"Could not interpret regularizer identifier: {_describe(identifier)}")


def _register_with_keras() -> None:
    """Make Keras 3 and tf-keras save and load the built-in classes as ours (lazily)."""
    for cls in _BUILTIN_CLASSES.values():
        _keras_registry.register(cls, f"{_KERAS_PACKAGE}>{cls.__name__}")
    _keras_registry.install()


_register_with_keras()
