"""l1l2_rs' regularizers inside Keras 3 (jax, torch, tensorflow, numpy backends) and tf-keras.

Each backend runs in a fresh process (``keras_training_child.py``: Keras picks its backend once per
process); the processes start together, each trains a few dozen small models and reports weights,
penalties and evaluate/predict results as JSON. The references are Keras' own ``L1L2``/``L1``/
``L2`` with the same factors (the framework's formula, whose gradient is right) and the model
without a regularizer. Ours is computed in float32 by keras.ops/tf with float64 factors, Keras' in
float32 with (for L1) a float32 factor: the two agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import exact_penalty

CHILD = Path(__file__).with_name("keras_training_child.py")
BACKENDS = ["jax", "torch", "tensorflow", "numpy", "tf_keras"]
EPS32 = float(np.finfo(np.float32).eps)


@cache
def _processes() -> dict[str, subprocess.Popen[str]]:
    """Start every backend's process at once (two cores: the runs overlap their imports)."""
    started = {}
    for backend in BACKENDS:
        flavour = "tf_keras" if backend == "tf_keras" else "keras"
        environment = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow" if backend == "tf_keras" else backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")]),
        }
        started[backend] = subprocess.Popen(
            [sys.executable, str(CHILD), flavour],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
    return started


@cache
def report(backend: str) -> dict[str, Any]:
    process = _processes()[backend]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, f"{backend} child failed:\n{stderr[-4000:]}"
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    return result


def flat(weights: list[list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(w) for w in weights])


def assert_float32_close(got: Any, expected: Any, ulps: float = 4.0) -> None:
    """Equal to float32 rounding: ``ulps`` float32 epsilons of the larger magnitude (or of 1)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ulps * EPS32 * scale)


def training_cases() -> list[tuple[str, str]]:
    """(backend, case) pairs, read from the child's case list without running it."""
    cases = []
    for backend in BACKENDS:
        modes = {
            "jax": ["jit", "no-jit"],
            "torch": ["no-jit", "eager"],
            "tensorflow": ["no-jit", "jit", "eager"],
            "numpy": ["no-jit"],
            "tf_keras": ["graph", "eager"],
        }[backend]
        first = [f"{modes[0]}/L1L2/{where}" for where in ("k", "b", "a", "all")]
        first += [
            f"{modes[0]}/{pair}/all"
            for pair in ("L1", "L2", "L1L2-l2-only", "l1_l2-string", "zero")
        ]
        cases += [(backend, case) for case in first]
        cases += [(backend, f"{mode}/L1L2/all") for mode in modes[1:]]
    return cases


@pytest.mark.parametrize("backend, case", training_cases())
def test_training_reaches_keras_weights(backend: str, case: str) -> None:
    outcome = report(backend)["training"][case]
    ours, theirs, none = outcome["ours"], outcome["theirs"], outcome["none"]
    # The weights Keras' own regularizer reaches, to float32 rounding ...
    assert_float32_close(flat(ours["weights"]), flat(theirs["weights"]))
    # ... and the penalties after training (Keras adds none for L1L2(0, 0) given as None).
    if "/zero/" in case:
        assert ours["losses"] == [0.0, 0.0, 0.0] and theirs["losses"] == []
    else:
        assert len(ours["losses"]) == len(theirs["losses"]) > 0
        assert_float32_close(ours["losses"], theirs["losses"])
    # ... which are not the weights of training without it (the penalty has a gradient).
    difference = float(np.max(np.abs(flat(ours["weights"]) - flat(none["weights"]))))
    if backend == "numpy" or "/zero/" in case:  # the numpy backend does not train
        assert difference == 0.0
    else:
        assert difference > 1e-3, f"{case}: trained as if there were no regularizer"
    for key in ("evaluate", "predict"):
        if key in theirs:
            assert_float32_close(ours[key], theirs[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_is_checked_where_the_backend_has_it(backend: str) -> None:
    outcome = report(backend)["training"]
    first = next(iter(outcome))
    mode = first.split("/", 1)[0]
    ours = outcome[f"{mode}/L1L2/all"]["ours"]
    assert "predict" in ours
    # Keras' numpy backend fails to evaluate any model with a regularizer (its own included).
    assert ("evaluate" in ours) == (backend != "numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_layer_collects_each_penalty_once_per_use(backend: str) -> None:
    # A layer shared by two inputs: its kernel penalty once, its activity penalty per call.
    counts = report(backend)["shared"]
    assert counts["ours"] == counts["theirs"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_calls_on_variables(backend: str) -> None:
    values = report(backend)["variables"]
    x = np.asarray(values["x"], dtype=np.float32)
    for name, (l1, l2) in {
        "L1(0.1)": (0.1, 0.0),
        "L2(0.1)": (0.0, 0.1),
        "L1L2(0.1,0.2)": (0.1, 0.2),
    }.items():
        got, dtype = values[name]
        assert dtype == "float32"
        # A torch variable under autograd takes the keras.ops path (float32 sums of 16 values).
        assert got == pytest.approx(exact_penalty(x, l1, l2), rel=16 * EPS32)
    for name in ("L1(0)", "L1L2(0,0)"):
        got, dtype = values[name]
        assert dtype == "float32" and got == 0.0 and not math.copysign(1.0, got) < 0
    for name in ("L1(0.1)", "L1L2(0.1,0.2)"):
        assert values[f"negated {name}"] == values[name][0]  # |x| and x**2 are even
        assert values[f"zeros {name}"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_activity_penalty_does_not_overflow(backend: str) -> None:
    # Activations of a few hundred under mixed_float16: their squares pass float16's 65504.
    outcome = report(backend)["mixed precision"]
    assert outcome["theirs dtype"] == outcome["ours dtype"] == "float16"
    assert math.isinf(outcome["theirs"])  # Keras' own sums the squares in float16
    assert outcome["ours"] == pytest.approx(outcome["reference"], rel=2**-10)  # 1 float16 ulp
    if backend not in ("numpy", "tensorflow"):  # see the child: Keras 3 on TF cannot fit it
        assert outcome["trained finite"]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_gradient_of_the_l1_term_is_zero_at_zero(backend: str) -> None:
    gradients = report(backend)["gradients at zero"]
    expected = [0.0, -0.1, 0.1]  # l1 * sign(x) at [0, -2, 3]
    assert gradients["ours"] == pytest.approx(expected, rel=EPS32)
    # Keras' own agrees on torch and TF; JAX's abs has gradient 1 at 0.
    theirs_at_zero = 0.1 if backend == "jax" else 0.0
    assert gradients["theirs"] == pytest.approx([theirs_at_zero, -0.1, 0.1], rel=EPS32)
