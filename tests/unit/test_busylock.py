"""Unit tests of tdxcore._busylock (SPEC §3.4, §4.4; STYLE §2.6), run on the core and its twin."""

from __future__ import annotations

import pickle

import pytest

from tdxcore import _busylock
from tdxcore._busylock import BusyLock
from tdxcore.constants import BUSYLOCK_EXCL_BIT, BUSYLOCK_HOST_PRIORITY_BIT
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.reference import busylock as ref
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_SUCCESS,
    TdxStatus,
)

IMPLS = [pytest.param(BusyLock, id="cython"), pytest.param(ref.BusyLock, id="reference")]
OP = OPERAND_ID_RCX
BUSY = TDX_OPERAND_BUSY | OP
BUSY_HP = TDX_OPERAND_BUSY_HOST_PRIORITY | OP


@pytest.fixture(params=IMPLS)
def lk(request: pytest.FixtureRequest):
    return request.param(OP)


def snap(lk):
    return (lk.word, lk.is_locked, lk.is_exclusive, lk.nr_shared, lk.host_priority, lk.state_hash())


def test_fresh(lk):
    assert lk.operand == OP
    assert snap(lk)[:5] == (0, False, False, 0, False)


def test_exclusive_acquire_release(lk):
    assert lk.try_exclusive() == TDX_SUCCESS
    assert lk.word == BUSYLOCK_EXCL_BIT and lk.is_locked and lk.is_exclusive and lk.nr_shared == 0
    lk.unlock_exclusive()
    assert lk.word == 0
    assert lk.try_exclusive(host=False) == TDX_SUCCESS      # guest acquire
    lk.unlock_exclusive()
    assert lk.word == 0


def test_shared_counts_and_conflicts(lk):
    for i in range(3):
        assert lk.try_shared() == TDX_SUCCESS
        assert lk.nr_shared == i + 1
    assert lk.try_shared(host=False) == TDX_SUCCESS
    assert lk.nr_shared == 4 and lk.is_locked and not lk.is_exclusive
    before = snap(lk)
    assert lk.try_exclusive(host=False) == BUSY              # guest loser: no side effect
    assert snap(lk) == before
    assert lk.try_exclusive() == BUSY                        # host loser: only the priority bit
    assert lk.word == before[0] | BUSYLOCK_HOST_PRIORITY_BIT
    for _ in range(4):
        lk.unlock_shared()
    assert lk.word == BUSYLOCK_HOST_PRIORITY_BIT


def test_exclusive_blocks_shared_without_side_effect(lk):
    assert lk.try_exclusive() == TDX_SUCCESS
    before = snap(lk)
    assert lk.try_shared() == BUSY                           # a failed shared try never asks priority
    assert lk.try_shared(host=False) == BUSY
    assert snap(lk) == before
    assert lk.try_exclusive(host=False) == BUSY
    assert snap(lk) == before


def test_host_priority_sequence(lk):
    # Guest holds the entry (ACCEPT); the host loses and asks for priority.
    assert lk.try_exclusive(host=False) == TDX_SUCCESS
    assert lk.try_exclusive(host=True) == BUSY
    assert lk.host_priority
    lk.unlock_exclusive()                                    # guest done; the request stays
    assert lk.word == BUSYLOCK_HOST_PRIORITY_BIT
    before = snap(lk)
    assert lk.try_exclusive(host=False) == BUSY_HP           # guest re-try is refused ...
    assert lk.try_shared(host=False) == BUSY_HP              # ... in either mode
    assert snap(lk) == before
    assert lk.try_exclusive(host=True) == TDX_SUCCESS        # host acquires: bit cleared
    assert lk.word == BUSYLOCK_EXCL_BIT and not lk.host_priority
    assert lk.try_exclusive(host=False) == BUSY              # held: plain BUSY for the guest
    lk.unlock_exclusive()
    assert lk.try_exclusive(host=False) == TDX_SUCCESS       # guest can acquire again
    lk.unlock_exclusive()
    assert lk.word == 0


def test_host_shared_does_not_clear_priority(lk):
    assert lk.try_shared() == TDX_SUCCESS
    assert lk.try_exclusive() == BUSY
    lk.unlock_shared()
    assert lk.try_shared(host=True) == TDX_SUCCESS           # host shared is allowed ...
    assert lk.host_priority                                  # ... and keeps the request
    lk.unlock_shared()


def test_unlock_exclusive_keeps_priority_set_meanwhile(lk):
    assert lk.try_exclusive() == TDX_SUCCESS
    assert lk.try_exclusive() == BUSY                        # a second host loses
    lk.unlock_exclusive()
    assert lk.word == BUSYLOCK_HOST_PRIORITY_BIT


