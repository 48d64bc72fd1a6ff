"""Module-layer invariants over the live TDs' records (SPEC §3.5, §6; tdx-facts invariants).

Every check walks what the module says each live TD owns — its TDR, TDCS pages, TDVPR and TDCX
pages and the frames its S-EPT entries point to (``SeptTree.entries(level)``) — and compares
that with the PAMT (``page_type``/``owner``/``child_count``, O(1) each), the KOT, the vCPUs
and the host's counters. Cost: O(live TD pages + S-EPT tables × 512), never O(host frames).
The records are built once per :func:`~tdxcore.invariants.check_invariants` call.

A TD in TEARDOWN may have given frames back with PHYMEM.PAGE.RECLAIM while its records (TDCS
list, S-EPT) still name them; for such a TD only the records whose PAMT owner is still that TDR
count, CHLDCNT must be at least their number (a reclaimed TDVPR takes its TDCX list with it),
and the exact count is the event-derived one (:mod:`.temporal`).

Which id owns which rule (each rule has exactly one id, so a broken rule reports one id):

* **I01** — every TDR/TDCS/TDVPR/TDCX/S-EPT-page record has the PAMT type of its role.
* **I02** — those records are owned (PAMT owner) by their TD; CHLDCNT equals the distinct 4K
  units the TD's records hold (at least, in TEARDOWN) and the event-derived count; plus the
  sequence part (TDR reclaimed last).
* **I03** — lock bookkeeping: every holder of ``tdx.holders`` is an acquired op in
  ``tdx.inflight``; each TD's op-state / S-EPT tree / epoch BusyLock, the KOT lock and every
  WBCACHE lock is held exactly by its holders (exclusive: one; shared: ``nr_shared``); nothing is
  held and every TDR's PAMT lock is free when no op is in flight; the epoch refcounts equal the
  vCPUs in the guest, each with its VP.ENTER op in flight; plus the scanner's open ops equal
  ``inflight``.
* **I04** — every non-free S-EPT entry below the top level has an NL_MAPPED/NL_BLOCKED parent
  entry; no non-leaf entry at level 0; every leaf's frames are PT_REG owned by the TD.
* **I15** — KOT state follows the TD lifecycle (HKID_ASSIGNED/KEYS_CONFIGURED: ASSIGNED;
  BLOCKED: FLUSHED with a write-back bitmap); KEYS_CONFIGURED iff configured on every package;
  no KOT entry is ASSIGNED/FLUSHED without a TD holding it; plus the sequence part.
* **I18** — ``num_assoc`` equals the associated vCPUs; a vCPU in the guest is associated;
  plus the sequence part.
* **I19** — HKIDs of TDs that hold one (lifecycle before TEARDOWN) are distinct guest KeyIDs
  (never the global KeyID) and at most the number of guest KeyIDs; plus the sequence part.
* **I20** (host part) — while any HKID is configured (``keyids.nr_configured``, or a TD in
  KEYS_CONFIGURED / BLOCKED: programmed on every package, not yet freed), every package has an
  online CPU. (A TD created while a package had no online CPU is the KVM part of I20.)
* **S6b** — no frame appears twice among all live TDs' records (two GPAs, two roles, two TDs).
* **S6c** (module part) — every frame a TD owns is allocated in the host allocator (not free);
  every leaked frame is allocated and recorded once; the PAMT's TD-type frames are exactly the
  live TDs' (sum of CHLDCNT + 1 per TDR, from the PAMT's O(1) per-type counters); TD frames +
  module PAMT/TDMR_INFO frames + user pages + leaked NDA frames do not exceed the allocated
  frames (the rest are held by callers, e.g. a TD_PARAMS page or a page about to be added).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from tdxcore.constants import (
    LOW_RESERVED_FRAMES,
    PAGE_SHIFT,
    SEPT_PFN_MASK,
    SEPT_STATE_BITS,
    PageType,
)
from tdxcore.errors import InvariantViolation
from tdxcore.invariants.registry import call_cache, register_invariant, replay_hint
from tdxcore.invariants.temporal import raise_recorded, scanner
from tdxcore.module.kot import KotState
from tdxcore.module.td import TdLifecycle
from tdxcore.status import SEPT_STATE_FLAGS, SeptState  # type: ignore[attr-defined]

__all__ = ["TdRecords", "records", "last_event"]

PT = PageType
#: PAMT types a TD's frames have.
TD_TYPES = (PT.PT_TDR, PT.PT_TDCX, PT.PT_TDVPR, PT.PT_EPT, PT.PT_REG)

# entry bits -> (kind, state): the encoding is a function of SEPT_STATE_BITS only.
_STATE_MASK = 0
for _b in SEPT_STATE_BITS:
    _STATE_MASK |= 1 << _b
_KIND: Dict[int, Tuple[str, Optional[SeptState]]] = {}
for _enc in range(1 << len(SEPT_STATE_BITS)):
    _bits = 0
    for _i, _b in enumerate(SEPT_STATE_BITS):
        if _enc >> _i & 1:
            _bits |= 1 << _b
    try:
        _st: Optional[SeptState] = SeptState(_enc)
    except ValueError:
        _st = None
    _KIND[_bits] = (str(SEPT_STATE_FLAGS[int(_st)]["kind"]) if _st is not None else "invalid", _st)
_NL_OK = (SeptState["NL_MAPPED"], SeptState["NL_BLOCKED"])

# roles of a TD's frames and the PAMT type each must have
ROLE_TYPE = {"tdr": PT.PT_TDR, "tdcs": PT.PT_TDCX, "tdvpr": PT.PT_TDVPR, "tdcx": PT.PT_TDCX,
             "sept": PT.PT_EPT, "leaf": PT.PT_REG}


class TdRecords:
    """What the module records one live TD owns.

    Attributes
    ----------
    frames : list of (pfn, role, gpa, level)
        Every record (a level-1 leaf contributes its 512 frames), in a fixed order: TDCS, then
        per vCPU its TDVPR and TDCX pages, then S-EPT pages and leaves by level and GPA.
        TEARDOWN: only records whose PAMT owner is still this TDR.
    entries : list of (level, gpa, entry, state)
        The non-free S-EPT entries (empty in TEARDOWN: the tree is no longer consulted).
    """

    __slots__ = ("td", "tdr", "teardown", "frames", "entries", "nl")

    def __init__(self, host: Any, td: Any) -> None:
        self.td = td
        self.tdr = td.tdr
        self.teardown = td.lifecycle == TdLifecycle.TEARDOWN
        pamt = host.pamt
        fr: List[Tuple[int, str, Optional[int], int]] = [(p, "tdcs", None, 0) for p in td.tdcs]
        for v in sorted(td.vcpus):
            fr.append((v, "tdvpr", None, 0))
            fr.extend((p, "tdcx", None, 0) for p in td.vcpus[v].tdcx)
        self.entries: List[Tuple[int, int, int, Any]] = []
        self.nl: Dict[Tuple[int, int], Any] = {}
        tree = td.sept
        if tree is not None:
            for lv in range(tree.levels - 1, -1, -1):
                for gpa, e in tree.entries(lv):
                    kind, st = _KIND.get(e & _STATE_MASK, ("invalid", None))
                    if kind == "free":
                        continue
                    self.entries.append((lv, gpa, e, st))
                    pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT
                    if kind == "non-leaf":
                        self.nl[(lv, gpa)] = st
                        fr.append((pfn, "sept", gpa, lv))
                    elif kind == "leaf":
                        if lv == 0:
                            fr.append((pfn, "leaf", gpa, 0))
                        else:
                            fr.extend((pfn + k, "leaf", gpa, lv) for k in range(1 << (9 * lv)))
        if self.teardown:
            tdr = self.tdr
            fr = [r for r in fr if r[0] < pamt.nr_frames and pamt.owner(r[0]) == tdr]
            self.entries = []
        self.frames = fr


def records(host: Any) -> List[TdRecords]:
    """Return the records of every live TD (ascending TDR), cached for the current check call."""
    c = call_cache(host)
    r = c.get("records")
    if r is None:
        r = c["records"] = [TdRecords(host, host.tdx.tds[t]) for t in sorted(host.tdx.tds)]
    return r


def last_event(host: Any, pfn: Optional[int] = None, gfn: Optional[int] = None) -> int:
    """Index of the latest event whose ``pfn`` (or ``gfn``) field is that value, else the last.

    Only called to build a violation (a backward scan of the log).
    """
    ev = host.events
    kinds = ev.kinds
    pos: Dict[str, Tuple[Optional[int], Optional[int]]] = {}
    for k, (names, _) in kinds.items():
        pos[k] = (2 + names.index("pfn") if "pfn" in names else None,
                  2 + names.index("gfn") if "gfn" in names else None)
    for i in range(len(ev) - 1, -1, -1):
        e = ev[i]
        pp, gp = pos.get(e[0], (None, None))
        if pfn is not None and pp is not None and e[pp] == pfn:
            return i
        if gfn is not None and gp is not None and e[gp] == gfn:
            return i
    return max(len(ev) - 1, 0)


def _fail(host: Any, inv: str, msg: str, *, pfn: Optional[int] = None, gfn: Optional[int] = None,
          index: Optional[int] = None) -> InvariantViolation:
    idx = last_event(host, pfn, gfn) if index is None else index
    return InvariantViolation(inv, msg, gfn=gfn, pfn=pfn, event_index=idx, replay=replay_hint(host, idx))


def _gfn(gpa: Optional[int]) -> Optional[int]:
    return None if gpa is None else gpa >> PAGE_SHIFT


def _type(pamt: Any, pfn: int) -> int:
    """PAMT type of ``pfn``; -1 for a frame beyond the PAMT (a record naming no host frame)."""
    return pamt.page_type(pfn) if 0 <= pfn < pamt.nr_frames else -1


def _owner(pamt: Any, pfn: int) -> int:
    return pamt.owner(pfn) if 0 <= pfn < pamt.nr_frames else -1


# ---------------------------------------------------------------------------------- I01
def check_i01(host: Any) -> None:
    """I01: every non-leaf record has its role's PAMT type (leaves: I04)."""
    pamt = host.pamt
    for r in records(host):
        ty = pamt.page_type(r.tdr)
        if ty != PT.PT_TDR:
            raise _fail(host, "I01", f"TDR of a live TD has PAMT type {ty}, not PT_TDR", pfn=r.tdr)
        for pfn, role, gpa, _lv in r.frames:
            if role == "leaf":
                continue
            ty = _type(pamt, pfn)
            if ty != ROLE_TYPE[role]:
                raise _fail(host, "I01", f"{role} page of tdr={r.tdr:#x} has PAMT type {ty}, not "
                            f"{ROLE_TYPE[role].name}", pfn=pfn, gfn=_gfn(gpa))


