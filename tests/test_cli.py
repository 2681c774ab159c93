"""The command line: `l1l2 FILES...` and the built-in demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_within_ulps, exact_penalty


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l1l2_rs", *args], capture_output=True, text=True, timeout=120
    )


def test_files_are_reported_with_their_total(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 30)).astype(np.float32)
    b = rng.standard_normal(1001)[::-1].copy()
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = run("--l1", "0.001", "--l2", "0.01", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"))
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == [
        str(tmp_path / "a.npy"),
        str(tmp_path / "b.npy"),
        "total",
    ]
    assert lines[0][1:3] == ["float32", "(100, 30)"]
    a_value, b_value = float(lines[0][3]), float(lines[1][3])
    assert_within_ulps(a_value, exact_penalty(a, 0.001, 0.01), np.float32, 1)
    assert b_value == pytest.approx(exact_penalty(b, 0.001, 0.01), rel=1e-8)
    assert float(lines[2][1]) == pytest.approx(a_value + b_value, rel=1e-8)


def test_bad_files_and_factors_fail_cleanly(tmp_path: Path) -> None:
    missing = run(str(tmp_path / "missing.npy"))
    assert missing.returncode == 1 and "missing.npy" in missing.stderr
    np.save(tmp_path / "c.npy", np.ones(3, dtype=np.complex64))
    complex_file = run(str(tmp_path / "c.npy"))
    assert complex_file.returncode == 1 and "complex64" in complex_file.stderr
    negative = run("--l1", "-1")
    assert negative.returncode == 2 and "l1" in negative.stderr


def test_demo_without_files() -> None:
    out = run("--size", "200000")
    assert out.returncode == 0, out.stderr
    assert "l1l2_rs:" in out.stdout and "numpy:" in out.stdout and "speed-up" in out.stdout
    ours = float(out.stdout.split("l1l2_rs:")[1].split()[0])
    reference = float(out.stdout.split("numpy:")[1].split()[0])
    assert ours == pytest.approx(reference, rel=1e-5)


def test_console_script_is_installed() -> None:
    script = shutil.which("l1l2")
    if script is None:
        pytest.skip("console script not on PATH (package not installed with pip)")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "penalty" in out.stdout


def test_empty_truncated_and_archive_files_fail_cleanly(tmp_path: Path) -> None:
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "whole.npy", np.ones(1000))
    data = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "both.npz", a=np.ones(3))
    for name, says in [("empty.npy", "empty"), ("cut.npy", "file size"), ("both.npz", ".npz")]:
        out = run(str(tmp_path / name))
        assert out.returncode == 1, (name, out.stderr)
        assert "Traceback" not in out.stderr and says in out.stderr, out.stderr


def test_demo_sizes_are_checked() -> None:
    scientific = run("--size", "2e5")
    assert scientific.returncode == 0, scientific.stderr
    for bad in ("0", "-5", "1.5", "lots"):
        out = run("--size", bad)
        assert out.returncode == 2 and "--size" in out.stderr and "Traceback" not in out.stderr
    huge = run("--size", "1e15")  # 3.6 PiB
    assert huge.returncode == 1 and "not enough memory" in huge.stderr, huge.stderr
