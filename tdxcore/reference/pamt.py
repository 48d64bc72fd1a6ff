"""Plain-Python twin of ``tdxcore._pamt`` (STYLE §2.7): dicts keyed by pfn, single-threaded.

Same class, methods, argument order and statuses as the core; built only from
``tdxcore.status`` / ``tdxcore.constants`` / ``tdxcore.errors``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict

import numpy as np
import numpy.typing as npt

from tdxcore.constants import (
    BUSYLOCK_EXCL_BIT,
    BUSYLOCK_HOST_PRIORITY_BIT,
    BUSYLOCK_SHARED_MASK,
    PAMT_NO_OWNER,
    PageType,
)
from tdxcore.errors import TdxTypeError, TdxValueError, check_int, check_u64_array
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TD_ASSOCIATED_PAGES_EXIST,
)

__all__ = ["Pamt", "is_tlb_tracked"]

_U64 = 1 << 64
_MAX_NR_FRAMES = 1 << 32
_NO_OWNER_TYPES = (PageType.PT_NDA, PageType.PT_RSVD, PageType.PT_TDR)


def is_tlb_tracked(bepoch: int, td_epoch: int, refcount_prev: int) -> bool:
    """Return whether BEPOCH ``bepoch`` is tracked at epoch ``td_epoch`` (tdx-facts §3.4)."""
    b = check_int("bepoch", bepoch, 0, _U64)
    e = check_int("td_epoch", td_epoch, 0, _U64)
    r = check_int("refcount_prev", refcount_prev, 0, _U64)
    # Python ints do not wrap, so the facts' formula can be written as is.
    return b + 1 < e or (b + 1 == e and r == 0)


def _as_bool(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, int)):
        msg = f"{name}={v!r} must be a bool (type={type(v).__name__})"
        raise TdxTypeError(msg, name=name, value=v)
    return bool(v)


class Pamt:
    """Per-frame PAMT metadata; see ``tdxcore._pamt.Pamt`` for the contract and hash format."""

    def __init__(self, nr_frames: int) -> None:
        self.nr_frames = check_int("nr_frames", nr_frames, 1, _MAX_NR_FRAMES + 1)
        self._type: Dict[int, int] = {}      # pfn -> PageType, absent = PT_NDA
        self._owner: Dict[int, int] = {}     # pfn -> owner TDR pfn (non-TDR assigned frames)
        self._bepoch: Dict[int, int] = {}    # pfn -> BEPOCH, absent = 0
        self._chldcnt: Dict[int, int] = {}   # TDR pfn -> CHLDCNT
        self._lock: Dict[int, int] = {}      # pfn -> busylock word, absent = 0

    def __reduce__(self) -> Any:
        msg = "Pamt cannot be pickled (as the core)"
        raise TypeError(msg)

    def _pfn(self, pfn: Any, name: str = "pfn") -> int:
        return check_int(name, pfn, 0, self.nr_frames)

    @staticmethod
    def _page_type(page_type: Any) -> int:
        t = check_int("page_type", page_type, 0, 16)
        if t not in {int(x) for x in PageType}:
            msg = f"page_type={t} is not a PageType value"
            raise TdxValueError(msg, name="page_type", value=page_type)
        return t

    @property
    def nbytes(self) -> int:
        """A rough size of the dicts (the twin's storage is not the core's)."""
        return 40 * (len(self._type) + len(self._bepoch) + len(self._lock))

    def page_type(self, pfn: int) -> int:
        """Return the page type of ``pfn``."""
        return self._type.get(self._pfn(pfn), PageType.PT_NDA.value)

    def owner(self, pfn: int) -> int:
        """Return the owner TDR of ``pfn`` (PAMT_NO_OWNER for NDA, RSVD, TDR)."""
        p = self._pfn(pfn)
        if self._type.get(p, 0) in _NO_OWNER_TYPES:
            return PAMT_NO_OWNER
        return self._owner[p]

    def bepoch(self, pfn: int) -> int:
        """Return BEPOCH of ``pfn``."""
        return self._bepoch.get(self._pfn(pfn), 0)

    def set_bepoch(self, pfn: int, epoch: int) -> None:
        """Record BEPOCH of ``pfn``."""
        p = self._pfn(pfn)
        e = check_int("epoch", epoch, 0, _U64)
        if e:
            self._bepoch[p] = e
        else:
            self._bepoch.pop(p, None)

    def child_count(self, tdr_pfn: int) -> int:
        """Return CHLDCNT of a PT_TDR frame, 0 for other frames."""
        p = self._pfn(tdr_pfn, "tdr_pfn")
        if self._type.get(p) != PageType.PT_TDR:
            return 0
        return self._chldcnt.get(p, 0)

    def assign(self, pfn: int, page_type: int, owner: int, operand: int) -> int:
        """Assign the free frame ``pfn``; see the core for the rules."""
        p = self._pfn(pfn)
        t = self._page_type(page_type)
        o = check_int("owner", owner, 0, _U64)
        op = check_int("operand", operand, 0, 1 << 32)
        if t in (PageType.PT_NDA, PageType.PT_RSVD):
            msg = f"page_type={t} cannot be assigned (PT_NDA is release(), PT_RSVD is reserve())"
            raise TdxValueError(msg, name="page_type", value=page_type)
        if t == PageType.PT_TDR:
            if o != PAMT_NO_OWNER:
                msg = f"owner={o:#x} must be PAMT_NO_OWNER for a PT_TDR frame"
                raise TdxValueError(msg, name="owner", value=owner)
        elif o >= self.nr_frames or self._type.get(o) != PageType.PT_TDR:
            msg = f"owner={o:#x} is not a PT_TDR frame"
            raise TdxValueError(msg, name="owner", value=owner)
        return self._assign(p, t, o, op)

    def _assign(self, p: int, t: int, o: int, op: int) -> int:
        """Assign without argument checks (used by the S-EPT twin)."""
        if self._type.get(p, PageType.PT_NDA) != PageType.PT_NDA:
            return TDX_PAGE_METADATA_INCORRECT | op
        if t != PageType.PT_TDR and self._type.get(o) != PageType.PT_TDR:
            return TDX_PAGE_METADATA_INCORRECT | op
        self._type[p] = t
        self._bepoch.pop(p, None)
        if t == PageType.PT_TDR:
            self._chldcnt[p] = 0
        else:
            self._owner[p] = o
            self._chldcnt[o] += 1
        return TDX_SUCCESS

    def release(self, pfn: int, operand: int) -> int:
        """Return ``pfn`` to PT_NDA; see the core for the statuses."""
        p = self._pfn(pfn)
        op = check_int("operand", operand, 0, 1 << 32)
        return self._release(p, op)

    def _release(self, p: int, op: int) -> int:
        t = self._type.get(p, PageType.PT_NDA)
        if t in (PageType.PT_NDA, PageType.PT_RSVD):
            return TDX_PAGE_METADATA_INCORRECT | op
        if t == PageType.PT_TDR:
            if self._chldcnt.get(p, 0):
                return TDX_TD_ASSOCIATED_PAGES_EXIST
            del self._chldcnt[p]
        else:
            owner = self._owner.pop(p)
            if owner in self._chldcnt:
                self._chldcnt[owner] -= 1
        del self._type[p]
        self._bepoch.pop(p, None)
        return TDX_SUCCESS

    def reserve(self, pfn: int) -> None:
        """Mark the free frame ``pfn`` PT_RSVD."""
        p = self._pfn(pfn)
        t = self._type.get(p, PageType.PT_NDA)
        if t != PageType.PT_NDA:
            msg = f"pfn={p:#x} is not PT_NDA (type {int(t)}); only a free frame can be reserved"
            raise TdxValueError(msg, name="pfn", value=pfn)
        self._type[p] = PageType.PT_RSVD

    def try_lock(self, pfn: int, exclusive: bool, operand: int, host: bool = True) -> int:
        """Try the PAMT entry lock of ``pfn`` (host-priority rules of the busy try-lock)."""
        p = self._pfn(pfn)
        ex = _as_bool("exclusive", exclusive)
        h = _as_bool("host", host)
        op = check_int("operand", operand, 0, 1 << 32)
        w = self._lock.get(p, 0)
        prio = bool(w & BUSYLOCK_HOST_PRIORITY_BIT)
        held_excl = bool(w & BUSYLOCK_EXCL_BIT)
        readers = w & BUSYLOCK_SHARED_MASK
        if not h and prio:
            return TDX_OPERAND_BUSY_HOST_PRIORITY | op
        if ex:
            if not held_excl and readers == 0:
                # A host acquire consumes its priority request; a guest keeps the word's bits.
                self._lock[p] = BUSYLOCK_EXCL_BIT if h else w | BUSYLOCK_EXCL_BIT
                return TDX_SUCCESS
            if h:
                self._lock[p] = w | BUSYLOCK_HOST_PRIORITY_BIT
            return TDX_OPERAND_BUSY | op
        if held_excl or readers == BUSYLOCK_SHARED_MASK:
            return TDX_OPERAND_BUSY | op
        self._lock[p] = w + 1
        return TDX_SUCCESS

    def unlock(self, pfn: int, exclusive: bool) -> None:
        """Release a hold taken by :meth:`try_lock`."""
        p = self._pfn(pfn)
        ex = _as_bool("exclusive", exclusive)
        w = self._lock.get(p, 0)
        if ex:
            if not w & BUSYLOCK_EXCL_BIT:
                msg = f"pfn={p:#x}: PAMT entry lock is not held exclusively"
                raise TdxValueError(msg, name="pfn", value=pfn)
            self._lock[p] = w & ~BUSYLOCK_EXCL_BIT
        else:
            if not w & BUSYLOCK_SHARED_MASK:
                msg = f"pfn={p:#x}: PAMT entry lock is not held shared"
                raise TdxValueError(msg, name="pfn", value=pfn)
            self._lock[p] = w - 1

    def nr_assigned(self, page_type: int) -> int:
        """Return how many frames have ``page_type``."""
        t = self._page_type(page_type)
        if t == PageType.PT_NDA:
            return self.nr_frames - len(self._type)
        return sum(1 for v in self._type.values() if v == t)

    def reclaim_batch(self, pfns: Any, owner: int) -> npt.NDArray[np.uint64]:
        """Release each frame of ``pfns`` owned by TDR ``owner`` (see the core); statuses."""
        p = check_u64_array("pfns", pfns, self.nr_frames)
        o = self._pfn(owner, "owner")
        if self.page_type(o) != PageType.PT_TDR:
            msg = f"owner={o:#x} is not a PT_TDR frame"
            raise TdxValueError(msg, name="owner", value=owner)
        out = np.empty(p.shape[0], dtype=np.uint64)
        for k, pfn in enumerate(p.tolist()):
            t = self._type.get(pfn, PageType.PT_NDA)
            if self._lock.get(pfn, 0) & (BUSYLOCK_EXCL_BIT | BUSYLOCK_SHARED_MASK):
                out[k] = TDX_OPERAND_BUSY | OPERAND_ID_RCX
            elif t not in _NO_OWNER_TYPES and self.owner(pfn) == o:
                out[k] = self._release(pfn, OPERAND_ID_RCX)
            else:
                out[k] = TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX
        return out

    def types(self, start: int, end: int) -> npt.NDArray[np.uint8]:
        """Return the page types of ``[start, end)``."""
        s = check_int("start", start, 0, self.nr_frames + 1)
        e = check_int("end", end, 0, self.nr_frames + 1)
        if e < s:
            msg = f"end={e:#x} is below start={s:#x}"
            raise TdxValueError(msg, name="end", value=end)
        out = np.zeros(e - s, dtype=np.uint8)
        for p, t in self._type.items():
            if s <= p < e:
                out[p - s] = t
        return out

    def state_hash(self) -> int:
        """Return the hash defined in ``tdxcore._pamt.Pamt``'s docstring."""
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack("<Q", self.nr_frames))
        for p in sorted(set(self._type) | set(self._bepoch)):
            h.update(struct.pack("<QQQQQ", p, self._type.get(p, 0), self.owner(p),
                                 self._bepoch.get(p, 0), self.child_count(p)))
        return int.from_bytes(h.digest(), "little")
