"""What Linux 6.18 KVM does with each status of each SEAMCALL it issues, at each of its call sites.

The one table behind ``tests/injection/test_coverage.py`` (every case is injected and checked) and
``docs/injection-table.rst`` (``python3 -m tests.injection.gen_table``). It is written from
upstream v6.18 ``arch/x86/kvm/vmx/tdx.c`` / ``tdx.h`` and the host ``arch/x86/virt/vmx/tdx/tdx.c``
(``reference/linux-6.18.md``; tdx-facts §4–§5), not from the model: where the model's outcome
differs, the test fails and the difference is either fixed in ``tdxcore/kvm`` or, when it is a
deliberate model choice, recorded here in ``Rule.model`` (and shown in the docs).

Vocabulary
----------
* **call site** (:data:`SITES`): the user-visible operation that makes KVM issue the leaf, e.g.
  ``KVM_RUN (EPT violation)`` for SEPT.ADD/PAGE.AUG from the fault path, ``fallocate(PUNCH_HOLE)``
  for the zap SEAMCALLs, ``VM destruction`` for the teardown ones. RECLAIM's sites are named by
  the page it reclaims.
* **injected**: ``once`` (the first call of the leaf at that site returns the status; a retry sees
  the real module), ``twice`` (the retry fails too: 6.18's zap retry is exactly one), ``always``
  (every call, for the bounded loops: ``sc_retry``'s RND_NO_ENTROPY, CACHE.WB's resume, VP.ENTER's
  BUSY re-entry).
* **outcome** (:class:`Outcome`): what userspace and the accounting see: the errno of the ioctl
  (None: it succeeds), whether the VM is bugged (``KVM_BUG_ON``: dead, every later ioctl EIO),
  the deliberate leaks recorded by the time the VM is gone (``Leak.what`` kinds, tdx-facts §5.8),
  KVM_RUN's exit reason, ``hw_error`` filled with the status. ``retried`` marks outcomes where
  KVM issues the leaf again and the operation then succeeds.

Every status a leaf can return is :data:`tdxcore.module.inject.LEAF_STATUSES` (the per-leaf table
built from the module's status codes, ``data/tdx_status_codes.csv``); :func:`cases` expands the
rules over it, so a status added to a leaf's row is covered (by the leaf's catch-all rule) without
editing this file.
"""

from __future__ import annotations

import errno as _errno
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from tdxcore.module.inject import LEAF_STATUSES
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_FLUSHVP_NOT_DONE,
    TDX_INTERRUPTED_RESUMABLE,
    TDX_NO_HKID_READY_TO_WBCACHE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_RND_NO_ENTROPY,
    TDX_VCPU_NOT_ASSOCIATED,
    Leaf,
    TdxStatus,
)

__all__ = ["SITES", "RULES", "Outcome", "Rule", "Case", "cases", "ONCE", "TWICE", "ALWAYS"]

ONCE, TWICE, ALWAYS = "once", "twice", "always"
#: Injection ``count`` per mode (None: every call).
COUNTS: Dict[str, Optional[int]] = {ONCE: 1, TWICE: 2, ALWAYS: None}

# ------------------------------------------------------------------------------------------------
# Call sites
# ------------------------------------------------------------------------------------------------