def test_clear_host_priority(lk):
    assert lk.try_shared() == TDX_SUCCESS
    assert lk.try_exclusive() == BUSY
    lk.clear_host_priority()
    assert lk.word == 1 and not lk.host_priority             # holders untouched
    lk.clear_host_priority()                                 # idempotent
    assert lk.word == 1


def test_status_is_module_value():
    lk = BusyLock(OPERAND_ID_SEPT_TREE)
    lk.try_exclusive(host=False)
    st = lk.try_exclusive()
    assert st == 0x8000020000000092 and str(TdxStatus(st)).startswith("TDX_OPERAND_BUSY|SEPT_TREE")
    lk.unlock_exclusive()
    assert lk.try_exclusive(host=False) == 0x8000020400000092


def test_unlock_misuse(lk):
    before = snap(lk)
    with pytest.raises(TdxValueError, match=r"unlock_exclusive: lock \(operand 0x1\) is not held excl"):
        lk.unlock_exclusive()
    with pytest.raises(TdxValueError, match=r"unlock_shared: lock \(operand 0x1\) has no shared holder"):
        lk.unlock_shared()
    assert snap(lk) == before
    lk.try_shared()
    with pytest.raises(TdxValueError, match="not held exclusively"):
        lk.unlock_exclusive()
    lk.unlock_shared()
    lk.try_exclusive()
    with pytest.raises(TdxValueError, match="no shared holder"):
        lk.unlock_shared()
    assert lk.is_exclusive
    # A stray shared unlock never borrows from the host-priority bit.
    lk.unlock_exclusive()
    lk.try_shared()
    lk.try_exclusive()
    lk.unlock_shared()
    with pytest.raises(TdxValueError):
        lk.unlock_shared()
    assert lk.word == BUSYLOCK_HOST_PRIORITY_BIT


def test_bad_arguments():
    for cls in (BusyLock, ref.BusyLock):
        with pytest.raises(TdxValueError, match=r"operand_id=0x100000000 is out of range"):
            cls(1 << 32)
        with pytest.raises(TdxValueError, match=r"operand_id=-0x1"):
            cls(-1)
        with pytest.raises(TdxTypeError, match=r"operand_id='x' must be an int"):
            cls("x")
        lk = cls(OP)
        with pytest.raises(TdxTypeError, match=r"host=1 must be a bool \(type=int\)"):
            lk.try_exclusive(1)
        with pytest.raises(TdxTypeError, match=r"host=None must be a bool"):
            lk.try_shared(None)
        assert lk.word == 0


def test_state_hash_matches_twin_and_golden():
    a, b = BusyLock(0x92), ref.BusyLock(0x92)
    assert a.state_hash() == b.state_hash() == 0xE4F4B53B88429C75
    for lk in (a, b):
        lk.try_shared()
        lk.try_exclusive()
    assert a.word == b.word and a.state_hash() == b.state_hash()
    assert BusyLock(0x93).state_hash() != BusyLock(0x92).state_hash()


def test_pickle_refused_and_repr():
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(BusyLock(1))
    assert repr(BusyLock(0x92)) == "BusyLock(operand=0x92, word=0x0000000000000000)"


@pytest.mark.parametrize("name", sorted(_busylock._MUTATIONS))
def test_mutations_change_one_rule(name):
    lk = BusyLock(OP)
    _busylock._testing_mutate(lk, name)
    lk.try_exclusive(host=False)
    lk.try_exclusive(host=True)
    lk.unlock_exclusive()
    if name == "host_loss_no_priority":
        assert not lk.host_priority
        return
    assert lk.host_priority
    if name == "guest_ignores_host_priority":
        assert lk.try_exclusive(host=False) == TDX_SUCCESS
    else:
        assert lk.try_exclusive(host=True) == TDX_SUCCESS
        assert lk.host_priority
    with pytest.raises(TdxValueError, match="is not a mutation"):
        _busylock._testing_mutate(lk, "nope")
    _busylock._testing_mutate(lk, None)


def test_hammer_single_thread_counts():
    lk = BusyLock(OP)
    assert _busylock._testing_hammer(lk, 1000, True) == (1000, 0, 0)
    assert _busylock._testing_counter(lk) == 1000
    assert _busylock._testing_hammer(lk, 10, False, shared=True) == (10, 0, 0)
    lk.try_shared()
    assert _busylock._testing_hammer(lk, 10, True) == (0, 10, 0)   # held shared: all BUSY
    assert lk.host_priority and lk.nr_shared == 1
    with pytest.raises(TdxTypeError, match="shared=1 must be a bool"):
        _busylock._testing_hammer(lk, 1, True, shared=1)