# ---------------------------------------------------------------------------------- I02
def check_i02(host: Any) -> None:
    """I02: owners and CHLDCNT (records and event-derived), TDR reclaimed last."""
    pamt = host.pamt
    scan = scanner(host)
    for r in records(host):
        units = set()
        for pfn, role, gpa, _lv in r.frames:
            units.add(pfn)
            if role == "leaf" or r.teardown:
                continue
            own = _owner(pamt, pfn)
            if own != r.tdr:
                raise _fail(host, "I02", f"{role} page of tdr={r.tdr:#x} has PAMT owner {own:#x}", pfn=pfn,
                            gfn=_gfn(gpa))
        cc = pamt.child_count(r.tdr)
        if (cc < len(units)) if r.teardown else (cc != len(units)):
            raise _fail(host, "I02", f"CHLDCNT of tdr={r.tdr:#x} is {cc}; the module's records hold "
                        f"{len(units)} 4K unit(s)", pfn=r.tdr)
        t = scan.tds.get(r.tdr)
        if t is not None and t.count_ok and t.children != cc:
            raise _fail(host, "I02", f"CHLDCNT of tdr={r.tdr:#x} is {cc}; the successful leaves in the "
                        f"event log account for {t.children}", pfn=r.tdr)
    raise_recorded(host, "I02")


