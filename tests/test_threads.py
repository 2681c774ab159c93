"""Thread control: set/get_num_threads and threadpoolctl."""

from __future__ import annotations

import os

import numpy as np
import pytest
import threadpoolctl  # the test extra installs it

import l1l2_rs
from conftest import run_python


@pytest.fixture(autouse=True)
def _restore_default() -> None:
    yield
    l1l2_rs.set_num_threads(0)


def test_set_and_get_num_threads() -> None:
    l1l2_rs.set_num_threads(3)
    assert l1l2_rs.get_num_threads() == 3
    l1l2_rs.set_num_threads(np.int64(1))
    assert l1l2_rs.get_num_threads() == 1


@pytest.mark.parametrize(
    "bad, error", [(-1, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)]
)
def test_bad_thread_counts(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="threads"):
        l1l2_rs.set_num_threads(bad)  # type: ignore[arg-type]


def test_threadpool_info_lists_l1l2_rs() -> None:
    l1l2_rs.set_num_threads(2)
    info = [entry for entry in threadpoolctl.threadpool_info() if entry["user_api"] == "l1l2_rs"]
    assert len(info) == 1
    assert info[0]["num_threads"] == 2
    assert info[0]["version"] == l1l2_rs.__version__


def test_threadpool_limits_limits_l1l2_rs_without_changing_bits() -> None:
    x = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)
    l1l2_rs.set_num_threads(2)
    unlimited = l1l2_rs.sums(x)
    with threadpoolctl.threadpool_limits(limits=1):
        assert l1l2_rs.get_num_threads() == 1
        entry = next(e for e in threadpoolctl.threadpool_info() if e["user_api"] == "l1l2_rs")
        assert entry["num_threads"] == 1
        assert l1l2_rs.sums(x) == unlimited
    assert l1l2_rs.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="l1l2_rs"):
        assert l1l2_rs.get_num_threads() == 1


WORKER_CPU_PROBE = """
import pathlib, time
import numpy as np
import l1l2_rs

def worker_cpu_seconds():
    # A new thread takes its name when it first runs, which on a VM can be a few ms after the
    # first call (done by the caller alone) has returned.
    deadline = time.perf_counter() + 5
    while time.perf_counter() < deadline:
        for task in pathlib.Path("/proc/self/task").iterdir():
            if (task / "comm").read_text().strip() == "l1l2-0":
                return int((task / "schedstat").read_text().split()[0]) / 1e9
        time.sleep(0.001)
    raise SystemExit("no l1l2-0 worker thread")

l1l2_rs.set_num_threads(2)
x = np.ones(4_000_000, np.float32)  # above the parallel threshold
l1l2_rs.penalty(x, 1.0, 1.0)
before, start = worker_cpu_seconds(), time.perf_counter()
for _ in range(50):
    l1l2_rs.penalty(x, 1.0, 1.0)
    time.sleep(0.002)  # idle between calls: a lingering worker stays awake through it
print(worker_cpu_seconds() - before, time.perf_counter() - start)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")
def test_workers_linger_only_as_long_as_l1l2_linger_us_says() -> None:
    def worker_share(linger_us: str) -> float:
        output = run_python(WORKER_CPU_PROBE, env={**os.environ, "L1L2_LINGER_US": linger_us})
        cpu, wall = map(float, output.split())
        return cpu / wall

    # Off: the worker runs only its share of the calls' work (~1 ms of every 3 ms or less).
    # 10 ms: it stays awake through every 2 ms pause as well.
    off, awake = worker_share("0"), worker_share("10000")
    assert off < 0.5 * awake, (off, awake)
