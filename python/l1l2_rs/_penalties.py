"""The sums and penalties of checkpoint files, for the ``l1l2`` command.

One process, one file at a time: the mapped tensors the core reads in place go to
``sums_many`` in batches of up to ``BATCH_BYTES`` (each a single parallel call); data that is
streamed (compressed members, chunked HDF5 datasets) or that no kernel reads in place (unaligned
offsets in a zip file, byte-swapped data) is converted a bounded piece at a time, and the pieces'
float64 sums added exactly (``math.fsum``).

Float tensors make the totals. Integer and bool tensors are summed exactly and listed, but they
are not weights a regularizer applies to: they stay out of the totals and are reported as
problems. Everything else (complex, float8, strings) is a problem of its own.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checkpoints import (
    PIECE_BYTES,
    READ_ERRORS,
    Array,
    Checkpoint,
    Tensor,
    name_matches,
    numeric,
    read,
    read_shard,
)
from .regularizers import penalty as library_penalty
from .regularizers import sums, sums_many

#: Below this a float64 sum of squares may have lost squares to underflow (the core's own bound).
_TINY_SQUARES = 2.0**-968

#: What summing a tensor streamed a piece at a time can raise besides the readers' errors.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, TypeError, RuntimeError)

#: The most bytes handed to one ``sums_many`` call (one tensor may be larger).
BATCH_BYTES = 256 << 20


@dataclass
class Problem:
    """One line on stderr: ``l1l2: <path>: <tensor>: <message>`` (no tensor: the whole file)."""

    path: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.tensor is None else f"{self.path}: {self.tensor}"
        return f"l1l2: {where}: {self.message}"


@dataclass
class Sums:
    sum_abs: float = 0.0
    sum_squares: float = 0.0
    penalty: float = 0.0
    tensors: int = 0

    def add(self, other: Sums) -> None:
        self.sum_abs += other.sum_abs
        self.sum_squares += other.sum_squares
        self.penalty += other.penalty
        self.tensors += other.tensors


@dataclass
class TensorResult:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sums: Sums
    floating: bool


@dataclass
class FileResult:
    path: str
    format: str
    tensors: list[TensorResult] = field(default_factory=list)
    total: Sums = field(default_factory=Sums)


@dataclass
class Report:
    l1: float
    l2: float
    files: list[FileResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    total: Sums = field(default_factory=Sums)


class Run:
    """Computes a ``Report`` file by file; ``progress`` is told of every byte range done and
    ``report_problem`` of every problem as it is found."""

    def __init__(
        self,
        l1: float,
        l2: float,
        patterns: list[str],
        progress: Callable[[int], None],
        report_problem: Callable[[Problem], None],
    ) -> None:
        self.report = Report(l1, l2)
        self._patterns = patterns
        self._progress = progress
        self._report_problem = report_problem

    def problem(self, path: str, tensor: str | None, message: str) -> None:
        problem = Problem(path, tensor, message)
        self.report.problems.append(problem)
        self._report_problem(problem)

    def add_file(self, path: str) -> None:
        """Read ``path`` (a checkpoint, or an index of shards) and add its tensors to the report."""
        with contextlib.ExitStack() as stack:
            try:
                checkpoints = read(path, stack)
            except READ_ERRORS as error:
                self.problem(path, None, describe(error))
                self._progress(_size(path))
                return
            for checkpoint in checkpoints:
                self._add_checkpoint(checkpoint)

    def _add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with contextlib.ExitStack() as stack:
            try:
                if checkpoint.pending:
                    read_shard(checkpoint, stack)
            except READ_ERRORS as error:
                self.problem(checkpoint.path, None, describe(error))
                self._progress(_size(checkpoint.path))
                return
            for tensor_name, message in checkpoint.errors:
                self.problem(checkpoint.path, tensor_name, message)
            result = FileResult(checkpoint.path, checkpoint.format)
            done = self._sum_tensors(checkpoint, result)
        self._progress(max(0, _size(checkpoint.path) - done))
        for tensor in result.tensors:
            if tensor.floating:
                result.total.add(tensor.sums)
        self.report.files.append(result)
        self.report.total.add(result.total)

    def _sum_tensors(self, checkpoint: Checkpoint, result: FileResult) -> int:
        """Fill in ``result``'s tensors in file order; returns the bytes read."""
        path = checkpoint.path
        slots: list[TensorResult | None] = []
        batch: list[tuple[int, Tensor, Array]] = []
        batch_bytes = done = 0
        for tensor in checkpoint.tensors:
            if not name_matches(tensor.name, self._patterns):
                continue
            slots.append(None)
            if tensor.error is not None:
                self.problem(path, tensor.name, tensor.error)
            elif isinstance(tensor.dtype, str) or not numeric(tensor.dtype):
                self.problem(path, tensor.name, _unsupported(tensor.dtype))
            elif tensor.array is not None and _in_place(tensor.array):
                batch.append((len(slots) - 1, tensor, tensor.array))
                batch_bytes += tensor.array.nbytes
                if batch_bytes >= BATCH_BYTES:
                    done += self._run_batch(path, batch, slots)
                    batch, batch_bytes = [], 0
            else:
                slots[-1] = self._streamed(path, tensor)
                done += tensor.nbytes
                self._progress(tensor.nbytes)
        done += self._run_batch(path, batch, slots)
        result.tensors = [slot for slot in slots if slot is not None]
        return done

    def _run_batch(
        self, path: str, batch: list[tuple[int, Tensor, Array]], slots: list[TensorResult | None]
    ) -> int:
        if not batch:
            return 0
        results: list[tuple[float, float] | None]
        try:
            results = list(sums_many([array for _, _, array in batch]))
        except (TypeError, ValueError):  # find out which tensor, and sum the others
            results = [self._single(path, tensor, array) for _, tensor, array in batch]
        for (slot, tensor, array), result in zip(batch, results, strict=True):
            if result is not None:
                exact = self._penalty_at_the_edges(array, *result)
                slots[slot] = self._result(path, tensor, *result, penalty=exact)
        nbytes = sum(array.nbytes for _, _, array in batch)
        self._progress(nbytes)
        return nbytes

    def _penalty_at_the_edges(
        self, array: Array, sum_abs: float, sum_squares: float
    ) -> float | None:
        """The library's penalty of a float64 tensor whose sums left float64's range (an
        overflowing sum, underflowing squares): it applies the factors before the final scaling
        (``1e-300 * (1e200)**2`` is 1e100), which the rounded sums can no longer do."""
        edge = math.isinf(sum_abs) or math.isinf(sum_squares) or 0 < sum_squares < _TINY_SQUARES
        if array.dtype != np.float64 or not edge:
            return None
        return float(library_penalty(array, self.report.l1, self.report.l2))

    def _single(self, path: str, tensor: Tensor, array: Array) -> tuple[float, float] | None:
        try:
            return sums(array)
        except (TypeError, ValueError) as error:
            self.problem(path, tensor.name, describe(error))
            return None

    def _streamed(self, path: str, tensor: Tensor) -> TensorResult | None:
        """Sums of a tensor read or converted a piece at a time."""
        pieces = tensor.pieces() if tensor.pieces is not None else _pieces_of(tensor)
        abs_parts, square_parts = [], []
        try:
            for piece in pieces:
                sum_abs, sum_squares = sums(_native(piece))
                abs_parts.append(sum_abs)
                square_parts.append(sum_squares)
        except _STREAM_ERRORS as error:
            self.problem(path, tensor.name, describe(error))
            return None
        return self._result(path, tensor, _fsum(abs_parts), _fsum(square_parts))

    def _result(
        self,
        path: str,
        tensor: Tensor,
        sum_abs: float,
        sum_squares: float,
        penalty: float | None = None,
    ) -> TensorResult:
        assert not isinstance(tensor.dtype, str)
        floating = tensor.dtype.kind not in "iub"
        dtype_name = tensor.dtype.name
        if not floating:
            self.problem(
                path,
                tensor.name,
                f"not a float tensor ({dtype_name}): summed exactly, left out of the totals",
            )
        l1, l2 = self.report.l1, self.report.l2
        if penalty is None:
            penalty = (l1 * sum_abs if l1 else 0.0) + (l2 * sum_squares if l2 else 0.0)
        return TensorResult(
            tensor.name, dtype_name, tensor.shape, Sums(sum_abs, sum_squares, penalty, 1), floating
        )