# ---------------------------------------------------------------------------------- I03
def _lock_holders(host: Any, key: Tuple[Any, ...], lock: Any) -> None:
    hs = host.tdx.holders.get(key, ())
    if lock.is_exclusive:
        want = 1
    else:
        want = lock.nr_shared
    if len(hs) != want:
        mode = "exclusively" if lock.is_exclusive else f"shared x{lock.nr_shared}" if want else "free"
        pfn = key[1] if len(key) > 1 and isinstance(key[1], int) and key[0] != "wbcache" else None
        raise _fail(host, "I03", f"lock {key} is {mode} but {len(hs)} in-flight op(s) hold it", pfn=pfn)


def check_i03(host: Any) -> None:
    """I03: every held lock belongs to an in-flight op; nothing held when nothing is in flight."""
    tdx = host.tdx
    inflight = tdx.inflight
    for key, ops in tdx.holders.items():
        if not ops:
            raise _fail(host, "I03", f"lock {key} has an empty holder list")
        for op in ops:
            if inflight.get(op.id) is not op or not op.acquired:
                raise _fail(host, "I03", f"lock {key} is held by op {op.id} ({op.actor!r}), which is not in "
                            "flight")
    for op_id, op in inflight.items():
        if not op.acquired or op.result is not None:
            raise _fail(host, "I03", f"in-flight op {op_id} is finished or not acquired")
    for t in sorted(tdx.tds):
        td = tdx.tds[t]
        _lock_holders(host, ("op_state", t), td.op_state_lock)
        _lock_holders(host, ("sept_tree", t), td.sept_lock)
        _lock_holders(host, ("td_epoch", t), td.epoch_lock)
        if min(td.refcount) < 0:
            raise _fail(host, "I03", f"TD epoch refcount of tdr={t:#x} went negative: {td.refcount}", pfn=t)
        in_guest = [v for v in td.vcpus.values() if v.in_guest]
        if sum(td.refcount) != len(in_guest):
            raise _fail(host, "I03",
                f"TD epoch refcounts {td.refcount} of tdr={t:#x} but {len(in_guest)} vCPU(s) "
                        "in the guest", pfn=t)
    guests = {op.regs[0] >> PAGE_SHIFT for op in inflight.values() if op.in_guest}
    for t in sorted(tdx.tds):
        for v in tdx.tds[t].vcpus.values():
            if v.in_guest and v.tdvpr not in guests:
                raise _fail(host, "I03",
                    f"vCPU tdvpr={v.tdvpr:#x} is in the guest with no VP.ENTER in flight",
                            pfn=v.tdvpr)
    _lock_holders(host, ("kot",), tdx.kot.lock)
    for pkg in sorted(tdx.wbcache_locks):
        _lock_holders(host, ("wbcache", pkg), tdx.wbcache_locks[pkg])
    if not inflight:
        if tdx.holders:
            raise _fail(host, "I03", f"no op is in flight but {sorted(map(str, tdx.holders))[0]} is held")
        pamt = host.pamt
        for t in sorted(tdx.tds):
            if pamt.try_lock(t, True, 0) != 0:        # a probe: nothing may hold it now
                raise _fail(host, "I03", f"no op is in flight but the PAMT lock of tdr={t:#x} is held", pfn=t)
            pamt.unlock(t, True)
    scan = scanner(host)
    open_ids, live = set(scan.open), set(inflight)
    if open_ids != live:
        extra = sorted(open_ids - live)
        if extra:
            op = scan.open[extra[0]]
            raise _fail(host, "I03",
                f"op {op.id} (leaf {op.leaf} by {op.actor!r}) began at event {op.index} and "
                        "neither finished nor is in flight", index=op.index)
        missing = sorted(live - open_ids)[0]
        raise _fail(host, "I03", f"in-flight op {missing} has no begin event")
    raise_recorded(host, "I03")


