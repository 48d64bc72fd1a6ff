"""Batch private memory of a TD: map a whole range at once, reclaim a terminated TD's pages at once.

Not upstream: a model shortcut for TDs too big to build and tear down page by page in Python
(SPEC §9 row "64 GiB TD teardown"; issue 9 items 2–3). Both paths leave exactly the state the
per-page paths leave (same frames, same PAMT, S-EPT, mirror, guest_memfd and frame contents —
``tests/kvm/test_tdx_batch.py`` checks it), while keeping no Python object per page:

* :func:`map_private_range` — what userspace ``fallocate``-ing a guest_memfd range, then
  pre-faulting every gfn (and the guest accepting each page, with ``accept``) does:
  (1) back every hole of the range in index order (:meth:`Host.alloc_frame_runs`, frames zeroed);
  (2) allocate a frame per missing mirror non-leaf SPTE in the order the per-page map would (for
  each gfn ascending, top level first) and TDH.MEM.SEPT.ADD them in one core pass
  (:func:`tdxcore.module.batch.sept_add_range`); (3) TDH.MEM.PAGE.AUG, then ACCEPT, per 2^20-page
  chunk (:func:`~tdxcore.module.batch.page_aug_batch`, ``page_accept_batch``); (4) the mirror and
  the guest_memfd record the pages as runs (``MirrorMmu.bulk_map``, ``GuestMemfd.bulk_add``).
  Under the gmem ``invalidate_lock`` (read) and ``mmu_lock`` (write). One ``ioctl`` event
  (``TDX_MAP_PRIVATE_RANGE``) and one summary event per module batch.
* :func:`zap_terminated_range` — the terminate-first teardown (KVM_TDX_TERMINATE_VM, then
  closing the guest_memfd): where 6.18 + the extension call ``remove_external_spte`` per page and
  each does one TDH.PHYMEM.PAGE.RECLAIM (:func:`tdxcore.kvm.tdx_mmu.tdx_reclaim_terminated_private_page`),
  this takes the range's mirror leaves as runs and reclaims them with one PAMT core call per
  2^20 pages (:func:`tdxcore.module.batch.page_reclaim_batch`). A page whose RECLAIM fails is a
  ``private`` leak with the same reason text the per-page path records; on erratum hosts the
  reclaimed frames are cleared. Hooked into ``TdxVm.zap_private_locked`` for the TDs that opted
  in (:func:`set_batch_reclaim`; :func:`map_private_range` opts its TD in).

While a fault injection is armed both fall back to the per-page paths (a batch is never
injected). Memory: O(runs + tables); the 64 GiB TD of the benchmark is a few runs plus 32 K
S-EPT tables.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Generator, List, Tuple

import numpy as np

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_4K, FallocFlag, MemAttr, MemFlag
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.ioctl import OK, Ret, fail, ioctl
from tdxcore.kvm.mmu import SpteState
from tdxcore.module import batch as mbatch
from tdxcore.sched import READ, WRITE, Wait, run_to_completion
from tdxcore.status import TDX_OPERAND_BUSY, TDX_SUCCESS, TdxStatus  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["map_private_range", "map_private_range_per_page", "zap_terminated_range", "batch_zap_applies",
           "set_batch_reclaim", "batch_spt_applies", "free_all_spt_batch",
           "CHUNK"]

#: Pages per core batch call (bounds the numpy temporaries: 8 MiB per array).
CHUNK = 1 << 20


def _runs_of(gfns: Any, pfns: Any) -> List[Tuple[int, int, int]]:
    """``(start_gfn, end_gfn, first_pfn)`` runs where both gfn and pfn step by one."""
    if gfns.size == 0:
        return []
    brk = np.flatnonzero((np.diff(gfns.astype(np.int64)) != 1) | (np.diff(pfns.astype(np.int64)) != 1)) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [gfns.size]))
    return [(int(gfns[a]), int(gfns[a]) + int(b - a), int(pfns[a]))
            for a, b in zip(starts, ends, strict=True)]


def _minus(start: int, end: int, taken: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Segments of ``[start, end)`` not covered by the (sorted) ``taken`` segments."""
    out, pos = [], start
    for a, b in sorted(taken):
        if a > pos:
            out.append((pos, min(a, end)))
        pos = max(pos, b)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return [(a, b) for a, b in out if a < b]


