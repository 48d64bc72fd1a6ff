"""The event-log half of the KVM run-time memory invariants (:mod:`.kvm_memory`; SPEC §3.5, §6).

:class:`KvmScan` extends :class:`~tdxcore.invariants.temporal.Scanner` (its SEAMCALL begin/end
pairing and per-TD epoch shadow) with the KVM event kinds, folded in log order: ``ioctl``,
``kick``, ``vm_bug``/``vm_dead``, ``fault``, ``invalidate_begin``/``end``,
``set_memory_attributes``, ``td_enter``/``td_exit``. It records the first violation of each id
in :attr:`KvmScan.found`; :mod:`.kvm_memory` reports them. One scanner per host (weakly held),
brought up to date once per :func:`~tdxcore.invariants.check_invariants` call: O(new events).

VMs are named in events by their actor, ``vmN`` (``N`` = ``vm.id``, per :class:`Kvm`): the
scanner assumes one ``Kvm`` per host (two would share ``vm0``). A TD's VM is learnt from
``KVM_TDX_INIT_VM`` (after its MNG.CREATE) and from its vCPUs' VP.ENTER, so a TD destroyed
before any check is still followed; policy, shared mask and TD attributes come from the VMs
registered at each check.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from tdxcore._xarray import AttributeStore
from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, PAGE_SHIFT, MemAttr, TdAttr
from tdxcore.invariants.temporal import Scanner
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_OPERAND_BUSY,
    Leaf,
    TdcallLeaf,
)

__all__ = ["KvmScan", "kvm_scan"]


L = Leaf
_U64 = (1 << 64) - 1
_STATUS_CLASS = 0xFFFFFFFF00000000
_PRIVATE = int(MemAttr.PRIVATE)
_ALL = _U64
_AUG, _ADD = int(L.TDH_MEM_PAGE_AUG), int(L.TDH_MEM_PAGE_ADD)
_SEPT_ADD = int(L.TDH_MEM_SEPT_ADD)
_BLOCK, _UNBLOCK = int(L.TDH_MEM_RANGE_BLOCK), int(L.TDH_MEM_RANGE_UNBLOCK)
_REMOVE, _TRACK = int(L.TDH_MEM_PAGE_REMOVE), int(L.TDH_MEM_TRACK)
_CREATE, _FINALIZE = int(L.TDH_MNG_CREATE), int(L.TDH_MR_FINALIZE)
_ACCEPT = int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
_ZAP = frozenset((_BLOCK, _REMOVE, _TRACK))
_MAP = frozenset((_AUG, _SEPT_ADD))
#: RET_PF_FIXED (``mmu_internal.h``): the fault installed a mapping.
_RET_PF_FIXED = 5
_RET_PF_RETRY = 1
#: Leaf → the bound names (first one a policy declares wins) that limit its consecutive retries.
_BOUND_NAMES = {
    _BLOCK: ("zap_retries_per_call", "sept_retries_per_call"),
    _REMOVE: ("zap_retries_per_call", "sept_retries_per_call"),
    _TRACK: ("track_retries_per_call", "zap_retries_per_call"),
    _AUG: ("map_retries_per_call", "sept_retries_per_call"),
    _SEPT_ADD: ("map_retries_per_call", "sept_retries_per_call"),
}


def _is_busy(status: int) -> bool:
    return (status & _STATUS_CLASS) == TDX_OPERAND_BUSY


def _vms(host: Any) -> Iterator[Any]:
    for vm in host.vms:
        if not vm.is_destroyed:
            yield vm


class _VmInfo:
    """What the scanner needs of one VM, captured while it is registered (no reference to it)."""

    __slots__ = ("actor", "policy", "bounds", "mask", "ve_disable")

    def __init__(self, vm: Any) -> None:
        self.actor = f"vm{vm.id}"
        pol = getattr(vm, "policy", None)
        self.policy = getattr(pol, "name", "")
        self.bounds: Dict[str, int] = dict(pol.bounds()) if pol is not None else {}
        self.mask = int(vm.gpa_shared_mask)
        self.ve_disable = bool(int(getattr(vm, "attributes", 0)) & int(TdAttr.SEPT_VE_DISABLE))


class _VmShadow:
    """One VM's invalidations and attributes as its events say (keyed by its actor, ``vmN``)."""

    __slots__ = ("open", "hull", "seq", "last", "attrs", "dead", "bug_owed")

    def __init__(self) -> None:
        self.open = 0
        self.hull: Optional[Tuple[int, int]] = None
        self.seq = 0
        self.last = ""                                   # kind of the previous invalidate event
        self.attrs = AttributeStore()
        self.dead = False
        self.bug_owed: Optional[Tuple[int, str, int]] = None  # (event index, why, TDR) until a vm_bug


