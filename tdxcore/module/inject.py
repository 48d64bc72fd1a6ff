"""SEAMCALL/TDCALL status injection (SPEC §3.1 "Injection"; issue 4 item 6).

``host.tdx.inject(leaf, status, count=1, probability=None, match=None)`` arms an
:class:`Injection`; the module asks :meth:`Injector.consult` once per call, before the leaf runs,
and an injected status replaces the leaf's effect (the leaf does nothing and returns that status,
as a failed try-lock or a failed precondition does). Only a status the leaf can really return is
accepted: :data:`LEAF_STATUSES` is the per-leaf table, built from tdx-facts §1.2 (who returns
what), §1.3 (operand ids), §2.3 (per-leaf locks → BUSY operand, preconditions → errors) and §6
(bring-up), and for TDG.MEM.PAGE.ACCEPT from the module's handler (1.5.01
``tdg_mem_page_accept``). Statuses are compared by full value, operand included:
``TDX_OPERAND_BUSY|OPERAND_ID_SEPT_TREE`` is allowed for PAGE.AUG, ``TDX_OPERAND_BUSY|OPERAND_ID_KOT``
is not.

Determinism (STYLE §2.7): the only randomness is the ``probability`` draw, from the
``random.Random`` given to the :class:`Injector` (the module passes ``host.rng("inject")``, a named
child stream of the host seed). One ``rng.random()`` is drawn per *candidate* (an armed injection
of the call's leaf whose ``match`` accepted the call and whose ``probability`` is not None), in add
order, until one fires; so the draws depend only on the calls and the armed injections, never on
the probability values, object ids or hash order.
"""

from __future__ import annotations

import math
import random
import struct
from typing import (
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

from tdxcore.constants import ACCEPT_EPT_VIOLATION, MAX_TDMRS
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_ATTRIBUTES,
    OPERAND_ID_CPUID_CONFIG,
    OPERAND_ID_EPTP_CONTROLS,
    OPERAND_ID_EXEC_CONTROLS,
    OPERAND_ID_IA32_ARCH_CAPABILITIES_CONFIG,
    OPERAND_ID_KET,
    OPERAND_ID_KOT,
    OPERAND_ID_MAX_VCPUS,
    OPERAND_ID_NUM_L2_VMS,
    OPERAND_ID_OP_STATE,
    OPERAND_ID_R8,
    OPERAND_ID_R9,
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    OPERAND_ID_TDCS,
    OPERAND_ID_TDR,
    OPERAND_ID_TSC_FREQUENCY,
    OPERAND_ID_WBCACHE,
    OPERAND_ID_XFAM,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_PAGE_NOT_FREE,
    TDX_EPT_WALK_FAILED,
    TDX_FLUSHVP_NOT_DONE,
    TDX_GPA_RANGE_ALREADY_BLOCKED,
    TDX_GPA_RANGE_NOT_BLOCKED,
    TDX_HKID_NOT_FREE,
    TDX_INTERRUPTED_RESUMABLE,
    TDX_INVALID_PAMT,
    TDX_INVALID_RESERVED_IN_TDMR,
    TDX_INVALID_TDMR,
    TDX_KEY_CONFIGURED,
    TDX_KEY_GENERATION_FAILED,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_MAX_VCPUS_EXCEEDED,
    TDX_METADATA_FIELD_ID_INCORRECT,
    TDX_METADATA_FIELD_NOT_READABLE,
    TDX_NO_HKID_READY_TO_WBCACHE,
    TDX_NON_ORDERED_RESERVED_IN_TDMR,
    TDX_NON_ORDERED_TDMR,
    TDX_NON_RECOVERABLE_TD,
    TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE,
    TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE,
    TDX_NON_RECOVERABLE_VCPU,
    TDX_OP_STATE_INCORRECT,
    TDX_OPERAND_ADDR_RANGE_ERROR,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_PAMT_OVERLAP,
    TDX_PREVIOUS_TLB_EPOCH_BUSY,
    TDX_RND_NO_ENTROPY,
    TDX_SUCCESS,
    TDX_SYS_BUSY,
    TDX_SYS_CONFIG_NOT_PENDING,
    TDX_SYS_INIT_NOT_PENDING,
    TDX_SYS_KEY_CONFIG_NOT_PENDING,
    TDX_SYS_LP_INIT_DONE,
    TDX_SYS_LP_INIT_NOT_PENDING,
    TDX_SYS_NOT_READY,
    TDX_TD_ASSOCIATED_PAGES_EXIST,
    TDX_TD_FATAL,
    TDX_TDCS_NOT_ALLOCATED,
    TDX_TDCX_NUM_INCORRECT,
    TDX_TDMR_ALREADY_INITIALIZED,
    TDX_TLB_TRACKING_NOT_DONE,
    TDX_VCPU_ASSOCIATED,
    TDX_VCPU_NOT_ASSOCIATED,
    TDX_VCPU_STATE_INCORRECT,
    TDX_WBCACHE_NOT_COMPLETE,
    TDX_WBCACHE_RESUME_ERROR,
    TDX_X2APIC_ID_NOT_UNIQUE,
    Leaf,
    TdcallLeaf,
    TdxLevel,
    TdxStatus,
)

