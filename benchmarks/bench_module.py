"""SEAMCALLs per second through the module API vs the S-EPT core's batch API (issue 4 benchmarks).

Groups ``module.aug`` (PAGE.AUG), ``module.zap`` (RANGE.BLOCK + MEM.TRACK + PAGE.REMOVE per page)
and ``module.accept`` (guest TDG.MEM.PAGE.ACCEPT), each with ``module_api`` (``host.tdx``
typed methods: validation, try-locks, op handle, both event edges, then the core) and
``core_batch`` (``SeptTree.*_batch`` on a standalone tree: the core alone). Both run N = 512 4K
pages under one level-1 table, seeded shuffled order; every round starts from a freshly built
state (``pedantic`` setup, not timed); the result is checked after timing. ``extra_info`` gives
calls/s (for the zap, 3 calls per page on the module side; the core's batch has no TRACK call).
"""

from __future__ import annotations

import numpy as np
import pytest

from tdxcore._pamt import Pamt
from tdxcore._sept import SeptTree
from tdxcore.module import Host
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
