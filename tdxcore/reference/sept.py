"""Plain-Python twin of ``tdxcore._sept`` (STYLE §2.7).

One dict per level maps a GPA to its S-EPT entry (absent = FREE|SVE). A table exists exactly
where its parent entry is a non-leaf, so no separate table structure is kept. Legality rows come
from ``tdxcore.status.SEPT_LEGALITY_SEAMCALL/TDCALL``, state flags from ``SEPT_STATE_FLAGS``;
transitions are spelled out by state name.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from tdxcore.constants import (
    ACCEPT_EPT_VIOLATION,
    GPAW_BY_LEVELS,
    LEVEL_STATE_STATE_SHIFT,
    MAX_GFN,
    PAGE_SHIFT,
    PAMT_NO_OWNER,
    SEPT_BIT_SVE,
    SEPT_LEVEL_BITS,
    SEPT_MAX_LEVEL,
    SEPT_PFN_MASK,
    SEPT_STATE_BITS,
    PageType,
)
from tdxcore.errors import TdxTypeError, TdxValueError, check_int, check_u64_array
from tdxcore.reference.pamt import Pamt
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_R8,
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    SEPT_LEGALITY_SEAMCALL,
    SEPT_LEGALITY_TDCALL,
    SEPT_PUBLIC_STATE,
    SEPT_STATE_FLAGS,
    SEPT_STATE_INDEX,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_PAGE_NOT_FREE,
    TDX_EPT_WALK_FAILED,
    TDX_GPA_RANGE_ALREADY_BLOCKED,
    TDX_GPA_RANGE_NOT_BLOCKED,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
    Leaf,
    SeptState,
    TdcallLeaf,
)

__all__ = ["SeptTree"]

Result = Tuple[int, int, int]
#: SeptState is built from the CSV at import, so its members are dynamic for mypy.
S: Any = SeptState
_U64 = 1 << 64

_BLOCK_TO = {S.MAPPED: S.BLOCKED, S.BLOCKEDW: S.BLOCKED, S.PENDING: S.PENDING_BLOCKED,
             S.PENDING_BLOCKEDW: S.PENDING_BLOCKED, S.NL_MAPPED: S.NL_BLOCKED}
_UNBLOCK_TO = {S.BLOCKED: S.MAPPED, S.PENDING_BLOCKED: S.PENDING, S.NL_BLOCKED: S.NL_MAPPED}
_ACCEPT_TO = {S.PENDING: S.MAPPED, S.PENDING_EXPORTED_DIRTY: S.EXPORTED_DIRTY}
_ALREADY_BLOCKED = {S.NL_BLOCKED, S.BLOCKED, S.PENDING_BLOCKED}


def state_bits(state: int) -> int:
    """Entry bits of a state encoding (encoding bit i is entry bit SEPT_STATE_BITS[i])."""
    return sum(1 << bit for i, bit in enumerate(SEPT_STATE_BITS) if state >> i & 1)


def entry_state(entry: int) -> SeptState:
    """Return the state of an entry."""
    return SeptState(sum(1 << i for i, bit in enumerate(SEPT_STATE_BITS) if entry >> bit & 1))


def _kind(state: int) -> str:
    return str(SEPT_STATE_FLAGS[state]["kind"])


def _flag(state: int, name: str) -> bool:
    return bool(SEPT_STATE_FLAGS[state][name])


def _allowed(leaf: Any, state: int) -> bool:
    table = SEPT_LEGALITY_TDCALL if isinstance(leaf, TdcallLeaf) else SEPT_LEGALITY_SEAMCALL
    return bool(table.get(int(leaf), (0,) * 16)[SEPT_STATE_INDEX[state]])


FREE_ENTRY = state_bits(S.FREE) | (1 << SEPT_BIT_SVE)


def _as_bool(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, int)):
        msg = f"{name}={v!r} must be a bool (type={type(v).__name__})"
        raise TdxTypeError(msg, name=name, value=v)
    return bool(v)


def _level_size(level: int) -> int:
    return 1 << (PAGE_SHIFT + SEPT_LEVEL_BITS * level)


def _array(name: str, x: Any, gfn: bool) -> List[int]:
    return [int(v) for v in check_u64_array(name, x, MAX_GFN if gfn else 1 << 64)]


class SeptTree:
    """Twin of ``tdxcore._sept.SeptTree``; same contract, statuses and hash."""

    def __init__(self, levels: int = 4, pamt: Optional[Pamt] = None, tdr: int = 0) -> None:
        lv = check_int("levels", levels, 4, 6)
        if pamt is None:
            pamt = Pamt(1 << 24)
        elif not isinstance(pamt, Pamt):
            msg = f"pamt={pamt!r} must be a tdxcore.reference.pamt.Pamt or None"
            raise TdxTypeError(msg, name="pamt", value=pamt)
        t = check_int("tdr", tdr, 0, pamt.nr_frames)
        if pamt.page_type(t) == PageType.PT_NDA:
            pamt.assign(t, PageType.PT_TDR, PAMT_NO_OWNER, 0)
        elif pamt.page_type(t) != PageType.PT_TDR:
            msg = f"tdr={t:#x} is a frame of page type {pamt.page_type(t)}, not PT_TDR"
            raise TdxValueError(msg, name="tdr", value=tdr)
        self.pamt = pamt
        self.tdr = t
        self.levels = lv
        self.gpaw = GPAW_BY_LEVELS[lv]
        self.shared_bit = self.gpaw - 1
        self._entries: List[Dict[int, int]] = [{} for _ in range(lv)]
        self._mutations: set = set()
        self._force_next = pamt.nr_frames
        self._locks: Dict[Tuple[int, int], Tuple[bool, bool]] = {}   # (level, gpa) -> (held, prio)

    def __reduce__(self) -> Any:
        msg = "SeptTree cannot be pickled (as the core)"
        raise TypeError(msg)

    # ------------------------------------------------------------------ helpers
    def _get(self, gpa: int, level: int) -> int:
        return self._entries[level].get(gpa, FREE_ENTRY)

    def _set(self, gpa: int, level: int, entry: int) -> None:
        if entry == FREE_ENTRY:
            self._entries[level].pop(gpa, None)
        else:
            self._entries[level][gpa] = entry

    @staticmethod
    def _ls(level: int, entry: int) -> int:
        return level | SEPT_PUBLIC_STATE[entry_state(entry)] << LEVEL_STATE_STATE_SHIFT

    def _operand_ok(self, gpa: int, level: int, allowed: range) -> bool:
        if level not in allowed or level >= self.levels:
            return False
        if gpa >> self.shared_bit:
            return False
        return gpa % _level_size(level) == 0

    def _walk(self, gpa: int, level: int) -> Optional[Result]:
        """Return None when every entry above ``level`` is a non-leaf, else the failure."""
        for lv in range(self.levels - 1, level, -1):
            base = gpa - gpa % _level_size(lv)
            e = self._get(base, lv)
            if _kind(entry_state(e)) != "non-leaf":
                return (TDX_EPT_WALK_FAILED | OPERAND_ID_RCX, e, self._ls(lv, e))
        return None

    @staticmethod
    def _args(gpa: Any, level: Any) -> Tuple[int, int]:
        return check_int("gpa", gpa, 0, _U64), check_int("level", level, 0, SEPT_MAX_LEVEL + 1)

    def _bepoch(self, entry: int) -> int:
        pfn = (entry & SEPT_PFN_MASK) >> PAGE_SHIFT
        return self.pamt.bepoch(pfn) if pfn < self.pamt.nr_frames else 0

    def _tracked(self, entry: int, td_epoch: int, refcount_prev: int) -> bool:
        b = self._bepoch(entry)
        return b + 1 < td_epoch or (b + 1 == td_epoch and refcount_prev == 0)

    # ------------------------------------------------------------------ properties
    @property
    def nr_tables(self) -> int:
        """Tables including the root: one per non-leaf entry at level >= 1."""
        return 1 + sum(1 for lv in range(1, self.levels) for e in self._entries[lv].values()
                       if _kind(entry_state(e)) == "non-leaf")

    @property
    def nbytes(self) -> int:
        """A rough size of the dicts (not comparable with the core)."""
        return 64 * sum(len(d) for d in self._entries)

    # ------------------------------------------------------------------ leaves
    def walk(self, gpa: int, level: int = 0) -> Result:
        """Walk to ``(gpa, level)``."""
        g, lv = self._args(gpa, level)
        if not self._operand_ok(g, lv, range(0, 5)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        return (TDX_SUCCESS, e, self._ls(lv, e))

    def sept_add(self, gpa: int, level: int, page: int, allow_existing: bool = False) -> Result:
        """TDH.MEM.SEPT.ADD."""
        g, lv = self._args(gpa, level)
        p = check_int("page", page, 0, _U64)
        ae = _as_bool("allow_existing", allow_existing)
        if not self._operand_ok(g, lv, range(1, 5)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        if p >= self.pamt.nr_frames:
            return (TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        st = entry_state(e)
        if not _allowed(Leaf.TDH_MEM_SEPT_ADD, st):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        if st == S.NL_MAPPED:
            if ae:
                return (TDX_SUCCESS, e, self._ls(lv, e))
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        s = self.pamt._assign(p, PageType.PT_EPT, self.tdr, OPERAND_ID_R8)
        if s != TDX_SUCCESS:
            return (s, e, self._ls(lv, e))
        new = p << PAGE_SHIFT | state_bits(S.NL_MAPPED)
        self._set(g, lv, new)
        return (TDX_SUCCESS, new, self._ls(lv, new))

    def page_add(self, gpa: int, level: int, page: int) -> Result:
        """TDH.MEM.PAGE.ADD."""
        g, lv = self._args(gpa, level)
        p = check_int("page", page, 0, _U64)
        if not self._operand_ok(g, lv, range(0, 1)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        if p >= self.pamt.nr_frames:
            return (TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        if not _allowed(Leaf.TDH_MEM_PAGE_ADD, entry_state(e)):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        s = self.pamt._assign(p, PageType.PT_REG, self.tdr, OPERAND_ID_R8)
        if s != TDX_SUCCESS:
            return (s, e, self._ls(lv, e))
        new = p << PAGE_SHIFT | state_bits(S.MAPPED)
        self._set(g, lv, new)
        return (TDX_SUCCESS, new, self._ls(lv, new))

    def page_aug(self, gpa: int, level: int, page: int) -> Result:
        """TDH.MEM.PAGE.AUG (4K, or 2M = 512 frames)."""
        g, lv = self._args(gpa, level)
        p = check_int("page", page, 0, _U64)
        if not self._operand_ok(g, lv, range(0, 2)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        n = 512 ** lv
        if p % n or p + n > self.pamt.nr_frames:
            return (TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        if not _allowed(Leaf.TDH_MEM_PAGE_AUG, entry_state(e)):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        if any(self.pamt.page_type(p + k) != PageType.PT_NDA for k in range(n)):
            return (TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8, e, self._ls(lv, e))
        for k in range(n):
            self.pamt._assign(p + k, PageType.PT_REG, self.tdr, OPERAND_ID_R8)
        new = p << PAGE_SHIFT | state_bits(S.PENDING)
        self._set(g, lv, new)
        return (TDX_SUCCESS, new, self._ls(lv, new))

    def range_block(self, gpa: int, level: int, td_epoch: int, refcount_prev: int = 0,
                    tracking_required: bool = True) -> Result:
        """TDH.MEM.RANGE.BLOCK."""
        g, lv = self._args(gpa, level)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        check_int("refcount_prev", refcount_prev, 0, _U64)
        _as_bool("tracking_required", tracking_required)
        if not self._operand_ok(g, lv, range(0, 5)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        st = entry_state(e)
        if st in _ALREADY_BLOCKED:
            return (TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX, e, self._ls(lv, e))
        if not _allowed(Leaf.TDH_MEM_RANGE_BLOCK, st):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        to = _BLOCK_TO[st]
        if "block_pending_to_blocked" in self._mutations and st == S.PENDING:
            to = S.BLOCKED
        new = (e & ~state_bits(st)) | state_bits(to)
        self._set(g, lv, new)
        pfn = (new & SEPT_PFN_MASK) >> PAGE_SHIFT
        if pfn < self.pamt.nr_frames:
            self.pamt.set_bepoch(pfn, ep)
        return (TDX_SUCCESS, new, self._ls(lv, new))

    def range_unblock(self, gpa: int, level: int, td_epoch: int, refcount_prev: int = 0,
                      tracking_required: bool = True) -> Result:
        """TDH.MEM.RANGE.UNBLOCK."""
        g, lv = self._args(gpa, level)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        rc = check_int("refcount_prev", refcount_prev, 0, _U64)
        tr = _as_bool("tracking_required", tracking_required)
        if not self._operand_ok(g, lv, range(0, 5)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        fail = self._walk(g, lv)
        if fail:
            return fail
        e = self._get(g, lv)
        st = entry_state(e)
        if not _allowed(Leaf.TDH_MEM_RANGE_UNBLOCK, st):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e))
        if tr and _flag(st, "tlb_tracking_required") and not self._tracked(e, ep, rc):
            return (TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT_TREE, e, self._ls(lv, e))
        new = (e & ~state_bits(st)) | state_bits(_UNBLOCK_TO[st])
        self._set(g, lv, new)
        return (TDX_SUCCESS, new, self._ls(lv, new))

    def _removal_checks(self, leaf: Leaf, g: int, lv: int, ep: int, rc: int, tr: bool,
                        levels_ok: range) -> Tuple[Optional[Result], int]:
        if not self._operand_ok(g, lv, levels_ok):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0), 0
        fail = self._walk(g, lv)
        if fail:
            return fail, 0
        e = self._get(g, lv)
        st = entry_state(e)
        if not _allowed(leaf, st):
            return (TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, self._ls(lv, e)), e
        if tr and _flag(st, "tlb_tracking_required"):
            if not _flag(st, "any_blocked"):
                return (TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, e, self._ls(lv, e)), e
            if not self._tracked(e, ep, rc):
                return (TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX, e, self._ls(lv, e)), e
        return None, e

    def page_remove(self, gpa: int, level: int, td_epoch: int, refcount_prev: int = 0,
                    tracking_required: bool = True) -> Result:
        """TDH.MEM.PAGE.REMOVE (returns the old entry)."""
        g, lv = self._args(gpa, level)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        rc = check_int("refcount_prev", refcount_prev, 0, _U64)
        tr = _as_bool("tracking_required", tracking_required)
        fail, e = self._removal_checks(Leaf.TDH_MEM_PAGE_REMOVE, g, lv, ep, rc, tr, range(0, 2))
        if fail:
            return fail
        self._set(g, lv, FREE_ENTRY)
        pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT
        for k in range(512 ** lv):
            if pfn + k < self.pamt.nr_frames:
                self.pamt._release(pfn + k, OPERAND_ID_RCX)
        return (TDX_SUCCESS, e, self._ls(lv, e))

    def sept_remove(self, gpa: int, level: int, td_epoch: int, refcount_prev: int = 0,
                    tracking_required: bool = True) -> Result:
        """TDH.MEM.SEPT.REMOVE (returns the old entry)."""
        g, lv = self._args(gpa, level)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        rc = check_int("refcount_prev", refcount_prev, 0, _U64)
        tr = _as_bool("tracking_required", tracking_required)
        fail, e = self._removal_checks(Leaf.TDH_MEM_SEPT_REMOVE, g, lv, ep, rc, tr,
                                       range(1, 5))
        if fail:
            return fail
        child_lv = lv - 1
        lo, hi = g, g + _level_size(lv)
        if any(lo <= cg < hi for cg in self._entries[child_lv]):
            return (TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX, e, self._ls(lv, e))
        self._set(g, lv, FREE_ENTRY)
        self.pamt._release((e & SEPT_PFN_MASK) >> PAGE_SHIFT, OPERAND_ID_RCX)
        self._drop_locks_below(g, lv)
        return (TDX_SUCCESS, e, self._ls(lv, e))

    def _drop_locks_below(self, gpa: int, level: int) -> None:
        """Forget the entry-lock state of every entry in the table(s) under (gpa, level).

        The entry lock lives in the S-EPT table with the entry (as the core's lock words do),
        so freeing a table frees its locks, held or not, and any host-priority request.
        """
        hi = gpa + _level_size(level)
        for key in [k for k in self._locks if k[0] < level and gpa <= k[1] < hi]:
            del self._locks[key]

    def page_accept(self, gpa: int, level: int = 0) -> Result:
        """TDG.MEM.PAGE.ACCEPT (guest)."""
        g, lv = self._args(gpa, level)
        if not self._operand_ok(g, lv, range(0, 3)):
            return (TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
        for up in range(self.levels - 1, lv, -1):
            e = self._get(g - g % _level_size(up), up)
            st = entry_state(e)
            if st == S.NL_MAPPED:
                continue
            if _kind(st) == "leaf":
                return (TDX_PAGE_SIZE_MISMATCH | lv, e, self._ls(up, e))
            return (TDX_SUCCESS | ACCEPT_EPT_VIOLATION, e, self._ls(lv, e))
        e = self._get(g, lv)
        st = entry_state(e)
        if _allowed(TdcallLeaf.TDG_MEM_PAGE_ACCEPT, st):
            new = (e & ~state_bits(st)) | state_bits(_ACCEPT_TO[st])
            self._set(g, lv, new)
            return (TDX_SUCCESS, new, self._ls(lv, new))
        if _flag(st, "guest_accessible_leaf"):
            return (TDX_PAGE_ALREADY_ACCEPTED | lv, e, self._ls(lv, e))
        if _kind(st) == "non-leaf":
            return (TDX_PAGE_SIZE_MISMATCH | lv, e, self._ls(lv, e))
        return (TDX_SUCCESS | ACCEPT_EPT_VIOLATION, e, self._ls(lv, e))

    # ------------------------------------------------------------------ entry locks
    def entry_try_lock(self, gpa: int, level: int, host: bool = True) -> int:
        """Try the entry's host lock (status)."""
        g, lv = self._args(gpa, level)
        h = _as_bool("host", host)
        if not self._operand_ok(g, lv, range(0, 5)):
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        fail = self._walk(g, lv)
        if fail:
            return fail[0]
        key = (lv, g)
        held, prio = self._locks.get(key, (False, False))
        if not h and prio:
            return TDX_OPERAND_BUSY_HOST_PRIORITY | OPERAND_ID_RCX
        if not held:
            self._locks[key] = (True, False)     # an acquire consumes a priority request
            return TDX_SUCCESS
        if h:
            self._locks[key] = (True, True)      # the losing host asks for priority
        return TDX_OPERAND_BUSY | OPERAND_ID_RCX

    def entry_unlock(self, gpa: int, level: int) -> None:
        """Release the entry lock."""
        g, lv = self._args(gpa, level)
        if (not self._operand_ok(g, lv, range(0, 5)) or self._walk(g, lv)
                or not self._locks.get((lv, g), (False, False))[0]):
            msg = f"gpa={g:#x} level={lv}: the entry lock is not held"
            raise TdxValueError(msg, name="gpa", value=gpa)
        self._locks[(lv, g)] = (False, self._locks[(lv, g)][1])

    # ------------------------------------------------------------------ batches
    def page_aug_batch(self, gfns: Any, pages: Any) -> npt.NDArray[np.uint64]:
        """Loop of :meth:`page_aug` at level 0."""
        g = _array("gfns", gfns, True)
        p = _array("pages", pages, False)
        if len(g) != len(p):
            msg = f"pages has {len(p)} elements, gfns has {len(g)}"
            raise TdxValueError(msg, name="pages", value=pages)
        return np.array([self.page_aug(x << PAGE_SHIFT, 0, y)[0] for x, y in zip(g, p, strict=True)],
                        dtype=np.uint64)

    def page_accept_batch(self, gfns: Any) -> npt.NDArray[np.uint64]:
        """Loop of :meth:`page_accept` at level 0."""
        g = _array("gfns", gfns, True)
        return np.array([self.page_accept(x << PAGE_SHIFT, 0)[0] for x in g], dtype=np.uint64)

    def range_block_batch(self, gfns: Any, td_epoch: int) -> npt.NDArray[np.uint64]:
        """Loop of :meth:`range_block` at level 0."""
        g = _array("gfns", gfns, True)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        return np.array([self.range_block(x << PAGE_SHIFT, 0, ep)[0] for x in g],
                        dtype=np.uint64)

    def page_remove_batch(self, gfns: Any, td_epoch: int, refcount_prev: int = 0,
                          tracking_required: bool = True) -> npt.NDArray[np.uint64]:
        """Loop of :meth:`page_remove` at level 0."""
        g = _array("gfns", gfns, True)
        ep = check_int("td_epoch", td_epoch, 0, _U64)
        rc = check_int("refcount_prev", refcount_prev, 0, _U64)
        tr = _as_bool("tracking_required", tracking_required)
        return np.array([self.page_remove(x << PAGE_SHIFT, 0, ep, rc, tr)[0] for x in g],
                        dtype=np.uint64)

    def sept_add_range(self, start_gfn: int, end_gfn: int, pages: Any) -> int:
        """Add every missing table over ``[start_gfn, end_gfn)``; return frames used."""
        s0 = check_int("start_gfn", start_gfn, 0, _U64)
        e0 = check_int("end_gfn", end_gfn, 0, _U64)
        lim = 1 << (self.shared_bit - PAGE_SHIFT)
        if e0 > lim:
            msg = f"end_gfn={e0:#x} is beyond the private GPA space (gfn < {lim:#x})"
            raise TdxValueError(msg, name="end_gfn", value=end_gfn)
        if s0 >= e0:
            msg = f"start_gfn={s0:#x} must be below end_gfn={e0:#x}"
            raise TdxValueError(msg, name="start_gfn", value=start_gfn)
        p = _array("pages", pages, False)
        lo, hi = s0 << PAGE_SHIFT, e0 << PAGE_SHIFT
        # Needed (level, gpa) slots in walk order: depth-first, ascending gpa.
        needed: List[Tuple[int, int]] = []

        def visit(level: int, base: int, present: bool) -> None:
            size = _level_size(level)
            first = max(lo, base) - (max(lo, base) - base) % size
            for gpa in range(first, min(hi, base + 512 * size), size):
                st = entry_state(self._get(gpa, level)) if present else S.FREE
                if _kind(st) == "non-leaf":
                    child_present = True
                elif st == S.FREE:
                    needed.append((level, gpa))
                    child_present = False
                else:
                    msg = f"gpa={gpa:#x} holds a leaf; no table can be added there"
                    raise TdxValueError(msg, name="start_gfn", value=start_gfn)
                if level - 1 >= 1:
                    visit(level - 1, gpa, child_present)

        visit(self.levels - 1, 0, True)
        if len(needed) > len(p):
            msg = f"pages has {len(p)} frames; the range needs more"
            raise TdxValueError(msg, name="pages", value=pages)
        for k in range(len(needed)):
            if p[k] >= self.pamt.nr_frames or self.pamt.page_type(p[k]) != PageType.PT_NDA:
                msg = f"pages[{k}]={p[k]:#x} is not a free (PT_NDA) frame of the PAMT"
                raise TdxValueError(msg, name="pages", value=pages)
        if len(set(p[:len(needed)])) != len(needed):
            msg = "pages has a duplicate frame"
            raise TdxValueError(msg, name="pages", value=pages)
        for (level, gpa), page in zip(needed, p[:len(needed)], strict=True):
            assert self.sept_add(gpa, level, page)[0] == TDX_SUCCESS
        return len(needed)

    # ------------------------------------------------------------------ inspection
    def entries(self, level: int = 0) -> List[Tuple[int, int]]:
        """Non-FREE entries at ``level`` as sorted ``(gpa, entry)``."""
        lv = check_int("level", level, 0, SEPT_MAX_LEVEL + 1)
        if lv >= self.levels:
            return []
        return sorted(self._entries[lv].items())

    def state_hash(self) -> int:
        """Return the hash defined in ``tdxcore._sept.SeptTree``'s docstring."""
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack("<QQ", self.levels, self.tdr))
        rows = [(lv, g, e) for lv in range(self.levels) for g, e in sorted(self._entries[lv].items())]
        h.update(struct.pack("<Q", len(rows)))
        for r in rows:
            h.update(struct.pack("<QQQ", *r))
        tables = sorted((lv - 1, g, (e & SEPT_PFN_MASK) >> PAGE_SHIFT)
                        for lv in range(1, self.levels) for g, e in self._entries[lv].items()
                        if _kind(entry_state(e)) == "non-leaf")
        h.update(struct.pack("<Q", len(tables)))
        for t in tables:
            h.update(struct.pack("<QQQ", *t))
        return int.from_bytes(h.digest(), "little")