__all__ = ["LEAF_STATUSES", "InjectCall", "Injection", "Injector", "LeafKey"]

AnyLeaf = Union[Leaf, TdcallLeaf]
#: ``(is_tdcall, number)``: how the injector keys a leaf (Leaf 6 and TdcallLeaf 6 compare equal).
LeafKey = Tuple[bool, int]
_U64 = 1 << 64


def _key(leaf: AnyLeaf) -> LeafKey:
    return (isinstance(leaf, TdcallLeaf), int(leaf))


# ----------------------------------------------------------------------------------------------
# The per-leaf status table
# ----------------------------------------------------------------------------------------------

def _with(base: int, *operands: int) -> FrozenSet[int]:
    """Return ``base | operand`` for each operand id (a bare ``base`` when none is given)."""
    return frozenset(base | op for op in operands) if operands else frozenset({base})


def _busy(*operands: int) -> FrozenSet[int]:
    return _with(TDX_OPERAND_BUSY, *operands)


def _inv(*operands: int) -> FrozenSet[int]:
    return _with(TDX_OPERAND_INVALID, *operands)


def _range(*operands: int) -> FrozenSet[int]:
    return _with(TDX_OPERAND_ADDR_RANGE_ERROR, *operands)


def _meta(*operands: int) -> FrozenSet[int]:
    return _with(TDX_PAGE_METADATA_INCORRECT, *operands)


def _s(*values: int) -> FrozenSet[int]:
    return frozenset(values)


RCX, RDX, R8, R9 = OPERAND_ID_RCX, OPERAND_ID_RDX, OPERAND_ID_R8, OPERAND_ID_R9
_LEVELS = tuple(int(lv) for lv in (TdxLevel.L4K, TdxLevel.L2M, TdxLevel.L1G))

# Every TD-scope leaf: the dispatcher's gate before SYS_READY (module ``tdx_vmm_dispatcher``).
_TD = _s(TDX_SYS_NOT_READY)
# A leaf whose register ``reg`` names a TDR explicitly (tdx-facts §2.3 "Other rules"): a bad PA
# (alignment, KeyID bits) → OPERAND_INVALID, outside every TDMR → OPERAND_ADDR_RANGE_ERROR, a page
# that is not PT_TDR → PAGE_METADATA_INCORRECT, the TDR's PAMT lock held → BUSY, all with that
# register's operand id; a TD in the wrong lifecycle (e.g. after TEARDOWN) → LIFECYCLE_STATE_INCORRECT.


def _tdr(reg: int) -> FrozenSet[int]:
    return _inv(reg) | _range(reg) | _meta(reg) | _busy(reg) | _s(TDX_LIFECYCLE_STATE_INCORRECT)


# A page operand that must be PT_NDA and is taken PAMT-X (tdx-facts §5.9: every assigning leaf).
def _new_page(reg: int) -> FrozenSet[int]:
    return _inv(reg) | _range(reg) | _meta(reg) | _busy(reg)


# "GPA|level" operand in RCX with the S-EPT walk and the entry lock (tdx-facts §2.1, §2.3): bad
# page info → OPERAND_INVALID|RCX; missing parent → EPT_WALK_FAILED|RCX; state not allowed by the
# leaf's legality row → EPT_ENTRY_STATE_INCORRECT|RCX; entry lock held → BUSY|RCX. Every such leaf
# also checks the TDCS op state (OP_STATE_INCORRECT; OPS lock → BUSY|OP_STATE).
_SEPT_RCX = (_inv(RCX) | _with(TDX_EPT_WALK_FAILED, RCX) | _with(TDX_EPT_ENTRY_STATE_INCORRECT, RCX)
             | _busy(RCX) | _s(TDX_OP_STATE_INCORRECT) | _busy(OPERAND_ID_OP_STATE))

_TD_PARAMS_OPERANDS = (OPERAND_ID_ATTRIBUTES, OPERAND_ID_XFAM, OPERAND_ID_EXEC_CONTROLS,
                       OPERAND_ID_EPTP_CONTROLS, OPERAND_ID_MAX_VCPUS, OPERAND_ID_CPUID_CONFIG,
                       OPERAND_ID_TSC_FREQUENCY, OPERAND_ID_NUM_L2_VMS,
                       OPERAND_ID_IA32_ARCH_CAPABILITIES_CONFIG)

