"""KVM run-time memory invariants (SPEC §6; tdx-facts "Invariants" 6, 8–14; issue 6).

Registered with ``layer="kvm"`` when imported (from ``tdxcore.invariants``). Like :mod:`.kvm` it
reads KVM objects duck-typed and imports nothing from ``tdxcore.kvm``. Each check is either
*structural* (the live VMs' state: mirror and direct roots, attribute store, ``mmu_invalidate``,
the module's S-EPT records shared with :mod:`.module` through the per-call cache — O(live TD
pages)) or *sequential* (one incremental :class:`KvmScan` per host over the event log —
O(new events) per check). The first sequential violation of each id is kept and re-reported.

* **I06** — an AUGed page stays PENDING until the guest's ACCEPT succeeds: every gfn PAGE.AUG
  mapped and no ACCEPT/REMOVE has touched since is a PENDING* S-EPT leaf, and every PENDING*
  leaf was AUGed (state). A guest access to a PENDING page is a #VE, never an EPT-violation TD
  exit, unless the TD has SEPT_VE_DISABLE; then KVM kills the VM before any vCPU of it enters
  again (events).
* **I08** — TDH.MEM.TRACK succeeds only with no vCPU of the TD in the guest in epoch
  TD_EPOCH−1 (epoch and per-epoch counts folded from MNG.INIT, TRACK and VP.ENTER/exit); after a
  successful TRACK KVM kicks the TD's vCPUs (a ``kick`` event) and every vCPU that was in the
  guest at the kick has exited before the next TRACK of the TD (events).
* **I09** (policy ``LINUX_6_18``) — a BLOCK/TRACK/REMOVE that returned BUSY is retried once,
  after a kick, with no vCPU of the TD in the guest; a failure of that retry (and any non-BUSY
  failure of those leaves on a finalized TD) bugs the VM (``vm_bug``) before the TD sees another
  SEAMCALL end (events). The ``mmu_lock`` mode at SEAMCALL time is not in the log and the module
  has no observer hook: that half is not checked (see the session report).
* **I10** — no present mirror leaf and no S-EPT leaf of a VM's TD is at a gfn whose attribute is
  shared, and no direct (shared) mapping of a frame is at a private gfn (state; MMIO SPTEs and
  pages KVM recorded as leaked are exempt); a fault that mapped (RET_PF_FIXED) had the access
  kind of the attribute at that point of the log (events: attributes folded from
  ``set_memory_attributes``).
* **I11** — every attribute store happens inside an ``mmu_invalidate`` window whose range covers
  the changed gfns that lie in memslots (an observer on the VM's ``pre_``/``post_set_memory_
  attributes`` points, installed at the VM's first check); a fault that mapped did so with its
  ``seq`` snapshot current and outside any open invalidation range (events).
* **I12** — ``invalidate_begin``/``end`` events are balanced per VM (no end below zero), a begin
  raises the count by one (further ranges of the same begin keep it), every end bumps ``seq`` by
  one; the tracker's ``in_progress``/``seq``/range equal what the events imply (the hull of the
  ranges since the 0→1 begin) and it never warned (a begin with no range).
* **I13** — the attribute store equals the fold of the ``set_memory_attributes`` events (a
  failed request — ENOMEM — changed nothing; nothing changes without being logged), and no
  change event was for a range that already held the attributes (a no-op request must not
  invalidate or store).
* **I14** — S-EPT leaves of every TD are 4K (no level ≥ 1 leaf); every present mirror leaf and
  every direct mapping of a frame lies inside one of the VM's memslots (state).
* **S6a** — no host-reachable frame holds data written under a private KeyID: the frames of
  direct (shared) mappings and of user memory are never a live TD's private page or guest_memfd
  page, and their last writer is never a private KeyID (state).
* **S6d** — consecutive BUSY retries of one SEAMCALL (same TD, leaf, gfn) stay within the VM
  policy's :meth:`bounds` (``zap_retries_per_call`` / ``sept_retries_per_call`` /
  ``track_retries_per_call`` by leaf; a bound the policy does not name is unchecked; any
  ``fault`` event of the VM restarts the map-path counts), and the fault attempts for one
  EPT-violation exit (``fault`` events of the exit's gpa by that vCPU until an attempt ends other
  than RET_PF_RETRY, the vCPU enters again or a KVM_RUN of its VM returns) are at most
  ``local_retries_per_fault + 1`` (events).
* **S6e** — every VM's ``mmu_invalidate.in_progress`` equals ``nr_open_invalidations`` (the
  invalidations KVM code has begun and not ended): it is 0 whenever no actor is inside one
  (state).

The event-log half (:class:`~tdxcore.invariants.kvm_scan.KvmScan`) lives in :mod:`.kvm_scan`.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from tdxcore.constants import PAGE_SHIFT, SEPT_PFN_MASK
from tdxcore.errors import InvariantViolation
from tdxcore.invariants.kvm_scan import _PRIVATE, KvmScan, _vms, _VmShadow, kvm_scan
from tdxcore.invariants.module import _fail, records
from tdxcore.invariants.registry import register_invariant, replay_hint

__all__ = ["KvmScan", "kvm_scan", "check_i06", "check_i08", "check_i09", "check_i10", "check_i11",
           "check_i12", "check_i13", "check_i14", "check_s6a", "check_s6d", "check_s6e", "KVM_MEMORY_IDS"]

#: The ids this module registers, in check order.
KVM_MEMORY_IDS = ("I06", "I08", "I09", "I10", "I11", "I12", "I13", "I14", "S6a", "S6d", "S6e")
#: S-EPT states (by name prefix) of a page AUGed and not yet accepted.
_PENDING_PREFIX = "PENDING"


def _tds(host: Any) -> Iterator[Any]:
    for vm in _vms(host):
        if hasattr(vm, "td_state") and hasattr(vm, "mmu"):
            yield vm


def _raise_found(host: Any, inv: str) -> None:
    s = kvm_scan(host)
    v = s.found.get(inv)
    if v is not None:
        msg, gfn, pfn, idx = v
        raise InvariantViolation(inv, msg, gfn=gfn, pfn=pfn, event_index=idx, replay=replay_hint(host, idx))


def _kvm_ran(host: Any) -> bool:
    return "ioctl" in host.events.kinds


# ---------------------------------------------------------------------------------- observers (I11)
#: host -> first violation an observer saw (kept: a broken model stays broken).
_OBSERVED: "weakref.WeakKeyDictionary[Any, InvariantViolation]" = weakref.WeakKeyDictionary()
#: VMs that carry the I11 observer.
_WATCHED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _slot_parts(vm: Any, start: int, end: int) -> List[Tuple[int, int]]:
    out = []
    for slot in vm.memslots:
        lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
        if lo < hi:
            out.append((lo, hi))
    return out


def _observe_attr_change(vm: Any, *, start: int, end: int, attributes: int, where: str) -> None:
    host = vm.kvm.host
    if host in _OBSERVED:
        return
    inv = vm.mmu_invalidate
    parts = _slot_parts(vm, start, end)
    if not parts:
        return
    rng = inv.range
    bad = None
    if inv.in_progress <= 0:
        bad = "with no mmu_invalidate in progress"
    elif rng is None or any(lo < rng[0] or hi > rng[1] for lo, hi in parts):
        r = "INVALID" if rng is None else f"[{rng[0]:#x}, {rng[1]:#x})"
        bad = f"outside the invalidation range {r}"
    if bad is not None:
        idx = max(len(host.events) - 1, 0)
        _OBSERVED[host] = InvariantViolation(
            "I11", f"VM {vm.id}: attributes {attributes:#x} of gfns [{start:#x}, {end:#x}) changed "
            f"({where}) {bad}",
            gfn=parts[0][0], event_index=idx, replay=replay_hint(host, idx))


def _watch(host: Any) -> None:
    for vm in _vms(host):
        if vm in _WATCHED or not hasattr(vm, "add_hook"):
            continue
        vm.add_hook("pre_set_memory_attributes",
                    lambda vm, **kw: _observe_attr_change(vm, where="before the store", **kw))
        vm.add_hook("post_set_memory_attributes",
                    lambda vm, **kw: _observe_attr_change(vm, where="after the store", **kw))
        _WATCHED.add(vm)


# ---------------------------------------------------------------------------------- checks
def _leaked(host: Any) -> Set[int]:
    c = host.leaks
    return {r.pfn for r in c if r.pfn is not None} if c else set()


def check_i06(host: Any) -> None:
    """I06: AUGed pages stay PENDING until accepted; a PENDING access is a #VE or (VE disabled) fatal."""
    if not _kvm_ran(host):
        return
    s = kvm_scan(host)
    _raise_found(host, "I06")
    for rec in records(host):
        sh = s.tdsh.get(rec.tdr)
        if sh is None or rec.teardown:
            continue
        pend = set(sh.pending)
        for lv, gpa, _, st in rec.entries:
            if lv or st is None:
                continue
            gfn = gpa >> PAGE_SHIFT
            is_pending = st.name.startswith(_PENDING_PREFIX)
            if is_pending and gfn not in pend:
                raise _fail(host, "I06",
                    f"TD tdr={rec.tdr:#x}: gfn {gfn:#x} is {st.name} but no PAGE.AUG of it "
                    "is outstanding", gfn=gfn, pfn=rec.tdr)
            if not is_pending and gfn in pend:
                raise _fail(host, "I06",
                    f"TD tdr={rec.tdr:#x}: gfn {gfn:#x} was AUGed and never accepted, yet "
                    f"its S-EPT entry is {st.name}", gfn=gfn, pfn=rec.tdr)
            pend.discard(gfn)


