"""Batch forms of the module's memory leaves: one call, one core loop, one summary event.

A model shortcut (not a TDX module interface) for tearing down and building TDs at scale (SPEC
§9 row "64 GiB TD teardown"; issue 9 items 2–3): each function runs the checks its leaf's
prologue makes once for the whole batch, then the S-EPT / PAMT core's ``*_batch`` method over a
numpy array with the GIL released, and logs one ``seamcall_batch`` / ``tdcall_batch`` event
instead of two per page. Per element the state change is exactly the per-page leaf's (the core
is shared): a batch and the per-page calls leave the same PAMT, S-EPT, frame contents and TD.

==================  ===========================================================================
function            TD-level checks (status → nothing done) | per-element statuses
==================  ===========================================================================
sept_add_range      TDR known, KEYS_CONFIGURED, op state legal for SEPT.ADD, no in-flight op of
                    the TD holds an S-EPT entry lock (BUSY|RCX), tree lock X (BUSY|SEPT_TREE) |
                    TdxValueError on a bad frame list (the core's dry run: nothing changes)
page_aug_batch      as above, for PAGE.AUG | the core's AUG statuses
page_accept_batch   as above, for ACCEPT (the guest's; RUNNABLE) | the core's ACCEPT statuses;
                    an accepted page is zeroed under the TD's HKID, as the per-page ACCEPT does
page_reclaim_batch  TDR known, lifecycle TEARDOWN | the PAMT core's ``reclaim_batch``
                    (BUSY|RCX on a locked PAMT entry, PAGE_METADATA_INCORRECT|RCX for a frame
                    that is not a child page of this TD)
==================  ===========================================================================

Not covered: fault injection (a batch is never injected — callers fall back to the per-page
leaves while an injection is armed: :func:`injection_armed`), lock-conflict events, 2M/1G
leaves (4K only). Counters: each element counts as one SEAMCALL (TDCALL) of its leaf, so the
per-leaf totals match the per-page path; the event log has one event per batch (AUG and ACCEPT:
per run of consecutive gfns, so the invariant scanners know which gfns changed).

Concurrency: the checks and the tree lock are taken under the module lock; the core loop then
runs without it (and without the GIL), so two TDs' batches on two threads overlap; frame
contents, counters and events are written under the module lock again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, SEPT_PFN_MASK
from tdxcore.errors import check_int, check_u64_array
from tdxcore.module.td import TdLifecycle
from tdxcore.status import (  # type: ignore[attr-defined]
    OP_STATE_LEGALITY,
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_OP_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TD_KEYS_NOT_CONFIGURED,
    Leaf,
    OpState,
    TdcallLeaf,
)

if TYPE_CHECKING:
    from tdxcore.module.td import Td
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["BatchResult", "sept_add_range", "page_aug_batch", "page_accept_batch",
           "page_reclaim_batch", "injection_armed", "BATCH_EVENT_FIELDS"]

#: Fields of the ``seamcall_batch`` and ``tdcall_batch`` events (after kind, actor).
BATCH_EVENT_FIELDS = ("leaf", "nr", "nr_ok", "status", "gfn", "pfn", "tdr")
_ZERO_PAGE = bytes(PAGE_SIZE)
_EMPTY = np.empty(0, dtype=np.uint64)


class BatchResult(NamedTuple):
    """Outcome of one batch: the TD-level ``status`` and one status per element (empty if not run)."""

    status: int
    statuses: Any

    @property
    def nr_ok(self) -> int:
        """Elements that succeeded."""
        return int(np.count_nonzero(self.statuses == TDX_SUCCESS))


def _register(tdx: "TdxModule") -> None:
    ev = tdx.host.events
    ev.register_kind("seamcall_batch", BATCH_EVENT_FIELDS, "seamcall")
    ev.register_kind("tdcall_batch", BATCH_EVENT_FIELDS, "tdcall")


def injection_armed(tdx: "TdxModule") -> bool:
    """Whether any fault injection is armed (batches are never injected: use the per-page leaves)."""
    return bool(tdx._fail) or bool(tdx.injector.is_armed)


def _td_checks(tdx: "TdxModule", tdr: int, leaf: Any, lifecycle: TdLifecycle) -> "tuple[int, Any]":
    """Run the leaf prologue's TD-level checks once; return ``(status, td)``."""
    td = tdx.tds.get(tdr)
    if td is None:
        return TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RDX, None
    if td.lifecycle != lifecycle:
        if lifecycle == TdLifecycle.KEYS_CONFIGURED and td.lifecycle == TdLifecycle.HKID_ASSIGNED:
            return TDX_TD_KEYS_NOT_CONFIGURED, td
        return TDX_LIFECYCLE_STATE_INCORRECT, td
    if lifecycle == TdLifecycle.KEYS_CONFIGURED:
        if isinstance(leaf, TdcallLeaf):
            if td.op_state != OpState.RUNNABLE:
                return TDX_OP_STATE_INCORRECT, td
        else:
            row = OP_STATE_LEGALITY.get(("seamcall_state_lookup", int(leaf)))
            if row is not None and not row[int(td.op_state)]:
                return TDX_OP_STATE_INCORRECT, td
        # an in-flight op of this TD holds (or will release) an S-EPT lock: the batch would race it
        for key in tdx.holders:
            if key[0] == "entry" and key[1] == tdr:
                return TDX_OPERAND_BUSY | OPERAND_ID_RCX, td
    return TDX_SUCCESS, td


