"""guest_memfd: the file that backs a VM's private memory (SPEC §3.2; issue 5 item 2).

A :class:`GuestMemfd` is a sparse file of ``size`` bytes whose pages are 4K host frames taken from
the host allocator on first use and zeroed (as the kernel zeroes a new folio); ``fallocate``
populates or punches them; the memslots bound to it are kept per page range (``bindings``, the
upstream per-file xarray). The file holds a reference on its VM from creation until it is closed
(``__kvm_gmem_create`` takes ``kvm_get_kvm``; ``kvm_gmem_release`` drops it), so a VM lives as long
as any of its guest_memfds — whether bound or not. A binding holds no reference either way:
closing a bound file invalidates the binding and the memslot stays until it is deleted.

Mirrors ``virt/kvm/guest_memfd.c`` (Linux 6.18) and the ``vfs_fallocate`` checks before it.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import TYPE_CHECKING, Any, Dict, Generator, List, Optional, Tuple

from tdxcore.constants import KVM_MAX_LFS_FILESIZE, PAGE_SHIFT, PAGE_SIZE, FallocFlag, GmemFlag
from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl
from tdxcore.kvm.runs import merge_runs, pfn_in_runs
from tdxcore.sched import READ, WRITE, KLock, Wait, run_to_completion

if TYPE_CHECKING:
    from tdxcore.kvm.memslot import Memslot
    from tdxcore.kvm.vm import Vm

__all__ = ["GuestMemfd", "kvm_gmem_get_supported_flags", "kvm_gmem_create"]

_KEEP = int(FallocFlag.KEEP_SIZE)
_PUNCH = int(FallocFlag.PUNCH_HOLE)
#: ``FALLOC_FL_MODE_MASK``: the operation bits (exactly one, or none for a plain allocate).
_MODE_MASK = int(FallocFlag.PUNCH_HOLE | FallocFlag.COLLAPSE_RANGE | FallocFlag.ZERO_RANGE
                 | FallocFlag.INSERT_RANGE | FallocFlag.UNSHARE_RANGE | FallocFlag.WRITE_ZEROES)
#: Operations that may (allocate, unshare, zero) or must (punch) come with KEEP_SIZE ...
_KEEP_OK = (0, int(FallocFlag.UNSHARE_RANGE), int(FallocFlag.ZERO_RANGE), _PUNCH)
#: ... and those that must not.
_KEEP_NEVER = (int(FallocFlag.COLLAPSE_RANGE), int(FallocFlag.INSERT_RANGE), int(FallocFlag.WRITE_ZEROES))


def kvm_gmem_get_supported_flags(vm: Optional["Vm"]) -> int:
    """Return the guest_memfd flags ``vm`` accepts (``KVM_CAP_GUEST_MEMFD_FLAGS``).

    Notes
    -----
    Mirrors ``kvm_gmem_get_supported_flags()`` (6.18): MMAP always; INIT_SHARED only for a VM
    without private memory (x86 ``kvm_arch_supports_gmem_init_shared``), or with no VM at all.
    """
    flags = int(GmemFlag.MMAP)
    if vm is None or not vm.has_private_mem:
        flags |= int(GmemFlag.INIT_SHARED)
    return flags


def kvm_gmem_create(vm: "Vm", size: int,
                    flags: int) -> Generator[Any, Any, Tuple[Ret, Optional["GuestMemfd"]]]:
    """Validate and create a guest_memfd for ``vm``; return ``(ret, file)`` (the ``fd`` in ``ret``).

    Notes
    -----
    Mirrors ``kvm_gmem_create()`` (6.18): unknown flags → EINVAL first, then ``size <= 0`` (as a
    signed ``loff_t``) or not page aligned → EINVAL. ``reserved`` is not checked (checked against
    the real kernel). No frame is allocated: the file is sparse, so even ``2^63 - 4096`` works.
    """
    if flags & ~kvm_gmem_get_supported_flags(vm):
        return fail(_errno.EINVAL, f"flags {flags:#x} outside supported "
                                   f"{kvm_gmem_get_supported_flags(vm):#x}"), None
    ssize = size - (1 << 64) if size >> 63 else size
    if ssize <= 0 or ssize & (PAGE_SIZE - 1):
        return fail(_errno.EINVAL, f"size {size:#x} is not a positive multiple of 4 KiB"), None
    yield from ()
    f = GuestMemfd(vm, ssize, flags)
    return (f.fd, ""), f


class GuestMemfd:
    """One guest_memfd file (made by :meth:`Vm.create_guest_memfd`, never directly).

    Attributes
    ----------
    vm : Vm
        The VM it belongs to (it holds one of the VM's references until closed).
    size : int
        Bytes (``i_size``; immutable).
    flags : int
        ``GmemFlag`` bits it was created with.
    fd : int
        Its number in ``kvm.fds`` (stays readable after close).
    invalidate_lock : KLock
        ``filemap_invalidate_lock``: taken WRITE by punch and bind/unbind, READ by allocate.
    """

    def __init__(self, vm: "Vm", size: int, flags: int) -> None:
        self.vm = vm
        self.size = size
        self.flags = flags
        self.invalidate_lock = KLock("filemap_invalidate_lock")
        self._pd: Dict[int, int] = {}  # page index -> backing pfn
        # Pages backed in bulk (kvm/tdx_batch.py): [start, end, first_pfn] runs of page indices,
        # ascending, disjoint from _pd; index i is backed by first_pfn + i - start. Any per-page
        # access through _pages expands them first.
        self._bulk: List[List[int]] = []
        self._bindings: List[Tuple[int, int, "Memslot"]] = []  # [start, end) page index -> slot
        self._closed = False
        vm.get()
        self.fd = vm.kvm.fds.install(self)

    def __repr__(self) -> str:
        return (f"GuestMemfd(fd={self.fd}, vm={self.vm.id}, size={self.size:#x}, flags={self.flags:#x}, "
                f"pages={self.nr_pages}, closed={self._closed})")

    # ------------------------------------------------------------------ properties
    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` ran (the file is released)."""
        return self._closed

    @property
    def nr_pages(self) -> int:
        """Pages currently backed by a host frame."""
        return len(self._pd) + sum(b - a for a, b, _ in self._bulk)

    @property
    def _pages(self) -> Dict[int, int]:
        """The per-index page table (bulk runs expanded into it first)."""
        if self._bulk:
            pd = self._pd
            for a, b, p0 in self._bulk:
                for k in range(b - a):
                    pd[a + k] = p0 + k
            self._bulk = []
        return self._pd

    def bulk_runs(self) -> Tuple[Tuple[int, int, int], ...]:
        """Return the bulk runs ``(start_index, end_index, first_pfn)``, ascending."""
        return tuple((a, b, p) for a, b, p in self._bulk)

    def hole_segments(self, start: int, end: int) -> List[Tuple[int, int]]:
        """``[lo, hi)`` index segments of ``[start, end)`` with no backing page, ascending."""
        if end - start == 1:            # one page (every 4K fault): no list building, no sort
            backed = start in self._pd or (bool(self._bulk) and self._pfn_bulk(start) is not None)
            return [] if backed else [(start, end)]
        taken = sorted([(max(a, start), min(b, end)) for a, b, _ in self._bulk if a < end and start < b]
                       + [(i, i + 1) for i in (sorted(i for i in self._pd if start <= i < end)
                                              if end - start > len(self._pd)
                                              else [i for i in range(start, end) if i in self._pd])])
        out: List[Tuple[int, int]] = []
        pos = start
        for a, b in taken:
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            out.append((pos, end))
        return out

    def bulk_add(self, runs: List[Tuple[int, int, int]]) -> None:
        """Record backing runs ``(start_index, end_index, first_pfn)`` of holes (caller checked)."""
        self._bulk = merge_runs(self._bulk, runs)

    def _pfn_bulk(self, index: int) -> Optional[int]:
        return pfn_in_runs(self._bulk, index)

    @property
    def bindings(self) -> Tuple[Tuple[int, int, int], ...]:
        """``(start, end, slot_id)`` page-index ranges bound to memslots, ascending."""
        return tuple(sorted((s, e, m.id) for s, e, m in self._bindings))

    def pfn_of(self, index: int) -> Optional[int]:
        """Return the frame backing page ``index``, or None (a hole)."""
        i = check_int("index", index, 0, self.size >> PAGE_SHIFT)
        p = self._pd.get(i)
        if p is None and self._bulk:
            return self._pfn_bulk(i)
        return p

    # ------------------------------------------------------------------ fallocate
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(fd, mode, offset, length)`` on the file.

        Parameters
        ----------
        mode : int
            ``FallocFlag`` bits: ``KEEP_SIZE`` (allocate) or ``KEEP_SIZE | PUNCH_HOLE``.
        offset, length : int
            Byte range (signed ``loff_t``, as the syscall takes it).

        Raises
        ------
        KvmError
            EINVAL: ``offset < 0`` or ``length <= 0``, unaligned offset/length, an allocation that
            reaches past the end. EOPNOTSUPP: no ``KEEP_SIZE``, or any mode bit other than
            ``KEEP_SIZE``/``PUNCH_HOLE``. EFBIG: ``offset + length`` past ``LLONG_MAX``. EBADF:
            the file is closed. ENOMEM: the host ran out of frames (nothing allocated stays).

        Notes
        -----
        Mirrors ``vfs_fallocate()`` then ``kvm_gmem_fallocate()`` (6.18). A punch at or past the
        end is a no-op success; punched pages read back zero (their frames go back to the host).
        """
        m = check_int("mode", mode, 0, 1 << 31)
        off = check_int("offset", offset, -(1 << 63), 1 << 63)
        n = check_int("length", length, -(1 << 63), 1 << 63)
        ioctl(self.vm.kvm.host, "fallocate", self.vm.id, self._fallocate(m, off, n))

    def _fallocate(self, mode: int, offset: int, length: int) -> Generator[Any, Any, Ret]:
        if self._closed:
            return ebadf("guest_memfd")
        # vfs_fallocate: range sign first, then the mode, then overflow.
        if offset < 0 or length <= 0:
            return fail(_errno.EINVAL, f"offset {offset} < 0 or length {length} <= 0")
        if mode & ~(_MODE_MASK | _KEEP):
            return fail(_errno.EOPNOTSUPP, f"unknown mode bits {mode:#x}")
        op = mode & _MODE_MASK
        if op == _PUNCH and not mode & _KEEP:
            return fail(_errno.EOPNOTSUPP, f"mode {mode:#x}: PUNCH_HOLE without KEEP_SIZE")
        if op in _KEEP_NEVER and mode & _KEEP:
            return fail(_errno.EOPNOTSUPP, f"mode {mode:#x}: KEEP_SIZE with a range-shifting mode")
        if op not in _KEEP_OK and op not in _KEEP_NEVER:
            return fail(_errno.EOPNOTSUPP, f"mode {mode:#x} combines several operations")
        if offset + length > KVM_MAX_LFS_FILESIZE:
            return fail(_errno.EFBIG, f"offset + length {offset + length:#x} past MAX_LFS_FILESIZE")
        # kvm_gmem_fallocate
        if not mode & _KEEP:
            return fail(_errno.EOPNOTSUPP, f"mode {mode:#x} without FALLOC_FL_KEEP_SIZE")
        if mode & ~(_KEEP | _PUNCH):
            return fail(_errno.EOPNOTSUPP, f"mode {mode:#x} is not allocate or punch-hole")
        if (offset | length) & (PAGE_SIZE - 1):
            return fail(_errno.EINVAL, f"offset {offset:#x} or length {length:#x} is not page aligned")
        if mode & _PUNCH:
            owner = yield Wait(self.invalidate_lock, WRITE)
            try:
                yield from self._punch_hole_locked(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT)
            finally:
                self.invalidate_lock.release(owner, WRITE)
            return OK
        if offset + length > self.size:
            return fail(_errno.EINVAL,
                        f"range [{offset:#x}, {offset + length:#x}) past the end {self.size:#x}")
        owner = yield Wait(self.invalidate_lock, READ)
        try:
            return self._allocate_locked(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT)
        finally:
            self.invalidate_lock.release(owner, READ)

    def _allocate_locked(self, start: int, end: int) -> Ret:
        """Back every hole in ``[start, end)`` (caller holds ``invalidate_lock``).

        All or nothing: on ENOMEM every frame this call took goes back (upstream keeps the folios
        it got before failing; the model keeps SPEC §7's "no state change" on an error). The
        hole count is checked against the host's free frames first, so a huge range fails fast.
        """
        pd = self._pd
        if end - start == 1 and not self._bulk:         # the fault path: one page
            segs = [] if start in pd else [(start, end)]
        else:
            segs = self.hole_segments(start, end)       # bulk runs stay runs
        holes = sum(b - a for a, b in segs)
        if holes > self.vm.kvm.host.free_frames:
            free = self.vm.kvm.host.free_frames
            return fail(_errno.ENOMEM, f"no host frame for {holes} pages ({free} free)")
        new: List[int] = []
        try:
            for a, b in segs:
                for index in range(a, b):
                    pfn = self._new_frame()
                    pd[index] = pfn
                    new.append(index)
        except HostError:
            for index in new:
                self.vm.kvm.host.free_frame(pd.pop(index))
            return fail(_errno.ENOMEM, f"no host frame for page {start + len(new):#x}")
        return OK

    def _new_frame(self) -> int:
        host = self.vm.kvm.host
        pfn = host.alloc_frame()
        host.frame_clear(pfn)  # the kernel hands out zeroed folios
        return pfn

    def _punch_hole_locked(self, start: int, end: int) -> Generator[Any, Any, None]:
        """Drop the frames of ``[start, end)`` (caller holds ``invalidate_lock`` for write).

        First the VM unmaps them from the guest (:meth:`Vm.kvm_gmem_invalidate`, upstream's
        ``kvm_gmem_invalidate_begin`` over the bound slots in ``kvm_gmem_punch_hole`` /
        ``kvm_gmem_release``, 6.18); a page it reports as still pinned (its zap failed) leaves
        the file but is never freed: the VM has recorded it as leaked. The pages are sparse in a
        dict, so a punch of a huge range walks the backed pages only.
        """
        end = min(end, self.size >> PAGE_SHIFT)
        pinned = yield from self.vm.kvm_gmem_invalidate(self, start, end)
        kept = self.vm.pinned_pfns
        if self._bulk:                  # bulk runs go back as frame ranges, not page by page
            keep: List[List[int]] = []
            for a, b, p0 in self._bulk:
                lo, hi = max(a, start), min(b, end)
                if lo >= hi:
                    keep.append([a, b, p0])
                    continue
                if a < lo:
                    keep.append([a, lo, p0])
                if hi < b:
                    keep.append([hi, b, p0 + hi - a])
                self._free_run(lo, hi, p0 + lo - a, pinned, kept)
            self._bulk = keep
        pd = self._pd
        if end - start > len(pd):
            victims = sorted(i for i in pd if start <= i < end)
        else:
            victims = [i for i in range(start, end) if i in pd]
        for index in victims:
            pfn = pd.pop(index)
            if index not in pinned and pfn not in kept:
                self.vm.kvm.host.free_frame(pfn)
        yield from self.vm.kvm_gmem_invalidate_end(self, start, end)

    def _free_run(self, lo: int, hi: int, pfn0: int, pinned: Any, kept: Any) -> None:
        """Free the frames backing indices ``[lo, hi)`` (``pfn0`` first) except pinned/kept ones."""
        skip = sorted({pfn0 + i - lo for i in pinned if lo <= i < hi}
                      | {p for p in kept if pfn0 <= p < pfn0 + hi - lo})
        pos = pfn0
        host = self.vm.kvm.host
        for p in skip + [pfn0 + hi - lo]:
            if p > pos:
                host.free_frame_range(pos, p - pos)
            pos = p + 1

    # ------------------------------------------------------------------ host mapping
    def _check_mapping(self, offset: int, size: int) -> Tuple[int, int]:
        if not (self.flags & GmemFlag.MMAP and self.flags & GmemFlag.INIT_SHARED):
            msg = (f"flags={self.flags:#x}: a host mapping needs GUEST_MEMFD_FLAG_MMAP and INIT_SHARED "
                   "(mmap fails or faults SIGBUS otherwise)")
            raise TdxValueError(msg, name="flags", value=self.flags)
        if self._closed:
            msg = "the guest_memfd is closed"
            raise TdxValueError(msg, name="self", value=self.fd)
        off = check_int("offset", offset, 0, self.size)
        n = check_int("size", size, 0, self.size - off + 1)
        return off, n

    def read(self, offset: int, size: int) -> bytes:
        """Read bytes through a shared host mapping (``MMAP | INIT_SHARED`` files only).

        A hole reads zero and stays a hole (as a read fault on the real file does not allocate
        a page the model would have to track; the bytes are the same).
        """
        off, n = self._check_mapping(offset, size)
        out = bytearray()
        pos = off
        host = self.vm.kvm.host
        while pos < off + n:
            index, inner = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            chunk = min(off + n - pos, PAGE_SIZE - inner)
            pfn = self._pd.get(index)
            if pfn is None and self._bulk:
                pfn = self._pfn_bulk(index)
            out += bytes(chunk) if pfn is None else host.host_frame_read(pfn, inner, chunk, "guest_memfd map")
            pos += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write bytes through a shared host mapping, backing holes first (all or nothing)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            msg = f"data must be bytes-like, not {type(data).__name__}"
            raise TdxTypeError(msg, name="data", value=type(data).__name__)
        b = bytes(data)
        off, n = self._check_mapping(offset, len(b))
        if n == 0:
            return
        ret, check = self._allocate_locked(off >> PAGE_SHIFT, ((off + n - 1) >> PAGE_SHIFT) + 1)
        if ret < 0:
            raise HostError(-ret, f"guest_memfd write: {check}")
        host = self.vm.kvm.host
        pos = off
        while pos < off + n:
            index, inner = pos >> PAGE_SHIFT, pos & (PAGE_SIZE - 1)
            chunk = min(off + n - pos, PAGE_SIZE - inner)
            host.frame_write(self.pfn_of(index), inner, b[pos - off:pos - off + chunk], 0)
            pos += chunk

    # ------------------------------------------------------------------ bindings (memslot.py)
    def _bind_locked(self, slot: "Memslot", start: int, end: int) -> bool:
        """Bind ``[start, end)`` to ``slot`` unless any page of it is bound (False)."""
        if any(s < end and start < e for s, e, _ in self._bindings):
            return False
        self._bindings.append((start, end, slot))
        return True

    def _unbind(self, slot: "Memslot") -> None:
        self._bindings = [b for b in self._bindings if b[2] is not slot]

    def state_bytes(self) -> bytes:
        """Canonical serialization for state hashes.

        ``<qQQB fd, size, flags, closed``, ``<Q`` page count then ``<QQ index, pfn`` ascending,
        ``<Q`` binding count then ``<QQI start, end, slot id`` ascending.
        """
        parts = [struct.pack("<qQQB", self.fd, self.size, self.flags, self._closed),
                 struct.pack("<Q", len(self._pages))]
        parts += [struct.pack("<QQ", i, p) for i, p in sorted(self._pages.items())]
        parts.append(struct.pack("<Q", len(self._bindings)))
        parts += [struct.pack("<QQI", s, e, sid) for s, e, sid in self.bindings]
        return b"".join(parts)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """``close(fd)``: release the file — invalidate bindings, free frames, drop the VM reference.

        Raises
        ------
        KvmError
            EBADF if already closed.

        Notes
        -----
        Mirrors ``kvm_gmem_release()`` (6.18): every bound memslot loses its file (the slot
        stays; deleting it later is fine), the pages go back to the host, and the VM reference
        taken at creation is put — the last one destroys the VM.
        """
        fd_call(self.vm.kvm.host, "close", self.vm.id,
                run_to_completion(self._release(), name="kvm_gmem_release"))

    def _release(self) -> Generator[Any, Any, Ret]:
        if self._closed:
            return ebadf("guest_memfd")
        self._closed = True
        self.vm.kvm.fds.remove(self.fd)
        # Invalidate through the bindings first, then unbind (kvm_gmem_release, 6.18).
        yield from self._punch_hole_locked(0, self.size >> PAGE_SHIFT)
        for _, _, slot in self._bindings:
            slot.gmem = None
        self._bindings = []
        self.vm.put()
        return OK
