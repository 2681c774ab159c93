"""PyTorch training steps with the L1/L2 penalty: l1l2_rs.torch next to torch's own formula.

    python benches/torch_step.py            # the full table (a few minutes)
    python benches/torch_step.py --quick    # small sizes, few rounds

Part 1, a whole SGD step (zero_grad, forward, MSE loss, backward, step) of a float32 MLP of ~1e6
and ~1e7 parameters, regularized five ways: none; ``penalty_many`` in the loss; the plain torch
formula ``l1 * w.abs().sum() + l2 * (w * w).sum()`` summed over the parameters in the loss; the
same formula through ``torch.compile``; ``add_grad_`` after ``backward``.

Part 2, the regularization alone on many tensors (1000 tensors of 1e3, and the ResNet-50
parameter shapes of ``shared/data/resnet50_shapes.json``), each producing the penalty and adding
its gradient into ``.grad``: ``add_grad_``; ``penalty_many(...).backward()``; the formula through
autograd; and, for scale, ``torch._foreach_add_`` of the gradient (no value; what torch's
optimizers use for ``weight_decay``).

Candidates are timed interleaved (each round runs every candidate once, in turn), so slow drifts
of a shared machine hit them alike; the table gives the median and interquartile range (IQR) over
the rounds, and the ratio of medians to the unregularized step (part 1) or to ``add_grad_``
(part 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import l1l2_rs
import l1l2_rs.torch as lt

L1, L2, LR = 1e-5, 1e-4, 1e-3
#: The ResNet-50 parameter shapes: in ``shared/data`` next to the checkout or above it.
SHAPES_CANDIDATES = [
    parent / "shared" / "data" / "resnet50_shapes.json"
    for parent in Path(__file__).resolve().parents[1:4]
]
Candidate = Callable[[], object]


def formula(params: list[torch.Tensor]) -> torch.Tensor:
    """The penalty as a torch user writes it."""
    total = torch.zeros(())
    for w in params:
        total = total + L1 * w.abs().sum() + L2 * (w * w).sum()
    return total


compiled_formula = torch.compile(formula)


def time_interleaved(table: dict[str, Candidate], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, one call per candidate per round."""
    for function in table.values():  # warm up: compilation, allocator, thread pools
        function()
        function()
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds):
        for name, function in table.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return samples


def mlp(parameters: int, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Three square layers (tanh between) with about ``parameters`` weights."""
    width = round(math.sqrt(parameters / 3))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
    )
    return model, torch.randn(batch, width), torch.randn(batch, width)


def step_candidates(parameters: int, batch: int) -> tuple[int, dict[str, Candidate]]:
    model, x, y = mlp(parameters, batch)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR)

    def step(
        penalty: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
        after_backward: Callable[[list[torch.Tensor]], object] | None = None,
    ) -> Candidate:
        def run() -> None:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if penalty is not None:
                loss = loss + penalty(params)
            loss.backward()
            if after_backward is not None:
                after_backward(params)
            optimizer.step()

        return run

    count = sum(p.numel() for p in params)
    return count, {
        "no regularizer": step(),
        "penalty_many in the loss": step(penalty=lambda ps: lt.penalty_many(ps, L1, L2)),
        "torch formula in the loss": step(penalty=formula),
        "torch.compile(formula) in the loss": step(penalty=compiled_formula),
        "add_grad_ after backward": step(after_backward=lambda ps: lt.add_grad_(ps, L1, L2)),
    }


def many_candidates(shapes: list[list[int]]) -> dict[str, Candidate]:
    generator = torch.Generator().manual_seed(0)
    params = [(torch.randn(shape, generator=generator) * 0.05).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]

    def foreach_grad() -> None:
        with torch.no_grad():
            signs = torch._foreach_sign(params)
            torch._foreach_add_(grads, signs, alpha=L1)
            torch._foreach_add_(grads, params, alpha=2 * L2)

    return {
        "add_grad_": lambda: lt.add_grad_(params, L1, L2),
        "penalty_many(...).backward()": lambda: lt.penalty_many(params, L1, L2).backward(),
        "torch formula .backward()": lambda: formula(params).backward(),
        "torch._foreach_add_ (gradient only)": foreach_grad,
    }


def summary(samples: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(samples, n=4)
    return statistics.median(samples), quartiles[2] - quartiles[0]


def table(title: str, reference: str, timed: dict[str, list[float]]) -> list[str]:
    base = statistics.median(timed[reference])
    lines = [f"| {title} | median | IQR | x {reference} |", "|---|---:|---:|---:|"]
    for name, samples in timed.items():
        median, iqr = summary(samples)
        lines.append(
            f"| {name} | {median * 1e3:.2f} ms | {iqr * 1e3:.2f} ms | {median / base:.2f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds (>= 20 for the table)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and l1l2_rs threads (0: their defaults)"
    )
    parser.add_argument(
        "--shapes",
        type=Path,
        default=next((path for path in SHAPES_CANDIDATES if path.exists()), None),
        help="resnet50_shapes.json (default: found in shared/data above the checkout)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        l1l2_rs.set_num_threads(args.threads)
    rounds = 5 if args.quick else args.rounds
    sizes = [100_000] if args.quick else [1_000_000, 10_000_000]

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), l1l2_rs "
        f"{l1l2_rs.__version__} ({l1l2_rs.simd_isa()}, {l1l2_rs.get_num_threads()} threads); "
        f"{rounds} interleaved rounds; command: python {' '.join(sys.argv)}\n"
    )
    for size in sizes:
        count, candidates = step_candidates(size, args.batch)
        timed = time_interleaved(candidates, rounds)
        title = f"SGD step, MLP of {count:.2e} float32 parameters, batch {args.batch}"
        print("\n".join([*table(title, "no regularizer", timed), ""]))

    lists: dict[str, list[list[int]]] = {"1000 tensors of 1e3": [[1000]] * 1000}
    if args.quick:
        lists = {"100 tensors of 1e3": [[1000]] * 100}
    elif args.shapes is None:
        print("ResNet-50 list skipped: resnet50_shapes.json not found (pass --shapes)\n")
    else:
        shapes = json.loads(args.shapes.read_text())["shapes"]
        total = sum(math.prod(shape) for shape in shapes)
        lists[f"ResNet-50: {len(shapes)} tensors, {total:.2e} float32"] = shapes
    for label, shapes in lists.items():
        timed = time_interleaved(many_candidates(shapes), rounds)
        print("\n".join([*table(f"penalty + gradient, {label}", "add_grad_", timed), ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
