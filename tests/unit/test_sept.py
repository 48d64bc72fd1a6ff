"""Unit tests of the S-EPT tree: every status path, bad input, precedence (core and twin)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import tdxcore._pamt as core_pamt
import tdxcore._sept as core_sept
import tdxcore.reference.pamt as twin_pamt
import tdxcore.reference.sept as twin_sept
from tdxcore.constants import (
    ACCEPT_EPT_VIOLATION,
    PAMT_NO_OWNER,
    SEPT_BIT_SVE,
    SEPT_PFN_MASK,
    PageType,
)
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.status import (
    OPERAND_ID_R8,
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_PAGE_NOT_FREE,
    TDX_EPT_WALK_FAILED,
    TDX_GPA_RANGE_ALREADY_BLOCKED,
    TDX_GPA_RANGE_NOT_BLOCKED,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
    SeptState,
)

S = SeptState
IMPLS = {"core": (core_sept, core_pamt), "twin": (twin_sept, twin_pamt)}
INVALID_RCX = TDX_OPERAND_INVALID | OPERAND_ID_RCX
INVALID_R8 = TDX_OPERAND_INVALID | OPERAND_ID_R8
STATE_INCORRECT = TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX
M2 = 1 << 21
TDR = 1


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


@pytest.fixture
def tree(impl):
    sept, pamt = impl
    return sept.SeptTree(4, pamt.Pamt(1 << 16), tdr=TDR)


def _tables(t, gpa=0):
    """Add the three tables above the 4K entry of gpa with frames 100..102."""
    for lv, page in ((3, 100), (2, 101), (1, 102)):
        s = t.sept_add(gpa - gpa % (1 << (12 + 9 * lv)), lv, page + (gpa >> 21) * 3)[0]
        assert s in (TDX_SUCCESS, STATE_INCORRECT)


def _pfn(entry):
    return (entry & SEPT_PFN_MASK) >> 12


def _state(entry):
    return twin_sept.entry_state(entry)


def _force(impl, t, gpa, level, state, pfn=0):
    return impl[0]._testing_force_state(t, gpa, level, int(state), pfn)


# ------------------------------------------------------------------------------- construction

def test_constructor_defaults_and_geometry(impl):
    sept, pamt = impl
    t = sept.SeptTree()
    assert (t.levels, t.gpaw, t.shared_bit, t.tdr, t.nr_tables) == (4, 48, 47, 0, 1)
    assert t.pamt.nr_frames == 1 << 24
    assert t.pamt.page_type(0) == PageType.PT_TDR       # the constructor assigns the TDR
    t5 = sept.SeptTree(5, pamt.Pamt(64), tdr=3)
    assert (t5.gpaw, t5.shared_bit) == (52, 51)


def test_constructor_bad_input(impl):
    sept, pamt = impl
    with pytest.raises(TdxValueError, match="levels"):
        sept.SeptTree(3)
    with pytest.raises(TdxTypeError, match="levels"):
        sept.SeptTree("4")
    with pytest.raises(TdxTypeError, match="pamt"):
        sept.SeptTree(4, pamt=object())
    p = pamt.Pamt(64)
    with pytest.raises(TdxValueError, match="tdr"):
        sept.SeptTree(4, p, tdr=64)
    p.reserve(5)
    with pytest.raises(TdxValueError, match="tdr=0x5"):
        sept.SeptTree(4, p, tdr=5)


def test_pickling_refused(tree):
    with pytest.raises(TypeError):
        pickle.dumps(tree)


# ------------------------------------------------------------------------------- walk

def test_walk_empty_tree_fails_at_root(tree):
    s, e, ls = tree.walk(0x1000, 0)
    assert s == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX
    assert e == (1 << SEPT_BIT_SVE) | twin_sept.state_bits(S.FREE)
    assert ls == 3                      # root level, public state FREE = 0


def test_walk_success_after_tables(tree):
    _tables(tree)
    s, e, ls = tree.walk(0x5000, 0)
    assert s == TDX_SUCCESS and _state(e) == S.FREE and ls == 0
    s, e, ls = tree.walk(0, 1)
    assert s == TDX_SUCCESS and _state(e) == S.NL_MAPPED and _pfn(e) == 102
    assert ls == 1 | (0x84 << 8)


@pytest.mark.parametrize("gpa,level", [(1 << 47, 0), (1 << 48, 0), (0x1001 & ~0xFFF | 0x800, 0),
                                       (0x1000, 1), (0, 4)])
def test_walk_operand_invalid(tree, gpa, level):
    assert tree.walk(gpa, level) == (INVALID_RCX, 0, 0)


# ------------------------------------------------------------------------------- bad input

BAD = [
    ("gpa", -1, TdxValueError), ("gpa", 1 << 64, TdxValueError), ("gpa", "0", TdxTypeError),
    ("gpa", 1.0, TdxTypeError), ("level", 5, TdxValueError), ("level", -1, TdxValueError),
    ("level", None, TdxTypeError), ("page", -1, TdxValueError), ("page", 2.0, TdxTypeError),
    ("page", True, TdxTypeError),
]


@pytest.mark.parametrize("arg,value,exc", BAD, ids=[f"{a}={v!r}" for a, v, _ in BAD])
@pytest.mark.parametrize("op", ["sept_add", "page_add", "page_aug"])
def test_bad_input_page_ops(tree, op, arg, value, exc):
    args = {"gpa": 0, "level": 1 if op == "sept_add" else 0, "page": 200}
    args[arg] = value
    h = tree.state_hash()
    with pytest.raises(exc, match=arg):
        getattr(tree, op)(args["gpa"], args["level"], args["page"])
    assert tree.state_hash() == h


BAD_EPOCH = [("td_epoch", -1, TdxValueError), ("td_epoch", 1 << 64, TdxValueError),
             ("refcount_prev", -1, TdxValueError), ("td_epoch", "1", TdxTypeError),
             ("tracking_required", "yes", TdxTypeError), ("gpa", -4096, TdxValueError),
             ("level", 7, TdxValueError)]


@pytest.mark.parametrize("arg,value,exc", BAD_EPOCH, ids=[f"{a}={v!r}" for a, v, _ in BAD_EPOCH])
@pytest.mark.parametrize("op", ["range_block", "range_unblock", "page_remove", "sept_remove"])
def test_bad_input_epoch_ops(tree, op, arg, value, exc):
    args = {"gpa": 0, "level": 1, "td_epoch": 2, "refcount_prev": 0, "tracking_required": True}
    args[arg] = value
    with pytest.raises(exc, match=arg):
        getattr(tree, op)(**args)


def test_bad_input_accept_and_locks(tree):
    with pytest.raises(TdxValueError, match="level"):
        tree.page_accept(0, 5)
    with pytest.raises(TdxTypeError, match="gpa"):
        tree.page_accept(None)
    with pytest.raises(TdxTypeError, match="host"):
        tree.entry_try_lock(0, 3, host="no")
    with pytest.raises(TdxTypeError, match="allow_existing"):
        tree.sept_add(0, 3, 100, allow_existing=[])


# ------------------------------------------------------------------------------- operand rules

@pytest.mark.parametrize("op,level", [("sept_add", 0), ("sept_add", 4), ("page_add", 1),
                                      ("page_aug", 2), ("page_remove", 2), ("sept_remove", 0),
                                      ("range_block", 4), ("range_unblock", 4),
                                      ("page_accept", 3)])
def test_level_not_allowed(tree, op, level):
    assert _call(tree, op, 0, level)[0] == INVALID_RCX


def _call(tree, op, gpa, level, page=200):
    if op in ("sept_add", "page_add", "page_aug"):
        return getattr(tree, op)(gpa, level, page)
    if op == "page_accept":
        return tree.page_accept(gpa, level)
    return getattr(tree, op)(gpa, level, 2, 0, True)


@pytest.mark.parametrize("op", ["sept_add", "page_add", "page_aug", "range_block", "range_unblock",
                                "page_remove", "sept_remove", "page_accept"])
@pytest.mark.parametrize("gpa", [1 << 47, (1 << 47) | M2, 1 << 50, 0x1000 | M2 // 2 * 0 + 0x800])
def test_gpa_operand_invalid(tree, op, gpa):
    level = 1 if op in ("sept_add", "sept_remove") else 0
    if gpa == 0x1800 and level == 0:
        gpa = 0x1800                                  # not 4K aligned
    assert _call(tree, op, gpa, level) == (INVALID_RCX, 0, 0)


def test_misaligned_for_level(tree):
    assert tree.sept_add(0x1000, 1, 200) == (INVALID_RCX, 0, 0)
    assert tree.page_aug(0x1000, 1, 512) == (INVALID_RCX, 0, 0)


def test_page_operand_r8(tree):
    _tables(tree)
    assert tree.page_aug(0, 0, 1 << 16) == (INVALID_R8, 0, 0)
    assert tree.page_add(0, 0, 1 << 16) == (INVALID_R8, 0, 0)
    assert tree.sept_add(M2, 1, 1 << 16) == (INVALID_R8, 0, 0)
    assert tree.page_aug(M2, 1, 513) == (INVALID_R8, 0, 0)          # 2M page not 512-aligned
    assert tree.page_aug(M2, 1, (1 << 16) - 512 + 512) == (INVALID_R8, 0, 0)


# ------------------------------------------------------------------------------- precedence

def test_precedence_python_before_module(tree):
    with pytest.raises(TdxValueError, match="level"):
        tree.page_aug(1 << 47, 9, 1 << 20)


def test_precedence_rcx_before_r8_before_walk(tree):
    assert tree.page_aug(1 << 47, 0, 1 << 20)[0] == INVALID_RCX
    assert tree.page_aug(0, 0, 1 << 20)[0] == INVALID_R8            # empty tree: walk would fail
    assert tree.page_aug(0, 0, 200)[0] == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX


def test_precedence_state_before_pamt(impl, tree):
    _tables(tree)
    _force(impl, tree, 0, 0, S.MAPPED)
    assert tree.page_aug(0, 0, 100)[0] == STATE_INCORRECT       # frame 100 is not NDA either


def test_precedence_state_before_tracking(tree):
    _tables(tree)
    assert tree.page_remove(0, 0, 0, 5, True)[0] == STATE_INCORRECT
    assert tree.range_unblock(0, 0, 0, 5, True)[0] == STATE_INCORRECT


def test_precedence_blocked_before_tracked(impl, tree):
    _tables(tree)
    _force(impl, tree, 0, 0, S.MAPPED)
    tree.pamt.set_bepoch(_pfn(tree.walk(0)[1]), 9)
    assert tree.page_remove(0, 0, 1, 5, True)[0] == TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX


def test_walk_failure_reports_entry_and_level(impl, tree):
    tree.sept_add(0, 3, 100)
    s, e, ls = tree.page_aug(0x3000, 0, 200)
    assert s == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX and ls == 2 and _state(e) == S.FREE
    _force(impl, tree, 0, 2, S.NL_MAPPED)
    _force(impl, tree, 0, 1, S.MAPPED)        # a 2M leaf in the way of a 4K walk
    s, e, ls = tree.page_aug(0x3000, 0, 200)
    assert s == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX and ls == 1 | (4 << 8)


# ------------------------------------------------------------------------------- SEPT.ADD

def test_sept_add_effects(tree):
    pm = tree.pamt
    s, e, ls = tree.sept_add(0, 3, 100)
    assert (s, e, ls) == (TDX_SUCCESS, 100 << 12, 3 | (0x84 << 8))
    assert pm.page_type(100) == PageType.PT_EPT and pm.owner(100) == TDR and pm.bepoch(100) == 0
    assert pm.child_count(TDR) == 1 and tree.nr_tables == 2


def test_sept_add_existing(tree):
    tree.sept_add(0, 3, 100)
    h, ph = tree.state_hash(), tree.pamt.state_hash()
    assert tree.sept_add(0, 3, 200)[0] == STATE_INCORRECT
    s, e, _ = tree.sept_add(0, 3, 200, allow_existing=True)
    assert s == TDX_SUCCESS and e == 100 << 12
    assert tree.pamt.page_type(200) == PageType.PT_NDA
    assert (tree.state_hash(), tree.pamt.state_hash()) == (h, ph)


def test_sept_add_page_not_free(tree):
    tree.sept_add(0, 3, 100)
    h = tree.state_hash()
    s, e, ls = tree.sept_add(1 << 39, 3, 100)
    assert s == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8 and _state(e) == S.FREE
    assert tree.state_hash() == h and tree.nr_tables == 2


def test_sept_add_oom_no_change():
    t = core_sept.SeptTree(4, core_pamt.Pamt(1024), tdr=1)
    h, n = t.state_hash(), t.nbytes
    core_sept._testing_fail_alloc(t, 1)
    with pytest.raises(MemoryError):
        t.sept_add(0, 3, 100)
    assert t.state_hash() == h and t.nbytes == n and t.pamt.page_type(100) == 0
    assert t.sept_add(0, 3, 100)[0] == TDX_SUCCESS


# ------------------------------------------------------------------------------- ADD / AUG

def test_page_add(tree):
    _tables(tree)
    s, e, ls = tree.page_add(0x1000, 0, 300)
    assert s == TDX_SUCCESS and _state(e) == S.MAPPED and _pfn(e) == 300 and ls == 4 << 8
    assert tree.pamt.page_type(300) == PageType.PT_REG
    assert tree.page_add(0x1000, 0, 301)[0] == STATE_INCORRECT
    assert tree.page_add(0x2000, 0, 300)[0] == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8


def test_page_aug_4k_and_2m(tree):
    _tables(tree)
    pm = tree.pamt
    before = pm.child_count(TDR)
    s, e, ls = tree.page_aug(0x1000, 0, 300)
    assert s == TDX_SUCCESS and _state(e) == S.PENDING and ls == 2 << 8
    s, e, ls = tree.page_aug(M2, 1, 1024)
    assert s == TDX_SUCCESS and _state(e) == S.PENDING and ls == 1 | (2 << 8)
    assert pm.child_count(TDR) == before + 1 + 512
    assert all(pm.page_type(1024 + k) == PageType.PT_REG for k in range(512))


def test_page_aug_2m_one_frame_taken(tree):
    _tables(tree)
    tree.page_aug(0x1000, 0, 1024 + 17)
    h, ph = tree.state_hash(), tree.pamt.state_hash()
    assert tree.page_aug(M2, 1, 1024)[0] == TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8
    assert (tree.state_hash(), tree.pamt.state_hash()) == (h, ph)


def test_page_aug_on_removed(impl, tree):
    _force(impl, tree, 0x5000, 0, S.REMOVED)
    assert tree.page_aug(0x5000, 0, 300)[0] == TDX_SUCCESS


# ------------------------------------------------------------------------------- BLOCK / UNBLOCK

@pytest.mark.parametrize("frm,to", [(S.MAPPED, S.BLOCKED), (S.BLOCKEDW, S.BLOCKED),
                                    (S.PENDING, S.PENDING_BLOCKED),
                                    (S.PENDING_BLOCKEDW, S.PENDING_BLOCKED)])
def test_block_transitions(impl, tree, frm, to):
    e0 = _force(impl, tree, 0x4000, 0, frm)
    s, e, ls = tree.range_block(0x4000, 0, 7)
    assert s == TDX_SUCCESS and _state(e) == to and _pfn(e) == _pfn(e0)
    assert tree.pamt.bepoch(_pfn(e0)) == 7
    assert tree.range_block(0x4000, 0, 8)[0] == TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX
    assert tree.pamt.bepoch(_pfn(e0)) == 7


def test_block_non_leaf_records_table_bepoch(tree):
    _tables(tree)
    s, e, ls = tree.range_block(0, 1, 5)
    assert s == TDX_SUCCESS and _state(e) == S.NL_BLOCKED and ls == 1 | (0x81 << 8)
    assert tree.pamt.bepoch(102) == 5
    assert tree.walk(0x1000, 0)[0] == TDX_SUCCESS          # walks go through NL_BLOCKED
    assert tree.page_accept(0x1000, 0)[0] == ACCEPT_EPT_VIOLATION   # the guest cannot


def test_block_free_is_state_incorrect(tree):
    _tables(tree)
    assert tree.range_block(0x1000, 0, 1)[0] == STATE_INCORRECT


def test_unblock(impl, tree):
    e0 = _force(impl, tree, 0x4000, 0, S.MAPPED)
    tree.range_block(0x4000, 0, 7)
    s = tree.range_unblock(0x4000, 0, 8, 1, True)[0]
    assert s == TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT_TREE
    s, e, _ = tree.range_unblock(0x4000, 0, 8, 0, True)
    assert s == TDX_SUCCESS and e == e0
    tree.range_block(0x4000, 0, 7)
    assert tree.range_unblock(0x4000, 0, 7, 1, False)[0] == TDX_SUCCESS
    assert tree.range_unblock(0x4000, 0, 7, 1, False)[0] == STATE_INCORRECT


# ------------------------------------------------------------------------------- PAGE.REMOVE

def test_page_remove_tracking(impl, tree):
    e0 = _force(impl, tree, 0x4000, 0, S.PENDING)
    pfn = _pfn(e0)
    assert tree.page_remove(0x4000, 0, 3, 0, True)[0] == TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX
    tree.range_block(0x4000, 0, 3)
    assert tree.page_remove(0x4000, 0, 3, 0, True)[0] == TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX
    assert tree.page_remove(0x4000, 0, 4, 1, True)[0] == TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX
    cc = tree.pamt.child_count(TDR)
    s, e, ls = tree.page_remove(0x4000, 0, 4, 0, True)
    assert s == TDX_SUCCESS and _pfn(e) == pfn and _state(e) == S.PENDING_BLOCKED
    assert ls == 3 << 8
    assert tree.pamt.page_type(pfn) == PageType.PT_NDA and tree.pamt.child_count(TDR) == cc - 1
    assert _state(tree.walk(0x4000)[1]) == S.FREE


def test_page_remove_without_tracking(impl, tree):
    _force(impl, tree, 0x4000, 0, S.MAPPED)
    assert tree.page_remove(0x4000, 0, 0, 0, False)[0] == TDX_SUCCESS


def test_page_remove_2m(impl, tree):
    _tables(tree)
    tree.page_aug(M2, 1, 1024)
    cc = tree.pamt.child_count(TDR)
    assert tree.page_remove(M2, 1, 0, 0, False)[0] == TDX_SUCCESS
    assert tree.pamt.child_count(TDR) == cc - 512
    assert tree.pamt.nr_assigned(PageType.PT_REG) == 0


# ------------------------------------------------------------------------------- SEPT.REMOVE

def test_sept_remove(impl, tree):
    _tables(tree)
    tree.page_aug(0x1000, 0, 300)
    tree.range_block(0, 1, 3)
    assert tree.sept_remove(0, 1, 5, 0, True)[0] == TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX
    tree.page_remove(0x1000, 0, 0, 0, False)
    assert tree.sept_remove(0, 1, 3, 0, True)[0] == TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX
    n = tree.nr_tables
    s, e, ls = tree.sept_remove(0, 1, 5, 0, True)
    assert s == TDX_SUCCESS and _pfn(e) == 102 and _state(e) == S.NL_BLOCKED
    assert tree.nr_tables == n - 1 and tree.pamt.page_type(102) == PageType.PT_NDA
    assert tree.walk(0x1000)[0] == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX


def test_sept_remove_needs_blocked_and_strictly_free(impl, tree):
    _tables(tree)
    assert tree.sept_remove(0, 1, 5, 0, True)[0] == TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX
    _force(impl, tree, 0x7000, 0, S.REMOVED)
    assert tree.sept_remove(0, 1, 5, 0, False)[0] == TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX
    _force(impl, tree, 0x7000, 0, S.FREE)
    assert tree.sept_remove(0, 1, 5, 0, False)[0] == TDX_SUCCESS


# ------------------------------------------------------------------------------- ACCEPT

def test_accept_paths(impl, tree):
    assert tree.page_accept(0x1000)[0] == ACCEPT_EPT_VIOLATION        # no tables at all
    _tables(tree)
    s, e, ls = tree.page_accept(0x1000)
    assert (s, ls) == (ACCEPT_EPT_VIOLATION, 0) and _state(e) == S.FREE
    tree.page_aug(0x1000, 0, 300)
    s, e, ls = tree.page_accept(0x1000)
    assert s == TDX_SUCCESS and _state(e) == S.MAPPED
    assert tree.page_accept(0x1000)[0] == TDX_PAGE_ALREADY_ACCEPTED
    tree.page_aug(M2, 1, 1024)
    assert tree.page_accept(M2 + 0x1000, 0)[0] == TDX_PAGE_SIZE_MISMATCH | 0
    assert tree.page_accept(M2, 1)[0] == TDX_SUCCESS
    assert tree.page_accept(M2, 1)[0] == TDX_PAGE_ALREADY_ACCEPTED | 1
    assert tree.page_accept(0, 1)[0] == TDX_PAGE_SIZE_MISMATCH | 1    # NL_MAPPED at level 1
    _force(impl, tree, 0x9000, 0, S.PENDING_EXPORTED_DIRTY)
    s, e, _ = tree.page_accept(0x9000)
    assert s == TDX_SUCCESS and _state(e) == S.EXPORTED_DIRTY


def test_accept_violation_carries_accept_level(tree):
    _tables(tree)
    s, e, ls = tree.page_accept(M2 * 5, 1)
    assert s == ACCEPT_EPT_VIOLATION and ls & 7 == 1


# ------------------------------------------------------------------------------- entry locks

def test_entry_locks(tree):
    assert tree.entry_try_lock(0x1000, 0) == TDX_EPT_WALK_FAILED | OPERAND_ID_RCX
    _tables(tree)
    assert tree.entry_try_lock(0x1000, 0) == TDX_SUCCESS
    assert tree.entry_try_lock(0x1000, 0, host=False) == TDX_OPERAND_BUSY | OPERAND_ID_RCX
    assert tree.entry_try_lock(0x1000, 0) == TDX_OPERAND_BUSY | OPERAND_ID_RCX   # asks priority
    tree.entry_unlock(0x1000, 0)
    assert (tree.entry_try_lock(0x1000, 0, host=False)
            == TDX_OPERAND_BUSY_HOST_PRIORITY | OPERAND_ID_RCX)
    assert tree.entry_try_lock(0x1000, 0) == TDX_SUCCESS
    tree.entry_unlock(0x1000, 0)
    assert tree.entry_try_lock(0x1000, 0, host=False) == TDX_SUCCESS
    tree.entry_unlock(0x1000, 0)
    with pytest.raises(TdxValueError, match="not held"):
        tree.entry_unlock(0x1000, 0)
    with pytest.raises(TdxValueError, match="gpa"):
        tree.entry_unlock(1 << 40, 0)
    assert tree.entry_try_lock(1 << 47, 0) == INVALID_RCX


# ------------------------------------------------------------------------------- batches

def test_batch_cycle_and_statuses(impl, tree):
    n = tree.sept_add_range(0, 2048, np.arange(100, 120))
    assert n == 1 + 1 + 4
    assert tree.sept_add_range(0, 2048, np.arange(100, 120)) == 0
    g = np.arange(2048, dtype=np.uint64)
    p = np.arange(4096, 4096 + 2048)
    assert not tree.page_aug_batch(g, p).any()
    s = tree.page_aug_batch(g[:3], p[:3])
    assert (s == STATE_INCORRECT).all()
    assert not tree.page_accept_batch(g).any()
    assert not tree.range_block_batch(g, 4).any()
    s = tree.page_remove_batch(g, 4, 0, True)
    assert (s == TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX).all()
    assert not tree.page_remove_batch(g, 5, 0, True).any()
    assert tree.entries(0) == [] and tree.pamt.nr_assigned(PageType.PT_REG) == 0
    s = tree.page_aug_batch([1 << 36], [5000])                   # gfn beyond the tables
    assert s[0] == INVALID_RCX


@pytest.mark.parametrize("bad,exc", [(np.zeros(2, dtype=float), TdxTypeError),
                                     (np.zeros(2, dtype=bool), TdxTypeError),
                                     (np.array(["a", "b"]), TdxTypeError),
                                     (np.zeros((2, 1), dtype=np.uint64), TdxValueError),
                                     (np.array([-1, 0]), TdxValueError),
                                     (np.array([1 << 52, 0], dtype=np.uint64), TdxValueError)])
def test_batch_bad_arrays(tree, bad, exc):
    for call in (lambda: tree.page_aug_batch(bad, [1, 2]), lambda: tree.page_accept_batch(bad),
                 lambda: tree.range_block_batch(bad, 1),
                 lambda: tree.page_remove_batch(bad, 1, 0, True)):
        with pytest.raises(exc, match="gfns"):
            call()


def test_batch_length_mismatch(tree):
    with pytest.raises(TdxValueError, match="pages"):
        tree.page_aug_batch([1, 2], [3])
    with pytest.raises(TdxTypeError, match="pages"):
        tree.page_aug_batch([1, 2], [3.0, 4.0])


def test_sept_add_range_errors_change_nothing(impl, tree):
    h, ph = tree.state_hash(), tree.pamt.state_hash()
    with pytest.raises(TdxValueError, match="pages has 2 frames"):
        tree.sept_add_range(0, 1024, [100, 101])
    with pytest.raises(TdxValueError, match="duplicate"):
        tree.sept_add_range(0, 1024, [100, 101, 102, 100])
    with pytest.raises(TdxValueError, match=r"pages\[1\]"):
        tree.sept_add_range(0, 1024, [100, TDR, 102, 103])
    with pytest.raises(TdxValueError, match="start_gfn"):
        tree.sept_add_range(5, 5, [100])
    with pytest.raises(TdxValueError, match="end_gfn"):
        tree.sept_add_range(0, (1 << 35) + 1, [100])
    assert (tree.state_hash(), tree.pamt.state_hash()) == (h, ph)
    _force(impl, tree, 0, 1, S.MAPPED)
    with pytest.raises(TdxValueError, match="leaf"):
        tree.sept_add_range(0, 1024, np.arange(200, 210))


def test_entries_and_hash_agree_between_impls():
    trees = [m.SeptTree(4, p.Pamt(1 << 14), tdr=2) for m, p in IMPLS.values()]
    for (m, _), t in zip(IMPLS.values(), trees):
        t.sept_add_range(0, 1024, np.arange(10, 20))
        t.page_aug_batch(np.arange(0, 1024, 3), np.arange(2000, 2000 + 342))
        m._testing_force_state(t, 5 << 21, 1, int(S.BLOCKED))
        t.range_block(0, 1, 4)
    assert trees[0].entries(0) == trees[1].entries(0)
    assert trees[0].entries(1) == trees[1].entries(1)
    assert trees[0].state_hash() == trees[1].state_hash()
    assert trees[0].pamt.state_hash() == trees[1].pamt.state_hash()
    assert trees[0].nr_tables == trees[1].nr_tables
    assert trees[0].entries(4) == []


def test_force_state_bad_input(impl, tree):
    sept = impl[0]
    with pytest.raises(TdxValueError, match="state_encoding"):
        sept._testing_force_state(tree, 0, 0, 0x01)
    with pytest.raises(TdxValueError, match="level"):
        sept._testing_force_state(tree, 0, 2, int(S.MAPPED))
    with pytest.raises(TdxValueError, match="gpa"):
        sept._testing_force_state(tree, 1 << 47, 0, int(S.MAPPED))
    with pytest.raises(TdxValueError, match="pfn"):
        sept._testing_force_state(tree, 0, 0, int(S.MAPPED), TDR)
    with pytest.raises(TdxValueError, match="name"):
        sept._testing_mutate(tree, "nope")


def test_force_state_replaces_subtree(impl, tree):
    _tables(tree)
    tree.page_aug(0x1000, 0, 300)
    _force(impl, tree, 0, 2, S.FREE)          # drops the level-1 table, its level-0 table, page
    pm = tree.pamt
    assert pm.page_type(300) == 0 and pm.page_type(102) == 0 and pm.page_type(101) == 0
    assert pm.child_count(TDR) == 1 and tree.nr_tables == 2


def test_no_owner_constant_matches():
    assert core_pamt.Pamt(8).owner(3) == PAMT_NO_OWNER
