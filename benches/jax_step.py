"""The JAX adapter's two implementations side by side: the l1l2-rs core through an XLA FFI custom
call ("native") and XLA's own fused ops ("jnp").

    python benches/jax_step.py            # the full table
    python benches/jax_step.py --quick    # fewer rounds, no 1e7

Every candidate is a ``jax.jit``-compiled function, compiled and run once before timing. The
candidates of one row are timed interleaved (every round calls each once, in a rotating order,
and blocks on the result); the table gives the median and the interquartile range over the
rounds, per call. Rows:

- dispatch at 1e3 float32: an almost empty jitted function (``x + 0``, the floor of a jitted
  call), the plain formula ``l1 * sum(|x|) + l2 * sum(x**2)`` in jnp, the jnp penalty and the
  native penalty (the FFI call's overhead is its excess over the floor);
- ``jit(penalty)`` and ``jit(value_and_grad(penalty))`` at 1e6 and 1e7 float32, and
  ``jit(value_and_grad(lambda x: 0.5 * penalty(x)))``, whose backward pass multiplies the
  gradient by the cotangent 0.5 (with cotangent 1 XLA drops that multiply); next to them
  ``jit(-x)``, which reads the input once and writes a new array of the same size: the floor of
  any jitted function that returns a gradient (including XLA's allocation of the new buffer);
- a model-like pytree (a 4-layer MLP's 8 weights and biases, 1.1e6 float32 values), which the
  native implementation sends through one FFI call.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import l1l2_rs
from l1l2_rs.jax import penalty

L1, L2 = 1e-4, 1e-3


def timed(function: Callable[[Any], Any], argument: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(argument))
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[Any], Any]], argument: Any, rounds: int
) -> dict[str, list[float]]:
    for function in candidates.values():  # compile and warm up
        jax.block_until_ready(function(argument))
        jax.block_until_ready(function(argument))
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(candidates[name], argument))
    return times


def plain_formula(x: jax.Array) -> jax.Array:
    """What a user writes without l1l2_rs (its gradient at 0 is l1, not 0)."""
    return L1 * jnp.sum(jnp.abs(x)) + L2 * jnp.sum(x * x)


def penalty_fn(implementation: str) -> Callable[[Any], Any]:
    return jax.jit(lambda x: penalty(x, L1, L2, implementation=implementation))


def value_and_grad_fn(implementation: str) -> Callable[[Any], Any]:
    return jax.jit(jax.value_and_grad(lambda x: penalty(x, L1, L2, implementation=implementation)))


def scaled_value_and_grad_fn(implementation: str) -> Callable[[Any], Any]:
    """The cotangent reaching the penalty is 0.5, not 1: the backward pass multiplies."""
    return jax.jit(
        jax.value_and_grad(lambda x: 0.5 * penalty(x, L1, L2, implementation=implementation))
    )


def mlp_params(rng: np.random.Generator) -> dict[str, jax.Array]:
    widths = [784, 1024, 256, 128, 10]
    params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        params[f"w{layer}"] = jnp.asarray(rng.standard_normal((fan_in, fan_out)), jnp.float32)
        params[f"b{layer}"] = jnp.asarray(rng.standard_normal(fan_out), jnp.float32)
    return params


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def row(label: str, times: dict[str, list[float]]) -> list[str]:
    lines = []
    for name, samples in times.items():
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        lines.append(
            f"| {label} | {name} | {format_time(median)} | "
            f"{format_time(q1)} to {format_time(q3)} | {len(samples)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no 1e7 rows")
    arguments = parser.parse_args()
    rounds = 50 if arguments.quick else 300
    big_rounds = 10 if arguments.quick else 40
    rng = np.random.default_rng(0)

    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{l1l2_rs.get_num_threads()} l1l2_rs threads, ISA {l1l2_rs.simd_isa()}"
    )
    print("| case | candidate | median | IQR (q1 to q3) | rounds |")
    print("|---|---|---|---|---|")

    small = jnp.asarray(rng.standard_normal(1000), jnp.float32)
    dispatch = {
        "jit(x + 0)": jax.jit(lambda x: x + 0),
        "plain jnp formula": jax.jit(plain_formula),
        "jnp penalty": penalty_fn("jnp"),
        "native penalty": penalty_fn("native"),
        "jnp value_and_grad": value_and_grad_fn("jnp"),
        "native value_and_grad": value_and_grad_fn("native"),
    }
    print("\n".join(row("1e3 float32", interleaved(dispatch, small, rounds))), flush=True)

    sizes = [10**6] if arguments.quick else [10**6, 10**7]
    for size in sizes:
        x = jnp.asarray(rng.standard_normal(size), jnp.float32)
        count = rounds if size <= 10**6 else big_rounds
        label = f"1e{round(np.log10(size))} float32"
        forward = {
            "plain jnp formula": jax.jit(plain_formula),
            "jnp penalty": penalty_fn("jnp"),
            "native penalty": penalty_fn("native"),
        }
        print("\n".join(row(label, interleaved(forward, x, count))), flush=True)
        fused = {
            "jit(-x) (read x, write a new array)": jax.jit(lambda x: -x),
            "jnp value_and_grad": value_and_grad_fn("jnp"),
            "native value_and_grad": value_and_grad_fn("native"),
            "jnp value_and_grad, cotangent 0.5": scaled_value_and_grad_fn("jnp"),
            "native value_and_grad, cotangent 0.5": scaled_value_and_grad_fn("native"),
        }
        print("\n".join(row(label, interleaved(fused, x, count))), flush=True)

    params = mlp_params(rng)
    tree = {
        "jnp value_and_grad": value_and_grad_fn("jnp"),
        "native value_and_grad": value_and_grad_fn("native"),
    }
    print("\n".join(row("MLP pytree, 8 leaves", interleaved(tree, params, rounds))), flush=True)


if __name__ == "__main__":
    main()