# ---------------------------------------------------------------------------------- I04
def check_i04(host: Any) -> None:
    """I04: every S-EPT entry has a present parent; leaf frames are PT_REG owned by the TD."""
    pamt = host.pamt
    for r in records(host):
        if r.teardown or r.td.sept is None:
            continue
        top = r.td.sept.levels - 1
        for lv, gpa, _e, st in r.entries:
            kind = SEPT_STATE_FLAGS[int(st)]["kind"] if st is not None else "invalid"
            if kind == "invalid" or (kind == "non-leaf" and lv == 0):
                raise _fail(host, "I04", f"S-EPT entry of tdr={r.tdr:#x} at level {lv} has no valid state",
                            gfn=gpa >> PAGE_SHIFT)
            if lv < top:
                up = gpa & ~((1 << (PAGE_SHIFT + 9 * (lv + 1))) - 1)
                pst = r.nl.get((lv + 1, up))
                if pst not in _NL_OK:
                    raise _fail(host, "I04",
                        f"{st.name if st is not None else '?'} entry of tdr={r.tdr:#x} at "
                                f"level {lv} under a level-{lv + 1} entry that is "
                                f"{'missing' if pst is None else pst.name}", gfn=gpa >> PAGE_SHIFT)
        for pfn, role, lgpa, _lv in r.frames:
            if role != "leaf":
                continue
            ty, own = _type(pamt, pfn), _owner(pamt, pfn)
            if ty != PT.PT_REG or own != r.tdr:
                raise _fail(host, "I04",
                    f"gpa={lgpa:#x} of tdr={r.tdr:#x} maps a frame of PAMT type {ty} owned "
                            f"by {own:#x} (must be PT_REG owned by the TD)", pfn=pfn, gfn=_gfn(lgpa))


