"""The batch API releases the GIL for its whole loop (STYLE §2.6; SPEC §5 threaded mode).

Thread A runs a long batch call over ~2^20 gfns; thread B increments a pure-Python counter
in a loop. A samples B's counter right before and right after its call: if the call held the
GIL, B could not run in between. Counts only: no sleeps, no timing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tdxcore._pamt import Pamt
from tdxcore._sept import SeptTree

N = 1 << 20


@pytest.fixture(scope="module")
def tree():
    t = SeptTree(4, Pamt(1 << 22), tdr=0)
    t.sept_add_range(0, N, np.arange(1, 1 + 4096, dtype=np.uint64))
    return t


def _observe(call):
    """Run call() on thread A while thread B counts; return B's increments during the call."""
    state = {"count": 0}
    b_running = threading.Event()
    a_done = threading.Event()

    def b():
        while not a_done.is_set():
            state["count"] += 1
            if state["count"] == 1:
                b_running.set()

    seen = {}

    def a():
        b_running.wait()
        before = state["count"]
        seen["result"] = call()
        seen["during"] = state["count"] - before
        a_done.set()

    tb = threading.Thread(target=b)
    ta = threading.Thread(target=a)
    tb.start()
    ta.start()
    ta.join()
    tb.join()
    return seen["during"], seen["result"]


def test_page_aug_batch_releases_gil(tree):
    gfns = np.arange(N, dtype=np.uint64)
    pages = np.arange(1 << 21, (1 << 21) + N, dtype=np.uint64)
    during, statuses = _observe(lambda: tree.page_aug_batch(gfns, pages))
    assert not statuses.any()
    assert during > 0


def test_range_block_batch_releases_gil(tree):
    gfns = np.arange(N, dtype=np.uint64)
    during, statuses = _observe(lambda: tree.range_block_batch(gfns, 1))
    assert statuses.shape == (N,)
    assert during > 0
