"""Fork safety by construction, and one thread-count rule for every entry point.

A process forked while another thread is inside a first-time initialisation (a once-cell, a
module import) inherits that state half-done, without the thread that would finish it: its first
call then waits forever. Each scenario below runs in a fresh interpreter, so that the first call
of its kind really is the first: a thread makes it while the main thread forks again and again,
and every child must then finish a call of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest

import l1l2_rs
from conftest import run_python

FORK_TRIAL = textwrap.dedent(
    """
    import os, signal, sys, threading
    import numpy as np
    import l1l2_rs

    inputs = {
        "large": lambda: np.ones(2_000_000, np.float32),  # the thread count, the pool
        "small": lambda: np.ones(10, np.float32),  # the numpy C API, its ABI version
        "list": lambda: [1.0, 2.0, 3.0],  # converted in Python, placed on a cache line
        "byteswapped": lambda: np.ones(10, ">f4"),
        "void": lambda: np.zeros(3, "V2"),  # the dtype's name, an error message
        # The regularizer's native call, and its way back into Python for what it cannot read.
        "regularizer": lambda: [1.0, 2.0, 3.0],
    }
    x = inputs[sys.argv[1]]()
    regularizer = l1l2_rs.L1L2(0.1, 0.2)

    def call():
        try:
            if sys.argv[1] == "regularizer":
                regularizer(x)
            else:
                l1l2_rs.sums(x)
        except TypeError:
            pass  # "void" is refused, which is its own first-time path

    started = threading.Event()
    first = threading.Thread(target=lambda: (started.set(), call()))
    first.start()
    started.wait()
    children = []
    while (first.is_alive() or len(children) < 5) and len(children) < 40:
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hung child dies of SIGALRM
            call()
            os._exit(0)
        children.append(pid)
    first.join()
    hung = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        hung += os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0
    print(len(children), hung)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.parametrize("kind", ["large", "small", "list", "byteswapped", "void", "regularizer"])
def test_fork_during_a_first_call_never_hangs_the_child(kind: str) -> None:
    forks = hung = 0
    for _ in range(4):
        count, stuck = map(int, run_python(FORK_TRIAL, kind).split())
        forks += count
        hung += stuck
    assert forks >= 20
    assert hung == 0, f"{hung} of {forks} forked children hung"


THREADS_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import l1l2_rs

    how = sys.argv[1]
    if how == "set_num_threads":
        l1l2_rs.set_num_threads(int(sys.argv[2]))
    elif how == "threadpool_limits":
        import threadpoolctl
        limits = threadpoolctl.threadpool_limits(int(sys.argv[2]), user_api="l1l2_rs")
    x = np.ones(4_000_000, np.float32)
    counts = []
    for _ in range(3):
        assert l1l2_rs.sums(x) == (4e6, 4e6)
        counts.append(len(os.listdir("/proc/self/task")))
    print(json.dumps({"threads": l1l2_rs.get_num_threads(), "tasks": counts,
                      "cpus": len(os.sched_getaffinity(0))}))
    """
)


def _probe(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("L1L2_NUM_THREADS", "RAYON_NUM_THREADS")
    }
    full_env.update(env or {})
    probe: dict[str, object] = json.loads(run_python(THREADS_PROBE, *args, env=full_env))
    return probe


HUGE = [str(10**6), str(2**64 - 1), str(2**64 + 5)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
@pytest.mark.parametrize(
    "args, env",
    [
        *[(("set_num_threads", n), None) for n in HUGE],
        *[(("threadpool_limits", n), None) for n in HUGE],
        *[(("default",), {"L1L2_NUM_THREADS": n}) for n in HUGE],
        (("default",), {"RAYON_NUM_THREADS": str(10**6)}),
    ],
)
def test_huge_thread_counts_are_capped_at_four_per_cpu(
    args: tuple[str, ...], env: dict[str, str] | None
) -> None:
    probe = _probe(*args, env=env)
    cpus = probe["cpus"]
    assert isinstance(cpus, int)
    cap = max(4 * cpus, 4)
    assert probe["threads"] == cap
    tasks = probe["tasks"]
    assert isinstance(tasks, list)
    # The pool is built once (cap - 1 workers beside the caller) and reused, not rebuilt per call.
    assert len(set(tasks)) == 1, tasks
    assert tasks[0] <= cap + 16, tasks  # the interpreter's and numpy's own threads aside


def test_capped_count_is_what_get_num_threads_reports() -> None:
    cap = max(4 * len(os.sched_getaffinity(0)), 4)
    try:
        l1l2_rs.set_num_threads(10**30)
        assert l1l2_rs.get_num_threads() == cap
        l1l2_rs.set_num_threads(cap - 1)
        assert l1l2_rs.get_num_threads() == cap - 1
    finally:
        l1l2_rs.set_num_threads(0)


def test_negative_limits_through_threadpoolctl_are_a_value_error() -> None:
    import threadpoolctl

    before = l1l2_rs.get_num_threads()
    with (
        pytest.raises(ValueError, match="threads"),
        threadpoolctl.threadpool_limits(-1, user_api="l1l2_rs"),
    ):
        pass  # pragma: no cover - the limit itself raises
    assert l1l2_rs.get_num_threads() == before


INTERRUPT_PROBE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import numpy as np
    import l1l2_rs

    # A shell starts background jobs with SIGINT ignored, and the child inherits that: handle it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1] == "orthogonal":
        # 8000 rows of 1000: under 8 Mi elements, but 3.2e10 multiply-adds over the pairs
        matrix = np.ones((8000, 1000))
        call = lambda: l1l2_rs.OrthogonalRegularizer(0.01)(matrix)
    else:
        xs = [np.ones(10_000_000, np.float32)] * 3000  # about 10 s of work in one call
        call = lambda: getattr(l1l2_rs, sys.argv[1])(xs)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    try:
        call()
    except KeyboardInterrupt:
        print(f"interrupted {time.perf_counter() - start:.3f}")
    else:
        print(f"finished {time.perf_counter() - start:.3f}")
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
@pytest.mark.parametrize("call", ["sums_many", "penalty_many", "orthogonal"])
def test_ctrl_c_interrupts_a_long_call(call: str) -> None:
    output = run_python(INTERRUPT_PROBE, call)
    outcome, seconds = output.split()
    assert outcome == "interrupted", output
    # The signal comes at 0.5 s; the call notices it within about 50 ms of work.
    assert float(seconds) < 1.5, output


HANDLER_PROBE = textwrap.dedent(
    """
    import os, signal, threading
    import numpy as np
    import l1l2_rs

    seen = []
    def handler(signum, frame):
        seen.append(float(l1l2_rs.penalty(np.ones(10**6), 1.0, 0.0)))  # a large call of its own
    signal.signal(signal.SIGUSR1, handler)
    threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
    # ~1.3 s of work on a 2-vCPU VM (300 arrays took 0.20-0.23 s there, as long as the 0.2 s the
    # signal used to wait), so the signal comes well inside the call; 1024 * 10**7 is exact in
    # float32.
    total = l1l2_rs.penalty_many([np.ones(10_000_000, np.float32)] * 1024, 1.0, 0.0)
    print(total, seen)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_a_signal_handler_may_call_l1l2_rs_during_a_long_call() -> None:
    assert run_python(HANDLER_PROBE).split() == ["10240000000.0", "[1000000.0]"]


