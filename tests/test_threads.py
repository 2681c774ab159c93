"""Thread control: set/get_num_threads and threadpoolctl."""

from __future__ import annotations

import numpy as np
import pytest
import threadpoolctl  # the test extra installs it

import l1l2_rs


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
