"""S-EPT and measurement leaves: SEPT.ADD, PAGE.ADD, MR.EXTEND/FINALIZE, AUG, BLOCK, UNBLOCK, TRACK, REMOVEs.

Locks, in order (tdx-facts §2.3 corrected; anchors §2.3 lock table). "prologue" = GPA|level
decode (OPERAND_INVALID|RCX), explicit TDR (RDX; PAMT lock, PT_TDR else
PAGE_METADATA_INCORRECT|RDX), keys (TD_KEYS_NOT_CONFIGURED / LIFECYCLE_STATE_INCORRECT), TDCS
(TDCS_NOT_ALLOCATED), op-state lock (BUSY|OP_STATE) and the op-state legality
(OP_STATE_INCORRECT):

============  =====================================================================
leaf          locks after the prologue (TDR mode in brackets)
============  =====================================================================
SEPT.ADD      [TDR-S] tree S (BUSY|SEPT_TREE); entry (BUSY|RCX); new page PAMT-X (BUSY|R8)
PAGE.ADD      [TDR-X] tree S; entry; target PAMT-X (R8); R9 = source page PA
MR.EXTEND     [TDR-X] tree S; the 4K entry holding the chunk must be MAPPED
MR.FINALIZE   [TDR-X, OPS-X] (no S-EPT locks)
PAGE.AUG      [TDR-S] tree S; entry; page PAMT-X (R8)
RANGE.BLOCK   [TDR-S] tree X; entry
RANGE.UNBLOCK [TDR-S] tree X; entry
TRACK         [TDR-S in RCX] TD epoch X (BUSY|TD_EPOCH); REFCOUNT[(epoch-1)&1] ≠ 0 →
              PREVIOUS_TLB_EPOCH_BUSY (logged as a lock_conflict on ("td_epoch_refcount",
              tdr, parity) naming a vCPU still in the guest from the previous epoch)
PAGE.REMOVE   [TDR-S] tree S; entry; the mapped page PAMT-X (BUSY|RCX)
SEPT.REMOVE   [TDR-S] tree X; entry; a child entry locked by an in-flight op (the guest's
              ACCEPT takes no tree lock) → BUSY|RCX (model guard); the child S-EPT page
              PAMT-X (BUSY|RCX)
============  =====================================================================

A walk failure found while taking the entry lock ends the leaf with ``EPT_WALK_FAILED|RCX`` and
the core's extended info (RCX = entry, RDX = level_state). The entry-state, target-PAMT-type and
TLB-tracking checks are the S-EPT core's (``SeptTree``, SPEC §4.2) and run when the op completes:
under the held tree/entry/page locks nothing they read can change in between, and the core checks
before it modifies, so a failure there still has no effect. Outputs: RCX = entry, RDX =
level_state (the core's). S-EPT ops pass ``td_epoch``, ``refcount_prev`` =
REFCOUNT[(epoch-1)&1] and ``tracking_required`` = ``opf_tlb_tracking_required[op_state]``.
Measurement: PAGE.ADD extends the MRTD with the GPA, MR.EXTEND with the GPA and the 256 bytes
read under the TD's HKID (SHA-384 over tagged records; a model of the module's MRTD).
A 2M AUG locks the PAMT entry of its first 4K frame only (the core checks all 512 frames).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

from tdxcore.constants import MR_EXTEND_CHUNK, PAGE_SHIFT, PAGE_SIZE, SEPT_PFN_MASK, SEPT_STATE_BITS
from tdxcore.module.inflight import Op, decode_gpa_level, fail
from tdxcore.module.td import Td
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_R8,
    OPERAND_ID_R9,
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    OPERAND_ID_TD_EPOCH,
    SEPT_STATE_FLAGS,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_PREVIOUS_TLB_EPOCH_BUSY,
    TDX_SUCCESS,
    Leaf,
    OpState,
    SeptState,
)

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["MEM_HANDLERS", "entry_state"]

Effect = Callable[[], SeamcallResult]
ZERO_PAGE = bytes(PAGE_SIZE)


def entry_state(entry: int) -> SeptState:
    """Decode an S-EPT entry's state (module encoding from the entry bits, constants.SEPT_STATE_BITS)."""
    enc = 0
    for i, b in enumerate(SEPT_STATE_BITS):
        enc |= ((entry >> b) & 1) << i
    return SeptState(enc)