def _nonleaf_missing(vm: "TdxVm", lo: int, hi: int) -> List[Tuple[int, int]]:
    """Mirror non-leaf keys ``(pg_level, gfn)`` missing over ``[lo, hi)``, in per-page map order."""
    mmu, out = vm.mmu, []

    def walk(lv: int, a: int, b: int) -> None:
        span = 1 << (9 * (lv - PG_LEVEL_4K))
        k = a & ~(span - 1)
        while k < b:
            if (lv, k) not in mmu._nonleaf:
                out.append((lv, k))
            if lv - 1 > PG_LEVEL_4K:
                walk(lv - 1, max(a, k), min(b, k + span))
            k += span
    walk(mmu.root_level, lo, hi)
    return out


def _tdr(vm: "TdxVm") -> int:
    tdr = vm.tdr
    assert tdr is not None          # callers checked: a TD with its TDR
    return tdr


def _frames(runs: List[Tuple[int, int]]) -> Any:
    return np.concatenate([np.arange(p, p + k, dtype=np.uint64) for p, k in runs]) if runs else \
        np.empty(0, dtype=np.uint64)


def _check_range(vm: "TdxVm", gpa: Any, size: Any) -> Tuple[int, int]:
    from tdxcore.kvm.tdx_vm import TdxVm

    if not isinstance(vm, TdxVm):
        msg = f"vm must be a TdxVm, not {type(vm).__name__}"
        raise TdxTypeError(msg, name="vm", value=type(vm).__name__)
    g = check_int("gpa", gpa, 0, 1 << 64)
    n = check_int("size", size, 1, 1 << 64)
    if (g | n) & (PAGE_SIZE - 1):
        msg = f"gpa={g:#x} and size={n:#x} must be 4 KiB aligned"
        raise TdxValueError(msg, name="gpa" if g & (PAGE_SIZE - 1) else "size", value=g)
    return g >> PAGE_SHIFT, (g + n) >> PAGE_SHIFT


def _slot_checks(vm: "TdxVm", g0: int, g1: int) -> Tuple[Ret, Any]:
    from tdxcore.kvm.tdx_vm import TdState

    if vm.is_dead or vm.is_bugged:
        return fail(_errno.EIO, "the VM is dead or bugged"), None
    if vm.td_state != TdState.RUNNABLE or vm.tdr is None or vm.hkid is None:
        return fail(_errno.EINVAL, "the TD is not RUNNABLE"), None
    slot = vm.memslots.gfn_to_memslot(g0)
    if slot is None or not slot.flags & MemFlag.GUEST_MEMFD or g1 > slot.end_gfn:
        return fail(_errno.EINVAL, f"[{g0:#x}, {g1:#x}) is not inside one guest_memfd memslot"), None
    if slot.gmem is None:
        return fail(_errno.EFAULT, f"the guest_memfd of slot {slot.id} is closed"), None
    if not vm.mem_attr.has_range(g0, g1, MemAttr.PRIVATE, MemAttr.PRIVATE):
        return fail(_errno.EINVAL, f"[{g0:#x}, {g1:#x}) is not all PRIVATE"), None
    return OK, slot


