"""Unit tests of the PAMT core and twin: statuses, counters, locks, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import tdxcore._pamt as core_pamt
import tdxcore.reference.pamt as twin_pamt
from tdxcore.constants import PAMT_NO_OWNER, PageType
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.status import (
    OPERAND_ID_R8,
    OPERAND_ID_RCX,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TD_ASSOCIATED_PAGES_EXIST,
)

PT = PageType


@pytest.fixture(params=["core", "twin"])
def mod(request):
    return core_pamt if request.param == "core" else twin_pamt


@pytest.fixture
def pamt(mod):
    p = mod.Pamt(1 << 14)
    assert p.assign(7, PT.PT_TDR, PAMT_NO_OWNER, OPERAND_ID_RCX) == TDX_SUCCESS
    return p


def test_fresh_frames_are_nda(mod):
    p = mod.Pamt(1 << 24)
    assert p.nr_frames == 1 << 24
    assert (p.page_type(123456), p.owner(5), p.bepoch(9), p.child_count(9)) == (0, PAMT_NO_OWNER, 0, 0)
    assert p.nr_assigned(PT.PT_NDA) == 1 << 24


def test_core_is_lazy():
    p = core_pamt.Pamt(1 << 24)
    base = p.nbytes
    assert base <= (1 << 12) * 8 + 64           # only the chunk directory
    p.set_bepoch(5, 0)
    assert p.nbytes == base                     # reading/writing 0 allocates nothing
    p.reserve(1 << 23)
    assert base < p.nbytes < base + 256 * 1024  # one chunk


def test_assign_release_child_count(pamt):
    assert pamt.assign(100, PT.PT_REG, 7, OPERAND_ID_R8) == TDX_SUCCESS
    assert pamt.assign(101, PT.PT_EPT, 7, OPERAND_ID_R8) == TDX_SUCCESS
    assert (pamt.page_type(100), pamt.owner(100), pamt.child_count(7)) == (PT.PT_REG, 7, 2)
    assert pamt.owner(7) == PAMT_NO_OWNER and pamt.child_count(100) == 0
    assert pamt.assign(100, PT.PT_REG, 7, OPERAND_ID_R8) == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8
    assert pamt.release(7, OPERAND_ID_RCX) == TDX_TD_ASSOCIATED_PAGES_EXIST
    pamt.set_bepoch(100, 9)
    assert pamt.release(100, OPERAND_ID_RCX) == TDX_SUCCESS
    assert (pamt.page_type(100), pamt.owner(100), pamt.bepoch(100)) == (0, PAMT_NO_OWNER, 0)
    assert pamt.release(100, OPERAND_ID_RCX) == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX
    assert pamt.release(101, 0) == TDX_SUCCESS
    assert pamt.child_count(7) == 0
    assert pamt.release(7, 0) == TDX_SUCCESS
    assert pamt.nr_assigned(PT.PT_TDR) == 0


def test_assign_resets_bepoch(pamt):
    pamt.set_bepoch(50, 11)
    assert pamt.assign(50, PT.PT_REG, 7, 0) == TDX_SUCCESS
    assert pamt.bepoch(50) == 0


def test_reserve(pamt):
    pamt.reserve(3)
    assert pamt.page_type(3) == PT.PT_RSVD and pamt.owner(3) == PAMT_NO_OWNER
    assert pamt.release(3, OPERAND_ID_R8) == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8
    assert pamt.assign(3, PT.PT_REG, 7, OPERAND_ID_R8) == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8
    with pytest.raises(TdxValueError, match="pfn=0x3"):
        pamt.reserve(3)
    assert pamt.nr_assigned(PT.PT_RSVD) == 1


def test_counters(pamt):
    for k in range(10):
        pamt.assign(200 + k, PT.PT_REG, 7, 0)
    pamt.assign(300, PT.PT_TDVPR, 7, 0)
    assert pamt.nr_assigned(PT.PT_REG) == 10 and pamt.nr_assigned(PT.PT_TDVPR) == 1
    assert pamt.nr_assigned(PT.PT_NDA) == (1 << 14) - 12
    t = pamt.types(195, 212)
    assert t.dtype == np.uint8 and t.tolist() == [0] * 5 + [3] * 10 + [0] * 2
    assert pamt.types(5, 5).shape == (0,)


def test_assign_misuse(pamt):
    with pytest.raises(TdxValueError, match="owner"):
        pamt.assign(100, PT.PT_REG, 8, 0)                  # not a TDR
    with pytest.raises(TdxValueError, match="owner"):
        pamt.assign(100, PT.PT_TDR, 7, 0)                  # a TDR has no owner
    with pytest.raises(TdxValueError, match="page_type"):
        pamt.assign(100, 2, 7, 0)                          # not a PageType value
    with pytest.raises(TdxValueError, match="page_type"):
        pamt.assign(100, PT.PT_NDA, 7, 0)
    with pytest.raises(TdxValueError, match="page_type"):
        pamt.assign(100, PT.PT_RSVD, 7, 0)
    with pytest.raises(TdxValueError, match="operand"):
        pamt.assign(100, PT.PT_REG, 7, 1 << 32)
    assert pamt.page_type(100) == 0


@pytest.mark.parametrize("pfn,exc", [(-1, TdxValueError), (1 << 14, TdxValueError),
                                     ("1", TdxTypeError), (1.0, TdxTypeError),
                                     (True, TdxTypeError)])
def test_bad_pfn(pamt, pfn, exc):
    for call in (pamt.page_type, pamt.owner, pamt.bepoch, lambda x: pamt.set_bepoch(x, 1),
                 lambda x: pamt.assign(x, PT.PT_REG, 7, 0), lambda x: pamt.release(x, 0),
                 pamt.reserve, lambda x: pamt.try_lock(x, True, 0),
                 lambda x: pamt.unlock(x, True)):
        with pytest.raises(exc, match="pfn"):
            call(pfn)
    with pytest.raises(exc, match="tdr_pfn"):
        pamt.child_count(pfn)


def test_bad_other_args(mod, pamt):
    with pytest.raises(TdxValueError, match="nr_frames"):
        mod.Pamt(0)
    with pytest.raises(TdxValueError, match="nr_frames"):
        mod.Pamt((1 << 32) + 1)
    with pytest.raises(TdxValueError, match="epoch"):
        pamt.set_bepoch(1, -1)
    with pytest.raises(TdxValueError, match="end"):
        pamt.types(10, 5)
    with pytest.raises(TdxTypeError, match="exclusive"):
        pamt.try_lock(1, "x", 0)
    with pytest.raises(TypeError):
        pickle.dumps(pamt)


def test_locks(pamt):
    busy = TDX_OPERAND_BUSY | OPERAND_ID_RCX
    assert pamt.try_lock(5, False, OPERAND_ID_RCX) == TDX_SUCCESS
    assert pamt.try_lock(5, False, OPERAND_ID_RCX) == TDX_SUCCESS
    assert pamt.try_lock(5, True, OPERAND_ID_RCX) == busy            # host asks priority
    assert pamt.try_lock(5, False, OPERAND_ID_RCX, host=False) == (
        TDX_OPERAND_BUSY_HOST_PRIORITY | OPERAND_ID_RCX)
    pamt.unlock(5, False)
    pamt.unlock(5, False)
    with pytest.raises(TdxValueError, match="not held shared"):
        pamt.unlock(5, False)
    assert pamt.try_lock(5, True, OPERAND_ID_RCX) == TDX_SUCCESS     # clears priority
    assert pamt.try_lock(5, False, OPERAND_ID_RCX) == busy
    pamt.unlock(5, True)
    with pytest.raises(TdxValueError, match="not held exclusively"):
        pamt.unlock(5, True)
    assert pamt.try_lock(5, True, OPERAND_ID_RCX, host=False) == TDX_SUCCESS
    pamt.unlock(5, True)


@pytest.mark.parametrize("b,e,r,want", [(0, 0, 0, False), (0, 1, 0, True), (0, 1, 1, False),
                                        (0, 2, 5, True), (5, 5, 0, False), (5, 6, 0, True),
                                        (5, 6, 2, False), (2**64 - 1, 0, 0, False),
                                        (2**64 - 2, 2**64 - 1, 0, True)])
def test_is_tlb_tracked(mod, b, e, r, want):
    assert mod.is_tlb_tracked(b, e, r) is want


def test_is_tlb_tracked_bad(mod):
    with pytest.raises(TdxValueError, match="td_epoch"):
        mod.is_tlb_tracked(0, -1, 0)
    with pytest.raises(TdxTypeError, match="bepoch"):
        mod.is_tlb_tracked("0", 1, 0)


def test_state_hash_agrees():
    ps = [core_pamt.Pamt(1 << 13), twin_pamt.Pamt(1 << 13)]
    for p in ps:
        p.assign(9, PT.PT_TDR, PAMT_NO_OWNER, 0)
        p.assign(4097, PT.PT_REG, 9, 0)
        p.set_bepoch(4097, 3)
        p.set_bepoch(12, 8)
        p.reserve(0)
    assert ps[0].state_hash() == ps[1].state_hash()
    ps[0].release(4097, 0)
    assert ps[0].state_hash() != ps[1].state_hash()


def test_core_assign_oom_no_change():
    p = core_pamt.Pamt(1 << 14)
    p.assign(7, PT.PT_TDR, PAMT_NO_OWNER, 0)
    h = p.state_hash()
    core_pamt._testing_fail_alloc(p, 1)
    with pytest.raises(MemoryError):
        p.assign(9000, PT.PT_REG, 7, 0)
    assert p.state_hash() == h and p.child_count(7) == 0
