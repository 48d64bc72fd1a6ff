"""S-EPT leaf cycle through the batch API (SPEC §9: >= 3 M 4K pages/s on one core).

Group ``sept.leaf_cycle``: AUG -> ACCEPT -> BLOCK -> TRACK (td_epoch + 1, refcount_prev 0) ->
REMOVE over N pages. The cycle leaves the tree and PAMT as they were (all leaves FREE, frames
NDA), so every round starts from the same state; the timed call is the whole cycle and the
result is checked after timing. ``cython`` runs N = 2^16, ``reference`` (the twin) N = 2^12;
``extra_info`` normalises both to pages/s.
"""

from __future__ import annotations

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
