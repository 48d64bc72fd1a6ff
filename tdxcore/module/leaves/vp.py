"""vCPU leaves: VP.CREATE, VP.ADDCX, VP.INIT, VP.ENTER (in-flight, with a guest phase), VP.FLUSH.

===========  =================================================================================
leaf         order of checks → status
===========  =================================================================================
VP.CREATE    explicit TDR-S (RDX); keys; TDCS; OPS-S; op state (INITIALIZED); page PAMT-X (RCX)
             → BUSY|RCX; not PT_NDA → PAGE_METADATA_INCORRECT|RCX; max_vcpus reached →
             MAX_VCPUS_EXCEEDED
VP.ADDCX     TDVPR PAMT-X (RDX), not PT_TDVPR → PAGE_METADATA_INCORRECT|RDX; implicit TDR-S
             (BUSY|TDR); keys; op state; vCPU initialized → VCPU_STATE_INCORRECT; all TDCX added
             → TDCX_NUM_INCORRECT; page PAMT-X (RCX); not PT_NDA → PAGE_METADATA_INCORRECT|RCX
VP.INIT      TDVPR-X (RCX); implicit TDR-S; keys; op state; initialized → VCPU_STATE_INCORRECT;
             TDCX missing → TDCX_NUM_INCORRECT; R8 x2APIC id used → X2APIC_ID_NOT_UNIQUE
VP.ENTER     TDVPR-X (RCX); implicit TDR-S; keys; op state (RUNNABLE...); not initialized →
             VCPU_STATE_INCORRECT; associated with another LP → VCPU_ASSOCIATED; TD epoch lock
             shared (BUSY|TD_EPOCH); zero-step suspected → S-EPT tree lock exclusive
             (BUSY|SEPT_TREE)
VP.FLUSH     TDVPR-X (RCX); implicit TDR-S; op state; not associated with this LP →
             VCPU_NOT_ASSOCIATED (KVM treats it as success)
===========  =================================================================================

VP.ENTER phases (SPEC §4.4, §5; tdx-facts §3.4, §3.8): ``begin`` takes the locks above;
``op.enter()`` samples TD_EPOCH into the vCPU, increments ``REFCOUNT[epoch & 1]``, associates the
vCPU with this LP and drops the TD epoch, tree and TDR locks — the vCPU is *in the guest*,
holding its TDVPR and its epoch reference; ``op.exit(reason, gpa=, rip=, level=)`` drops them
and returns ``TDX_SUCCESS | reason`` with RCX = exit qualification, RDX = level, R8 = GPA,
R9 = guest RIP (model layout). A BUSY VP.ENTER has no side effect. The TDR is held shared only
during the entry phase (model choice: the module re-reads it per entry; holding it in the guest
would make VPFLUSHDONE BUSY instead of FLUSHVP_NOT_DONE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, PAGE_SIZE, TDVPS_NR_PAGES, PageType
from tdxcore.module.inflight import Op, fail
from tdxcore.module.td import Td, Vcpu
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    TDX_MAX_VCPUS_EXCEEDED,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TDCX_NUM_INCORRECT,
    TDX_VCPU_ASSOCIATED,
    TDX_VCPU_NOT_ASSOCIATED,
    TDX_VCPU_STATE_INCORRECT,
    TDX_X2APIC_ID_NOT_UNIQUE,
    Leaf,
)

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["VP_HANDLERS"]

Effect = Callable[[], SeamcallResult]
ZERO_PAGE = bytes(PAGE_SIZE)


def _tdvpr(tdx: "TdxModule", op: Op, value: int, operand: int) -> "tuple[Td, Vcpu]":
    """TDVPR operand.

    PA -> PAMT-X lock -> PT_TDVPR (else PAGE_METADATA_INCORRECT|operand), then the owner TD's
    TDR shared (implicit, BUSY|TDR).
    """
    pfn = op.pa(value, operand)
    op.lock_pamt(pfn, True, operand)
    tdr = tdx.vcpu_tdr.get(pfn)
    if tdr is None or tdx.host.pamt.page_type(pfn) != PageType.PT_TDVPR:
        raise fail(TDX_PAGE_METADATA_INCORRECT | operand)
    td = tdx.tds[tdr]
    op.pfn = pfn
    op.implicit_tdr(td)
    return td, td.vcpus[pfn]


def vp_create(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.VP.CREATE: RCX = TDVPR page PA, RDX = TDR."""
    td = op.td_scope(op.rdx, OPERAND_ID_RDX, False)
    page = op.pfn = op.new_page(op.rcx, OPERAND_ID_RCX)
    assert td.params is not None
    if len(td.vcpus) >= td.params.max_vcpus:
        raise fail(TDX_MAX_VCPUS_EXCEEDED)

    def effect() -> SeamcallResult:
        tdx.host.pamt.assign(page, PageType.PT_TDVPR, td.tdr, OPERAND_ID_RCX)
        tdx.host.frame_write(page, 0, ZERO_PAGE, td.hkid)
        td.vcpus[page] = Vcpu(page, td.tdr)
        tdx.vcpu_tdr[page] = td.tdr
        return result(TDX_SUCCESS)
    return effect