def check_i08(host: Any) -> None:
    """I08: TRACK with no vCPU in TD_EPOCH−1; a kick (that waits) after each TRACK before the next."""
    if _kvm_ran(host):
        _raise_found(host, "I08")


def check_i09(host: Any) -> None:
    """I09 (event part): 6.18 zap BUSY → kick → one retry with vCPUs out; a second failure bugs the VM."""
    if _kvm_ran(host):
        _raise_found(host, "I09")


def check_i10(host: Any) -> None:
    """I10: no private mapping at a shared gfn, no shared mapping at a private gfn; faults match."""
    if not _kvm_ran(host):
        return
    _raise_found(host, "I10")
    leaked: Optional[Set[int]] = None
    by_tdr = {vm.tdr: vm for vm in _tds(host) if vm.tdr is not None}
    for vm in _vms(host):
        if not vm.has_private_mem:
            continue
        attr = vm.mem_attr
        if hasattr(vm, "mmu"):
            for gfn, pfn in vm.mmu.leaves:
                if not attr.get(gfn) & _PRIVATE:
                    raise _fail(host, "I10", f"VM {vm.id}: private mirror leaf at shared gfn {gfn:#x}",
                                gfn=gfn, pfn=pfn)
        for gfn, pfn in vm.direct.items():
            if pfn >= 0 and attr.get(gfn) & _PRIVATE:
                raise _fail(host, "I10",
                    f"VM {vm.id}: shared mapping at private gfn {gfn:#x}", gfn=gfn, pfn=pfn)
    for rec in records(host):
        tvm = by_tdr.get(rec.tdr)
        if tvm is None:
            continue
        for lv, gpa, e, st in rec.entries:
            if st is None or st.name in ("FREE", "REMOVED", "NL_MAPPED", "NL_BLOCKED"):
                continue
            gfn = gpa >> PAGE_SHIFT
            span = 1 << (9 * lv)
            if tvm.mem_attr.has_range(gfn, gfn + span, _PRIVATE, _PRIVATE):
                continue
            if leaked is None:
                leaked = _leaked(host)
            pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT
            if pfn in leaked:
                continue                        # KVM gave it up on purpose (KVM_BUG + leak record)
            raise _fail(host, "I10", f"VM {tvm.id}: S-EPT leaf {st.name} at gfn {gfn:#x} (level {lv}) whose "
                        "attribute is shared", gfn=gfn, pfn=pfn)


