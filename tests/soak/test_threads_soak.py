"""Threads soak (issue 10 part 4, ``long``): real OS threads for minutes, invariants intact, no hang.

Two halves, each given half of ``TDXCORE_SOAK_SECONDS`` (default 600 s, so ≥ 10 minutes in all):

* **Threaded storm** — :func:`tdxcore.storm.run_storm` with ``threads=True`` (SPEC §5 threaded
  mode: one OS thread per actor, waits on a real condition variable), seed after seed until the
  time is up, alternating the attribute store backend and the 5 % allowlisted BUSY injection.
  Each storm must end with no invariant violation at quiescence and, unless the VM was bugged,
  no leak after teardown (the threaded storm's own contract, ``tests/storm/test_storm.py``).
* **Core batch operations from 2 threads** — one ``SeptTree`` over one ``Pamt`` and one
  ``AttributeStore``, shared by two worker threads. Each worker owns its own gfn window (the
  cores' leaf operations are serialized per entry by the module's locks, which this test does not
  model, so the windows are disjoint; the non-leaf tables, the PAMT's atomics and its chunk
  publication are shared) and loops the private-page life cycle with the GIL-releasing batch
  calls: ``page_aug_batch`` → ``page_accept_batch`` → ``range_block_batch`` →
  ``page_remove_batch``; then tears down a TD of its own on the same PAMT (a fresh ``SeptTree``
  whose tables and pages ``Pamt.reclaim_batch`` gives back, as a TD teardown does, both threads
  reclaiming at once), with ``Pamt.types`` scans and ``AttributeStore.get_many`` reads
  (readers, run concurrently) between ``set_range`` writes (a writer, serialized by a
  readers-writer lock as KVM's ``slots_lock`` does). Every status must be SUCCESS and every read
  must see the values its own thread wrote. After each round both threads meet at a barrier and
  the main thread checks the shared state at quiescence: no frame left assigned, the tree's hash
  back to its post-setup value, the attribute runs exactly as written.

Watchdog: each half runs in a worker thread joined with a timeout (duration + margin); if it does
not come back the test fails with every thread's stack instead of hanging, and
``faulthandler.dump_traceback_later`` (a C-level timer that needs no GIL) dumps the stacks and
exits the process if even that join cannot return. The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import faulthandler
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

from tdxcore._pamt import Pamt
from tdxcore._sept import SeptTree
from tdxcore._xarray import AttributeStore
from tdxcore.constants import PageType
from tdxcore.storm import StormConfig, run_storm

pytestmark = pytest.mark.long

#: Total soak seconds (both halves); each half gets half of it.
SOAK_SECONDS = float(os.environ.get("TDXCORE_SOAK_SECONDS", "600"))
#: Extra seconds the watchdog allows beyond a half's duration (one storm / one round to finish).
WATCHDOG_MARGIN = float(os.environ.get("TDXCORE_SOAK_MARGIN", "180"))
#: Steps per threaded storm.
STORM_STEPS = 5000
#: Pages per worker window in the batch half (one 2 MiB table's worth).
WINDOW = 512
_PRIVATE = 1 << 3


def _with_watchdog(name: str, seconds: float, body: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Run ``body(figures)`` on a worker thread; fail (never hang) if it outlives ``seconds + margin``."""
    figures: Dict[str, Any] = {}
    errors: List[BaseException] = []

    def run() -> None:
        try:
            body(figures)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    limit = seconds + WATCHDOG_MARGIN
    # Last resort: a hang holding the GIL would stop join() from returning too.
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    worker = threading.Thread(target=run, name=f"soak-{name}", daemon=True)
    try:
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            pytest.fail(f"{name}: still running {limit:.0f} s after start (deadlock or livelock); "
                        f"stacks dumped to stderr; figures so far {figures}")
    finally:
        faulthandler.cancel_dump_traceback_later()
    if errors:
        raise errors[0]
    print(f"\n[soak] {name}: {figures}")
    return figures


