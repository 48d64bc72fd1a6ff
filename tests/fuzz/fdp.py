"""A small FuzzedDataProvider: turns the fuzzer's bytes into typed values, deterministically.

atheris ships its own provider, but replaying the committed corpora must not need atheris, and the
decoding must stay stable across atheris versions (a corpus file has to mean the same input
forever). So the targets decode with this class only. Running out of bytes yields zeros, never an
error: every byte string is a valid input.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np

#: Integers that sit on the edges the model checks (SPEC §7): sign, 4K/2M/1G alignment, 2^52 gfns,
#: the shared bit of 4- and 5-level EPT, u32/u64/i64 limits, and far beyond.
INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 511, 512, 513, 4095, 4096, 4097, 0x1FF000, 1 << 21, (1 << 21) + 4096,
    1 << 30, 4 << 30, (4 << 30) + 4096, 1 << 39, 1 << 47, 1 << 48, 1 << 51, 1 << 52, (1 << 52) - 1,
    1 << 56, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, 1 << 100,
    -1, -2, -4096, -(1 << 63), -(1 << 64),
)

#: Values of the wrong type (SPEC §7: a bare int as a leaf, floats, None, strings, numpy scalars).
JUNK = (None, 1.5, float("nan"), float("inf"), "1", b"\x01", True, False, [1], (1, 2), {}, object(),
        np.uint64(5), np.int64(-1), np.float64(2.0), np.array([1, 2]), 1j)

#: dtypes for the numpy-array arguments of the batch methods, wrong ones included.
DTYPES = (np.uint64, np.uint64, np.int64, np.int32, np.uint32, np.uint8, np.float64, np.bool_, object,
          np.complex128, "U4")


class Fdp:
    """Consume a byte string front to back as typed values.

    Parameters
    ----------
    data : bytes
        The fuzzer's input; exhausted input reads as zero bytes.
    """

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return max(0, len(self.data) - self.pos)

    def raw(self, n: int) -> bytes:
        """Return the next ``n`` bytes (fewer at the end of the input)."""
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def uint(self, nbytes: int) -> int:
        """Return an unsigned little-endian integer of ``nbytes`` bytes (0 when exhausted)."""
        return int.from_bytes(self.raw(nbytes), "little")

    def u8(self) -> int:
        """One byte."""
        return self.uint(1)

    def bool(self) -> bool:
        """One bit, taken from a whole byte."""
        return bool(self.u8() & 1)

    def int_in(self, lo: int, hi: int) -> int:
        """Return an integer in ``[lo, hi]`` (inclusive)."""
        span = hi - lo + 1
        if span <= 1:
            return lo
        nbytes = (span.bit_length() + 7) // 8
        return lo + self.uint(nbytes) % span

    def pick(self, seq: Sequence[Any]) -> Any:
        """One element of ``seq``."""
        return seq[self.int_in(0, len(seq) - 1)]

    def big(self) -> int:
        """Any 64-bit pattern, an interesting edge, or a small number — the fuzzer picks."""
        k = self.u8() % 8
        if k < 3:
            return self.pick(INTERESTING_INTS)
        if k < 5:
            return self.uint(1)
        if k < 7:
            return self.uint(8)
        return self.pick(INTERESTING_INTS) + self.int_in(-8, 8)

    def value(self, good: Any) -> Any:
        """Usually ``good`` (a valid-ish value the caller built), sometimes an edge int or junk."""
        k = self.u8()
        if k < 200:
            return good
        if k < 240:
            return self.big()
        return self.pick(JUNK)

    def ints(self, n_max: int, gen: Any) -> List[int]:
        """Up to ``n_max`` values from ``gen()``."""
        return [gen() for _ in range(self.int_in(0, n_max))]

    def array(self, n_max: int, gen: Any) -> Any:
        """Return a numpy array of up to ``n_max`` values from ``gen()``.

        Usually 1-D uint64; sometimes a wrong dtype, a 2-D or 0-D shape, a non-contiguous view,
        a list, or not an array at all.
        """
        vals = self.ints(n_max, gen)
        k = self.u8() % 16
        try:
            if k < 8:
                return np.array([v & ((1 << 64) - 1) for v in vals], dtype=np.uint64)
            if k < 10:
                return vals
            if k == 10:
                a = np.array([v & ((1 << 64) - 1) for v in vals] * 2, dtype=np.uint64)
                return a[::2]
            if k == 11:
                a = np.array([v & ((1 << 64) - 1) for v in vals], dtype=np.uint64)
                return a.reshape(1, -1) if self.bool() else (a[0] if len(a) else a.reshape(0, 0))
            if k == 12:
                return self.pick(JUNK)
            dt = self.pick(DTYPES)
            return np.array([self._fit(v, dt) for v in vals], dtype=dt)
        except (OverflowError, ValueError, TypeError):
            return vals

    @staticmethod
    def _fit(v: int, dt: Any) -> Any:
        if dt in (object, "U4"):
            return v
        if dt is np.bool_:
            return bool(v & 1)
        info = np.iinfo(dt) if np.issubdtype(np.dtype(dt), np.integer) else None
        if info is None:
            return float(v) if dt is np.float64 else complex(v)
        return max(info.min, min(info.max, v))