def check_i11(host: Any) -> None:
    """I11: attribute stores inside a covering invalidation; faults inside one (or stale) retry."""
    if not _kvm_ran(host):
        return
    _watch(host)
    found = _OBSERVED.get(host)
    if found is not None:
        raise found
    _raise_found(host, "I11")


def check_i12(host: Any) -> None:
    """I12: begin/end balanced and well-formed; the tracker equals what the events imply."""
    if not _kvm_ran(host):
        return
    s = kvm_scan(host)
    _raise_found(host, "I12")
    for vm in _vms(host):
        inv = vm.mmu_invalidate
        sh = s.vmsh.get(f"vm{vm.id}") or _VmShadow()
        if inv.in_progress < 0 or inv.nr_warnings:
            raise _fail(host, "I12", f"VM {vm.id}: mmu_invalidate in_progress {inv.in_progress}, "
                        f"{inv.nr_warnings} warning(s) (an end with no range added)")
        if inv.in_progress != sh.open or inv.seq != sh.seq:
            raise _fail(host, "I12",
                f"VM {vm.id}: mmu_invalidate in_progress {inv.in_progress} seq {inv.seq}, "
                f"the begin/end events give {sh.open} and {sh.seq}")
        if sh.open and inv.range != sh.hull:
            raise _fail(host, "I12",
                f"VM {vm.id}: mmu_invalidate range {inv.range} is not the hull {sh.hull} "
                "of the ranges added since the 0→1 begin")


