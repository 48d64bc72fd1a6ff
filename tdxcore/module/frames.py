"""Host physical memory: the 4K frame allocator, frame contents tagged by KeyID, user memory.

Three small objects the :class:`~tdxcore.module.host.Host` puts together (STYLE §2.11):

* :class:`FrameAllocator` — deterministic: the lowest free frame first. Frames below 1 MiB are
  never handed out (firmware/BIOS memory the kernel keeps; the TDX memory list also starts at
  1 MiB, tdx-facts §6.2), so every allocated frame is TDX-convertible.
* :class:`FrameContents` — sparse per-frame bytes, each frame tagged with the KeyID that wrote
  it. A read under another KeyID returns a deterministic keyed scramble, never the plaintext
  (SPEC §6 S6a); a frame never written reads as zeros under any KeyID.
* :class:`UserMemory` — host userspace: ``mmap`` hands out page-aligned addresses, pages are
  backed by frames on first write (reads of unbacked pages see zeros, as the zero page), and
  ``madvise_dontneed`` drops the backing after telling the MMU notifiers.
"""

from __future__ import annotations

import bisect
import errno as _errno
import hashlib
import heapq
import struct
from types import GeneratorType
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from tdxcore.constants import LOW_RESERVED_FRAMES, PAGE_SIZE
from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.sched import run_to_completion

__all__ = ["FrameAllocator", "FrameContents", "UserMemory", "LOW_RESERVED_FRAMES", "HVA_BASE"]

#: First user address handed out by :meth:`UserMemory.mmap` (model choice, page aligned).
HVA_BASE = 0x7F00_0000_0000
#: Above every pfn: bisect key for the run list.
_INF = 1 << 64
#: Bytes per scramble block: one cache line, the granularity of memory encryption.
_LINE = 64


