"""Acceptance scenarios A10–A13 and the corrected A19 (anchors §2.4), driven through the module API."""

from __future__ import annotations

from tdxcore import status as st
from tdxcore.constants import ACCEPT_EPT_VIOLATION, PageType
from tdxcore.module.leaves.mem import entry_state
from tdxcore.status import Leaf, SeptState, TdcallLeaf
from tests.scenarios import GPA, aug, conflicts, mapped, runnable_td, sept_path


def _state(h, b, gpa, level=0):
    s, e, _ = h.tdx.td(b.tdr).sept.walk(gpa, level)
    assert s == st.TDX_SUCCESS
    return entry_state(e)


def _count(h, leaf):
    return len(h.events.filter(kind="seamcall_end", leaf=leaf))


def test_a10_aug_preconditions():
    """A10: AUG without the level-1 parent → EPT_WALK_FAILED|RCX, nothing changed; after SEPT.ADD
    AUG → PENDING; a second AUG → EPT_ENTRY_STATE_INCORRECT|RCX; SEPT.ADD on a present parent →
    EPT_ENTRY_STATE_INCORRECT|RCX.
    """
    h, b = runnable_td()
    t = h.tdx
    page = h.alloc_frame()
    before = h.pamt.state_hash(), t.td(b.tdr).sept.state_hash()
    r = t.tdh_mem_page_aug(b.tdr, GPA, 0, page)
    assert r.status == 0xC0000B0000000001
    assert (h.pamt.state_hash(), t.td(b.tdr).sept.state_hash()) == before
    sept_path(h, b, GPA)
    assert t.tdh_mem_page_aug(b.tdr, GPA, 0, page).status == st.TDX_SUCCESS
    assert _state(h, b, GPA) == SeptState.PENDING
    assert t.tdh_mem_page_aug(b.tdr, GPA, 0, h.alloc_frame()).status == 0xC0000B0D00000001
    assert t.tdh_mem_sept_add(b.tdr, GPA, 1, h.alloc_frame()).status == 0xC0000B0D00000001


def test_a11_removal_protocol_order():
    """A11: REMOVE → NOT_BLOCKED; BLOCK; REMOVE → TLB_TRACKING_NOT_DONE; TRACK; REMOVE → SUCCESS
    (entry FREE, child count −1, PAMT NDA); WBINVD; counters block 1, track 1, remove 3, wbinvd 1.
    A second BLOCK on a BLOCKED entry → GPA_RANGE_ALREADY_BLOCKED|RCX (the SPEC's pick).
    """
    h, b = runnable_td()
    t = h.tdx
    page = mapped(h, b)
    chld = h.pamt.child_count(b.tdr)
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == 0xC0000B0600000001
    assert t.tdh_mem_range_block(b.tdr, GPA, 0).status == st.TDX_SUCCESS
    assert _state(h, b, GPA) == SeptState.BLOCKED
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == 0xC0000B0800000001
    assert t.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == st.TDX_SUCCESS
    assert _state(h, b, GPA) == SeptState.FREE
    assert h.pamt.child_count(b.tdr) == chld - 1 and h.pamt.page_type(page) == PageType.PT_NDA
    assert t.tdh_phymem_page_wbinvd(page, b.hkid).status == st.TDX_SUCCESS
    assert (_count(h, Leaf.TDH_MEM_RANGE_BLOCK), _count(h, Leaf.TDH_MEM_TRACK),
            _count(h, Leaf.TDH_MEM_PAGE_REMOVE), _count(h, Leaf.TDH_PHYMEM_PAGE_WBINVD)) == (1, 1, 3, 1)
    p2 = mapped(h, b, GPA + 0x1000)
    assert t.tdh_mem_range_block(b.tdr, GPA + 0x1000, 0).status == st.TDX_SUCCESS
    assert t.tdh_mem_range_block(b.tdr, GPA + 0x1000, 0).status == 0x00000B0700000001
    assert h.pamt.page_type(p2) == PageType.PT_REG


