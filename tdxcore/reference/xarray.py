"""Plain-Python twin of ``tdxcore._xarray`` (differential tests only; STYLE §2.7).

A dict gfn -> attribute word holding only non-zero words (KVM stores 0 as "no entry",
tdx-facts §7.3). Both backend names are accepted and behave identically: the backends differ only
in cost, which the twin does not model. Single-threaded; never allocates in C, so it cannot fail
with MemoryError and ``reserve`` only validates.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import numpy.typing as npt

from tdxcore.constants import MAX_GFN
from tdxcore.errors import TdxTypeError, TdxValueError, check_int

__all__ = ["AttributeStore"]

_U64_LIMIT = 1 << 64
_BACKENDS = ("ranges", "xarray")


def _range_args(start: Any, end: Any) -> Tuple[int, int]:
    s = check_int("start", start, 0, MAX_GFN + 1)
    e = check_int("end", end, 0, MAX_GFN + 1)
    return s, e


def _check_order(s: int, e: int) -> None:
    if s > e:
        msg = f"start={s:#x} is greater than end={e:#x} (ranges are half-open [start, end))"
        raise TdxValueError(msg, name="start", value=s)


class AttributeStore:
    """Twin of the core class: same methods, arguments, results and exceptions."""

    def __init__(self, backend: str = "ranges") -> None:
        if not isinstance(backend, str):
            msg = f"backend={backend!r} must be a str (type={type(backend).__name__})"
            raise TdxTypeError(msg, name="backend", value=backend)
        if backend not in _BACKENDS:
            msg = f"backend={backend!r} is not one of 'ranges', 'xarray'"
            raise TdxValueError(msg, name="backend", value=backend)
        self._backend = backend
        self._attrs: Dict[int, int] = {}

    def __reduce__(self) -> Any:
        msg = "AttributeStore holds C memory and cannot be pickled"
        raise TypeError(msg)

    def __repr__(self) -> str:
        return f"AttributeStore(backend={self.backend!r}, nbytes={self.nbytes})"

    @property
    def backend(self) -> str:
        """The backend name given at construction."""
        return self._backend

    @property
    def nbytes(self) -> int:
        """An estimate only: ``sys.getsizeof`` of the dict (not compared with the core)."""
        return sys.getsizeof(self._attrs)

    def __getitem__(self, gfn: int) -> int:
        """Return the attribute word of ``gfn`` (same as :meth:`get`)."""
        return self.get(gfn)

    def get(self, gfn: int) -> int:
        """Return the word of one gfn, 0 when absent."""
        g = check_int("gfn", gfn, 0, MAX_GFN)
        return self._attrs.get(g, 0)

    def get_many(self, gfns: npt.ArrayLike) -> npt.NDArray[np.uint64]:
        """Return the words of many gfns as a uint64 array."""
        arr = np.asarray(gfns)
        if arr.dtype.kind not in "iu":
            msg = f"gfns must be an integer array (dtype={arr.dtype})"
            raise TdxTypeError(msg, name="gfns", value=arr.dtype)
        if arr.ndim != 1:
            msg = f"gfns must be 1-D (ndim={arr.ndim})"
            raise TdxValueError(msg, name="gfns", value=arr.ndim)
        out = []
        for i, raw in enumerate(arr.tolist()):
            if raw < 0:
                msg = f"gfns[{i}]={raw} is negative"
                raise TdxValueError(msg, name="gfns", value=raw)
            if raw >= MAX_GFN:
                msg = f"gfns[{i}]={raw:#x} is out of range [0x0, {MAX_GFN:#x})"
                raise TdxValueError(msg, name="gfns", value=raw)
        for raw in arr.tolist():
            out.append(self._attrs.get(raw, 0))
        return np.array(out, dtype=np.uint64)

    def set_range(self, start: int, end: int, attrs: int) -> None:
        """Set every gfn in [start, end) to attrs; 0 deletes the entries."""
        s, e = _range_args(start, end)
        a = check_int("attrs", attrs, 0, _U64_LIMIT)
        _check_order(s, e)
        if a == 0:
            # Erasing: visit whichever is smaller, the range or the entries.
            doomed = range(s, e) if e - s <= len(self._attrs) else [g for g in self._attrs if s <= g < e]
            for gfn in doomed:
                self._attrs.pop(gfn, None)
            return
        for gfn in range(s, e):
            self._attrs[gfn] = a

    def reserve(self, start: int, end: int) -> None:
        """Validate only: a dict needs no reservation."""
        s, e = _range_args(start, end)
        _check_order(s, e)

    def has_range(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """Return True iff every gfn in [start, end) has (word & mask) == attrs."""
        s, e = _range_args(start, end)
        m = check_int("mask", mask, 0, _U64_LIMIT)
        a = check_int("attrs", attrs, 0, _U64_LIMIT)
        _check_order(s, e)
        if a & ~m:
            return False
        for gfn in range(s, e):
            if (self._attrs.get(gfn, 0) & m) != a:
                return False
        return True

    def _run_list(self) -> List[Tuple[int, int, int]]:
        runs: List[Tuple[int, int, int]] = []
        for gfn in sorted(self._attrs):
            value = self._attrs[gfn]
            if runs and runs[-1][1] == gfn and runs[-1][2] == value:
                runs[-1] = (runs[-1][0], gfn + 1, value)
            else:
                runs.append((gfn, gfn + 1, value))
        return runs

    def runs_array(self) -> npt.NDArray[np.uint64]:
        """Return the maximal non-zero runs as an (n, 3) uint64 array."""
        return np.array(self._run_list(), dtype=np.uint64).reshape(-1, 3)

    def runs(self) -> Iterator[Tuple[int, int, int]]:
        """Iterate the maximal non-zero runs (start, end, attrs), ascending."""
        return iter(self._run_list())

    def state_hash(self) -> int:
        """blake2b-64 over the runs, each packed as three little-endian u64."""
        data = b"".join(struct.pack("<3Q", *run) for run in self._run_list())
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def clear(self) -> None:
        """Erase everything."""
        self._attrs.clear()
