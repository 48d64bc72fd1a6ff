"""KVM-layer invariants over the live TDs of a host (SPEC §6; issue 5): I16, I21, I20kvm.

Registered with ``layer="kvm"`` when this module is imported (``tdxcore.invariants`` should
import it next to ``module`` and ``temporal``). It reads KVM objects duck-typed, by their
``td_state`` attribute, and imports nothing from the KVM layer:

* **I16** — no TD page is reclaimed while its HKID is assigned: every control page a live KVM TD
  holds (TDR, TDCS, each vCPU's TDVPR and TDCX) is still assigned in the PAMT (TDR: PT_TDR;
  the others owned by that TDR) while ``vm.hkid`` is set.
* **I21** — KVM TD state is monotonic (UNINITIALIZED → INITIALIZED → RUNNABLE while the VM
  lives) and matches the module's op state (with an HKID, unless KVM_TDX_TERMINATE_VM released
  it); vCPUs exist only once the TD is INITIALIZED, and an INITIALIZED vCPU has an initialized
  module vCPU.
* **I20kvm** (the KVM part of I20) — a TD that reached INITIALIZED had its HKID programmed on
  every package (so every package had an online CPU when it was created).
* **I17** — cache write-back and reset after removal/reclaim (tdx-facts invariant 17), over the
  event log (a small incremental scanner, :class:`_CacheScan`): a frame that PAGE.REMOVE took
  out of a TD is *dirty* under the TD's HKID until a TDH.PHYMEM.PAGE.WBINVD of it with that
  KeyID, or the HKID's KEY.FREEID (which needs CACHE.WB on every package after VPFLUSHDONE);
  a TDR reclaimed by PAGE.RECLAIM is dirty under the global KeyID until its WBINVD with it.
  Any other reclaimed page needs nothing (RECLAIM runs only in TEARDOWN, after CACHE.WB). A
  dirty frame must never be free in the host allocator (a failed write-back leaks the page).
  On a host with the partial-write erratum, a frame a TD used (REMOVE or RECLAIM) must also be
  reset (no content left under a private KeyID) before it is free again.
* **S6ckvm** (the KVM part of S6c) — after a KVM TD's destruction every frame is free, owned or
  leaked with a reason, exactly. Each check snapshots what every live KVM TD holds (TDR, TDCS,
  TDVPR/TDCX, mirror S-EPT pages, mapped private pages, its guest_memfds' pages); once it is
  destroyed, each frame of its last snapshot must be free, recorded in ``host.leaks``, or owned
  by someone alive (a TD page in the PAMT, a live VM, user memory), and its HKID free, leaked or
  held by a live TD; and, whenever no VM is registered on a host that ran a KVM TD,
  ``free + owned (module, user memory) + leaked == total`` frames, exactly.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from tdxcore.constants import LOW_RESERVED_FRAMES, MODEL_MAXPHYADDR, PAGE_SHIFT, PageType
from tdxcore.invariants.module import _fail
from tdxcore.invariants.registry import register_invariant
from tdxcore.status import Leaf, OpState  # type: ignore[attr-defined]

__all__ = ["check_i16", "check_i21", "check_i20kvm", "check_i17", "check_s6ckvm"]

#: Highest KVM TD state seen per live VM (monotonicity across checks).
_SEEN: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()

#: KVM TdState value → module op state it implies (INITIALIZED=1, RUNNABLE=2).
_OP_STATE = {1: OpState.INITIALIZED, 2: OpState.RUNNABLE}


def _tds(host: Any) -> Iterator[Any]:
    for vm in host.vms:
        if hasattr(vm, "td_state") and not vm.is_destroyed:
            yield vm


def _held(vm: Any) -> List[Tuple[int, str]]:
    pages = [(p, "tdcs") for p in vm.tdcs]
    for v in vm.vcpus:
        pages += [(p, "tdcx") for p in v.tdcx]
        if v.tdvpr is not None:
            pages.append((v.tdvpr, "tdvpr"))
    return pages


def check_i16(host: Any) -> None:
    """I16: pages of a KVM TD whose HKID is assigned are still the TD's in the PAMT."""
    pamt = host.pamt
    for vm in _tds(host):
        if vm.hkid is None or vm.tdr is None:
            continue
        if pamt.page_type(vm.tdr) != PageType.PT_TDR:
            raise _fail(host, "I16", f"VM {vm.id}: TDR reclaimed while HKID {vm.hkid} is assigned",
                        pfn=vm.tdr)
        for pfn, what in _held(vm):
            if pamt.page_type(pfn) == PageType.PT_NDA or pamt.owner(pfn) != vm.tdr:
                raise _fail(host, "I16",
                            f"VM {vm.id}: {what} page reclaimed while HKID {vm.hkid} is assigned", pfn=pfn)


