"""Mutual exclusion of BusyLock under real threads (counts only: no timing, no sleeps).

Two flavours: Python threads that interleave at bytecode boundaries (a short switch interval
makes them interleave often), and the nogil ``_testing_hammer`` loop run from two threads at once,
which exercises the C atomics under true parallelism.
"""

from __future__ import annotations

import sys
import threading
from typing import Iterator

import pytest

from tdxcore import _busylock
from tdxcore._busylock import BusyLock
from tdxcore.status import TDX_SUCCESS  # type: ignore[attr-defined]

N_ACQUIRE = 5_000
N_ACQUIRE_NOGIL = 1_000_000
MAX_TRIES = 50_000_000   # a bound so a broken lock fails the test instead of hanging it


@pytest.fixture
def fast_switch() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(*targets) -> None:
    start = threading.Barrier(len(targets))
    threads = [threading.Thread(target=lambda t=t: (start.wait(), t())) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.usefixtures("fast_switch")
def test_python_threads_mutual_exclusion() -> None:
    lk = BusyLock(1)
    inside: list[str] = []          # plain list: who is in the critical section
    violations = [0]
    acquired = {"a": 0, "b": 0}
    counter = [0]                   # non-atomic read-modify-write under the lock

    tries = {"a": 0, "b": 0}

    def worker(name: str) -> None:
        # Stop after a fixed number of acquisitions (not tries): a thread whose time slices
        # keep landing while the other holds the lock still gets in once the other is done.
        while acquired[name] < N_ACQUIRE and tries[name] < MAX_TRIES:
            tries[name] += 1
            if lk.try_exclusive() != TDX_SUCCESS:
                continue
            if inside:
                violations[0] += 1
            inside.append(name)
            v = counter[0]
            for _ in range(3):
                if inside != [name]:
                    violations[0] += 1
            counter[0] = v + 1
            inside.remove(name)
            acquired[name] += 1
            lk.unlock_exclusive()

    run_threads(lambda: worker("a"), lambda: worker("b"))
    assert violations[0] == 0
    assert acquired == {"a": N_ACQUIRE, "b": N_ACQUIRE}
    assert counter[0] == acquired["a"] + acquired["b"]
    assert lk.word & ~(1 << 52) == 0          # free at the end (the priority bit may be left set)


def hammer(lk: BusyLock, results: dict, key: str, host: bool, actor: int, shared: bool = False):
    return lambda: results.__setitem__(key, _busylock._testing_hammer(
        lk, MAX_TRIES, host, shared=shared, actor=actor, n_acquire=N_ACQUIRE_NOGIL))


def test_nogil_hammer_two_hosts() -> None:
    lk = BusyLock(1)
    results: dict[str, tuple] = {}
    run_threads(hammer(lk, results, "1", True, 1), hammer(lk, results, "2", True, 2))
    for n_acq, _n_busy, n_viol in results.values():
        assert n_viol == 0
        assert n_acq == N_ACQUIRE_NOGIL          # both got in, every time they asked
    assert _busylock._testing_counter(lk) == 2 * N_ACQUIRE_NOGIL     # no lost update
    assert not lk.is_locked


def test_nogil_hammer_host_vs_guest_and_shared() -> None:
    lk = BusyLock(1)
    results: dict[str, tuple] = {}
    run_threads(hammer(lk, results, "host", True, 1), hammer(lk, results, "guest", False, 2),
                hammer(lk, results, "shared", True, 3, shared=True))
    for n_acq, _n_busy, n_viol in results.values():
        assert n_viol == 0
        assert n_acq == N_ACQUIRE_NOGIL
    assert _busylock._testing_counter(lk) == 2 * N_ACQUIRE_NOGIL
    assert not lk.is_locked and not lk.host_priority   # the host's last act was an acquire
