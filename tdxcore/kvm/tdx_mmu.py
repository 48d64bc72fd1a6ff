"""The four 6.18 mirror hooks of TDX (``arch/x86/kvm/vmx/tdx.c``, v6.18; tdx-facts §3.4, §3.6, §4.1).

* ``link_external_spt`` → :func:`tdx_sept_link_private_spt`: TDH.MEM.SEPT.ADD; BUSY → -EBUSY,
  anything else → KVM_BUG, -EIO.
* ``set_external_spte`` → :func:`tdx_sept_set_private_spte`: 4K only; before finalize only
  ``nr_premapped += 1`` (PAGE.ADD comes from INIT_MEM_REGION); RUNNABLE: TDH.MEM.PAGE.AUG (BUSY →
  -EBUSY, else KVM_BUG, -EIO).
* ``remove_external_spte`` → :func:`tdx_sept_remove_private_spte`: the zap, BLOCK → ``tdx_track``
  (TRACK + kick all vCPUs) → REMOVE → WBINVD(hkid) → clear (erratum hosts only). BLOCK, TRACK and
  REMOVE get the policy's retry (:mod:`tdxcore.kvm.policy`; 6.18: on BUSY set ``wait_for_sept_zap``,
  kick every vCPU out of the guest, retry once, clear the flag); a failure after it is a KVM_BUG.
  Before finalize, BLOCK answering ``EPT_ENTRY_STATE_INCORRECT|RCX`` for a premapped page that was
  never PAGE.ADDed decrements ``nr_premapped`` and succeeds. A page that cannot be
  removed stays pinned: it is recorded as a ``private`` leak (tdx-facts §5.8).
* ``free_external_spt`` → :func:`tdx_sept_free_private_spt`: only after the HKID is released
  (else KVM_BUG, page leaked); TDH.PHYMEM.PAGE.RECLAIM + clear (erratum) + free; failure → leak.

This is the only file where KVM's ``pg_level`` (1 = 4K) becomes the module's ``level`` (0 = 4K)
(STYLE §2.2), and, with ``tdx_vm.py``, where a module status becomes an errno (STYLE §2.3).
Counters (``host.stats``): ``nr_zap_busy_retries`` (a zap SEAMCALL retried after BUSY) and
``nr_kicks`` (KVM_REQ_OUTSIDE_GUEST_MODE broadcasts).
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Generator

from tdxcore.constants import PAGE_SHIFT, PG_LEVEL_4K
from tdxcore.kvm.policy import kick_all_vcpus
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_SUCCESS,
)

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["pg_level_to_tdx_sept_level", "tdx_sept_link_private_spt", "tdx_sept_set_private_spte",
           "tdx_sept_remove_private_spte", "tdx_sept_zap_private_spte", "tdx_sept_drop_private_spte",
           "tdx_sept_free_private_spt", "tdx_track", "TdxMirrorOps", "ZAP_PREMAPPED"]


def pg_level_to_tdx_sept_level(pg_level: int) -> int:
    """``pg_level_to_tdx_sept_level``: KVM's 1 = 4K → the module's 0 = 4K."""
    return pg_level - PG_LEVEL_4K


#: The module's level of a 4K leaf (private mappings are 4K only, SPEC §4.12).
_LEVEL_4K = PG_LEVEL_4K - PG_LEVEL_4K
#: ``TdState.RUNNABLE`` of :mod:`tdxcore.kvm.tdx_vm` (an IntEnum; a function-level import per call cost ~1 µs)
_TD_RUNNABLE = 2
#: :func:`tdx_sept_zap_private_spte`'s "nothing to remove" (a premapped page never added).
ZAP_PREMAPPED = 1


def _gpa(gfn: int) -> int:
    return gfn << PAGE_SHIFT


def _is_busy(res: Any) -> bool:
    return bool(res.status.base == TDX_OPERAND_BUSY)


def _map_errno(vm: "TdxVm", leaf: str, gfn: int, res: Any) -> int:
    """Map a map-path status to an errno: SUCCESS 0, BUSY -EBUSY (RET_PF_RETRY), else KVM_BUG + -EIO."""
    if res.status == TDX_SUCCESS:
        return 0
    if _is_busy(res):
        return -_errno.EBUSY
    vm.bug(f"{leaf} gfn={gfn:#x}: {res.status.name}")
    return -_errno.EIO


def tdx_sept_link_private_spt(vm: "TdxVm", gfn: int, pg_level: int, spt: int,
                              actor: str = "host") -> Generator[Any, Any, int]:
    """``tdx_sept_link_private_spt``: TDH.MEM.SEPT.ADD at ``pg_level - 1``; 0, -EBUSY or -EIO.

    The SEAMCALL goes through the policy's map-path wrapper (6.18: once; 2023: retried while
    BUSY|SEPT_TREE).
    """
    tdr = vm.tdr
    assert tdr is not None
    t, gpa, level = vm.kvm.host.tdx, _gpa(gfn), pg_level_to_tdx_sept_level(pg_level)
    res = yield from vm.policy.map_seamcall(
        vm, lambda: t.tdh_mem_sept_add_op(tdr, gpa, level, spt, actor=actor))
    return _map_errno(vm, "TDH.MEM.SEPT.ADD", gfn, res)


def tdx_sept_set_private_spte(vm: "TdxVm", gfn: int, pg_level: int, pfn: int,
                              actor: str = "host") -> Generator[Any, Any, int]:
    """``tdx_sept_set_private_spte``: premap before finalize, TDH.MEM.PAGE.AUG when RUNNABLE."""
    if pg_level != PG_LEVEL_4K:
        vm.bug(f"set_external_spte at pg_level {pg_level}: only 4K private pages")
        return -_errno.EIO
    if vm.td_state != _TD_RUNNABLE:
        vm.nr_premapped += 1
        return 0
    tdr = vm.tdr
    assert tdr is not None
    t, gpa, level = vm.kvm.host.tdx, _gpa(gfn), pg_level_to_tdx_sept_level(pg_level)
    res = yield from vm.policy.map_seamcall(
        vm, lambda: t.tdh_mem_page_aug_op(tdr, gpa, level, pfn, actor=actor))
    return _map_errno(vm, "TDH.MEM.PAGE.AUG", gfn, res)


def tdx_track(vm: "TdxVm") -> Generator[Any, Any, None]:
    """``tdx_track``: no-op before finalize; TDH.MEM.TRACK (policy retry; failure → KVM_BUG), kick."""
    if vm.td_state != _TD_RUNNABLE:
        return
    t = vm.kvm.host.tdx
    tdr = vm.tdr
    assert tdr is not None
    res = yield from vm.policy.track(vm, lambda: t.tdh_mem_track_op(tdr))
    if res.status != TDX_SUCCESS:
        vm.bug(f"TDH.MEM.TRACK: {res.status.name}")
    yield from kick_all_vcpus(vm)


def tdx_sept_remove_private_spte(vm: "TdxVm", gfn: int, pg_level: int,
                                 pfn: int) -> Generator[Any, Any, int]:
    """``tdx_sept_remove_private_spte`` (6.18): zap one private 4K page (caller holds mmu_lock write).

    Returns 0 or -errno; on -EIO the VM is bugged and ``pfn`` is recorded as a ``private`` leak.
    On a TD whose HKID KVM_TDX_TERMINATE_VM released (the opt-in extension), the page is
    reclaimed directly instead (:func:`tdx_reclaim_terminated_private_page`).
    """
    if vm.hkid is None and vm.tdr is not None and getattr(vm, "terminated", False):
        return tdx_reclaim_terminated_private_page(vm, gfn, pg_level, pfn)
    if vm.hkid is None or vm.tdr is None:
        vm.bug(f"remove_external_spte gfn={gfn:#x} without an HKID")
        vm._leak(pfn, "private", "zap without an HKID")
        return -_errno.EINVAL
    if pg_level != PG_LEVEL_4K:
        vm.bug(f"remove_external_spte at pg_level {pg_level}")
        vm._leak(pfn, "private", "zap of a huge page")
        return -_errno.EINVAL
    ret = yield from tdx_sept_zap_private_spte(vm, gfn, pfn)
    if ret:
        return 0 if ret == ZAP_PREMAPPED else ret
    yield from tdx_track(vm)
    return (yield from tdx_sept_drop_private_spte(vm, gfn, pfn))


def tdx_sept_zap_private_spte(vm: "TdxVm", gfn: int, pfn: int) -> Generator[Any, Any, int]:
    """``tdx_sept_zap_private_spte`` (6.18): TDH.MEM.RANGE.BLOCK of one 4K page (policy retry).

    Returns 0 (blocked), :data:`ZAP_PREMAPPED` (before finalize, a premapped page never
    PAGE.ADDed: BLOCK answers ``EPT_ENTRY_STATE_INCORRECT|RCX``, ``nr_premapped`` is decremented
    and nothing is left to remove), or -EIO with the VM bugged and ``pfn`` recorded as a
    ``private`` leak.
    """
    t, tdr, gpa = vm.kvm.host.tdx, vm.tdr, _gpa(gfn)
    assert tdr is not None
    res = yield from vm.policy.zap_seamcall(vm, lambda: t.tdh_mem_range_block_op(tdr, gpa, _LEVEL_4K))
    if res.status != TDX_SUCCESS:
        if (vm.td_state != _TD_RUNNABLE and vm.nr_premapped > 0
                and res.status == TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX):
            # tdx_is_sept_zap_err_due_to_premap: premapped, never PAGE.ADDed; unpin
            vm.nr_premapped -= 1
            return ZAP_PREMAPPED
        vm.bug(f"TDH.MEM.RANGE.BLOCK gfn={gfn:#x}: {res.status.name}")
        vm._leak(pfn, "private", f"TDH.MEM.RANGE.BLOCK: {res.status.name}")
        return -_errno.EIO
    return 0


def tdx_sept_drop_private_spte(vm: "TdxVm", gfn: int, pfn: int) -> Generator[Any, Any, int]:
    """``tdx_sept_drop_private_spte`` (6.18): REMOVE (policy retry), WBINVD(hkid), erratum clear.

    The page must be blocked and tracked. Returns 0, or -EIO with the VM bugged and ``pfn``
    recorded as a ``private`` leak (it stays pinned).
    """
    host = vm.kvm.host
    t, tdr, hkid, gpa = host.tdx, vm.tdr, vm.hkid, _gpa(gfn)
    assert tdr is not None and hkid is not None
    res = yield from vm.policy.zap_seamcall(vm, lambda: t.tdh_mem_page_remove_op(tdr, gpa, _LEVEL_4K))
    if res.status != TDX_SUCCESS:
        vm.bug(f"TDH.MEM.PAGE.REMOVE gfn={gfn:#x}: {res.status.name}")
        vm._leak(pfn, "private", f"TDH.MEM.PAGE.REMOVE: {res.status.name}")
        return -_errno.EIO
    res = t.tdh_phymem_page_wbinvd(pfn, hkid)
    if res.status != TDX_SUCCESS:
        vm.bug(f"TDH.PHYMEM.PAGE.WBINVD gfn={gfn:#x}: {res.status.name}")
        vm._leak(pfn, "private", f"TDH.PHYMEM.PAGE.WBINVD: {res.status.name}")
        return -_errno.EIO
    if host.cpu_erratum_pw_mce:
        host.frame_clear(pfn)               # tdx_quirk_reset_page
    return 0


def tdx_sept_free_private_spt(vm: "TdxVm", gfn: int, pg_level: int, spt: int) -> int:
    """``tdx_sept_free_private_spt``: RECLAIM + clear + free the S-EPT page (HKID must be released).

    Returns 0, -EINVAL (HKID still assigned: KVM_BUG, page leaked) or -EIO (RECLAIM failed: leaked).
    """
    del gfn, pg_level
    if vm.hkid is not None:
        vm.bug("free_external_spt with the HKID still assigned")
        vm._leak(spt, "sept", "HKID still assigned at S-EPT page free")
        return -_errno.EINVAL
    if not vm._reclaim_page(spt, "sept"):
        return -_errno.EIO
    vm.kvm.host.free_frame(spt)
    return 0


class TdxMirrorOps:
    """The mirror hooks of one TD, for :class:`~tdxcore.kvm.mmu.MirrorMmu`."""

    def __init__(self, vm: "TdxVm") -> None:
        self.vm = vm

    def link_external_spt(self, gfn: int, pg_level: int, spt: int,
                          actor: str = "host") -> Generator[Any, Any, int]:
        """See :func:`tdx_sept_link_private_spt`."""
        return tdx_sept_link_private_spt(self.vm, gfn, pg_level, spt, actor)

    def set_external_spte(self, gfn: int, pg_level: int, pfn: int,
                          actor: str = "host") -> Generator[Any, Any, int]:
        """See :func:`tdx_sept_set_private_spte`."""
        return tdx_sept_set_private_spte(self.vm, gfn, pg_level, pfn, actor)

    def remove_external_spte(self, gfn: int, pg_level: int, pfn: int) -> Generator[Any, Any, int]:
        """See :func:`tdx_sept_remove_private_spte`."""
        return tdx_sept_remove_private_spte(self.vm, gfn, pg_level, pfn)

    def free_external_spt(self, gfn: int, pg_level: int, spt: int) -> int:
        """See :func:`tdx_sept_free_private_spt`."""
        return tdx_sept_free_private_spt(self.vm, gfn, pg_level, spt)

    def alloc_spt(self) -> int:
        """Allocate a zeroed host page for an external page table (``HostError`` when out of frames)."""
        host = self.vm.kvm.host
        pfn = host.alloc_frame()
        host.frame_clear(pfn)
        return int(pfn)

    def free_spt(self, spt: int) -> None:
        """Give an unused external page back (its SEPT.ADD failed)."""
        self.vm.kvm.host.free_frame(spt)

def tdx_reclaim_terminated_private_page(vm: "TdxVm", gfn: int, pg_level: int, pfn: int) -> int:
    """Zap a private page of a terminated TD: one TDH.PHYMEM.PAGE.RECLAIM (+ reset on erratum hosts).

    The extension's branch of ``tdx_sept_remove_private_spte`` (KVM_TDX_TERMINATE_VM series,
    v4 e4775f57ad51 / 5/5 of Jul 2025; not in 6.18): once the HKID is released the TD is in
    TEARDOWN, the module no longer translates through its S-EPT and CACHE.WB already wrote
    back every line of the HKID, so no BLOCK, TRACK, kick, REMOVE or per-page WBINVD is needed
    (``tdx_reclaim_page``: RECLAIM, then ``tdx_quirk_reset_page``). 5/5's sanity check
    ("HKID assigned or TD terminated") is the caller's condition. A 2M/1G leaf cannot exist
    (4K only): KVM_BUG, leaked. A failed RECLAIM is only a WARN upstream and the page stays
    pinned: here it is recorded as a ``private`` leak and -EIO returned, the VM not bugged.
    """
    del gfn
    if pg_level != PG_LEVEL_4K:
        vm.bug(f"remove_external_spte at pg_level {pg_level} on a terminated TD")
        vm._leak(pfn, "private", "zap of a huge page")
        return -_errno.EINVAL
    if not vm._reclaim_page(pfn, "private"):
        return -_errno.EIO
    return 0