def check_i21(host: Any) -> None:
    """I21: KVM TD state monotonic and consistent with the module; vCPUs only once INITIALIZED."""
    for vm in _tds(host):
        s = int(vm.td_state)
        if s < _SEEN.get(vm, 0):
            raise _fail(host, "I21", f"VM {vm.id}: TD state went back to {vm.td_state.name}")
        _SEEN[vm] = s
        if s == 0:
            if vm.created_vcpus:
                raise _fail(host, "I21", f"VM {vm.id}: {vm.created_vcpus} vCPUs on an UNINITIALIZED TD")
            continue
        td = host.tdx.tds.get(vm.tdr) if vm.tdr is not None else None
        # KVM_TDX_TERMINATE_VM (the extension) released the HKID of a live TD on purpose
        released = vm.hkid is None and getattr(vm, "terminated", False)
        if (vm.hkid is None and not released) or td is None or td.op_state != _OP_STATE[s]:
            state = None if td is None else OpState(td.op_state).name
            raise _fail(host, "I21", f"VM {vm.id}: KVM state {vm.td_state.name} but module op state {state}",
                        pfn=vm.tdr)
        for v in vm.vcpus:
            if int(v.state) and (v.tdvpr is None or v.tdvpr not in td.vcpus
                                 or not td.vcpus[v.tdvpr].initialized):
                raise _fail(host, "I21", f"VM {vm.id}: vCPU {v.vcpu_id} INITIALIZED without a module vCPU",
                            pfn=v.tdvpr)


def check_i20kvm(host: Any) -> None:
    """I20 (KVM part): an INITIALIZED/RUNNABLE TD has its HKID configured on every package."""
    for vm in _tds(host):
        if int(vm.td_state) == 0 or vm.tdr is None or vm.tdr not in host.tdx.tds:
            continue
        td = host.tdx.tds[vm.tdr]
        missing = sorted(set(range(host.nr_packages)) - set(td.pkg_configured))
        if missing:
            raise _fail(host, "I20kvm", f"VM {vm.id}: HKID {vm.hkid} not configured on package(s) {missing}",
                        pfn=vm.tdr)


# ---------------------------------------------------------------------------------- I17
_PA_MASK = (1 << MODEL_MAXPHYADDR) - 1
_GPA_MASK = ((1 << 52) - 1) & ~0xFFF
_CREATE, _REMOVE = int(Leaf.TDH_MNG_CREATE), int(Leaf.TDH_MEM_PAGE_REMOVE)
_WBINVD = int(Leaf.TDH_PHYMEM_PAGE_WBINVD)
_FREEID, _RECLAIM = int(Leaf.TDH_MNG_KEY_FREEID), int(Leaf.TDH_PHYMEM_PAGE_RECLAIM)
_I17_LEAVES = frozenset((_CREATE, _REMOVE, _WBINVD, _FREEID, _RECLAIM))