# ---------------------------------------------------------------------- test hooks (twins)

def _testing_mutate(tree: SeptTree, name: str) -> None:
    """Twin of the core hook (``"none"`` or ``"block_pending_to_blocked"``)."""
    if name not in ("none", "block_pending_to_blocked"):
        msg = f"name={name!r} is not a known mutation"
        raise TdxValueError(msg, name="name", value=name)
    tree._mutations = set() if name == "none" else {name}


def _supply(tree: SeptTree, n: int) -> int:
    nxt = tree._force_next
    wrapped = False
    while True:
        if nxt < n:
            if wrapped:
                msg = "the test frame supply is exhausted"
                raise TdxValueError(msg, name="pfn", value=0)
            wrapped, nxt = True, tree.pamt.nr_frames
            continue
        cand = (nxt - n) // n * n
        nxt = cand
        if all(tree.pamt.page_type(cand + k) == PageType.PT_NDA for k in range(n)):
            tree._force_next = cand
            return cand


def _clear(tree: SeptTree, gpa: int, level: int) -> None:
    """Remove whatever (gpa, level) holds, releasing every frame below it."""
    e = tree._get(gpa, level)
    st = entry_state(e)
    pfn = (e & SEPT_PFN_MASK) >> PAGE_SHIFT
    if _kind(st) == "non-leaf":
        if level >= 1:
            size = _level_size(level)
            for cg in [c for c in tree._entries[level - 1] if gpa <= c < gpa + size]:
                _clear(tree, cg, level - 1)
            tree._drop_locks_below(gpa, level)
        tree.pamt._release(pfn, 0)
    elif _kind(st) == "leaf":
        for k in range(512 ** level):
            if pfn + k < tree.pamt.nr_frames:
                tree.pamt._release(pfn + k, 0)
    tree._set(gpa, level, FREE_ENTRY)


