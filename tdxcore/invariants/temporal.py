"""Sequence invariants over the event log, checked incrementally (SPEC §3.5, §6).

One :class:`Scanner` per host (kept in a weak map, so it dies with the host) reads the events
appended since its cursor, once, and folds them into a small shadow of the module state that
the sequence rules need; the first violation of each id is kept and re-reported by every later
check (a broken model stays broken). Repeated checks therefore cost O(new events).

Pairing the two edges of a SEAMCALL. ``seamcall_begin`` carries the input registers,
``seamcall_end`` the status, the outputs and the op's gfn/pfn; neither carries the op id. The
module numbers ops in begin order (the n-th ``seamcall_begin``/``tdcall_begin`` is op n, and
abort events name it), so the scanner keeps the open (begun, unfinished) ops by id and pairs an
end with the open op of the same actor, leaf space, leaf and CPU whose gfn/pfn (derived from its
registers) agree with the end's, and which is not still in ``host.tdx.inflight`` now. When more
than one remains (the same actor running identical leaves concurrently, all finished since the
last check), a lookahead over the batch drops those a later end identifies by gfn/pfn or a later
abort names; if several still remain the earliest is taken and the group is marked *ambiguous*
(an abort naming an op an ambiguous end consumed closes another op of that group instead): no
rule reports a violation from an ambiguous pairing, and the TD's event-derived child count is no
longer compared. Checking after every step (the machine test) never meets this case.

What each id checks here (the structural halves live in :mod:`.module`):

* **I02** — the event-derived CHLDCNT of every live TD (+1 per ADDCX, VP.CREATE, VP.ADDCX,
  SEPT.ADD, PAGE.ADD, 512**level per AUG; −512**level per PAGE.REMOVE, −1 per SEPT.REMOVE and
  child RECLAIM) equals the PAMT's; a TDR is reclaimed only with no child left; no child is
  reclaimed after its TDR.
* **I03** — the open ops are exactly ``host.tdx.inflight`` (no op vanished without an end or
  abort, none is in flight without a begin event); a BUSY-class status (OPERAND_BUSY,
  OPERAND_BUSY_HOST_PRIORITY, PREVIOUS_TLB_EPOCH_BUSY) ends its op inside its begin — no other
  op edge between the two — so no effect (which runs at ``complete``) can precede it.
* **I05** — per TD: PAGE.ADD / MR.EXTEND succeed only before MR.FINALIZE (the measurement is
  immutable after it). "PAGE.AUG only after" is KVM's usage (tdx-facts I05), not a module rule:
  the module's op-state table allows AUG in INITIALIZED, so that half belongs to the KVM layer's
  invariants.
* **I07** — per TD, once finalized: every successful PAGE.REMOVE / SEPT.REMOVE was of an entry
  blocked by a successful RANGE.BLOCK (not undone by UNBLOCK/AUG/ADD since) whose BEPOCH is
  tracked: ``is_tlb_tracked(bepoch, epoch, refcount[(epoch-1)&1])`` with the epoch rebuilt from
  MNG.INIT and TRACK successes and the refcounts from ``td_enter``/``td_exit``.
* **I15** — a TD leaf that needs configured keys succeeds only after MNG.KEY.CONFIG succeeded on
  every package; KEY.FREEID succeeds only after VPFLUSHDONE and, on every package, a successful
  PHYMEM.CACHE.WB whose sequence started after that VPFLUSHDONE (resumed sequences count from
  their first, interrupted, call).
* **I18** — VP.ENTER never runs a vCPU on an LP other than the one it is associated with (until
  VP.FLUSH succeeds, on that LP); VPFLUSHDONE never succeeds while a vCPU of the TD is
  associated.
* **I19** — MNG.CREATE never succeeds with an HKID a live TD holds (before its KEY.FREEID).
* **I22** — bring-up order: SYS.INIT once, before any LP.INIT; SYS.CONFIG after LP.INIT on every
  CPU; SYS.KEY.CONFIG after CONFIG, once per package (the last one makes the module ready);
  nothing else (TDMR.INIT, any TD leaf, the guest's TDCALLs) succeeds before ready; the
  kernel's ``done`` comes after every TDMR was initialized to its end.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

from tdxcore._pamt import is_tlb_tracked
from tdxcore.constants import MODEL_MAXPHYADDR, TD_EPOCH_INITIAL, PageType
from tdxcore.errors import InvariantViolation
from tdxcore.invariants.registry import replay_hint
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_INTERRUPTED_RESUMABLE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_PREVIOUS_TLB_EPOCH_BUSY,
    Leaf,
)

__all__ = ["Scanner", "scanner", "raise_recorded"]

L = Leaf
_PA_MASK = (1 << MODEL_MAXPHYADDR) - 1
_STATUS_MASK = 0xFFFFFFFF00000000
#: Statuses of a lost try-lock: decided while the op begins, before any effect.
_BUSY = frozenset((TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY, TDX_PREVIOUS_TLB_EPOCH_BUSY))
#: Kinds that are an edge of some op (a BUSY op's begin and end have none of these between them).
_EDGES = frozenset(("seamcall_begin", "tdcall_begin", "seamcall_end", "tdcall_end", "seamcall_abort",
                    "tdcall_abort", "td_enter", "td_exit"))
_GPA_MASK = ((1 << 52) - 1) & ~0xFFF

#: Leaves the module's dispatcher runs before SYS_READY (everything else is a "TD SEAMCALL").
_EXEMPT = frozenset(int(x) for x in (
    L.TDH_SYS_INFO, L.TDH_SYS_RD, L.TDH_SYS_RDALL, L.TDH_SYS_INIT, L.TDH_SYS_LP_INIT, L.TDH_SYS_CONFIG,
    L.TDH_SYS_KEY_CONFIG, L.TDH_SYS_LP_SHUTDOWN, L.TDH_SYS_UPDATE))
_TDR_RCX = frozenset(int(x) for x in (L.TDH_MNG_CREATE, L.TDH_MNG_KEY_CONFIG, L.TDH_MNG_INIT, L.TDH_MNG_RD,
                                      L.TDH_MNG_VPFLUSHDONE, L.TDH_MNG_KEY_FREEID, L.TDH_MEM_TRACK,
                                      L.TDH_MR_FINALIZE))
_TDR_RDX = frozenset(int(x) for x in (L.TDH_MNG_ADDCX, L.TDH_VP_CREATE, L.TDH_MEM_SEPT_ADD,
                                      L.TDH_MEM_PAGE_ADD,
                                      L.TDH_MR_EXTEND, L.TDH_MEM_PAGE_AUG, L.TDH_MEM_RANGE_BLOCK,
                                      L.TDH_MEM_RANGE_UNBLOCK, L.TDH_MEM_PAGE_REMOVE, L.TDH_MEM_SEPT_REMOVE))
_TDVPR_RCX = frozenset(int(x) for x in (L.TDH_VP_INIT, L.TDH_VP_ENTER, L.TDH_VP_FLUSH))
#: Leaves whose RCX is GPA|level (the end's gfn is derived from it).
_GPA_RCX = frozenset(int(x) for x in (L.TDH_MEM_SEPT_ADD, L.TDH_MEM_PAGE_ADD, L.TDH_MEM_PAGE_AUG,
                                      L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_RANGE_UNBLOCK, L.TDH_MEM_PAGE_REMOVE,
                                      L.TDH_MEM_SEPT_REMOVE, L.TDH_MR_EXTEND))
#: Leaves whose end pfn is the frame in R8 / RCX / RDX.
_PFN_R8 = frozenset(int(x) for x in (L.TDH_MEM_SEPT_ADD, L.TDH_MEM_PAGE_ADD, L.TDH_MEM_PAGE_AUG))
_PFN_RCX = frozenset(int(x) for x in (L.TDH_MNG_CREATE, L.TDH_MNG_ADDCX, L.TDH_VP_CREATE,
                                      L.TDH_MNG_KEY_CONFIG,
                                      L.TDH_MNG_VPFLUSHDONE, L.TDH_MNG_KEY_FREEID, L.TDH_MEM_TRACK,
                                      L.TDH_VP_INIT, L.TDH_VP_ENTER, L.TDH_VP_FLUSH,
                                      L.TDH_PHYMEM_PAGE_RECLAIM, L.TDH_PHYMEM_PAGE_WBINVD))
#: TD leaves the module runs only on a KEYS_CONFIGURED TD (tdx-facts §5.2; VP.FLUSH has no gate).
_NEEDS_KEYS = frozenset(int(x) for x in (
    L.TDH_MNG_ADDCX, L.TDH_MNG_INIT, L.TDH_MNG_RD, L.TDH_VP_CREATE, L.TDH_VP_ADDCX, L.TDH_VP_INIT,
    L.TDH_VP_ENTER, L.TDH_MEM_SEPT_ADD, L.TDH_MEM_PAGE_ADD, L.TDH_MR_EXTEND, L.TDH_MR_FINALIZE,
    L.TDH_MEM_PAGE_AUG, L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_RANGE_UNBLOCK, L.TDH_MEM_TRACK,
    L.TDH_MEM_PAGE_REMOVE, L.TDH_MEM_SEPT_REMOVE))

#: Field layouts the scanner reads by position (checked against the log's kinds table).
_LAYOUT = {
    "seamcall_begin": ("leaf", "cpu", "args", "gfn", "pfn"),
    "tdcall_begin": ("leaf", "cpu", "args", "gfn", "pfn"),
    "seamcall_end": ("leaf", "cpu", "status", "out", "gfn", "pfn"),
    "tdcall_end": ("leaf", "cpu", "status", "out", "gfn", "pfn"),
    "seamcall_abort": ("leaf", "cpu", "op"),
    "tdcall_abort": ("leaf", "cpu", "op"),
    "td_enter": ("leaf", "cpu", "tdvpr", "epoch", "zero_step"),
    "td_exit": ("leaf", "cpu", "tdvpr", "epoch", "reason", "gfn"),
    "bringup": ("step", "status", "errno", "detail"),
}


class _Open:
    """One begun, unfinished op as the scanner sees it."""

    __slots__ = ("id", "tdcall", "actor", "leaf", "cpu", "args", "index", "gfn", "pfn", "ambiguous")

    def __init__(self, op_id: int, tdcall: bool, ev: Tuple[Any, ...], index: int) -> None:
        self.id = op_id
        self.tdcall = tdcall
        self.actor, self.leaf, self.cpu, self.args = ev[1], ev[2], ev[3], ev[4]
        self.index = index
        self.ambiguous = False
        leaf, a = self.leaf, self.args
        self.gfn: Optional[int] = None
        self.pfn: Optional[int] = None
        if tdcall:
            self.gfn, self.pfn = ev[5], ev[6]
            return
        self.gfn = (a[0] & _GPA_MASK) >> 12 if leaf in _GPA_RCX else None
        if leaf in _PFN_R8:
            self.pfn = (a[2] & _PA_MASK) >> 12
        elif leaf in _PFN_RCX:
            self.pfn = (a[0] & _PA_MASK) >> 12
        elif leaf == L.TDH_VP_ADDCX:
            self.pfn = (a[1] & _PA_MASK) >> 12
        else:
            self.pfn = None


class _Td:
    """Shadow of one TD generation (from its MNG.CREATE to its TDR's RECLAIM)."""

    __slots__ = ("tdr", "hkid", "pkgs", "finalized", "epoch", "refcount", "blocked", "flushdone", "freed",
                 "children", "count_ok", "created")

    def __init__(self, tdr: int, hkid: int, created: int) -> None:
        self.tdr, self.hkid, self.created = tdr, hkid, created
        self.pkgs: Set[int] = set()
        self.finalized = False
        self.epoch = 0
        self.refcount = [0, 0]
        self.blocked: Dict[Tuple[int, int], int] = {}     # (gpa, level) -> BEPOCH
        self.flushdone: Optional[int] = None              # event index of VPFLUSHDONE's end
        self.freed = False
        self.children = 0
        self.count_ok = True


class Scanner:
    """Incremental reader of one host's event log (see the module docstring).

    Attributes
    ----------
    cursor : int
        Events ``[0, cursor)`` are folded in.
    violations : dict
        id -> ``(msg, gfn, pfn, event_index)`` of the first violation seen for that id.
    """

    def __init__(self, host: Any) -> None:
        self.cursor = 0
        self.nr_begins = 0
        self.open: Dict[int, _Open] = {}
        self.groups: Dict[Tuple[Any, ...], List[int]] = {}
        self.amb_closed: Dict[int, Tuple[Any, ...]] = {}   # op id -> group, closed by an ambiguous end
        self.last_edge = -1                        # index of the latest op edge before the current event
        self.tds: Dict[int, _Td] = {}
        self.vcpu_tdr: Dict[int, int] = {}
        self.assoc: Dict[int, int] = {}
        self.hkid_owner: Dict[int, int] = {}
        self.wb_done: Dict[int, int] = {}          # package -> begin index of its last completed CACHE.WB run
        self.wb_start: Dict[int, int] = {}         # package -> begin index of an interrupted run
        self.sysinit: Optional[int] = None
        self.lp: Dict[int, int] = {}
        self.config: Optional[int] = None
        self.keycfg: Dict[int, int] = {}
        self.ready: Optional[int] = None
        self.tdmr_next: Dict[int, int] = {}
        self.violations: Dict[str, Tuple[str, Optional[int], Optional[int], int]] = {}
        kinds = host.events.kinds
        for k, names in _LAYOUT.items():
            if k in kinds and kinds[k][0] != names:
                msg = f"event kind {k!r} has fields {kinds[k][0]}, the scanner reads {names}"
                raise AssertionError(msg)

    # ------------------------------------------------------------------ recording
    def _viol(self, inv: str, msg: str, index: int, gfn: Optional[int] = None, pfn: Optional[int] = None,
              op: Optional[_Open] = None) -> None:
        if op is not None and op.ambiguous:
            return
        if inv not in self.violations:
            self.violations[inv] = (msg, gfn, pfn, index)

    # ------------------------------------------------------------------ pairing
    @staticmethod
    def _key(tdcall: bool, actor: str, leaf: int, cpu: int) -> Tuple[Any, ...]:
        return (tdcall, actor, leaf, cpu)

    def _pair(self, tdcall: bool, ev: Tuple[Any, ...], live: Any, events: Any, i: int,
              n: int) -> Optional[_Open]:
        key = self._key(tdcall, ev[1], ev[2], ev[3])
        ids = self.groups.get(key)
        if not ids:
            return None
        gfn, pfn = ev[6], ev[7]
        cands = [c for c in ids if c not in live
                 and (gfn is None or self.open[c].gfn is None or self.open[c].gfn == gfn)
                 and (pfn is None or self.open[c].pfn is None or self.open[c].pfn == pfn)]
        if not cands:
            # an earlier ambiguous pairing took this op's begin: take one of its group
            cands = [c for c in ids if c not in live and self.open[c].ambiguous]
            if not cands:
                return None
        if len(cands) > 1:
            cands = self._lookahead(cands, ev, events, i, n)
        op = self.open[cands[0]]
        if len(cands) > 1:
            for c in cands:
                self.open[c].ambiguous = True
            self.amb_closed[op.id] = key
        self._close(op.id)
        return op

    def _lookahead(self, cands: List[int], ev: Tuple[Any, ...], events: Any, i: int, n: int) -> List[int]:
        """Drop candidates a later end of the batch identifies by its pfn/gfn (rare: only on ties)."""
        claimed: Set[int] = set()
        for j in range(i + 1, n):
            e = events[j]
            if e[0] == "seamcall_abort" or e[0] == "tdcall_abort":
                if e[4] in cands:               # aborted later: not the op that ended here
                    claimed.add(e[4])
                continue
            if e[0] != ev[0] or e[1] != ev[1] or e[2] != ev[2] or e[3] != ev[3]:
                continue
            fit = [c for c in cands
                   if (e[6] is None or self.open[c].gfn is None or self.open[c].gfn == e[6])
                   and (e[7] is None or self.open[c].pfn is None or self.open[c].pfn == e[7])]
            if len(fit) == 1:
                claimed.add(fit[0])
        rest = [c for c in cands if c not in claimed]
        return rest or cands

    def _close(self, op_id: int) -> Optional[_Open]:
        op = self.open.pop(op_id, None)
        if op is not None:
            key = self._key(op.tdcall, op.actor, op.leaf, op.cpu)
            g = self.groups[key]
            g.remove(op_id)
            if not g:
                del self.groups[key]
        return op

    # ------------------------------------------------------------------ scanning
    def scan(self, host: Any) -> None:
        """Fold events ``[cursor, len(events))`` in (call with ``host.tdx.lock`` held)."""
        events = host.events
        n = len(events)
        if self.cursor >= n:
            return
        live = host.tdx.inflight
        for i in range(self.cursor, n):
            ev = events[i]
            k = ev[0]
            prev_edge = self.last_edge
            if k in _EDGES:
                self.last_edge = i
            if k == "seamcall_begin" or k == "tdcall_begin":
                self.nr_begins += 1
                op = _Open(self.nr_begins, k == "tdcall_begin", ev, i)
                self.open[op.id] = op
                self.groups.setdefault(self._key(op.tdcall, op.actor, op.leaf, op.cpu), []).append(op.id)
            elif k == "seamcall_end" or k == "tdcall_end":
                tdcall = k == "tdcall_end"
                eop = self._pair(tdcall, ev, live, events, i, n)
                if eop is None:
                    self._viol("I03",
                        f"{k} of leaf {ev[2]} by {ev[1]!r} matches no begun op", i, ev[6], ev[7])
                    continue
                if (ev[4] & _STATUS_MASK) in _BUSY and prev_edge != eop.index and not eop.ambiguous:
                    self._viol("I03", f"{k} of op {eop.id} (leaf {ev[2]} by {ev[1]!r}) returned BUSY "
                               f"{ev[4]:#x} after other ops ran since its begin (event {eop.index}): a "
                               "lost try-lock ends the op inside its begin, before any effect",
                               i, ev[6], ev[7])
                self._end(host, i, eop, ev)
            elif k == "seamcall_abort" or k == "tdcall_abort":
                if self._close(ev[4]) is None:
                    # an ambiguous end took this op's begin: the end was another op of its group
                    key = self.amb_closed.pop(ev[4], None)
                    group = self.groups.get(key, []) if key is not None else []
                    other = next((c for c in group if self.open[c].ambiguous), None)
                    if other is None:
                        self._viol("I03", f"{k} names op {ev[4]}, which is not in flight", i)
                    else:
                        self._close(other)
            elif k == "seamcall_batch":         # module/batch.py: one event for a batch of pages
                td = self.tds.get(ev[8])
                if td is not None and ev[2] in (L.TDH_MEM_SEPT_ADD, L.TDH_MEM_PAGE_AUG):
                    td.children += ev[4]
                elif td is not None and ev[2] == L.TDH_PHYMEM_PAGE_RECLAIM:
                    td.children -= ev[4]
            elif k == "td_enter":
                self._enter(host, i, ev)
            elif k == "td_exit":
                td = self._td_of_vcpu(ev[4])
                if td is not None:
                    td.refcount[ev[5] & 1] -= 1
            elif k == "bringup" and ev[2] == "done":
                self._done(host, i)
        self.cursor = n

    def _td_of_vcpu(self, tdvpr: Optional[int]) -> Optional[_Td]:
        tdr = self.vcpu_tdr.get(tdvpr) if tdvpr is not None else None
        return None if tdr is None else self.tds.get(tdr)

    def _tdr_of(self, op: _Open) -> Optional[int]:
        a, leaf = op.args, op.leaf
        if op.tdcall:
            return self.vcpu_tdr.get(op.pfn) if op.pfn is not None else None
        if leaf in _TDR_RCX:
            return (a[0] & _PA_MASK) >> 12
        if leaf in _TDR_RDX:
            return (a[1] & _PA_MASK) >> 12
        if leaf in _TDVPR_RCX:
            return self.vcpu_tdr.get((a[0] & _PA_MASK) >> 12)
        if leaf == L.TDH_VP_ADDCX:
            return self.vcpu_tdr.get((a[1] & _PA_MASK) >> 12)
        return None

    def _enter(self, host: Any, i: int, ev: Tuple[Any, ...]) -> None:
        tdvpr, cpu, epoch = ev[4], ev[3], ev[5]
        prev = self.assoc.get(tdvpr)
        if prev is not None and prev != cpu:
            self._viol("I18", f"vCPU tdvpr={tdvpr:#x} entered on cpu {cpu} while associated with cpu {prev}",
                       i, pfn=tdvpr)
        self.assoc[tdvpr] = cpu
        td = self._td_of_vcpu(tdvpr)
        if td is None:
            return
        if len(td.pkgs) < host.nr_packages:
            self._viol("I15", f"VP.ENTER ran on TD tdr={td.tdr:#x} before MNG.KEY.CONFIG on every package "
                       f"(configured: {sorted(td.pkgs)})", i, pfn=td.tdr)
        if epoch != td.epoch:
            self._viol("I07", f"VP.ENTER sampled TD_EPOCH {epoch} on tdr={td.tdr:#x}; MNG.INIT and the TRACK "
                       f"successes give {td.epoch}", i, pfn=td.tdr)
        td.refcount[epoch & 1] += 1

    def _done(self, host: Any, i: int) -> None:
        if self.ready is None:
            self._viol("I22", "bring-up reported done before the module was ready", i)
        for t in host.tdx.tdmrs:
            if self.tdmr_next.get(t.base, t.base) < t.end:
                self._viol("I22", f"bring-up reported done with the TDMR at {t.base:#x} initialized only to "
                           f"{self.tdmr_next.get(t.base, t.base):#x} (end {t.end:#x})", i)

    # ------------------------------------------------------------------ one finished op
    def _end(self, host: Any, i: int, op: _Open, ev: Tuple[Any, ...]) -> None:  # noqa: C901
        leaf, status, gfn, pfn = ev[2], ev[4], ev[6], ev[7]
        succ = (status >> 32) == 0          # TDX_SUCCESS class (warnings have other classes)
        if op.ambiguous:                    # its TD's event-derived CHLDCNT is no longer exact
            t = self.tds.get(self._tdr_of(op))  # type: ignore[arg-type]
            if t is not None:
                t.count_ok = False
        if not succ:
            if leaf == L.TDH_PHYMEM_CACHE_WB and not op.tdcall and status == TDX_INTERRUPTED_RESUMABLE:
                pkg = host.package_of(op.cpu)
                if op.args[0] == 0:
                    self.wb_start[pkg] = op.index
            return
        if op.tdcall or leaf not in _EXEMPT:
            if self.ready is None:
                what = "TDCALL" if op.tdcall else "SEAMCALL"
                self._viol("I22",
                    f"{what} leaf {leaf} succeeded before the module was ready", i, gfn, pfn, op)
        exact = status == 0
        if not op.tdcall and leaf in _EXEMPT or leaf == L.TDH_SYS_TDMR_INIT and not op.tdcall:
            if exact:
                self._sys(host, i, op, ev)
            return
        tdr = self._tdr_of(op)
        td = self.tds.get(tdr) if tdr is not None else None
        if op.tdcall:
            if exact and td is not None and len(td.pkgs) < host.nr_packages:
                self._viol("I15", f"the guest's ACCEPT succeeded on TD tdr={td.tdr:#x} before MNG.KEY.CONFIG "
                           "on every package", i, gfn, pfn, op)
            return
        if leaf == L.TDH_MNG_CREATE:
            if exact:
                hkid = op.args[1]
                other = self.hkid_owner.get(hkid)
                if other is not None:
                    self._viol("I19",
                        f"MNG.CREATE gave hkid {hkid} to tdr={tdr:#x} while tdr={other:#x} holds it",
                               i, pfn=tdr, op=op)
                assert tdr is not None
                self.tds[tdr] = _Td(tdr, hkid, i)
                self.hkid_owner[hkid] = tdr
            return
        if td is None:
            if leaf == L.TDH_PHYMEM_PAGE_RECLAIM and exact:
                self._reclaim(host, i, op, ev)
            elif leaf == L.TDH_PHYMEM_CACHE_WB and exact:
                self._cache_wb(host, op)
            return
        if exact and leaf in _NEEDS_KEYS and len(td.pkgs) < host.nr_packages:
            self._viol("I15", f"leaf {L(leaf).name} succeeded on TD tdr={td.tdr:#x} before MNG.KEY.CONFIG on "
                       f"every package (configured: {sorted(td.pkgs)})", i, gfn, pfn, op)
        if not exact:
            return
        if op.ambiguous:
            td.count_ok = False
        a = op.args
        gpa, level = a[0] & _GPA_MASK, a[0] & 7
        if leaf == L.TDH_MNG_KEY_CONFIG:
            td.pkgs.add(host.package_of(op.cpu))
        elif leaf == L.TDH_MNG_INIT:
            td.epoch, td.refcount = TD_EPOCH_INITIAL, [0, 0]
        elif leaf in (L.TDH_MNG_ADDCX, L.TDH_VP_ADDCX):
            td.children += 1
        elif leaf == L.TDH_MEM_SEPT_ADD:
            td.children += 1
            td.blocked.pop((gpa, level), None)
        elif leaf == L.TDH_VP_CREATE:
            td.children += 1
            self.vcpu_tdr[(a[0] & _PA_MASK) >> 12] = td.tdr
        elif leaf == L.TDH_MEM_PAGE_ADD:
            td.children += 1
            td.blocked.pop((gpa, 0), None)
            if td.finalized:
                self._viol("I05",
                    f"MEM.PAGE.ADD succeeded on TD tdr={td.tdr:#x} after MR.FINALIZE", i, gfn, pfn, op)
        elif leaf == L.TDH_MR_EXTEND:
            if td.finalized:
                self._viol("I05",
                    f"MR.EXTEND succeeded on TD tdr={td.tdr:#x} after MR.FINALIZE", i, gfn, pfn, op)
        elif leaf == L.TDH_MR_FINALIZE:
            td.finalized = True
        elif leaf == L.TDH_MEM_PAGE_AUG:
            td.children += 1 << (9 * level)
            td.blocked.pop((gpa, level), None)
        elif leaf == L.TDH_MEM_RANGE_BLOCK:
            td.blocked[(gpa, level)] = td.epoch
        elif leaf == L.TDH_MEM_RANGE_UNBLOCK:
            td.blocked.pop((gpa, level), None)
        elif leaf == L.TDH_MEM_TRACK:
            td.epoch += 1
        elif leaf in (L.TDH_MEM_PAGE_REMOVE, L.TDH_MEM_SEPT_REMOVE):
            bepoch = td.blocked.pop((gpa, level), None)
            if td.finalized:
                name = L(leaf).name
                if bepoch is None:
                    self._viol("I07", f"{name} succeeded on RUNNABLE TD tdr={td.tdr:#x} at gpa={gpa:#x} "
                               f"level={level} with no RANGE.BLOCK of that entry", i, gfn, pfn, op)
                elif not is_tlb_tracked(bepoch, td.epoch, td.refcount[(td.epoch - 1) & 1]):
                    self._viol("I07", f"{name} succeeded on RUNNABLE TD tdr={td.tdr:#x} at gpa={gpa:#x} with "
                               f"BEPOCH {bepoch} not tracked (epoch {td.epoch}, refcount {td.refcount})",
                               i, gfn, pfn, op)
            td.children -= (1 << (9 * level)) if leaf == L.TDH_MEM_PAGE_REMOVE else 1
        elif leaf == L.TDH_MNG_VPFLUSHDONE:
            busy = sorted(v for v, t in self.vcpu_tdr.items() if t == td.tdr and v in self.assoc)
            if busy:
                self._viol("I18",
                    f"MNG.VPFLUSHDONE succeeded on tdr={td.tdr:#x} while vCPU tdvpr={busy[0]:#x} is "
                           f"associated with cpu {self.assoc[busy[0]]}", i, pfn=busy[0], op=op)
            td.flushdone = i
        elif leaf == L.TDH_MNG_KEY_FREEID:
            if td.flushdone is None:
                self._viol("I15", f"MNG.KEY.FREEID succeeded on tdr={td.tdr:#x} without MNG.VPFLUSHDONE", i,
                           pfn=td.tdr, op=op)
            else:
                late = [p for p in range(host.nr_packages) if self.wb_done.get(p, -1) < td.flushdone]
                if late:
                    self._viol("I15", f"MNG.KEY.FREEID succeeded on tdr={td.tdr:#x} (hkid {td.hkid}) before "
                               f"PHYMEM.CACHE.WB completed on package {late[0]} after VPFLUSHDONE "
                               f"(event {td.flushdone})", i, pfn=td.tdr, op=op)
            td.freed = True
            if self.hkid_owner.get(td.hkid) == td.tdr:
                del self.hkid_owner[td.hkid]
        elif leaf == L.TDH_VP_FLUSH:
            v = (a[0] & _PA_MASK) >> 12
            was = self.assoc.pop(v, None)
            if was is not None and was != op.cpu:
                self._viol("I18", f"VP.FLUSH of tdvpr={v:#x} succeeded on cpu {op.cpu}; the vCPU is "
                           f"associated with cpu {was}", i, pfn=v, op=op)

    def _cache_wb(self, host: Any, op: _Open) -> None:
        pkg = host.package_of(op.cpu)
        start = op.index if op.args[0] == 0 else self.wb_start.pop(pkg, op.index)
        self.wb_start.pop(pkg, None)
        self.wb_done[pkg] = max(self.wb_done.get(pkg, -1), start)

    def _reclaim(self, host: Any, i: int, op: _Open, ev: Tuple[Any, ...]) -> None:
        pfn, out = ev[7], ev[5]
        ty, owner = out[0], out[1]
        if ty == PageType.PT_TDR:
            td = self.tds.pop(pfn, None)
            if td is not None:
                if td.count_ok and td.children and not op.ambiguous:
                    self._viol("I02", f"the TDR tdr={pfn:#x} was reclaimed with {td.children} child page(s) "
                               "not reclaimed", i, pfn=pfn, op=op)
                if self.hkid_owner.get(td.hkid) == pfn:
                    del self.hkid_owner[td.hkid]
            for v in [v for v, t in self.vcpu_tdr.items() if t == pfn]:
                del self.vcpu_tdr[v]
                self.assoc.pop(v, None)
            return
        td = self.tds.get(owner)
        if td is None:
            self._viol("I02", f"page pfn={pfn:#x} was reclaimed from owner {owner:#x}, whose TDR is gone", i,
                       pfn=pfn, op=op)
            return
        td.children -= 1
        if ty == PageType.PT_TDVPR:
            self.vcpu_tdr.pop(pfn, None)
            self.assoc.pop(pfn, None)

    def _sys(self, host: Any, i: int, op: _Open, ev: Tuple[Any, ...]) -> None:
        leaf, cpu = op.leaf, op.cpu
        if leaf == L.TDH_SYS_INIT:
            if self.sysinit is not None:
                self._viol("I22", f"TDH.SYS.INIT succeeded twice (events {self.sysinit}, {i})", i, op=op)
            self.sysinit = i
        elif leaf == L.TDH_SYS_LP_INIT:
            if self.sysinit is None:
                self._viol("I22", f"TDH.SYS.LP.INIT succeeded on cpu {cpu} before TDH.SYS.INIT", i, op=op)
            if cpu in self.lp:
                self._viol("I22", f"TDH.SYS.LP.INIT succeeded twice on cpu {cpu}", i, op=op)
            self.lp[cpu] = i
        elif leaf == L.TDH_SYS_CONFIG:
            missing = [c for c in range(host.nr_cpus) if c not in self.lp]
            if self.sysinit is None or missing or self.config is not None:
                why = (f"before TDH.SYS.LP.INIT on cpu {missing[0]}" if missing else
                       "twice" if self.config is not None else "before TDH.SYS.INIT")
                self._viol("I22", f"TDH.SYS.CONFIG succeeded {why}", i, op=op)
            self.config = i
        elif leaf == L.TDH_SYS_KEY_CONFIG:
            pkg = host.package_of(cpu)
            if self.config is None:
                self._viol("I22",
                    f"TDH.SYS.KEY.CONFIG succeeded on package {pkg} before TDH.SYS.CONFIG", i, op=op)
            if pkg in self.keycfg:
                self._viol("I22", f"TDH.SYS.KEY.CONFIG succeeded twice on package {pkg}", i, op=op)
            self.keycfg[pkg] = i
            if len(self.keycfg) == host.nr_packages and self.ready is None:
                self.ready = i
        elif leaf == L.TDH_SYS_TDMR_INIT:
            base = op.args[0]
            self.tdmr_next[base] = max(self.tdmr_next.get(base, base), ev[5][1])


_SCANNERS: "weakref.WeakKeyDictionary[Any, Scanner]" = weakref.WeakKeyDictionary()


def scanner(host: Any) -> Scanner:
    """Return the host's scanner, brought up to date with its event log."""
    s = _SCANNERS.get(host)
    if s is None:
        s = _SCANNERS[host] = Scanner(host)
    with host.tdx.lock:
        s.scan(host)
    return s


def raise_recorded(host: Any, inv: str) -> None:
    """Raise the first recorded sequence violation of ``inv`` on ``host``, if any."""
    s = scanner(host)
    v = s.violations.get(inv)
    if v is not None:
        msg, gfn, pfn, idx = v
        raise InvariantViolation(inv, msg, gfn=gfn, pfn=pfn, event_index=idx, replay=replay_hint(host, idx))