#: Site name → how it is reached (the driver in ``scenarios.py`` has the same name).
SITES: Dict[str, str] = {
    "KVM_TDX_INIT_VM": "tdx_td_init → __tdx_td_init (TDR/TDCS, MNG.CREATE, KEY.CONFIG per package, "
                       "ADDCX per TDCS page, MNG.INIT, MNG.RD of the TSC fields)",
    "KVM_TDX_INIT_VCPU": "tdx_vcpu_init → tdx_td_vcpu_init (VP.CREATE, VP.ADDCX per TDCX page, VP.INIT)",
    "KVM_TDX_INIT_MEM_REGION": "tdx_gmem_post_populate: kvm_tdp_map_page (SEPT.ADD for a missing "
                               "table), PAGE.ADD, 16 × MR.EXTEND",
    "KVM_TDX_FINALIZE_VM": "tdx_td_finalize: MR.FINALIZE",
    "KVM_RUN (EPT violation)": "tdx_handle_ept_violation → kvm_mmu_page_fault on a private GPA of a "
                               "2 MiB range with no S-EPT table yet: SEPT.ADD, then PAGE.AUG",
    "KVM_PRE_FAULT_MEMORY": "kvm_arch_vcpu_pre_fault_memory → kvm_tdp_map_page on the same GPA",
    "KVM_RUN (entry)": "tdx_vcpu_run: VP.ENTER",
    "fallocate(PUNCH_HOLE)": "kvm_gmem_punch_hole → kvm_gmem_invalidate_begin → the private zap of "
                             "a mapped page (BLOCK, TRACK + kick, REMOVE, WBINVD) on a RUNNABLE TD",
    "KVM_SET_MEMORY_ATTRIBUTES (to shared)": "kvm_vm_set_mem_attributes → the private zap of the "
                                             "converted page",
    "close(guest_memfd)": "kvm_gmem_release → the private zap of every bound page",
    "memslot delete": "KVM_SET_USER_MEMORY_REGION2 size 0 → kvm_arch_flush_shadow_memslot → "
                      "the private zap of the slot",
    "fallocate(PUNCH_HOLE) before FINALIZE": "the zap of a PAGE.ADDed page of an INITIALIZED TD "
                                             "(no TRACK: tdx_track returns before FINALIZE)",
    "fallocate(PUNCH_HOLE) of a premapped page": "before FINALIZE, the zap of a page mapped in the "
                                                 "mirror whose PAGE.ADD failed (nr_premapped = 1)",
    "KVM_TDX_INIT_VM failure teardown": "__tdx_td_init after MNG.INIT failed (a bad TD_PARAMS "
                                        "operand: -EINVAL): tdx_mmu_release_hkid (no vCPU: "
                                        "VPFLUSHDONE, CACHE.WB, KEY.FREEID), then the control pages",
    "KVM_TDX_INIT_VM failure teardown (TDCS page)": "the same teardown: RECLAIM of the first TDCS page",
    "KVM_TDX_INIT_VM failure teardown (TDR page)": "the same teardown: RECLAIM of the TDR",
    "KVM_TDX_TERMINATE_VM (extension)": "not in 6.18: the opt-in sub-ioctl of the series "
                                        "'KVM: TDX: Add sub-ioctl KVM_TDX_TERMINATE_VM' "
                                        "(Kvm(host, terminate_vm=True)): tdx_mmu_release_hkid "
                                        "before the VM is destroyed",
    "VM destruction": "last reference dropped: tdx_mmu_release_hkid (VP.FLUSH, VPFLUSHDONE, CACHE.WB "
                      "per package, KEY.FREEID), vCPU free, S-EPT page free, control pages",
    "VM destruction (TDCX page)": "tdx_vcpu_free → tdx_reclaim_control_page of a TDCX page",
    "VM destruction (TDVPR page)": "tdx_vcpu_free → tdx_reclaim_control_page of the TDVPR",
    "VM destruction (S-EPT page)": "free_external_spt → tdx_sept_free_private_spt → tdx_reclaim_page",
    "VM destruction (TDCS page)": "tdx_reclaim_td_control_pages → RECLAIM of a TDCS page",
    "VM destruction (TDR page)": "tdx_reclaim_td_control_pages → RECLAIM of the TDR, then WBINVD of "
                                 "the TDR with the global KeyID",
}

ZAP_SITES = ("fallocate(PUNCH_HOLE)", "KVM_SET_MEMORY_ATTRIBUTES (to shared)", "close(guest_memfd)",
             "memslot delete")


# ------------------------------------------------------------------------------------------------
# Outcomes
# ------------------------------------------------------------------------------------------------

class Outcome(NamedTuple):
    """What a case must produce (see the module docstring)."""

    label: str
    errno: Optional[int] = None
    bugged: bool = False
    leaks: FrozenSet[str] = frozenset()
    exit_reason: Optional[str] = None
    hw_error: bool = False
    retried: bool = False


def _leaks(*kinds: str) -> FrozenSet[str]:
    return frozenset(kinds)


#: Every TD page KVM still holds when the HKID cannot be released (tdx_vcpu_free,
#: free_external_spt and tdx_reclaim_td_control_pages all give up while it is assigned).
ALL_TD_PAGES = _leaks("hkid", "tdcx", "tdvpr", "sept", "tdcs", "tdr")

OK = Outcome("success")
RETRY = Outcome("retried, succeeds", retried=True)
EIO = Outcome("-EIO, pages freed", errno=_errno.EIO)
BUG_EIO = Outcome("KVM_BUG, -EIO", errno=_errno.EIO, bugged=True)
# A private page that cannot be removed stays pinned (leaked), and the TDR it still belongs to
# cannot be reclaimed at destruction (TD_ASSOCIATED_PAGES_EXIST): both are recorded leaks.
BUG_LEAK_PRIVATE = Outcome("KVM_BUG, page and TDR leaked", bugged=True, leaks=_leaks("private", "tdr"))
# A page no longer owned by the TD (REMOVEd, or never PAGE.ADDed) is leaked alone.
BUG_LEAK_PAGE = Outcome("KVM_BUG, page leaked", bugged=True, leaks=_leaks("private"))
#: What follows when the HKID's cache write-back did not happen: KEY.FREEID fails.
NO_FREEID = Outcome("KVM_BUG (KEY.FREEID), HKID and TD pages leaked", bugged=True, leaks=ALL_TD_PAGES)