# SEAMCALL rows. (A dict keyed by enum members would merge PAGE.AUG and the guest's ACCEPT: both are
# 6, equal and equally hashed; so the TDCALL rows are kept apart and joined in _LeafTable.)
_SEAMCALL_ROWS: Dict[Leaf, FrozenSet[int]] = {
    # ---- TD management (tdx-facts §2.3) ------------------------------------------------------
    # MNG.CREATE: TDR page PAMT-X (RCX), KOT-X (KOT); HKID out of range → OPERAND_INVALID|RDX;
    # KOT[hkid] not FREE → HKID_NOT_FREE; RNG failure → RND_NO_ENTROPY (§1.2).
    Leaf.TDH_MNG_CREATE: _TD | _new_page(RCX) | _inv(RDX) | _busy(OPERAND_ID_KOT)
    | _s(TDX_HKID_NOT_FREE, TDX_RND_NO_ENTROPY),
    # MNG.KEY.CONFIG: TDR-X (RCX), KET via PCONFIG (BUSY|KET); TD_FATAL; lifecycle; this package
    # already done → KEY_CONFIGURED (warning); key programming → KEY_GENERATION_FAILED.
    Leaf.TDH_MNG_KEY_CONFIG: _TD | _tdr(RCX) | _busy(OPERAND_ID_KET)
    | _s(TDX_TD_FATAL, TDX_KEY_CONFIGURED, TDX_KEY_GENERATION_FAILED),
    # MNG.ADDCX: RCX = new TDCS page (PAMT-X), RDX = TDR (TDR-X); too many pages →
    # TDCX_NUM_INCORRECT; RND_NO_ENTROPY (§1.2).
    Leaf.TDH_MNG_ADDCX: _TD | _new_page(RCX) | _tdr(RDX) | _s(TDX_TDCX_NUM_INCORRECT, TDX_RND_NO_ENTROPY),
    # MNG.INIT: RCX = TDR (TDR-X), RDX = TD_PARAMS PA; TDCS_NOT_ALLOCATED; op state; each
    # TD_PARAMS field → OPERAND_INVALID|(64..72).
    Leaf.TDH_MNG_INIT: _TD | _tdr(RCX) | _inv(RDX) | _range(RDX) | _inv(*_TD_PARAMS_OPERANDS)
    | _s(TDX_TDCS_NOT_ALLOCATED, TDX_OP_STATE_INCORRECT),
    # MNG.RD: RCX = TDR (TDR-S), RDX = field id.
    Leaf.TDH_MNG_RD: _TD | _tdr(RCX) | _s(TDX_TDCS_NOT_ALLOCATED, TDX_METADATA_FIELD_ID_INCORRECT,
                                          TDX_METADATA_FIELD_NOT_READABLE),
    # MNG.VPFLUSHDONE: TDR-X (RCX), KOT-X; vCPUs still associated → FLUSHVP_NOT_DONE.
    Leaf.TDH_MNG_VPFLUSHDONE: _TD | _tdr(RCX) | _busy(OPERAND_ID_KOT) | _s(TDX_FLUSHVP_NOT_DONE),
    # MNG.KEY.FREEID: TDR-X, KOT-X; wbinvd bitmap not clear → WBCACHE_NOT_COMPLETE.
    Leaf.TDH_MNG_KEY_FREEID: _TD | _tdr(RCX) | _busy(OPERAND_ID_KOT) | _s(TDX_WBCACHE_NOT_COMPLETE),
    # ---- vCPU -----------------------------------------------------------------------------------
    # VP.CREATE: RCX = TDVPR page (PAMT-X), RDX = TDR (TDR-S); TD initialized (op state);
    # vCPU count ≤ max_vcpus → MAX_VCPUS_EXCEEDED.
    Leaf.TDH_VP_CREATE: _TD | _new_page(RCX) | _tdr(RDX) | _s(TDX_OP_STATE_INCORRECT, TDX_MAX_VCPUS_EXCEEDED),
    # VP.ADDCX: RCX = TDCX page (PAMT-X), RDX = TDVPR (TDVPR-X); wrong vCPU state / count.
    Leaf.TDH_VP_ADDCX: _TD | _new_page(RCX) | _new_page(RDX)
    | _s(TDX_VCPU_STATE_INCORRECT, TDX_TDCX_NUM_INCORRECT, TDX_LIFECYCLE_STATE_INCORRECT),
    # VP.INIT (v1): RCX = TDVPR (TDVPR-X), implicit TDR-S (BUSY|TDR, §1.3), R8 = x2APIC id;
    # all TDCX added; X2APIC_ID_NOT_UNIQUE.
    Leaf.TDH_VP_INIT: _TD | _new_page(RCX) | _busy(OPERAND_ID_TDR) | _inv(R8)
    | _s(TDX_VCPU_STATE_INCORRECT, TDX_TDCX_NUM_INCORRECT, TDX_X2APIC_ID_NOT_UNIQUE,
         TDX_LIFECYCLE_STATE_INCORRECT, TDX_OP_STATE_INCORRECT),
    # VP.ENTER: TDVPR-X (RCX), TD epoch (BUSY|TD_EPOCH), S-EPT tree under zero-step
    # (BUSY|SEPT_TREE) (§2.3, §3.8); the NON_RECOVERABLE_* statuses (§1.2); associated with
    # another LP → VCPU_ASSOCIATED; TD not RUNNABLE → OP_STATE_INCORRECT.
    Leaf.TDH_VP_ENTER: _TD | _new_page(RCX) | _busy(OPERAND_ID_TD_EPOCH, OPERAND_ID_SEPT_TREE)
    | _s(TDX_NON_RECOVERABLE_VCPU, TDX_NON_RECOVERABLE_TD, TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE,
         TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE, TDX_VCPU_STATE_INCORRECT, TDX_VCPU_ASSOCIATED,
         TDX_OP_STATE_INCORRECT, TDX_LIFECYCLE_STATE_INCORRECT),
    # VP.FLUSH: TDVPR-X (RCX), TDR-S and TDCS-S (implicit: BUSY|TDR, BUSY|TDCS);
    # not associated → VCPU_NOT_ASSOCIATED.
    Leaf.TDH_VP_FLUSH: _TD | _new_page(RCX) | _busy(OPERAND_ID_TDR, OPERAND_ID_TDCS)
    | _s(TDX_VCPU_NOT_ASSOCIATED, TDX_LIFECYCLE_STATE_INCORRECT),
    # ---- S-EPT and private pages (tdx-facts §2.3, §3.4) --------------------------------------
    # SEPT.ADD: TDR-S (RDX), OPS, SEPT tree, entry (RCX), new page PAMT-X (R8). (The resumable
    # INTERRUPTED_RESUMABLE is version 1 only; the model issues version 0.)
    Leaf.TDH_MEM_SEPT_ADD: _TD | _SEPT_RCX | _tdr(RDX) | _new_page(R8) | _busy(OPERAND_ID_SEPT_TREE),
    # PAGE.ADD: TDR-X (RDX), OPS, SEPT tree, entry (RCX), target PAMT-X (R8), source page R9.
    Leaf.TDH_MEM_PAGE_ADD: _TD | _SEPT_RCX | _tdr(RDX) | _new_page(R8) | _inv(R9) | _range(R9)
    | _busy(OPERAND_ID_SEPT_TREE),
    # MR.EXTEND: RCX = GPA chunk, TDR-X (RDX), OPS, SEPT tree; entry must be MAPPED via PAGE.ADD.
    Leaf.TDH_MR_EXTEND: _TD | _SEPT_RCX | _tdr(RDX) | _busy(OPERAND_ID_SEPT_TREE),
    # MR.FINALIZE: TDR-X (RCX), OPS; op state INITIALIZED.
    Leaf.TDH_MR_FINALIZE: _TD | _tdr(RCX) | _busy(OPERAND_ID_OP_STATE) | _s(TDX_OP_STATE_INCORRECT),
    # PAGE.AUG: TDR-S (RDX), OPS, SEPT-S (SEPT_TREE), entry (RCX), page PAMT-X (R8): walk →
    # EPT_WALK_FAILED|RCX, state → EPT_ENTRY_STATE_INCORRECT|RCX, page not NDA →
    # PAGE_METADATA_INCORRECT|R8.
    Leaf.TDH_MEM_PAGE_AUG: _TD | _SEPT_RCX | _tdr(RDX) | _new_page(R8) | _busy(OPERAND_ID_SEPT_TREE),
    # RANGE.BLOCK: TDR-S, OPS, SEPT-X, entry (RCX); already blocked → GPA_RANGE_ALREADY_BLOCKED|RCX.
    Leaf.TDH_MEM_RANGE_BLOCK: _TD | _SEPT_RCX | _tdr(RDX) | _busy(OPERAND_ID_SEPT_TREE)
    | _with(TDX_GPA_RANGE_ALREADY_BLOCKED, RCX),
    # RANGE.UNBLOCK: as BLOCK; the entry must be *BLOCKED and tracked.
    Leaf.TDH_MEM_RANGE_UNBLOCK: _TD | _SEPT_RCX | _tdr(RDX) | _busy(OPERAND_ID_SEPT_TREE)
    | _with(TDX_TLB_TRACKING_NOT_DONE, RCX),
    # TRACK: TDR-S (RCX), OPS, epoch lock X (BUSY|TD_EPOCH); vCPUs still in epoch-1 →
    # PREVIOUS_TLB_EPOCH_BUSY (no operand id).
    Leaf.TDH_MEM_TRACK: _TD | _tdr(RCX) | _busy(OPERAND_ID_OP_STATE, OPERAND_ID_TD_EPOCH)
    | _s(TDX_OP_STATE_INCORRECT, TDX_PREVIOUS_TLB_EPOCH_BUSY),
    # PAGE.REMOVE: TDR-S, OPS, SEPT-S, entry and removed page (both RCX); not blocked →
    # GPA_RANGE_NOT_BLOCKED|RCX; BEPOCH not tracked → TLB_TRACKING_NOT_DONE|RCX.
    Leaf.TDH_MEM_PAGE_REMOVE: _TD | _SEPT_RCX | _tdr(RDX) | _busy(OPERAND_ID_SEPT_TREE)
    | _with(TDX_GPA_RANGE_NOT_BLOCKED, RCX) | _with(TDX_TLB_TRACKING_NOT_DONE, RCX),
    # SEPT.REMOVE: as REMOVE, plus a child page not all FREE → EPT_PAGE_NOT_FREE|RCX.
    Leaf.TDH_MEM_SEPT_REMOVE: _TD | _SEPT_RCX | _tdr(RDX) | _busy(OPERAND_ID_SEPT_TREE)
    | _with(TDX_GPA_RANGE_NOT_BLOCKED, RCX) | _with(TDX_TLB_TRACKING_NOT_DONE, RCX)
    | _with(TDX_EPT_PAGE_NOT_FREE, RCX),
    # ---- physical memory ---------------------------------------------------------------------
    # CACHE.WB: RCX = 0 start / 1 resume; per-package WBCACHE mutex, KOT-S; nothing FLUSHED →
    # NO_HKID_READY_TO_WBCACHE (warning); resume without a saved point → WBCACHE_RESUME_ERROR;
    # interrupted → INTERRUPTED_RESUMABLE.
    Leaf.TDH_PHYMEM_CACHE_WB: _TD | _inv(RCX) | _busy(OPERAND_ID_WBCACHE, OPERAND_ID_KOT)
    | _s(TDX_NO_HKID_READY_TO_WBCACHE, TDX_WBCACHE_RESUME_ERROR, TDX_INTERRUPTED_RESUMABLE),
    # PAGE.RECLAIM: page PAMT-X (RCX), implicit TDR-S (BUSY|TDR); owner not in TEARDOWN →
    # LIFECYCLE_STATE_INCORRECT; TDR with children → TD_ASSOCIATED_PAGES_EXIST.
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: _TD | _new_page(RCX) | _busy(OPERAND_ID_TDR)
    | _s(TDX_LIFECYCLE_STATE_INCORRECT, TDX_TD_ASSOCIATED_PAGES_EXIST),
    # PAGE.WBINVD: RCX = PA with the KeyID bits; the page's PAMT lock.
    Leaf.TDH_PHYMEM_PAGE_WBINVD: _TD | _inv(RCX) | _range(RCX) | _busy(RCX),
    # ---- bring-up (tdx-facts §6; handlers in module/leaves/sys.py) ----------------------------
    # SYS.INIT: RCX must be 0; not SYSINIT_PENDING → SYS_INIT_NOT_PENDING; SYS_BUSY (§1.2).
    Leaf.TDH_SYS_INIT: _inv(RCX) | _s(TDX_SYS_INIT_NOT_PENDING, TDX_SYS_BUSY),
    # SYS.LP.INIT: SYS.INIT not done → LP_INIT_NOT_PENDING; this LP done → LP_INIT_DONE.
    Leaf.TDH_SYS_LP_INIT: _s(TDX_SYS_LP_INIT_NOT_PENDING, TDX_SYS_LP_INIT_DONE, TDX_SYS_BUSY),
    # SYS.CONFIG: RCX = TDMR_INFO PA array, RDX = #TDMRs, R8 = global KeyID; the TDMR checks
    # carry the TDMR index in bits 31:0 (added below for every index < constants.MAX_TDMRS).
    Leaf.TDH_SYS_CONFIG: _inv(RCX, RDX, R8) | _s(TDX_SYS_CONFIG_NOT_PENDING, TDX_SYS_BUSY),
    # SYS.KEY.CONFIG: not SYSCONFIG_DONE → KEY_CONFIG_NOT_PENDING; package done → KEY_CONFIGURED
    # (warning); PCONFIG → KEY_GENERATION_FAILED; must not run concurrently → SYS_BUSY.
    Leaf.TDH_SYS_KEY_CONFIG: _s(TDX_SYS_KEY_CONFIG_NOT_PENDING, TDX_KEY_CONFIGURED,
                                TDX_KEY_GENERATION_FAILED, TDX_SYS_BUSY),
    # SYS.TDMR.INIT: RCX = TDMR base; done → TDMR_ALREADY_INITIALIZED (warning); SYS_BUSY.
    Leaf.TDH_SYS_TDMR_INIT: _TD | _inv(RCX) | _s(TDX_TDMR_ALREADY_INITIALIZED, TDX_SYS_BUSY),
}
_SEAMCALL_ROWS[Leaf.TDH_SYS_CONFIG] = _SEAMCALL_ROWS[Leaf.TDH_SYS_CONFIG] | frozenset(
    base | i for base in (TDX_NON_ORDERED_TDMR, TDX_INVALID_TDMR, TDX_INVALID_RESERVED_IN_TDMR,
                          TDX_NON_ORDERED_RESERVED_IN_TDMR, TDX_INVALID_PAMT, TDX_PAMT_OVERLAP)
    for i in range(MAX_TDMRS))