class _CacheScan:
    """Incremental I17 state of one host, folded from its event log (O(new events) per check).

    A ``seamcall_end`` is paired with its begin (for the input registers: the TDR, the KeyID
    of a WBINVD) as :mod:`tdxcore.invariants.temporal` does: the module numbers ops in begin
    order, so an end takes the earliest open op of the same actor, leaf and CPU whose address
    agrees and which is no longer in flight.
    """

    def __init__(self) -> None:
        self.cursor = 0
        self.nr_begins = 0
        self.open: Dict[int, Tuple[Any, ...]] = {}          # op id -> (key, args)
        self.groups: Dict[Tuple[Any, ...], List[int]] = {}
        self.hkid_of: Dict[int, int] = {}                   # TDR -> HKID (MNG.CREATE)
        self.dirty: Dict[int, Tuple[int, str, int]] = {}    # pfn -> (KeyID, what, event index)
        self.unreset: Dict[int, int] = {}                   # pfn -> event index (erratum hosts)
        self.violation: Optional[Tuple[str, int, int]] = None

    def scan(self, host: Any) -> None:
        events = host.events
        n = len(events)
        live = host.tdx.inflight
        erratum = bool(host.cpu_erratum_pw_mce)
        for i in range(self.cursor, n):
            ev = events[i]
            k = ev[0]
            if k == "seamcall_begin" or k == "tdcall_begin":
                self.nr_begins += 1
                if k == "seamcall_begin" and ev[2] in _I17_LEAVES:
                    key = (ev[1], ev[2], ev[3])
                    self.open[self.nr_begins] = (key, ev[4])
                    self.groups.setdefault(key, []).append(self.nr_begins)
            elif k == "seamcall_abort":
                self._close(ev[4])
            elif k == "seamcall_end" and ev[2] in _I17_LEAVES:
                args = self._pair(ev, live)
                if args is not None and (ev[4] >> 32) == 0:
                    self._end(host, i, ev, args, erratum)
        self.cursor = n

    def _close(self, op_id: int) -> None:
        ent = self.open.pop(op_id, None)
        if ent is not None:
            g = self.groups[ent[0]]
            g.remove(op_id)
            if not g:
                del self.groups[ent[0]]

    def _pair(self, ev: Tuple[Any, ...], live: Any) -> Optional[Tuple[int, ...]]:
        key = (ev[1], ev[2], ev[3])
        for op_id in self.groups.get(key, ()):
            if op_id in live:
                continue
            a = self.open[op_id][1]
            if ev[2] == _REMOVE:
                ok = ev[6] is None or (a[0] & _GPA_MASK) >> PAGE_SHIFT == ev[6]
            else:
                ok = ev[7] is None or (a[0] & _PA_MASK) >> PAGE_SHIFT == ev[7]
            if ok:
                self._close(op_id)
                return tuple(a)
        return None

    def _end(self, host: Any, i: int, ev: Tuple[Any, ...], a: Tuple[int, ...], erratum: bool) -> None:
        leaf, pfn = ev[2], ev[7]
        if leaf == _CREATE:
            self.hkid_of[(a[0] & _PA_MASK) >> PAGE_SHIFT] = a[1]
        elif leaf == _REMOVE:
            hkid = self.hkid_of.get((a[1] & _PA_MASK) >> PAGE_SHIFT)
            if pfn is not None and hkid is not None:
                self.dirty[pfn] = (hkid, "private page after PAGE.REMOVE", i)
                if erratum:
                    self.unreset[pfn] = i
        elif leaf == _WBINVD:
            d = self.dirty.get((a[0] & _PA_MASK) >> PAGE_SHIFT)
            if d is not None and d[0] == a[0] >> MODEL_MAXPHYADDR:
                del self.dirty[(a[0] & _PA_MASK) >> PAGE_SHIFT]
        elif leaf == _FREEID:
            hkid = self.hkid_of.get((a[0] & _PA_MASK) >> PAGE_SHIFT)
            # KEY.FREEID succeeds only after CACHE.WB on every package: the HKID's lines are gone
            for p in [p for p, d in self.dirty.items() if d[0] == hkid]:
                del self.dirty[p]
        elif leaf == _RECLAIM and pfn is not None:
            out = ev[5]
            if out and out[0] == PageType.PT_TDR:
                self.dirty[pfn] = (host.keyids.global_keyid, "TDR after PAGE.RECLAIM", i)
                self.hkid_of.pop(pfn, None)
            if erratum:
                self.unreset[pfn] = i

    def check(self, host: Any) -> None:
        if self.violation is not None:
            return
        alloc = host.frames
        for pfn, (keyid, what, idx) in self.dirty.items():
            if not alloc.is_allocated(pfn):
                self.violation = (f"{what} (event {idx}) is free in the host allocator with cache lines of "
                                  f"KeyID {keyid} not written back (no TDH.PHYMEM.PAGE.WBINVD with that "
                                  "KeyID, no KEY.FREEID of it): a failed write-back must leak the page",
                                  pfn, idx)
                return
        for pfn in list(self.unreset):
            keyid = host.frame_keyid(pfn)
            if keyid is None or not host.keyids.is_private(keyid):
                del self.unreset[pfn]
            elif not alloc.is_allocated(pfn):
                idx = self.unreset[pfn]
                self.violation = (f"frame a TD used (event {idx}) is free again with contents under private "
                                  f"KeyID {keyid}: on a partial-write-erratum host it must be reset first",
                                  pfn, idx)
                return