POOL_FAILS = textwrap.dedent(
    """
    import json, resource, sys, warnings
    import numpy as np
    import l1l2_rs

    l1l2_rs.set_num_threads(2)  # one worker to start, whatever the CPU count
    x = np.linspace(-1.0, 1.0, 1 << 20)
    out = np.zeros_like(x)
    before = (x.copy(), out.copy())
    calls = {
        "prox_": lambda: l1l2_rs.prox_(x, 0.1, 0.5, 0.0),
        "prox_many_": lambda: l1l2_rs.prox_many_([x], 0.1, 0.5, 0.0),
        "value_and_grad": lambda: l1l2_rs.value_and_grad(x, 0.5, 0.0, out=out),
        "value_and_grad_many": lambda: l1l2_rs.value_and_grad_many([x], 0.5, 0.0, outs=[out]),
    }
    # Room for this process as it is, and not for a worker thread's stack.
    size = next(int(line.split()[1]) for line in open("/proc/self/status") if "VmSize" in line)
    resource.setrlimit(resource.RLIMIT_AS, ((size << 10) + (1 << 20), resource.RLIM_INFINITY))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter(sys.argv[2])
        try:
            calls[sys.argv[1]]()
            raised = None
        except RuntimeWarning as warning:
            raised = str(warning)
    # The comparison below allocates: room again (the hard limit was left unlimited).
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    written = not (np.array_equal(x, before[0]) and np.array_equal(out, before[1]))
    warned = [str(warning.message) for warning in warned]
    print(json.dumps({"raised": raised, "warned": warned, "written": written}))
    """
)

IN_PLACE_CALLS = ["prox_", "prox_many_", "value_and_grad", "value_and_grad_many"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("call", IN_PLACE_CALLS)
def test_a_pool_that_cannot_start_is_reported_before_anything_is_written(call: str) -> None:
    # With warnings as errors the call raises, and the caller's arrays are untouched ...
    result = json.loads(run_python(POOL_FAILS, call, "error"))
    assert result["raised"] is not None and "could not start" in result["raised"]
    assert result["written"] is False
    # ... and otherwise it warns and completes on the calling thread.
    result = json.loads(run_python(POOL_FAILS, call, "always"))
    assert result["raised"] is None and result["written"] is True
    assert len(result["warned"]) == 1 and "could not start" in result["warned"][0]