class FrameAllocator:
    """Lowest-first allocator over frames ``[LOW_RESERVED_FRAMES, nr_frames)``.

    Notes
    -----
    A bump pointer over never-used frames plus a min-heap of freed frames, so allocation is
    O(log n) and deterministic (no set order). Not thread-safe: the host's callers serialize.
    """

    def __init__(self, nr_frames: int) -> None:
        self.nr_frames = nr_frames
        self._next = min(LOW_RESERVED_FRAMES, nr_frames)  # first never-allocated frame
        self._freed: List[int] = []                       # heap of freed frames, all < _next
        self._freed_set: Dict[int, None] = {}
        # Runs [start, end) freed by free_range (batch teardown), ascending, disjoint from the
        # heap; a 16 M-page teardown then costs one entry, not 16 M heap items.
        self._runs: List[List[int]] = []
        self._nr_in_runs = 0

    @property
    def nr_free(self) -> int:
        """Frames that :meth:`alloc` can still hand out."""
        return (self.nr_frames - self._next) + len(self._freed) + self._nr_in_runs

    def _in_runs(self, pfn: int) -> bool:
        i = bisect.bisect_right(self._runs, [pfn, _INF]) - 1
        return i >= 0 and self._runs[i][0] <= pfn < self._runs[i][1]

    def is_allocated(self, pfn: int) -> bool:
        """Return whether ``pfn`` is currently allocated."""
        return (LOW_RESERVED_FRAMES <= pfn < self._next and pfn not in self._freed_set
                and not (self._runs and self._in_runs(pfn)))

    def alloc(self) -> int:
        """Return the lowest free frame; ``HostError(ENOMEM)`` when none is left."""
        if self._runs and (not self._freed or self._runs[0][0] < self._freed[0]):
            r = self._runs[0]
            pfn = r[0]
            r[0] += 1
            if r[0] == r[1]:
                del self._runs[0]
            self._nr_in_runs -= 1
            return pfn
        if self._freed:
            pfn = heapq.heappop(self._freed)
            del self._freed_set[pfn]
            return pfn
        if self._next >= self.nr_frames:
            msg = f"out of memory: all {self.nr_frames - LOW_RESERVED_FRAMES} allocatable frames are in use"
            raise HostError(_errno.ENOMEM, msg)
        pfn = self._next
        self._next += 1
        return pfn

    def alloc_contig(self, nr: int) -> int:
        """Return the first pfn of ``nr`` physically contiguous never-used frames (``ENOMEM``)."""
        if nr <= 0 or self._next + nr > self.nr_frames:
            left = self.nr_frames - self._next
            msg = f"out of memory: cannot allocate {nr} contiguous frames ({left} left)"
            raise HostError(_errno.ENOMEM, msg)
        pfn = self._next
        self._next += nr
        return pfn

    def free(self, pfn: int) -> None:
        """Return ``pfn``; ``TdxValueError`` if it is not allocated (double free)."""
        if not self.is_allocated(pfn):
            msg = f"pfn={pfn:#x} is not an allocated frame (double free or never allocated)"
            raise TdxValueError(msg, name="pfn", value=pfn)
        heapq.heappush(self._freed, pfn)
        self._freed_set[pfn] = None

    def alloc_runs(self, nr: int) -> List[Tuple[int, int]]:
        """Allocate ``nr`` frames in exactly the order ``nr`` calls of :meth:`alloc` would.

        Returns
        -------
        list of (int, int)
            ``(first pfn, count)`` runs of consecutive frames, in allocation order. All or
            nothing: ``HostError(ENOMEM)`` (nothing taken) when fewer than ``nr`` are free.
        """
        if nr > self.nr_free:
            msg = f"out of memory: cannot allocate {nr} frames ({self.nr_free} free)"
            raise HostError(_errno.ENOMEM, msg)
        out: List[List[int]] = []

        def put(pfn: int, k: int) -> None:
            if out and out[-1][0] + out[-1][1] == pfn:
                out[-1][1] += k
            else:
                out.append([pfn, k])

        left = nr
        while left and (self._freed or self._runs):
            if self._runs and (not self._freed or self._runs[0][0] < self._freed[0]):
                r = self._runs[0]
                # never hand out a run frame above a lower heap frame: lowest first, always
                hi = r[1] if not self._freed else min(r[1], self._freed[0])
                k = min(left, hi - r[0])
                put(r[0], k)
                r[0] += k
                self._nr_in_runs -= k
                if r[0] == r[1]:
                    del self._runs[0]
            else:
                pfn = heapq.heappop(self._freed)
                del self._freed_set[pfn]
                put(pfn, 1)
                k = 1
            left -= k
        if left:
            put(self.alloc_contig(left), left)
        return [(p, k) for p, k in out]

    def free_range(self, pfn: int, nr: int) -> None:
        """Free the ``nr`` allocated frames ``[pfn, pfn + nr)`` as one run (batch teardown).

        The same frames as ``nr`` calls of :meth:`free` and the same later allocation order;
        ``TdxValueError`` (nothing freed) if any frame of the range is not allocated.
        """
        if nr <= 0:
            return
        end = pfn + nr
        bad = pfn < LOW_RESERVED_FRAMES or end > self._next
        if not bad and self._freed_set:
            bad = any(pfn <= f < end for f in self._freed_set) if len(self._freed_set) < nr else \
                any(f in self._freed_set for f in range(pfn, end))
        i = bisect.bisect_right(self._runs, [pfn, _INF])
        if not bad and i > 0 and self._runs[i - 1][1] > pfn:
            bad = True
        if not bad and i < len(self._runs) and self._runs[i][0] < end:
            bad = True
        if bad:
            msg = f"[{pfn:#x}, {end:#x}) holds a frame that is not allocated (double free)"
            raise TdxValueError(msg, name="pfn", value=pfn)
        # coalesce with touching neighbours so the run list stays short
        if i > 0 and self._runs[i - 1][1] == pfn:
            self._runs[i - 1][1] = end
            if i < len(self._runs) and self._runs[i][0] == end:
                self._runs[i - 1][1] = self._runs[i][1]
                del self._runs[i]
        elif i < len(self._runs) and self._runs[i][0] == end:
            self._runs[i][0] = pfn
        else:
            self._runs.insert(i, [pfn, end])
        self._nr_in_runs += nr

    def state_bytes(self) -> bytes:
        """``<QQQ nr_frames, next, n`` then the ``n`` freed frames below ``next`` ascending (``<Q`` each).

        Canonical over the *set* of free frames: freed frames at the top of the used range are
        folded into ``next``, and heap and runs are one list, so a per-page and a batch
        teardown that free the same frames serialize identically.
        """
        freed = sorted(list(self._freed) + [p for a, b in self._runs for p in range(a, b)])
        nxt = self._next
        while freed and freed[-1] == nxt - 1:
            freed.pop()
            nxt -= 1
        return struct.pack(f"<QQQ{len(freed)}Q", self.nr_frames, nxt, len(freed), *freed)