class Rule(NamedTuple):
    """One row of the table before expansion: which statuses, injected how, give which outcome.

    ``match`` picks statuses of the leaf (``None``: every status no earlier rule of the same
    (leaf, site, mode) took); ``upstream`` says what 6.18 does (short); ``model`` is set only
    where the model deliberately differs, and says how.
    """

    leaf: Leaf
    sites: Tuple[str, ...]
    cls: str
    match: Optional[Callable[[int], bool]]
    mode: str
    outcome: Outcome
    upstream: str
    model: str = ""


def _busy(s: int) -> bool:
    return bool(TdxStatus(s).base == TDX_OPERAND_BUSY)


def _is(*values: int) -> Callable[[int], bool]:
    return lambda s: s in values


def _base(base: int) -> Callable[[int], bool]:
    return lambda s: bool(TdxStatus(s).base == base)


_RND = _is(TDX_RND_NO_ENTROPY)
_PREMAP = _is(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX)
OTHER = "any other status"
_INIT_FAIL = "KVM_TDX_INIT_VM failure teardown"
#: Upstream keeps an HKID it could not release (and the TDR/TDCS pages) in ``kvm_tdx`` and tries
#: again at VM destruction; the model records them as leaked at once and forgets them.
_FORGETS = ("records the HKID and the TDR/TDCS pages as leaked when the failed INIT_VM returns and "
            "forgets them (tdx_vm.py: 'KVM forgets it'); upstream keeps them in kvm_tdx and "
            "retries tdx_mmu_release_hkid + tdx_reclaim_td_control_pages at VM destruction, where "
            "a one-shot failure would be recovered with nothing leaked")
_HKID_KEPT = _leaks("hkid", "tdcs", "tdr")

L = Leaf


def _terminate_rules() -> List[Rule]:
    """Return the rules of KVM_TDX_TERMINATE_VM (the ioctl succeeds whatever the release does)."""
    site = ("KVM_TDX_TERMINATE_VM (extension)",)
    later = ("tdx_terminate_vm ignores the release's result; the HKID stays assigned and "
             "vm_pre_destroy releases it at VM destruction (nothing leaked)")
    quiet = Outcome("success; HKID released at destruction")
    bug = Outcome("KVM_BUG; HKID released at destruction", bugged=True)
    # after a successful VPFLUSHDONE the TD is past the point of no return: with the HKID still
    # assigned the private zap (BLOCK) and the second release (VPFLUSHDONE) both fail
    blocked = ("VPFLUSHDONE already succeeded, so the TD is blocked: the later private zap "
               "(HKID still assigned: BLOCK) and vm_pre_destroy's second VPFLUSHDONE fail "
               "LIFECYCLE_STATE_INCORRECT (KVM_BUG_ON): everything is leaked")
    stuck = Outcome("KVM_BUG; private pages, HKID and TD pages leaked", bugged=True,
                    leaks=ALL_TD_PAGES | _leaks("private"))
    return [
        Rule(L.TDH_VP_FLUSH, site, "VCPU_NOT_ASSOCIATED", _is(TDX_VCPU_NOT_ASSOCIATED), ONCE, quiet,
             "not an error; injected, the vCPU stays associated and VPFLUSHDONE says "
             "FLUSHVP_NOT_DONE: " + later),
        Rule(L.TDH_VP_FLUSH, site, OTHER, None, ONCE, bug, "KVM_BUG_ON; " + later),
        Rule(L.TDH_MNG_VPFLUSHDONE, site, "FLUSHVP_NOT_DONE", _is(TDX_FLUSHVP_NOT_DONE), ONCE, quiet,
             "the release stops silently; " + later),
        Rule(L.TDH_MNG_VPFLUSHDONE, site, OTHER, None, ONCE, bug, "KVM_BUG_ON; " + later),
        Rule(L.TDH_PHYMEM_CACHE_WB, site, "every status", None, ONCE, stuck,
             "KEY.FREEID then fails WBCACHE_NOT_COMPLETE: KVM_BUG_ON; " + blocked),
        Rule(L.TDH_MNG_KEY_FREEID, site, "every status", None, ONCE, stuck, "KVM_BUG_ON; " + blocked),
    ]