def map_private_range(vm: "TdxVm", gpa: int, size: int, *, accept: bool = True) -> None:
    """Back, map (SEPT.ADD + PAGE.AUG) and optionally accept every private page of a range.

    Parameters
    ----------
    vm : TdxVm
        A RUNNABLE TD.
    gpa, size : int
        4 KiB-aligned private range inside one guest_memfd memslot, all PRIVATE.
    accept : bool
        Also run the guest's ACCEPT on each page (PENDING → MAPPED, page zeroed under the HKID);
        False leaves them PENDING (lazily accepted memory).

    Raises
    ------
    TdxTypeError, TdxValueError
        Bad argument types or alignment (before anything changes).
    KvmError
        EIO (VM dead or bugged; a batch status that is neither SUCCESS nor BUSY — the VM is
        bugged, as the per-page hooks do), EINVAL (not RUNNABLE; range not inside one
        guest_memfd slot or not PRIVATE), EFAULT (guest_memfd closed), ENOMEM (not enough host
        frames: nothing allocated), EAGAIN (an ``mmu_invalidate`` is in progress), EBUSY (a
        mirror SPTE in the range is frozen, or the module answered BUSY), EEXIST (a page is
        already mapped to another frame).

    Notes
    -----
    Pages already mapped are not mapped again (the per-page map returns 0 for them); with
    ``accept`` every page of the range is accepted (an accepted one answers
    PAGE_ALREADY_ACCEPTED and is left alone), as the per-page path does.
    """
    g0, g1 = _check_range(vm, gpa, size)
    if not isinstance(accept, bool):
        msg = f"accept={accept!r} must be a bool"
        raise TdxTypeError(msg, name="accept", value=accept)
    if mbatch.injection_armed(vm.kvm.host.tdx):
        map_private_range_per_page(vm, gpa, size, accept=accept)
        return
    try:
        ioctl(vm.kvm.host, "TDX_MAP_PRIVATE_RANGE", vm.id, vm._guard(_map_op(vm, g0, g1, accept)))
    finally:
        if vm.mmu.bulk_runs():       # pages held as runs: tear them down as runs too
            vm._batch_reclaim = True     # type: ignore[attr-defined]


def _map_op(vm: "TdxVm", g0: int, g1: int, accept: bool) -> Generator[Any, Any, Ret]:
    ret, slot = _slot_checks(vm, g0, g1)
    if ret[0] < 0:
        return ret
    f = slot.gmem
    host, tdx = vm.kvm.host, vm.kvm.host.tdx
    i0 = slot.gmem_pgoff + g0 - slot.base_gfn
    owner = yield Wait(f.invalidate_lock, READ)
    try:
        # (1) back the holes in index order, as fallocate does
        holes = f.hole_segments(i0, i0 + g1 - g0)
        nholes = sum(b - a for a, b in holes)
        if nholes > host.free_frames:
            return fail(_errno.ENOMEM, f"no host frame for {nholes} pages ({host.free_frames} free)")
        runs = host.alloc_frame_runs(nholes)
        new: List[Tuple[int, int, int]] = []
        ri, used = 0, 0
        for a, b in holes:
            while a < b:
                p, k = runs[ri]
                take = min(b - a, k - used)
                new.append((a, a + take, p + used))
                host.frame_clear_range(p + used, take)
                a, used = a + take, used + take
                if used == k:
                    ri, used = ri + 1, 0
        f.bulk_add(new)
        mowner = yield Wait(vm.mmu_lock, WRITE)
        try:
            return _map_locked(vm, f, slot, g0, g1, accept, host, tdx)
        finally:
            vm.mmu_lock.release(mowner, WRITE)
    finally:
        f.invalidate_lock.release(owner, READ)