def test_threaded_storm_soak():
    """Threaded storms back to back for half the soak: no violation, no hang, no leak unless bugged."""
    seconds = SOAK_SECONDS / 2

    def body(fig: Dict[str, Any]) -> None:
        fig.update(storms=0, steps=0, drain_steps=0, bugged=0, injected=0, seconds=0.0, bug_reasons={})
        t0 = time.monotonic()
        seed = 0
        while time.monotonic() - t0 < seconds:
            cfg = StormConfig(steps=STORM_STEPS, seed=seed, threads=True,
                              store="xarray" if seed % 2 else "ranges",
                              busy=0.05 if seed % 3 else 0.0)
            rep = run_storm(cfg)
            assert rep.violation is None, (seed, rep.violation)
            assert not rep.replayable and rep.invariants_checked >= 2
            if rep.vm_bugged:
                fig["bugged"] += 1
                # the first death names the KVM_BUG (digits dropped so equal causes group)
                why = re.sub(r"\d+", "N", rep.vm_dead[0] if rep.vm_dead else "?")
                fig["bug_reasons"][why] = fig["bug_reasons"].get(why, 0) + 1
            else:
                assert rep.leaks == [], (seed, rep.leaks)
            fig["storms"] += 1
            fig["steps"] += rep.steps
            fig["drain_steps"] += rep.drain_steps
            fig["injected"] += int(rep.counters.get("nr_injected", 0))
            seed += 1
            fig["seconds"] = round(time.monotonic() - t0, 1)

    fig = _with_watchdog("threaded storm", seconds, body)
    assert fig["storms"] >= 1
    # The one KVM_BUG a LINUX_6_18 threaded storm is known to hit is the model's livelock bound
    # VP_ENTER_MAX_BUSY: it counts BUSY entries, and OS threads do not guarantee that the lock
    # holder runs within 1000 of them (a seeded schedule does). Any other reason is a finding.
    assert all("TDH.VP.ENTER stayed BUSY" in why for why in fig["bug_reasons"]), fig["bug_reasons"]


