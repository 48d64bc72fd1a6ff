"""The guest's TDG.MEM.PAGE.ACCEPT (TDCALL leaf 6) as an in-flight op.

The guest takes the S-EPT entry lock exclusively *without* host priority (``host=False``): while
a host SEAMCALL that lost that lock has set the entry's host-priority bit, the guest gets
``TDX_OPERAND_BUSY_HOST_PRIORITY|RCX`` without taking it; the host's next try succeeds and
clears the bit (anchors A19 corrected; SPEC §4.4). It takes no tree lock. A missing entry (walk
failure) is not a lock failure: the core answers at once (the op finishes at begin) with the
EPT-violation outcome (``TDX_SUCCESS | ACCEPT_EPT_VIOLATION`` with the accept level), as for a
FREE entry. Results are the
core's ``SeptTree.page_accept`` (SPEC §4.2): RCX = entry, RDX = level_state. On success the
module initializes the page to zeros under the TD's HKID.

Model choices: the call names the vCPU by its TDVPR frame; the model does not require the vCPU to
be in the guest (a test may drive ACCEPT directly), but requires an initialized vCPU of a TD in
KEYS_CONFIGURED lifecycle and RUNNABLE op state (else ``TdxValueError``: a guest cannot run then).
Input register: RCX = GPA | level (bits 2:0), the TDCALL's operand; bad alignment / reserved bits /
level > 2 → ``OPERAND_INVALID|RCX``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, SEPT_PFN_MASK
from tdxcore.errors import TdxValueError, check_int
from tdxcore.module.inflight import LeafFail, Op, decode_gpa_level, fail
from tdxcore.module.td import TdLifecycle
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import OPERAND_ID_RCX, TDX_OPERAND_INVALID, TDX_SUCCESS, OpState, TdcallLeaf  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["begin_accept"]

_ACCEPT_MAX_LEVEL = 2
_ZERO_PAGE = bytes(PAGE_SIZE)


def begin_accept(tdx: "TdxModule", tdvpr: int, rcx: int, cpu: Optional[int], actor: str) -> Op:
    """Begin the guest's ACCEPT of ``rcx`` = GPA|level on vCPU ``tdvpr``; return the :class:`Op`."""
    p = check_int("tdvpr", tdvpr, 0, tdx.host.nr_frames)
    r = check_int("rcx", rcx, 0, 1 << 64)
    if not isinstance(actor, str):
        msg = f"actor={actor!r} must be a str"
        raise TdxValueError(msg, name="actor", value=actor)
    with tdx.lock:
        c = tdx._check_cpu(cpu)
        tdr = tdx.vcpu_tdr.get(p)
        if tdr is None:
            msg = f"tdvpr={p:#x} is not a vCPU of any TD (a TDCALL comes from a vCPU)"
            raise TdxValueError(msg, name="tdvpr", value=tdvpr)
        td = tdx.tds[tdr]
        if (td.lifecycle != TdLifecycle.KEYS_CONFIGURED or td.op_state != OpState.RUNNABLE
                or not td.vcpus[p].initialized):
            msg = f"tdvpr={p:#x}: the TD is not running ({td.lifecycle.name}, {td.op_state.name})"
            raise TdxValueError(msg, name="tdvpr", value=tdvpr)
        op = Op(tdx, TdcallLeaf.TDG_MEM_PAGE_ACCEPT, (r, 0, 0, 0, 0, 0), c, actor)
        op.gfn = (r & ~0xFFF) >> PAGE_SHIFT
        op.pfn = p
        tdx.host.events.emit("tdcall_begin", actor, int(op.leaf), c, op.regs, op.gfn, op.pfn)
        tdx.host.count("nr_tdcalls")
        inj = tdx._injected(op.leaf, op.regs, c, actor)
        if inj is not None:
            op._finish(SeamcallResult(inj))
            return op
        try:
            gpa, level = decode_gpa_level(r)
            if level > _ACCEPT_MAX_LEVEL:
                raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
            locked = op.lock_entry(td, gpa, level, host=False, tolerate_walk=True)
        except LeafFail as f:
            op._release_all()
            op._finish(f.res)
            return op

        def effect() -> SeamcallResult:
            assert td.sept is not None
            st, e, ls = td.sept.page_accept(gpa, level)
            if st == TDX_SUCCESS:
                pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT
                for k in range(1 << (9 * level)):
                    tdx.host.frame_write(pfn + k, 0, _ZERO_PAGE, td.hkid)
            return result(st, e, ls)
        if not locked:          # no entry to lock: the core's outcome now, nothing stays in flight
            op._finish(effect())
            return op
        op._effect = effect
        op.acquired = True
        tdx.inflight[op.id] = op
        return op


