"""The TDP-MMU mirror root of a TD: KVM's view of its private mappings (SPEC §2, §4.1; issue 5).

The mirror is what KVM *asked* the module to map, not the S-EPT itself (that lives in the module's
``SeptTree``). Each present non-leaf mirror SPTE has an "external" page (``sp->external_spt``) that
was donated to the module with TDH.MEM.SEPT.ADD; each present leaf records the pfn it maps. A SPTE
being changed is FROZEN (``FROZEN_SPTE``) for the duration of the hook call, so a concurrent map of
the same gfn sees -EBUSY and retries, as ``tdp_mmu.c`` does.

Levels here are KVM's ``pg_level`` (1 = 4K); the conversion to the module's ``level`` happens only
in ``kvm/tdx_mmu.py`` (STYLE §2.2). The hooks are the four ``kvm_x86_ops`` mirror hooks of 6.18
(``link_external_spt``, ``set_external_spte``, ``remove_external_spte``, ``free_external_spt``),
given as a :class:`MirrorOps` object.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import Any, Dict, Generator, List, Optional, Protocol, Tuple

from tdxcore.constants import PG_LEVEL_4K
from tdxcore.errors import HostError
from tdxcore.kvm.runs import find_run, merge_runs, pfn_in_runs
from tdxcore.sched import READ, WRITE, KLock, Wait

__all__ = ["SpteState", "MirrorOps", "MirrorMmu", "DirectMmu", "gfn_round_for_level"]

#: Entries per page-table page (9 index bits per level).
_PT_SHIFT = 9


class SpteState(enum.IntEnum):
    """State of a mirror SPTE that is not non-present."""

    PRESENT = 1
    FROZEN = 2       #: ``FROZEN_SPTE``: a hook call on it is in progress


def gfn_round_for_level(gfn: int, pg_level: int) -> int:
    """``gfn_round_for_level``: the first gfn a SPTE at ``pg_level`` covers."""
    return gfn & ~((1 << (_PT_SHIFT * (pg_level - PG_LEVEL_4K))) - 1)


class MirrorOps(Protocol):
    """The mirror hooks (``kvm_x86_ops``) plus the page allocator for external page tables."""

    def link_external_spt(self, gfn: int, pg_level: int,  # noqa: D102
                          spt: int, actor: str = "host") -> Generator[Any, Any, int]: ...
    def set_external_spte(self, gfn: int, pg_level: int,  # noqa: D102
                          pfn: int, actor: str = "host") -> Generator[Any, Any, int]: ...
    def remove_external_spte(self, gfn: int, pg_level: int,  # noqa: D102
                             pfn: int) -> Generator[Any, Any, int]: ...
    def free_external_spt(self, gfn: int, pg_level: int, spt: int) -> int: ...  # noqa: D102
    def alloc_spt(self) -> int: ...  # noqa: D102
    def free_spt(self, spt: int) -> None: ...  # noqa: D102


class MirrorMmu:
    """A TD's mirror root (one per VM).

    Parameters
    ----------
    root_level : int
        ``pg_level`` of the root (4 for a 4-level EPT, GPAW 48; 5 for GPAW 52).
    ops : MirrorOps
        The hooks.
    mmu_lock : KLock, optional
        The VM's ``kvm->mmu_lock`` (a new one if not given, for standalone use).

    Attributes
    ----------
    mmu_lock : KLock
        ``kvm->mmu_lock``: READ to map, WRITE to zap.
    """

    def __init__(self, root_level: int, ops: MirrorOps, mmu_lock: Optional[KLock] = None) -> None:
        self.root_level = root_level
        self.ops = ops
        self.mmu_lock = mmu_lock if mmu_lock is not None else KLock("mmu_lock")
        # (pg_level of the SPTE, first gfn it covers) -> (external page, state)
        self._nonleaf: Dict[Tuple[int, int], Tuple[int, SpteState]] = {}
        # gfn -> (pfn, state) for 4K leaves
        self._ld: Dict[int, Tuple[int, SpteState]] = {}
        # PRESENT leaves mapped in bulk (kvm/tdx_batch.py): [start_gfn, end_gfn, first_pfn] runs,
        # ascending, disjoint from _ld; gfn g maps first_pfn + g - start_gfn. A 16 M-page TD is
        # then a few runs, not 16 M dict entries; any per-page mutation expands them first.
        self._bulk: List[List[int]] = []

    @property
    def _leaves(self) -> Dict[int, Tuple[int, SpteState]]:
        """The per-gfn leaf table (bulk runs expanded into it first)."""
        if self._bulk:
            self._expand()
        return self._ld

    def _split_out(self, gfn: int) -> None:
        """Move ``gfn`` out of its bulk run (if any) into the per-gfn table, PRESENT."""
        i = find_run(self._bulk, gfn)
        if i < 0:
            return
        g0, g1, p0 = self._bulk[i]
        pieces = [r for r in ([g0, gfn, p0], [gfn + 1, g1, p0 + gfn + 1 - g0]) if r[1] > r[0]]
        self._bulk[i:i + 1] = pieces
        self._ld[gfn] = (p0 + gfn - g0, SpteState.PRESENT)

    def _expand(self) -> None:
        ld, present = self._ld, SpteState.PRESENT
        for g0, g1, p0 in self._bulk:
            for k in range(g1 - g0):
                ld[g0 + k] = (p0 + k, present)
        self._bulk = []

    # ------------------------------------------------------------------ bulk (kvm/tdx_batch.py)
    @property
    def nr_leaves(self) -> int:
        """Leaf SPTEs (present or frozen), bulk runs included, without expanding them."""
        return len(self._ld) + sum(g1 - g0 for g0, g1, _ in self._bulk)

    def bulk_runs(self) -> Tuple[Tuple[int, int, int], ...]:
        """Return the bulk runs ``(start_gfn, end_gfn, first_pfn)``, ascending."""
        return tuple((g0, g1, p0) for g0, g1, p0 in self._bulk)

    def bulk_map(self, runs: List[Tuple[int, int, int]]) -> None:
        """Record PRESENT leaves ``(start_gfn, end_gfn, first_pfn)`` (caller: none present yet).

        The caller holds ``mmu_lock`` and has set the S-EPT leaves (the batch AUG).
        """
        self._bulk = merge_runs(self._bulk, runs)

    def take_present_range(self, start: int, end: int) -> Tuple[List[Tuple[int, int, int]],
                                                                List[Tuple[int, int]]]:
        """Remove and return the PRESENT leaves of ``[start, end)`` (``mmu_lock`` write held).

        Returns ``(runs, singles)``: bulk runs clipped to the range as ``(start_gfn, end_gfn,
        first_pfn)`` and per-gfn leaves as ``(gfn, pfn)``, both ascending. FROZEN leaves stay
        (a hook call on them is in progress), as the per-page zap skips them.
        """
        runs: List[Tuple[int, int, int]] = []
        keep: List[List[int]] = []
        for g0, g1, p0 in self._bulk:
            lo, hi = max(g0, start), min(g1, end)
            if lo >= hi:
                keep.append([g0, g1, p0])
                continue
            runs.append((lo, hi, p0 + lo - g0))
            if g0 < lo:
                keep.append([g0, lo, p0])
            if hi < g1:
                keep.append([hi, g1, p0 + hi - g0])
        self._bulk = keep
        ld = self._ld
        if end - start > len(ld):
            gfns = sorted(g for g, (_, st) in ld.items() if start <= g < end and st == SpteState.PRESENT)
        else:
            gfns = [g for g in range(start, end) if g in ld and ld[g][1] == SpteState.PRESENT]
        singles = [(g, ld.pop(g)[0]) for g in gfns]
        return runs, singles

    # ------------------------------------------------------------------ views
    def leaf(self, gfn: int) -> Optional[Tuple[int, SpteState]]:
        """``(pfn, state)`` of the leaf SPTE at ``gfn``, or None (non-present)."""
        cur = self._ld.get(gfn)
        if cur is None and self._bulk:
            pfn = pfn_in_runs(self._bulk, gfn)
            if pfn is not None:
                return (pfn, SpteState.PRESENT)
        return cur

    @property
    def leaves(self) -> Tuple[Tuple[int, int], ...]:
        """``(gfn, pfn)`` of every present leaf, ascending."""
        return tuple(sorted((g, p) for g, (p, s) in self._leaves.items() if s == SpteState.PRESENT))

    @property
    def nonleaf(self) -> Tuple[Tuple[int, int, int], ...]:
        """``(pg_level, gfn, spt)`` of every present non-leaf SPTE, root level first."""
        return tuple(sorted(((lv, g, p) for (lv, g), (p, s) in self._nonleaf.items()
                             if s == SpteState.PRESENT), key=lambda t: (-t[0], t[1])))

    def leaves_in(self, start: int, end: int) -> List[int]:
        """Gfns in ``[start, end)`` with a leaf SPTE (present or frozen), ascending.

        O(min(range, leaves)): a huge range walks the leaves, a small one the range.
        """
        ld = self._ld
        if end - start > len(ld):
            out = sorted(g for g in ld if start <= g < end)
        else:
            out = [g for g in range(start, end) if g in ld]
        if self._bulk:                      # bulk runs are listed, not expanded
            for g0, g1, _ in self._bulk:
                lo, hi = max(g0, start), min(g1, end)
                if lo < hi:
                    out.extend(range(lo, hi))
            out.sort()
        return out

    def gfn_of_pfn(self, pfn: int) -> Optional[int]:
        """Return the gfn whose leaf maps ``pfn`` (None if none)."""
        for g, (p, _) in self._leaves.items():
            if p == pfn:
                return g
        return None

    def state_bytes(self) -> bytes:
        """Serialize canonically for state hashes.

        ``<BQQ`` root level, non-leaf count, leaf count; ``<BQQB`` each non-leaf (level, gfn, spt,
        state) and ``<QQB`` each leaf (gfn, pfn, state), ascending.
        """
        parts = [struct.pack("<BQQ", self.root_level, len(self._nonleaf), len(self._leaves))]
        parts += [struct.pack("<BQQB", lv, g, p, s) for (lv, g), (p, s) in sorted(self._nonleaf.items())]
        parts += [struct.pack("<QQB", g, p, s) for g, (p, s) in sorted(self._leaves.items())]
        return b"".join(parts)

    # ------------------------------------------------------------------ map
    def map_private(self, gfn: int, pfn: int) -> Generator[Any, Any, int]:
        """``kvm_tdp_map_page`` for a private gfn: link missing levels, then set the 4K leaf.

        Takes ``mmu_lock`` for read. Each missing non-leaf SPTE (root level down to 2) gets a new
        external page and the link hook (SEPT.ADD); then the leaf gets the set hook. A SPTE is
        FROZEN during its hook; on a hook failure the old (non-present) value is restored and
        the external page goes back to the host.

        Returns
        -------
        int
            0 (mapped, or already mapping ``pfn``), -EBUSY (a frozen SPTE or BUSY from the module:
            the caller retries), -EEXIST (mapped to another pfn), -ENOMEM, -EIO (KVM_BUG).
        """
        owner = yield Wait(self.mmu_lock, READ)
        try:
            return (yield from self.map_private_locked(gfn, pfn))
        finally:
            self.mmu_lock.release(owner, READ)

    def map_private_locked(self, gfn: int, pfn: int, actor: str = "host") -> Generator[Any, Any, int]:
        """:meth:`map_private` for a caller that holds ``mmu_lock`` for read (the fault path).

        ``actor`` names who issues the SEAMCALLs in the event log (the faulting vCPU).
        """
        for lv in range(self.root_level, PG_LEVEL_4K, -1):
            key = (lv, gfn_round_for_level(gfn, lv))
            cur = self._nonleaf.get(key)
            if cur is not None:
                if cur[1] == SpteState.FROZEN:
                    return -_errno.EBUSY
                continue
            try:
                spt = self.ops.alloc_spt()
            except HostError:
                return -_errno.ENOMEM
            self._nonleaf[key] = (spt, SpteState.FROZEN)
            ret = yield from self.ops.link_external_spt(key[1], lv, spt, actor)
            if ret:
                del self._nonleaf[key]
                self.ops.free_spt(spt)
                return ret
            self._nonleaf[key] = (spt, SpteState.PRESENT)
        cur = self._ld.get(gfn)
        if cur is None and self._bulk:
            cur = self.leaf(gfn)            # a bulk-mapped leaf: PRESENT
        if cur is not None:
            if cur[1] == SpteState.FROZEN:
                return -_errno.EBUSY
            return 0 if cur[0] == pfn else -_errno.EEXIST
        self._ld[gfn] = (pfn, SpteState.FROZEN)
        ret = yield from self.ops.set_external_spte(gfn, PG_LEVEL_4K, pfn, actor)
        if ret:
            del self._ld[gfn]
            return ret
        self._ld[gfn] = (pfn, SpteState.PRESENT)
        return 0

    # ------------------------------------------------------------------ zap
    def zap_private_leaf(self, gfn: int) -> Generator[Any, Any, int]:
        """Zap the leaf at ``gfn`` (``mmu_lock`` write; non-present: 0).

        The mirror SPTE becomes non-present whatever the hook returns (``tdp_mmu.c`` clears it
        first); a hook failure has already been turned into a KVM_BUG and a leak by the hook.
        """
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            return (yield from self.zap_private_leaf_locked(gfn))
        finally:
            self.mmu_lock.release(owner, WRITE)

    def zap_private_leaf_locked(self, gfn: int) -> Generator[Any, Any, int]:
        """:meth:`zap_private_leaf` for a caller that holds ``mmu_lock`` for write."""
        if self._bulk and gfn not in self._ld:
            self._split_out(gfn)            # only this page leaves its run
        cur = self._ld.get(gfn)
        if cur is None or cur[1] != SpteState.PRESENT:
            return 0
        self._ld[gfn] = (cur[0], SpteState.FROZEN)
        try:
            ret = yield from self.ops.remove_external_spte(gfn, PG_LEVEL_4K, cur[0])
        finally:
            del self._ld[gfn]
        return int(ret)

    def zap_all_private_leaves(self) -> Generator[Any, Any, List[int]]:
        """Zap every present leaf in gfn order under one ``mmu_lock`` write; return the hook results."""
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            out = []
            for gfn in sorted(g for g, (_, s) in self._leaves.items() if s == SpteState.PRESENT):
                out.append((yield from self.zap_private_leaf_locked(gfn)))
            return out
        finally:
            self.mmu_lock.release(owner, WRITE)

    def free_all_spt(self) -> List[int]:
        """``kvm_mmu_uninit_vm`` for the mirror root: free every external page, deepest first.

        Calls ``free_external_spt`` per non-leaf SPTE (the hook reclaims or leaks the page) and
        forgets it. Leaves must be gone already. Returns the hook results in call order.
        """
        out = []
        for (lv, g), (spt, _) in sorted(self._nonleaf.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            out.append(self.ops.free_external_spt(g, lv, spt))
        self._nonleaf.clear()
        return out


class DirectMmu:
    """A VM's direct (shared) TDP root: gfn → host frame of its userspace page (SPEC §3.3).

    For a TD these are the mappings of shared GPAs (shared bit set; KVM keys them by the gfn
    without it here, the root being implied). Changed only under ``mmu_lock``: installs with it
    held for read (the fault path), zaps for write (attribute changes to private, MMU-notifier
    invalidations of the userspace range, memslot deletion).
    """

    def __init__(self) -> None:
        self._map: Dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._map)

    def get(self, gfn: int) -> Optional[int]:
        """Return the frame mapped at ``gfn``, or None."""
        return self._map.get(gfn)

    def install(self, gfn: int, pfn: int) -> None:
        """Map ``gfn`` → ``pfn`` (caller holds ``mmu_lock``)."""
        self._map[gfn] = pfn

    def zap_range(self, start: int, end: int) -> int:
        """Drop every mapping in ``[start, end)`` (caller holds ``mmu_lock`` for write); return how many."""
        if end - start > len(self._map):
            victims = [g for g in self._map if start <= g < end]
        else:
            victims = [g for g in range(start, end) if g in self._map]
        for g in victims:
            del self._map[g]
        return len(victims)

    def items(self) -> Tuple[Tuple[int, int], ...]:
        """``(gfn, pfn)`` pairs, ascending."""
        return tuple(sorted(self._map.items()))

    def state_bytes(self) -> bytes:
        """``<Q`` count then ``<QQ`` (gfn, pfn) ascending."""
        return struct.pack("<Q", len(self._map)) + b"".join(
            struct.pack("<QQ", g, p) for g, p in sorted(self._map.items()))