def check_i13(host: Any) -> None:
    """I13: the store is the fold of the change events (all-or-nothing); no no-op invalidates."""
    if not _kvm_ran(host):
        return
    s = kvm_scan(host)
    _raise_found(host, "I13")
    for vm in _vms(host):
        if not vm.has_private_mem:
            continue
        sh = s.vmsh.get(f"vm{vm.id}") or _VmShadow()
        got = list(vm.mem_attr.runs())
        want = list(sh.attrs.runs())
        if got != want:
            edges = sorted({x for r in got + want for x in r[:2]})
            gfn = next((g for g in edges if vm.mem_attr.get(g) != sh.attrs.get(g)), edges[0])
            raise _fail(host, "I13", f"VM {vm.id}: attribute store {got[:4]} differs from its "
                        f"set_memory_attributes events {want[:4]} (a change without its event: partial or "
                        "failed request)", gfn=gfn)


def check_i14(host: Any) -> None:
    """I14: private S-EPT leaves are 4K; every mirror leaf and direct mapping is inside a memslot."""
    if not _kvm_ran(host):
        return
    for rec in records(host):
        for lv, gpa, _, st in rec.entries:
            if lv and st is not None and not st.name.startswith("NL_") and st.name not in ("FREE", "REMOVED"):
                raise _fail(host, "I14",
                    f"TD tdr={rec.tdr:#x}: {st.name} leaf at level {lv} gpa {gpa:#x}: TDX "
                    "private memory is 4K only", gfn=gpa >> PAGE_SHIFT, pfn=rec.tdr)
    for vm in _vms(host):
        slots = vm.memslots
        if hasattr(vm, "mmu"):
            for gfn, pfn in vm.mmu.leaves:
                if slots.gfn_to_memslot(gfn) is None:
                    raise _fail(host, "I14", f"VM {vm.id}: private mirror leaf at gfn {gfn:#x} outside every "
                                "memslot", gfn=gfn, pfn=pfn)
        for gfn, pfn in vm.direct.items():
            if pfn >= 0 and slots.gfn_to_memslot(gfn) is None:
                raise _fail(host, "I14", f"VM {vm.id}: shared mapping at gfn {gfn:#x} outside every memslot",
                            gfn=gfn, pfn=pfn)


def _private_frames(host: Any) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for vm in _tds(host):
        for gfn, pfn in vm.mmu.leaves:
            out[pfn] = f"VM {vm.id}'s private page at gfn {gfn:#x}"
    for vm in _vms(host):
        name = f"VM {vm.id}'s guest_memfd"
        for _, f in vm.kvm.fds.items():
            if getattr(f, "vm", None) is vm and hasattr(f, "_pages"):
                for idx, pfn in f._pages.items():
                    out.setdefault(pfn, f"page {idx} of {name}")
    return out


def check_s6a(host: Any) -> None:
    """S6a: host-reachable frames (shared mappings, user memory) never hold private-KeyID data."""
    if not _kvm_ran(host):
        return
    keyids = host.keyids
    reach: List[Tuple[int, str]] = []
    for vm in _vms(host):
        reach += [(pfn, f"VM {vm.id}'s shared mapping of gfn {gfn:#x}") for gfn, pfn in vm.direct.items()
                  if pfn >= 0]
    reach += [(pfn, f"user memory at hva {hva:#x}") for hva, pfn in getattr(host.user, "_pages", {}).items()]
    if not reach:
        return
    private = _private_frames(host)
    for pfn, what in reach:
        if pfn in private:
            raise _fail(host, "S6a", f"frame is {what} and also {private[pfn]}", pfn=pfn)
        k = host.frame_keyid(pfn)
        if k is not None and keyids.is_private(k):
            raise _fail(host, "S6a", f"frame is {what} and holds data last written under private KeyID {k}",
                        pfn=pfn)


def check_s6d(host: Any) -> None:
    """S6d: every retry count within the VM policy's bounds."""
    if _kvm_ran(host):
        _raise_found(host, "S6d")


def check_s6e(host: Any) -> None:
    """S6e: ``mmu_invalidate.in_progress`` equals the invalidations KVM code has open."""
    for vm in _vms(host):
        n = getattr(vm, "nr_open_invalidations", None)
        if n is None:
            continue
        ip = vm.mmu_invalidate.in_progress
        if ip != n:
            raise _fail(host, "S6e",
                f"VM {vm.id}: mmu_invalidate in_progress is {ip} but {n} invalidation(s) "
                "are open in KVM code (it must be 0 whenever no actor is inside one)")


for _id, _fn in (("I06", check_i06), ("I08", check_i08), ("I09", check_i09), ("I10", check_i10),
                 ("I11", check_i11), ("I12", check_i12), ("I13", check_i13), ("I14", check_i14),
                 ("S6a", check_s6a), ("S6d", check_s6d), ("S6e", check_s6e)):
    register_invariant(_id, _fn, "kvm")
