"""Side-by-side comparison of l1l2_rs with numpy (and numba/torch when installed), against the
memory-bandwidth roofline measured in the same run.

    python benches/compare.py                      # full run, writes benches/results/
    python benches/compare.py --quick              # a few seconds: small sizes, few samples

Method: for each (dtype, size, layout) the candidates are timed *interleaved*: every sample round
calls each candidate once (many calls per sample for small sizes), so that frequency changes and
noisy neighbours hit every candidate alike; the figure is the median over the rounds, and beside
it the interquartile range (IQR: 75th minus 25th percentile of the rounds) as a percentage of the
median. The IQR says how much a figure can be trusted: a few per cent is a stable timing, tens of
per cent a bimodal or disturbed one (a thread pool that wakes late on some calls, a neighbour).
After each sample the run sleeps ``--settle`` ms so that a thread runtime that spins after its
calls (OpenMP's workers spin for a few ms) has gone idle before the next candidate's sample.

C reference: ``benches/c_roofline/c_roofline.c``, compiled at startup with the system ``gcc``
(flags in ``C_ROOFLINE_CFLAGS``, default ``-O3 -march=native -mprefer-vector-width=512 -fopenmp``;
the file says how to build it by hand). It is the same fused math as l1l2_rs (|x| and x^2 summed
in float64 accumulators) in plain C, a CPython C-API extension (no ctypes cost), on one thread
("C 1 thread") and on an OpenMP team as large as l1l2_rs' thread count ("C OpenMP"), plus a copy
(memcpy on one thread / OpenMP halves), the floor of the ops that write an array. Without gcc the
C columns are left out.

torch runs in a separate process after the main pass (``--torch-pass``): its OpenMP workers spin
for a few ms after each call and, on a 2-CPU machine, slowed the candidate timed next (1e6 float32
l1l2_rs read 253 us next to torch and 60 us without). Its figures are therefore not interleaved
with the others'.

Roofline, in a build with the ``probe`` feature (``MATURIN_PEP517_ARGS="--features probe" pip
install .``; without it the column is left out): ``l1l2_rs._l1l2_rs._read_probe(x)`` XORs every
8-byte word of the buffer through the same call path, chunking and thread pool as the penalty.
XOR costs one vector instruction per 16-64 bytes (compiled per ISA like the kernels, and read from
the first 64-byte boundary on), so the probe runs at what the memory (or cache) delivers to these
threads plus one extension call: no one-pass penalty in an extension can be faster.
"x roofline" is time / probe time.

Ops (float32/float64 contiguous, sizes 1e5..1e7 of the run): ``value_and_grad`` into a
preallocated ``out`` and ``prox_`` in place, next to ``np.copyto`` and the C copy, which read and
write as many bytes. Many tensors: ``penalty_many`` over the ResNet-50 parameter list
(``--shapes``) next to one ``penalty`` call over one array of the same total size; the list twice,
as separate arrays and as views of one buffer. numpy asks the kernel for huge pages (2 MiB) for
arrays of 4 MiB or more only, so the separate arrays put a third of the elements on 4 KiB pages
where the one array has none; the views share the one array's page backing and isolate the cost
of the many tensors themselves.

BLAS: the run holds BLAS (numpy's dot) to one thread with threadpoolctl. OpenBLAS' idle threads
spin for a long while after each call, and on a 2-core machine they would slow down whatever
candidate runs next.

Extra memory: the growth of the peak RSS of a fresh process during one call on the largest float32
array (after a warm-up call on a small one), for each candidate and layout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import l1l2_rs
from l1l2_rs import _l1l2_rs

L1, L2 = 1e-4, 1e-3
Candidate = Callable[[], Any]


def torch_candidates(x: np.ndarray) -> dict[str, Candidate]:
    """torch's penalty, for the separate ``--torch-pass`` process only (see the module docs)."""
    try:
        import torch
    except ImportError:
        return {}
    if x.dtype not in (np.float32, np.float64) or not x.flags.c_contiguous:
        return {}
    tensor = torch.from_numpy(x)
    return {"torch": lambda: L1 * tensor.abs().sum() + L2 * tensor.square().sum()}