def vp_addcx(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.VP.ADDCX: RCX = TDCX page PA, RDX = TDVPR."""
    td, v = _tdvpr(tdx, op, op.rdx, OPERAND_ID_RDX)
    op.keys_configured(td)
    op.op_state_check(td)
    if v.initialized:
        raise fail(TDX_VCPU_STATE_INCORRECT)
    if len(v.tdcx) >= TDVPS_NR_PAGES - 1:
        raise fail(TDX_TDCX_NUM_INCORRECT)
    page = op.new_page(op.rcx, OPERAND_ID_RCX)

    def effect() -> SeamcallResult:
        tdx.host.pamt.assign(page, PageType.PT_TDCX, td.tdr, OPERAND_ID_RCX)
        tdx.host.frame_write(page, 0, ZERO_PAGE, td.hkid)
        v.tdcx.append(page)
        return result(TDX_SUCCESS)
    return effect


def vp_init(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.VP.INIT (v1): RCX = TDVPR, RDX = initial guest RCX, R8 = x2APIC id."""
    td, v = _tdvpr(tdx, op, op.rcx, OPERAND_ID_RCX)
    op.keys_configured(td)
    op.op_state_check(td)
    if v.initialized:
        raise fail(TDX_VCPU_STATE_INCORRECT)
    if len(v.tdcx) != TDVPS_NR_PAGES - 1:
        raise fail(TDX_TDCX_NUM_INCORRECT)
    x2apic = op.r8
    if any(o.initialized and o.x2apic_id == x2apic for o in td.vcpus.values()):
        raise fail(TDX_X2APIC_ID_NOT_UNIQUE)

    def effect() -> SeamcallResult:
        v.initialized = True
        v.x2apic_id = x2apic
        v.initial_rcx = op.rdx
        return result(TDX_SUCCESS)
    return effect


def vp_enter(tdx: "TdxModule", op: Op) -> Callable[[], None]:
    """TDH.VP.ENTER: RCX = TDVPR. Returns the entry phase; see the module docstring."""
    td, v = _tdvpr(tdx, op, op.rcx, OPERAND_ID_RCX)
    op.keys_configured(td)
    op.op_state_check(td)
    if not v.initialized:
        raise fail(TDX_VCPU_STATE_INCORRECT)
    if v.associated_cpu is not None and v.associated_cpu != op.cpu:
        raise fail(TDX_VCPU_ASSOCIATED)
    op.lock_busy(("td_epoch", td.tdr), td.epoch_lock, False)
    zero_step = v.zero_step
    if zero_step:
        op.lock_busy(("sept_tree", td.tdr), td.sept_lock, True)

    def enter() -> None:
        v.epoch = td.epoch
        td.refcount[td.epoch & 1] += 1
        v.in_guest = True
        v.actor = op.actor
        if v.associated_cpu is None:
            v.associated_cpu = op.cpu
            td.num_assoc += 1
        op.release(("td_epoch", td.tdr))
        if zero_step:
            op.release(("sept_tree", td.tdr))
            tdx.host.count("nr_zero_step_entries")
        op.release(("pamt", td.tdr))
        tdx.host.events.emit("td_enter", op.actor, int(op.leaf), op.cpu, v.tdvpr, td.epoch, int(zero_step))

    def exit_(reason: int, gpa: int, rip: Optional[int], level: int, qual: int,
              injected_event: bool) -> SeamcallResult:
        assert v.epoch is not None
        tdx.host.events.emit("td_exit", op.actor, int(op.leaf), op.cpu, v.tdvpr, v.epoch, reason,
                             gpa >> 12 if reason == EXIT_REASON_EPT_VIOLATION else None)
        td.refcount[v.epoch & 1] -= 1
        v.in_guest = False
        v.epoch = None
        v.actor = None
        # zero-step counts S-EPT violations only: a shared-GPA EPT violation is the shared EPT's
        shared = td.sept is not None and bool(gpa & td.sept.shared_bit)
        v.note_exit(reason, None if shared else rip, injected_event)
        return result(TDX_SUCCESS | (reason & 0xFFFF), qual, level, gpa, 0 if rip is None else rip)

    op._enter = enter
    op._exit = exit_
    return enter


def vp_flush(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.VP.FLUSH: RCX = TDVPR; disassociates the vCPU from this LP."""
    td, v = _tdvpr(tdx, op, op.rcx, OPERAND_ID_RCX)
    op.op_state_check(td)
    if v.associated_cpu is None or v.associated_cpu != op.cpu:
        raise fail(TDX_VCPU_NOT_ASSOCIATED)

    def effect() -> SeamcallResult:
        v.associated_cpu = None
        td.num_assoc -= 1
        return result(TDX_SUCCESS)
    return effect


VP_HANDLERS: Dict[Leaf, Callable[["TdxModule", Op], Any]] = {
    Leaf.TDH_VP_CREATE: vp_create,
    Leaf.TDH_VP_ADDCX: vp_addcx,
    Leaf.TDH_VP_INIT: vp_init,
    Leaf.TDH_VP_ENTER: vp_enter,
    Leaf.TDH_VP_FLUSH: vp_flush,
}