def _init_failure_rules() -> List[Rule]:
    """Return the rules of the teardown inside a failed INIT_VM (every case: -EINVAL from MNG.INIT)."""
    einval = _errno.EINVAL
    kept = Outcome("-EINVAL; HKID, TDCS, TDR leaked", errno=einval, leaks=_HKID_KEPT)
    kept_bug = Outcome("-EINVAL, KVM_BUG; HKID, TDCS, TDR leaked", errno=einval, bugged=True,
                       leaks=_HKID_KEPT)
    return [
        Rule(L.TDH_MNG_VPFLUSHDONE, (_INIT_FAIL,), "FLUSHVP_NOT_DONE", _is(TDX_FLUSHVP_NOT_DONE), ONCE,
             kept, "tdx_mmu_release_hkid stops silently; the HKID stays assigned, so "
             "tdx_reclaim_td_control_pages gives up", model=_FORGETS),
        Rule(L.TDH_MNG_VPFLUSHDONE, (_INIT_FAIL,), OTHER, None, ONCE, kept_bug, "KVM_BUG_ON, "
             "'HKID is leaked'", model=_FORGETS),
        Rule(L.TDH_PHYMEM_CACHE_WB, (_INIT_FAIL,), "INTERRUPTED_RESUMABLE", _is(TDX_INTERRUPTED_RESUMABLE),
             ALWAYS, kept_bug, "10,000 resumes, WARN; KEY.FREEID fails: KVM_BUG_ON", model=_FORGETS),
        Rule(L.TDH_PHYMEM_CACHE_WB, (_INIT_FAIL,), "every status", None, ONCE, kept_bug,
             "WARN only (or taken as done); injected, nothing was written back, so KEY.FREEID "
             "fails: KVM_BUG_ON", model=_FORGETS),
        Rule(L.TDH_MNG_KEY_FREEID, (_INIT_FAIL,), "every status", None, ONCE, kept_bug,
             "KVM_BUG_ON, 'HKID is leaked'", model=_FORGETS),
        Rule(L.TDH_PHYMEM_PAGE_RECLAIM, (_INIT_FAIL + " (TDCS page)",), "every status", None, ONCE,
             Outcome("-EINVAL; TDCS and TDR leaked", errno=einval, leaks=_leaks("tdcs", "tdr")),
             "WARN, the TDCS page is leaked; the TDR still has a child and is leaked too (again at "
             "VM destruction)"),
        Rule(L.TDH_PHYMEM_PAGE_RECLAIM, (_INIT_FAIL + " (TDR page)",), "every status", None, ONCE,
             Outcome("-EINVAL; TDR leaked", errno=einval, leaks=_leaks("tdr")),
             "__tdx_reclaim_page of the TDR fails: return with td.tdr_page still set",
             model="records the TDR as leaked at once; upstream reclaims it again at VM "
                   "destruction (tdx_vm_destroy), where a one-shot failure succeeds"),
        Rule(L.TDH_PHYMEM_PAGE_WBINVD, (_INIT_FAIL,), "every status", None, ONCE,
             Outcome("-EINVAL, KVM_BUG; TDR leaked", errno=einval, bugged=True, leaks=_leaks("tdr")),
             "tdh_phymem_page_wbinvd_tdr: KVM_BUG_ON, the TDR is not freed"),
    ]


