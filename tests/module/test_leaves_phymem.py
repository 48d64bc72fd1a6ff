"""PHYMEM.CACHE.WB / PAGE.RECLAIM / PAGE.WBINVD, and a full TD build + run + teardown through the
module API ending with every frame back to PT_NDA (tdx-facts §2.3, §5.7; anchors §2.3).
"""

from __future__ import annotations

from tdxcore import status as st
from tdxcore.constants import (
    ACCEPT_EPT_VIOLATION,
    EXIT_REASON_EPT_VIOLATION,
    PAGE_SHIFT,
    PAMT_NO_OWNER,
    PageType,
)
from tdxcore.module.kot import KotState
from tdxcore.module.td import TdParams, add_sept_path, build_td
from tdxcore.status import Leaf
from tests.scenarios import GPA, mapped, new_host, runnable_td

S = st.TDX_SUCCESS


def _blocked(h, b):
    t = h.tdx
    for v in b.vcpus:
        t.tdh_vp_flush(v)
    assert t.tdh_mng_vpflushdone(b.tdr).status == S


def test_cache_wb_no_hkid_and_bad_rcx():
    h = new_host()
    assert h.tdx.tdh_phymem_cache_wb().status == st.TDX_NO_HKID_READY_TO_WBCACHE
    assert h.tdx.seamcall(Leaf.TDH_PHYMEM_CACHE_WB, 2).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert h.tdx.tdh_phymem_cache_wb(resume=True).status == st.TDX_WBCACHE_RESUME_ERROR


def test_cache_wb_interrupted_then_resumed_per_package():
    h, b = runnable_td()
    t = h.tdx
    _blocked(h, b)
    t.pending_interrupt(0, 2)
    assert t.tdh_phymem_cache_wb(cpu=0).status == st.TDX_INTERRUPTED_RESUMABLE
    assert t.tdh_phymem_cache_wb(resume=True, cpu=1).status == st.TDX_INTERRUPTED_RESUMABLE
    assert t.kot.wbinvd_bitmap[b.hkid] == 0b11
    assert t.tdh_phymem_cache_wb(resume=True, cpu=0).status == S
    assert t.kot.wbinvd_bitmap[b.hkid] == 0b10
    assert t.tdh_phymem_cache_wb(resume=True, cpu=0).status == st.TDX_WBCACHE_RESUME_ERROR
    assert t.tdh_phymem_cache_wb(cpu=3).status == S
    assert t.kot.wbinvd_bitmap[b.hkid] == 0
    assert t.tdh_mng_key_freeid(b.tdr).status == S


def test_cache_wb_busy_on_same_package():
    h, b = runnable_td()
    _blocked(h, b)
    op = h.tdx.begin(Leaf.TDH_PHYMEM_CACHE_WB, 0, cpu=0, actor="cpu0")
    assert op.acquired
    assert h.tdx.tdh_phymem_cache_wb(cpu=1).status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_WBCACHE
    assert h.tdx.tdh_phymem_cache_wb(cpu=2).status == S             # other package
    op.complete()


def test_reclaim_failures():
    h, b = runnable_td()
    t = h.tdx
    free = h.alloc_frame()
    assert t.tdh_phymem_page_reclaim(free).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    assert (t.seamcall(Leaf.TDH_PHYMEM_PAGE_RECLAIM, (free << 12) | 8).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)
    assert (t.tdh_phymem_page_reclaim(h.nr_frames).status
            == st.TDX_OPERAND_ADDR_RANGE_ERROR | st.OPERAND_ID_RCX)
    assert t.tdh_phymem_page_reclaim(b.tdcs[0]).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    assert t.tdh_phymem_page_reclaim(b.tdr).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    _blocked(h, b)
    for pkg in range(h.nr_packages):
        t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg))
    t.tdh_mng_key_freeid(b.tdr)
    assert t.tdh_phymem_page_reclaim(b.tdr).status == st.TDX_TD_ASSOCIATED_PAGES_EXIST
    r = t.tdh_phymem_page_reclaim(b.tdcs[0])
    assert (r.status, r.rcx, r.rdx, r.r8) == (S, PageType.PT_TDCX, b.tdr, 0)


def test_wbinvd_operands():
    h, b = runnable_td()
    t = h.tdx
    p = h.alloc_frame()
    assert t.tdh_phymem_page_wbinvd(p, b.hkid).status == S
    assert (t.tdh_phymem_page_wbinvd(p, 1).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)     # MKTME KeyID
    assert (t.tdh_phymem_page_wbinvd(h.nr_frames, b.hkid).status
            == st.TDX_OPERAND_ADDR_RANGE_ERROR | st.OPERAND_ID_RCX)


