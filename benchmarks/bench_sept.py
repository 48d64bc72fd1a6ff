"""S-EPT leaf cycle through the batch API (SPEC §9: >= 3 M 4K pages/s on one core; 2 threads >= 1.6x).

Group ``sept.leaf_cycle``: AUG -> ACCEPT -> BLOCK -> TRACK (td_epoch + 1, refcount_prev 0) ->
REMOVE over N pages. The cycle leaves the tree and PAMT as they were (all leaves FREE, frames
NDA), so every round starts from the same state; the timed call is the whole cycle and the
result is checked after timing. ``cython`` runs N = 2^16, ``reference`` (the twin) N = 2^12;
``extra_info`` normalises both to pages/s.

Group ``sept.threads``: the same cycle on two TDs (two trees, each with its own PAMT, N = 2^17
pages each), ``one_thread`` (baseline: both TDs in turn on the calling thread) vs ``two_threads``
(one worker thread per TD, from a pool built outside the timed body). The batch loops run with
the GIL released (``tests/unit/test_sept_gil.py``), so the two threads overlap; ``extra_info``
has the throughput ratio (SPEC §9: >= 1.6x on 2 cores) and the 1-minute load average: on a
shared machine whose scheduler groups each session (autogroup), a loaded machine gives this
process about one core whatever its thread count, and the ratio then says nothing. So the rows
also record thread CPU time: ``cpu_share_of_wall`` (CPU seconds the process got per wall second)
and, on ``two_threads``, ``cpu_bound_ratio`` = serial CPU time / the busiest thread's CPU time —
the ratio two free cores give when the threads never wait for each other — and
``nogil_overlap``, the share of one thread's time in core calls during which the other thread
was in a core call too (~1: both loops ran at once, the GIL serialized nothing).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict

import numpy as np
import pytest

import tdxcore._pamt as core_pamt
import tdxcore._sept as core_sept
import tdxcore.reference.pamt as twin_pamt
import tdxcore.reference.sept as twin_sept

IMPLS = {"cython": (core_sept, core_pamt, 1 << 16), "reference": (twin_sept, twin_pamt, 1 << 12)}
SEED = 20240601


def _setup(impl):
    sept, pamt, n = IMPLS[impl]
    tree = sept.SeptTree(4, pamt.Pamt(1 << 20), tdr=0)
    rng = np.random.default_rng(SEED)
    gfns = rng.permutation(np.arange(n, dtype=np.uint64))        # seeded, unordered GPAs
    pages = np.arange(1 << 18, (1 << 18) + n, dtype=np.uint64)
    tree.sept_add_range(0, n, np.arange(1, 1 + 1024, dtype=np.uint64))
    return tree, gfns, pages, n


def _cycle(tree, gfns, pages, epoch):
    s = tree.page_aug_batch(gfns, pages)
    s |= tree.page_accept_batch(gfns)
    s |= tree.range_block_batch(gfns, epoch)
    # TRACK: the TD epoch advances by one with no vCPU left in the previous epoch.
    s |= tree.page_remove_batch(gfns, epoch + 1, 0, True)
    return s


@pytest.mark.benchmark(group="sept.leaf_cycle")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_leaf_cycle(benchmark, impl):
    """Time one AUG/ACCEPT/BLOCK/TRACK/REMOVE cycle over every page."""
    tree, gfns, pages, n = _setup(impl)
    h0 = tree.state_hash()
    rounds = {"cython": 20, "reference": 3}[impl]
    statuses = benchmark.pedantic(_cycle, setup=lambda: ((tree, gfns, pages, 5), {}),
                                  rounds=rounds, iterations=1)
    assert not statuses.any()
    assert tree.state_hash() == h0 and tree.pamt.nr_assigned(3) == 0
    st = benchmark.stats.stats
    benchmark.extra_info.update({
        "nr_pages": n, "levels": 4, "seed": SEED, "machine": "2 cores",
        "pages_per_s_min": n / st.min, "pages_per_s_median": n / st.median,
        "target_pages_per_s": 3_000_000,
    })


# ---------------------------------------------------------------- sept.threads
THREAD_N = 1 << 17
_THREADS: Dict[str, float] = {}


def _td_pair():
    out = []
    for k in range(2):
        tree = core_sept.SeptTree(4, core_pamt.Pamt(1 << 20), tdr=0)
        rng = np.random.default_rng(SEED + k)
        gfns = rng.permutation(np.arange(THREAD_N, dtype=np.uint64))
        pages = np.arange(1 << 18, (1 << 18) + THREAD_N, dtype=np.uint64)
        tree.sept_add_range(0, THREAD_N, np.arange(1, 1 + 1024, dtype=np.uint64))
        out.append((tree, gfns, pages))
    return out


#: CPU seconds per round: mode -> list of (total over threads, largest single thread).
_CPU: Dict[str, Any] = {"one_thread": [], "two_threads": []}


def _timed_cycle(t: Any, g: Any, p: Any) -> Any:
    """Run the cycle; return the statuses, this thread's CPU time and each core call's wall span."""
    c0 = time.thread_time()
    calls = (lambda: t.page_aug_batch(g, p), lambda: t.page_accept_batch(g),
             lambda: t.range_block_batch(g, 5), lambda: t.page_remove_batch(g, 6, 0, True))
    s = None
    spans = []
    for f in calls:
        a = time.perf_counter()
        r = f()
        spans.append((a, time.perf_counter()))
        s = r if s is None else s | r
    return s, time.thread_time() - c0, spans


def _overlap(x: Any, y: Any) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in x for b0, b1 in y)


def _one_thread(tds: Any, pool: Any) -> Any:
    out = [_timed_cycle(t, g, p) for t, g, p in tds]
    cpu = sum(o[1] for o in out)
    _CPU["one_thread"].append((cpu, cpu, 0.0))
    return [o[0] for o in out]


def _two_threads(tds: Any, pool: Any) -> Any:
    futs = [pool.submit(_timed_cycle, t, g, p) for t, g, p in tds]
    out = [f.result() for f in futs]
    busy = min(sum(b - a for a, b in o[2]) for o in out)
    _CPU["two_threads"].append((sum(o[1] for o in out), max(o[1] for o in out),
                                _overlap(out[0][2], out[1][2]) / busy))
    return [o[0] for o in out]


@pytest.mark.benchmark(group="sept.threads")
@pytest.mark.parametrize("mode", ["one_thread", "two_threads"])
def test_leaf_cycle_threads(benchmark, mode):
    """Two TDs' leaf cycles: one thread (baseline) vs one thread per TD."""
    tds = _td_pair()
    hashes = [t.state_hash() for t, _, _ in tds]
    fn = _one_thread if mode == "one_thread" else _two_threads
    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(lambda: None).result()             # workers exist before timing
        out = benchmark.pedantic(fn, setup=lambda: ((tds, pool), {}), rounds=15, iterations=1,
                                 warmup_rounds=1)
    assert not any(s.any() for s in out)
    assert [t.state_hash() for t, _, _ in tds] == hashes
    st = benchmark.stats.stats
    _THREADS[mode] = st.median
    info = {"nr_tds": 2, "pages_per_td": THREAD_N, "seed": SEED, "machine": "2 cores",
            "cpus_online": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
            "pages_per_s_median": 2 * THREAD_N / st.median, "pages_per_s_min": 2 * THREAD_N / st.min,
            "target_ratio": 1.6}
    cpu = sorted(_CPU[mode])
    info["cpu_s_median_round"] = cpu[len(cpu) // 2][0]
    info["cpu_share_of_wall"] = cpu[len(cpu) // 2][0] / st.median     # < 1 per thread: a busy machine
    if mode == "two_threads" and "one_thread" in _THREADS:
        info["speedup_vs_one_thread"] = _THREADS["one_thread"] / st.median
        # what 2 free cores would give: the serial CPU time over the busiest thread's CPU time
        one = sorted(c[0] for c in _CPU["one_thread"])
        info["cpu_bound_ratio"] = one[len(one) // 2] / sorted(c[1] for c in _CPU[mode])[len(cpu) // 2]
        # share of a thread's time inside core calls during which the other thread was inside
        # one too: ~1 means the two nogil loops really ran at once (no GIL serialization)
        info["nogil_overlap"] = sorted(c[2] for c in _CPU[mode])[len(cpu) // 2]
    benchmark.extra_info.update(info)