_CACHE: "weakref.WeakKeyDictionary[Any, _CacheScan]" = weakref.WeakKeyDictionary()


def check_i17(host: Any) -> None:
    """I17: removed/reclaimed TD pages are written back (and reset on erratum hosts) before reuse.

    A KVM-layer rule: it applies once KVM drove the host (an ``ioctl`` event was logged); a
    host driven through the module API alone does its own host-side bookkeeping.
    """
    sc = _CACHE.get(host)
    if sc is None:
        if "ioctl" not in host.events.kinds:
            return
        sc = _CACHE[host] = _CacheScan()
    sc.scan(host)
    sc.check(host)
    if sc.violation is not None:
        msg, pfn, idx = sc.violation
        raise _fail(host, "I17", msg, pfn=pfn, index=idx)


# ---------------------------------------------------------------------------------- S6c (KVM part)
class _Seen:
    """What the last check saw of one KVM TD: its frames and its HKID."""

    __slots__ = ("frames", "hkid")

    def __init__(self) -> None:
        self.frames: Set[int] = set()
        self.hkid: Optional[int] = None


#: host -> {TD -> what it held at the last check while alive}.
_HELD: "weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, _Seen]]" = weakref.WeakKeyDictionary()


def _holdings(vm: Any) -> Set[int]:
    """Every frame a live KVM TD holds (duck-typed; guest_memfd pages through its fd table)."""
    out: Set[int] = set(vm.tdcs)
    if vm.tdr is not None:
        out.add(vm.tdr)
    for v in vm.vcpus:
        out.update(v.tdcx)
        if v.tdvpr is not None:
            out.add(v.tdvpr)
    out.update(spt for _, _, spt in vm.mmu.nonleaf)
    out.update(pfn for _, pfn in vm.mmu.leaves)
    for _, f in vm.kvm.fds.items():
        if getattr(f, "vm", None) is vm and hasattr(f, "_pages"):
            out.update(f._pages.values())
    return out


def _leaked_pfns(host: Any) -> Set[int]:
    return {r.pfn for r in host.leaks if r.pfn is not None}


def _user_pfns(host: Any) -> Set[int]:
    return set(getattr(host.user, "_pages", {}).values())


