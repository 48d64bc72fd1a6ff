"""BUSY from real conflicts between in-flight leaves, injection off (SPEC §4.4, §5; anchors §2.3).

One test per lock pair; each asserts the status and the paired ``lock_conflict`` event naming
the resource, the holder and the contender, and that the contender changed nothing.
"""

from __future__ import annotations

from tdxcore import status as st
from tdxcore.constants import ACCEPT_EPT_VIOLATION, PAGE_SHIFT, PageType
from tdxcore.status import Leaf
from tests.scenarios import GPA, aug, conflicts, mapped, runnable_td, sept_path

G2 = GPA + 0x1000


def test_sept_tree_block_in_flight_vs_aug_other_gfn():
    h, b = runnable_td()
    mapped(h, b, GPA)
    sept_path(h, b, G2)
    blk = h.tdx.begin(Leaf.TDH_MEM_RANGE_BLOCK, GPA, b.tdr << PAGE_SHIFT, actor="zapper")
    assert blk.acquired
    page = h.alloc_frame()
    before = h.state_hash()
    r = h.tdx.tdh_mem_page_aug(b.tdr, G2, 0, page, actor="faulter")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE
    assert h.pamt.page_type(page) == PageType.PT_NDA
    c = conflicts(h)[-1]
    assert c["resource"] == ("sept_tree", b.tdr) and c["operand"] == st.OPERAND_ID_SEPT_TREE
    assert (c["holder"], c["contender"], c["leaf"]) == ("zapper", "faulter", int(Leaf.TDH_MEM_PAGE_AUG))
    del before
    assert blk.complete().status == st.TDX_SUCCESS
    assert h.tdx.tdh_mem_page_aug(b.tdr, G2, 0, page).status == st.TDX_SUCCESS


def test_entry_lock_aug_vs_aug_same_gfn():
    h, b = runnable_td()
    sept_path(h, b, GPA)
    p1, p2 = h.alloc_frame(), h.alloc_frame()
    op = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, p1 << PAGE_SHIFT, actor="cpu0")
    assert op.acquired
    r = h.tdx.tdh_mem_page_aug(b.tdr, GPA, 0, p2, actor="cpu1")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    c = conflicts(h)[-1]
    assert c["resource"] == ("entry", b.tdr, GPA, 0)
    assert (c["holder"], c["contender"]) == ("cpu0", "cpu1")
    assert op.complete().status == st.TDX_SUCCESS
    assert h.pamt.page_type(p2) == PageType.PT_NDA


def test_page_pamt_lock_same_frame_two_gfns():
    h, b = runnable_td()
    sept_path(h, b, GPA)
    p = h.alloc_frame()
    op = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, p << PAGE_SHIFT, actor="a")
    r = h.tdx.tdh_mem_page_aug(b.tdr, G2, 0, p, actor="b")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_R8
    assert conflicts(h)[-1]["resource"] == ("pamt", p)
    op.complete()


def test_host_priority_guest_accept_vs_host_block():
    """Guest ACCEPT holds the entry; host BLOCK loses (BUSY|RCX) and sets host priority."""
    h, b = runnable_td()
    aug(h, b, GPA)
    acc = h.tdx.begin_accept(b.vcpus[0], GPA, 0, actor="guest0")
    assert acc.acquired
    r = h.tdx.tdh_mem_range_block(b.tdr, GPA, 0, actor="zapper")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("entry", b.tdr, GPA, 0), "guest0", "zapper")
    assert acc.complete().status == st.TDX_SUCCESS
    r = h.tdx.tdg_mem_page_accept(b.vcpus[0], GPA, 0, actor="guest0")
    assert r.status == st.TDX_OPERAND_BUSY_HOST_PRIORITY | st.OPERAND_ID_RCX
    c = conflicts(h)[-1]
    assert (c["holder"], c["contender"], c["leaf"]) == ("zapper", "guest0", None)
    assert h.tdx.tdh_mem_range_block(b.tdr, GPA, 0, actor="zapper").status == st.TDX_SUCCESS
    # the bit is clear again: the guest reaches the (now BLOCKED) entry -> EPT-violation exit
    assert h.tdx.tdg_mem_page_accept(b.vcpus[0], GPA, 0).status == ACCEPT_EPT_VIOLATION


def test_host_aug_holds_entry_guest_accept_busy():
    h, b = runnable_td()
    sept_path(h, b, GPA)
    op = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT,
                     actor="faulter")
    r = h.tdx.tdg_mem_page_accept(b.vcpus[0], GPA, 0, actor="guest0")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    assert (conflicts(h)[-1]["holder"], conflicts(h)[-1]["contender"]) == ("faulter", "guest0")
    op.complete()
    assert h.tdx.tdg_mem_page_accept(b.vcpus[0], GPA, 0).status == st.TDX_SUCCESS


def test_td_epoch_track_vs_vcpu_in_guest():
    h, b = runnable_td()
    op = h.tdx.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()
    assert h.tdx.tdh_mem_track(b.tdr, actor="zapper").status == st.TDX_SUCCESS     # epoch N -> N+1
    r = h.tdx.tdh_mem_track(b.tdr, actor="zapper")
    assert r.status == st.TDX_PREVIOUS_TLB_EPOCH_BUSY
    c = conflicts(h)[-1]
    assert c["resource"][0] == "td_epoch_refcount" and (c["holder"], c["contender"]) == ("vcpu0", "zapper")
    epoch = h.tdx.td(b.tdr).epoch
    op.exit(12)
    assert h.tdx.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    assert h.tdx.td(b.tdr).epoch == epoch + 1