RULES: List[Rule] = [
    # ---- KVM_TDX_INIT_VM ------------------------------------------------------------------------
    Rule(L.TDH_MNG_CREATE, ("KVM_TDX_INIT_VM",), "RND_NO_ENTROPY", _RND, ONCE, RETRY,
         "sc_retry reissues the SEAMCALL while it says RND_NO_ENTROPY (10 tries)"),
    Rule(L.TDH_MNG_CREATE, ("KVM_TDX_INIT_VM",), "RND_NO_ENTROPY", _RND, ALWAYS,
         Outcome("-EAGAIN, pages and HKID freed", errno=_errno.EAGAIN),
         "after sc_retry gives up: -EAGAIN, free_packages"),
    Rule(L.TDH_MNG_CREATE, ("KVM_TDX_INIT_VM",), OTHER, None, ONCE, EIO,
         "WARN_ON_ONCE, -EIO, free_packages (BUSY is not special here: tdx_lock serializes it)"),
    Rule(L.TDH_MNG_KEY_CONFIG, ("KVM_TDX_INIT_VM",), "every status", None, ONCE,
         Outcome("KVM_BUG, -EIO, TD torn down", errno=_errno.EIO, bugged=True),
         "tdx_do_tdh_mng_key_config: KVM_BUG_ON(err) (warnings such as KEY_CONFIGURED included), "
         "-EIO, teardown (release HKID, reclaim)"),
    Rule(L.TDH_MNG_ADDCX, ("KVM_TDX_INIT_VM",), "RND_NO_ENTROPY", _RND, ONCE, RETRY,
         "sc_retry"),
    Rule(L.TDH_MNG_ADDCX, ("KVM_TDX_INIT_VM",), "RND_NO_ENTROPY", _RND, ALWAYS,
         Outcome("-EAGAIN, TD torn down", errno=_errno.EAGAIN), "-EAGAIN, teardown"),
    Rule(L.TDH_MNG_ADDCX, ("KVM_TDX_INIT_VM",), OTHER, None, ONCE,
         Outcome("-EIO, TD torn down", errno=_errno.EIO), "WARN_ON_ONCE, -EIO, teardown"),
    Rule(L.TDH_MNG_INIT, ("KVM_TDX_INIT_VM",), "OPERAND_INVALID (any operand)",
         _base(TDX_OPERAND_INVALID), ONCE,
         Outcome("-EINVAL + hw_error, TD torn down", errno=_errno.EINVAL, hw_error=True),
         "a user-supplied TD_PARAMS operand: ``*seamcall_err = err``, -EINVAL, no WARN, teardown"),
    Rule(L.TDH_MNG_INIT, ("KVM_TDX_INIT_VM",), OTHER, None, ONCE,
         Outcome("-EIO, TD torn down", errno=_errno.EIO), "WARN_ON_ONCE, -EIO, teardown"),
    Rule(L.TDH_MNG_RD, ("KVM_TDX_INIT_VM",), "every status", None, ONCE,
         Outcome("success, TSC field reads 0"),
         "td_tdcs_exec_read64: pr_err and return 0 (no KVM_BUG); INIT_VM succeeds"),
    # ---- KVM_TDX_INIT_VCPU ----------------------------------------------------------------------
    *[Rule(lf, ("KVM_TDX_INIT_VCPU",), "every status", None, ONCE, BUG_EIO,
           "tdx_td_vcpu_init: KVM_BUG_ON(err), -EIO; added TDCX pages are reclaimed at vCPU free")
      for lf in (L.TDH_VP_CREATE, L.TDH_VP_ADDCX, L.TDH_VP_INIT)],
    # ---- KVM_TDX_INIT_MEM_REGION ----------------------------------------------------------------
    Rule(L.TDH_MEM_SEPT_ADD, ("KVM_TDX_INIT_MEM_REGION", "KVM_RUN (EPT violation)", "KVM_PRE_FAULT_MEMORY"),
         "OPERAND_BUSY (any operand)", _busy, ONCE, RETRY,
         "tdx_sept_link_private_spt: -EBUSY → RET_PF_RETRY; kvm_tdp_map_page / the EPT-violation "
         "handler retry the fault"),
    Rule(L.TDH_MEM_SEPT_ADD, ("KVM_TDX_INIT_MEM_REGION", "KVM_RUN (EPT violation)", "KVM_PRE_FAULT_MEMORY"),
         OTHER, None, ONCE, BUG_EIO,
         "KVM_BUG_ON(err), -EIO; the retry loop sees KVM_REQ_VM_DEAD and returns -EIO"),
    Rule(L.TDH_MEM_PAGE_ADD, ("KVM_TDX_INIT_MEM_REGION",), "OPERAND_BUSY (any operand)", _busy, ONCE,
         Outcome("-EBUSY, page stays premapped", errno=_errno.EBUSY),
         "tdx_gmem_post_populate: -EBUSY (no KVM_BUG); nr_premapped keeps the page, FINALIZE refuses"),
    Rule(L.TDH_MEM_PAGE_ADD, ("KVM_TDX_INIT_MEM_REGION",), OTHER, None, ONCE,
         Outcome("-EIO, page stays premapped", errno=_errno.EIO), "-EIO (no KVM_BUG)"),
    Rule(L.TDH_MR_EXTEND, ("KVM_TDX_INIT_MEM_REGION",), "every status", None, ONCE,
         Outcome("-EIO", errno=_errno.EIO), "-EIO (no KVM_BUG); the page is added but unmeasured"),
    # ---- KVM_TDX_FINALIZE_VM --------------------------------------------------------------------
    Rule(L.TDH_MR_FINALIZE, ("KVM_TDX_FINALIZE_VM",), "OPERAND_BUSY (any operand)", _busy, ONCE,
         Outcome("-EBUSY + hw_error", errno=_errno.EBUSY, hw_error=True),
         "tdx_td_finalize: cmd->hw_error = err; tdx_operand_busy → -EBUSY"),
    Rule(L.TDH_MR_FINALIZE, ("KVM_TDX_FINALIZE_VM",), OTHER, None, ONCE,
         Outcome("KVM_BUG, -EIO + hw_error", errno=_errno.EIO, bugged=True, hw_error=True),
         "KVM_BUG_ON(hw_error), -EIO"),
    # ---- fault path: PAGE.AUG -------------------------------------------------------------------
    Rule(L.TDH_MEM_PAGE_AUG, ("KVM_RUN (EPT violation)", "KVM_PRE_FAULT_MEMORY"),
         "OPERAND_BUSY (any operand)", _busy, ONCE, RETRY,
         "tdx_mem_page_aug: unpin, -EBUSY → RET_PF_RETRY, the fault is retried"),
    Rule(L.TDH_MEM_PAGE_AUG, ("KVM_RUN (EPT violation)", "KVM_PRE_FAULT_MEMORY"), OTHER, None, ONCE,
         BUG_EIO, "KVM_BUG_ON(err), unpin, -EIO"),
    # ---- VP.ENTER -------------------------------------------------------------------------------
    Rule(L.TDH_VP_ENTER, ("KVM_RUN (entry)",), "OPERAND_BUSY (any operand)", _busy, ONCE, RETRY,
         "BUSY leaves the fastpath as EXIT_FASTPATH_EXIT_HANDLED: KVM enters again"),
    Rule(L.TDH_VP_ENTER, ("KVM_RUN (entry)",), "OPERAND_BUSY (any operand)", _busy, ALWAYS, BUG_EIO,
         "re-entered as long as it is BUSY (no bound but signals and need_resched)",
         model="bounded: VP_ENTER_MAX_BUSY (1000) BUSY entries in a row in one KVM_RUN are a "
               "KVM_BUG and -EIO, so a livelock fails instead of hanging"),
    Rule(L.TDH_VP_ENTER, ("KVM_RUN (entry)",), OTHER, None, ONCE,
         Outcome("KVM_EXIT_INTERNAL_ERROR", exit_reason="INTERNAL_ERROR"),
         "tdx_handle_exit: TDX_ERROR / NON_RECOVERABLE → unhandled_exit: KVM_EXIT_INTERNAL_ERROR, "
         "KVM_RUN returns 0, no KVM_BUG"),
    # ---- the private zap (RUNNABLE) -------------------------------------------------------------
    *[r for lf in (L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_TRACK, L.TDH_MEM_PAGE_REMOVE) for r in (
        Rule(lf, ZAP_SITES, "OPERAND_BUSY (any operand)", _busy, ONCE, RETRY,
             "tdx_no_vcpus_enter_start (wait_for_sept_zap + kick all vCPUs), retry once"),
        Rule(lf, ZAP_SITES, "OPERAND_BUSY (any operand)", _busy, TWICE, BUG_LEAK_PRIVATE,
             "the one retry fails too: KVM_BUG_ON, the page stays pinned"),
        Rule(lf, ZAP_SITES, OTHER, None, ONCE, BUG_LEAK_PRIVATE,
             "KVM_BUG_ON(err)" + (" (TRACK: then REMOVE finds the page not tracked)"
                                  if lf == L.TDH_MEM_TRACK else "") + ", the page stays pinned"),
    )],
    Rule(L.TDH_PHYMEM_PAGE_WBINVD, ZAP_SITES + ("fallocate(PUNCH_HOLE) before FINALIZE",), "every status",
         None, ONCE, BUG_LEAK_PAGE,
         "tdx_sept_drop_private_spte: KVM_BUG_ON(err) after REMOVE: not written back, never freed "
         "(no longer the TD's: the TDR is reclaimed)"),
    # ---- the private zap before FINALIZE ---------------------------------------------------------
    *[r for lf in (L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_PAGE_REMOVE) for r in (
        Rule(lf, ("fallocate(PUNCH_HOLE) before FINALIZE",), "OPERAND_BUSY (any operand)", _busy, ONCE,
             RETRY, "kick (no vCPU can be in the guest yet) and retry once"),
        Rule(lf, ("fallocate(PUNCH_HOLE) before FINALIZE",), OTHER, None, ONCE, BUG_LEAK_PRIVATE,
             "KVM_BUG_ON(err)" + (": EPT_ENTRY_STATE_INCORRECT is the premap case only when the "
                                  "page was never added (nr_premapped would go negative)"
                                  if lf == L.TDH_MEM_RANGE_BLOCK else "")),
    )],
    Rule(L.TDH_MEM_RANGE_BLOCK, ("fallocate(PUNCH_HOLE) of a premapped page",),
         "EPT_ENTRY_STATE_INCORRECT|RCX", _PREMAP, ONCE, Outcome("premap undone, success"),
         "tdx_is_sept_zap_err_due_to_premap: nr_premapped -= 1, unpin, success"),
    Rule(L.TDH_MEM_RANGE_BLOCK, ("fallocate(PUNCH_HOLE) of a premapped page",),
         "OPERAND_BUSY (any operand)", _busy, ONCE, RETRY,
         "kick and retry once: the module then answers EPT_ENTRY_STATE_INCORRECT (premap case)"),
    Rule(L.TDH_MEM_RANGE_BLOCK, ("fallocate(PUNCH_HOLE) of a premapped page",), OTHER, None, ONCE,
         BUG_LEAK_PAGE, "KVM_BUG_ON(err), the page stays pinned (never the TD's: the TDR is reclaimed)"),
    # ---- the teardown inside a failed KVM_TDX_INIT_VM ----------------------------------------------
    *_init_failure_rules(),
    # ---- KVM_TDX_TERMINATE_VM (opt-in extension, not 6.18) ---------------------------------------
    *_terminate_rules(),
    # ---- VM destruction --------------------------------------------------------------------------
    Rule(L.TDH_VP_FLUSH, ("VM destruction",), "VCPU_NOT_ASSOCIATED", _is(TDX_VCPU_NOT_ASSOCIATED), ONCE,
         Outcome("HKID and TD pages leaked (KVM_BUG at S-EPT free)", bugged=True, leaks=ALL_TD_PAGES),
         "tdx_flush_vp: not an error; injected, the vCPU stays associated, so VPFLUSHDONE says "
         "FLUSHVP_NOT_DONE and the release stops (as for FLUSHVP_NOT_DONE below)"),
    Rule(L.TDH_VP_FLUSH, ("VM destruction",), OTHER, None, ONCE,
         Outcome("KVM_BUG, HKID and TD pages leaked", bugged=True, leaks=ALL_TD_PAGES),
         "KVM_BUG_ON; VPFLUSHDONE then says FLUSHVP_NOT_DONE: the HKID stays assigned, every TD "
         "page is abandoned (free_external_spt KVM_BUGs too)"),
    Rule(L.TDH_MNG_VPFLUSHDONE, ("VM destruction",), "FLUSHVP_NOT_DONE", _is(TDX_FLUSHVP_NOT_DONE), ONCE,
         Outcome("HKID and TD pages leaked (KVM_BUG at S-EPT free)", bugged=True, leaks=ALL_TD_PAGES),
         "tdx_mmu_release_hkid stops silently; free_external_spt then KVM_BUGs on the assigned HKID"),
    Rule(L.TDH_MNG_VPFLUSHDONE, ("VM destruction",), OTHER, None, ONCE,
         Outcome("KVM_BUG, HKID and TD pages leaked", bugged=True, leaks=ALL_TD_PAGES),
         "KVM_BUG_ON, 'HKID is leaked'"),
    Rule(L.TDH_PHYMEM_CACHE_WB, ("VM destruction",), "INTERRUPTED_RESUMABLE",
         _is(TDX_INTERRUPTED_RESUMABLE), ONCE, NO_FREEID,
         "resumed (RCX = 1) up to 10,000 times; injected, no flush was started, so the resume "
         "fails WBCACHE_RESUME_ERROR (WARN) and KEY.FREEID fails WBCACHE_NOT_COMPLETE"),
    Rule(L.TDH_PHYMEM_CACHE_WB, ("VM destruction",), "INTERRUPTED_RESUMABLE",
         _is(TDX_INTERRUPTED_RESUMABLE), ALWAYS, NO_FREEID,
         "gives up after 10,000 resumes (WARN); KEY.FREEID then fails WBCACHE_NOT_COMPLETE"),
    Rule(L.TDH_PHYMEM_CACHE_WB, ("VM destruction",), "NO_HKID_READY_TO_WBCACHE",
         _is(TDX_NO_HKID_READY_TO_WBCACHE), ONCE, NO_FREEID,
         "taken as success ('done by another thread'); injected, no write-back happened, so "
         "KEY.FREEID fails WBCACHE_NOT_COMPLETE"),
    Rule(L.TDH_PHYMEM_CACHE_WB, ("VM destruction",), OTHER, None, ONCE, NO_FREEID,
         "WARN_ON_ONCE only; KEY.FREEID then fails WBCACHE_NOT_COMPLETE: KVM_BUG_ON"),
    Rule(L.TDH_MNG_KEY_FREEID, ("VM destruction",), "every status", None, ONCE,
         Outcome("KVM_BUG, HKID and TD pages leaked", bugged=True, leaks=ALL_TD_PAGES),
         "KVM_BUG_ON, 'HKID is leaked'; no page can be reclaimed while it is assigned"),
    Rule(L.TDH_PHYMEM_PAGE_RECLAIM, ("VM destruction (TDCX page)",), "every status", None, ONCE,
         Outcome("TDCX and TDR leaked", leaks=_leaks("tdcx", "tdr")),
         "WARN_ON_ONCE, the page is leaked; the TDR then still has a child "
         "(TD_ASSOCIATED_PAGES_EXIST) and is leaked too"),
    Rule(L.TDH_PHYMEM_PAGE_RECLAIM, ("VM destruction (TDVPR page)",), "every status", None, ONCE,
         Outcome("TDVPR and TDR leaked", leaks=_leaks("tdvpr", "tdr")), "as for TDCX"),
    Rule(L.TDH_PHYMEM_PAGE_RECLAIM, ("VM destruction (S-EPT page)",), "every status", None, ONCE,
         Outcome("S-EPT page and TDR leaked", leaks=_leaks("sept", "tdr")),
         "tdx_reclaim_page fails: handle_removed_pt WARNs and leaks the page; the TDR follows"),
    Rule(L.TDH_PHYMEM_PAGE_RECLAIM, ("VM destruction (TDCS page)",), "every status", None, ONCE,
         Outcome("TDCS and TDR leaked", leaks=_leaks("tdcs", "tdr")), "as for TDCX"),
    Rule(L.TDH_PHYMEM_PAGE_RECLAIM, ("VM destruction (TDR page)",), "every status", None, ONCE,
         Outcome("TDR leaked", leaks=_leaks("tdr")),
         "__tdx_reclaim_page of the TDR fails: return, TDR leaked (no WBINVD)"),
    Rule(L.TDH_PHYMEM_PAGE_WBINVD, ("VM destruction (TDR page)",), "every status", None, ONCE,
         Outcome("KVM_BUG, TDR leaked", bugged=True, leaks=_leaks("tdr")),
         "tdh_phymem_page_wbinvd_tdr: KVM_BUG_ON, the TDR is not freed"),
]


