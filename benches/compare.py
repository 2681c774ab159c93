"""Side-by-side comparison of l1l2_rs with numpy (and numba/torch when installed), against the
memory-bandwidth roofline measured in the same run.

    python benches/compare.py                      # full run, writes benches/results/
    python benches/compare.py --quick              # a few seconds: small sizes, few samples

Method: for each (dtype, size, layout) the candidates are timed *interleaved*: every sample round
calls each candidate once (many calls per sample for small sizes), so that frequency changes and
noisy neighbours hit every candidate alike; the figure is the median over the rounds.

Roofline, in a build with the ``probe`` feature (``MATURIN_PEP517_ARGS="--features probe" pip
install .``; without it the column is left out): ``l1l2_rs._l1l2_rs._read_probe(x)`` XORs every
8-byte word of the buffer through the same call path, chunking and thread pool as the penalty.
XOR costs one vector instruction per 16-64 bytes (compiled per ISA like the kernels, and read from
the first 64-byte boundary on), so the probe runs at what the memory (or cache) delivers to these
threads plus one extension call: no one-pass penalty in an extension can be faster.
"x roofline" is time / probe time.

BLAS: the run holds BLAS (numpy's dot) to one thread with threadpoolctl. OpenBLAS' idle threads
spin for a long while after each call, and on a 2-core machine they would slow down whatever
candidate runs next.

Extra memory: the growth of the peak RSS of a fresh process during one call on the largest float32
array (after a warm-up call on a small one), for each candidate and layout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import l1l2_rs
from l1l2_rs import _l1l2_rs

L1, L2 = 1e-4, 1e-3
Candidate = Callable[[], Any]


def optional_candidates(x: np.ndarray) -> dict[str, Candidate]:
    found: dict[str, Candidate] = {}
    try:
        import numba

        @numba.njit(parallel=True, fastmath=False, cache=False)
        def fused(values: np.ndarray) -> float:
            total_abs = 0.0
            total_sq = 0.0
            for i in numba.prange(values.size):
                v = float(values[i])
                total_abs += abs(v)
                total_sq += v * v
            return L1 * total_abs + L2 * total_sq

        flat = x.reshape(-1) if x.flags.c_contiguous else None
        if flat is not None and x.dtype in (np.float32, np.float64):
            fused(flat)  # compile outside the timing
            found["numba fused"] = lambda: fused(flat)
    except ImportError:
        pass
    try:
        import torch

        if x.dtype in (np.float32, np.float64):
            tensor = torch.from_numpy(np.ascontiguousarray(x) if not x.flags.c_contiguous else x)
            found["torch"] = lambda: L1 * tensor.abs().sum() + L2 * tensor.square().sum()
    except ImportError:
        pass
    return found


def candidates(x: np.ndarray, contiguous: bool) -> dict[str, Candidate]:
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
    if contiguous:
        table.update(optional_candidates(x))
    return table


def time_interleaved(table: dict[str, Candidate], rounds: int, budget: float) -> dict[str, float]:
    """Median seconds per call of each candidate, over interleaved rounds."""
    calls = {}
    for name, function in table.items():  # calibrate: each sample lasts >= ~budget / rounds
        function()
        start = time.perf_counter()
        function()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, min(10_000, int(budget / rounds / once)))
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds):
        for name, function in table.items():
            count = calls[name]
            function()  # untimed: wake the thread pool and warm the caches after the others ran
            start = time.perf_counter()
            for _ in range(count):
                function()
            samples[name].append((time.perf_counter() - start) / count)
    return {name: statistics.median(values) for name, values in samples.items()}


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dtypes", default="float32,float64,float16,bfloat16")
    parser.add_argument("--sizes", help="comma-separated element counts (default 1e3..1e8)")
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

    rows: list[dict[str, Any]] = []
    memory: dict[str, dict[str, int]] = {}
    largest = sizes[-1]
    memory = {"float32": extra_memory(largest)}

    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        print("threadpoolctl not installed: BLAS threads may disturb the timings", file=sys.stderr)

    for dtype in dtypes:
        name = np.dtype(dtype).name
        for size in sizes:
            base = make(size, dtype)
            for layout, x in layouts(base).items():
                if layout != "contiguous" and dtype not in (np.float32, np.float64, np.float16):
                    continue
                contiguous = layout == "contiguous"
                times = time_interleaved(candidates(x, contiguous), rounds, budget)
                for candidate, seconds in times.items():
                    rows.append(
                        {
                            "dtype": name,
                            "size": int(x.size),
                            "layout": layout,
                            "candidate": candidate,
                            "seconds": seconds,
                            "bytes": int(x.size * x.dtype.itemsize),
                        }
                    )
                print(
                    f"{name:8} {x.size:>11,} {layout:15} "
                    + "  ".join(f"{c}={s * 1e6:.2f}us" for c, s in times.items()),
                    flush=True,
                )

    # Threads: 1 vs 2 at 1e6 float32 (same process, same data, interleaved).
    x = make(1_000_000, np.float32)
    regularizer = l1l2_rs.L1L2(L1, L2)

    def with_threads(n: int) -> Candidate:
        def call() -> Any:
            l1l2_rs.set_num_threads(n)
            return regularizer(x)

        return call

    thread_times = time_interleaved(
        {"1 thread": with_threads(1), "2 threads": with_threads(2)}, rounds, budget
    )
    l1l2_rs.set_num_threads(0)

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "simd": l1l2_rs.simd_isa(),
            "threads": l1l2_rs.get_num_threads(),
        },
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
        "extra_memory_bytes": memory,
        "extra_memory_elements": largest,
        "threads_1e6_float32_seconds": thread_times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "compare.md").write_text(table)
    print(table)
    plot(report, args.out / "compare.png")
    return 0


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
    lines = [
        "| dtype | size | layout | l1l2_rs | GB/s | x roofline | numpy naive | numpy / ours "
        "| numpy abs+dot (1-thread BLAS) | others |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    cases = sorted({(r["dtype"], r["size"], r["layout"]) for r in rows})
    for case in cases:
        ours = index[(*case, "l1l2_rs")]
        seconds = ours["seconds"]

        def time_of(candidate: str, case: tuple[str, int, str] = case) -> float | None:
            row = index.get((*case, candidate))
            return None if row is None else float(row["seconds"])

        roof, naive, dot = time_of("roofline"), time_of("numpy naive"), time_of("numpy abs+dot")
        others = [
            f"{c}: {format_time(t)}"
            for c in ("numba fused", "torch")
            if (t := time_of(c)) is not None
        ]
        cells = [
            case[0],
            f"{case[1]:.0e}",
            case[2],
            format_time(seconds),
            f"{ours['bytes'] / seconds / 1e9:.1f}",
            f"{seconds / roof:.2f}" if roof else "-",
            format_time(naive) if naive else "-",
            f"{naive / seconds:.1f}" if naive else "-",
            format_time(dot) if dot else "-",
            ", ".join(others) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    memory = report["extra_memory_bytes"]["float32"]
    lines.append("")
    lines.append(
        f"Peak RSS growth during one call on {report['extra_memory_elements']:.0e} float32 "
        "(fresh process each): "
        + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in memory.items())
    )
    threads = report["threads_1e6_float32_seconds"]
    lines.append(
        f"1e6 float32: 1 thread {format_time(threads['1 thread'])}, 2 threads "
        f"{format_time(threads['2 threads'])} ({threads['1 thread'] / threads['2 threads']:.2f}x)"
    )
    return "\n".join(lines) + "\n"


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.2f} ms"


COLORS = {
    "l1l2_rs": "tab:blue",
    "roofline": "tab:red",
    "numpy naive": "tab:green",
    "numpy abs+dot": "tab:orange",
    "numba fused": "tab:purple",
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