# ---------------------------------------------------------------------------------- I15
def check_i15(host: Any) -> None:
    """I15: KOT state follows the TD lifecycle; every in-use KOT entry has its TD."""
    tdx = host.tdx
    kot = tdx.kot
    holders: Dict[int, int] = {}
    for t in sorted(tdx.tds):
        td = tdx.tds[t]
        lc = td.lifecycle
        if lc == TdLifecycle.TEARDOWN:
            continue
        holders[td.hkid] = t
        st = kot.state[td.hkid] if 0 <= td.hkid < len(kot.state) else None
        want = KotState.FLUSHED if lc == TdLifecycle.BLOCKED else KotState.ASSIGNED
        if st != want:
            raise _fail(host, "I15", f"TD tdr={t:#x} is {lc.name} but KOT[{td.hkid}] is "
                        f"{st.name if st is not None else 'missing'}, not {want.name}", pfn=t)
        if lc == TdLifecycle.BLOCKED and td.hkid not in kot.wbinvd_bitmap:
            raise _fail(host, "I15",
                f"TD tdr={t:#x} is BLOCKED but hkid {td.hkid} has no write-back bitmap", pfn=t)
        all_pkgs = len(td.pkg_configured) == host.nr_packages
        if (lc == TdLifecycle.KEYS_CONFIGURED) != all_pkgs and lc != TdLifecycle.BLOCKED:
            raise _fail(host, "I15", f"TD tdr={t:#x} is {lc.name} with KEY.CONFIG done on packages "
                        f"{sorted(td.pkg_configured)} of {host.nr_packages}", pfn=t)
    for k, st in enumerate(kot.state):
        if st in (KotState.ASSIGNED, KotState.FLUSHED) and k not in holders:
            raise _fail(host, "I15", f"KOT[{k}] is {st.name} but no live TD holds hkid {k}")
    raise_recorded(host, "I15")