# ---- guest TDCALL (module 1.5.01 tdg_mem_page_accept) ------------------------------------
# ACCEPT: bad GPA|level → OPERAND_INVALID|RCX; entry lock → BUSY|RCX, or
# BUSY_HOST_PRIORITY|RCX when a host op lost the lock and set the priority bit (anchors A19);
# guest-accessible leaf → PAGE_ALREADY_ACCEPTED|level (warning); non-leaf at the requested
# level → PAGE_SIZE_MISMATCH|level; an unacceptable state is an EPT-violation TD exit, which the
# model reports as ACCEPT_EPT_VIOLATION (constants; SPEC §4.2): injecting it forces that exit.
_TDCALL_ROWS: Dict[TdcallLeaf, FrozenSet[int]] = {
    TdcallLeaf.TDG_MEM_PAGE_ACCEPT: _inv(RCX) | _busy(RCX) | _with(TDX_OPERAND_BUSY_HOST_PRIORITY, RCX)
    | _with(TDX_PAGE_ALREADY_ACCEPTED, *_LEVELS) | _with(TDX_PAGE_SIZE_MISMATCH, *_LEVELS)
    | _s(TDX_SUCCESS | ACCEPT_EPT_VIOLATION),
}


class _LeafTable(Mapping[AnyLeaf, FrozenSet[int]]):
    """Read-only ``{Leaf | TdcallLeaf: frozenset of full 64-bit statuses}``.

    Keyed by leaf *space and number*: ``Leaf.TDH_MEM_PAGE_AUG`` and
    ``TdcallLeaf.TDG_MEM_PAGE_ACCEPT`` are both 6 and equal as ints, so a plain dict would merge
    them. A bare int is never a key.
    """

    __slots__ = ("_d", "_leaves")

    def __init__(self, table: Iterable[Tuple[AnyLeaf, FrozenSet[int]]]) -> None:
        items = sorted(table, key=lambda kv: _key(kv[0]))
        self._d: Dict[LeafKey, FrozenSet[int]] = {_key(k): v for k, v in items}
        self._leaves: Tuple[AnyLeaf, ...] = tuple(k for k, _ in items)

    def __getitem__(self, leaf: AnyLeaf) -> FrozenSet[int]:
        if not isinstance(leaf, (Leaf, TdcallLeaf)):
            raise KeyError(leaf)
        return self._d[_key(leaf)]

    def __iter__(self) -> Iterator[AnyLeaf]:
        return iter(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)




