"""SEAMCALLs per second through the module API vs the S-EPT core's batch API (issue 4 benchmarks).

Groups ``module.aug`` (PAGE.AUG), ``module.zap`` (RANGE.BLOCK + MEM.TRACK + PAGE.REMOVE per page)
and ``module.accept`` (guest TDG.MEM.PAGE.ACCEPT), each with ``module_api`` (``host.tdx``
typed methods: validation, try-locks, op handle, both event edges, then the core) and
``core_batch`` (``SeptTree.*_batch`` on a standalone tree: the core alone). Both run N = 512 4K
pages under one level-1 table, seeded shuffled order; every round starts from a freshly built
state (``pedantic`` setup, not timed); the result is checked after timing. ``extra_info`` gives
calls/s (for the zap, 3 calls per page on the module side; the core's batch has no TRACK call).

Group ``module.reclaim``: TDH.PHYMEM.PAGE.RECLAIM of the N private pages of a TD in TEARDOWN
(HKID released: VPFLUSHDONE, CACHE.WB per package, KEY.FREEID), ``module_api`` (baseline: one
SEAMCALL each, two events each) vs ``module_batch`` (:func:`tdxcore.module.batch.page_reclaim_batch`:
the TD checks once, one PAMT core call, one event).

Group ``module.reclaim_threads``: two TDs of one host in TEARDOWN, ``THREAD_N`` AUGed pages each
(built with the module batch AUG), reclaimed with ``page_reclaim_batch``: ``one_thread``
(baseline: both TDs in turn) vs ``two_threads`` (a worker per TD; the core loop runs without the
GIL and without the module lock). ``extra_info``: the throughput ratio (SPEC §9: >= 1.6x).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tdxcore._pamt import Pamt
from tdxcore._sept import SeptTree
from tdxcore.constants import PageType
from tdxcore.module import Host
from tdxcore.module import batch as mbatch
from tdxcore.module.td import add_sept_path, build_td

N = 512
SEED = 20261122
GPA = 0x4000_0000
ROUNDS = 5


def _order():
    return np.random.default_rng(SEED).permutation(np.arange(N, dtype=np.uint64))


# ---------------------------------------------------------------- module API
def _module_td(state):
    """Build a RUNNABLE TD with the S-EPT path to GPA's 2M region.

    ``state``: "free" (nothing mapped), "pending" (N pages AUGed) or "mapped" (and accepted).
    """
    h = Host(memory=64 << 20, seed=SEED)
    h.tdx.enable()
    b = build_td(h, vcpus=1)
    add_sept_path(h, b.tdr, GPA, 1)
    gpas = [GPA + (int(i) << 12) for i in _order()]
    pages = [h.alloc_frame() for _ in range(N)]
    t = h.tdx
    if state != "free":
        for g, p in zip(gpas, pages, strict=True):
            assert t.tdh_mem_page_aug(b.tdr, g, 0, p).status == 0
            if state == "mapped":
                assert t.tdg_mem_page_accept(b.vcpus[0], g, 0).status == 0
    return h, b, gpas, pages


def _m_aug(t, tdr, gpas, pages):
    return [t.tdh_mem_page_aug(tdr, g, 0, p).status for g, p in zip(gpas, pages, strict=True)]


def _m_zap(t, tdr, gpas):
    out = []
    for g in gpas:
        out.append(t.tdh_mem_range_block(tdr, g, 0).status)
        out.append(t.tdh_mem_track(tdr).status)
        out.append(t.tdh_mem_page_remove(tdr, g, 0).status)
    return out


def _m_accept(t, v, gpas):
    return [t.tdg_mem_page_accept(v, g, 0).status for g in gpas]


# ---------------------------------------------------------------- core batch
def _core_tree(state):
    tree = SeptTree(4, Pamt(1 << 16), tdr=0)
    base = GPA >> 12
    tree.sept_add_range(base, base + N, np.arange(1, 1 + 16, dtype=np.uint64))
    gfns = _order() + np.uint64(base)
    pages = np.arange(1 << 12, (1 << 12) + N, dtype=np.uint64)
    if state != "free":
        assert not tree.page_aug_batch(gfns, pages).any()
        if state == "mapped":
            assert not tree.page_accept_batch(gfns).any()
    return tree, gfns, pages


def _c_zap(tree, gfns):
    s = tree.range_block_batch(gfns, 1)
    return s | tree.page_remove_batch(gfns, 2, 0, True)


def _info(benchmark, impl, calls):
    st = benchmark.stats.stats
    benchmark.extra_info.update({"impl": impl, "nr_pages": N, "seamcalls": calls, "seed": SEED,
                                 "calls_per_s_min": calls / st.min, "calls_per_s_median": calls / st.median})


@pytest.mark.benchmark(group="module.aug")
@pytest.mark.parametrize("impl", ["module_api", "core_batch"])
def test_aug(benchmark, impl):
    """PAGE.AUG of N pages."""
    if impl == "module_api":
        def setup():
            h, b, gpas, pages = _module_td("free")
            return (h.tdx, b.tdr, gpas, pages), {}
        res = benchmark.pedantic(_m_aug, setup=setup, rounds=ROUNDS, iterations=1)
        assert not any(res)
    else:
        def setup():
            tree, gfns, pages = _core_tree("free")
            return (gfns, pages), {"tree": tree}
        res = benchmark.pedantic(lambda g, p, tree: tree.page_aug_batch(g, p), setup=setup, rounds=ROUNDS,
                                 iterations=1)
        assert not res.any()
    _info(benchmark, impl, N)


@pytest.mark.benchmark(group="module.zap")
@pytest.mark.parametrize("impl", ["module_api", "core_batch"])
def test_zap(benchmark, impl):
    """BLOCK + TRACK + REMOVE of N mapped pages (TRACK once per page, as KVM 6.18 does)."""
    if impl == "module_api":
        def setup():
            h, b, gpas, _ = _module_td("mapped")
            return (h.tdx, b.tdr, gpas), {}
        res = benchmark.pedantic(_m_zap, setup=setup, rounds=ROUNDS, iterations=1)
        assert not any(res)
        _info(benchmark, impl, 3 * N)
    else:
        def setup():
            tree, gfns, _ = _core_tree("mapped")
            return (tree, gfns), {}
        res = benchmark.pedantic(_c_zap, setup=setup, rounds=ROUNDS, iterations=1)
        assert not res.any()
        _info(benchmark, impl, 2 * N)


@pytest.mark.benchmark(group="module.accept")
@pytest.mark.parametrize("impl", ["module_api", "core_batch"])
def test_accept(benchmark, impl):
    """Guest ACCEPT of N pending pages."""
    if impl == "module_api":
        def setup():
            h, b, gpas, _ = _module_td("pending")
            return (h.tdx, b.vcpus[0], gpas), {}
        res = benchmark.pedantic(_m_accept, setup=setup, rounds=ROUNDS, iterations=1)
        assert not any(res)
    else:
        def setup():
            tree, gfns, _ = _core_tree("pending")
            return (gfns,), {"tree": tree}
        res = benchmark.pedantic(lambda g, tree: tree.page_accept_batch(g), setup=setup, rounds=ROUNDS,
                                 iterations=1)
        assert not res.any()
    _info(benchmark, impl, N)


# ---------------------------------------------------------------- module.reclaim
def _teardown_td():
    """Build a TD with N AUGed pages whose HKID is released (lifecycle TEARDOWN)."""
    h, b, gpas, pages = _module_td("pending")
    t = h.tdx
    assert t.tdh_mng_vpflushdone(b.tdr).status == 0
    for pkg in range(h.nr_packages):
        assert t.tdh_phymem_cache_wb(False, cpu=h.first_online_cpu(pkg)).status == 0
    assert t.tdh_mng_key_freeid(b.tdr).status == 0
    return h, b, pages


def _m_reclaim(t, pages):
    return [t.tdh_phymem_page_reclaim(p).status for p in pages]


@pytest.mark.benchmark(group="module.reclaim")
@pytest.mark.parametrize("impl", ["module_api", "module_batch"])
def test_reclaim(benchmark, impl):
    """RECLAIM of N private pages of a TD in TEARDOWN."""
    state = {}

    def setup():
        h, b, pages = _teardown_td()
        state["h"] = h
        if impl == "module_api":
            return (h.tdx, pages), {}
        return (h.tdx, b.tdr, np.array(pages, dtype=np.uint64)), {}
    if impl == "module_api":
        res = benchmark.pedantic(_m_reclaim, setup=setup, rounds=ROUNDS, iterations=1)
        assert not any(res)
    else:
        res = benchmark.pedantic(mbatch.page_reclaim_batch, setup=setup, rounds=ROUNDS, iterations=1)
        assert res.status == 0 and not res.statuses.any()
    assert state["h"].pamt.nr_assigned(PageType.PT_REG) == 0
    _info(benchmark, impl, N)


# ---------------------------------------------------------------- module.reclaim_threads
THREAD_N = 1 << 18
_THREADS = {}


def _two_tds_in_teardown():
    h = Host(memory=(2 * THREAD_N << 12) + (64 << 20), seed=SEED)
    h.tdx.enable()
    out = []
    for _ in range(2):
        b = build_td(h, vcpus=1)
        base = GPA >> 12
        tables = np.array([h.alloc_frame() for _ in range(THREAD_N // 512 + 8)], dtype=np.uint64)
        assert mbatch.sept_add_range(h.tdx, b.tdr, base, base + THREAD_N, tables).status == 0
        pages = np.array([h.alloc_frame() for _ in range(THREAD_N)], dtype=np.uint64)
        gfns = np.arange(base, base + THREAD_N, dtype=np.uint64)
        r = mbatch.page_aug_batch(h.tdx, b.tdr, gfns, pages)
        assert r.status == 0 and not r.statuses.any()
        out.append((b.tdr, pages))
    t = h.tdx
    for tdr, _ in out:
        assert t.tdh_mng_vpflushdone(tdr).status == 0
        for pkg in range(h.nr_packages):
            assert t.tdh_phymem_cache_wb(False, cpu=h.first_online_cpu(pkg)).status == 0
        assert t.tdh_mng_key_freeid(tdr).status == 0
    return h, out


def _reclaim_one(h, tds, pool):
    return [mbatch.page_reclaim_batch(h.tdx, tdr, pages) for tdr, pages in tds]


def _reclaim_two(h, tds, pool):
    futs = [pool.submit(mbatch.page_reclaim_batch, h.tdx, tdr, pages) for tdr, pages in tds]
    return [f.result() for f in futs]


@pytest.mark.benchmark(group="module.reclaim_threads")
@pytest.mark.parametrize("mode", ["one_thread", "two_threads"])
def test_reclaim_threads(benchmark, mode):
    """Batch RECLAIM of two TDs' pages: one thread (baseline) vs one thread per TD."""
    state = {}

    def setup():
        h, tds = _two_tds_in_teardown()
        state["h"] = h
        return (h, tds, pool), {}
    fn = _reclaim_one if mode == "one_thread" else _reclaim_two
    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(lambda: None).result()
        res = benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1)
    assert all(r.status == 0 and not r.statuses.any() for r in res)
    assert state["h"].pamt.nr_assigned(PageType.PT_REG) == 0
    st = benchmark.stats.stats
    _THREADS[mode] = st.median
    info = {"nr_tds": 2, "pages_per_td": THREAD_N, "seed": SEED, "cpus_online": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0], "pages_per_s_median": 2 * THREAD_N / st.median,
            "pages_per_s_min": 2 * THREAD_N / st.min, "target_ratio": 1.6}
    if mode == "two_threads" and "one_thread" in _THREADS:
        info["speedup_vs_one_thread"] = _THREADS["one_thread"] / st.median
    benchmark.extra_info.update(info)
