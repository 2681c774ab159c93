"""``l1l2`` / ``python -m l1l2_rs``: the L1/L2 penalty of every tensor of checkpoint files.

Files (``.npy``, ``.npz``, ``.safetensors`` and sharded ``*.safetensors.index.json``, ``.h5`` /
``.weights.h5``, ``.keras``, torch ``.pt`` / ``.pth`` / ``.bin``), directories (searched for those
endings) and glob patterns are read without copying where the format allows (``_checkpoints``),
summed by the core (``_penalties``) and printed as a table or, with ``--json``, as one JSON
document (``cli_schema.json``). Problems are one line each on stderr,
``l1l2: <file>: <tensor>: <what>``; the other files are still reported. Exit status: 0, 1 if any
file or tensor had a problem (or stdout was closed early), 2 for bad arguments, 130 on Ctrl-C.

Without files, a model-sized set of float32 weights is generated and the penalty and its time are
printed next to numpy's (``_demo``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ._checkpoints import expand, total_bytes
from ._demo import run_demo
from ._penalties import Problem, Report, Run, TensorResult, as_json, kept_in_file, share
from .regularizers import L1L2

#: Inputs larger than this get a progress bar, when stderr is a terminal.
PROGRESS_MIN_BYTES = 1 << 30

EPILOG = """\
formats: .npy, .npz, .safetensors, *.safetensors.index.json (its shards), .h5 / .weights.h5,
.keras, .pt / .pth / .bin (with torch installed). Directories are searched for these endings.
Tensor data is memory-mapped, not copied, wherever the format stores it as plain bytes.

exit status: 0 all read; 1 a file or tensor could not be read, or a tensor is not float (it is
listed, summed exactly, but left out of the totals); 2 bad arguments; 130 interrupted (Ctrl-C).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l1l2",
        description="Print the L1/L2 regularization penalty l1*sum(|x|) + l2*sum(x**2) of every "
        "tensor in checkpoint files, per file and in total. Without files, run a demo on "
        "generated model-sized weights and compare with numpy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="*", help="checkpoint files, directories or glob patterns ('**' recurses)"
    )
    parser.add_argument("--l1", type=float, default=0.01, help="L1 factor (default 0.01)")
    parser.add_argument("--l2", type=float, default=0.01, help="L2 factor (default 0.01)")
    parser.add_argument(
        "--top", type=_positive, metavar="N", help="list only the N tensors of largest penalty"
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="GLOB",
        help="only tensors whose name matches this shell-style pattern (fnmatch, case-"
        "sensitive: 'encoder.*.weight'); repeat for any of several",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (cli_schema.json)"
    )
    parser.add_argument(
        "--size",
        type=_count,
        default=25_000_000,
        help="demo only: number of float32 weights to generate (default 25e6, ~100 MB)",
    )
    return parser


def _count(text: str) -> int:
    """A positive element count: ``1000``, ``1e6`` or ``25_000_000``."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of weights, got {text!r}") from None
    if not (value >= 1 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


class _Progress:
    """A tqdm bar of bytes on stderr, when stderr is a terminal and the input is large."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
            return
        try:
            tqdm = importlib.import_module("tqdm")
        except ImportError:
            print(
                "l1l2: no progress bar: tqdm is not installed (pip install tqdm)", file=sys.stderr
            )
            return
        # A terminal that reports no size (0 columns) would get an empty bar from tqdm.
        columns = os.get_terminal_size(sys.stderr.fileno()).columns or 80
        self._bar = tqdm.tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=False,
            ncols=columns,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def problem(self, problem: Problem) -> None:
        if self._bar is not None:
            self._bar.write(str(problem), file=sys.stderr)
        else:
            print(problem, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _compute(arguments: argparse.Namespace, regularizer: L1L2) -> Report:
    inputs = expand(arguments.files)
    progress = _Progress(total_bytes(inputs.files))
    run = Run(regularizer.l1, regularizer.l2, arguments.filter, progress.advance, progress.problem)
    try:
        for argument, message in inputs.missing:
            run.problem(argument, None, message)
        for path in inputs.files:
            run.add_file(path)
    finally:
        progress.close()
    return run.report


def _number(value: float) -> str:
    return f"{value:.9g}"


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction:.1%}"


def _print_table(report: Report, top: int | None, out: TextIO) -> None:
    """Per file: a row per tensor and the file's total; then the total over all files."""
    rows: list[tuple[str, ...] | str] = []
    for file in report.files:
        count = len(file.tensors)
        rows.append(f"{file.path}  ({file.format}, {count} tensor{'' if count == 1 else 's'})")
        rows.extend(_tensor_row(tensor, report) for tensor in kept_in_file(report, file, top))
        total = file.total
        rows.append(
            (
                "  file total",
                "",
                "",
                _number(total.sum_abs),
                _number(total.sum_squares),
                _number(total.penalty),
                "",
            )
        )
    header = ("  name", "dtype", "shape", "sum|x|", "sum x^2", "penalty", "share")
    table = [row for row in rows if isinstance(row, tuple)]
    widths = [max(len(row[column]) for row in [header, *table]) for column in range(7)]

    def line(row: tuple[str, ...]) -> str:
        left = [cell.ljust(width) for cell, width in zip(row[:3], widths[:3], strict=True)]
        right = [cell.rjust(width) for cell, width in zip(row[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    print(line(header), file=out)
    for row in rows:
        print(row if isinstance(row, str) else line(row), file=out)
    total = report.total
    print(
        f"total ({len(report.files)} files, {total.tensors} float tensors): "
        f"sum|x| {_number(total.sum_abs)}  sum x^2 {_number(total.sum_squares)}  "
        f"penalty {_number(total.penalty)}",
        file=out,
    )


def _tensor_row(tensor: TensorResult, report: Report) -> tuple[str, ...]:
    shape = "(" + ", ".join(map(str, tensor.shape)) + ("," if len(tensor.shape) == 1 else "") + ")"
    return (
        f"  {tensor.name}",
        tensor.dtype if tensor.floating else f"{tensor.dtype}*",
        shape,
        _number(tensor.sums.sum_abs),
        _number(tensor.sums.sum_squares),
        _number(tensor.sums.penalty),
        _percent(share(tensor, report)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        regularizer = L1L2(arguments.l1, arguments.l2)
    except (TypeError, ValueError) as error:
        print(f"l1l2: {error}", file=sys.stderr)
        return 2
    if not arguments.files:
        try:
            run_demo(regularizer, arguments.size)
        except (MemoryError, ValueError):  # numpy refuses sizes beyond its maximum dimension
            gigabytes = arguments.size * 4 / 2**30
            print(
                f"l1l2: not enough memory for {arguments.size:,} float32 weights "
                f"({gigabytes:.1f} GiB); pass a smaller --size",
                file=sys.stderr,
            )
            return 1
        return 0
    try:
        report = _compute(arguments, regularizer)
        if arguments.json:
            json.dump(as_json(report, arguments.top), sys.stdout, indent=2, allow_nan=False)
            print()
        else:
            _print_table(report, arguments.top, sys.stdout)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("l1l2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`l1l2 ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