def test_full_td_build_run_teardown_every_frame_back_to_nda():
    h = new_host()
    t = h.tdx
    free0 = h.free_frames
    b = build_td(h, vcpus=2, params=TdParams(max_vcpus=2), finalize=False)
    # initial memory: PAGE.ADD + MR.EXTEND of 16 chunks
    septs = add_sept_path(h, b.tdr, GPA, 1)
    src = h.alloc_frame()
    h.frame_write(src, 0, b"\x5A" * 4096, 0)
    added = h.alloc_frame()
    assert t.tdh_mem_page_add(b.tdr, GPA, added, src).status == S
    for off in range(0, 4096, 256):
        assert t.tdh_mr_extend(b.tdr, GPA + off).status == S
    assert t.tdh_mr_finalize(b.tdr).status == S
    # run: vCPU0 faults on a private GPA, the host AUGs, the guest accepts
    g = GPA + 0x1000
    op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()
    assert t.tdg_mem_page_accept(b.vcpus[0], g, 0).status == ACCEPT_EPT_VIOLATION
    assert op.exit(EXIT_REASON_EPT_VIOLATION, gpa=g, rip=0x1000).status == EXIT_REASON_EPT_VIOLATION
    augd = h.alloc_frame()
    assert t.tdh_mem_page_aug(b.tdr, g, 0, augd).status == S
    op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()
    assert t.tdg_mem_page_accept(b.vcpus[0], g, 0).status == S
    op.exit(12)
    op1 = t.vp_enter(b.vcpus[1], cpu=2, actor="vcpu1")
    op1.complete()
    # zap the AUGed page: BLOCK, TRACK, REMOVE, WBINVD
    assert t.tdh_mem_range_block(b.tdr, g, 0).status == S
    assert t.tdh_mem_track(b.tdr).status == S
    assert t.tdh_mem_page_remove(b.tdr, g, 0).status == S
    assert t.tdh_phymem_page_wbinvd(augd, b.hkid).status == S
    # teardown: VP.FLUSH on the associated LP, VPFLUSHDONE, CACHE.WB per package, FREEID
    assert t.tdh_vp_flush(b.vcpus[0], cpu=0).status == S
    assert t.tdh_vp_flush(b.vcpus[1], cpu=2).status == S
    assert t.tdh_mng_vpflushdone(b.tdr).status == S
    for pkg in range(h.nr_packages):
        assert t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg)).status == S
    assert t.tdh_mng_key_freeid(b.tdr).status == S
    h.keyids.free(b.hkid)
    # reclaim every page, TDR last
    children = [added] + septs[::-1] + [p for v in b.vcpus for p in b.tdcx[v]] + b.vcpus + b.tdcs
    for p in children:
        r = t.tdh_phymem_page_reclaim(p)
        assert r.status == S and r.rdx == b.tdr, (p, r)
        assert t.tdh_phymem_page_wbinvd(p, b.hkid).status == S
    assert h.pamt.child_count(b.tdr) == 0
    r = t.tdh_phymem_page_reclaim(b.tdr)
    assert (r.status, r.rcx, r.rdx) == (S, PageType.PT_TDR, PAMT_NO_OWNER)
    assert t.tdh_phymem_page_wbinvd(b.tdr, h.keyids.global_keyid).status == S
    assert b.tdr not in t.tds and t.vcpu_tdr == {} and t.kot.state[b.hkid] == KotState.FREE
    used = children + [b.tdr, augd]
    assert all(h.pamt.page_type(p) == PageType.PT_NDA for p in used)
    for p in used + [src, b.td_params_pa >> PAGE_SHIFT]:
        h.free_frame(p)
    assert h.free_frames == free0
    assert h.pamt.nr_assigned(PageType.PT_REG) == h.pamt.nr_assigned(PageType.PT_TDR) == 0
    assert t.holders == {} and t.inflight == {}


def test_reclaim_mapped_private_page_after_teardown():
    h, b = runnable_td()
    t = h.tdx
    p = mapped(h, b)
    _blocked(h, b)
    for pkg in range(h.nr_packages):
        t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg))
    t.tdh_mng_key_freeid(b.tdr)
    r = t.tdh_phymem_page_reclaim(p)
    assert (r.status, r.rcx, r.rdx) == (S, PageType.PT_REG, b.tdr)


def test_cache_wb_kot_shared_vs_create_exclusive():
    h, b = runnable_td()
    _blocked(h, b)
    cr = h.tdx.begin(Leaf.TDH_MNG_CREATE, h.alloc_frame() << PAGE_SHIFT, h.keyids.alloc(), actor="vm2")
    r = h.tdx.tdh_phymem_cache_wb(cpu=0, actor="teardown")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT
    assert h.tdx.holders.get(("wbcache", 0)) is None          # its WBCACHE lock was released
    cr.complete()
    assert h.tdx.tdh_phymem_cache_wb(cpu=0).status == S


def test_reclaim_child_busy_on_implicit_tdr():
    h, b = runnable_td()
    t = h.tdx
    _blocked(h, b)
    for pkg in range(h.nr_packages):
        t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg))
    t.tdh_mng_key_freeid(b.tdr)
    holder = t.begin(Leaf.TDH_PHYMEM_PAGE_RECLAIM, b.tdr << PAGE_SHIFT, actor="a")   # TDR-X, then fails
    assert not holder.acquired and holder.result.status == st.TDX_TD_ASSOCIATED_PAGES_EXIST
    wb = t.begin(Leaf.TDH_PHYMEM_PAGE_WBINVD, b.tdr << PAGE_SHIFT | (b.hkid << 46), actor="a")
    assert wb.acquired                                            # holds the TDR's PAMT lock shared
    assert t.tdh_phymem_page_reclaim(b.tdcs[0], actor="b").status == S       # shared + shared
    x = t.begin(Leaf.TDH_MNG_KEY_FREEID, b.tdr << PAGE_SHIFT, actor="c")
    assert x.result.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    wb.complete()


def test_reclaim_child_busy_tdr_operand_when_tdr_locked_exclusively():
    h, b = runnable_td()
    t = h.tdx
    _blocked(h, b)
    for pkg in range(h.nr_packages):
        t.tdh_phymem_cache_wb(cpu=h.first_online_cpu(pkg))
    t.tdh_mng_key_freeid(b.tdr)
    assert h.pamt.try_lock(b.tdr, True, 0) == S          # another LP holds the TDR exclusively
    r = t.tdh_phymem_page_reclaim(b.tdcs[0], actor="reclaimer")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_TDR
    h.pamt.unlock(b.tdr, True)
    assert h.pamt.page_type(b.tdcs[0]) == PageType.PT_TDCX
    assert t.tdh_phymem_page_reclaim(b.tdcs[0]).status == S