def _map_locked(vm: "TdxVm", f: Any, slot: Any, g0: int, g1: int, accept: bool, host: Any,
                tdx: Any) -> Ret:
    if vm.mmu_invalidate.in_progress:
        return fail(_errno.EAGAIN, "an mmu_invalidate is in progress")
    mmu = vm.mmu
    # (2) tables: one frame per missing mirror non-leaf, in per-page order, then one SEPT.ADD pass
    keys = _nonleaf_missing(vm, g0, g1)
    if keys:
        if len(keys) > host.free_frames:
            return fail(_errno.ENOMEM, f"no host frame for {len(keys)} S-EPT pages")
        spt = _frames(host.alloc_frame_runs(len(keys)))
        for p in spt.tolist():
            host.frame_clear(p)
        res = mbatch.sept_add_range(tdx, _tdr(vm), g0, g1, spt)
        if res.status != TDX_SUCCESS or res.statuses.shape[0] != len(keys):
            for p in spt.tolist()[res.statuses.shape[0]:]:
                host.free_frame(p)
            if TdxStatus(res.status).base == TDX_OPERAND_BUSY:
                return fail(_errno.EBUSY, f"TDH.MEM.SEPT.ADD batch: {TdxStatus(res.status).name}")
            vm.bug(f"TDH.MEM.SEPT.ADD batch: {TdxStatus(res.status).name}, "
                   f"{res.statuses.shape[0]} of {len(keys)} tables")
            return fail(_errno.EIO, "TDH.MEM.SEPT.ADD batch")
        for (lv, k), p in zip(keys, spt.tolist(), strict=True):
            mmu._nonleaf[(lv, k)] = (p, SpteState.PRESENT)
    # (3) leaves: every gfn without a mirror leaf, by chunk
    taken = [(a, b) for a, b, _ in mmu._bulk if a < g1 and g0 < b]
    ld = mmu._ld
    cand = (sorted(g for g in ld if g0 <= g < g1) if g1 - g0 > len(ld)
            else [g for g in range(g0, g1) if g in ld])
    for g in cand:
        pfn, st = ld[g]
        if st == SpteState.FROZEN:
            return fail(_errno.EBUSY, f"the mirror SPTE of gfn {g:#x} is frozen")
        if pfn != f.pfn_of(slot.gmem_pgoff + g - slot.base_gfn):
            return fail(_errno.EEXIST, f"gfn {g:#x} is mapped to another frame")
        taken.append((g, g + 1))
    todo = _minus(g0, g1, taken)
    for a, b in todo:
        for c in range(a, b, CHUNK):
            ret = _map_chunk(vm, f, slot, c, min(b, c + CHUNK), tdx)
            if ret[0] < 0:
                return ret
    if accept:                      # every page of the range, as the guest accepting it all
        for c in range(g0, g1, CHUNK):
            acc = mbatch.page_accept_batch(tdx, _tdr(vm), np.arange(c, min(g1, c + CHUNK), dtype=np.uint64))
            if acc.status != TDX_SUCCESS:
                return fail(_errno.EBUSY, f"TDG.MEM.PAGE.ACCEPT batch: {TdxStatus(acc.status).name}")
    return OK


def _gmem_pfns(f: Any, i0: int, i1: int) -> Any:
    out = np.zeros(i1 - i0, dtype=np.uint64)
    for a, b, p in f._bulk:
        lo, hi = max(a, i0), min(b, i1)
        if lo < hi:
            out[lo - i0:hi - i0] = np.arange(p + lo - a, p + hi - a, dtype=np.uint64)
    pd = f._pd
    idx = [i for i in pd if i0 <= i < i1] if i1 - i0 > len(pd) else [i for i in range(i0, i1) if i in pd]
    for i in idx:
        out[i - i0] = pd[i]
    return out


def _map_chunk(vm: "TdxVm", f: Any, slot: Any, a: int, b: int, tdx: Any) -> Ret:
    gfns = np.arange(a, b, dtype=np.uint64)
    off = slot.gmem_pgoff - slot.base_gfn
    pfns = _gmem_pfns(f, a + off, b + off)
    res = mbatch.page_aug_batch(tdx, _tdr(vm), gfns, pfns)
    if res.status != TDX_SUCCESS:
        st = TdxStatus(res.status)
        if st.base == TDX_OPERAND_BUSY:
            return fail(_errno.EBUSY, f"TDH.MEM.PAGE.AUG batch: {st.name}")
        vm.bug(f"TDH.MEM.PAGE.AUG batch: {st.name}")
        return fail(_errno.EIO, "TDH.MEM.PAGE.AUG batch")
    ok = res.statuses == TDX_SUCCESS
    vm.mmu.bulk_map(_runs_of(gfns[ok], pfns[ok]))
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        vm.bug(f"TDH.MEM.PAGE.AUG gfn={int(gfns[k]):#x}: {TdxStatus(int(res.statuses[k])).name}")
        return fail(_errno.EIO, "TDH.MEM.PAGE.AUG batch")
    return OK


