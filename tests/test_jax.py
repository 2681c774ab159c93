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

import re
import subprocess
import sys
from collections.abc import Iterator
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