#: Leaf → every full 64-bit status (base | operand id or detail) that leaf can return besides
#: ``TDX_SUCCESS``: what :meth:`Injector.add` accepts. Keys are :class:`Leaf` and
#: :class:`TdcallLeaf` members (``LEAF_STATUSES[TdcallLeaf.TDG_MEM_PAGE_ACCEPT]`` and
#: ``LEAF_STATUSES[Leaf.TDH_MEM_PAGE_AUG]`` are different rows); a leaf without a row is not
#: modelled and cannot be injected.
LEAF_STATUSES: Mapping[AnyLeaf, FrozenSet[int]] = _LeafTable(
    [*_SEAMCALL_ROWS.items(), *_TDCALL_ROWS.items()])


# ----------------------------------------------------------------------------------------------
# Calls, injections, the injector
# ----------------------------------------------------------------------------------------------


class InjectCall(NamedTuple):
    """What a ``match`` callable receives: one SEAMCALL or TDCALL about to run.

    Attributes
    ----------
    leaf : Leaf or TdcallLeaf
        The leaf being called.
    rcx, rdx, r8, r9 : int
        The input registers as the module receives them (for a TDCALL, ``rcx`` is the leaf's
        RCX, e.g. ACCEPT's ``gpa | level``; unused registers are 0).
    cpu : int or None
        The logical processor it runs on (None where the caller does not say).
    actor : str
        Who issues it (the event log's actor name, e.g. ``"host"``, ``"vcpu0"``).

    Notes
    -----
    A named tuple: immutable (a ``match`` cannot alter the call) and cheap to build on every
    SEAMCALL. Helpers: :attr:`gpa` / :attr:`level` decode a ``GPA|level`` RCX (tdx-facts §2.1).
    """

    leaf: AnyLeaf
    rcx: int = 0
    rdx: int = 0
    r8: int = 0
    r9: int = 0
    cpu: Optional[int] = None
    actor: str = "host"

    @property
    def gpa(self) -> int:
        """RCX bits 51:12 as a GPA (meaningful for leaves taking ``GPA|level`` in RCX)."""
        return self.rcx & 0x000F_FFFF_FFFF_F000

    @property
    def level(self) -> int:
        """RCX bits 2:0 (the S-EPT level of a ``GPA|level`` operand)."""
        return self.rcx & 0x7