C_SOURCE = Path(__file__).parent / "c_roofline" / "c_roofline.c"
C_FLAGS = "-O3 -march=native -mprefer-vector-width=512 -fopenmp"


def build_c_reference() -> tuple[ModuleType | None, str]:
    """Compiles and imports the C reference; ``(None, why)`` when that is not possible."""
    flags = shlex.split(os.environ.get("C_ROOFLINE_CFLAGS", C_FLAGS))
    target = Path(tempfile.mkdtemp(prefix="c_roofline_")) / (
        "_c_roofline" + str(sysconfig.get_config_var("EXT_SUFFIX"))
    )
    include = sysconfig.get_paths()["include"]
    command = ["gcc", *flags, "-fPIC", "-shared", f"-I{include}", str(C_SOURCE), "-o", str(target)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"C reference not built ({' '.join(command)}): {error}"
    spec = importlib.util.spec_from_file_location("_c_roofline", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_c_reference(module)
    return module, " ".join(command)


def check_c_reference(module: ModuleType) -> None:
    """The C sums agree with math.fsum on both dtypes and thread counts (to float64 rounding)."""
    import math

    for dtype in (np.float32, np.float64):
        x = make(10_007, dtype)
        values = [float(v) for v in x]
        exact = (math.fsum(abs(v) for v in values), math.fsum(v * v for v in values))
        for threads in (1, 2):
            found = module.sums(x, threads)
            if not all(
                math.isclose(f, e, rel_tol=1e-12) for f, e in zip(found, exact, strict=True)
            ):
                raise RuntimeError(f"C reference disagrees with fsum: {found} vs {exact}")


def candidates(x: np.ndarray, contiguous: bool, c_ref: ModuleType | None) -> dict[str, Candidate]:
    regularizer = l1l2_rs.L1L2(L1, L2)
    table: dict[str, Candidate] = {"l1l2_rs": lambda: regularizer(x)}
    # numpy's float16 reductions run at ~30 Melem/s: past 1e7 they only make the run long.
    slow_numpy = x.dtype == np.float16 and x.size > 10**7
    if x.dtype.kind == "f" and not slow_numpy:
        table["numpy naive"] = lambda: L1 * np.abs(x).sum() + L2 * np.square(x).sum()
        flat = x.reshape(-1) if contiguous else None
        if flat is not None:
            table["numpy abs+dot"] = lambda: L1 * np.abs(flat).sum() + L2 * np.dot(flat, flat)
    read_probe = getattr(_l1l2_rs, "_read_probe", None)
    if contiguous and read_probe is not None:
        table["roofline"] = lambda: read_probe(x)
    if contiguous and c_ref is not None and x.dtype in (np.float32, np.float64):
        threads = l1l2_rs.get_num_threads()
        table["C 1 thread"] = lambda: c_ref.penalty(x, L1, L2, 1)
        table["C OpenMP"] = lambda: c_ref.penalty(x, L1, L2, threads)
    return table


@dataclass
class Timing:
    """Seconds per call over the sample rounds: median and quartiles."""

    median: float
    q1: float
    q3: float

    @property
    def iqr_percent(self) -> float:
        return 100 * (self.q3 - self.q1) / self.median

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median, q1, q3)


def time_interleaved(
    table: dict[str, Candidate], rounds: int, budget: float, settle: float = 0.0
) -> dict[str, Timing]:
    """Median and quartiles of seconds per call of each candidate, over interleaved rounds;
    ``settle`` seconds of sleep after each sample let spinning thread runtimes go idle."""
    calls = {}
    sample = budget / rounds
    for name, function in table.items():  # calibrate: each sample lasts >= ~budget / rounds
        function()
        # Timed over a tenth of a sample, not one call: one slow call (a thread pool waking up,
        # the first call of a run) made a candidate's samples 20-30x too short, so that each
        # sample's first calls after the settle weighed 20-30x too much in its figure.
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < sample / 10:
            function()
            count += 1
        once = max((time.perf_counter() - start) / count, 1e-7)
        calls[name] = max(1, min(10_000, int(sample / once)))
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds):
        for name, function in table.items():
            count = calls[name]
            function()  # untimed: wake the thread pool and warm the caches after the others ran
            start = time.perf_counter()
            for _ in range(count):
                function()
            samples[name].append((time.perf_counter() - start) / count)
            if settle:
                time.sleep(settle)
    return {name: Timing.of(values) for name, values in samples.items()}


