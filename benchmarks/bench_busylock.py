"""Benchmarks of the busy try-lock (SPEC §4.4): one try + unlock pair, core vs reference twin.

Group ``busylock.try_unlock``: ``N`` exclusive try/unlock pairs per timed call, from Python
(``cython``, ``reference``) and from the core's nogil loop (``cython_nogil``: the same pair through
the cdef API, plus the owner checks of ``_testing_hammer``).
"""

from __future__ import annotations

import pytest

from tdxcore import _busylock
from tdxcore._busylock import BusyLock
from tdxcore.reference.busylock import BusyLock as RefBusyLock
from tdxcore.status import OPERAND_ID_SEPT_TREE, TDX_SUCCESS  # type: ignore[attr-defined]

N = 1000


@pytest.mark.benchmark(group="busylock.try_unlock")
@pytest.mark.parametrize("impl", ["cython", "reference", "cython_nogil"])
def test_try_unlock(benchmark, impl):
    cls = RefBusyLock if impl == "reference" else BusyLock
    lk = cls(OPERAND_ID_SEPT_TREE)
    if impl == "cython_nogil":
        def run():
            return _busylock._testing_hammer(lk, N, True)[0]
    else:
        try_exclusive, unlock = lk.try_exclusive, lk.unlock_exclusive

        def run():
            n = 0
            for _ in range(N):
                if try_exclusive(True) == TDX_SUCCESS:
                    n += 1
                    unlock()
            return n
    assert benchmark(run) == N
    assert lk.word == 0
    benchmark.extra_info.update(n_pairs=N, mode="exclusive", host=True)