def test_td_epoch_vp_enter_in_flight_vs_track():
    h, b = runnable_td()
    op = h.tdx.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    assert op.acquired and not op.in_guest
    epoch = h.tdx.td(b.tdr).epoch
    r = h.tdx.tdh_mem_track(b.tdr, actor="zapper")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_TD_EPOCH
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("td_epoch", b.tdr), "vcpu0", "zapper")
    assert h.tdx.td(b.tdr).epoch == epoch
    op.enter()                                      # the entry phase drops the epoch lock
    assert h.tdx.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    op.exit(12)


def test_track_in_flight_vs_vp_enter_busy_no_side_effect():
    h, b = runnable_td()
    tr = h.tdx.begin(Leaf.TDH_MEM_TRACK, b.tdr << PAGE_SHIFT, actor="zapper")
    v = h.tdx.vcpu(b.vcpus[0])
    op = h.tdx.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    assert op.result.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_TD_EPOCH
    assert v.associated_cpu is None and h.tdx.td(b.tdr).refcount == [0, 0]
    assert conflicts(h)[-1]["holder"] == "zapper"
    tr.complete()


def test_tdr_exclusive_page_add_in_flight_vs_aug():
    h, b = runnable_td(finalize=False)
    sept_path(h, b, GPA)
    sept_path(h, b, G2 + (2 << 20))
    src = h.alloc_frame()
    add = h.tdx.begin(Leaf.TDH_MEM_PAGE_ADD, GPA, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT,
                      src << PAGE_SHIFT, actor="init_mem")
    assert add.acquired
    r = h.tdx.tdh_mem_page_aug(b.tdr, G2 + (2 << 20), 0, h.alloc_frame(), actor="prefault")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RDX
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("pamt", b.tdr), "init_mem", "prefault")
    assert add.complete().status == st.TDX_SUCCESS


def test_kot_create_vs_freeid():
    h, b = runnable_td()
    t = h.tdx
    assert t.tdh_vp_flush(b.vcpus[0]).status == st.TDX_VCPU_NOT_ASSOCIATED
    assert t.tdh_mng_vpflushdone(b.tdr).status == st.TDX_SUCCESS
    for pkg in range(h.nr_packages):
        assert t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg)).status == st.TDX_SUCCESS
    tdr2 = h.alloc_frame()
    cr = t.begin(Leaf.TDH_MNG_CREATE, tdr2 << PAGE_SHIFT, h.keyids.alloc(), actor="vm2")
    assert cr.acquired
    r = t.tdh_mng_key_freeid(b.tdr, actor="vm1_teardown")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("kot",), "vm2", "vm1_teardown")
    assert cr.complete().status == st.TDX_SUCCESS
    assert t.tdh_mng_key_freeid(b.tdr).status == st.TDX_SUCCESS


def test_op_state_finalize_in_flight_vs_aug():
    h, b = runnable_td(finalize=False)
    sept_path(h, b, GPA)
    fin = h.tdx.begin(Leaf.TDH_MR_FINALIZE, b.tdr << PAGE_SHIFT, actor="finalizer")
    r = h.tdx.tdh_mem_page_aug(b.tdr, GPA, 0, h.alloc_frame(), actor="prefault")
    # FINALIZE holds the TDR exclusively: the explicit TDR lock fails first
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RDX
    fin.complete()


def test_zero_step_enter_vs_aug_other_gfn():
    """A zero-step-suspected VP.ENTER holds the S-EPT tree exclusively during the entry."""
    h, b = runnable_td(vcpus=2)
    t = h.tdx
    for _ in range(6):
        op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
        op.enter()
        op.exit(48, gpa=GPA, rip=0xFFF0)
    assert t.vcpu(b.vcpus[0]).zero_step
    sept_path(h, b, G2)
    ent = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    assert ent.acquired
    r = t.tdh_mem_page_aug(b.tdr, G2, 0, h.alloc_frame(), actor="vcpu1")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("sept_tree", b.tdr), "vcpu0", "vcpu1")
    ent.enter()                                        # the tree lock is held for the entry only
    assert t.tdh_mem_page_aug(b.tdr, G2, 0, h.alloc_frame(), actor="vcpu1").status == st.TDX_SUCCESS
    ent.exit(48, gpa=GPA, rip=0x2000)                  # another RIP: suspicion cleared
    assert not t.vcpu(b.vcpus[0]).zero_step


def test_no_conflict_after_complete_and_holders_empty():
    h, b = runnable_td()
    mapped(h, b, GPA)
    assert h.tdx.holders == {} and h.tdx.inflight == {}
    assert conflicts(h) == []


def test_sept_remove_busy_while_guest_holds_a_child_entry():
    h, b = runnable_td()
    t = h.tdx
    sept_path(h, b)
    acc = t.begin_accept(b.vcpus[0], GPA, 0, actor="guest0")       # FREE child, lock held
    assert acc.acquired
    assert t.tdh_mem_range_block(b.tdr, GPA, 1).status == st.TDX_SUCCESS
    assert t.tdh_mem_track(b.tdr).status == st.TDX_SUCCESS
    r = t.tdh_mem_sept_remove(b.tdr, GPA, 1, actor="zapper")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    c = conflicts(h)[-1]
    assert (c["resource"], c["holder"], c["contender"]) == (("entry", b.tdr, GPA, 0), "guest0", "zapper")
    assert acc.complete().status == ACCEPT_EPT_VIOLATION
    assert t.tdh_mem_sept_remove(b.tdr, GPA, 1).status == st.TDX_SUCCESS


def test_accept_without_entry_finishes_at_begin():
    h, b = runnable_td()
    op = h.tdx.begin_accept(b.vcpus[0], GPA, 0)
    assert not op.acquired and op.result.status == ACCEPT_EPT_VIOLATION
