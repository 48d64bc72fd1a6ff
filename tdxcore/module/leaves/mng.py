"""TD management leaves: MNG.CREATE, KEY.CONFIG, ADDCX, INIT, RD, VPFLUSHDONE, KEY.FREEID.

Each is a begin handler (:mod:`tdxcore.module.inflight`): checks and try-locks in the module's
order, then an effect closure applied by ``op.complete()``. Statuses (first that applies wins):

===============  ==============================================================================
leaf             order of checks → status
===============  ==============================================================================
MNG.CREATE       RDX not a guest HKID → OPERAND_INVALID|RDX; RCX PA bad → OPERAND_INVALID|RCX /
                 OPERAND_ADDR_RANGE_ERROR|RCX; TDR PAMT-X → BUSY|RCX; not PT_NDA →
                 PAGE_METADATA_INCORRECT|RCX; KOT-X → BUSY|KOT; KOT[hkid] ≠ FREE → HKID_NOT_FREE
MNG.KEY.CONFIG   explicit TDR-X (RCX); TD fatal → TD_FATAL; lifecycle ≠ HKID_ASSIGNED →
                 LIFECYCLE_STATE_INCORRECT; this CPU's package done → KEY_CONFIGURED (warning)
MNG.ADDCX        explicit TDR-X (RDX); keys (TD_KEYS_NOT_CONFIGURED / LIFECYCLE_STATE_INCORRECT);
                 op state (OP_STATE_INCORRECT); all TDCS_NR_PAGES added → TDCX_NUM_INCORRECT;
                 page PAMT-X (RCX) → BUSY|RCX; not PT_NDA → PAGE_METADATA_INCORRECT|RCX
MNG.INIT         explicit TDR-X (RCX); keys; TDCS_NOT_ALLOCATED; OPS-X → BUSY|OP_STATE; op state;
                 RDX not a 1024-aligned PA holding TD_PARAMS → OPERAND_INVALID|RDX; then per field
                 OPERAND_INVALID|ATTRIBUTES, |XFAM, |MAX_VCPUS, |EPTP_CONTROLS, |TSC_FREQUENCY
MNG.RD           explicit TDR-S (RCX); keys; TDCS; OPS-S; op state; unknown field →
                 METADATA_FIELD_ID_INCORRECT; R8 = value
MNG.VPFLUSHDONE  explicit TDR-X (RCX); KOT-X → BUSY|KOT; lifecycle ∉ {HKID_ASSIGNED,
                 KEYS_CONFIGURED} → LIFECYCLE_STATE_INCORRECT; TD initialized and a vCPU still
                 associated → FLUSHVP_NOT_DONE
MNG.KEY.FREEID   explicit TDR-X (RCX); KOT-X; lifecycle ≠ BLOCKED → LIFECYCLE_STATE_INCORRECT;
                 wbinvd bitmap ≠ 0 → WBCACHE_NOT_COMPLETE
===============  ==============================================================================

MNG.RD fields (model ids in ``constants.MNG_RD_FIELD_*``): ATTRIBUTES, XFAM, MAX_VCPUS, NUM_VCPUS,
OP_STATE, TD_EPOCH, TSC_OFFSET (0) and TSC_MULTIPLIER (1 << 48: no scaling) — the last two are
what KVM 6.18 reads after MNG.INIT. The module calls ``host.keyids.note_configured`` when the TD
becomes KEYS_CONFIGURED and ``note_unconfigured`` at KEY.FREEID (for HKIDs the kernel allocated).
Sources: tdx-facts §2.3, §5.2, §5.3; module 1.5 ``tdh_mng_*.c``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

from tdxcore._sept import SeptTree
from tdxcore.constants import (
    MNG_RD_FIELD_ATTRIBUTES,
    MNG_RD_FIELD_MAX_VCPUS,
    MNG_RD_FIELD_NUM_VCPUS,
    MNG_RD_FIELD_OP_STATE,
    MNG_RD_FIELD_TD_EPOCH,
    MNG_RD_FIELD_TSC_MULTIPLIER,
    MNG_RD_FIELD_TSC_OFFSET,
    MNG_RD_FIELD_XFAM,
    PAGE_SIZE,
    PAMT_NO_OWNER,
    TD_ATTRIBUTES_SUPPORTED,
    TD_MAX_VCPUS_LIMIT,
    TD_PARAMS_ALIGN,
    TD_TSC_FREQUENCY_MAX,
    TD_TSC_FREQUENCY_MIN,
    TD_XFAM_FIXED1,
    TD_XFAM_SUPPORTED,
    TDCS_NR_PAGES,
    PageType,
)
from tdxcore.errors import TdxValueError
from tdxcore.module.inflight import Op, fail
from tdxcore.module.kot import KotState
from tdxcore.module.td import Td, TdLifecycle
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_ATTRIBUTES,
    OPERAND_ID_EPTP_CONTROLS,
    OPERAND_ID_MAX_VCPUS,
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    OPERAND_ID_TSC_FREQUENCY,
    OPERAND_ID_XFAM,
    TDX_FLUSHVP_NOT_DONE,
    TDX_HKID_NOT_FREE,
    TDX_KEY_CONFIGURED,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_METADATA_FIELD_ID_INCORRECT,
    TDX_OPERAND_INVALID,
    TDX_SUCCESS,
    TDX_TD_FATAL,
    TDX_TDCX_NUM_INCORRECT,
    TDX_WBCACHE_NOT_COMPLETE,
    Leaf,
    OpState,
)

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["MNG_HANDLERS"]

Effect = Callable[[], SeamcallResult]
ZERO_PAGE = bytes(PAGE_SIZE)
_TSC_MULTIPLIER_ONE = 1 << 48


def mng_create(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MNG.CREATE: RCX = TDR PA, RDX = HKID."""
    hkid = op.rdx
    lo, hi = tdx.kot.guest_range
    if not lo <= hkid < hi:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    tdr = op.pfn = op.new_page(op.rcx, OPERAND_ID_RCX)
    op.lock_busy(("kot",), tdx.kot.lock, True)
    if tdx.kot.state[hkid] != KotState.FREE:
        raise fail(TDX_HKID_NOT_FREE)

    def effect() -> SeamcallResult:
        tdx.host.pamt.assign(tdr, PageType.PT_TDR, PAMT_NO_OWNER, OPERAND_ID_RCX)
        tdx.host.frame_write(tdr, 0, ZERO_PAGE, tdx.host.keyids.global_keyid)
        tdx.kot.state[hkid] = KotState.ASSIGNED
        tdx.tds[tdr] = Td(tdr, hkid)
        return result(TDX_SUCCESS)
    return effect