# ---------------------------------------------------------------------------------- I18
def check_i18(host: Any) -> None:
    """I18: association bookkeeping; plus the sequence part."""
    tdx = host.tdx
    for t in sorted(tdx.tds):
        td = tdx.tds[t]
        n = 0
        for v in sorted(td.vcpus):
            vc = td.vcpus[v]
            if vc.associated_cpu is not None:
                n += 1
                if not 0 <= vc.associated_cpu < host.nr_cpus:
                    raise _fail(host, "I18",
                        f"vCPU tdvpr={v:#x} is associated with cpu {vc.associated_cpu}", pfn=v)
            elif vc.in_guest:
                raise _fail(host, "I18",
                    f"vCPU tdvpr={v:#x} is in the guest but associated with no LP", pfn=v)
        if n != td.num_assoc:
            raise _fail(host, "I18", f"TD tdr={t:#x} counts {td.num_assoc} associated vCPUs, {n} are", pfn=t)
    raise_recorded(host, "I18")


# ---------------------------------------------------------------------------------- I19
def check_i19(host: Any) -> None:
    """I19: one TDR <-> one HKID from the guest range; live TDs <= guest KeyIDs."""
    tdx = host.tdx
    k = host.keyids
    lo, hi = k.guest_range
    seen: Dict[int, int] = {}
    for t in sorted(tdx.tds):
        td = tdx.tds[t]
        if td.lifecycle == TdLifecycle.TEARDOWN:
            continue
        h = td.hkid
        if not lo <= h < hi or h == k.global_keyid:
            raise _fail(host, "I19",
                f"TD tdr={t:#x} holds KeyID {h}, outside the guest range [{lo}, {hi})", pfn=t)
        if h in seen:
            raise _fail(host, "I19", f"TDs tdr={seen[h]:#x} and tdr={t:#x} both hold hkid {h}", pfn=t)
        seen[h] = t
    if len(seen) > k.nr_guest_keyids:
        raise _fail(host, "I19",
            f"{len(seen)} live TDs hold HKIDs; only {k.nr_guest_keyids} guest KeyIDs exist")
    raise_recorded(host, "I19")


# ---------------------------------------------------------------------------------- I20
def check_i20(host: Any) -> None:
    """I20 (host part): every package keeps an online CPU while any HKID is configured."""
    tdx = host.tdx
    configured = host.keyids.nr_configured > 0 or any(
        td.lifecycle in (TdLifecycle.KEYS_CONFIGURED, TdLifecycle.BLOCKED) for td in tdx.tds.values())
    if not configured:
        return
    cpp = host.cpus_per_package
    for pkg in range(host.nr_packages):
        if not any(host.is_cpu_online(c) for c in range(pkg * cpp, (pkg + 1) * cpp)):
            cpu_events = host.events.filter(kind="cpu")
            idx = max((i for i, e in cpu_events if e[3] == pkg), default=None)
            raise _fail(host, "I20", f"package {pkg} has no online CPU while HKIDs are configured", index=idx)


# ---------------------------------------------------------------------------------- S6b
def check_s6b(host: Any) -> None:
    """S6b: no frame in two records (two GPAs, two roles or two TDs)."""
    seen: Dict[int, Tuple[int, str, Optional[int]]] = {}
    for r in records(host):
        for pfn, role, gpa, _lv in r.frames:
            o = seen.get(pfn)
            if o is not None:
                where = f"tdr={o[0]:#x} ({o[1]}{'' if o[2] is None else f' gpa={o[2]:#x}'})"
                raise _fail(host, "S6b", f"frame is {role}{'' if gpa is None else f' gpa={gpa:#x}'} of "
                            f"tdr={r.tdr:#x} and also {where}", pfn=pfn, gfn=_gfn(gpa))
            seen[pfn] = (r.tdr, role, gpa)
        if r.tdr in seen:
            raise _fail(host, "S6b",
                f"the TDR tdr={r.tdr:#x} is also a page of tdr={seen[r.tdr][0]:#x}", pfn=r.tdr)