class FrameContents:
    """Sparse contents of host frames, each tagged with the KeyID that last wrote it.

    Parameters
    ----------
    nr_frames : int
        Frames of the host.
    scramble_key : bytes
        Key of the scramble (derived from the host seed), so reads under a wrong KeyID are
        deterministic for a seed and reveal nothing of the plaintext.

    Notes
    -----
    Model of memory encryption with integrity off: each frame holds plaintext as seen under its
    tag KeyID. Reading under another KeyID yields, per 64-byte line, blake2b(key, pfn, line,
    tag, reader, plaintext line) — data dependent like real ciphertext, and forced to differ
    from the plaintext. A write under a new KeyID first turns the whole frame into what that
    KeyID would have read, then writes, then re-tags (partial writes keep the rest scrambled).
    """

    def __init__(self, nr_frames: int, scramble_key: bytes) -> None:
        self.nr_frames = nr_frames
        self._key = scramble_key
        self._frames: Dict[int, Tuple[int, bytearray]] = {}
        self._digests: Dict[int, bytes] = {}
        #: Which KeyIDs are TDX-private (the Host sets it); with it, :meth:`host_read` logs every
        #: read of a frame last written under one to ``host_private_reads`` (SPEC §6 S6a, S6f).
        self.is_private: Optional[Callable[[int], bool]] = None
        self.host_private_reads: List[Tuple[int, int, str]] = []   # (pfn, writer KeyID, path)

    def _check(self, pfn: Any, offset: Any, size: int) -> Tuple[int, int]:
        p = check_int("pfn", pfn, 0, self.nr_frames)
        o = check_int("offset", offset, 0, PAGE_SIZE + 1)
        if o + size > PAGE_SIZE:
            msg = f"offset={o:#x} + size={size:#x} crosses the end of the 4 KiB frame"
            raise TdxValueError(msg, name="offset", value=o)
        return p, o

    def _scrambled(self, pfn: int, tag: int, reader: int, data: bytes) -> bytearray:
        out = bytearray(len(data))
        for line in range(0, len(data), _LINE):
            plain = data[line:line + _LINE]
            h = hashlib.blake2b(plain, digest_size=_LINE, key=self._key,
                                salt=struct.pack("<QQ", pfn, line), person=struct.pack("<QQ", tag, reader))
            s = h.digest()
            if s == plain:  # astronomically unlikely; "never the plaintext" must hold regardless
                s = bytes(b ^ 0xFF for b in s)
            out[line:line + _LINE] = s
        return out

    def read(self, pfn: Any, offset: Any, size: Any, keyid: int) -> bytes:
        """Return ``size`` bytes at ``offset`` of frame ``pfn`` as KeyID ``keyid`` sees them."""
        n = check_int("size", size, 0, PAGE_SIZE + 1)
        p, o = self._check(pfn, offset, n)
        ent = self._frames.get(p)
        if ent is None:
            return bytes(n)
        tag, data = ent
        if tag == keyid:
            return bytes(data[o:o + n])
        lo, hi = (o // _LINE) * _LINE, -(-(o + n) // _LINE) * _LINE
        view = self._scrambled(p, tag, keyid, bytes(data[lo:hi]))
        return bytes(view[o - lo:o - lo + n])

    def host_read(self, pfn: Any, offset: Any, size: Any, path: str) -> bytes:
        """Read as host software does (KeyID 0) through ``path``; log it if the frame is private.

        Every host read path (user memory, a guest_memfd host mapping) comes here, so a read of
        a frame whose contents were last written under a private KeyID is recorded in
        ``host_private_reads`` whatever it returned (the scramble, never the plaintext).
        """
        data = self.read(pfn, offset, size, 0)
        ent = self._frames.get(pfn)
        if ent is not None and self.is_private is not None and self.is_private(ent[0]):
            self.host_private_reads.append((int(pfn), ent[0], path))
        return data

    def write(self, pfn: Any, offset: Any, data: Any, keyid: int) -> None:
        """Write ``data`` at ``offset`` of frame ``pfn`` under KeyID ``keyid``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            msg = f"data must be bytes-like, not {type(data).__name__}"
            raise TdxTypeError(msg, name="data", value=type(data).__name__)
        b = bytes(data)
        p, o = self._check(pfn, offset, len(b))
        ent = self._frames.get(p)
        if ent is None:
            buf = bytearray(PAGE_SIZE)
        elif ent[0] == keyid:
            buf = ent[1]
        else:
            buf = self._scrambled(p, ent[0], keyid, bytes(ent[1]))
        buf[o:o + len(b)] = b
        self._frames[p] = (keyid, buf)
        self._digests.pop(p, None)

    def clear(self, pfn: Any) -> None:
        """Return frame ``pfn`` to the never-written state (reads zero under every KeyID)."""
        p = check_int("pfn", pfn, 0, self.nr_frames)
        self._frames.pop(p, None)
        self._digests.pop(p, None)

    def clear_range(self, start: int, end: int) -> None:
        """:meth:`clear` every frame of ``[start, end)`` (walks the written frames or the range)."""
        if end - start > len(self._frames):
            victims = [p for p in self._frames if start <= p < end]
        else:
            victims = [p for p in range(start, end) if p in self._frames]
        for p in victims:
            del self._frames[p]
            self._digests.pop(p, None)

    def keyid_of(self, pfn: Any) -> Optional[int]:
        """Return the KeyID that last wrote ``pfn``, or None if never written (or cleared)."""
        ent = self._frames.get(check_int("pfn", pfn, 0, self.nr_frames))
        return None if ent is None else ent[0]

    @property
    def nr_written(self) -> int:
        """Frames holding contents."""
        return len(self._frames)

    def digest(self) -> bytes:
        """blake2b over ``<QQ pfn, tag`` + 4096 bytes for every written frame, ascending pfn."""
        h = hashlib.blake2b(digest_size=8)
        for p in sorted(self._frames):
            d = self._digests.get(p)
            if d is None:
                tag, data = self._frames[p]
                d = hashlib.blake2b(struct.pack("<QQ", p, tag) + bytes(data), digest_size=16).digest()
                self._digests[p] = d
            h.update(d)
        return h.digest()


Notifier = Any  # a callable(start, end) or an object with invalidate_range_start/_end(start, end)


class UserMemory:
    """Host userspace address space: ``mmap`` regions lazily backed by frames.

    Parameters
    ----------
    alloc, free : callables
        The host's frame allocator entry points (``alloc() -> pfn``, ``free(pfn)``).
    contents : FrameContents
        Where the bytes live; userspace reads and writes under KeyID 0.

    Notes
    -----
    Errors follow the kernel: a user address outside every mapping → ``EFAULT`` (as
    ``copy_{to,from}_user``); ``mmap`` of 0 bytes → ``EINVAL``; ``madvise`` with an unaligned
    start → ``EINVAL`` and over an unmapped range → ``ENOMEM`` (``madvise(2)``). Notifiers are
    called before the frames are freed (``invalidate_range_start``) and, for objects that have
    it, ``invalidate_range_end`` after, once per mapping the range touches.
    """

    def __init__(self, alloc: Callable[[], int], free: Callable[[int], None],
                 contents: FrameContents) -> None:
        self._alloc, self._free, self._contents = alloc, free, contents
        self._next_hva = HVA_BASE
        self._maps: Dict[int, int] = {}   # start hva -> size (page multiple)
        self._pages: Dict[int, int] = {}  # page-aligned hva -> backing pfn
        self._notifiers: List[Notifier] = []

    # mappings ------------------------------------------------------------------------
    def mmap(self, size: Any) -> int:
        """Map ``size`` bytes (rounded up to pages) and return the page-aligned start address."""
        n = check_int("size", size, 0, 1 << 47)
        if n == 0:
            msg = "mmap: size 0 is not allowed"
            raise HostError(_errno.EINVAL, msg)
        n = -(-n // PAGE_SIZE) * PAGE_SIZE
        hva = self._next_hva
        self._maps[hva] = n
        self._next_hva = hva + n + PAGE_SIZE  # a guard page keeps mappings apart
        return hva

    def _mapping(self, hva: int) -> Optional[Tuple[int, int]]:
        for start, size in self._maps.items():
            if start <= hva < start + size:
                return start, size
        return None

    def _check_range(self, hva: Any, size: int, what: str) -> int:
        h = check_int("hva", hva, 0, 1 << 64)
        end = h + size
        pos = h
        while pos < end:
            m = self._mapping(pos)
            if m is None:
                msg = f"{what}: hva={pos:#x} is not mapped"
                raise HostError(_errno.EFAULT, msg)
            pos = m[0] + m[1]
        return h

    def read(self, hva: Any, size: Any) -> bytes:
        """Return ``size`` bytes at ``hva`` (unbacked pages read as zeros)."""
        n = check_int("size", size, 0, 1 << 47)
        h = self._check_range(hva, n, "read")
        out = bytearray()
        pos, end = h, h + n
        while pos < end:
            page = pos & ~(PAGE_SIZE - 1)
            chunk = min(end, page + PAGE_SIZE) - pos
            pfn = self._pages.get(page)
            out += bytes(chunk) if pfn is None else self._contents.host_read(pfn, pos - page, chunk,
                                                                             "user memory")
            pos += chunk
        return bytes(out)

    def write(self, hva: Any, data: Any) -> None:
        """Write ``data`` at ``hva``, backing untouched pages with fresh zeroed frames.

        All pages are backed before any byte is written, so ``ENOMEM`` leaves no partial write.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            msg = f"data must be bytes-like, not {type(data).__name__}"
            raise TdxTypeError(msg, name="data", value=type(data).__name__)
        b = bytes(data)
        h = self._check_range(hva, len(b), "write")
        pages = range(h & ~(PAGE_SIZE - 1), h + len(b), PAGE_SIZE)
        new: List[Tuple[int, int]] = []
        try:
            for page in pages:
                if page not in self._pages:
                    new.append((page, self._alloc()))
        except HostError:
            for _, pfn in new:
                self._free(pfn)
            raise
        for page, pfn in new:
            self._contents.clear(pfn)  # the kernel hands out zeroed pages
            self._pages[page] = pfn
        pos, end = h, h + len(b)
        while pos < end:
            page = pos & ~(PAGE_SIZE - 1)
            chunk = min(end, page + PAGE_SIZE) - pos
            self._contents.write(self._pages[page], pos - page, b[pos - h:pos - h + chunk], 0)
            pos += chunk

    def backing(self, hva: Any) -> Optional[int]:
        """Return the frame backing the page of ``hva``, or None (``EFAULT`` if unmapped)."""
        h = self._check_range(hva, 1, "backing")
        return self._pages.get(h & ~(PAGE_SIZE - 1))

    def add_mmu_notifier(self, notifier: Notifier) -> None:
        """Subscribe ``notifier`` to invalidations.

        A callable ``(start, end)``, or an object with ``invalidate_range_start(start, end)``
        and optionally ``invalidate_range_end(start, end)``.
        """
        if not (callable(notifier) or hasattr(notifier, "invalidate_range_start")):
            msg = "notifier must be callable or have invalidate_range_start(start, end)"
            raise TdxTypeError(msg, name="notifier", value=notifier)
        self._notifiers.append(notifier)

    def remove_mmu_notifier(self, notifier: Notifier) -> None:
        """Unsubscribe ``notifier`` (``TdxValueError`` if it is not subscribed)."""
        for i, n in enumerate(self._notifiers):
            if n is notifier:
                del self._notifiers[i]
                return
        msg = "notifier is not subscribed"
        raise TdxValueError(msg, name="notifier", value=notifier)

    def fault_in(self, hva: Any) -> int:
        """``get_user_pages(FOLL_WRITE)`` of one page: back it with a zeroed frame if needed.

        Returns the backing frame; ``HostError(EFAULT)`` outside every mapping, ``ENOMEM`` when
        the host has no frame.
        """
        h = self._check_range(hva, 1, "fault_in") & ~(PAGE_SIZE - 1)
        pfn = self._pages.get(h)
        if pfn is None:
            pfn = self._alloc()
            self._contents.clear(pfn)
            self._pages[h] = pfn
        return pfn

    def madvise_dontneed(self, hva: Any, size: Any) -> int:
        """Drop the backing of ``[hva, hva+size)`` (rounded up to pages); return frames freed.

        The synchronous form of :meth:`madvise_dontneed_gen` (one caller, no other actor).
        """
        return int(run_to_completion(self.madvise_dontneed_gen(hva, size), name="madvise"))

    def madvise_dontneed_gen(self, hva: Any, size: Any) -> Generator[Any, Any, int]:
        """:meth:`madvise_dontneed` as a generator (SPEC §5): a notifier may wait (``mmu_lock``).

        Arguments are checked before the first yield. A notifier method that returns a
        generator is driven here (KVM's, which takes ``mmu_lock``); a plain one is just called.
        """
        h = check_int("hva", hva, 0, 1 << 64)
        n = check_int("size", size, 0, 1 << 47)
        if h & (PAGE_SIZE - 1):
            msg = f"madvise: hva={h:#x} is not page aligned"
            raise HostError(_errno.EINVAL, msg)
        n = -(-n // PAGE_SIZE) * PAGE_SIZE
        if n == 0:
            return 0
        try:
            self._check_range(h, n, "madvise")
        except HostError as e:
            raise HostError(_errno.ENOMEM, str(e)) from None
        ranges: List[Tuple[int, int]] = []
        for start, msize in sorted(self._maps.items()):
            lo, hi = max(start, h), min(start + msize, h + n)
            if lo < hi:
                ranges.append((lo, hi))
        freed = 0
        for lo, hi in ranges:
            for nt in list(self._notifiers):
                r = nt.invalidate_range_start(lo, hi) if hasattr(nt, "invalidate_range_start") else nt(lo, hi)
                if isinstance(r, GeneratorType):
                    yield from r
            # Walk the backed pages, not the range: a 2^40-byte mapping has 2^28 pages, few backed.
            pages = (range(lo, hi, PAGE_SIZE) if (hi - lo) // PAGE_SIZE <= len(self._pages)
                     else sorted(p for p in self._pages if lo <= p < hi))
            for page in pages:
                pfn = self._pages.pop(page, None)
                if pfn is not None:
                    self._free(pfn)
                    freed += 1
            for nt in list(self._notifiers):
                end_cb = getattr(nt, "invalidate_range_end", None)
                if end_cb is not None:
                    r = end_cb(lo, hi)
                    if isinstance(r, GeneratorType):
                        yield from r
        return freed

    @property
    def nr_backed(self) -> int:
        """Pages currently backed by a frame."""
        return len(self._pages)

    def state_bytes(self) -> bytes:
        """``<Q next_hva``, mappings ``<QQ`` ascending, backed pages ``<QQ hva, pfn`` ascending."""
        parts = [struct.pack("<QQ", self._next_hva, len(self._maps))]
        parts += [struct.pack("<QQ", s, n) for s, n in sorted(self._maps.items())]
        parts.append(struct.pack("<Q", len(self._pages)))
        parts += [struct.pack("<QQ", h, p) for h, p in sorted(self._pages.items())]
        return b"".join(parts)