def _emit(tdx: "TdxModule", kind: str, actor: str, leaf: Any, statuses: Any, gfn: Any, pfn: Any,
          tdr: int, gfns: Any = None) -> None:
    """Count the batch's calls and log it: one event per run of consecutive ``gfns`` (or one).

    Per run the event's ``gfn`` is the run's first and ``nr`` its length, so the invariant
    scanners know exactly which gfns a fully successful run changed.
    """
    n = int(statuses.shape[0])
    ok = statuses == TDX_SUCCESS
    nok = int(np.count_nonzero(ok))
    if kind == "seamcall_batch":
        tdx.host.count_seamcall(leaf, n)
    else:
        tdx.host.count("nr_tdcalls", n)
    if nok != n:
        tdx.host.count("nr_seamcall_errors" if kind == "seamcall_batch" else "nr_tdcall_errors", n - nok)
    tdx.host.count("nr_batch_calls")
    if gfns is None or n == 0:
        bounds = [(0, n)]
    else:
        brk = (np.flatnonzero(np.diff(gfns.astype(np.int64)) != 1) + 1).tolist()
        bounds = list(zip([0] + brk, brk + [n], strict=True))
    for a, b in bounds:
        seg = statuses[a:b]
        k = int(np.count_nonzero(ok[a:b]))
        bad = TDX_SUCCESS if k == b - a else int(seg[np.flatnonzero(seg != TDX_SUCCESS)[0]])
        g = gfn if gfns is None else int(gfns[a])
        tdx.host.events.emit(kind, actor, int(leaf), b - a, k, bad, g, pfn, tdr)


def _with_tree_x(tdx: "TdxModule", tdr: int, leaf: Any, actor: str, body: Any) -> BatchResult:
    """Check and take the TD's S-EPT tree lock X under the module lock, then run ``body(td)``.

    ``body`` runs its core loop *without* the module lock (the tree lock keeps every other op
    of this TD out), so batches of two TDs on two threads overlap; it takes the module lock
    again for what touches shared Python state (frame contents, counters, events).
    """
    with tdx.lock:
        _register(tdx)
        st, td = _td_checks(tdx, tdr, leaf, TdLifecycle.KEYS_CONFIGURED)
        if st == TDX_SUCCESS:
            st = td.sept_lock.try_exclusive(True)
        if st != TDX_SUCCESS:
            kind = "tdcall_batch" if isinstance(leaf, TdcallLeaf) else "seamcall_batch"
            tdx.host.events.emit(kind, actor, int(leaf), 0, 0, int(st), None, None, tdr)
            return BatchResult(int(st), _EMPTY)
    try:
        return body(td)
    finally:
        td.sept_lock.unlock_exclusive()


