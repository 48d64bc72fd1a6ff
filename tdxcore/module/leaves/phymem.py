"""Physical-memory leaves: PHYMEM.CACHE.WB, PHYMEM.PAGE.RECLAIM, PHYMEM.PAGE.WBINVD.

==============  ==================================================================================
leaf            order of checks → status
==============  ==================================================================================
CACHE.WB        RCX ∉ {0 start, 1 resume} → OPERAND_INVALID|RCX; this package's WBCACHE lock X
                → BUSY|WBCACHE; KOT-S → BUSY|KOT; start with no FLUSHED KeyID →
                NO_HKID_READY_TO_WBCACHE (warning); resume without a saved point →
                WBCACHE_RESUME_ERROR. Effect: a pending host interrupt on this package
                (``tdx.pending_interrupt(pkg)``) saves the point (the KeyIDs FLUSHED at start) and
                returns INTERRUPTED_RESUMABLE; else clears this package's bit in the wbinvd bitmap
                of every KeyID FLUSHED at start
PAGE.RECLAIM    RCX PA misaligned / KeyID bits → OPERAND_INVALID|RCX; outside memory/TDMRs →
                OPERAND_ADDR_RANGE_ERROR|RCX; page PAMT-X → BUSY|RCX; PT_NDA/PT_RSVD →
                PAGE_METADATA_INCORRECT|RCX; a TDR: lifecycle ≠ TEARDOWN →
                LIFECYCLE_STATE_INCORRECT, CHLDCNT ≠ 0 → TD_ASSOCIATED_PAGES_EXIST; a child page:
                implicit owner TDR-S → BUSY|TDR, owner lifecycle ≠ TEARDOWN →
                LIFECYCLE_STATE_INCORRECT. Effect: PAMT → PT_NDA (owner CHLDCNT − 1); RCX = page
                type, RDX = owner, R8 = size (0: 4K). Reclaiming a TDR drops the module's TD
PAGE.WBINVD     RCX = PA | KeyID << MODEL_MAXPHYADDR: PA misaligned or KeyID not a TDX KeyID →
                OPERAND_INVALID|RCX; outside memory → OPERAND_ADDR_RANGE_ERROR|RCX; page PAMT-S →
                BUSY|RCX. Effect: none the model can observe (no cache model)
==============  ==================================================================================

Sources: tdx-facts §2.3, §5.7; module 1.5 ``tdh_phymem_*.c``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

from tdxcore._busylock import BusyLock
from tdxcore.constants import MODEL_MAXPHYADDR, PAGE_SHIFT, PageType
from tdxcore.module.inflight import Op, fail
from tdxcore.module.td import TdLifecycle
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_WBCACHE,
    TDX_INTERRUPTED_RESUMABLE,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_NO_HKID_READY_TO_WBCACHE,
    TDX_OPERAND_ADDR_RANGE_ERROR,
    TDX_OPERAND_INVALID,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TD_ASSOCIATED_PAGES_EXIST,
    TDX_WBCACHE_RESUME_ERROR,
    Leaf,
)

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["PHYMEM_HANDLERS"]

Effect = Callable[[], SeamcallResult]


def cache_wb(tdx: "TdxModule", op: Op) -> Any:
    """TDH.PHYMEM.CACHE.WB: RCX = 0 (start) or 1 (resume), on a CPU of the package to flush."""
    if op.rcx > 1:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    pkg = tdx.host.package_of(op.cpu)
    lock = tdx.wbcache_locks.get(pkg)
    if lock is None:
        lock = tdx.wbcache_locks[pkg] = BusyLock(OPERAND_ID_WBCACHE)
    op.lock_busy(("wbcache", pkg), lock, True)
    op.lock_busy(("kot",), tdx.kot.lock, False)
    if op.rcx == 0:
        todo = tdx.kot.flushed()
        if not todo:
            return result(TDX_NO_HKID_READY_TO_WBCACHE)
    else:
        saved = tdx.wbcache_resume.get(pkg)
        if saved is None:
            raise fail(TDX_WBCACHE_RESUME_ERROR)
        todo = saved

    def effect() -> SeamcallResult:
        n = tdx._pending_interrupts.get(pkg, 0)
        if n:
            tdx._pending_interrupts[pkg] = n - 1
            tdx.wbcache_resume[pkg] = todo
            return result(TDX_INTERRUPTED_RESUMABLE)
        tdx.wbcache_resume.pop(pkg, None)
        for k in todo:
            if k in tdx.kot.wbinvd_bitmap:
                tdx.kot.wbinvd_bitmap[k] &= ~(1 << pkg)
        return result(TDX_SUCCESS)
    return effect


def page_reclaim(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.PHYMEM.PAGE.RECLAIM: RCX = page PA."""
    pfn = op.pfn = op.pa(op.rcx, OPERAND_ID_RCX)
    op.lock_pamt(pfn, True, OPERAND_ID_RCX)
    pamt = tdx.host.pamt
    ty = pamt.page_type(pfn)
    if ty in (PageType.PT_NDA, PageType.PT_RSVD):
        raise fail(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
    owner = pamt.owner(pfn)
    td = tdx.tds.get(pfn if ty == PageType.PT_TDR else owner)
    if td is None:      # a frame some other PAMT user assigned (not a TD of this module)
        raise fail(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
    if ty == PageType.PT_TDR:
        if td.lifecycle != TdLifecycle.TEARDOWN:
            raise fail(TDX_LIFECYCLE_STATE_INCORRECT)
        if pamt.child_count(pfn):
            raise fail(TDX_TD_ASSOCIATED_PAGES_EXIST)
    else:
        op.implicit_tdr(td)
        if td.lifecycle != TdLifecycle.TEARDOWN:
            raise fail(TDX_LIFECYCLE_STATE_INCORRECT)

    def effect() -> SeamcallResult:
        st = pamt.release(pfn, OPERAND_ID_RCX)
        if st != TDX_SUCCESS:
            return result(st)
        if ty == PageType.PT_TDR:
            del tdx.tds[pfn]
            for v in td.vcpus:
                tdx.vcpu_tdr.pop(v, None)
        elif ty == PageType.PT_TDVPR:
            td.vcpus.pop(pfn, None)
            tdx.vcpu_tdr.pop(pfn, None)
        return result(TDX_SUCCESS, int(ty), owner, 0)
    return effect


def page_wbinvd(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.PHYMEM.PAGE.WBINVD: RCX = page PA with the KeyID above MAXPHYADDR."""
    keyid = op.rcx >> MODEL_MAXPHYADDR
    pa = op.rcx & ((1 << MODEL_MAXPHYADDR) - 1)
    k = tdx.host.keyids
    if pa & 0xFFF or not k.global_keyid <= keyid < k.global_keyid + k.tdx_keyids:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    pfn = op.pfn = pa >> PAGE_SHIFT
    if pfn >= tdx.host.nr_frames:
        raise fail(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    op.lock_pamt(pfn, False, OPERAND_ID_RCX)

    def effect() -> SeamcallResult:
        tdx.host.count("nr_wbinvd_pages")
        return result(TDX_SUCCESS)
    return effect


PHYMEM_HANDLERS: Dict[Leaf, Callable[["TdxModule", Op], Any]] = {
    Leaf.TDH_PHYMEM_CACHE_WB: cache_wb,
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: page_reclaim,
    Leaf.TDH_PHYMEM_PAGE_WBINVD: page_wbinvd,
}