def _testing_force_state(tree: SeptTree, gpa: int, level: int, state_encoding: int,
                         pfn: int = 0) -> int:
    """Twin of the core hook (same frame-supply rule); returns the new entry."""
    g, lv = tree._args(gpa, level)
    enc = check_int("state_encoding", state_encoding, 0, 128)
    if enc not in SEPT_STATE_INDEX:
        msg = f"state_encoding={enc:#x} is not an L1 S-EPT state"
        raise TdxValueError(msg, name="state_encoding", value=state_encoding)
    st = SeptState(enc)
    p = check_int("pfn", pfn, 0, tree.pamt.nr_frames)
    if not tree._operand_ok(g, lv, range(0, 5)):
        msg = f"gpa={g:#x} level={lv} is not a valid private GPA|level for this tree"
        raise TdxValueError(msg, name="gpa", value=gpa)
    kind = _kind(st)
    if kind == "leaf" and lv > 1:
        msg = f"level={lv}: leaf states are supported at levels 0 and 1 only"
        raise TdxValueError(msg, name="level", value=level)
    n = 512 ** lv
    if p and kind != "free":
        for k in range(n if kind == "leaf" else 1):
            if p + k >= tree.pamt.nr_frames or tree.pamt.page_type(p + k) != PageType.PT_NDA:
                msg = f"pfn={p + k:#x} is not a free frame"
                raise TdxValueError(msg, name="pfn", value=pfn)
        if kind == "leaf" and p % n:
            msg = f"pfn={p:#x} is not aligned to {n} frames"
            raise TdxValueError(msg, name="pfn", value=pfn)
    for up in range(tree.levels - 1, lv, -1):
        base = g - g % _level_size(up)
        if _kind(entry_state(tree._get(base, up))) != "non-leaf":
            _clear(tree, base, up)
            frame = _supply(tree, 1)
            tree.pamt._assign(frame, PageType.PT_EPT, tree.tdr, 0)
            tree._set(base, up, frame << PAGE_SHIFT | state_bits(S.NL_MAPPED))
    _clear(tree, g, lv)
    if kind == "free":
        new = state_bits(st) | ((1 << SEPT_BIT_SVE) if st == S.FREE else 0)
    elif kind == "non-leaf":
        frame = p or _supply(tree, 1)
        tree.pamt._assign(frame, PageType.PT_EPT, tree.tdr, 0)
        new = frame << PAGE_SHIFT | state_bits(st)
    else:
        frame = p or _supply(tree, n)
        for k in range(n):
            tree.pamt._assign(frame + k, PageType.PT_REG, tree.tdr, 0)
        new = frame << PAGE_SHIFT | state_bits(st)
    tree._set(g, lv, new)
    return new
