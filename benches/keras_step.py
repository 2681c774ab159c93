"""Keras train-step time with l1l2_rs' L1L2, Keras' own L1L2 and no regularizer, per backend.

    python benches/keras_step.py [--backends jax,torch,tensorflow,tf_keras] [--steps 15]

One Dense layer holding 1e6 or 1e7 kernel parameters, batch 32, SGD, Keras' default compile mode.
Each backend runs in its own process (Keras picks its backend once per process); each variant is
warmed up, then ``--steps`` calls of ``train_on_batch`` are timed one by one, the three variants
taking turns. Prints a Markdown table of the median and interquartile range per step. Timings on a
shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

SIZES = {"1e6": (1000, 1000), "1e7": (1000, 10000)}
VARIANTS = ("none", "keras L1L2", "l1l2_rs L1L2")
BATCH = 32


def child(flavour: str, steps: int) -> None:
    """Time every size and variant in this process; print one JSON line."""
    import numpy as np

    import l1l2_rs

    if flavour == "tf_keras":
        import tf_keras as keras
    else:
        import keras

    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for size, (inputs, units) in SIZES.items():
        x = rng.standard_normal((BATCH, inputs)).astype("float32")
        y = rng.standard_normal((BATCH, units)).astype("float32")
        makers = {
            "none": lambda: None,
            "keras L1L2": lambda: keras.regularizers.L1L2(1e-4, 1e-4),
            "l1l2_rs L1L2": lambda: l1l2_rs.L1L2(1e-4, 1e-4),
        }
        models = {}
        for variant in VARIANTS:
            dense = keras.layers.Dense(units, kernel_regularizer=makers[variant]())
            models[variant] = keras.Sequential([keras.Input((inputs,)), dense])
            models[variant].compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
            for _ in range(3):
                models[variant].train_on_batch(x, y)
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(steps):  # the variants take turns: the machine's load drifts alike
            for variant, model in models.items():
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[variant].append(time.perf_counter() - start)
        for variant in VARIANTS:
            results[f"{size}/{variant}"] = times[variant]
    print(json.dumps(results))


def run_backend(backend: str, steps: int) -> dict[str, list[float]]:
    flavour = "tf_keras" if backend == "tf_keras" else "keras"
    environment = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow" if backend == "tf_keras" else backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", flavour, "--steps", str(steps)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{backend} failed:\n{done.stderr[-3000:]}")
    result: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(times: list[float]) -> str:
    quartiles = statistics.quantiles(times, n=4)
    return f"{statistics.median(times) * 1e3:.2f} ({(quartiles[2] - quartiles[0]) * 1e3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,torch,tensorflow,tf_keras")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments.child, arguments.steps)
        return
    print("Train-step time, ms: median (IQR), batch 32, Dense kernel of N parameters\n")
    print("| backend | N | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for backend in arguments.backends.split(","):
        results = run_backend(backend, arguments.steps)
        for size in SIZES:
            cells = " | ".join(summary(results[f"{size}/{variant}"]) for variant in VARIANTS)
            print(f"| {backend} | {size} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