class Case(NamedTuple):
    """One injection test: ``status`` into ``leaf`` at ``site``, ``mode`` times; expect ``rule.outcome``."""

    leaf: Leaf
    site: str
    status: int
    mode: str
    rule: Rule

    @property
    def id(self) -> str:
        """A stable pytest id."""
        site = "".join(c if c.isalnum() else "_" for c in self.site).strip("_")
        return f"{self.leaf.name[4:]}-{site}-{TdxStatus(self.status).name.replace('TDX_', '')}-{self.mode}"


def cases() -> List[Case]:
    """Expand :data:`RULES` over every status of each leaf (first matching rule per mode wins)."""
    out: List[Case] = []
    groups: Dict[Tuple[Leaf, str, str], List[Rule]] = {}
    for r in RULES:
        for site in r.sites:
            if site not in SITES:
                msg = f"rule for {r.leaf.name} names unknown site {site!r}"
                raise ValueError(msg)
            groups.setdefault((r.leaf, site, r.mode), []).append(r)
    for (leaf, site, mode), rules in groups.items():
        for status in sorted(LEAF_STATUSES[leaf]):
            for r in rules:
                if r.match is None or r.match(status):
                    out.append(Case(leaf, site, status, mode, r))
                    break
    return out


#: Leaves KVM (6.18) issues: every one must have at least one rule.
KVM_LEAVES = (L.TDH_MNG_CREATE, L.TDH_MNG_KEY_CONFIG, L.TDH_MNG_ADDCX, L.TDH_MNG_INIT, L.TDH_MNG_RD,
              L.TDH_VP_CREATE, L.TDH_VP_ADDCX, L.TDH_VP_INIT, L.TDH_VP_ENTER, L.TDH_VP_FLUSH,
              L.TDH_MNG_VPFLUSHDONE, L.TDH_PHYMEM_CACHE_WB, L.TDH_MNG_KEY_FREEID,
              L.TDH_PHYMEM_PAGE_RECLAIM, L.TDH_PHYMEM_PAGE_WBINVD, L.TDH_MEM_SEPT_ADD,
              L.TDH_MEM_PAGE_ADD, L.TDH_MR_EXTEND, L.TDH_MR_FINALIZE, L.TDH_MEM_PAGE_AUG,
              L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_TRACK, L.TDH_MEM_PAGE_REMOVE)