# ---------------------------------------------------------------------------------- S6c
def check_s6c(host: Any) -> None:
    """S6c (module part): TD, leaked and module frames are allocated; PAMT TD frames all accounted."""
    alloc = host.frames
    pamt = host.pamt
    tdx = host.tdx
    owned = 0
    for r in records(host):
        if not alloc.is_allocated(r.tdr):
            raise _fail(host, "S6c", f"the TDR tdr={r.tdr:#x} is free in the host allocator", pfn=r.tdr)
        owned += 1 + pamt.child_count(r.tdr)
        done = set()
        for pfn, role, gpa, _lv in r.frames:
            if pfn in done:
                continue
            done.add(pfn)
            if not alloc.is_allocated(pfn):
                raise _fail(host, "S6c", f"{role} page of tdr={r.tdr:#x} is free in the host allocator",
                            pfn=pfn, gfn=_gfn(gpa))
    in_pamt = sum(pamt.nr_assigned(t) for t in TD_TYPES)
    if in_pamt != owned:
        raise _fail(host, "S6c", f"the PAMT has {in_pamt} TD-type frames; the live TDs own {owned} "
                    "(CHLDCNT + TDR)")
    leaked: Dict[int, Any] = {}
    leaked_nda = 0
    for rec in host.leaks:
        if rec.pfn is None:
            continue
        if rec.pfn in leaked:
            raise _fail(host, "S6c",
                f"frame recorded as leaked twice ({leaked[rec.pfn].reason!r}, {rec.reason!r})",
                        pfn=rec.pfn, index=rec.event_index)
        leaked[rec.pfn] = rec
        if not alloc.is_allocated(rec.pfn):
            raise _fail(host, "S6c", f"leaked frame ({rec.what}: {rec.reason}) is not allocated (freed, or "
                        "never allocated)", pfn=rec.pfn, index=rec.event_index)
        if _type(pamt, rec.pfn) == PT.PT_NDA:
            leaked_nda += 1
    allocated = alloc.nr_frames - min(LOW_RESERVED_FRAMES, alloc.nr_frames) - alloc.nr_free
    module_frames = sum(n for _, n in tdx.pamt_frames) + len(tdx.tdmr_info_frames)
    known = in_pamt + module_frames + host.user.nr_backed + leaked_nda
    if known > allocated:
        raise _fail(host, "S6c", f"{known} frames are held (TD {in_pamt}, module {module_frames}, user "
                    f"{host.user.nr_backed}, leaked {leaked_nda}) but only {allocated} are allocated")


# ---------------------------------------------------------------------------------- sequence-only ids
def _seq(inv: str) -> Any:
    def check(host: Any) -> None:
        raise_recorded(host, inv)
    check.__name__ = f"check_{inv.lower()}"
    check.__doc__ = f"{inv}: the sequence rule over the event log (see tdxcore.invariants.temporal)."
    return check


check_i05 = _seq("I05")
check_i07 = _seq("I07")
check_i22 = _seq("I22")

for _id, _fn in (("I01", check_i01), ("I02", check_i02), ("I03", check_i03), ("I04", check_i04),
                 ("I05", check_i05), ("I07", check_i07), ("I15", check_i15), ("I18", check_i18),
                 ("I19", check_i19), ("I20", check_i20), ("I22", check_i22), ("S6b", check_s6b),
                 ("S6c", check_s6c)):
    register_invariant(_id, _fn, "module")