def map_private_range_per_page(vm: "TdxVm", gpa: int, size: int, *, accept: bool = True) -> None:
    """Map a range page by page: the path :func:`map_private_range` stands for (reference, fallback).

    ``fallocate`` the guest_memfd range, map each gfn through the mirror (SEPT.ADD for missing
    levels, PAGE.AUG: ``kvm_tdp_map_page``; -EBUSY retried), and with ``accept`` run the guest's
    TDG.MEM.PAGE.ACCEPT on each page from vCPU 0. Raises ``KvmError`` as the batch does.
    """
    from tdxcore.errors import KvmError

    g0, g1 = _check_range(vm, gpa, size)
    ret, slot = _slot_checks(vm, g0, g1)
    if ret[0] < 0:
        raise KvmError(-ret[0], f"TDX_MAP_PRIVATE_RANGE: {ret[1]}")
    f = slot.gmem
    off = slot.gmem_pgoff - slot.base_gfn
    f.fallocate(int(FallocFlag.KEEP_SIZE), (g0 + off) << PAGE_SHIFT, (g1 - g0) << PAGE_SHIFT)
    for g in range(g0, g1):
        pfn = f.pfn_of(g + off)
        while True:
            r = run_to_completion(vm.mmu.map_private(g, pfn), name="kvm_tdp_map_page")
            if r != -_errno.EBUSY:
                break
        if r < 0:
            raise KvmError(-r, f"TDX_MAP_PRIVATE_RANGE: kvm_tdp_map_page gfn {g:#x}")
    if accept:
        tdvpr = vm.vcpus[0].tdvpr
        t = vm.kvm.host.tdx
        for g in range(g0, g1):
            t.tdg_mem_page_accept(tdvpr, g << PAGE_SHIFT, 0)


def zap_terminated_range(vm: "TdxVm", start: int, end: int) -> Generator[Any, Any, List[int]]:
    """Reclaim the mirror leaves of ``[start, end)`` of a terminated TD in batches; return failed gfns.

    The caller holds ``mmu_lock`` for write (``TdxVm.zap_private_locked``). Every PRESENT leaf
    of the range becomes non-present whatever the outcome, as in the per-page zap.
    """
    yield from ()
    host = vm.kvm.host
    runs, singles = vm.mmu.take_present_range(start, end)
    pieces: List[Tuple[Any, Any]] = []
    for g0, g1, p0 in runs:
        for c in range(g0, g1, CHUNK):
            e = min(g1, c + CHUNK)
            pieces.append((np.arange(c, e, dtype=np.uint64),
                           np.arange(p0 + c - g0, p0 + e - g0, dtype=np.uint64)))
    if singles:
        arr = np.array(singles, dtype=np.uint64)
        pieces.append((arr[:, 0], arr[:, 1]))
    failed: List[int] = []
    for gfns, pfns in _coalesce(pieces):
        res = mbatch.page_reclaim_batch(host.tdx, _tdr(vm), pfns)
        statuses = res.statuses if res.status == TDX_SUCCESS else np.full(pfns.shape[0], res.status,
                                                                          dtype=np.uint64)
        ok = statuses == TDX_SUCCESS
        if host.cpu_erratum_pw_mce:
            for g0, g1, p0 in _runs_of(gfns[ok], pfns[ok]):
                host.frame_clear_range(p0, g1 - g0)
        for k in np.flatnonzero(~ok).tolist():
            vm._leak(int(pfns[k]), "private", f"TDH.PHYMEM.PAGE.RECLAIM: {TdxStatus(int(statuses[k])).name}")
            failed.append(int(gfns[k]))
    return sorted(failed)


