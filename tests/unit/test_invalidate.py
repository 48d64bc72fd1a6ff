"""Unit tests of tdxcore._invalidate (SPEC §4.7, tdx-facts §8), run on the core and its twin."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from tdxcore import _invalidate
from tdxcore._invalidate import InvalidateTracker
from tdxcore.constants import MAX_GFN, U64_MAX
from tdxcore.errors import InvariantViolation, TdxTypeError, TdxValueError
from tdxcore.reference import invalidate as ref

IMPLS = [pytest.param(InvalidateTracker, id="cython"), pytest.param(ref.InvalidateTracker, id="reference")]


@pytest.fixture(params=IMPLS)
def t(request: pytest.FixtureRequest):
    return request.param()


def state(t):
    return (t.seq, t.in_progress, t.range, t.nr_warnings, t.state_hash())


def test_fresh(t):
    assert (t.seq, t.in_progress, t.range, t.nr_warnings) == (0, 0, None, 0)
    assert not t.retry(0) and t.retry(1)
    assert not t.retry_gfn(0, 5)


def test_begin_resets_range_only_on_first(t):
    t.begin(10, 20)
    assert t.in_progress == 1 and t.range is None      # begin adds no range
    t.range_add(10, 20)
    assert t.range == (10, 20)
    t.begin(100, 200)                                  # nested: the range is NOT reset
    assert t.in_progress == 2 and t.range == (10, 20)
    t.range_add(100, 200)
    assert t.range == (10, 200)                         # hull, no gap
    t.range_add(15, 16)
    assert t.range == (10, 200)                         # inside: unchanged
    t.range_add(5, 6)
    assert t.range == (5, 200)


def test_range_after_all_end_is_stale_until_next_first_begin(t):
    t.begin(10, 20)
    t.range_add(10, 20)
    t.end(10, 20)
    assert t.in_progress == 0 and t.range == (10, 20)   # upstream keeps the fields
    assert not t.retry_gfn(1, 15)                        # not in progress: only seq matters
    t.begin(30, 40)
    assert t.range is None                               # 0 -> 1 resets
    t.range_add(30, 40)
    assert t.range == (30, 40)


def test_nested_begin_before_any_add_first_add_sets(t):
    # 6.18 tests the INVALID sentinel, not in_progress == 1.
    t.begin(1, 2)
    t.begin(3, 4)
    t.range_add(50, 60)
    assert t.range == (50, 60)


def test_end_bumps_seq_then_decrements(t):
    t.begin(0, 1)
    t.range_add(0, 1)
    t.begin(0, 1)
    t.end(0, 1)
    assert (t.seq, t.in_progress) == (1, 1)
    assert t.retry(1)                                    # still in progress
    t.end(0, 1)
    assert (t.seq, t.in_progress) == (2, 0)
    assert not t.retry(2) and t.retry(1) and t.retry(0)


def test_end_below_zero_refused_without_change(t):
    before = state(t)
    with pytest.raises(InvariantViolation, match=r"I12: end\(\) with in_progress == 0"):
        t.end(0, 1)
    assert state(t) == before


def test_range_add_outside_invalidation_refused_without_change(t):
    before = state(t)
    with pytest.raises(InvariantViolation, match=r"I12: range_add\(start=0x4, end=0x8\)") as ei:
        t.range_add(4, 8)
    assert ei.value.invariant == "I12" and ei.value.gfn == 4
    assert state(t) == before


def test_end_without_range_counts_warning_and_goes_on(t):
    t.begin(0, 1)
    t.end(0, 1)
    assert (t.seq, t.in_progress, t.nr_warnings) == (1, 0, 1)
    t.begin(0, 1)
    t.range_add(0, 1)
    t.end(0, 1)
    assert t.nr_warnings == 1


def test_retry_gfn_paths(t):
    seq = t.seq
    t.begin(0, 1)
    assert t.retry_gfn(seq, 7)                      # in progress, range INVALID: retry
    t.range_add(10, 20)
    assert t.retry_gfn(seq, 10) and t.retry_gfn(seq, 19)
    assert not t.retry_gfn(seq, 9) and not t.retry_gfn(seq, 20)   # other ranges: no retry
    t.end(0, 1)
    assert t.retry_gfn(seq, 9)                      # seq moved
    assert not t.retry_gfn(t.seq, 15)               # fresh snapshot, nothing in progress


def test_retry_gfn_unsafe_matches_locked_except_invalid_window(t):
    seq = t.seq
    t.begin(0, 1)
    # In progress with no range: the locked check retries, the lockless one (no sentinel test
    # upstream) falls through to the seq comparison.
    assert t.retry_gfn(seq, 7) and not t.retry_gfn_unsafe(seq, 7)
    t.range_add(10, 20)
    for gfn in (9, 10, 19, 20):
        assert t.retry_gfn_unsafe(seq, gfn) == t.retry_gfn(seq, gfn)
    t.end(0, 1)
    assert t.retry_gfn_unsafe(seq, 9) and not t.retry_gfn_unsafe(t.seq, 9)


def test_retry_gfn_many_matches_scalar(t):
    rng = np.random.default_rng(0)
    gfns = rng.integers(0, 64, size=200, dtype=np.uint64)
    for setup in ([], [("begin", 0, 1)], [("begin", 0, 1), ("range_add", 10, 30)],
                  [("begin", 0, 1), ("range_add", 10, 30), ("end", 0, 1)]):
        tt = type(t)()
        for op, s, e in setup:
            getattr(tt, op)(s, e)
        for seq in (0, 1):
            out = tt.retry_gfn_many(seq, gfns)
            assert out.dtype == np.bool_ and out.shape == gfns.shape
            assert out.tolist() == [tt.retry_gfn(seq, int(g)) for g in gfns]
    assert t.retry_gfn_many(0, np.array([], dtype=np.int64)).shape == (0,)
    assert t.retry_gfn_many(0, [1, 2, 3]).tolist() == [False] * 3   # list of ints is accepted


def test_seq_wraps_like_unsigned_long():
    for cls in (InvalidateTracker, ref.InvalidateTracker):
        t = cls()
        if cls is InvalidateTracker:
            _invalidate._testing_set_seq(t, U64_MAX)
        else:
            t._seq = U64_MAX
        t.begin(0, 1)
        t.range_add(0, 1)
        t.end(0, 1)
        assert t.seq == 0 and t.retry(U64_MAX) and not t.retry(0)


@pytest.mark.parametrize("method", ["begin", "range_add", "end"])
def test_range_arguments_rejected(t, method):
    t.begin(0, 1)
    t.range_add(0, 1)
    before = state(t)
    f = getattr(t, method)
    with pytest.raises(TdxValueError, match=r"end=0x5 must be greater than start=0x5") as ei:
        f(5, 5)
    assert ei.value.name == "end"
    with pytest.raises(TdxValueError, match=r"end=0x4 must be greater than start=0x5"):
        f(5, 4)
    with pytest.raises(TdxValueError, match=r"start=0x10000000000000 is out of range"):
        f(MAX_GFN, MAX_GFN + 1)
    with pytest.raises(TdxValueError, match=r"end=0x10000000000001 is out of range"):
        f(0, MAX_GFN + 1)
    with pytest.raises(TdxValueError, match=r"start=-0x1 is out of range"):
        f(-1, 3)
    with pytest.raises(TdxTypeError, match=r"start=1.5 must be an int"):
        f(1.5, 3)
    with pytest.raises(TdxTypeError, match=r"end=True must be an int, not bool"):
        f(0, True)
    assert state(t) == before
    f(MAX_GFN - 1, MAX_GFN)   # the top gfn is fine


def test_precedence_start_before_end_before_order(t):
    with pytest.raises(TdxValueError, match=r"^start="):
        t.begin(MAX_GFN, MAX_GFN + 5)
    with pytest.raises(TdxValueError, match=r"^end=0x0 must be greater"):
        t.begin(0, 0)
    # Bad arguments win over the I12 state check.
    with pytest.raises(TdxValueError):
        t.end(3, 2)
    with pytest.raises(TdxValueError):
        t.range_add(3, 2)


def test_seq_and_gfn_rejected(t):
    with pytest.raises(TdxValueError, match=r"seq=-0x1 is out of range"):
        t.retry(-1)
    with pytest.raises(TdxValueError, match=r"seq=0x10000000000000000 is out of range"):
        t.retry_gfn(1 << 64, 0)
    with pytest.raises(TdxTypeError, match=r"seq='1' must be an int"):
        t.retry_gfn_unsafe("1", 0)
    with pytest.raises(TdxValueError, match=r"gfn=0x10000000000000 is out of range"):
        t.retry_gfn(0, MAX_GFN)
    with pytest.raises(TdxValueError, match=r"gfn=-0x1"):
        t.retry_gfn_unsafe(0, -1)
    with pytest.raises(TdxTypeError, match=r"gfn=None"):
        t.retry_gfn(0, None)
    assert t.retry(np.uint64(0)) is False     # numpy integers are ints


def test_retry_gfn_many_rejects(t):
    with pytest.raises(TdxTypeError, match=r"gfns must be an integer array \(dtype=float64\)"):
        t.retry_gfn_many(0, np.array([1.0]))
    with pytest.raises(TdxTypeError, match=r"dtype=bool"):
        t.retry_gfn_many(0, np.array([True]))
    with pytest.raises(TdxTypeError, match=r"dtype=object"):
        t.retry_gfn_many(0, np.array([1, None], dtype=object))
    with pytest.raises(TdxValueError, match=r"gfns must be 1-D \(ndim=2\)"):
        t.retry_gfn_many(0, np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(TdxValueError, match=r"gfns\[2\]=-0x1 is out of range"):
        t.retry_gfn_many(0, np.array([1, 2, -1], dtype=np.int64))
    with pytest.raises(TdxValueError, match=r"gfns\[1\]=0x10000000000000 is out of range"):
        t.retry_gfn_many(0, np.array([1, MAX_GFN], dtype=np.uint64))
    with pytest.raises(TdxValueError, match=r"seq=-0x1"):
        t.retry_gfn_many(-1, np.array([1], dtype=np.uint64))


def test_state_hash_equal_between_core_and_twin_and_stable():
    a, b = InvalidateTracker(), ref.InvalidateTracker()
    # Golden value: serialization '<5Q' of (0, 0, 2**64-1, 2**64-1, 0) under blake2b-64.
    assert a.state_hash() == b.state_hash() == 0xE2DE64F74A41F752
    for t in (a, b):
        t.begin(0, 1)
        t.range_add(3, 9)
    assert a.state_hash() == b.state_hash()
    h = a.state_hash()
    a.begin(0, 1)
    assert a.state_hash() != h


def test_pickle_refused():
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(InvalidateTracker())


def test_repr():
    t = InvalidateTracker()
    assert repr(t) == "InvalidateTracker(seq=0, in_progress=0, range=INVALID)"
    t.begin(0, 1)
    t.range_add(0x10, 0x20)
    assert repr(t) == "InvalidateTracker(seq=0, in_progress=1, range=[0x10, 0x20))"


def test_mutation_hook_names():
    t = InvalidateTracker()
    with pytest.raises(TdxValueError, match="is not a mutation"):
        _invalidate._testing_mutate(t, "nope")
    _invalidate._testing_mutate(t, "no_reset_on_first_begin")
    t.begin(0, 1); t.range_add(1, 2); t.end(0, 1)   # noqa: E702
    t.begin(0, 1)
    assert t.range == (1, 2)          # the mutation keeps the stale range
    _invalidate._testing_mutate(t, None)


def test_readers_from_other_threads_without_gil():
    """retry_gfn_many runs nogil on worker threads while the owner writes (counts only)."""
    t = InvalidateTracker()
    gfns = np.arange(1024, dtype=np.uint64)
    results: list[int] = []

    def reader() -> None:
        n = 0
        for _ in range(200):
            out = t.retry_gfn_many(0, gfns)
            n += int(out.sum())
        results.append(n)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for _ in range(200):
        t.begin(0, 1)
        t.range_add(0, 1)
        t.end(0, 1)
    for th in threads:
        th.join()
    assert len(results) == 2 and t.seq == 200 and t.in_progress == 0
    assert t.retry_gfn_many(0, gfns).all()