def test_a12_sept_remove_requires_empty_children():
    """A12: SEPT.REMOVE of a level-1 table with a MAPPED child → EPT_PAGE_NOT_FREE|RCX; after the
    child's A11 removal SEPT.REMOVE succeeds and the S-EPT page goes back to PT_NDA.
    """
    h, b = runnable_td()
    t = h.tdx
    mapped(h, b)
    _, e, _ = t.td(b.tdr).sept.walk(GPA, 1)
    sept_page = (e & ((1 << 52) - 1)) >> 12
    assert h.pamt.page_type(sept_page) == PageType.PT_EPT
    assert t.tdh_mem_range_block(b.tdr, GPA, 1).status == st.TDX_SUCCESS
    assert t.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    assert t.tdh_mem_sept_remove(b.tdr, GPA, 1).status == 0xC0000B0E00000001
    # the child: A11 (its parent is NL_BLOCKED, the child entry itself is still MAPPED)
    assert t.tdh_mem_range_block(b.tdr, GPA, 0).status == st.TDX_SUCCESS
    assert t.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == st.TDX_SUCCESS
    assert t.tdh_mem_sept_remove(b.tdr, GPA, 1).status == st.TDX_SUCCESS
    assert h.pamt.page_type(sept_page) == PageType.PT_NDA
    assert _state(h, b, GPA, 1) == SeptState.FREE


def test_a13_accept_semantics():
    """A13: accept → MAPPED; again → PAGE_ALREADY_ACCEPTED; at 2M over 4K mappings →
    PAGE_SIZE_MISMATCH|level, unchanged; accept on FREE → EPT-violation exit with the level, AUG,
    re-accept succeeds.
    """
    h, b = runnable_td()
    t = h.tdx
    v = b.vcpus[0]
    aug(h, b)
    assert t.tdg_mem_page_accept(v, GPA, 0).status == st.TDX_SUCCESS
    assert _state(h, b, GPA) == SeptState.MAPPED
    assert t.tdg_mem_page_accept(v, GPA, 0).status == 0x00000B0A00000000
    before = t.td(b.tdr).sept.state_hash()
    r = t.tdg_mem_page_accept(v, GPA, 1)
    assert r.status == 0xC0000B0B00000001 and t.td(b.tdr).sept.state_hash() == before
    g = GPA + 0x5000
    r = t.tdg_mem_page_accept(v, g, 0)
    assert r.status == ACCEPT_EPT_VIOLATION and r.rdx & 7 == 0
    assert t.tdh_mem_page_aug(b.tdr, g, 0, h.alloc_frame()).status == st.TDX_SUCCESS
    assert t.tdg_mem_page_accept(v, g, 0).status == st.TDX_SUCCESS
    ends = h.events.filter(kind="tdcall_end", leaf=TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
    assert len(ends) == 5


def test_a19_accept_vs_host_on_same_entry_corrected():
    """A19 (corrected): the guest's ACCEPT holds G's entry lock; the host's BLOCK of G fails
    BUSY|RCX and sets host priority; the ACCEPT completes; the next guest ACCEPT returns
    OPERAND_BUSY_HOST_PRIORITY|RCX (0x8000020400000001) without taking the lock; the host's retry
    succeeds and clears the bit. No half-updated entry is ever observed.
    """
    h, b = runnable_td()
    t = h.tdx
    v = b.vcpus[0]
    aug(h, b)
    acc = t.begin_accept(v, GPA, 0, actor="guest")
    assert acc.acquired and _state(h, b, GPA) == SeptState.PENDING
    r = t.tdh_mem_range_block(b.tdr, GPA, 0, actor="host")
    assert r.status == 0x8000020000000001 and _state(h, b, GPA) == SeptState.PENDING
    assert acc.complete().status == st.TDX_SUCCESS and _state(h, b, GPA) == SeptState.MAPPED
    nxt = t.begin_accept(v, GPA, 0, actor="guest")
    assert not nxt.acquired and nxt.result.status == 0x8000020400000001
    assert ("entry", b.tdr, GPA, 0) not in t.holders
    c = conflicts(h)
    assert [(x["holder"], x["contender"]) for x in c] == [("guest", "host"), ("host", "guest")]
    assert t.tdh_mem_range_block(b.tdr, GPA, 0, actor="host").status == st.TDX_SUCCESS
    assert _state(h, b, GPA) == SeptState.BLOCKED
    # bit cleared: the guest is no longer refused by priority (it sees the BLOCKED entry)
    assert t.tdg_mem_page_accept(v, GPA, 0, actor="guest").status == ACCEPT_EPT_VIOLATION