class _TdShadow:
    """One TD generation (MNG.CREATE → the TDR's reuse) as the scanner's KVM rules need it."""

    __slots__ = ("pending", "blocked", "in_guest", "track_owed", "kick_wait", "retry", "tries",
                 "death_owed")

    def __init__(self) -> None:
        self.pending: Set[int] = set()                   # gfns AUGed, not accepted/removed
        self.blocked: Set[int] = set()                   # of those, currently blocked
        self.in_guest: Set[int] = set()                  # tdvprs between td_enter and td_exit
        self.track_owed: Optional[int] = None            # index of a TRACK success not kicked yet
        self.kick_wait: Set[int] = set()                 # in the guest at the last kick, not out yet
        self.retry: Dict[Tuple[int, Optional[int]], int] = {}   # 6.18: (leaf, gfn) -> BUSY end index
        self.tries: Dict[Tuple[int, Optional[int]], int] = {}   # (leaf, gfn) -> consecutive BUSY ends
        self.death_owed: Optional[Tuple[int, int]] = None       # (event index, gfn) of a fatal exit


class _Upto:
    """``host`` seen with its event log cut at ``n`` (the base scanner reads ``len(events)``)."""

    __slots__ = ("_h", "events")

    def __init__(self, host: Any, n: int) -> None:
        self._h = host
        self.events = _Cut(host.events, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)


class _Cut:
    __slots__ = ("_ev", "_n")

    def __init__(self, ev: Any, n: int) -> None:
        self._ev, self._n = ev, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        return self._ev[i]


#: Event kinds the KVM scanner handles itself (in log order with the base scanner's op edges).
_OWN = frozenset(("ioctl", "kick", "vm_bug", "vm_dead", "fault", "invalidate_begin", "invalidate_end",
                  "set_memory_attributes", "td_enter", "td_exit", "seamcall_batch", "tdcall_batch"))