def mng_key_config(tdx: "TdxModule", op: Op) -> Any:
    """TDH.MNG.KEY.CONFIG: RCX = TDR; programs the HKID on this CPU's package."""
    td = op.explicit_tdr(op.rcx, OPERAND_ID_RCX, True)
    op.pfn = td.tdr
    if td.fatal:
        raise fail(TDX_TD_FATAL)
    if td.lifecycle != TdLifecycle.HKID_ASSIGNED:
        raise fail(TDX_LIFECYCLE_STATE_INCORRECT)
    pkg = tdx.host.package_of(op.cpu)
    if pkg in td.pkg_configured:
        return result(TDX_KEY_CONFIGURED)

    def effect() -> SeamcallResult:
        td.pkg_configured.add(pkg)
        if len(td.pkg_configured) == tdx.host.nr_packages:
            td.lifecycle = TdLifecycle.KEYS_CONFIGURED
            k = tdx.host.keyids
            if td.hkid in k.allocated:
                k.note_configured(td.hkid)
        return result(TDX_SUCCESS)
    return effect


def mng_addcx(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MNG.ADDCX: RCX = TDCS page PA, RDX = TDR."""
    td = op.explicit_tdr(op.rdx, OPERAND_ID_RDX, True)
    op.keys_configured(td)
    op.op_state_check(td)
    if len(td.tdcs) >= TDCS_NR_PAGES:
        raise fail(TDX_TDCX_NUM_INCORRECT)
    page = op.pfn = op.new_page(op.rcx, OPERAND_ID_RCX)

    def effect() -> SeamcallResult:
        tdx.host.pamt.assign(page, PageType.PT_TDCX, td.tdr, OPERAND_ID_RCX)
        tdx.host.frame_write(page, 0, ZERO_PAGE, td.hkid)
        td.tdcs.append(page)
        return result(TDX_SUCCESS)
    return effect


def mng_init(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MNG.INIT: RCX = TDR, RDX = PA of TD_PARAMS (see ``TdxModule.write_td_params``)."""
    td = op.explicit_tdr(op.rcx, OPERAND_ID_RCX, True)
    op.keys_configured(td)
    op.tdcs(td)
    op.lock_busy(("op_state", td.tdr), td.op_state_lock, True)
    op.op_state_check(td)
    pa = op.rdx
    p = tdx.td_params.get(pa)
    if pa % TD_PARAMS_ALIGN or p is None:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    if p.attributes & ~TD_ATTRIBUTES_SUPPORTED:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES)
    if (p.xfam & TD_XFAM_FIXED1) != TD_XFAM_FIXED1 or p.xfam & ~TD_XFAM_SUPPORTED:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_XFAM)
    if not 1 <= p.max_vcpus <= TD_MAX_VCPUS_LIMIT:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_MAX_VCPUS)
    if p.eptp_levels not in (4, 5):
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_EPTP_CONTROLS)
    if not TD_TSC_FREQUENCY_MIN <= p.tsc_frequency <= TD_TSC_FREQUENCY_MAX:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_TSC_FREQUENCY)

    def effect() -> SeamcallResult:
        td.params = p
        td.sept = SeptTree(p.eptp_levels, pamt=tdx.host.pamt, tdr=td.tdr)
        td.init_epoch()
        td.op_state = OpState.INITIALIZED
        return result(TDX_SUCCESS)
    return effect


