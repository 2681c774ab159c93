"""The JAX adapter (``l1l2_rs.jax``): the differentiable penalty, the prox step, the optax-style
transformations and the native (XLA FFI) implementation.

References are independent of l1l2_rs: exact ``fractions.Fraction`` values (``conftest.exact_sums``)
rounded once, or the closed-form gradient evaluated exactly. The jnp implementation computes in
float32 (float64 for float64 leaves) with XLA's reductions, so it is held to the textbook bound of
a float sum of ``n`` terms, ``(n + 4) * u`` relative (``u`` the unit roundoff); the native one to
the core's promise (correct rounding within 1 ulp) and to bit equality with ``l1l2_rs`` where the
same dtype rules apply.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.test_util
import ml_dtypes
import numpy as np
import optax
import pytest

import l1l2_rs
from conftest import exact_sums, ulp_of
from l1l2_rs.jax import add_l1l2_grads, apply_l1l2_prox, penalty, prox

IMPLEMENTATIONS = ["jnp", "native"]
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


@pytest.fixture
def x64() -> Iterator[None]:
    """float64 arrays for the duration of one test (the flag is global: restored afterwards)."""
    with jax.enable_x64(True):
        yield


def exact_penalty(leaves: list[np.ndarray], l1: float, l2: float) -> Fraction:
    total = Fraction(0)
    for leaf in leaves:
        abs_sum, squares = exact_sums(np.asarray(leaf))
        if l1:
            total += Fraction(l1) * abs_sum
        if l2:
            total += Fraction(l2) * squares
    return total


def exact_grad(x: np.ndarray, l1: float, l2: float) -> list[Fraction]:
    wide = np.asarray(x).astype(np.float64).ravel().tolist()
    return [
        (Fraction(l1) * ((v > 0) - (v < 0)) if l1 else 0)
        + (2 * Fraction(l2) * Fraction(v) if l2 else 0)
        for v in wide
    ]


def assert_relative(got: Any, exact: Fraction, bound: float) -> None:
    error = abs(Fraction(float(got)) - exact)
    assert error <= Fraction(bound) * abs(exact), (float(got), float(exact), float(error))


def compute_name(dtype: Any) -> str:
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


def sample(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))


# ---------------------------------------------------------------------------------------------
# Values and gradients against exact references


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_value_against_exact(implementation: str, dtype: Any, rng: np.random.Generator) -> None:
    x = sample(rng, (37, 29), dtype)
    l1, l2 = 0.01, 0.25
    value = penalty(x, l1, l2, implementation=implementation)
    assert value.dtype == jnp.float32
    exact = exact_penalty([np.asarray(x)], l1, l2)
    if implementation == "native":  # the core's sums in float64, rounded once to float32
        assert abs(float(value) - float(exact)) <= ulp_of(float(exact), np.float32)
    else:
        assert_relative(value, exact, (x.size + 4) * UNIT_ROUNDOFF["float32"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float64_value_and_grad_against_exact(
    implementation: str, x64: None, rng: np.random.Generator
) -> None:
    x = jnp.asarray(rng.standard_normal(1001))
    assert x.dtype == jnp.float64
    l1, l2 = 1e-3, 0.3
    value, grad = jax.value_and_grad(penalty)(x, l1, l2, implementation=implementation)
    assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
    exact = exact_penalty([np.asarray(x)], l1, l2)
    bound = 4 * UNIT_ROUNDOFF["float64"] if implementation == "native" else (x.size + 4) * 2.0**-53
    assert_relative(value, exact, bound)
    for got, want in zip(np.asarray(grad).tolist(), exact_grad(np.asarray(x), l1, l2), strict=True):
        assert abs(Fraction(got) - want) <= Fraction(2.0**-52) * abs(want)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_grad_against_exact(implementation: str, dtype: Any, rng: np.random.Generator) -> None:
    x = sample(rng, (300,), dtype).at[:3].set(0.0)
    l1, l2 = 0.125, 0.75
    grad = jax.jit(jax.grad(lambda v: penalty(v, l1, l2, implementation=implementation)))(x)
    assert grad.dtype == x.dtype
    assert np.all(np.asarray(grad[:3], np.float32) == 0)
    # jnp: float32 arithmetic, then one rounding to the leaf's dtype; native: correctly rounded.
    slack = 4 * UNIT_ROUNDOFF["float32"]
    for got, want, v in zip(
        np.asarray(grad, np.float64).tolist(),
        exact_grad(np.asarray(x), l1, l2),
        np.asarray(x, np.float64).tolist(),
        strict=True,
    ):
        magnitude = l1 + 2 * l2 * abs(v)
        tolerance = ulp_of(float(want), dtype) + slack * magnitude
        assert abs(got - float(want)) <= tolerance, (v, got, float(want))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradient_at_zero_is_zero(implementation: str) -> None:
    x = jnp.array([0.0, -0.0, 1.0, -1.0], jnp.float32)
    grad = jax.grad(penalty)(x, 0.5, 0.0, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 0.0, 0.5, -0.5])
    assert list(np.signbit(np.asarray(grad))) == [False, True, False, True]  # -0.0 at -0.0
    # JAX's own derivative of |x| at 0 is 1: the plain formula differs exactly there.
    plain = jax.grad(lambda v: 0.5 * jnp.sum(jnp.abs(v)))(x)
    assert float(plain[0]) == 0.5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_check_grads_away_from_zero(implementation: str, x64: None) -> None:
    x = jnp.array([[0.5, -1.25, 2.0], [-0.75, 3.0, 1.5]])
    tree = {"a": x, "b": jnp.array([0.3, -0.4])}
    jax.test_util.check_grads(
        lambda t: penalty(t, 0.25, 0.5, implementation=implementation),
        (tree,),
        order=1,
        modes=("fwd", "rev"),
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_factor_drops_its_term(implementation: str) -> None:
    x = jnp.array([1.0, jnp.nan, -2.0, jnp.inf])
    assert float(penalty(x, implementation=implementation)) == 0.0
    assert np.isnan(float(penalty(x, 1.0, implementation=implementation)))
    finite = jnp.array([1.0, -2.0])
    assert float(penalty(finite, 0.0, 0.5, implementation=implementation)) == 2.5
    assert float(penalty(finite, 0.5, 0.0, implementation=implementation)) == 1.5
    grad = jax.grad(penalty)(finite, 0.0, 0.5, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(grad), [1.0, -2.0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float16_squares_do_not_overflow(implementation: str) -> None:
    x = jnp.full((4,), 60000.0, jnp.float16)  # x**2 overflows float16, not float32
    value, grad = jax.value_and_grad(penalty)(x, 0.0, 1e-6, implementation=implementation)
    assert_relative(value, exact_penalty([np.asarray(x)], 0.0, 1e-6), 8 * UNIT_ROUNDOFF["float32"])
    np.testing.assert_array_equal(np.asarray(grad), np.full(4, np.float16(2e-6 * 60000.0)))


def test_native_bfloat16_sums_in_float64() -> None:
    # bfloat16 has float32's range: 1e20**2 overflows float32 (the jnp implementation gives inf),
    # while the native core sums in float64 and rounds only the penalty to float32.
    x = jnp.full((4,), 1e20, jnp.bfloat16)
    value = penalty(x, 0.0, 1e-30, implementation="native")
    exact = exact_penalty([np.asarray(x)], 0.0, 1e-30)
    assert abs(float(value) - float(exact)) <= ulp_of(float(exact), np.float32)
    assert np.isinf(float(penalty(x, 0.0, 1e-30, implementation="jnp")))


# ---------------------------------------------------------------------------------------------
# Transformations and pytrees


def mixed_tree(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "dense": {"w": sample(rng, (5, 3), jnp.float32), "b": sample(rng, (3,), jnp.float32)},
        "half": sample(rng, (4, 2, 2), jnp.float16),
        "brain": sample(rng, (7,), jnp.bfloat16),
        "scalar": jnp.array(-1.5, jnp.float32),
        "empty": jnp.zeros((0, 3), jnp.float32),
        "none": None,
    }


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pytree_value_and_grad(implementation: str, rng: np.random.Generator) -> None:
    tree = mixed_tree(rng)
    l1, l2 = 0.05, 0.5
    function = jax.jit(
        jax.value_and_grad(lambda t: penalty(t, l1, l2, implementation=implementation))
    )
    value, grads = function(tree)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    total = sum(jnp.size(leaf) for leaf in leaves)
    assert value.dtype == jnp.float32
    assert_relative(value, exact_penalty(leaves, l1, l2), (total + 8) * UNIT_ROUNDOFF["float32"])
    assert jax.tree.structure(grads) == jax.tree.structure(tree)
    for leaf, grad in zip(jax.tree.leaves(tree), jax.tree.leaves(grads), strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        single = jax.grad(penalty)(leaf, l1, l2, implementation=implementation)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(single))


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "auto"])
def test_vmap_gives_per_example_penalties(implementation: str, rng: np.random.Generator) -> None:
    batch = sample(rng, (6, 4, 5), jnp.float32)
    other = sample(rng, (3,), jnp.float32)  # not batched
    l1, l2 = 0.1, 0.2

    def per_example(x: jax.Array) -> jax.Array:
        return penalty({"x": x, "o": other}, l1, l2, implementation=implementation)

    values = jax.jit(jax.vmap(per_example))(batch)
    grads = jax.vmap(jax.grad(per_example))(batch)
    assert values.shape == (6,)
    for row, value, grad in zip(batch, values, grads, strict=True):
        leaves = [np.asarray(row), np.asarray(other)]
        assert_relative(value, exact_penalty(leaves, l1, l2), 32 * UNIT_ROUNDOFF["float32"])
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(jax.grad(per_example)(row)))


def test_bad_arguments_raise_clear_errors() -> None:
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="l1 must be a finite non-negative"):
        penalty(x, -1.0)
    with pytest.raises(ValueError, match="l2 must be a finite non-negative"):
        penalty(x, 0.0, float("nan"))
    with pytest.raises(TypeError, match=r"params\['steps'\] has dtype int32"):
        penalty({"w": x, "steps": jnp.arange(3)}, 0.1)
    with pytest.raises(TypeError, match="l1 must be a concrete number"):
        jax.jit(lambda w, f: penalty(w, f))(x, 0.5)
    with pytest.raises(ValueError, match="implementation must be one of"):
        penalty(x, 0.1, implementation="cuda")
    with pytest.raises(ValueError, match="lr must be a finite non-negative"):
        prox(x, -0.1, 0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        add_l1l2_grads(0.1).update(x, (), None)


# ---------------------------------------------------------------------------------------------
# The proximal step


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_prox_against_exact(dtype: Any, rng: np.random.Generator) -> None:
    x = sample(rng, (200,), dtype)
    lr, l1, l2 = 0.5, 0.25, 0.125
    got = jax.jit(lambda v, rate: prox(v, rate, l1, l2))(x, lr)  # lr traced
    assert got.dtype == x.dtype
    pairs = zip(
        np.asarray(got, np.float64).tolist(), np.asarray(x, np.float64).tolist(), strict=True
    )
    for value, v in pairs:
        shrunk = max(abs(Fraction(v)) - Fraction(lr) * Fraction(l1), Fraction(0))
        want = (1 if v > 0 else -1) * shrunk / (1 + 2 * Fraction(lr) * Fraction(l2))
        tolerance = ulp_of(float(want), dtype) + 4 * UNIT_ROUNDOFF["float32"] * abs(v)
        assert abs(value - float(want)) <= tolerance
        if abs(v) <= lr * l1:
            assert value == 0.0


def test_prox_matches_the_native_in_place_step(rng: np.random.Generator) -> None:
    x = np.asarray(sample(rng, (64,), jnp.float32))
    expected = l1l2_rs.prox_(x.copy(), 0.1, 0.5, 0.25)
    got = np.asarray(prox({"w": jnp.asarray(x)}, 0.1, 0.5, 0.25)["w"])
    np.testing.assert_allclose(got, expected, rtol=4 * UNIT_ROUNDOFF["float32"], atol=0)
    np.testing.assert_array_equal(got == 0, expected == 0)


# ---------------------------------------------------------------------------------------------
# Training


def init_mlp(rng: np.random.Generator) -> dict[str, jax.Array]:
    # Random biases too: no parameter starts at exactly 0, where jnp.abs's derivative is 1.
    return {
        "w1": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
        "b1": jnp.asarray(0.1 * rng.standard_normal(8), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((8, 1)), jnp.float32),
        "b2": jnp.asarray(0.1 * rng.standard_normal(1), jnp.float32),
    }


def data_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


L1, L2, LR, STEPS = 1e-2, 1e-2, 0.1, 20


def train(loss: Any, params: Any, x: jax.Array, y: jax.Array) -> Any:
    step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - LR * g, p, jax.grad(loss)(p, x, y)))
    for _ in range(STEPS):
        params = step(params)
    return params


def plain_penalty(params: Any) -> jax.Array:
    leaves = jax.tree.leaves(params)
    return sum(L1 * jnp.sum(jnp.abs(w)) + L2 * jnp.sum(w * w) for w in leaves)


@pytest.fixture
def regression(rng: np.random.Generator) -> tuple[Any, jax.Array, jax.Array]:
    x = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 1)), jnp.float32)
    return init_mlp(rng), x, y


def assert_trees_close(a: Any, b: Any, rtol: float, atol: float = 0.0) -> None:
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(left), np.asarray(right), rtol=rtol, atol=atol)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sgd_with_penalty_matches_plain_formula(
    implementation: str, regression: tuple[Any, jax.Array, jax.Array]
) -> None:
    params, x, y = regression

    def ours(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return data_loss(p, x, y) + penalty(p, L1, L2, implementation=implementation)

    def plain(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return data_loss(p, x, y) + plain_penalty(p)

    trained = train(ours, params, x, y)
    assert_trees_close(trained, train(plain, params, x, y), rtol=1e-5, atol=1e-6)
    unregularized = train(data_loss, params, x, y)
    difference = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(unregularized), strict=True)
    )
    assert difference > 1e-3


def run_optax(optimizer: Any, params: Any, x: jax.Array, y: jax.Array) -> Any:
    @jax.jit
    def step(p: Any, state: Any) -> tuple[Any, Any]:
        updates, state = optimizer.update(jax.grad(data_loss)(p, x, y), state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(STEPS):
        params, state = step(params, state)
    return params


def test_optax_add_l1l2_grads_matches_hand_written(
    regression: tuple[Any, jax.Array, jax.Array],
) -> None:
    params, x, y = regression
    optimizer = optax.chain(add_l1l2_grads(L1, L2), optax.sgd(LR))
    chained = run_optax(optimizer, params, x, y)
    by_hand = train(lambda p, x, y: data_loss(p, x, y) + penalty(p, L1, L2), params, x, y)
    assert_trees_close(chained, by_hand, rtol=1e-5, atol=1e-6)


def test_optax_proximal_sgd_matches_hand_written(
    regression: tuple[Any, jax.Array, jax.Array],
) -> None:
    params, x, y = regression
    l1 = 0.05  # large enough that some weights reach exactly 0
    chained = run_optax(optax.chain(optax.sgd(LR), apply_l1l2_prox(LR, l1, L2)), params, x, y)

    @jax.jit
    def step(p: Any) -> Any:
        return prox(
            jax.tree.map(lambda w, g: w - LR * g, p, jax.grad(data_loss)(p, x, y)), LR, l1, L2
        )

    by_hand = params
    for _ in range(STEPS):
        by_hand = step(by_hand)
    assert_trees_close(chained, by_hand, rtol=1e-5, atol=1e-6)
    zeros = sum(int(jnp.sum(leaf == 0)) for leaf in jax.tree.leaves(chained))
    assert zeros > 0
    assert zeros == sum(int(jnp.sum(leaf == 0)) for leaf in jax.tree.leaves(by_hand))


def test_transformations_import_without_optax() -> None:
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "import jax.numpy as jnp\n"
        "from l1l2_rs.jax import GradientTransformation, add_l1l2_grads, apply_l1l2_prox\n"
        "t = add_l1l2_grads(0.5, 0.0)\n"
        "assert type(t) is GradientTransformation, type(t)\n"
        "p = jnp.array([1.0, 0.0, -2.0])\n"
        "u, _ = t.update(jnp.zeros(3), t.init(p), p)\n"
        "assert u.tolist() == [0.5, 0.0, -0.5], u\n"
        "t = apply_l1l2_prox(lambda count: 0.5, 1.0)\n"
        "u, s = t.update(jnp.zeros(3), t.init(p), p)\n"
        "assert (p + u).tolist() == [0.5, 0.0, -1.5] and int(s.count) == 1, (u, s)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_l1l2_rs_does_not_import_jax() -> None:
    code = "import sys, l1l2_rs; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bfloat16_is_ml_dtypes_bfloat16() -> None:  # the exact references read it through numpy
    assert np.dtype(jnp.bfloat16) == np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------
# The native implementation: the XLA FFI handlers


def native_call(target: str, operands: list[Any], results: Any, **attributes: Any) -> Any:
    l1l2_rs.jax._register_native()
    return jax.ffi.ffi_call(target, results)(*operands, **attributes)


SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"l1": -1.0, "l2": 0.0}, r"l1 must be a finite number >= 0, got -1\.0"),
        ({"l1": 0.5, "l2": float("inf")}, r"l2 must be a finite number >= 0, got inf"),
        ({"l1": 0.5}, "the attributes l1 and l2 are required"),
        ({"l1": 0.5, "l2": 0.1, "l3": 1.0}, 'unexpected attribute "l3"'),
        ({"l1": np.int32(1), "l2": 0.0}, "attribute l1 must be a float64 or float32 scalar"),
        ({"l1": "one", "l2": 0.0}, "attribute l1 must be a float scalar"),
    ],
)
def test_native_refuses_bad_attributes(attributes: dict[str, Any], message: str) -> None:
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        native_call("l1l2_rs_penalty", [jnp.ones(3)], SCALAR, **attributes)


def test_native_refuses_bad_operands_and_results() -> None:
    factors = {"l1": 0.5, "l2": 0.25}
    with pytest.raises(jax.errors.JaxRuntimeError, match="operand 1 has XLA dtype code 4"):
        native_call("l1l2_rs_penalty", [jnp.ones(3), jnp.arange(3)], SCALAR, **factors)
    with pytest.raises(jax.errors.JaxRuntimeError, match="2 operands need 3 results, got 2"):
        results = [SCALAR, jax.ShapeDtypeStruct((3,), jnp.float32)]
        native_call("l1l2_rs_value_and_grad", [jnp.ones(3), jnp.ones(2)], results, **factors)
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match=r"result 1 must have operand 0's dtype and the shape \[3\]",
    ):
        results = [SCALAR, jax.ShapeDtypeStruct((4,), jnp.float32)]
        native_call("l1l2_rs_value_and_grad", [jnp.ones(3)], results, **factors)
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match=r"leading dims must each be those of the penalty result's batch shape \[2\], or 1",
    ):
        batched = jax.ShapeDtypeStruct((2,), jnp.float32)
        native_call("l1l2_rs_penalty", [jnp.ones((3, 2))], batched, **factors)
    with pytest.raises(jax.errors.JaxRuntimeError, match="must be float32 or float64"):
        half = jax.ShapeDtypeStruct((), jnp.float16)
        native_call("l1l2_rs_penalty", [jnp.ones(3)], half, **factors)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_native_matches_l1l2_rs_bit_for_bit(dtype: Any, rng: np.random.Generator) -> None:
    x = sample(rng, (50_000,), dtype).at[:5].set(0.0)
    l1, l2 = 1e-4, 1e-3
    value, grad = jax.jit(
        jax.value_and_grad(lambda v: penalty(v, l1, l2, implementation="native"))
    )(x)
    array = np.asarray(x)
    # The same core: the gradient has l1l2_rs.grad's bits. The penalty is rounded once to
    # float32 (l1l2_rs.penalty rounds to the input's dtype, the same rule for float32 only).
    np.testing.assert_array_equal(np.asarray(grad), l1l2_rs.grad(array, l1, l2))
    sum_abs, sum_squares = l1l2_rs.sums(array)
    assert np.float32(value) == np.float32(l1 * sum_abs + l2 * sum_squares)
    if dtype == jnp.float32:
        assert np.float32(value) == l1l2_rs.penalty(array, l1, l2)
    assert np.float32(penalty(x, l1, l2, implementation="native")) == np.float32(value)


def test_native_float64_matches_l1l2_rs_bit_for_bit(x64: None, rng: np.random.Generator) -> None:
    tree = {
        "a": jnp.asarray(rng.standard_normal((300, 7))),
        "b": jnp.asarray(rng.standard_normal(9)),
    }
    value, grads = jax.value_and_grad(lambda t: penalty(t, 0.1, 0.2, implementation="native"))(tree)
    leaves = [np.asarray(tree["a"]), np.asarray(tree["b"])]
    assert float(value) == l1l2_rs.penalty_many(leaves, 0.1, 0.2)
    np.testing.assert_array_equal(np.asarray(grads["a"]), l1l2_rs.grad(leaves[0], 0.1, 0.2))


def test_native_pytree_is_one_call_with_per_leaf_rounding(rng: np.random.Generator) -> None:
    tree = mixed_tree(rng)
    function = jax.jit(lambda t: penalty(t, 0.05, 0.5, implementation="native"))
    hlo = function.lower(tree).compile().as_text()
    assert hlo.count('custom_call_target="l1l2_rs_penalty"') == 1
    # Each leaf's penalty rounded to float32, added in float64 in leaf order, rounded once.
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        sum_abs, sum_squares = l1l2_rs.sums(np.asarray(leaf))
        total += float(np.float32(0.05 * sum_abs + 0.5 * sum_squares))
    assert np.float32(function(tree)) == np.float32(total)


def test_native_nested_vmap(rng: np.random.Generator) -> None:
    batch = sample(rng, (3, 4, 10), jnp.float32)
    shared = sample(rng, (5,), jnp.float16)

    def one(x: jax.Array) -> jax.Array:
        return penalty([x, shared], 0.5, 0.25, implementation="native")

    values = jax.jit(jax.vmap(jax.vmap(one)))(batch)
    grads = jax.vmap(jax.vmap(jax.grad(one)))(batch)
    assert values.shape == (3, 4) and grads.shape == batch.shape
    for i in range(3):
        for j in range(4):
            single = float(one(batch[i, j]))  # the same core; its bits depend on the address
            assert abs(float(values[i, j]) - single) <= ulp_of(single, np.float32)
            np.testing.assert_array_equal(
                np.asarray(grads[i, j]), np.asarray(jax.grad(one)(batch[i, j]))
            )


def test_auto_uses_the_native_call_on_cpu(rng: np.random.Generator) -> None:
    x = sample(rng, (1000,), jnp.float32)
    hlo = jax.jit(jax.value_and_grad(lambda v: penalty(v, 0.1, 0.2))).lower(x).compile().as_text()
    assert 'custom_call_target="l1l2_rs_value_and_grad"' in hlo
    auto = jax.value_and_grad(penalty)(x, 0.1, 0.2)
    native = jax.value_and_grad(penalty)(x, 0.1, 0.2, implementation="native")
    assert auto[0] == native[0]
    np.testing.assert_array_equal(np.asarray(auto[1]), np.asarray(native[1]))


def test_empty_pytree_and_empty_leaves() -> None:
    for implementation in IMPLEMENTATIONS:
        assert float(penalty({}, 1.0, 1.0, implementation=implementation)) == 0.0
        empty = jnp.zeros((0, 4))
        value, grad = jax.value_and_grad(penalty)(empty, 1.0, 1.0, implementation=implementation)
        assert float(value) == 0.0 and grad.shape == (0, 4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_second_derivatives(implementation: str) -> None:
    x = jnp.array([0.5, -1.5, 2.0])
    hessian = jax.hessian(lambda v: penalty(v, 0.25, 0.75, implementation=implementation))(x)
    np.testing.assert_array_equal(np.asarray(hessian), np.diag([1.5, 1.5, 1.5]))


def test_unregistrable_native_falls_back_in_auto_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a jax or jaxlib too old for the handlers: "auto" warns and uses jnp; "native" raises.
    monkeypatch.setattr(l1l2_rs.jax, "_registration_outcome", ["RuntimeError: too old"])
    monkeypatch.setattr(l1l2_rs.jax, "_warned", [])
    x = jnp.array([1.0, -2.0])
    with pytest.warns(RuntimeWarning, match=r"native implementation is unavailable \(Runtime"):
        assert float(penalty(x, 0.5, 0.25)) == 2.75
    with pytest.raises(RuntimeError, match="could not be registered with XLA"):
        penalty(x, 0.5, 0.25, implementation="native")


# ---------------------------------------------------------------------------------------------
# The hand-written XLA FFI structs against the installed jaxlib's c_api.h

ROOT = Path(__file__).resolve().parents[1]

#: The Rust names in src/xla_ffi.rs (module `abi`) of the c_api.h structs and enum values.
C_STRUCTS = {
    "ExtensionBase": "XLA_FFI_Extension_Base",
    "ApiVersion": "XLA_FFI_Api_Version",
    "TypeId": "XLA_FFI_TypeId",
    "Metadata": "XLA_FFI_Metadata",
    "MetadataExtension": "XLA_FFI_Metadata_Extension",
    "ErrorCreateArgs": "XLA_FFI_Error_Create_Args",
    "Api": "XLA_FFI_Api",
    "Buffer": "XLA_FFI_Buffer",
    "Args": "XLA_FFI_Args",
    "Rets": "XLA_FFI_Rets",
    "ByteSpan": "XLA_FFI_ByteSpan",
    "Scalar": "XLA_FFI_Scalar",
    "Attrs": "XLA_FFI_Attrs",
    "CallFrame": "XLA_FFI_CallFrame",
}
C_CONSTANTS = {
    "EXTENSION_METADATA": "XLA_FFI_Extension_Metadata",
    "ARG_BUFFER": "XLA_FFI_ArgType_BUFFER",
    "RET_BUFFER": "XLA_FFI_RetType_BUFFER",
    "ATTR_SCALAR": "XLA_FFI_AttrType_SCALAR",
    "ERROR_INVALID_ARGUMENT": "XLA_FFI_Error_Code_INVALID_ARGUMENT",
    "ERROR_INTERNAL": "XLA_FFI_Error_Code_INTERNAL",
    "STAGE_EXECUTE": "XLA_FFI_ExecutionStage_EXECUTE",
    "DTYPE_F16": "XLA_FFI_DataType_F16",
    "DTYPE_F32": "XLA_FFI_DataType_F32",
    "DTYPE_F64": "XLA_FFI_DataType_F64",
    "DTYPE_BF16": "XLA_FFI_DataType_BF16",
}
C_ENUM_TYPES = {"XLA_FFI_DataType", "XLA_FFI_ExecutionStage", "XLA_FFI_Extension_Type"}
C_ENUM_TYPES |= {"XLA_FFI_Error_Code", "int"}


def c_header() -> str:
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    return re.sub(r"//[^\n]*", "", header.read_text())


def c_fields(body: str) -> list[tuple[str, str]]:
    """(field name, kind) of a C struct body; kinds: pointer, size_t, int, int64, uint32 or the
    name of a nested struct."""
    fields = []
    for declaration in filter(None, (" ".join(d.split()) for d in body.split(";"))):
        entry = re.fullmatch(r"_XLA_FFI_API_STRUCT_FIELD\((\w+)\)", declaration)
        if entry:
            fields.append((entry.group(1), "pointer"))
            continue
        type_name, name = declaration.rsplit(" ", 1)
        type_name = type_name.removeprefix("const ").removeprefix("struct ")
        if "*" in type_name:
            kind = "pointer"
        elif type_name in C_ENUM_TYPES:
            kind = "int"
        else:
            kinds = {"int64_t": "int64", "XLA_FFI_Handler_Traits": "uint32"}
            kind = kinds.get(type_name, type_name)
        fields.append((name, kind))
    return fields


def rust_fields(body: str) -> list[tuple[str, str]]:
    fields = []
    for name, type_name in re.findall(r"pub (\w+): ([^,]+),", body):
        if type_name.startswith(("*", "Option<")):
            kind = "pointer"
        else:
            kinds = {"usize": "size_t", "c_int": "int", "i64": "int64", "u32": "uint32"}
            kind = kinds.get(type_name, C_STRUCTS.get(type_name, type_name))
        fields.append((name.removesuffix("_"), kind))
    return fields


def test_xla_ffi_structs_match_the_installed_header() -> None:
    header = c_header()
    c_structs = dict(re.findall(r"struct (XLA_FFI_\w+) \{(.*?)\}", header, re.S))
    source = (ROOT / "src" / "xla_ffi.rs").read_text()
    rust_structs = dict(re.findall(r"pub struct (\w+) \{(.*?)\n    \}", source, re.S))
    assert set(rust_structs) == {*C_STRUCTS, "Error"}
    for rust_name, c_name in C_STRUCTS.items():
        ours, theirs = rust_fields(rust_structs[rust_name]), c_fields(c_structs[c_name])
        # A prefix: the handlers read no field past the ones they transcribe (and check sizes).
        if rust_name == "Api":
            theirs = [("error_create" if n == "XLA_FFI_Error_Create" else n, k) for n, k in theirs]
        assert ours == theirs[: len(ours)], rust_name
    c_values = {name: int(value) for name, value in re.findall(r"(XLA_FFI_\w+) = (\d+)", header)}
    rust_values = dict(re.findall(r"pub const (\w+): c_int = (\d+);", source))
    assert {C_CONSTANTS[name]: int(value) for name, value in rust_values.items()} == {
        c_name: c_values[c_name] for c_name in C_CONSTANTS.values()
    }


def test_xla_ffi_api_version_is_the_installed_one() -> None:
    handlers, version = l1l2_rs._l1l2_rs.xla_ffi_handlers()
    header = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", c_header()))
    assert version == (int(header["MAJOR"]), int(header["MINOR"]))
    assert set(handlers) == {"l1l2_rs_penalty", "l1l2_rs_value_and_grad"}


def test_native_reads_strided_and_transposed_slices(rng: np.random.Generator) -> None:
    x = sample(rng, (40, 30), jnp.float32)

    def of_slice(v: jax.Array) -> jax.Array:
        return penalty(v[:, ::3].T, 0.1, 0.2, implementation="native")

    value, grad = jax.jit(jax.value_and_grad(of_slice))(x)
    piece = np.asarray(x)[:, ::3]
    assert np.float32(value) == l1l2_rs.penalty(piece, 0.1, 0.2)
    expected = np.zeros((40, 30), np.float32)
    expected[:, ::3] = l1l2_rs.grad(piece, 0.1, 0.2)
    np.testing.assert_array_equal(np.asarray(grad), expected)


# ---------------------------------------------------------------------------------------------
# vmap with operands that are not batched along every batch dimension


def test_native_vmap_unbatched_operand_value_and_grad(rng: np.random.Generator) -> None:
    # The shared leaf is read once for the whole batch; every batch element still gets its
    # penalty and its own copy of the shared leaf's gradient.
    batch = sample(rng, (5, 7), jnp.float32)
    shared = sample(rng, (4, 3), jnp.float32)
    l1, l2 = 0.5, 0.25

    def one(x: jax.Array, w: jax.Array) -> jax.Array:
        return penalty({"x": x, "w": w}, l1, l2, implementation="native")

    values, (grad_x, grad_w) = jax.jit(
        jax.vmap(jax.value_and_grad(one, argnums=(0, 1)), in_axes=(0, None))
    )(batch, shared)
    assert values.shape == (5,) and grad_x.shape == (5, 7) and grad_w.shape == (5, 4, 3)
    w = np.asarray(shared)
    for b in range(5):
        x = np.asarray(batch[b])
        assert_relative(values[b], exact_penalty([x, w], l1, l2), 4 * UNIT_ROUNDOFF["float32"])
        for got, leaf in ((grad_x[b], x), (grad_w[b], w)):
            for g, want in zip(np.ravel(got).tolist(), exact_grad(leaf, l1, l2), strict=True):
                assert abs(g - float(want)) <= ulp_of(float(want), np.float32)


def test_native_nested_vmap_operand_batched_along_one_dim(rng: np.random.Generator) -> None:
    # `w` is batched by the outer vmap only: its batch dims are (3, 1) of the batch (3, 4).
    xs = sample(rng, (3, 4, 6), jnp.float32)
    ws = sample(rng, (3, 5), jnp.float32)
    l1, l2 = 0.125, 0.75

    def one(x: jax.Array, w: jax.Array) -> jax.Array:
        return penalty([x, w], l1, l2, implementation="native")

    inner = jax.vmap(jax.value_and_grad(one, argnums=(0, 1)), in_axes=(0, None))
    values, (grad_x, grad_w) = jax.jit(jax.vmap(inner))(xs, ws)
    assert values.shape == (3, 4) and grad_w.shape == (3, 4, 5)
    for i in range(3):
        w = np.asarray(ws[i])
        for j in range(4):
            x = np.asarray(xs[i, j])
            exact = exact_penalty([x, w], l1, l2)
            assert_relative(values[i, j], exact, 4 * UNIT_ROUNDOFF["float32"])
            for got, leaf in ((grad_x[i, j], x), (grad_w[i, j], w)):
                for g, want in zip(np.ravel(got).tolist(), exact_grad(leaf, l1, l2), strict=True):
                    assert abs(g - float(want)) <= ulp_of(float(want), np.float32)


# ---------------------------------------------------------------------------------------------
# Error codes, and the XLA FFI API version check at registration


def test_native_argument_problems_are_invalid_argument_errors() -> None:
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"^INVALID_ARGUMENT: l1l2_rs: l1 must"):
        native_call("l1l2_rs_penalty", [jnp.ones(3)], SCALAR, l1=-1.0, l2=0.0)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"^INVALID_ARGUMENT: l1l2_rs: operand 0"):
        # Not l1=1.0: JAX caches attributes by value, so 1.0 would pick up the np.int32(1) of
        # test_native_refuses_bad_attributes (equal and of equal hash).
        factors = {"l1": np.float64(0.75), "l2": np.float64(0.0)}
        native_call("l1l2_rs_penalty", [jnp.arange(3)], SCALAR, **factors)


@pytest.mark.parametrize(
    ("handlers", "jaxlib", "compatible"),
    [
        ((0, 3), (0, 3), True),
        ((0, 3), (0, 5), True),  # a newer minor version still serves older handlers
        ((0, 3), None, True),  # unknown: XLA checks it again at registration
        ((0, 3), (0, 2), False),
        ((0, 3), (1, 3), False),
    ],
)
def test_api_version_problem(
    handlers: tuple[int, int], jaxlib: tuple[int, int] | None, compatible: bool
) -> None:
    problem = l1l2_rs.jax._api_version_problem(handlers, jaxlib)
    assert (problem is None) == compatible
    if not compatible:
        assert problem is not None and "XLA FFI API 0.3" in problem


def test_running_jaxlib_serves_the_handlers() -> None:
    header = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", c_header()))
    running = l1l2_rs.jax._jaxlib_ffi_api_version()
    assert running == (int(header["MAJOR"]), int(header["MINOR"]))
    _, version = l1l2_rs._l1l2_rs.xla_ffi_handlers()
    assert l1l2_rs.jax._api_version_problem(version, running) is None


def test_registration_refuses_another_api_major_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l1l2_rs.jax, "_jaxlib_ffi_api_version", lambda: (99, 0))
    problem = l1l2_rs.jax._register_handlers()
    assert problem is not None and "the running jaxlib has 99.0" in problem


# ---------------------------------------------------------------------------------------------
# The handlers called directly with call frames built by hand from c_api.h (ctypes), to reach
# what XLA never sends: malformed frames, metadata structs of either size, extension chains


class CExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class CApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class CMetadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", CApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),  # XLA_FFI_TypeId: one int64_t
    ]


class CMetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", CExtensionBase), ("metadata", ctypes.POINTER(CMetadata))]


class CErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


C_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(CErrorCreateArgs))


class CApi(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api_version", CApiVersion),
        ("internal_api", ctypes.c_void_p),
        ("error_create", C_ERROR_CREATE),
    ]


class CBuffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


def c_table_fields(entries: str) -> list[tuple[str, Any]]:
    return [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        (entries, ctypes.POINTER(ctypes.c_void_p)),
    ]


class CArgs(ctypes.Structure):
    _fields_ = c_table_fields("args")


class CRets(ctypes.Structure):
    _fields_ = c_table_fields("rets")


class CByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class CScalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class CAttrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("names", ctypes.POINTER(ctypes.POINTER(CByteSpan))),
        ("attrs", ctypes.POINTER(ctypes.c_void_p)),
    ]


class CCallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api", ctypes.POINTER(CApi)),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", CArgs),
        ("rets", CRets),
        ("attrs", CAttrs),
        ("future", ctypes.c_void_p),
    ]


def c_value(name: str) -> int:
    """An enum value of c_api.h, e.g. ``XLA_FFI_DataType_F32``."""
    match = re.search(rf"\b{name} = (\d+)", c_header())
    assert match, name
    return int(match.group(1))


def c_struct_size(struct: type[ctypes.Structure], last_field: str) -> int:
    """``XLA_FFI_STRUCT_SIZE``: the end of ``last_field``."""
    field = getattr(struct, last_field)
    return int(field.offset + field.size)


C_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16"}
FAKE_ERROR = 0x1000  # what the hand-made XLA_FFI_Error_Create returns: any non-null pointer


class HandCall:
    """A call frame for one handler call, with an API whose XLA_FFI_Error_Create records the
    (code, message) of each error; ``keep`` holds every ctypes object the frame points into."""

    def __init__(self, operands: list[np.ndarray], results: list[np.ndarray], **attrs: Any):
        self.errors: list[tuple[int, str]] = []
        self.keep: list[Any] = []

        def error_create(args: Any) -> int:
            self.errors.append((args.contents.errc, args.contents.message.decode()))
            return FAKE_ERROR

        self.api = CApi(
            struct_size=ctypes.sizeof(CApi),
            api_version=CApiVersion(ctypes.sizeof(CApiVersion), None, *self.header_version()),
            error_create=C_ERROR_CREATE(error_create),
        )
        self.frame = CCallFrame(
            struct_size=ctypes.sizeof(CCallFrame),
            api=ctypes.pointer(self.api),
            stage=c_value("XLA_FFI_ExecutionStage_EXECUTE"),
        )
        self.frame.args = CArgs(ctypes.sizeof(CArgs), None, *self.table(operands, "Arg"))
        self.frame.rets = CRets(ctypes.sizeof(CRets), None, *self.table(results, "Ret"))
        self.buffers = [self.keep[-1][i] for i in range(len(results))]  # the CBuffer objects
        self.frame.attrs = self.attributes(attrs)

    @staticmethod
    def header_version() -> tuple[int, int]:
        found = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", c_header()))
        return int(found["MAJOR"]), int(found["MINOR"])

    def table(self, arrays: list[np.ndarray], kind: str) -> tuple[int, Any, Any]:
        types = (ctypes.c_int * len(arrays))(*[c_value(f"XLA_FFI_{kind}Type_BUFFER")] * len(arrays))
        buffers = [self.buffer(a) for a in arrays]
        entries = (ctypes.c_void_p * len(arrays))(*[ctypes.addressof(b) for b in buffers])
        self.keep += [types, entries, buffers]
        return len(arrays), ctypes.cast(types, ctypes.POINTER(ctypes.c_int)), entries

    def buffer(self, array: np.ndarray) -> CBuffer:
        dims = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
        self.keep += [dims, array]
        dtype = c_value(f"XLA_FFI_DataType_{C_DTYPES[array.dtype]}")
        return CBuffer(ctypes.sizeof(CBuffer), None, dtype, array.ctypes.data, array.ndim, dims)

    def attributes(self, attrs: dict[str, Any]) -> CAttrs:
        count = len(attrs)
        names = (ctypes.POINTER(CByteSpan) * count)()
        values = (ctypes.c_void_p * count)()
        for index, (name, value) in enumerate(attrs.items()):
            text = ctypes.create_string_buffer(name.encode())
            number = ctypes.c_double(value)
            span = CByteSpan(ctypes.addressof(text), len(name))
            scalar = CScalar(c_value("XLA_FFI_DataType_F64"), ctypes.addressof(number))
            names[index] = ctypes.pointer(span)
            values[index] = ctypes.addressof(scalar)
            self.keep += [text, number, span, scalar]
        types = (ctypes.c_int * count)(*[c_value("XLA_FFI_AttrType_SCALAR")] * count)
        self.keep += [names, values, types]
        return CAttrs(ctypes.sizeof(CAttrs), None, count, types, names, values)

    def scalar(self, index: int) -> CScalar:
        return CScalar.from_address(self.frame.attrs.attrs[index])

    def run(self, target: str) -> int | None:
        name = {"l1l2_rs_penalty": b"penalty", "l1l2_rs_value_and_grad": b"value_and_grad"}[target]
        capsule = l1l2_rs._l1l2_rs.xla_ffi_handlers()[0][target]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, b"l1l2_rs.xla_ffi." + name)
        handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(CCallFrame))(address)
        result: int | None = handler(ctypes.byref(self.frame))
        return result


def test_hand_built_frames_match_the_header() -> None:
    # The ctypes transcription above against c_api.h's own STRUCT_SIZE definitions.
    assert ctypes.sizeof(CBuffer) == c_struct_size(CBuffer, "dims") == 48
    assert c_struct_size(CCallFrame, "attrs") == 168
    assert c_struct_size(CMetadata, "traits") == 36
    assert c_struct_size(CErrorCreateArgs, "errc") == 28


def test_hand_built_call_against_exact(rng: np.random.Generator) -> None:
    x = rng.standard_normal(50).astype(np.float32)
    value, grad = np.zeros((), np.float32), np.full(50, np.nan, np.float32)
    call = HandCall([x], [value, grad], l1=0.5, l2=0.25)
    assert call.run("l1l2_rs_value_and_grad") is None and call.errors == []
    assert_relative(value, exact_penalty([x], 0.5, 0.25), UNIT_ROUNDOFF["float32"])
    for g, want in zip(grad.tolist(), exact_grad(x, 0.5, 0.25), strict=True):
        assert abs(g - float(want)) <= ulp_of(float(want), np.float32)


@pytest.mark.parametrize("size_field", ["traits", "state_type_id"])
def test_metadata_query_found_anywhere_in_the_extension_chain(size_field: str) -> None:
    metadata = CMetadata(c_struct_size(CMetadata, size_field), CApiVersion(), 7, 99)
    query = CMetadataExtension(
        CExtensionBase(ctypes.sizeof(CMetadataExtension), c_value("XLA_FFI_Extension_Metadata")),
        ctypes.pointer(metadata),
    )
    other = CExtensionBase(ctypes.sizeof(CExtensionBase), 1000, ctypes.addressof(query))
    call = HandCall([], [np.zeros((), np.float32)])
    call.frame.extension_start = ctypes.addressof(other)
    assert call.run("l1l2_rs_penalty") is None and call.errors == []
    version = metadata.api_version
    assert (version.major_version, version.minor_version) == HandCall.header_version()
    assert version.struct_size == ctypes.sizeof(CApiVersion) and metadata.traits == 0
    # XLA_FFI_UNKNOWN_TYPE_ID (0) where the struct holds the field; left alone where it does not.
    assert metadata.state_type_id == (0 if size_field == "state_type_id" else 99)


def test_execute_frame_with_an_unrelated_extension_runs(rng: np.random.Generator) -> None:
    x = rng.standard_normal(9).astype(np.float64)
    value = np.full((), np.nan, np.float64)
    call = HandCall([x], [value], l1=0.0, l2=1.0)
    other = CExtensionBase(ctypes.sizeof(CExtensionBase), 1000, None)
    call.frame.extension_start = ctypes.addressof(other)
    assert call.run("l1l2_rs_penalty") is None and call.errors == []
    assert_relative(value, exact_penalty([x], 0.0, 1.0), UNIT_ROUNDOFF["float64"])


def null_names(call: HandCall) -> None:
    call.frame.attrs.names = None


def null_attribute_types(call: HandCall) -> None:
    call.frame.attrs.types = None


def null_attribute_values(call: HandCall) -> None:
    call.frame.attrs.attrs = None


def negative_attribute_count(call: HandCall) -> None:
    call.frame.attrs.size = -1


def null_scalar_value(call: HandCall) -> None:
    call.scalar(0).value = None


def null_name_bytes(call: HandCall) -> None:
    call.frame.attrs.names[0].contents.ptr = None


def null_operand_types(call: HandCall) -> None:
    call.frame.args.types = None


def negative_operand_count(call: HandCall) -> None:
    call.frame.args.size = -2


def null_dims(call: HandCall) -> None:
    CBuffer.from_address(call.frame.args.args[0]).dims = None


def small_buffer_struct(call: HandCall) -> None:
    CBuffer.from_address(call.frame.args.args[0]).struct_size = 40


def misaligned_operand(call: HandCall) -> None:
    CBuffer.from_address(call.frame.args.args[0]).data += 1


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (null_names, "2 attribute names but a null or misaligned table"),
        (null_attribute_types, "2 attribute types but a null or misaligned table"),
        (null_attribute_values, "2 attributes but a null or misaligned table"),
        (negative_attribute_count, "call frame with -1 attributes"),
        (null_scalar_value, "scalar attribute without a value"),
        (null_name_bytes, "2 bytes of an attribute name but a null"),
        (null_operand_types, "1 operand types but a null or misaligned table"),
        (negative_operand_count, "call frame with -2 operands"),
        (null_dims, "operand 0: XLA FFI buffer with null or misaligned dims"),
        (small_buffer_struct, "operand 0: XLA FFI buffer struct too small"),
        (misaligned_operand, "not aligned for float32"),
    ],
)
def test_malformed_frames_are_internal_errors_and_write_nothing(
    corrupt: Callable[[HandCall], None], message: str
) -> None:
    x = np.arange(1.0, 9.0, dtype=np.float32)
    storage = np.zeros(x.nbytes + 4, np.uint8)  # room to misalign the operand by a byte
    storage[: x.nbytes] = x.view(np.uint8)
    operand = storage[: x.nbytes].view(np.float32)
    value, grad = np.full((), 7.0, np.float32), np.full(8, 7.0, np.float32)
    call = HandCall([operand], [value, grad], l1=0.5, l2=0.25)
    corrupt(call)
    assert call.run("l1l2_rs_value_and_grad") == FAKE_ERROR
    [(code, text)] = call.errors
    assert code == c_value("XLA_FFI_Error_Code_INTERNAL"), text
    assert re.search(message, text), text
    assert value == 7.0 and np.all(grad == 7.0)


def test_unaligned_scalar_attribute_is_read() -> None:
    x = np.array([3.0, -4.0], np.float64)
    value = np.zeros((), np.float64)
    call = HandCall([x], [value], l1=1.0, l2=0.0)
    raw = ctypes.create_string_buffer(9)
    ctypes.memmove(ctypes.addressof(raw) + 1, ctypes.byref(ctypes.c_double(0.5)), 8)
    call.scalar(0).value = ctypes.addressof(raw) + 1  # l1 = 0.5, at an odd address
    assert call.run("l1l2_rs_penalty") is None and call.errors == []
    assert value == 3.5


def test_refused_penalty_dtype_writes_no_gradient() -> None:
    x = np.array([1.0, -2.0], np.float32)
    value, grad = np.full((), 7.0, np.float16), np.full(2, 7.0, np.float32)
    call = HandCall([x], [value, grad], l1=0.5, l2=0.25)
    assert call.run("l1l2_rs_value_and_grad") == FAKE_ERROR
    [(code, text)] = call.errors
    assert code == c_value("XLA_FFI_Error_Code_INVALID_ARGUMENT")
    assert "the penalty result must be float32 or float64" in text
    assert value == 7.0 and np.all(grad == 7.0)


def test_unreportable_failure_of_an_execution_with_an_extension_aborts() -> None:
    # No XLA_FFI_Error_Create: the failure cannot be reported, and returning "success" would
    # hand XLA unwritten results; an unrelated extension does not make it a metadata query.
    script = f"""
import ctypes, sys
import numpy as np
sys.path.insert(0, {str(ROOT / "tests")!r})
import test_jax as t
call = t.HandCall([np.ones(2, np.float32)], [np.zeros((), np.float32)], l1=-1.0, l2=0.0)
call.api.error_create = t.C_ERROR_CREATE()
other = t.CExtensionBase(ctypes.sizeof(t.CExtensionBase), 1000, None)
call.frame.extension_start = ctypes.addressof(other)
call.run("l1l2_rs_penalty")
print("returned")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode != 0 and "returned" not in done.stdout, done.stdout
    assert "l1 must be a finite number >= 0" in done.stderr