def _prologue(op: Op, tdr_exclusive: bool, tree_exclusive: bool, lo: int = 0,
              hi: int = 4) -> Tuple[Td, int, int]:
    gpa, level = decode_gpa_level(op.rcx)
    if not lo <= level <= hi:          # the leaf's level range, checked with the operand
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    op.gfn = gpa >> PAGE_SHIFT
    td = op.td_scope(op.rdx, OPERAND_ID_RDX, tdr_exclusive)
    op.lock_busy(("sept_tree", td.tdr), td.sept_lock, tree_exclusive)
    op.lock_entry(td, gpa, level)
    return td, gpa, level


def _sept(r: Tuple[int, int, int]) -> SeamcallResult:
    return result(r[0], r[1], r[2])


def _mapped_pfn(td: Td, gpa: int, level: int, kind: str) -> int:
    """Return the frame the entry points to when it is of ``kind`` ("leaf"/"non-leaf"), else -1."""
    assert td.sept is not None
    st, e, _ = td.sept.walk(gpa, level)
    if st != TDX_SUCCESS or SEPT_STATE_FLAGS[int(entry_state(e))]["kind"] != kind:
        return -1
    return (e & SEPT_PFN_MASK) >> PAGE_SHIFT


def sept_add(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.SEPT.ADD: RCX = GPA|level, RDX = TDR, R8 = new S-EPT page."""
    td, gpa, level = _prologue(op, False, False, lo=1)
    page = op.pfn = op.pa(op.r8, OPERAND_ID_R8)
    op.lock_pamt(page, True, OPERAND_ID_R8)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        r = td.sept.sept_add(gpa, level, page)
        if r[0] == TDX_SUCCESS:
            tdx.host.frame_write(page, 0, ZERO_PAGE, td.hkid)
        return _sept(r)
    return effect


def page_add(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.PAGE.ADD: RCX = GPA (4K), RDX = TDR, R8 = target page, R9 = source page."""
    td, gpa, level = _prologue(op, True, False, hi=0)
    page = op.pfn = op.pa(op.r8, OPERAND_ID_R8)
    src = op.pa(op.r9, OPERAND_ID_R9)
    op.lock_pamt(page, True, OPERAND_ID_R8)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        r = td.sept.page_add(gpa, 0, page)
        if r[0] == TDX_SUCCESS:
            data = tdx.host.frame_read(src, 0, PAGE_SIZE, 0)
            tdx.host.frame_write(page, 0, data, td.hkid)
            td.measure(b"MEM.PAGE.ADD", struct.pack("<Q", gpa))
        return _sept(r)
    return effect


def mr_extend(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MR.EXTEND: RCX = GPA of a 256-byte chunk, RDX = TDR."""
    gpa = op.rcx
    op.gfn = (gpa & ((1 << 52) - 1)) >> PAGE_SHIFT     # bits 51:12, as the event scanner pairs it
    if gpa % MR_EXTEND_CHUNK:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    td = op.td_scope(op.rdx, OPERAND_ID_RDX, True)
    op.lock_busy(("sept_tree", td.tdr), td.sept_lock, False)
    assert td.sept is not None
    page_gpa = gpa & ~(PAGE_SIZE - 1)
    if gpa >> td.sept.shared_bit:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    st, e, ls = td.sept.walk(page_gpa, 0)
    if st != TDX_SUCCESS:
        raise fail(st, e, ls)
    if entry_state(e) != SeptState["MAPPED"]:
        raise fail(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, ls)
    pfn = op.pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT

    def effect() -> SeamcallResult:
        data = tdx.host.frame_read(pfn, gpa - page_gpa, MR_EXTEND_CHUNK, td.hkid)
        td.measure(b"MR.EXTEND", struct.pack("<Q", gpa) + data)
        return result(TDX_SUCCESS)
    return effect


def mr_finalize(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MR.FINALIZE: RCX = TDR; op state -> RUNNABLE, MRTD frozen."""
    td = op.td_scope(op.rcx, OPERAND_ID_RCX, True, ops_exclusive=True)

    def effect() -> SeamcallResult:
        td.mrtd = td.mrtd_now()
        td.op_state = OpState.RUNNABLE
        return result(TDX_SUCCESS)
    return effect


def page_aug(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.PAGE.AUG: RCX = GPA|level (0, 1), RDX = TDR, R8 = page."""
    td, gpa, level = _prologue(op, False, False, hi=1)
    page = op.pfn = op.pa(op.r8, OPERAND_ID_R8)
    op.lock_pamt(page, True, OPERAND_ID_R8)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        return _sept(td.sept.page_aug(gpa, level, page))
    return effect


def range_block(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.RANGE.BLOCK: RCX = GPA|level, RDX = TDR; BEPOCH := TD_EPOCH after blocking."""
    td, gpa, level = _prologue(op, False, True)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        return _sept(td.sept.range_block(gpa, level, td.epoch))
    return effect


def range_unblock(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.RANGE.UNBLOCK: RCX = GPA|level, RDX = TDR (needs a tracked BEPOCH)."""
    td, gpa, level = _prologue(op, False, True)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        return _sept(td.sept.range_unblock(gpa, level, td.epoch, td.refcount_prev, td.tracking_required))
    return effect


def mem_track(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.TRACK: RCX = TDR; TD_EPOCH += 1 unless a vCPU of epoch-1 is in the guest."""
    td = op.td_scope(op.rcx, OPERAND_ID_RCX, False)
    op.pfn = td.tdr
    op.lock_busy(("td_epoch", td.tdr), td.epoch_lock, True)
    if td.track_busy():
        prev = td.epoch - 1
        holder = next((v.actor for _, v in sorted(td.vcpus.items())
                       if v.in_guest and v.epoch is not None and (v.epoch & 1) == (prev & 1)), None)
        tdx.host.count("nr_lock_conflicts")
        tdx.host.events.emit("lock_conflict", op.actor, ("td_epoch_refcount", td.tdr, prev & 1),
                             OPERAND_ID_TD_EPOCH, holder, op.actor, int(op.leaf), None, td.tdr)
        raise fail(TDX_PREVIOUS_TLB_EPOCH_BUSY)

    def effect() -> SeamcallResult:
        td.epoch += 1
        return result(TDX_SUCCESS)
    return effect


def page_remove(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.PAGE.REMOVE: RCX = GPA|level (0..2), RDX = TDR."""
    td, gpa, level = _prologue(op, False, False, hi=2)
    pfn = _mapped_pfn(td, gpa, level, "leaf")
    if pfn >= 0:
        op.pfn = pfn
        op.lock_pamt(pfn, True, OPERAND_ID_RCX)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        return _sept(td.sept.page_remove(gpa, level, td.epoch, td.refcount_prev, td.tracking_required))
    return effect


def sept_remove(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MEM.SEPT.REMOVE: RCX = GPA|level (>= 1), RDX = TDR."""
    td, gpa, level = _prologue(op, False, True, lo=1)
    # Model guard: a child entry locked by an in-flight op (the guest's ACCEPT takes no tree lock)
    # makes SEPT.REMOVE BUSY|RCX rather than free the table under that lock.
    span = 1 << (12 + 9 * level)
    for key in list(tdx.holders):
        if key[0] == "entry" and key[1] == td.tdr and key[3] == level - 1 and gpa <= key[2] < gpa + span:
            op._take(key, TDX_OPERAND_BUSY | OPERAND_ID_RCX, lambda: None)
    pfn = _mapped_pfn(td, gpa, level, "non-leaf")
    if pfn >= 0:
        op.pfn = pfn
        op.lock_pamt(pfn, True, OPERAND_ID_RCX)

    def effect() -> SeamcallResult:
        assert td.sept is not None
        return _sept(td.sept.sept_remove(gpa, level, td.epoch, td.refcount_prev, td.tracking_required))
    return effect


MEM_HANDLERS: Dict[Leaf, Callable[["TdxModule", Op], Any]] = {
    Leaf.TDH_MEM_SEPT_ADD: sept_add,
    Leaf.TDH_MEM_PAGE_ADD: page_add,
    Leaf.TDH_MR_EXTEND: mr_extend,
    Leaf.TDH_MR_FINALIZE: mr_finalize,
    Leaf.TDH_MEM_PAGE_AUG: page_aug,
    Leaf.TDH_MEM_RANGE_BLOCK: range_block,
    Leaf.TDH_MEM_RANGE_UNBLOCK: range_unblock,
    Leaf.TDH_MEM_TRACK: mem_track,
    Leaf.TDH_MEM_PAGE_REMOVE: page_remove,
    Leaf.TDH_MEM_SEPT_REMOVE: sept_remove,
}
