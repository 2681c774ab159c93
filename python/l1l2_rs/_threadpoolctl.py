"""threadpoolctl integration: ``threadpool_info()`` lists l1l2_rs next to BLAS and OpenMP, and
``threadpool_limits(n)`` limits it like them.

threadpoolctl (>= 3.2) finds our extension module among the loaded shared libraries by its file
name (``_l1l2_rs*.so``/``.pyd``) and asks this controller for, or to set, the thread count.
"""

from __future__ import annotations

import threadpoolctl

from . import _l1l2_rs


class L1L2Controller(threadpoolctl.LibController):  # type: ignore[misc]
    user_api = "l1l2_rs"
    internal_api = "l1l2_rs"
    filename_prefixes = ("_l1l2_rs",)

    def get_num_threads(self) -> int:
        return _l1l2_rs.get_num_threads()

    def set_num_threads(self, num_threads: int) -> None:
        from . import set_num_threads  # validates (ValueError for negative counts) and caps

        set_num_threads(num_threads)

    def get_version(self) -> str:
        from . import __version__

        return __version__


def register() -> None:
    """Make threadpoolctl aware of l1l2_rs (idempotent)."""
    if L1L2Controller not in getattr(threadpoolctl, "_ALL_CONTROLLERS", ()):
        threadpoolctl.register(L1L2Controller)