def _coalesce(pieces: List[Tuple[Any, Any]]) -> Generator[Tuple[Any, Any], None, None]:
    """Yield ``(gfns, pfns)`` batches of at most :data:`CHUNK` pages (small pieces joined)."""
    buf: List[Tuple[Any, Any]] = []
    size = 0
    for g, p in pieces:
        if buf and size + g.shape[0] > CHUNK:
            yield np.concatenate([b[0] for b in buf]), np.concatenate([b[1] for b in buf])
            buf, size = [], 0
        buf.append((g, p))
        size += g.shape[0]
    if buf:
        yield np.concatenate([b[0] for b in buf]), np.concatenate([b[1] for b in buf])


def set_batch_reclaim(vm: "TdxVm", enabled: bool = True) -> None:
    """Opt ``vm`` in (or out) of :func:`zap_terminated_range` for its terminate-first teardown.

    Off by default, so the extension's per-page RECLAIM (one event pair per page) stays what a
    plain TD does; :func:`map_private_range` turns it on for the TDs it maps.
    """
    if not isinstance(enabled, bool):
        msg = f"enabled={enabled!r} must be a bool"
        raise TdxTypeError(msg, name="enabled", value=enabled)
    vm._batch_reclaim = enabled      # type: ignore[attr-defined]


def batch_zap_applies(vm: "TdxVm") -> bool:
    """Whether ``TdxVm.zap_private_locked`` takes :func:`zap_terminated_range`.

    The VM opted in (:func:`set_batch_reclaim`), was terminated and its HKID released, and no
    fault injection is armed.
    """
    return (getattr(vm, "_batch_reclaim", False) and vm.is_terminated and vm.hkid is None
            and vm.tdr is not None and not mbatch.injection_armed(vm.kvm.host.tdx))


def batch_spt_applies(vm: "TdxVm") -> bool:
    """Whether VM destruction frees the mirror's S-EPT pages with :func:`free_all_spt_batch`.

    The VM opted in (:func:`set_batch_reclaim`), its HKID is released (the per-page hook would
    bug and leak otherwise: that path stays per page) and no fault injection is armed.
    """
    return (getattr(vm, "_batch_reclaim", False) and vm.hkid is None and vm.tdr is not None
            and not mbatch.injection_armed(vm.kvm.host.tdx))


def free_all_spt_batch(vm: "TdxVm") -> List[int]:
    """``kvm_mmu_uninit_vm`` for the mirror root with one batch RECLAIM of every S-EPT page.

    What :meth:`MirrorMmu.free_all_spt` + ``tdx_sept_free_private_spt`` do per page (deepest
    level first): RECLAIM (failure: a ``sept`` leak with the per-page reason, -EIO), clear on
    erratum hosts, free the frame (0). Returns the per-page results in that order.
    """
    host = vm.kvm.host
    mmu = vm.mmu
    items = sorted(mmu._nonleaf.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    spts = np.array([spt for _, (spt, _) in items], dtype=np.uint64)
    mmu._nonleaf.clear()
    if spts.size == 0:
        return []
    res = mbatch.page_reclaim_batch(host.tdx, _tdr(vm), spts)
    statuses = res.statuses if res.status == TDX_SUCCESS else np.full(spts.shape[0], res.status,
                                                                      dtype=np.uint64)
    out: List[int] = []
    for spt, st in zip(spts.tolist(), statuses.tolist(), strict=True):
        if st != TDX_SUCCESS:
            vm._leak(spt, "sept", f"TDH.PHYMEM.PAGE.RECLAIM: {TdxStatus(st).name}")
            out.append(-_errno.EIO)
            continue
        if host.cpu_erratum_pw_mce:
            host.frame_clear(spt)
        host.free_frame(spt)
        out.append(0)
    return out