class _RwLock:
    """Readers-writer lock (KVM's ``slots_lock`` role for the attribute store: one writer, many readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def read(self) -> "_Held":
        return _Held(self, False)

    def write(self) -> "_Held":
        return _Held(self, True)


class _Held:
    def __init__(self, lock: _RwLock, write: bool) -> None:
        self.lock, self.write = lock, write

    def __enter__(self) -> None:
        c = self.lock._cond
        with c:
            if self.write:
                while self.lock._writer or self.lock._readers:
                    c.wait()
                self.lock._writer = True
            else:
                while self.lock._writer:
                    c.wait()
                self.lock._readers += 1

    def __exit__(self, *exc: object) -> None:
        c = self.lock._cond
        with c:
            if self.write:
                self.lock._writer = False
            else:
                self.lock._readers -= 1
            c.notify_all()


def test_core_batch_ops_two_threads_soak():
    """The cores' batch operations from 2 threads for half the soak; shared state checked per round."""
    seconds = SOAK_SECONDS / 2
    nthreads = 2
    pamt = Pamt(1 << 20)
    tree = SeptTree(4, pamt, tdr=7)
    # windows 1 GiB apart: each worker's own 2 MiB table, the upper tables shared
    bases = [k * (1 << 18) for k in range(nthreads)]
    for b in bases:
        tree.sept_add_range(b, b + WINDOW, np.arange(64 + b // (1 << 12), 72 + b // (1 << 12),
                                                     dtype=np.uint64))
    hash0 = tree.state_hash()
    reg0 = pamt.nr_assigned(int(PageType.PT_REG))
    store = AttributeStore("xarray")
    rw = _RwLock()
    # each worker's data frames: a disjoint 4K-aligned pool far from the tables
    pools = [np.arange(1 << 16 | k << 12, (1 << 16 | k << 12) + WINDOW, dtype=np.uint64)
             for k in range(nthreads)]
    # each worker's own TD (torn down every round): its TDR, table frames and page frames
    own_tdr = [16 + k for k in range(nthreads)]
    own_tables = [np.arange(256 + 16 * k, 256 + 16 * k + 8, dtype=np.uint64) for k in range(nthreads)]
    own_pages = [np.arange(1 << 17 | k << 12, (1 << 17 | k << 12) + WINDOW, dtype=np.uint64)
                 for k in range(nthreads)]
    reclaim_batch = getattr(pamt, "reclaim_batch", None)     # newer cores only

    def body(fig: Dict[str, Any]) -> None:
        fig.update(rounds=0, batch_calls=0, pages=0, attr_sets=0, attr_reads=0, seconds=0.0)
        t0 = time.monotonic()
        stop = threading.Event()
        barrier = threading.Barrier(nthreads + 1, timeout=WATCHDOG_MARGIN)
        errors: List[BaseException] = []
        calls = [0] * nthreads
        pages_done = [0] * nthreads

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            base, pool = bases[k], pools[k]
            try:
                epoch = 1
                while True:
                    barrier.wait()              # round start (the main thread decides stop)
                    if stop.is_set():
                        return
                    n = int(rng.integers(1, WINDOW + 1))
                    gfns = np.sort(rng.choice(WINDOW, size=n, replace=False)).astype(np.uint64) + base
                    pages = pool[gfns - base]
                    for st in (tree.page_aug_batch(gfns, pages), tree.page_accept_batch(gfns),
                               tree.range_block_batch(gfns, epoch),
                               tree.page_remove_batch(gfns, epoch + 1)):
                        assert not st.any(), (k, [hex(int(s)) for s in st[st != 0][:4]])
                    epoch += 2
                    types = pamt.types(int(pool[0]), int(pool[-1]) + 1)
                    assert not types.any(), (k, "a frame is still assigned after REMOVE")
                    lo = base + int(rng.integers(0, WINDOW))
                    hi = min(base + WINDOW, lo + int(rng.integers(1, 64)))
                    value = _PRIVATE | (k + 1) << 8
                    with rw.write():
                        store.set_range(base, base + WINDOW, 0)
                        store.set_range(lo, hi, value)
                    with rw.read():
                        got = store.get_many(np.arange(base, base + WINDOW, dtype=np.uint64))
                    want = np.zeros(WINDOW, dtype=np.uint64)
                    want[lo - base:hi - base] = value
                    assert np.array_equal(got, want), (k, lo, hi)
                    calls[k] += 6
                    pages_done[k] += n
                    if reclaim_batch is not None:
                        own = SeptTree(4, pamt, tdr=own_tdr[k])
                        used = own.sept_add_range(0, WINDOW, own_tables[k])
                        g = np.arange(WINDOW, dtype=np.uint64)
                        assert not own.page_aug_batch(g, own_pages[k]).any()
                        assert not reclaim_batch(own_pages[k], own_tdr[k]).any()
                        assert not reclaim_batch(own_tables[k][:used], own_tdr[k]).any()
                        assert pamt.child_count(own_tdr[k]) == 0
                        del own
                        calls[k] += 5
                        pages_done[k] += WINDOW
                    barrier.wait()              # round end: quiescence for the main thread's check
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(k,), name=f"batch{k}") for k in range(nthreads)]
        for t in threads:
            t.start()
        try:
            while True:
                if time.monotonic() - t0 >= seconds:
                    stop.set()
                barrier.wait()
                if stop.is_set():
                    break                       # the workers saw it too and return
                barrier.wait()
                # quiescence: both workers are parked at the next round's start
                assert tree.state_hash() == hash0
                assert pamt.nr_assigned(int(PageType.PT_REG)) == reg0
                runs = list(store.runs())
                assert len(runs) <= nthreads and all(v & _PRIVATE for _, _, v in runs), runs
                fig["rounds"] += 1
        except threading.BrokenBarrierError:
            pass                                # a worker failed: its error is in ``errors``
        except BaseException:
            stop.set()
            barrier.abort()                     # release the workers, then report our failure
            raise
        finally:
            for t in threads:
                t.join(WATCHDOG_MARGIN)
        if errors:
            raise errors[0]
        assert not any(t.is_alive() for t in threads), "a batch worker did not stop"
        fig["batch_calls"] = sum(calls)
        fig["pages"] = sum(pages_done)
        fig["attr_sets"] = 2 * fig["rounds"] * nthreads
        fig["attr_reads"] = fig["rounds"] * nthreads
        fig["seconds"] = round(time.monotonic() - t0, 1)
        fig["reclaim_batch"] = reclaim_batch is not None

    fig = _with_watchdog("core batch ops x2 threads", seconds, body)
    assert fig["rounds"] >= 1