Match = Callable[[InjectCall], object]


class Injection:
    """One armed injection, as returned by :meth:`Injector.add` (the handle to :meth:`Injector.remove`).

    Attributes (read-only): ``leaf``, ``status`` (:class:`TdxStatus`), ``count`` (as given; None =
    unlimited), ``remaining`` (None = unlimited), ``probability`` (None = always), ``match``,
    ``seq`` (add order, from 0), ``nr_fired`` and ``nr_candidates`` (calls that reached its
    probability draw or fired without one), ``armed``.
    """

    __slots__ = ("_leaf", "_status", "_count", "_remaining", "_probability", "_match", "_seq",
                 "_removed", "nr_fired", "nr_candidates")

    def __init__(self, leaf: AnyLeaf, status: TdxStatus, count: Optional[int],
                 probability: Optional[float], match: Optional[Match], seq: int) -> None:
        self._leaf, self._status, self._count = leaf, status, count
        self._remaining, self._probability, self._match = count, probability, match
        self._seq, self._removed = seq, False
        self.nr_fired = 0
        self.nr_candidates = 0

    leaf = property(lambda self: self._leaf, doc="The leaf it applies to.")
    status = property(lambda self: self._status, doc="The injected status.")
    count = property(lambda self: self._count, doc="How many times it may fire (None: unlimited).")
    remaining = property(lambda self: self._remaining, doc="Firings left (None: unlimited).")
    probability = property(lambda self: self._probability, doc="Chance per candidate call (None: 1).")
    match = property(lambda self: self._match, doc="Filter on the :class:`InjectCall` (None: all).")
    seq = property(lambda self: self._seq, doc="Add order (0 for the first ``add`` of the injector).")

    @property
    def armed(self) -> bool:
        """Whether it can still fire (not removed and not used up)."""
        return not self._removed and (self._remaining is None or self._remaining > 0)

    def __repr__(self) -> str:
        return (f"Injection(#{self._seq} {self._leaf} -> {self._status.name}, remaining={self._remaining}, "
                f"probability={self._probability}, match={'yes' if self._match else 'no'}, "
                f"fired={self.nr_fired})")