def check_s6ckvm(host: Any) -> None:
    """S6c (KVM part): a destroyed KVM TD's frames are each free, owned or leaked; exact balance."""
    seen = _HELD.get(host)
    live = [vm for vm in host.vms if hasattr(vm, "td_state") and not vm.is_destroyed]
    if seen is None:
        if not live:
            if not host.vms and "ioctl" in host.events.kinds:
                _balance(host)      # KVM ran here (an ioctl was logged) and every VM is gone
            return
        seen = _HELD[host] = weakref.WeakKeyDictionary()
    alloc = host.frames
    gone = [(vm, s) for vm, s in seen.items() if vm.is_destroyed]
    if gone:
        leaked = _leaked_pfns(host)
        others: Set[int] = set()
        for vm in host.vms:
            if hasattr(vm, "td_state") and not vm.is_destroyed:
                others |= _holdings(vm)
        user = _user_pfns(host)
        hkids = {vm.hkid for vm in live} | {td.hkid for td in host.tdx.tds.values()}
        leaked_hkids = {r.hkid for r in host.leaks if r.what == "hkid"}
        pamt = host.pamt
        for vm, s in gone:
            if vm.tdr is not None or vm.tdcs or vm.hkid is not None or vm.mmu.nonleaf or vm.mmu.leaves:
                raise _fail(host, "S6ckvm", f"VM {vm.id} is destroyed but still holds TD state (tdr="
                            f"{vm.tdr}, {len(vm.tdcs)} TDCS, hkid={vm.hkid}, mirror {len(vm.mmu.nonleaf)}/"
                            f"{len(vm.mmu.leaves)})", pfn=vm.tdr)
            for pfn in sorted(s.frames):
                if not alloc.is_allocated(pfn):
                    continue                                    # free
                if pfn in leaked:
                    if pfn in others:
                        raise _fail(host, "S6ckvm", f"frame of destroyed VM {vm.id} is recorded as leaked "
                                    "and is also held by a live VM", pfn=pfn)
                    continue                                    # leaked with a reason
                if pfn in others or pfn in user or pamt.page_type(pfn) in TD_PAGE_TYPES:
                    continue                                    # owned again
                raise _fail(host, "S6ckvm", f"frame of destroyed VM {vm.id} is neither free, owned nor "
                            "leaked: it went missing in teardown", pfn=pfn)
            if (s.hkid is not None and s.hkid in host.keyids.allocated and s.hkid not in hkids
                    and s.hkid not in leaked_hkids):
                raise _fail(host, "S6ckvm", f"HKID {s.hkid} of destroyed VM {vm.id} is still allocated but "
                            "neither leaked nor held by a live TD")
            del seen[vm]
    for vm in live:
        cur = seen.get(vm)
        if cur is None:
            cur = seen[vm] = _Seen()
        cur.frames = _holdings(vm)
        if vm.hkid is not None:
            cur.hkid = vm.hkid
    if not host.vms:
        _balance(host)


#: PAMT page types of TD pages (a frame of one of them is owned by a TD).
TD_PAGE_TYPES = frozenset(int(t) for t in PageType if t not in (PageType.PT_NDA, PageType.PT_RSVD))


def frame_balance(host: Any) -> Tuple[int, int, int, int]:
    """``(free, owned, leaked, total)`` frames of a host with no VM registered.

    ``owned`` = the module's frames (PAMT, TDMR info) + user memory backing; ``leaked`` =
    distinct frames in ``host.leaks``; ``total`` = allocatable frames.
    """
    alloc = host.frames
    tdx = host.tdx
    total = alloc.nr_frames - min(LOW_RESERVED_FRAMES, alloc.nr_frames)
    owned = sum(n for _, n in tdx.pamt_frames) + len(tdx.tdmr_info_frames) + host.user.nr_backed
    return alloc.nr_free, owned, len(_leaked_pfns(host)), total


def _balance(host: Any) -> None:
    free, owned, leaked, total = frame_balance(host)
    if free + owned + leaked != total:
        raise _fail(host, "S6ckvm", f"no VM is left but free {free} + owned {owned} (module, user) + leaked "
                    f"{leaked} = {free + owned + leaked} != {total} frames")


for _id, _fn in (("I16", check_i16), ("I21", check_i21), ("I20kvm", check_i20kvm), ("I17", check_i17),
                 ("S6ckvm", check_s6ckvm)):
    register_invariant(_id, _fn, "kvm")
