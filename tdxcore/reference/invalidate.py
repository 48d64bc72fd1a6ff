"""Plain-Python twin of ``tdxcore._invalidate`` (differential tests only; STYLE §2.7).

Written from tdx-facts §8 directly: ``seq`` an int kept modulo 2**64, ``in_progress`` an int, the
range a pair of ints or ``None`` for INVALID. Single-threaded; every call is one step.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

from tdxcore.constants import MAX_GFN, U64_MAX
from tdxcore.errors import InvariantViolation, TdxTypeError, TdxValueError, check_int

__all__ = ["InvalidateTracker"]


def _gfn_range(start: Any, end: Any) -> Tuple[int, int]:
    s = check_int("start", start, 0, MAX_GFN)
    e = check_int("end", end, 0, MAX_GFN + 1)
    if s >= e:
        msg = f"end={e:#x} must be greater than start={s:#x} (half-open gfn range [start, end))"
        raise TdxValueError(msg, name="end", value=e)
    return s, e


class InvalidateTracker:
    """Twin of the core class: same methods, arguments, results and exceptions."""

    def __init__(self) -> None:
        self._seq = 0
        self._in_progress = 0
        self._range: Optional[Tuple[int, int]] = None   # None = INVALID
        self._nr_warnings = 0

    def begin(self, start: int, end: int) -> None:
        """in_progress += 1; the first (0 -> 1) begin forgets the previous range."""
        _gfn_range(start, end)
        self._in_progress += 1
        if self._in_progress == 1:
            self._range = None

    def range_add(self, start: int, end: int) -> None:
        """First add sets the range; later adds take the hull. Refused outside an invalidation."""
        s, e = _gfn_range(start, end)
        if self._in_progress == 0:
            msg = f"range_add(start={s:#x}, end={e:#x}) with no invalidation in progress"
            raise InvariantViolation(invariant="I12", msg=msg, gfn=s)
        if self._range is None:
            self._range = (s, e)
        else:
            self._range = (min(self._range[0], s), max(self._range[1], e))

    def end(self, start: int, end: int) -> None:
        """Bump seq, then decrement in_progress; refused at 0; no range added counts a warning."""
        _gfn_range(start, end)
        if self._in_progress == 0:
            msg = "end() with in_progress == 0 would make it negative"
            raise InvariantViolation(invariant="I12", msg=msg)
        self._seq = (self._seq + 1) % (U64_MAX + 1)
        self._in_progress -= 1
        assert self._in_progress >= 0
        if self._range is None:
            self._nr_warnings += 1

    def retry(self, seq: int) -> bool:
        """Whether any invalidation is active, or seq moved."""
        s = check_int("seq", seq, 0, U64_MAX + 1)
        return self._in_progress != 0 or s != self._seq

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """Whether an active invalidation has no range or covers gfn, or seq moved."""
        s = check_int("seq", seq, 0, U64_MAX + 1)
        g = check_int("gfn", gfn, 0, MAX_GFN)
        if self._in_progress != 0:
            if self._range is None:
                return True
            if self._range[0] <= g < self._range[1]:
                return True
        return s != self._seq

    def retry_gfn_unsafe(self, seq: int, gfn: int) -> bool:
        """Like retry_gfn, but an INVALID range never matches (no sentinel test upstream)."""
        s = check_int("seq", seq, 0, U64_MAX + 1)
        g = check_int("gfn", gfn, 0, MAX_GFN)
        if self._in_progress != 0 and self._range is not None and self._range[0] <= g < self._range[1]:
            return True
        return s != self._seq

    def retry_gfn_many(self, seq: int, gfns: Any) -> npt.NDArray[np.bool_]:
        """retry_gfn for each element of a 1-D integer array."""
        check_int("seq", seq, 0, U64_MAX + 1)
        arr = np.asarray(gfns)
        if arr.dtype.kind not in "iu":
            msg = f"gfns must be an integer array (dtype={arr.dtype})"
            raise TdxTypeError(msg, name="gfns", value=arr.dtype)
        if arr.ndim != 1:
            msg = f"gfns must be 1-D (ndim={arr.ndim})"
            raise TdxValueError(msg, name="gfns", value=arr.ndim)
        values = [int(x) for x in arr]
        for i, g in enumerate(values):
            if not 0 <= g < MAX_GFN:
                msg = f"gfns[{i}]={g:#x} is out of range [0x0, {MAX_GFN:#x})"
                raise TdxValueError(msg, name="gfns", value=g)
        return np.array([self.retry_gfn(seq, g) for g in values], dtype=np.bool_)

    @property
    def seq(self) -> int:
        """mmu_invalidate_seq."""
        return self._seq

    @property
    def in_progress(self) -> int:
        """mmu_invalidate_in_progress."""
        return self._in_progress

    @property
    def range(self) -> Optional[Tuple[int, int]]:
        """(start, end) or None while INVALID."""
        return self._range

    @property
    def nr_warnings(self) -> int:
        """Count of end() calls with no range added."""
        return self._nr_warnings

    def state_hash(self) -> int:
        """blake2b-64 of '<5Q' seq, in_progress, range_start, range_end (INVALID = 2**64-1), nr_warnings."""
        start, end = self._range if self._range is not None else (U64_MAX, U64_MAX)
        data = struct.pack("<5Q", self._seq, self._in_progress, start, end, self._nr_warnings)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