def sept_add_range(tdx: "TdxModule", tdr: int, start_gfn: int, end_gfn: int, pages: Any, *,
                   actor: str = "host") -> BatchResult:
    """TDH.MEM.SEPT.ADD of every missing table over gfns ``[start_gfn, end_gfn)``, in DFS order.

    The frames of ``pages`` are used in order (the order the per-page map path allocates them:
    for each gfn ascending, top level first); each one consumed is zeroed under the TD's HKID.
    ``statuses`` holds one TDX_SUCCESS per frame consumed.

    Raises
    ------
    TdxTypeError, TdxValueError
        Bad arguments, too few / not-free / repeated frames, a leaf in the way (the core's dry
        run: nothing changed).
    """
    t = check_int("tdr", tdr, 0, tdx.host.nr_frames)
    p = check_u64_array("pages", pages, tdx.host.nr_frames)

    def body(td: "Td") -> BatchResult:
        assert td.sept is not None
        used = td.sept.sept_add_range(start_gfn, end_gfn, p)
        statuses = np.zeros(used, dtype=np.uint64)
        with tdx.lock:
            for page in p[:used].tolist():
                tdx.host.frame_write(page, 0, _ZERO_PAGE, td.hkid)
            _emit(tdx, "seamcall_batch", actor, Leaf.TDH_MEM_SEPT_ADD, statuses, start_gfn,
                  int(p[0]) if used else None, td.tdr)
        return BatchResult(TDX_SUCCESS, statuses)
    return _with_tree_x(tdx, t, Leaf.TDH_MEM_SEPT_ADD, actor, body)


def page_aug_batch(tdx: "TdxModule", tdr: int, gfns: Any, pfns: Any, *, actor: str = "host") -> BatchResult:
    """TDH.MEM.PAGE.AUG (4K) of ``gfns[k]`` with frame ``pfns[k]``, each as the per-page leaf."""
    t = check_int("tdr", tdr, 0, tdx.host.nr_frames)

    def body(td: "Td") -> BatchResult:
        assert td.sept is not None
        statuses = td.sept.page_aug_batch(gfns, pfns)
        g, pf = np.asarray(gfns), np.asarray(pfns)
        with tdx.lock:
            _emit(tdx, "seamcall_batch", actor, Leaf.TDH_MEM_PAGE_AUG, statuses, None,
                  int(pf[0]) if pf.size else None, td.tdr, g)
        return BatchResult(TDX_SUCCESS, statuses)
    return _with_tree_x(tdx, t, Leaf.TDH_MEM_PAGE_AUG, actor, body)


def page_accept_batch(tdx: "TdxModule", tdr: int, gfns: Any, *, actor: str = "guest") -> BatchResult:
    """Run the guest's TDG.MEM.PAGE.ACCEPT (4K) of each gfn; accepted pages are zeroed under the HKID."""
    t = check_int("tdr", tdr, 0, tdx.host.nr_frames)

    def body(td: "Td") -> BatchResult:
        assert td.sept is not None
        g = check_u64_array("gfns", gfns)
        statuses = td.sept.page_accept_batch(g)
        tree = td.sept
        with tdx.lock:
            for x in g[statuses == TDX_SUCCESS].tolist():
                e = tree.walk(x << PAGE_SHIFT, 0)[1]       # MAPPED now: its frame is the accepted page
                tdx.host.frame_write((e & SEPT_PFN_MASK) >> PAGE_SHIFT, 0, _ZERO_PAGE, td.hkid)
            _emit(tdx, "tdcall_batch", actor, TdcallLeaf.TDG_MEM_PAGE_ACCEPT, statuses, None, None, td.tdr, g)
        return BatchResult(TDX_SUCCESS, statuses)
    return _with_tree_x(tdx, t, TdcallLeaf.TDG_MEM_PAGE_ACCEPT, actor, body)


def page_reclaim_batch(tdx: "TdxModule", tdr: int, pfns: Any, *, actor: str = "host") -> BatchResult:
    """TDH.PHYMEM.PAGE.RECLAIM of child pages ``pfns`` of the TD in TEARDOWN whose TDR is ``tdr``."""
    t = check_int("tdr", tdr, 0, tdx.host.nr_frames)
    p = check_u64_array("pfns", pfns, tdx.host.nr_frames)
    with tdx.lock:
        _register(tdx)
        st, _ = _td_checks(tdx, t, Leaf.TDH_PHYMEM_PAGE_RECLAIM, TdLifecycle.TEARDOWN)
        if st != TDX_SUCCESS:
            tdx.host.events.emit("seamcall_batch", actor, int(Leaf.TDH_PHYMEM_PAGE_RECLAIM), 0, 0, int(st),
                                 None, None, t)
            return BatchResult(int(st), _EMPTY)
    # the core loop runs without the module lock: two TDs' reclaims on two threads overlap (the
    # PAMT core's CAS per frame and its end-of-batch counts keep them apart)
    statuses = tdx.host.pamt.reclaim_batch(p, t)
    with tdx.lock:
        _emit(tdx, "seamcall_batch", actor, Leaf.TDH_PHYMEM_PAGE_RECLAIM, statuses, None,
              int(p[0]) if p.size else None, t)
    return BatchResult(TDX_SUCCESS, statuses)

