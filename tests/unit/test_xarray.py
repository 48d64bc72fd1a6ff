"""Unit tests of tdxcore._xarray.AttributeStore (both backends) and its twin's interface."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from tdxcore._xarray import (
    AttributeStore, _testing_fail_alloc, _testing_mutate, _testing_nr_items,
)
from tdxcore.constants import MAX_GFN, MemAttr
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.reference.xarray import AttributeStore as TwinStore

P = int(MemAttr.PRIVATE)
W = 1 << 16
BACKENDS = ["ranges", "xarray"]
XA_NODE_BYTES = 576


@pytest.fixture(params=BACKENDS)
def store(request):
    return AttributeStore(request.param)


def fragmented(backend, nr=100, base=0, step=2, value=P):
    s = AttributeStore(backend)
    for i in range(nr):
        s.set_range(base + i * step, base + i * step + 1, value)
    return s


# ------------------------------------------------------------------------------ basics
def test_default_backend_and_repr():
    s = AttributeStore()
    assert s.backend == "ranges" and s.nbytes == 0
    assert "ranges" in repr(s)
    assert AttributeStore("xarray").backend == "xarray"


def test_bad_backend():
    with pytest.raises(TdxValueError, match=r"backend='maple'"):
        AttributeStore("maple")
    with pytest.raises(TdxTypeError, match=r"backend=3"):
        AttributeStore(3)


def test_get_set_erase(store):
    assert store.get(5) == 0 and store[5] == 0
    store.set_range(10, 20, P)
    assert [store[g] for g in (9, 10, 19, 20)] == [0, P, P, 0]
    store.set_range(12, 14, 0)
    assert list(store.runs()) == [(10, 12, P), (14, 20, P)]
    store.set_range(12, 14, P)
    assert list(store.runs()) == [(10, 20, P)]
    store.set_range(0, 100, 0)
    assert list(store.runs()) == []


def test_full_u64_values_and_edges(store):
    top = (1 << 64) - 1
    store.set_range(MAX_GFN - 3, MAX_GFN, top)
    assert store.get(MAX_GFN - 1) == top
    store.set_range(0, 1, 1 << 63)
    assert list(store.runs()) == [(0, 1, 1 << 63), (MAX_GFN - 3, MAX_GFN, top)]
    store.set_range(5, 5, P)                     # empty range: no change
    assert len(list(store.runs())) == 2


def test_runs_coalesce_across_containers(store):
    # Fill a fragmented window completely: the container turns back into one run.
    for g in range(W - 100, W + 100, 2):
        store.set_range(g, g + 1, P)
    for g in range(W - 99, W + 100, 2):
        store.set_range(g, g + 1, P)
    assert list(store.runs()) == [(W - 100, W + 100, P)]


def test_container_fold_and_uniform(store):
    s = fragmented(store.backend, nr=200)
    if s.backend == "ranges":
        assert _testing_nr_items(s)[1] == 1         # one bitmap container
    s.set_range(0, W, P)
    assert list(s.runs()) == [(0, W, P)]
    if s.backend == "ranges":
        assert _testing_nr_items(s)[:2] == (1, 0)
    s.set_range(0, W, 0)
    assert list(s.runs()) == []


def test_third_value_unfolds(store):
    s = fragmented(store.backend, nr=100)
    s.set_range(51, 54, 5)
    twin = TwinStore()
    for i in range(100):
        twin.set_range(2 * i, 2 * i + 1, P)
    twin.set_range(51, 54, 5)
    assert list(s.runs()) == list(twin.runs())
    assert s.state_hash() == twin.state_hash()


def test_backends_and_twin_agree_on_hash():
    stores = [AttributeStore("ranges"), AttributeStore("xarray"), TwinStore()]
    for s in stores:
        s.set_range(3, 70000, P)
        s.set_range(100, 101, 0)
        s.set_range(W, W + 5, 9)
    assert len({s.state_hash() for s in stores}) == 1
    assert stores[0].runs_array().tolist() == stores[2].runs_array().tolist()
    assert AttributeStore().state_hash() == TwinStore().state_hash()


def test_get_many(store):
    store.set_range(10, 20, P)
    got = store.get_many([9, 10, 19, 20])
    assert got.dtype == np.uint64 and got.tolist() == [0, P, P, 0]
    assert store.get_many(np.array([15], dtype=np.int32)).tolist() == [P]
    assert store.get_many(np.array([], dtype=np.uint64)).tolist() == []


def test_clear_frees_everything(store):
    s = fragmented(store.backend, nr=100)
    s.set_range(1 << 40, (1 << 40) + 1000, P)
    assert s.nbytes > 0
    s.clear()
    assert s.nbytes == 0 and list(s.runs()) == []


def test_pickling_refused(store):
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(store)
    with pytest.raises(TypeError):
        copy.copy(store)


# ------------------------------------------------------------------------------ has_range
def test_has_range_fast_paths(store):
    store.set_range(10, 20, P)
    assert store.has_range(10, 20, 0, P) is False          # attrs & ~mask
    assert store.has_range(5, 5, P, P) is True             # empty range
    assert store.has_range(10, 11, P, P) is True           # single gfn
    assert store.has_range(9, 10, P, P) is False
    assert store.has_range(10, 20, P, P) is True
    assert store.has_range(9, 20, P, P) is False           # gap at the front
    assert store.has_range(10, 21, P, P) is False          # gap at the back
    assert store.has_range(20, 30, P, 0) is True           # attrs 0: no entries
    assert store.has_range(15, 30, P, 0) is False
    assert store.has_range(10, 20, 1, 0) is True           # bits outside mask are ignored


def test_has_range_in_containers(store):
    s = fragmented(store.backend, nr=100)
    assert s.has_range(0, 199, P, P) is False
    assert s.has_range(0, 1, P, P) is True
    assert s.has_range(1, 2, P, 0) is True
    assert s.has_range(1000, 2000, P, 0) is True
    assert s.has_range(0, 2000, 0, 0) is True
    s.set_range(20, 60, P)
    assert s.has_range(20, 60, P, P) is True
    assert s.has_range(19, 60, P, P) is False


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [1.0, "3", None, True])
def test_gfn_type(store, bad):
    with pytest.raises(TdxTypeError, match="gfn="):
        store.get(bad)
    with pytest.raises(TdxTypeError, match="gfn="):
        store[bad]


@pytest.mark.parametrize("bad", [-1, MAX_GFN, 1 << 80])
def test_gfn_range(store, bad):
    with pytest.raises(TdxValueError, match="gfn="):
        store.get(bad)


def test_numpy_int_accepted(store):
    store.set_range(np.uint64(3), np.int64(5), np.uint8(P))
    assert store[np.int32(4)] == P


def test_set_range_bad_input(store):
    with pytest.raises(TdxTypeError, match="start="):
        store.set_range(1.5, 3, P)
    with pytest.raises(TdxTypeError, match="end="):
        store.set_range(1, "3", P)
    with pytest.raises(TdxTypeError, match="attrs="):
        store.set_range(1, 3, None)
    with pytest.raises(TdxValueError, match="start=-0x1"):
        store.set_range(-1, 3, P)
    with pytest.raises(TdxValueError, match="end="):
        store.set_range(1, MAX_GFN + 1, P)
    with pytest.raises(TdxValueError, match="attrs="):
        store.set_range(1, 3, 1 << 64)
    with pytest.raises(TdxValueError, match="attrs="):
        store.set_range(1, 3, -1)
    with pytest.raises(TdxValueError, match=r"start=0x5 is greater than end=0x3"):
        store.set_range(5, 3, P)
    assert list(store.runs()) == []
    store.set_range(MAX_GFN, MAX_GFN, P)            # empty range at the very end is fine


def test_bad_input_precedence(store):
    # Argument order first (start, end, attrs), then the start <= end rule.
    with pytest.raises(TdxTypeError, match="start="):
        store.set_range("x", -1, 1 << 70)
    with pytest.raises(TdxValueError, match="end="):
        store.set_range(5, -1, 1 << 70)
    with pytest.raises(TdxValueError, match="attrs="):
        store.set_range(5, 3, 1 << 70)
    with pytest.raises(TdxValueError, match="mask="):
        store.has_range(5, 3, -1, 0)
    with pytest.raises(TdxValueError, match="start=0x5 is greater"):
        store.has_range(5, 3, 0, 1)


def test_has_range_and_reserve_bad_input(store):
    with pytest.raises(TdxTypeError, match="mask="):
        store.has_range(0, 3, 1.0, 0)
    with pytest.raises(TdxValueError, match="attrs="):
        store.has_range(0, 3, 0, 1 << 64)
    with pytest.raises(TdxValueError, match="end="):
        store.reserve(0, MAX_GFN + 1)
    with pytest.raises(TdxValueError, match="greater"):
        store.reserve(4, 3)


@pytest.mark.parametrize(("bad", "exc", "match"), [
    (np.array([1.0]), TdxTypeError, "integer"),
    (np.array([True]), TdxTypeError, "integer"),
    (np.array(["a"]), TdxTypeError, "integer"),
    (np.zeros((2, 2), dtype=np.uint64), TdxValueError, "1-D"),
    (np.array([1, -1]), TdxValueError, r"gfns\[1\]=-0x1"),
    (np.array([0, MAX_GFN], dtype=np.uint64), TdxValueError, r"gfns\[1\]"),
])
def test_get_many_bad_input(store, bad, exc, match):
    with pytest.raises(exc, match=match):
        store.get_many(bad)


def test_testing_hooks_bad_name(store):
    with pytest.raises(TdxValueError, match="name="):
        _testing_mutate(store, "nope")
    _testing_mutate(store, "set_range_skip_last")
    store.set_range(0, 4, P)
    assert list(store.runs()) == [(0, 3, P)]
    _testing_mutate(store, None)


# ------------------------------------------------------------------------------ memory
def test_one_tib_all_private_fits_64k():
    s = AttributeStore("ranges")
    s.set_range(0, 1 << 28, P)
    assert s.nbytes <= 64 * 1024
    assert list(s.runs()) == [(0, 1 << 28, P)]


def test_xarray_cost_model():
    s = AttributeStore("xarray")
    s.set_range(0, 512, P)                   # 8 leaves + 1 parent
    assert s.nbytes == 9 * XA_NODE_BYTES
    s.set_range(0, 512, 0)                   # empty nodes are freed
    assert s.nbytes == 0
    s.set_range(MAX_GFN - 1, MAX_GFN, P)     # full height: 9 levels of one node each
    assert s.nbytes == 9 * XA_NODE_BYTES
    s.set_range(0, 1, P)                     # shares the root
    assert s.nbytes == 17 * XA_NODE_BYTES


# ------------------------------------------------------------------------------ allocation failure
def _scenarios(backend):
    """(builder, op) pairs whose op allocates; op's args are (start, end, attrs)."""
    return [
        (lambda: AttributeStore(backend), (10, 20, P)),
        (lambda: fragmented(backend, nr=31), (100, 101, P)),           # folds: needs a bitmap
        (lambda: fragmented(backend, nr=100), (51, 54, 5)),            # unfold: needs items
        (lambda: fragmented(backend, nr=100, base=W - 100), (W - 3, W + 7, 5)),
        (lambda: fragmented(backend, nr=100), (MAX_GFN - 200, MAX_GFN, P)),   # height growth
        (lambda: fragmented(backend, nr=40, base=W * 5), (5 * W - 700, 5 * W + 100, 5)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_alloc_failure_changes_nothing(backend, case):
    build, (a, b, v) = _scenarios(backend)[case]
    reference = build()
    reference.set_range(a, b, v)
    want_after = reference.runs_array().tolist()
    failures = 0
    for n in range(1, 200):
        s = build()
        before, nbytes = s.runs_array().tolist(), s.nbytes
        _testing_fail_alloc(s, n)
        try:
            s.set_range(a, b, v)
        except MemoryError as exc:
            assert "bytes" in str(exc)
            assert s.runs_array().tolist() == before and s.nbytes == nbytes
            failures += 1
            _testing_fail_alloc(s, 0)
            s.set_range(a, b, v)             # the retry succeeds
            assert s.runs_array().tolist() == want_after
            continue
        _testing_fail_alloc(s, 0)
        assert s.runs_array().tolist() == want_after
        break
    else:
        pytest.fail("the op kept failing")
    # The ops that must allocate (the others fit in existing capacity / nodes).
    if case in {"ranges": (0, 1, 2, 3, 5), "xarray": (0, 1, 4, 5)}[backend]:
        assert failures >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_reserve_failure_changes_nothing(backend):
    for n in range(1, 100):
        s = fragmented(backend, nr=100)
        s.reserve(1000, 1500)
        before, nbytes = s.runs_array().tolist(), s.nbytes
        _testing_fail_alloc(s, n)
        try:
            s.reserve(0, (1 << 40) + 5)
        except MemoryError:
            assert s.runs_array().tolist() == before and s.nbytes == nbytes
            continue
        finally:
            _testing_fail_alloc(s, 0)
        break


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("rs", "re_", "sub"), [
    (0, 300, [(0, 300), (5, 6), (7, 290), (299, 300)]),
    (W - 50, W + 50, [(W - 50, W + 50), (W - 1, W + 1), (W, W + 49)]),
])
def test_reserve_then_set_never_fails(backend, rs, re_, sub):
    for a, b in sub:
        for v in (0, P, 5, 9):
            for shape in (0, 1):
                s = fragmented(backend, nr=31 + shape * 60, base=rs if shape else 0)
                s.reserve(rs, re_)
                _testing_fail_alloc(s, 1)           # any allocation now would fail
                s.set_range(a, b, v)
                _testing_fail_alloc(s, 0)
                twin = TwinStore()
                for i in range(31 + shape * 60):
                    g = (rs if shape else 0) + 2 * i
                    twin.set_range(g, g + 1, P)
                twin.set_range(a, b, v)
                assert list(s.runs()) == list(twin.runs())


def test_steady_state_set_allocates_nothing():
    s = AttributeStore("ranges")
    s.set_range(0, 1 << 20, P)
    s.set_range(512, 1024, 0)
    s.set_range(512, 1024, P)
    _testing_fail_alloc(s, 1)
    for _ in range(10):
        s.set_range(512, 1024, 0)
        s.set_range(512, 1024, P)
    f = fragmented("ranges", nr=1000)
    f.set_range(1001, 1002, P)
    f.set_range(1001, 1002, 0)
    _testing_fail_alloc(f, 1)
    for _ in range(10):
        f.set_range(1001, 1002, P)
        f.set_range(1001, 1002, 0)
    _testing_fail_alloc(s, 0)
    _testing_fail_alloc(f, 0)
