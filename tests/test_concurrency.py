"""Determinism across thread counts, fork safety, concurrent callers, GIL release, no copies."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import l1l2_rs

# Enough elements for many chunks and the parallel path, in several layouts.
SCRIPT = textwrap.dedent(
    """
    import json, numpy as np, l1l2_rs
    rng = np.random.default_rng(7)
    x32 = rng.standard_normal(3_000_001).astype(np.float32)
    x64 = rng.standard_normal((1500, 1001)) * 10.0 ** rng.integers(-8, 8, (1500, 1001))
    results = []
    for x in (x32, x64, x64.T, x64[::-1, ::3], x32.astype(np.float16)):
        a, s = l1l2_rs.sums(x)
        results.append([a.hex(), s.hex(), float(l1l2_rs.L1L2(1e-3, 1e-4)(x)).hex()])
    print(json.dumps({"threads": l1l2_rs.get_num_threads(), "results": results,
                      "isa": l1l2_rs.simd_isa()}))
    """
)


def run_with_env(**env: str) -> dict[str, object]:
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("L1L2_NUM_THREADS", "RAYON_NUM_THREADS")
    }
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_bit_identical_for_1_2_3_8_threads() -> None:
    runs = {n: run_with_env(L1L2_NUM_THREADS=str(n)) for n in (1, 2, 3, 8)}
    for n, run in runs.items():
        assert run["threads"] == n
    first = runs[1]["results"]
    for n, run in runs.items():
        assert run["results"] == first, f"{n} threads differ from 1 thread"


def test_bit_identical_across_instruction_sets() -> None:
    """Every kernel adds the same numbers in the same order as the one the CPU picks."""
    detected = run_with_env(L1L2_NUM_THREADS="2")
    for cap in ("avx2", "baseline"):
        forced = run_with_env(L1L2_NUM_THREADS="2", L1L2_MAX_ISA=cap)
        assert forced["results"] == detected["results"], cap
    forced = run_with_env(L1L2_NUM_THREADS="2", L1L2_FORCE_BASELINE="1")
    assert forced["results"] == detected["results"]
    assert forced["isa"] == "baseline"
    for off in ("0", ""):
        assert run_with_env(L1L2_FORCE_BASELINE=off)["isa"] == detected["isa"]


def test_thread_count_environment_precedence() -> None:
    assert run_with_env(RAYON_NUM_THREADS="3")["threads"] == 3
    assert run_with_env(L1L2_NUM_THREADS="2", RAYON_NUM_THREADS="5")["threads"] == 2
    # Unparsable values are ignored (the next source applies), never a crash.
    assert run_with_env(L1L2_NUM_THREADS="lots", RAYON_NUM_THREADS="3")["threads"] == 3


def test_same_bits_on_every_call_and_after_set_num_threads() -> None:
    x = np.random.default_rng(1).standard_normal(2_000_003)
    reference = l1l2_rs.sums(x)
    try:
        for n in (1, 2, 3, 8, 0):
            l1l2_rs.set_num_threads(n)
            assert l1l2_rs.sums(x) == reference
    finally:
        l1l2_rs.set_num_threads(0)


@pytest.mark.parametrize("size", [40_000, 100_000, 200_003, 300_000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mid_sized_tensors_same_bits_awake_asleep_and_serial(size: int, dtype: type) -> None:
    """Tensors cut into many smaller chunks run serially or in parallel depending on whether the
    workers are awake (calls in a row) or asleep (after a pause); the bits never change."""
    x = (np.random.default_rng(size).standard_normal(size) * 3).astype(dtype)

    def results() -> list[bytes]:
        value, grad = l1l2_rs.value_and_grad(x, 1e-3, 1e-4)
        stepped = x.copy()
        l1l2_rs.prox_(stepped, 0.1, 1e-3, 1e-4)
        sums = np.array(l1l2_rs.sums(x))
        return [sums.tobytes(), np.asarray(value).tobytes(), grad.tobytes(), stepped.tobytes()]

    try:
        l1l2_rs.set_num_threads(1)
        reference = results()
        for threads in (2, 3):
            l1l2_rs.set_num_threads(threads)
            for _ in range(4):  # in a row: the workers wake up and linger
                assert results() == reference, f"{threads} threads, calls in a row"
            time.sleep(0.01)  # past the linger: the workers sleep again
            assert results() == reference, f"{threads} threads, after a pause"
    finally:
        l1l2_rs.set_num_threads(0)


def _child_sums(x: np.ndarray, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(l1l2_rs.sums(x))


def test_forked_child_computes_promptly_after_parent_used_the_pool() -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = np.random.default_rng(2).standard_normal(4_000_000).astype(np.float32)
    l1l2_rs.set_num_threads(2)
    try:
        expected = l1l2_rs.sums(x)  # builds and uses the pool in the parent
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child_sums, args=(x, queue))
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert got == expected
    finally:
        l1l2_rs.set_num_threads(0)


def test_forked_child_with_os_fork() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork")
    x = np.random.default_rng(3).standard_normal(1_000_000)
    expected = l1l2_rs.sums(x)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute twice (pool rebuilt once), report, exit without cleanup
        try:
            ok = l1l2_rs.sums(x) == expected and l1l2_rs.sums(x) == expected
            os.write(write_end, b"ok" if ok else b"mismatch")
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("forked child hung")
    assert os.read(read_end, 16) == b"ok"
    os.close(read_end)


def test_eight_threads_at_once_agree() -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(500_000 + i).astype(np.float32) for i in range(8)]
    expected = [l1l2_rs.sums(a) for a in arrays]
    barrier = threading.Barrier(8)

    def work(i: int) -> list[tuple[float, float]]:
        barrier.wait()
        return [l1l2_rs.sums(arrays[i]) for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for i, result in enumerate(results):
        assert result == [expected[i]] * 5


def test_gil_is_released_during_large_calls() -> None:
    """A Python thread runs at full speed while the main thread is inside large calls."""
    x = np.random.default_rng(5).standard_normal(30_000_000).astype(np.float32)
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    def rate_while(action: Callable[[], None]) -> float:
        start_ticks, start = ticks, time.perf_counter()
        action()
        return (ticks - start_ticks) / (time.perf_counter() - start)

    l1l2_rs.set_num_threads(1)
    counter = threading.Thread(target=count)
    counter.start()
    try:
        idle = rate_while(lambda: time.sleep(0.3))  # sleep releases the GIL
        busy = rate_while(lambda: [l1l2_rs.sums(x) for _ in range(10)] and None)
    finally:
        stop.set()
        counter.join()
        l1l2_rs.set_num_threads(0)
    # Held, the GIL would let the counter run only between calls (~switch interval / call time,
    # a few percent); released, it counts at nearly its idle rate (it has a core to itself or
    # shares one with the kernel thread).
    assert busy > 0.4 * idle, f"counter ran at {busy / idle:.0%} of its idle rate"


RSS_SCRIPT = textwrap.dedent(
    """
    import resource, numpy as np, l1l2_rs
    x = np.ones(100_000_000, dtype=np.float32)  # 400 MB
    x[::7] = -2.0
    views = [x, x[::2], x[::-1], x.reshape(10_000, 10_000).T, x.reshape(1000, 100_000)[:, ::3]]
    l1l2_rs.sums(x[:1000])  # load everything lazy first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for v in views:
        l1l2_rs.sums(v)
        l1l2_rs.L1L2(0.1, 0.1)(v)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_no_copy_of_a_400_mb_array_for_any_layout() -> None:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip())
    assert growth < 20 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"


LAZY_POOL_SCRIPT = textwrap.dedent(
    """
    import os, numpy as np, l1l2_rs
    def threads():
        return len(os.listdir("/proc/self/task"))
    at_import = threads()
    l1l2_rs.sums(np.ones(1000, dtype=np.float32))
    after_small = threads()
    l1l2_rs.sums(np.ones(5_000_000, dtype=np.float32))
    print(at_import, after_small, threads())
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_pool_is_built_lazily_and_small_inputs_never_touch_it() -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("L1L2_NUM_THREADS", "RAYON_NUM_THREADS")
    }
    env.update(L1L2_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", LAZY_POOL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    at_import, after_small, after_large = map(int, out.stdout.split())
    assert after_small == at_import
    assert after_large == at_import + 1  # the pool's one worker; the caller is the other thread