def _in_place(array: Array) -> bool:
    """Whether the core reads ``array`` where it is: aligned and in native byte order."""
    return bool(array.flags.aligned) and array.dtype.isnative


def _pieces_of(tensor: Tensor) -> Iterator[Array]:
    """A mapped tensor the core cannot read in place, a bounded piece at a time."""
    assert tensor.array is not None
    flat = tensor.array.reshape(-1)
    per_piece = max(1, PIECE_BYTES // max(flat.dtype.itemsize, 1))
    for start in range(0, max(len(flat), 1), per_piece):
        yield flat[start : start + per_piece]


def _native(piece: Array) -> Array:
    """``piece`` aligned and in native byte order, copied if it is not."""
    if _in_place(piece):
        return piece
    return np.ascontiguousarray(piece, dtype=piece.dtype.newbyteorder("="))


def _fsum(parts: list[float]) -> float:
    """The exact sum of non-negative parts, rounded once (inf and NaN pass through)."""
    if any(math.isnan(part) for part in parts):
        return math.nan
    return math.fsum(parts)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _unsupported(dtype: object) -> str:
    return (
        f"dtype {dtype} is not supported (float16, bfloat16, float32, float64, integers and "
        "bool are)"
    )


def describe(error: BaseException) -> str:
    """A one-line message for ``error`` (without the ``l1l2_rs:`` prefix of core errors)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.removeprefix("l1l2_rs: ")


def order_by_penalty(report: Report) -> list[tuple[FileResult, TensorResult]]:
    """Every tensor, largest penalty first (NaN first of all), file order among equals."""
    every = [(file, tensor) for file in report.files for tensor in file.tensors]

    def key(entry: tuple[FileResult, TensorResult]) -> float:
        penalty = entry[1].sums.penalty
        return -math.inf if math.isnan(penalty) else -penalty

    return sorted(every, key=key)


def share(tensor: TensorResult, report: Report) -> float | None:
    """The tensor's part of the total penalty; None for non-float tensors or a zero total."""
    total = report.total.penalty
    if not tensor.floating or total == 0 or not math.isfinite(total):
        return None
    return tensor.sums.penalty / total


def as_json(report: Report, top: int | None) -> dict[str, Any]:
    """The report as the document ``cli_schema.json`` describes."""

    def sums_json(value: Sums) -> dict[str, Any]:
        return {
            "sum_abs": _number(value.sum_abs),
            "sum_squares": _number(value.sum_squares),
            "penalty": _number(value.penalty),
            "tensors": value.tensors,
        }

    def tensor_json(tensor: TensorResult) -> dict[str, Any]:
        fraction = share(tensor, report)
        return {
            "name": tensor.name,
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "float": tensor.floating,
            "sum_abs": _number(tensor.sums.sum_abs),
            "sum_squares": _number(tensor.sums.sum_squares),
            "penalty": _number(tensor.sums.penalty),
            "share": None if fraction is None else _number(fraction),
        }

    return {
        "version": 1,
        "l1": report.l1,
        "l2": report.l2,
        "files": [
            {
                "path": file.path,
                "format": file.format,
                "tensors": [tensor_json(t) for t in kept_in_file(report, file, top)],
                "total": sums_json(file.total),
            }
            for file in report.files
        ],
        "errors": [
            {"path": problem.path, "tensor": problem.tensor, "message": problem.message}
            for problem in report.problems
        ],
        "total": {**sums_json(report.total), "files": len(report.files)},
    }


def kept_in_file(report: Report, file: FileResult, top: int | None) -> list[TensorResult]:
    """The tensors of ``file`` to list: all in file order, or those among the ``top`` largest
    penalties of the report, largest first."""
    if top is None:
        return file.tensors
    return [tensor for owner, tensor in order_by_penalty(report)[:top] if owner is file]


def _number(value: float) -> float | str:
    """JSON has no inf or NaN: those are written as the strings "inf" and "nan"."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