class KvmScan(Scanner):
    """The sequence half of this module's invariants for one host, folded incrementally.

    Reuses :class:`~tdxcore.invariants.temporal.Scanner` for pairing SEAMCALL edges and for its
    per-TD epoch/refcount shadow (its own violations are ignored here: :mod:`.temporal` reports
    them); KVM event kinds are folded in log order between the op edges.

    Attributes
    ----------
    found : dict
        id → ``(msg, gfn, pfn, event_index)`` of the first violation of that id.
    """

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self.found: Dict[str, Tuple[str, Optional[int], Optional[int], int]] = {}
        self.info_by_actor: Dict[str, _VmInfo] = {}
        self.vmsh: Dict[str, _VmShadow] = {}
        self.tdsh: Dict[int, _TdShadow] = {}
        # vCPU actor -> (raw gfn of its EPT-violation exit, faults handled for it so far)
        self.local: Dict[str, Tuple[int, int]] = {}
        self.actor_of_tdr: Dict[int, str] = {}           # TDR -> "vmN" (registered VMs, INIT_VM, VP.ENTER)
        self.last_create: Optional[int] = None           # TDR of the latest successful MNG.CREATE
        # vCPU actor -> gfn of its last ACCEPT that did not succeed (an EPT-violation exit may follow)
        self.accept_miss: Dict[str, Optional[int]] = {}

    # ------------------------------------------------------------------ helpers
    def _note(self, inv: str, msg: str, index: int, gfn: Optional[int] = None,
              pfn: Optional[int] = None) -> None:
        if inv not in self.found:
            self.found[inv] = (msg, gfn, pfn, index)

    def _vm(self, actor: str) -> _VmShadow:
        s = self.vmsh.get(actor)
        if s is None:
            s = self.vmsh[actor] = _VmShadow()
        return s

    def _td(self, tdr: int) -> _TdShadow:
        s = self.tdsh.get(tdr)
        if s is None:
            s = self.tdsh[tdr] = _TdShadow()
        return s

    def _tdrs_of(self, actor: str) -> List[int]:
        return [t for t, a in self.actor_of_tdr.items() if a == actor]

    def refresh(self, host: Any) -> None:
        """Capture what the scan needs of the registered VMs (policy, shared mask, TDR)."""
        for vm in _vms(host):
            inf = _VmInfo(vm)
            self.info_by_actor[inf.actor] = inf

    def _info(self, tdr: int) -> Optional[_VmInfo]:
        a = self.actor_of_tdr.get(tdr)
        return None if a is None else self.info_by_actor.get(a)

    # ------------------------------------------------------------------ scanning
    def scan(self, host: Any) -> None:
        """Fold events ``[cursor, len(events))`` in (the base scanner's op edges included)."""
        events = host.events
        n = len(events)
        start = self.cursor
        for i in range(start, n):
            ev = events[i]
            if ev[0] in _OWN:
                if self.cursor < i:
                    super().scan(_Upto(host, i))
                self._own(i, ev)
                if ev[0] in ("td_enter", "td_exit"):
                    super().scan(_Upto(host, i + 1))
        if self.cursor < n:
            super().scan(_Upto(host, n))
        self.cursor = n

    def _own(self, i: int, ev: Tuple[Any, ...]) -> None:  # noqa: C901
        k = ev[0]
        if k == "seamcall_batch" or k == "tdcall_batch":
            # module/batch.py: ev = (kind, actor, leaf, nr, nr_ok, status, gfn, pfn, tdr); a run of
            # nr consecutive gfns from gfn (AUG, ACCEPT) — the I06 shadow of the per-page ends
            if ev[6] is not None and ev[8] in self.tdsh:
                gfns = range(ev[6], ev[6] + ev[3])
                if k == "tdcall_batch" and ev[2] == _ACCEPT:
                    self.tdsh[ev[8]].pending.difference_update(gfns)
                    self.tdsh[ev[8]].blocked.difference_update(gfns)
                elif k == "seamcall_batch" and ev[2] == _AUG and ev[3] == ev[4]:
                    self.tdsh[ev[8]].pending.update(gfns)
            return
        if k == "ioctl":
            # KVM_TDX_INIT_VM returns after its MNG.CREATE: it names that TD's VM (a VM destroyed
            # before any check is known only this way)
            if ev[2] == "KVM_TDX_INIT_VM" and ev[4] == 0 and self.last_create is not None:
                self.actor_of_tdr[self.last_create] = f"vm{ev[3]}"
                self.last_create = None
            elif ev[2] == "KVM_RUN" and self.local:
                # a KVM_RUN returned: no handler of that VM is still retrying (undercount, never over)
                pre = f"vm{ev[3]}."
                for a in [a for a in self.local if a.startswith(pre)]:
                    del self.local[a]
        elif k == "td_enter":
            tdvpr = ev[4]
            tdr = self.vcpu_tdr.get(tdvpr)
            if tdr is None:
                return
            self.actor_of_tdr.setdefault(tdr, ev[1].split(".", 1)[0])
            self.local.pop(ev[1], None)
            s = self._td(tdr)
            if s.death_owed is not None:
                idx, gfn = s.death_owed
                self._note("I06", f"a vCPU of TD tdr={tdr:#x} entered again after the EPT violation on "
                           f"PENDING gfn {gfn:#x} (event {idx}) of a SEPT_VE_DISABLE TD: KVM must kill "
                           "the VM",
                           i, gfn=gfn, pfn=tdr)
                s.death_owed = None
            s.in_guest.add(tdvpr)
        elif k == "td_exit":
            tdvpr, reason, gfn = ev[4], ev[6], ev[7]
            actor = ev[1]
            # an ACCEPT's EPT violation reports the entry as the ACCEPT found it when it began:
            # another vCPU may have AUGed the page since (not a PENDING access)
            by_accept = self.accept_miss.pop(actor, -1) == gfn
            if reason == EXIT_REASON_EPT_VIOLATION and gfn is not None:
                self.local[actor] = (gfn, 0)        # the handler's faults for this exit follow
            else:
                self.local.pop(actor, None)
            tdr = self.vcpu_tdr.get(tdvpr)
            if tdr is None:
                return
            s = self._td(tdr)
            s.in_guest.discard(tdvpr)
            s.kick_wait.discard(tdvpr)
            if reason == EXIT_REASON_EPT_VIOLATION and gfn is not None and gfn in s.pending \
                    and gfn not in s.blocked and not by_accept:
                inf = self._info(tdr)
                if inf is not None and inf.ve_disable:
                    s.death_owed = (i, gfn)
                elif inf is not None:
                    self._note("I06", f"guest access to PENDING gfn {gfn:#x} of TD tdr={tdr:#x} (no "
                               "SEPT_VE_DISABLE) was an EPT-violation exit, not a #VE", i, gfn=gfn, pfn=tdr)
        elif k == "kick":
            for tdr in self._tdrs_of(ev[1]):
                s = self._td(tdr)
                s.track_owed = None
                s.kick_wait = set(s.in_guest)
                for key in s.retry:
                    s.retry[key] = -1            # kicked since the BUSY
        elif k == "vm_bug" or k == "vm_dead":
            v = self._vm(ev[1])
            v.dead = True
            if k == "vm_bug":
                v.bug_owed = None
            for tdr in self._tdrs_of(ev[1]):
                t = self._td(tdr)
                t.death_owed = None
                t.retry.clear()                 # a dead VM's later zaps start their own counts
                t.tries.clear()
        elif k == "invalidate_begin":
            self._inv_begin(i, ev)
        elif k == "invalidate_end":
            self._inv_end(i, ev)
        elif k == "set_memory_attributes":
            v = self._vm(ev[1])
            start, end, attrs = ev[2], ev[3], ev[4]
            if v.attrs.has_range(start, end, _ALL, attrs):
                self._note("I13", f"{ev[1]}: gfns [{start:#x}, {end:#x}) already had attributes {attrs:#x}, "
                           "yet the request stored them (a no-op must not invalidate or change anything)",
                           i, gfn=start)
            v.attrs.set_range(start, end, attrs)
        elif k == "fault":
            self._fault(i, ev)

    def _inv_begin(self, i: int, ev: Tuple[Any, ...]) -> None:
        actor, lo, hi, count = ev[1], ev[2], ev[3], ev[4]
        v = self._vm(actor)
        if count == v.open + 1:
            if v.open == 0:
                v.hull = (lo, hi)
            else:
                assert v.hull is not None
                v.hull = (min(v.hull[0], lo), max(v.hull[1], hi))
            v.open = count
        elif count == v.open and v.last == "begin" and v.hull is not None:
            v.hull = (min(v.hull[0], lo), max(v.hull[1], hi))          # range_add of the same begin
        else:
            self._note("I12", f"{actor}: invalidate_begin reports in_progress {count} after {v.open} open "
                       "invalidation(s) (a begin adds exactly one)", i, gfn=lo)
            v.open = max(count, 0)
            v.hull = (lo, hi) if v.hull is None else (min(v.hull[0], lo), max(v.hull[1], hi))
        v.last = "begin"

    def _inv_end(self, i: int, ev: Tuple[Any, ...]) -> None:
        actor, lo, seq = ev[1], ev[2], ev[4]
        v = self._vm(actor)
        if v.open <= 0:
            self._note("I12", f"{actor}: invalidate_end with no invalidation open (begin/end unbalanced)",
                       i, gfn=lo)
        else:
            v.open -= 1
        if seq != (v.seq + 1) & _U64:
            self._note("I12", f"{actor}: invalidate_end left seq {seq}, expected {v.seq + 1} (end bumps "
                       "mmu_invalidate_seq before it decrements in_progress)", i, gfn=lo)
        v.seq = seq
        v.last = "end"

    def _fault(self, i: int, ev: Tuple[Any, ...]) -> None:
        actor, gpa, private, seq, result = ev[1], ev[2], ev[3], ev[4], ev[5]
        vm_actor = actor.split(".", 1)[0]
        inf = self.info_by_actor.get(vm_actor)
        v = self._vm(vm_actor)
        mask = inf.mask if inf is not None else 0
        gfn = (gpa & ~mask) >> PAGE_SHIFT
        win = self.local.get(actor)
        if win is not None and win[0] == gpa >> PAGE_SHIFT:
            # one more attempt of the EPT-violation handler for that exit (pre-faults never match:
            # KVM_PRE_FAULT_MEMORY runs outside KVM_RUN, after the window closed)
            n = win[1] + 1
            if result == _RET_PF_RETRY:             # the handler may try again
                self.local[actor] = (win[0], n)
            else:
                del self.local[actor]
            if inf is not None and "local_retries_per_fault" in inf.bounds \
                    and n - 1 > inf.bounds["local_retries_per_fault"]:
                self._note("S6d", f"{actor}: {n - 1} local retries of one EPT violation (gpa {gpa:#x}) "
                           f"exceed {inf.policy}'s local_retries_per_fault "
                           f"{inf.bounds['local_retries_per_fault']}", i, gfn=gfn)
        for tdr in self._tdrs_of(vm_actor):
            # a fault attempt ended: map-path wrapper counts restart (a concurrent vCPU's count
            # may restart early too: S6d can only undercount, never report a false excess)
            s = self.tdsh.get(tdr)
            if s is not None:
                for key in [kk for kk in s.tries if kk[0] in _MAP]:
                    del s.tries[key]
        if result != _RET_PF_FIXED:
            return
        is_priv = bool(v.attrs.get(gfn) & _PRIVATE)
        if bool(private) != is_priv:
            self._note("I10", f"{actor}: a {'private' if private else 'shared'} fault on gfn {gfn:#x} mapped "
                       f"while the attribute is {'private' if is_priv else 'shared'} (it must exit with "
                       "KVM_EXIT_MEMORY_FAULT)", i, gfn=gfn)
        if seq != v.seq or (v.open > 0 and v.hull is not None and v.hull[0] <= gfn < v.hull[1]):
            why = (f"seq snapshot {seq} is stale (now {v.seq})" if seq != v.seq else
                   f"gfn is inside the open invalidation [{v.hull[0]:#x}, {v.hull[1]:#x})"  # type: ignore[index]
                   )
            self._note("I11", f"{actor}: the fault on gfn {gfn:#x} mapped although {why}: it must retry",
                       i, gfn=gfn)

    # ------------------------------------------------------------------ paired SEAMCALL ends
    def _end(self, host: Any, i: int, op: Any, ev: Tuple[Any, ...]) -> None:  # noqa: C901
        if not op.ambiguous:            # an ambiguous pairing proves nothing (temporal's rule)
            self._kvm_end(i, op, ev)
        super()._end(host, i, op, ev)

    def _kvm_end(self, i: int, op: Any, ev: Tuple[Any, ...]) -> None:  # noqa: C901
        leaf, status = ev[2], ev[4]
        gfn = op.gfn if op.gfn is not None else ev[6]     # an injected status's end names no gfn
        if op.tdcall:
            if leaf == _ACCEPT and status != 0:
                self.accept_miss[op.actor] = gfn
            if leaf == _ACCEPT and status == 0 and op.pfn is not None:
                tdr = self.vcpu_tdr.get(op.pfn)
                if tdr is not None and gfn is not None:
                    s = self._td(tdr)
                    s.pending.discard(gfn)
                    s.blocked.discard(gfn)
            return
        tdr = self._tdr_of(op)
        if tdr is None:
            return
        if leaf == _CREATE:
            if status == 0:
                self.tdsh[tdr] = _TdShadow()
                self.actor_of_tdr.pop(tdr, None)
                self.last_create = tdr
            return
        if leaf not in _ZAP and leaf not in _MAP and leaf not in (_UNBLOCK, _ADD):
            return
        s = self._td(tdr)
        base = self.tds.get(tdr)
        finalized = base is not None and base.finalized
        inf = self._info(tdr)
        vm_actor = self.actor_of_tdr.get(tdr)
        v = self._vm(vm_actor) if vm_actor is not None else None
        key = (leaf, None if leaf == _TRACK else gfn)
        busy = _is_busy(status)
        # -- an unpaid KVM_BUG (I09): nothing else may reach the module first
        if v is not None and v.bug_owed is not None:
            idx, why, _ = v.bug_owed
            self._note("I09", f"{why} (event {idx}) and the VM was not bugged before the next SEAMCALL on it",
                       i, gfn=gfn, pfn=tdr)
            v.bug_owed = None
        # -- S6d: consecutive BUSY retries within the policy's bound
        extra = s.tries.get(key, 0)
        if inf is not None and extra:
            for name in _BOUND_NAMES.get(leaf, ()):
                if name in inf.bounds:
                    if extra > inf.bounds[name]:
                        self._note("S6d",
                            f"{L(leaf).name} on TD tdr={tdr:#x} gfn={gfn} was tried {extra + 1} "
                            f"times in a row after BUSY: {inf.policy}'s {name} is {inf.bounds[name]}",
                            i, gfn=gfn, pfn=tdr)
                    break
        if busy:
            s.tries[key] = extra + 1
        else:
            s.tries.pop(key, None)
        # -- I08: TRACK needs no vCPU in the previous epoch; a kick (and its wait) between TRACKs
        if leaf == _TRACK:
            if s.track_owed is not None:
                self._note("I08",
                    f"TDH.MEM.TRACK on TD tdr={tdr:#x} with no kick of its vCPUs since the previous "
                    f"successful TRACK (event {s.track_owed})", i, pfn=tdr)
            if s.kick_wait:
                self._note("I08",
                    f"TDH.MEM.TRACK on TD tdr={tdr:#x} while vCPU tdvpr={min(s.kick_wait):#x}, in "
                    "the guest at the last kick, has not exited (the kick must wait)", i, pfn=tdr)
            if status == 0:
                if base is not None and base.epoch and base.refcount[(base.epoch - 1) & 1]:
                    self._note("I08", f"TDH.MEM.TRACK succeeded on TD tdr={tdr:#x} with "
                               f"{base.refcount[(base.epoch - 1) & 1]} vCPU(s) still in the guest in epoch "
                               f"{base.epoch - 1}", i, pfn=tdr)
                s.track_owed = i
        # -- I09 (6.18): BUSY → kick → one retry with every vCPU out; a failure after it bugs the VM
        if inf is not None and inf.policy == "LINUX_6_18" and leaf in _ZAP and finalized:
            prev = s.retry.pop(key, None)
            if prev is not None:                 # this is the retry
                if prev >= 0:
                    self._note("I09",
                        f"{L(leaf).name} on TD tdr={tdr:#x} was retried after BUSY (event {prev}) "
                        "without kicking the vCPUs out of the guest first", i, gfn=gfn, pfn=tdr)
                if s.in_guest:
                    self._note("I09", f"{L(leaf).name} on TD tdr={tdr:#x} was retried while vCPU "
                               f"tdvpr={min(s.in_guest):#x} is in the guest", i, gfn=gfn, pfn=tdr)
                if status != 0 and v is not None:
                    v.bug_owed = (i,
                        f"the retry of {L(leaf).name} on TD tdr={tdr:#x} failed ({status:#x})", tdr)
            elif busy:
                s.retry[key] = i
            elif status != 0 and v is not None:
                v.bug_owed = (i, f"{L(leaf).name} on TD tdr={tdr:#x} failed ({status:#x})", tdr)
        # -- I06 shadow: PENDING from AUG to ACCEPT
        if status != 0 or gfn is None:
            return
        if leaf == _AUG:
            s.pending.add(gfn)
            s.blocked.discard(gfn)
        elif leaf == _BLOCK:
            if gfn in s.pending:
                s.blocked.add(gfn)
        elif leaf == _UNBLOCK:
            s.blocked.discard(gfn)
        elif leaf in (_REMOVE, _ADD):
            s.pending.discard(gfn)
            s.blocked.discard(gfn)

    # ------------------------------------------------------------------ reporting
    def finish(self, host: Any) -> None:
        """Check-time rules over the scan's pending obligations (a bug KVM still owes)."""
        for actor, v in self.vmsh.items():
            if v.bug_owed is not None and not v.dead:
                idx, why, tdr = v.bug_owed
                self._note("I09", f"{why} (event {idx}) and {actor} was not bugged", idx, pfn=tdr)


_SCANS: "weakref.WeakKeyDictionary[Any, KvmScan]" = weakref.WeakKeyDictionary()


def kvm_scan(host: Any) -> KvmScan:
    """Return the host's KVM scanner, brought up to date (once per :func:`check_invariants` call)."""
    from tdxcore.invariants.registry import call_cache

    c = call_cache(host)
    found = _SCANS.get(host)
    s = KvmScan(host) if found is None else found
    _SCANS[host] = s
    if c.get("kvm_scan") is not s:
        s.refresh(host)
        s.scan(host)
        s.finish(host)
        c["kvm_scan"] = s
    return s