def mng_rd(tdx: "TdxModule", op: Op) -> SeamcallResult:
    """TDH.MNG.RD: RCX = TDR, RDX = field id; R8 = value (fields in the module docstring)."""
    td = op.td_scope(op.rcx, OPERAND_ID_RCX, False)
    p = td.params
    assert p is not None
    fields = {
        MNG_RD_FIELD_ATTRIBUTES: p.attributes, MNG_RD_FIELD_XFAM: p.xfam,
        MNG_RD_FIELD_MAX_VCPUS: p.max_vcpus, MNG_RD_FIELD_NUM_VCPUS: len(td.vcpus),
        MNG_RD_FIELD_OP_STATE: int(td.op_state), MNG_RD_FIELD_TD_EPOCH: td.epoch,
        MNG_RD_FIELD_TSC_OFFSET: 0, MNG_RD_FIELD_TSC_MULTIPLIER: _TSC_MULTIPLIER_ONE,
    }
    if op.rdx not in fields:
        raise fail(TDX_METADATA_FIELD_ID_INCORRECT)
    return result(TDX_SUCCESS, r8=fields[op.rdx])


def mng_vpflushdone(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MNG.VPFLUSHDONE: RCX = TDR; KOT[hkid] -> FLUSHED, lifecycle -> BLOCKED."""
    td = op.explicit_tdr(op.rcx, OPERAND_ID_RCX, True)
    op.pfn = td.tdr
    op.lock_busy(("kot",), tdx.kot.lock, True)
    if td.lifecycle not in (TdLifecycle.HKID_ASSIGNED, TdLifecycle.KEYS_CONFIGURED):
        raise fail(TDX_LIFECYCLE_STATE_INCORRECT)
    if td.op_state != OpState.UNINITIALIZED and td.num_assoc:
        raise fail(TDX_FLUSHVP_NOT_DONE)

    def effect() -> SeamcallResult:
        tdx.kot.wbinvd_bitmap[td.hkid] = (1 << tdx.host.nr_packages) - 1
        tdx.kot.state[td.hkid] = KotState.FLUSHED
        td.lifecycle = TdLifecycle.BLOCKED
        return result(TDX_SUCCESS)
    return effect


def mng_key_freeid(tdx: "TdxModule", op: Op) -> Effect:
    """TDH.MNG.KEY.FREEID: RCX = TDR; KOT[hkid] -> FREE, lifecycle -> TEARDOWN."""
    td = op.explicit_tdr(op.rcx, OPERAND_ID_RCX, True)
    op.pfn = td.tdr
    op.lock_busy(("kot",), tdx.kot.lock, True)
    if td.lifecycle != TdLifecycle.BLOCKED:
        raise fail(TDX_LIFECYCLE_STATE_INCORRECT)
    if tdx.kot.wbinvd_bitmap.get(td.hkid, 0):
        raise fail(TDX_WBCACHE_NOT_COMPLETE)

    def effect() -> SeamcallResult:
        tdx.kot.wbinvd_bitmap.pop(td.hkid, None)
        tdx.kot.state[td.hkid] = KotState.FREE
        td.lifecycle = TdLifecycle.TEARDOWN
        try:
            tdx.host.keyids.note_unconfigured(td.hkid)
        except TdxValueError:
            pass        # an HKID the kernel never allocated (module driven directly)
        return result(TDX_SUCCESS)
    return effect


MNG_HANDLERS: Dict[Leaf, Callable[["TdxModule", Op], Any]] = {
    Leaf.TDH_MNG_CREATE: mng_create,
    Leaf.TDH_MNG_KEY_CONFIG: mng_key_config,
    Leaf.TDH_MNG_ADDCX: mng_addcx,
    Leaf.TDH_MNG_INIT: mng_init,
    Leaf.TDH_MNG_RD: mng_rd,
    Leaf.TDH_MNG_VPFLUSHDONE: mng_vpflushdone,
    Leaf.TDH_MNG_KEY_FREEID: mng_key_freeid,
}
