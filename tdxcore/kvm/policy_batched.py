"""A batched-TRACK zap policy — **not upstream: an optimisation a policy may add** (anchors A24).

Linux 6.18 zaps private memory one 4K page at a time: BLOCK → TRACK + kick → REMOVE → WBINVD
(``tdx_sept_remove_private_spte``, v6.18 ``arch/x86/kvm/vmx/tdx.c``; :mod:`tdxcore.kvm.tdx_mmu`), so
a range of N pages costs N TRACKs and N ``KVM_REQ_OUTSIDE_GUEST_MODE`` broadcasts. The module only
needs one TRACK (and the wait for the vCPUs of the previous epoch) between a page's BLOCK and its
REMOVE, so a range can be zapped as

1. BLOCK every present page (its mirror SPTE frozen, as the per-page path freezes it);
2. one TDH.MEM.TRACK + one kick;
3. REMOVE + WBINVD (+ clear on erratum hosts) every blocked page, clearing its mirror SPTE.

:class:`BatchedTrackPolicy` does that. It is :class:`~tdxcore.kvm.policy.Linux618Policy` in every
other respect (same BUSY retry — try once, kick, retry once — same bounds and BUSY allowlist); only
its :attr:`~Policy.name` differs, so reports and invariant I09 (which checks 6.18's retry by the
policy name) never mistake it for upstream.

The hook is a policy method, ``zap_range(vm, gfns)``: when the policy has one,
``TdxVm.zap_private_locked`` (the TD's range zap, ``mmu_lock`` held for write) hands it the gfns
with a mirror leaf in the range and returns what it returns (the gfns whose zap failed). A TD that
is not RUNNABLE with an HKID (before finalize, after KVM_TDX_TERMINATE_VM) is zapped page by page
exactly as 6.18 does: there is no TRACK to batch there.

Failures are handled as the per-page path handles them: any BLOCK, TRACK, REMOVE or WBINVD failure
after the policy's retry is a KVM_BUG, and the page that could not be removed stays pinned and is
recorded as a ``private`` leak; its mirror SPTE is cleared whatever happened (``tdp_mmu.c`` clears
it before it calls the hook). A failed TRACK leaves the pages blocked but untracked: their REMOVE
then fails (``TLB_TRACKING_NOT_DONE``) and each is leaked, as 6.18's REMOVE after a failed TRACK.

Example
-------
>>> from tdxcore.kvm import Kvm
>>> from tdxcore.kvm.policy_batched import BATCHED_TRACK
>>> # Kvm(host, policy=BATCHED_TRACK)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, List, Sequence, Set

from tdxcore.kvm.mmu import SpteState
from tdxcore.kvm.policy import Linux618Policy
from tdxcore.kvm.tdx_mmu import tdx_sept_drop_private_spte, tdx_sept_zap_private_spte, tdx_track

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["BatchedTrackPolicy", "BATCHED_TRACK"]

class BatchedTrackPolicy(Linux618Policy):
    """6.18's retries, with one TRACK + kick per zapped range instead of per page (not upstream).

    Attributes
    ----------
    name : str
        ``"BATCHED_TRACK"``.
    upstream : bool
        False: no kernel zaps this way; reports must say so (anchors A24).
    """

    name = "BATCHED_TRACK"
    upstream = False

    def zap_range(self, vm: "TdxVm", gfns: Sequence[int]) -> Generator[Any, Any, List[int]]:
        """Zap the mirror leaves at ``gfns`` (``mmu_lock`` write held); return the gfns that failed.

        Called by ``TdxVm.zap_private_locked``. Gfns whose leaf is not present (absent or frozen)
        are skipped, as the per-page loop skips them.
        """
        from tdxcore.kvm.tdx_vm import TdState

        if vm.td_state != TdState.RUNNABLE or vm.hkid is None or vm.tdr is None:
            return (yield from vm.zap_leaves_per_page(gfns))
        # The mirror's leaf table: a frozen SPTE is (pfn, FROZEN), a cleared one is absent
        # (MirrorMmu.zap_private_leaf_locked does the same for one page).
        leaves = vm.mmu._leaves
        failed: List[int] = []
        frozen: Set[int] = set()
        blocked: List[int] = []
        try:
            # 1. BLOCK each page (tdx_sept_zap_private_spte without its tdx_track)
            for gfn in gfns:
                cur = leaves.get(gfn)
                if cur is None or cur[1] != SpteState.PRESENT:
                    continue
                pfn = cur[0]
                leaves[gfn] = (pfn, SpteState.FROZEN)
                frozen.add(gfn)
                if (yield from tdx_sept_zap_private_spte(vm, gfn, pfn)):
                    failed.append(gfn)           # KVM_BUG and a private leak, as the per-page path
                    _clear(leaves, frozen, gfn)
                    continue
                blocked.append(gfn)
            # 2. one TRACK + kick for the whole batch (failure: KVM_BUG inside tdx_track)
            if blocked:
                vm.count("nr_batched_tracks")
                yield from tdx_track(vm)
            # 3. REMOVE + WBINVD each (tdx_sept_drop_private_spte)
            for gfn in blocked:
                pfn = leaves[gfn][0]
                try:
                    if (yield from tdx_sept_drop_private_spte(vm, gfn, pfn)):
                        failed.append(gfn)
                finally:
                    _clear(leaves, frozen, gfn)
        finally:
            for gfn in list(frozen):           # closed mid-batch: never leave a SPTE frozen
                _clear(leaves, frozen, gfn)
        return sorted(failed)


def _clear(leaves: Any, frozen: Set[int], gfn: int) -> None:
    """Make the frozen mirror SPTE of ``gfn`` non-present."""
    leaves.pop(gfn, None)
    frozen.discard(gfn)


#: The shared instance (``Kvm(host, policy=BATCHED_TRACK)``); not in ``POLICIES`` (not upstream).
BATCHED_TRACK = BatchedTrackPolicy()