OnInject = Callable[[InjectCall, Injection], None]


class Injector:
    """The module's injection table (``host.tdx.injector``): armed injections in add order.

    Parameters
    ----------
    rng : random.Random
        The stream every ``probability`` draw comes from (the module passes ``host.rng("inject")``).
    on_inject : callable, optional
        Called as ``on_inject(call, injection)`` each time an injection fires (the module counts
        ``nr_injected`` there); not called when nothing fires.

    Notes
    -----
    SPEC §3.1 (Injection), §8 (``--busy``/``--inject`` build on it); STYLE §2.7 (a named RNG
    stream). Not thread-safe by itself: the module consults it under ``TdxModule.lock``.

    Examples
    --------
    >>> import random
    >>> from tdxcore.status import Leaf, TDX_OPERAND_BUSY, OPERAND_ID_SEPT_TREE
    >>> inj = Injector(random.Random(0))
    >>> h = inj.add(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE)
    >>> inj.consult(InjectCall(Leaf.TDH_MEM_PAGE_AUG)).name, inj.consult(InjectCall(Leaf.TDH_MEM_PAGE_AUG))
    ('TDX_OPERAND_BUSY|SEPT_TREE', None)
    """

    def __init__(self, rng: random.Random, on_inject: Optional[OnInject] = None) -> None:
        if not isinstance(rng, random.Random):
            msg = f"rng={rng!r} must be a random.Random (e.g. host.rng('inject'))"
            raise TdxTypeError(msg, name="rng", value=rng)
        if on_inject is not None and not callable(on_inject):
            msg = f"on_inject={on_inject!r} must be callable or None"
            raise TdxTypeError(msg, name="on_inject", value=on_inject)
        self._rng = rng
        self._on_inject = on_inject
        self._armed: List[Injection] = []
        self._next_seq = 0
        self._fired: Dict[LeafKey, int] = {}

    # ------------------------------------------------------------------ arming
    def add(self, leaf: AnyLeaf, status: int, count: Optional[int] = 1,
            probability: Optional[float] = None, match: Optional[Match] = None) -> Injection:
        """Arm an injection of ``status`` into calls of ``leaf`` and return its handle.

        Parameters
        ----------
        leaf : Leaf or TdcallLeaf
            The leaf (a bare int is refused: 6 is both PAGE.AUG and ACCEPT).
        status : int
            A full 64-bit status in ``LEAF_STATUSES[leaf]`` (operand id included).
        count : int or None
            Fire at most this many times (>= 1); None = unlimited.
        probability : float or None
            Chance in ``[0, 1]`` that a candidate call fires; None = always (no draw).
        match : callable or None
            ``match(call: InjectCall)``; truthy = this call is a candidate. None = every call.

        Returns
        -------
        Injection
            The handle (for :meth:`remove` and its counters).

        Raises
        ------
        TdxTypeError
            ``leaf`` not a ``Leaf``/``TdcallLeaf``; ``status``/``count`` not an int;
            ``probability`` not a real number; ``match`` not callable.
        TdxValueError
            ``leaf`` has no status table; ``status`` is ``TDX_SUCCESS`` or one ``leaf`` cannot
            return; ``count`` < 1; ``probability`` outside ``[0, 1]`` (or NaN).
        """
        if not isinstance(leaf, (Leaf, TdcallLeaf)):
            msg = (f"leaf={leaf!r} must be a tdx.Leaf or tdx.TdcallLeaf, not {type(leaf).__name__} "
                   "(a bare int is ambiguous: 6 is both TDH.MEM.PAGE.AUG and TDG.MEM.PAGE.ACCEPT)")
            raise TdxTypeError(msg, name="leaf", value=leaf)
        allowed = LEAF_STATUSES.get(leaf)
        if allowed is None:
            msg = f"leaf={leaf} has no status table: injection into it is not modelled"
            raise TdxValueError(msg, name="leaf", value=leaf)
        s = check_int("status", status, 0, _U64)
        if s == TDX_SUCCESS:
            msg = (f"status=0x0 (TDX_SUCCESS) cannot be injected into {leaf}: it would report an "
                   "effect that never happened")
            raise TdxValueError(msg, name="status", value=s)
        if s not in allowed:
            msg = f"status={TdxStatus(s)} cannot be returned by {leaf} (not in LEAF_STATUSES[{leaf}])"
            raise TdxValueError(msg, name="status", value=s)
        n = None if count is None else check_int("count", count, 1, _U64)
        p = _check_probability(probability)
        if match is not None and not callable(match):
            msg = f"match={match!r} must be callable (InjectCall -> bool) or None"
            raise TdxTypeError(msg, name="match", value=match)
        inj = Injection(leaf, TdxStatus(s), n, p, match, self._next_seq)
        self._next_seq += 1
        self._armed.append(inj)
        return inj

    def remove(self, injection: Injection) -> None:
        """Disarm ``injection`` (``TdxValueError`` if it is not armed in this injector)."""
        if not isinstance(injection, Injection):
            msg = f"injection={injection!r} must be an Injection handle from add()"
            raise TdxTypeError(msg, name="injection", value=injection)
        for i, inj in enumerate(self._armed):
            if inj is injection:
                del self._armed[i]
                inj._removed = True
                return
        msg = f"injection={injection!r} is not armed in this injector (removed, used up, or another's)"
        raise TdxValueError(msg, name="injection", value=injection)

    def clear(self) -> None:
        """Disarm every injection (counters and the RNG stream are kept)."""
        for inj in self._armed:
            inj._removed = True
        self._armed.clear()

    @property
    def is_armed(self) -> bool:
        """Whether any injection is armed: the module's cheap guard before building an InjectCall."""
        return bool(self._armed)

    @property
    def armed(self) -> Tuple[Injection, ...]:
        """Armed injections in add order (used-up ones are dropped as they run out)."""
        return tuple(self._armed)

    # ------------------------------------------------------------------ consulting
    def consult(self, call: InjectCall) -> Optional[TdxStatus]:
        """Return the status to inject into ``call``, or None to let the leaf run.

        Armed injections of ``call.leaf`` are tried in add order: ``match`` (if any) must accept
        the call; then, if ``probability`` is set, one draw ``rng.random() < probability``
        decides. The first that fires wins: its ``remaining`` drops by one (it is disarmed at 0),
        the per-leaf count grows and ``on_inject`` runs.

        Raises
        ------
        TdxTypeError
            ``call`` is not an :class:`InjectCall`.
        Whatever ``match`` raises, unchanged (no state has changed for that injection).

        Notes
        -----
        The module calls this for every SEAMCALL/TDCALL before the leaf's effect, in
        ``TdxModule._injected`` (SPEC §3.1).
        """
        if not isinstance(call, InjectCall):
            msg = f"call={call!r} must be an InjectCall"
            raise TdxTypeError(msg, name="call", value=call)
        if not self._armed:
            return None
        leaf = call.leaf
        for inj in self._armed:
            # Enum members are singletons: identity tells PAGE.AUG from ACCEPT (both == 6).
            if inj._leaf is not leaf:
                continue
            if inj._match is not None and not inj._match(call):
                continue
            inj.nr_candidates += 1
            p = inj._probability
            if p is not None and not self._rng.random() < p:
                continue
            inj.nr_fired += 1
            if inj._remaining is not None:
                inj._remaining -= 1
                if inj._remaining == 0:
                    self._armed.remove(inj)
            key = _key(leaf)
            self._fired[key] = self._fired.get(key, 0) + 1
            if self._on_inject is not None:
                self._on_inject(call, inj)
            st: TdxStatus = inj.status
            return st
        return None

    # ------------------------------------------------------------------ reporting
    @property
    def nr_injected(self) -> int:
        """Total injections that fired."""
        return sum(self._fired.values())

    def nr_injected_by_leaf(self) -> Tuple[Tuple[AnyLeaf, int], ...]:
        """``(leaf, fired)`` for each leaf that had an injection fire, SEAMCALLs first, by number."""
        return tuple(((TdcallLeaf if k[0] else Leaf)(k[1]), n) for k, n in sorted(self._fired.items()))

    def state_bytes(self) -> bytes:
        """Canonical serialization for ``host.state_hash`` (no ``hash()``, no ids).

        Notes
        -----
        ``<Q`` next seq; per armed injection in order ``<BHQqdBQQ`` (is_tdcall, leaf, status,
        remaining or -1, probability or -1.0, has match, nr_fired, nr_candidates); then ``<Q``
        the number of leaves that fired and ``<BHQ`` each (sorted). The RNG stream's state is
        hashed by the host with its other streams. A ``match`` callable contributes only its
        presence.
        """
        parts = [struct.pack("<QQ", self._next_seq, len(self._armed))]
        for inj in self._armed:
            t, n = _key(inj.leaf)
            parts.append(struct.pack(
                "<BHQqdBQQ", t, n, int(inj.status), -1 if inj.remaining is None else inj.remaining,
                -1.0 if inj.probability is None else inj.probability, inj.match is not None,
                inj.nr_fired, inj.nr_candidates))
        parts.append(struct.pack("<Q", len(self._fired)))
        for (t, n), c in sorted(self._fired.items()):
            parts.append(struct.pack("<BHQ", t, n, c))
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"Injector(armed={len(self._armed)}, injected={self.nr_injected})"


def _check_probability(probability: object) -> Optional[float]:
    if probability is None:
        return None
    if isinstance(probability, bool) or not isinstance(probability, (int, float)):
        msg = f"probability={probability!r} must be a float in [0, 1] or None"
        raise TdxTypeError(msg, name="probability", value=probability)
    p = float(probability)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        msg = f"probability={probability!r} must be in [0, 1]"
        raise TdxValueError(msg, name="probability", value=probability)
    return p
