"""`l1l2 model.safetensors` against `cat model.safetensors > /dev/null`, from a warm page cache.

Writes a 4 GiB float32 .safetensors file (random normal weights, in a temporary directory that is
deleted afterwards), reads it once with `cat` to bring it into the page cache, then times each
command several times and prints the medians and their ratio. The target is l1l2 <= 1.2x cat:
the command should cost little more than reading the bytes once.

    python benches/cli_checkpoint.py [--gib 4] [--runs 5]

It needs about 4 GiB of free memory for the page cache (else both read from disk) and as much disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_safetensors(path: Path, count: int) -> None:
    """A float32 tensor of ``count`` elements, written a slice at a time (8-byte length, JSON
    header padded to 8 bytes, data)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}})
    text = header.encode() + b" " * (-len(header) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)
        step = 1 << 24
        for start in range(0, count, step):
            n = min(step, count - start)
            file.write(rng.standard_normal(n, dtype=np.float32).tobytes())


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="file size in GiB (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    arguments = parser.parse_args()
    l1l2 = shutil.which("l1l2")
    command = [l1l2] if l1l2 else [sys.executable, "-m", "l1l2_rs"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.safetensors"
        write_safetensors(path, int(arguments.gib * 2**30) // 4)
        size = os.path.getsize(path)
        print(f"file: {size / 2**30:.2f} GiB float32; load average {os.getloadavg()[0]:.2f}")
        cat = ["sh", "-c", f"cat '{path}' > /dev/null"]
        subprocess.run(cat, check=True)  # warm the page cache
        cat_time = median_seconds(cat, arguments.runs)
        ours_time = median_seconds([*command, str(path)], arguments.runs)
    print(f"cat > /dev/null: {cat_time:.3f} s ({size / cat_time / 2**30:.2f} GiB/s), median")
    print(f"l1l2:            {ours_time:.3f} s ({size / ours_time / 2**30:.2f} GiB/s), median")
    print(f"ratio l1l2 / cat: {ours_time / cat_time:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
