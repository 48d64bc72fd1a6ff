"""Benchmarks of the mmu_invalidate tracker (SPEC §4.7): core vs reference twin.

Groups: ``invalidate.retry_gfn`` (the fault path's locked check, per call and batched) and
``invalidate.begin_end`` (one begin + range_add + end bracket, as a memory-attribute change does).
Each timed call does ``N`` operations so the per-call figure is ``time / N``.
"""

from __future__ import annotations

import numpy as np
import pytest

from tdxcore._invalidate import InvalidateTracker
from tdxcore.reference.invalidate import InvalidateTracker as RefTracker

N = 1000
SEED = 0
IMPLS = {"cython": InvalidateTracker, "reference": RefTracker}


def _tracker(cls):
    t = cls()
    t.begin(256, 768)
    t.range_add(256, 768)      # an invalidation in progress over [256, 768)
    return t


@pytest.fixture(scope="module")
def gfns() -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 1024, size=N, dtype=np.uint64)


@pytest.mark.benchmark(group="invalidate.retry_gfn")
@pytest.mark.parametrize("impl", ["cython", "reference", "cython_many"])
def test_retry_gfn(benchmark, impl, gfns):
    t = _tracker(InvalidateTracker if impl == "cython_many" else IMPLS[impl])
    seq = t.seq
    expected = int(((gfns >= 256) & (gfns < 768)).sum())
    if impl == "cython_many":
        def run():
            return int(t.retry_gfn_many(seq, gfns).sum())
    else:
        values = [int(g) for g in gfns]
        retry_gfn = t.retry_gfn

        def run():
            n = 0
            for g in values:
                n += retry_gfn(seq, g)
            return n
    result = benchmark(run)
    assert result == expected
    benchmark.extra_info.update(n_gfns=N, seed=SEED, range="[256, 768)", in_progress=1)


@pytest.mark.benchmark(group="invalidate.begin_end")
@pytest.mark.parametrize("impl", ["cython", "reference"])
def test_begin_end(benchmark, impl):
    t = IMPLS[impl]()
    ranges = [(i * 512, i * 512 + 512) for i in range(N)]   # alternate ranges, 2 MiB each

    def run():
        for s, e in ranges:
            t.begin(s, e)
            t.range_add(s, e)
            t.end(s, e)

    benchmark(run)
    assert t.in_progress == 0 and t.seq > 0 and t.seq % N == 0 and t.nr_warnings == 0
    benchmark.extra_info.update(n_brackets=N)