def seconds_after_pause(call: Candidate, pause: float) -> float:
    """Spins for ``pause`` seconds (as a training step's other work would keep the CPU busy),
    then returns the seconds of one ``call``, timed alone."""
    end = time.perf_counter() + pause
    while time.perf_counter() < end:
        pass
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


MEMORY_PROBE = """
import resource, sys, numpy as np, l1l2_rs
x = np.random.default_rng(0).standard_normal({size}, dtype=np.float32)
side = {side}
views = {{
    "contiguous": x,
    "x[::2]": x[::2],
    "transposed 2-D": x[: side * side].reshape(side, side).T,
}}
regularizer = l1l2_rs.L1L2({l1}, {l2})
def call(v):
    if sys.argv[2] == "l1l2_rs":
        return regularizer(v)
    return {l1} * np.abs(v).sum() + {l2} * np.square(v).sum()
call(x[:100_000])  # warm up imports and the thread pool on a small array
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
call(views[sys.argv[1]])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def extra_memory(size: int) -> dict[str, int]:
    """Peak RSS growth of one call on a float32 array of ``size``, each in a fresh process."""
    import subprocess

    code = MEMORY_PROBE.format(size=size, side=int(np.sqrt(size)), l1=L1, l2=L2)
    found = {}
    for layout in ("contiguous", "x[::2]", "transposed 2-D"):
        for candidate in ("l1l2_rs", "numpy naive"):
            out = subprocess.run(
                [sys.executable, "-c", code, layout, candidate],
                capture_output=True,
                text=True,
                check=True,
            )
            found[f"{candidate} {layout}"] = int(out.stdout.strip())
    return found


def make(size: int, dtype: Any) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(size) * 0.05).astype(dtype)


def layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    side = int(np.sqrt(x.size))
    return {
        "contiguous": x,
        "x[::2]": x[::2],
        "transposed 2-D": x[: side * side].reshape(side, side).T,
    }


def row(dtype: str, x: np.ndarray, layout: str, candidate: str, timing: Timing) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "size": int(x.size),
        "layout": layout,
        "candidate": candidate,
        "seconds": timing.median,
        "q1_seconds": timing.q1,
        "q3_seconds": timing.q3,
        "iqr_percent": timing.iqr_percent,
        "bytes": int(x.size * x.dtype.itemsize),
    }


def print_case(name: str, x: np.ndarray, layout: str, times: dict[str, Timing]) -> None:
    print(
        f"{name:8} {x.size:>11,} {layout:15} "
        + "  ".join(
            f"{c}={t.median * 1e6:.2f}us[iqr {t.iqr_percent:.0f}%]" for c, t in times.items()
        ),
        flush=True,
    )


def penalty_rows(
    dtypes: list[Any],
    sizes: list[int],
    time_table: Callable[[dict[str, Candidate]], dict[str, Timing]],
    make_table: Callable[[np.ndarray, bool], dict[str, Candidate]],
    contiguous_only: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        name = np.dtype(dtype).name
        for size in sizes:
            base = make(size, dtype)
            for layout, x in layouts(base).items():
                if layout != "contiguous" and (
                    contiguous_only or dtype not in (np.float32, np.float64, np.float16)
                ):
                    continue
                table = make_table(x, layout == "contiguous")
                if not table:
                    continue
                times = time_table(table)
                rows += [row(name, x, layout, c, t) for c, t in times.items()]
                print_case(name, x, layout, times)
    return rows


def op_rows(
    dtypes: list[Any],
    sizes: list[int],
    time_table: Callable[[dict[str, Candidate]], dict[str, Timing]],
    c_ref: ModuleType | None,
) -> list[dict[str, Any]]:
    """value_and_grad and prox_ next to a plain copy of as many bytes (float32/float64)."""
    rows = []
    threads = l1l2_rs.get_num_threads()
    for dtype in [d for d in dtypes if d in (np.float32, np.float64)]:
        for size in [s for s in sizes if 10**5 <= s <= 10**7]:
            x = make(size, dtype)
            shrunk = x.copy()  # prox_ shrinks it by ~1e-7 a call: never near zero in a run
            out = np.empty_like(x)
            table: dict[str, Candidate] = {
                "value_and_grad": lambda x=x, out=out: l1l2_rs.value_and_grad(x, L1, L2, out=out),
                "prox_": lambda y=shrunk: l1l2_rs.prox_(y, 1e-3, L1, L2),
                "np.copyto": lambda x=x, out=out: np.copyto(out, x),
            }
            if c_ref is not None:
                table["C copy 1 thread"] = lambda x=x, out=out: c_ref.copy(out, x, 1)
                table["C copy OpenMP"] = lambda x=x, out=out: c_ref.copy(out, x, threads)
            times = time_table(table)
            name = np.dtype(dtype).name
            rows += [row(name, x, "ops", c, t) for c, t in times.items()]
            print_case(name, x, "ops", times)
    return rows


def many_tensor_rows(
    shapes_file: Path, time_table: Callable[[dict[str, Candidate]], dict[str, Timing]]
) -> list[dict[str, Any]]:
    """penalty_many over a model's parameter list (separate arrays, and views of one buffer) next
    to one penalty over as many elements."""
    shapes = [tuple(shape) for shape in json.loads(shapes_file.read_text())["shapes"]]
    params = [make(int(np.prod(shape)), np.float32).reshape(shape) for shape in shapes]
    total = sum(p.size for p in params)
    flat = make(total, np.float32)
    views = views_of_one_buffer(shapes)
    times = time_table(
        {
            f"penalty_many ({len(params)} tensors)": lambda: l1l2_rs.penalty_many(params, L1, L2),
            f"penalty_many ({len(views)} views of one buffer)": lambda: l1l2_rs.penalty_many(
                views, L1, L2
            ),
            "penalty (one array)": lambda: l1l2_rs.penalty(flat, L1, L2),
        }
    )
    print_case("float32", flat, "many tensors", times)
    return [row("float32", flat, "many tensors", c, t) for c, t in times.items()]


def views_of_one_buffer(shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Arrays of ``shapes`` carved out of one float32 buffer, each starting on a 64-byte line (as
    numpy aligns its own large arrays)."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    line = 16  # float32 values per 64-byte line
    buffer = make(sum(-(-size // line) * line for size in sizes) + line, np.float32)
    first = (-buffer.ctypes.data % 64) // buffer.itemsize
    views, start = [], first
    for size, shape in zip(sizes, shapes, strict=True):
        views.append(buffer[start : start + size].reshape(shape))
        start += -(-size // line) * line
    return views


def torch_pass(args: argparse.Namespace, dtypes: list[Any], sizes: list[int]) -> list[Any]:
    """Runs the torch candidates in a child process (see the module docs); its rows."""
    if importlib.util.find_spec("torch") is None:
        return []
    names = ",".join(np.dtype(d).name for d in dtypes if d in (np.float32, np.float64))
    if not names:
        return []
    command = [sys.executable, __file__, "--torch-pass", "--dtypes", names]
    command += ["--sizes", ",".join(map(str, sizes)), "--settle", str(args.settle)]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    rows: list[Any] = json.loads(done.stdout.splitlines()[-1])
    for found in rows:
        print(f"torch pass: {found['dtype']} {found['size']:>11,} {found['seconds'] * 1e6:.2f}us")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dtypes", default="float32,float64,float16,bfloat16")
    parser.add_argument("--sizes", help="comma-separated element counts (default 1e3..1e8)")
    parser.add_argument("--settle", type=float, default=10.0, help="ms of sleep after a sample")
    parser.add_argument(
        "--shapes",
        type=Path,
        default=Path("/work/shared/data/resnet50_shapes.json"),
        help="JSON {'shapes': [...]} of a model's parameters, for the many-tensor row",
    )
    parser.add_argument("--torch-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true", help="redraw the plot from compare.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((args.out / "compare.json").read_text()), args.out / "compare.png")
        return 0

    try:
        import ml_dtypes

        bfloat16: Any = ml_dtypes.bfloat16
    except ImportError:
        bfloat16 = None
    sizes = [1_000, 10_000, 100_000] if args.quick else [10**e for e in range(3, 9)]
    if args.sizes:
        sizes = [int(float(size)) for size in args.sizes.split(",")]
    rounds, budget = (5, 0.05) if args.quick else (21, 0.6)
    known = {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
        "bfloat16": bfloat16,
    }
    dtypes = [known[name] for name in args.dtypes.split(",") if known.get(name) is not None]

    def time_table(table: dict[str, Candidate]) -> dict[str, Timing]:
        return time_interleaved(table, rounds, budget, args.settle / 1e3)

    if args.torch_pass:
        rows = penalty_rows(
            dtypes, sizes, time_table, lambda x, _: torch_candidates(x), contiguous_only=True
        )
        print(json.dumps(rows))
        return 0

    largest = sizes[-1]
    memory = {"float32": extra_memory(largest)}

    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        print("threadpoolctl not installed: BLAS threads may disturb the timings", file=sys.stderr)

    c_ref, c_build = build_c_reference()
    print(c_build, flush=True)
    load_before = os.getloadavg()
    rows = penalty_rows(
        dtypes, sizes, time_table, lambda x, contiguous: candidates(x, contiguous, c_ref)
    )
    rows += op_rows(dtypes, sizes, time_table, c_ref)
    if args.shapes.exists():
        rows += many_tensor_rows(args.shapes, time_table)

    # Threads: 1 vs 2 at 1e6 float32 (same process, same data, interleaved).
    x = make(1_000_000, np.float32)
    regularizer = l1l2_rs.L1L2(L1, L2)

    def with_threads(n: int) -> Candidate:
        def call() -> Any:
            l1l2_rs.set_num_threads(n)
            return regularizer(x)

        return call

    thread_times = time_table({"1 thread": with_threads(1), "2 threads": with_threads(2)})
    l1l2_rs.set_num_threads(0)
    rows += torch_pass(args, dtypes, sizes)

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "simd": l1l2_rs.simd_isa(),
            "threads": l1l2_rs.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "command": " ".join(["python", *sys.argv]),
        "c_reference_build": c_build,
        "rows": rows,
        "extra_memory_bytes": memory,
        "extra_memory_elements": largest,
        "threads_1e6_float32_seconds": {k: t.median for k, t in thread_times.items()},
        "threads_1e6_float32_iqr_percent": {k: t.iqr_percent for k, t in thread_times.items()},
    }
    write_results(args.out, "compare", report, markdown(report))
    plot(report, args.out / "compare.png")
    return 0


def write_results(out: Path, stem: str, report: dict[str, Any], table: str) -> None:
    """Writes ``out/stem.json`` and ``out/stem.md`` and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(table)
    print(table)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    index = {(r["dtype"], r["size"], r["layout"], r["candidate"]): r for r in rows}
    threads = report["machine"]["threads"]
    lines = [
        "Times are medians over the sample rounds; (n%) beside a time is its interquartile range "
        "(75th minus 25th percentile of the rounds) as a percentage of the median.",
        "",
        f"| dtype | size | layout | l1l2_rs | GB/s | x roofline | C 1 thread | C OpenMP "
        f"({threads} threads) | ours / C OpenMP | numpy naive | numpy / ours "
        "| numpy abs+dot (1-thread BLAS) | torch (own process) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    penalty_layouts = ("contiguous", "x[::2]", "transposed 2-D")
    cases = sorted(
        {(r["dtype"], r["size"], r["layout"]) for r in rows if r["layout"] in penalty_layouts}
    )
    for case in cases:
        ours = index.get((*case, "l1l2_rs"))
        if ours is None:
            continue
        seconds = ours["seconds"]

        def get(candidate: str, case: tuple[str, int, str] = case) -> dict[str, Any] | None:
            return index.get((*case, candidate))

        roof, naive, dot = get("roofline"), get("numpy naive"), get("numpy abs+dot")
        c_omp = get("C OpenMP")
        cells = [
            case[0],
            f"{case[1]:.0e}",
            case[2],
            with_iqr(ours),
            f"{ours['bytes'] / seconds / 1e9:.1f}",
            f"{seconds / roof['seconds']:.2f}" if roof else "-",
            with_iqr(get("C 1 thread")),
            with_iqr(c_omp),
            f"{seconds / c_omp['seconds']:.2f}" if c_omp else "-",
            with_iqr(naive),
            f"{naive['seconds'] / seconds:.1f}" if naive else "-",
            with_iqr(dot),
            with_iqr(get("torch")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ops_markdown(rows, index)
    memory = report["extra_memory_bytes"]["float32"]
    lines.append("")
    lines.append(
        f"Peak RSS growth during one call on {report['extra_memory_elements']:.0e} float32 "
        "(fresh process each): "
        + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in memory.items())
    )
    times = report["threads_1e6_float32_seconds"]
    iqr = report["threads_1e6_float32_iqr_percent"]
    lines.append(
        f"1e6 float32: 1 thread {format_time(times['1 thread'])} ({iqr['1 thread']:.0f}%), "
        f"2 threads {format_time(times['2 threads'])} ({iqr['2 threads']:.0f}%) "
        f"({times['1 thread'] / times['2 threads']:.2f}x)"
    )
    load = report["machine"]
    lines.append(
        f"Load average (1, 5, 15 min) before the run {fmt_load(load['load_average_before'])}, "
        f"after {fmt_load(load['load_average_after'])}."
    )
    return "\n".join(lines) + "\n"


def ops_markdown(rows: list[dict[str, Any]], index: dict[Any, dict[str, Any]]) -> list[str]:
    """The value_and_grad / prox_ table and the many-tensor line."""
    lines = [
        "",
        "| dtype | size | value_and_grad | prox_ | np.copyto | vag / copyto "
        "| prox_ / copyto | C copy 1 thread | C copy OpenMP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = sorted({(r["dtype"], r["size"]) for r in rows if r["candidate"] == "prox_"})
    for dtype, size in cases:

        def get(candidate: str, case: tuple[str, int] = (dtype, size)) -> dict[str, Any] | None:
            return index.get((*case, "ops", candidate))

        vag, prox, copy = get("value_and_grad"), get("prox_"), get("np.copyto")
        assert vag is not None and prox is not None and copy is not None
        cells = [
            dtype,
            f"{size:.0e}",
            with_iqr(vag),
            with_iqr(prox),
            with_iqr(copy),
            f"{vag['seconds'] / copy['seconds']:.2f}",
            f"{prox['seconds'] / copy['seconds']:.2f}",
            with_iqr(get("C copy 1 thread")),
            with_iqr(get("C copy OpenMP")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    many = [r for r in rows if r["layout"] == "many tensors"]
    if len(many) >= 2:
        *lists, one = many
        lines += [
            "",
            "Many tensors (float32, "
            + f"{one['size']:,} elements): "
            + ", ".join(
                f"{r['candidate']} {with_iqr(r)} ({r['seconds'] / one['seconds']:.2f}x)"
                for r in lists
            )
            + f", {one['candidate']} {with_iqr(one)}",
        ]
    return lines


def with_iqr(found: dict[str, Any] | None) -> str:
    if found is None:
        return "-"
    return f"{format_time(found['seconds'])} ({found['iqr_percent']:.0f}%)"


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.2f} ms"


COLORS = {
    "l1l2_rs": "tab:blue",
    "roofline": "tab:red",
    "numpy naive": "tab:green",
    "numpy abs+dot": "tab:orange",
    "C 1 thread": "tab:gray",
    "C OpenMP": "tab:purple",
    "torch": "tab:brown",
}


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    rows = [r for r in report["rows"] if r["layout"] == "contiguous"]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(5 * len(dtypes), 4), sharey=True, squeeze=False
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for candidate in sorted({r["candidate"] for r in rows if r["dtype"] == dtype}):
            points = sorted(
                (r["size"], r["bytes"] / r["seconds"] / 1e9)
                for r in rows
                if r["dtype"] == dtype and r["candidate"] == candidate
            )
            style = "--" if candidate == "roofline" else "-o"
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], style, label=candidate, markersize=3
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{dtype}, contiguous")
        ax.set_xlabel("elements")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s read (higher is better)")
    axes[0][-1].legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(
        f"L1L2 penalty throughput: {machine['cpu']}, "
        f"{machine['threads']} threads, {machine['simd']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
