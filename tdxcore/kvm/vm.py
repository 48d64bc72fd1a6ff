"""``Vm``: a KVM VM object with upstream lifetime (SPEC §3.2 "Lifetime"; issue 5 item 2).

A VM is referenced by its fd (the handle) and by every guest_memfd created for it (upstream:
``kvm_get_kvm`` in ``__kvm_gmem_create``, put in ``kvm_gmem_release``); vCPUs add theirs in the TD
issue. :meth:`Vm.put` of the last reference destroys it (``kvm_destroy_vm``): memslots are freed
and the VM leaves the host's registry. Memslots hold no reference (upstream: the file pins KVM,
never the other way round).

Extension: a VM type is a class in ``Kvm.VM_CLASSES`` (DEFAULT and SW_PROTECTED are this class).
The TD layer registers ``VmType.TDX`` with a subclass in ``kvm/tdx_vm.py`` that overrides
:meth:`Vm._destroy_vm` (its teardown, then ``super()._destroy_vm()``) and the ``has_*`` properties.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import TYPE_CHECKING, Any, Callable, Dict, Generator, List, Optional, Union

from tdxcore._invalidate import InvalidateTracker
from tdxcore._xarray import AttributeStore
from tdxcore.constants import (
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MAX_NR_ADDRESS_SPACES,
    KVM_MAX_VCPUS,
    MAX_NR_RESERVED_IOAPIC_PINS,
    PAGE_SHIFT,
    PAGE_SIZE,
    Cap,
    VmType,
)
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.kvm import attributes as _attributes
from tdxcore.kvm.gmem import GuestMemfd, kvm_gmem_create
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl
from tdxcore.kvm.memslot import Memslot, Memslots, UserMemoryRegion, kvm_set_memory_region
from tdxcore.kvm.mmu import DirectMmu
from tdxcore.kvm.policy import Policy
from tdxcore.sched import WRITE, KLock, Srcu, Wait

if TYPE_CHECKING:
    from tdxcore.kvm.kvm import Kvm

__all__ = ["Vm", "HOOK_POINTS"]

#: Points where :meth:`Vm.add_hook` observers run.
HOOK_POINTS = ("pre_set_memory_attributes", "post_set_memory_attributes")
#: ``MemAttr.PRIVATE`` as an int (``int & flag`` would run the flag enum's Python ``__rand__``).
_PRIVATE = int(_attributes.MemAttr.PRIVATE)


def _u(name: str, value: Any, bits: int) -> int:
    return check_int(name, value, 0, 1 << bits)


class Vm:
    """One VM (made by :meth:`Kvm.create_vm`, never directly).

    Attributes
    ----------
    kvm : Kvm
        The ``/dev/kvm`` it came from (fd table, host).
    type : VmType
        The machine type it was created with.
    id : int
        A per-``Kvm`` sequence number (events, messages; never ``id()``).
    fd : int
        Its number in ``kvm.fds`` (stays readable after close).
    memslots : Memslots
        Its memslots (address space 0).
    slots_lock, lock : KLock
        ``kvm->slots_lock`` and ``kvm->lock``.
    """

    def __init__(self, kvm: "Kvm", vm_type: VmType, vm_id: int) -> None:
        self.kvm = kvm
        self.type = vm_type
        self.id = vm_id
        self.slots_lock = KLock("slots_lock")
        self.lock = KLock("kvm->lock")
        self.mmu_lock = KLock("mmu_lock")
        #: ``kvm->srcu``: vCPUs are readers while they handle an exit; a memslot delete or move
        #: waits for the readers inside (``synchronize_srcu``) after marking the slot invalid.
        self.srcu = Srcu("kvm->srcu")
        self.memslots = Memslots()
        self.policy: Policy = kvm.policy
        self.mem_attr = AttributeStore(kvm.store)      # kvm->mem_attr_array
        self.mmu_invalidate = InvalidateTracker()       # kvm->mmu_invalidate_*
        self.direct = DirectMmu()                       # the shared (direct) root's leaves
        self._hooks: Dict[str, List[Callable[..., Any]]] = {}
        self._counters: Dict[str, int] = {}
        self._mn_begun: List[bool] = []                 # per open MMU-notifier invalidation
        self.nr_open_invalidations = 0                  # begun by this VM's code, not yet ended
        self._refs = 1  # the fd
        self._fd_open = True
        self._destroyed = False
        self._bugged = False
        self._dead = False
        self.bug_reason = ""
        self.split_irqchip_pins: Optional[int] = None  # KVM_CAP_SPLIT_IRQCHIP args[0] once enabled
        self.hypercall_exit_enabled = 0                 # KVM_CAP_EXIT_HYPERCALL mask
        self.created_vcpus = 0
        self.max_vcpus = KVM_MAX_VCPUS                  # kvm->max_vcpus (a TD lowers it)
        self.fd = kvm.fds.install(self)
        kvm.host.register_vm(self)
        kvm.host.add_mmu_notifier(self)

    def __repr__(self) -> str:
        return (f"Vm(id={self.id}, type={self.type.name}, fd={self.fd}, refs={self._refs}, "
                f"slots={len(self.memslots)}, destroyed={self._destroyed})")

    # ------------------------------------------------------------------ properties
    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem``: SW_PROTECTED and TDX VMs."""
        return self.type in (VmType.SW_PROTECTED, VmType.TDX)

    @property
    def pinned_pfns(self) -> frozenset:
        """Frames the VM keeps pinned forever because a failed private unmap leaked them.

        A guest_memfd punch or release never gives them back to the host (upstream: the page
        reference taken at AUG is never dropped).
        """
        return frozenset()

    @property
    def gpa_shared_mask(self) -> int:
        """The GPA's shared bit (``kvm_gfn_direct_bits`` as a GPA): 0 for a VM without one."""
        return 0

    @property
    def has_readonly_mem(self) -> bool:
        """``kvm_arch_has_readonly_mem``: every VM without protected state (not a TD)."""
        return self.type != VmType.TDX

    @property
    def nr_memslot_as_ids(self) -> int:
        """``kvm_arch_nr_memslot_as_ids``: 1 with private memory, else the build's address spaces."""
        return 1 if self.has_private_mem else KVM_MAX_NR_ADDRESS_SPACES

    @property
    def users_count(self) -> int:
        """References held (``kvm->users_count``): the fd, each open guest_memfd."""
        return self._refs

    @property
    def is_destroyed(self) -> bool:
        """Whether the last reference went and the VM was torn down."""
        return self._destroyed

    @property
    def is_closed(self) -> bool:
        """Whether the VM fd was closed (the VM may live on through its guest_memfds)."""
        return not self._fd_open

    @property
    def is_bugged(self) -> bool:
        """``kvm->vm_bugged``: a KVM_BUG_ON fired (the VM is also dead)."""
        return self._bugged

    @property
    def is_dead(self) -> bool:
        """``kvm->vm_dead``: every later VM and vCPU ioctl fails EIO (close still works)."""
        return self._dead

    def bug(self, reason: str) -> None:
        """``kvm_vm_bugged``: mark the VM bugged and dead (KVM_BUG_ON); the first reason is kept."""
        if not self._bugged:
            self.bug_reason = reason
            self.kvm.host.events.emit("vm_bug", f"vm{self.id}", reason)
        self._bugged = True
        self._dead = True

    def mark_dead(self, reason: str) -> None:
        """``kvm_vm_dead``: every later ioctl and ``run()`` fails EIO (not a KVM bug)."""
        if not self._dead:
            self.bug_reason = self.bug_reason or reason
            self.kvm.host.events.emit("vm_dead", f"vm{self.id}", reason)
        self._dead = True

    # ------------------------------------------------------------------ counters, hooks
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the VM's counter ``name`` and to the host's."""
        self._counters[name] = self._counters.get(name, 0) + n
        self.kvm.host.count(name, n)

    @property
    def stats(self) -> Dict[str, int]:
        """A snapshot of the VM's ``nr_*`` counters (SPEC §3.2)."""
        return dict(sorted(self._counters.items()))

    def add_hook(self, name: str, fn: Callable[..., Any]) -> None:
        """Register a test-only observer ``fn(vm, **info)`` called at the point ``name``.

        Points: ``"pre_set_memory_attributes"`` (inside the invalidation window, after the zap,
        before the store: ``start``, ``end``, ``attributes``), ``"post_set_memory_attributes"``
        (after the store, before ``end``). Observers must not change the model.
        """
        if name not in HOOK_POINTS:
            msg = f"name={name!r} must be one of {HOOK_POINTS}"
            raise TdxValueError(msg, name="name", value=name)
        if not callable(fn):
            msg = f"fn={fn!r} must be callable"
            raise TdxTypeError(msg, name="fn", value=fn)
        self._hooks.setdefault(name, []).append(fn)

    def run_hooks(self, name: str, **info: Any) -> None:
        """Call the observers registered for ``name``."""
        for fn in self._hooks.get(name, ()):
            fn(self, **info)

    @classmethod
    def _pre_create(cls, kvm: "Kvm") -> Ret:
        """Check what ``KVM_CREATE_VM`` needs before it builds a VM of this class (``kvm_arch_init_vm``)."""
        return OK

    def state_bytes(self) -> bytes:
        """Canonical serialization for state hashes (no addresses, no ``hash()``).

        ``<QQqqBB type, id, fd, refs, fd_open, destroyed``, ``<BBqQQ bugged, dead, split irqchip
        pins (-1 off), hypercall mask, created vCPUs``, ``<Q`` slot count, then per slot in
        (as_id, id) order ``<IIQQIQqQB as_id, id, base_gfn, npages, flags, userspace_addr, gmem fd
        (-1 none), gmem_pgoff, invalid``; then ``<QQq`` the attribute store's and the
        invalidation tracker's ``state_hash()`` and the open invalidations, the direct root's
        ``state_bytes()``.
        """
        parts = [struct.pack("<QQqqBB", int(self.type), self.id, self.fd, self._refs, self._fd_open,
                             self._destroyed),
                 struct.pack("<BBqQQ", self._bugged, self._dead,
                             -1 if self.split_irqchip_pins is None else self.split_irqchip_pins,
                             self.hypercall_exit_enabled, self.created_vcpus),
                 struct.pack("<Q", len(self.memslots))]
        for s in self.memslots:
            parts.append(struct.pack("<IIQQIQqQB", s.as_id, s.id, s.base_gfn, s.npages, s.flags,
                                     s.userspace_addr, -1 if s.gmem is None else s.gmem.fd, s.gmem_pgoff,
                                     s.invalid))
        parts.append(struct.pack("<QQq", self.mem_attr.state_hash(), self.mmu_invalidate.state_hash(),
                                 self.nr_open_invalidations))
        parts.append(self.direct.state_bytes())
        return b"".join(parts)

    # ------------------------------------------------------------------ lifetime
    def get(self) -> None:
        """Take a reference (``kvm_get_kvm``); only a live VM can be referenced."""
        if self._destroyed:
            msg = f"VM {self.id} is destroyed"
            raise TdxValueError(msg, name="vm", value=self.id)
        self._refs += 1

    def put(self) -> None:
        """Drop a reference (``kvm_put_kvm``); the last one destroys the VM."""
        if self._refs <= 0:
            msg = f"VM {self.id}: reference count underflow"
            raise TdxValueError(msg, name="vm", value=self.id)
        self._refs -= 1
        if self._refs == 0:
            self._destroy_vm()

    # ------------------------------------------------------------------ mmu_invalidate
    def invalidate_begin_locked(self, ranges: List[Any]) -> None:
        """``kvm_mmu_invalidate_begin`` + ``range_add`` of each ``(slot, lo, hi)`` (mmu_lock write held).

        Counts the invalidation as open (``nr_open_invalidations``, what invariant S6e compares
        with ``in_progress``) and logs ``invalidate_begin`` per range.
        """
        inv = self.mmu_invalidate
        inv.begin(ranges[0][1], ranges[0][2])
        self.nr_open_invalidations += 1
        for _, lo, hi in ranges:
            inv.range_add(lo, hi)
            self.kvm.host.events.emit("invalidate_begin", f"vm{self.id}", lo, hi, inv.in_progress)

    def invalidate_end_locked(self, lo: int, hi: int) -> None:
        """``kvm_mmu_invalidate_end`` of one invalidation opened by :meth:`invalidate_begin_locked`."""
        self.mmu_invalidate.end(lo, hi)
        self.nr_open_invalidations -= 1
        self.kvm.host.events.emit("invalidate_end", f"vm{self.id}", lo, hi, self.mmu_invalidate.seq)

    # ------------------------------------------------------------------ unmapping
    def zap_shared_locked(self, start: int, end: int) -> int:
        """Unmap shared mappings of gfns ``[start, end)`` (``KVM_FILTER_SHARED``; mmu_lock write held)."""
        n = self.direct.zap_range(start, end)
        if n:
            self.count("nr_shared_zaps", n)
        return n

    def zap_private_locked(self, start: int, end: int) -> Generator[Any, Any, List[int]]:
        """Unmap private mappings of ``[start, end)`` (``KVM_FILTER_PRIVATE``; mmu_lock write held).

        Returns the gfns whose unmap failed (their pages stay pinned). A VM without a mirror
        root (DEFAULT, SW_PROTECTED: no vCPUs in the model) has nothing to unmap; the TD overrides
        this with the S-EPT zap.
        """
        return []
        yield  # a generator: the TD's zap waits (kicks)

    def _gmem_ranges(self, gmem: GuestMemfd, start: int, end: int) -> List[Any]:
        """``(slot, gfn_lo, gfn_hi)`` of each binding of ``gmem`` intersecting pages ``[start, end)``."""
        out = []
        for lo, hi, slot in gmem._bindings:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append((slot, slot.base_gfn + a - slot.gmem_pgoff, slot.base_gfn + b - slot.gmem_pgoff))
        return sorted(out, key=lambda r: r[1])

    def kvm_gmem_invalidate(self, gmem: GuestMemfd, start: int,
                            end: int) -> Generator[Any, Any, frozenset]:
        """``kvm_gmem_invalidate_begin``: unmap pages ``[start, end)`` of ``gmem`` from the guest.

        Over the file's bindings (none: nothing happens, not even a begin): under ``mmu_lock``
        write, ``mmu_invalidate`` begin + range_add per bound slot, then the private unmap. The
        matching :meth:`kvm_gmem_invalidate_end` runs after the file dropped its pages. Returns
        the page indices whose unmap failed: they stay pinned (the VM recorded them as leaked).

        Notes
        -----
        ``kvm_gmem_invalidate_begin()`` in ``virt/kvm/guest_memfd.c`` (6.18), called by
        ``kvm_gmem_punch_hole()`` and ``kvm_gmem_release()`` under the file's invalidate lock;
        tdx-facts §8.5.
        """
        ranges = self._gmem_ranges(gmem, start, end)
        if not ranges:
            return frozenset()
        pinned = set()
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            self.invalidate_begin_locked(ranges)
            for slot, lo, hi in ranges:
                for gfn in (yield from self.zap_private_locked(lo, hi)):
                    pinned.add(slot.gmem_pgoff + gfn - slot.base_gfn)
        finally:
            self.mmu_lock.release(owner, WRITE)
        return frozenset(pinned)

    def kvm_gmem_invalidate_end(self, gmem: GuestMemfd, start: int, end: int) -> Generator[Any, Any, None]:
        """``kvm_gmem_invalidate_end``: ``mmu_invalidate`` end if the begin found a bound slot."""
        ranges = self._gmem_ranges(gmem, start, end)
        if not ranges:
            return
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            self.invalidate_end_locked(ranges[0][1], ranges[0][2])
        finally:
            self.mmu_lock.release(owner, WRITE)

    def kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> Generator[Any, Any, None]:
        """Zap every mapping of ``slot`` (private and shared) under ``mmu_lock`` write.

        ``kvm_mmu_zap_memslot_leafs`` (6.18, the TDX path of ``kvm_arch_flush_shadow_memslot``)
        on a memslot delete or move; no ``mmu_invalidate`` pair (the slot is already invalid).
        """
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            self.zap_shared_locked(slot.base_gfn, slot.end_gfn)
            yield from self.zap_private_locked(slot.base_gfn, slot.end_gfn)
        finally:
            self.mmu_lock.release(owner, WRITE)

    # ------------------------------------------------------------------ MMU notifier (host userspace)
    def _hva_ranges(self, hva_start: int, hva_end: int) -> List[Any]:
        out = []
        for slot in self.memslots:
            s0 = slot.userspace_addr
            s1 = s0 + (slot.npages << PAGE_SHIFT)
            a, b = max(s0, hva_start), min(s1, hva_end)
            if a < b:
                lo = slot.base_gfn + ((a - s0) >> PAGE_SHIFT)
                hi = slot.base_gfn + ((b - s0 + PAGE_SIZE - 1) >> PAGE_SHIFT)
                out.append((slot, lo, hi))
        return out

    def invalidate_range_start(self, hva_start: int, hva_end: int) -> Generator[Any, Any, None]:
        """``kvm_mmu_notifier_invalidate_range_start``: unmap the shared mappings of the hva range.

        For each memslot whose userspace range intersects: under ``mmu_lock`` write,
        ``mmu_invalidate`` begin (once) + range_add, unmap with ``KVM_FILTER_SHARED`` — an hva
        never backs private memory (tdx-facts §8.5).
        """
        ranges = self._hva_ranges(hva_start, hva_end) if not self._destroyed else []
        self._mn_begun.append(bool(ranges))
        if not ranges:
            return
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            self.invalidate_begin_locked(ranges)
            for _, lo, hi in ranges:
                self.zap_shared_locked(lo, hi)
        finally:
            self.mmu_lock.release(owner, WRITE)

    def invalidate_range_end(self, hva_start: int, hva_end: int) -> Generator[Any, Any, None]:
        """``kvm_mmu_notifier_invalidate_range_end``: ``mmu_invalidate`` end if the start began one."""
        begun = self._mn_begun.pop() if self._mn_begun else False
        if not begun:
            return
        ranges = self._hva_ranges(hva_start, hva_end)
        lo, hi = (ranges[0][1], ranges[0][2]) if ranges else (0, 1)
        owner = yield Wait(self.mmu_lock, WRITE)
        try:
            self.invalidate_end_locked(lo, hi)
        finally:
            self.mmu_lock.release(owner, WRITE)

    def _destroy_vm(self) -> None:
        """``kvm_destroy_vm``: free the memslots, leave the host's registry.

        Every guest_memfd holds a reference, so none is open here and no slot is still bound.
        A subclass (the TD) runs its teardown first, then calls this.
        """
        for slot in list(self.memslots):
            self.memslots._remove(slot)
        self.kvm.host.remove_mmu_notifier(self)
        self.kvm.host.unregister_vm(self)
        self._destroyed = True

    def close(self) -> None:
        """``close(vm_fd)``: drop the handle's reference (the VM lives while a guest_memfd is open).

        Raises
        ------
        KvmError
            EBADF if the fd is already closed.
        """
        fd_call(self.kvm.host, "close", self.id, self._close_fd())

    def _close_fd(self) -> Ret:
        if not self._fd_open:
            return ebadf("VM fd")
        self._fd_open = False
        self.kvm.fds.remove(self.fd)
        self.put()
        return 0, ""

    # ------------------------------------------------------------------ ioctls
    def _guard(self, gen: Generator[Any, Any, Ret]) -> Generator[Any, Any, Ret]:
        if not self._fd_open:
            gen.close()
            return ebadf("VM fd")
        if self._dead:
            # kvm_vm_ioctl: a dead VM answers every ioctl -EIO
            gen.close()
            return fail(_errno.EIO, f"VM {self.id} is dead ({self.bug_reason or 'killed'})")
        return (yield from gen)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM fd (x86 ``kvm_vm_ioctl_enable_cap``, the caps the model has).

        Parameters
        ----------
        cap : int
            ``Cap.SPLIT_IRQCHIP`` (args[0] = reserved IOAPIC pins, ≤ 48) or
            ``Cap.EXIT_HYPERCALL`` (args[0] = mask of hypercalls exiting to userspace).
        args : int
            ``cap->args`` (u64 each, up to 4; missing ones are 0).
        flags : int
            ``cap->flags``: must be 0.

        Raises
        ------
        KvmError
            EINVAL: flags, an unknown cap, pins > 48, vCPUs already created, a mask bit outside
            ``KVM_EXIT_HYPERCALL_VALID_MASK``. EEXIST: the split irqchip is already enabled.
        """
        c = check_int("cap", cap, 0, 1 << 32)
        if len(args) > 4:
            msg = f"args={args!r}: kvm_enable_cap has 4 args"
            raise TdxValueError(msg, name="args", value=args)
        a = [_u(f"args[{i}]", v, 64) for i, v in enumerate(args)] + [0] * (4 - len(args))
        f = _u("flags", flags, 32)

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            if f:
                return fail(_errno.EINVAL, f"cap flags {f:#x} must be 0")
            if c == Cap.SPLIT_IRQCHIP:
                owner = yield Wait(self.lock, WRITE)
                try:
                    if a[0] > MAX_NR_RESERVED_IOAPIC_PINS:
                        return fail(_errno.EINVAL, f"args[0]={a[0]} > MAX_NR_RESERVED_IOAPIC_PINS")
                    if self.split_irqchip_pins is not None:
                        return fail(_errno.EEXIST, "an irqchip is already in the kernel")
                    if self.created_vcpus:
                        return fail(_errno.EINVAL, "vCPUs were already created")
                    self.split_irqchip_pins = a[0]
                    return OK
                finally:
                    self.lock.release(owner, WRITE)
            if c == Cap.EXIT_HYPERCALL:
                if a[0] & ~KVM_EXIT_HYPERCALL_VALID_MASK:
                    return fail(_errno.EINVAL, f"args[0]={a[0]:#x} has bits outside "
                                f"KVM_EXIT_HYPERCALL_VALID_MASK ({KVM_EXIT_HYPERCALL_VALID_MASK:#x})")
                self.hypercall_exit_enabled = a[0]
                return OK
            return fail(_errno.EINVAL, f"cap {c} cannot be enabled on this VM")

        ioctl(self.kvm.host, "KVM_ENABLE_CAP", self.id, self._guard(op()))

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: what this VM supports (0 = unknown cap)."""
        c = check_int("cap", cap, -(1 << 63), 1 << 63)

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            return self.kvm._check_extension(self, c), ""

        return ioctl(self.kvm.host, "KVM_CHECK_EXTENSION", self.id, self._guard(op()))

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: a new guest_memfd of ``size`` bytes.

        Parameters
        ----------
        size : int
            u64 as the struct holds it: a positive (as ``loff_t``) multiple of 4 KiB.
        flags : int
            ``GmemFlag`` bits; ``KVM_CAP_GUEST_MEMFD_FLAGS`` says which this VM accepts.

        Returns
        -------
        GuestMemfd
            Open, in ``kvm.fds``; it holds a VM reference until closed.

        Raises
        ------
        KvmError
            EINVAL: unsupported flags (checked first), size 0, negative or unaligned.
            EBADF: the VM fd is closed.
        """
        s = _u("size", size, 64)
        f = _u("flags", flags, 64)
        out: list = []

        def op() -> Generator[Any, Any, Ret]:
            ret, file = yield from kvm_gmem_create(self, s, f)
            out.append(file)
            return ret

        ioctl(self.kvm.host, "KVM_CREATE_GUEST_MEMFD", self.id, self._guard(op()))
        return out[0]

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (v1: no guest_memfd fields; flags LOG_DIRTY_PAGES|READONLY).

        Create (new slot id), move (new ``guest_phys_addr``), change flags, or delete
        (``memory_size == 0``) a memslot. Errors: see :meth:`set_user_memory_region2`.
        """
        mem = UserMemoryRegion(_u("slot", slot, 32), _u("flags", flags, 32),
                               _u("guest_phys_addr", guest_phys_addr, 64), _u("memory_size", memory_size, 64),
                               _u("userspace_addr", userspace_addr, 64))
        ioctl(self.kvm.host, "KVM_SET_USER_MEMORY_REGION", self.id,
              self._guard(kvm_set_memory_region(self, mem, v1=True)))

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd_offset: int = 0,
                                guest_memfd: Union[GuestMemfd, int] = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: create, move, re-flag or delete a memslot.

        Parameters
        ----------
        slot : int
            u32: address space in bits 16+ (only 0 exists), id below ``KVM_USER_MEM_SLOTS``.
        flags : int
            ``MemFlag`` bits.
        guest_phys_addr, memory_size, userspace_addr : int
            u64, page aligned; ``memory_size == 0`` deletes the slot. ``userspace_addr`` is
            checked as ``access_ok`` does (never for a mapping).
        guest_memfd_offset : int
            u64 byte offset into the file (GUEST_MEMFD only).
        guest_memfd : GuestMemfd or int
            The file, or any number from ``kvm.fds`` (u32): a plain memfd, the VM or KVM fd,
            a closed or unknown number — to express the kernel's EBADF/EINVAL rules.

        Raises
        ------
        KvmError
            EINVAL: bad flags, unaligned address/size/offset, bad slot id, wrap, a missing slot
            to delete, a change of an existing slot other than a move or LOG_DIRTY_PAGES, a
            guest_memfd that is not one / of another VM / too small / already bound there.
            EEXIST: the GPA range overlaps another slot. EBADF: no such open fd.

        Notes
        -----
        Order of checks and errnos: ``__kvm_set_memory_region`` and ``kvm_gmem_bind`` (6.18),
        verified against the real kernel by ``tests/kernel``. SPEC §3.2, §4.11.
        """
        mem = UserMemoryRegion(_u("slot", slot, 32), _u("flags", flags, 32),
                               _u("guest_phys_addr", guest_phys_addr, 64), _u("memory_size", memory_size, 64),
                               _u("userspace_addr", userspace_addr, 64),
                               _u("guest_memfd_offset", guest_memfd_offset, 64),
                               self._resolve_fd(guest_memfd))
        ioctl(self.kvm.host, "KVM_SET_USER_MEMORY_REGION2", self.id,
              self._guard(kvm_set_memory_region(self, mem, v1=False)))

    def _resolve_fd(self, fd: Union[GuestMemfd, int]) -> Optional[Any]:
        """Return what ``fget`` finds: the open object, or None (a closed file or an unknown number)."""
        if isinstance(fd, GuestMemfd):
            return None if fd.is_closed else fd
        if isinstance(fd, bool) or not hasattr(fd, "__index__"):
            msg = f"guest_memfd={fd!r} must be a GuestMemfd or an int fd (type={type(fd).__name__})"
            raise TdxTypeError(msg, name="guest_memfd", value=fd)
        return self.kvm.fds.get(_u("guest_memfd", fd, 32))

    # ------------------------------------------------------------------ memory attributes
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: set ``[address, address + size)`` to ``attributes``.

        Parameters
        ----------
        address, size : int
            u64 byte range (4 KiB aligned, non-empty, no wrap).
        attributes : int
            ``MemAttr`` bits (PRIVATE = 1 << 3; 0 = shared).
        flags : int
            u64, must be 0.

        Raises
        ------
        KvmError
            EINVAL (in order): flags, unsupported attributes (a VM without private memory
            supports none), empty or wrapping range, unaligned address or size. ENOMEM: the
            store could not reserve (nothing changed, no invalidation). EIO: the VM is dead.

        Notes
        -----
        ``kvm_vm_ioctl_set_mem_attributes`` (6.18); :mod:`tdxcore.kvm.attributes`; SPEC §4.6.
        """
        a = _u("address", address, 64)
        n = _u("size", size, 64)
        at = _u("attributes", attributes, 64)
        f = _u("flags", flags, 64)
        ioctl(self.kvm.host, "KVM_SET_MEMORY_ATTRIBUTES", self.id,
              self._guard(self.set_memory_attributes_gen_checked(a, n, at, f)))

    def set_memory_attributes_gen(self, address: int, size: int, attributes: int,
                                  flags: int = 0) -> Generator[Any, Any, Ret]:
        """Return the generator of :meth:`set_memory_attributes` for an actor (arguments checked now)."""
        return self._guard(self.set_memory_attributes_gen_checked(
            _u("address", address, 64), _u("size", size, 64), _u("attributes", attributes, 64),
            _u("flags", flags, 64)))

    def set_memory_attributes_gen_checked(self, address: int, size: int, attributes: int,
                                          flags: int) -> Generator[Any, Any, Ret]:
        """Validate (EINVAL as upstream) and run :func:`~tdxcore.kvm.attributes.kvm_vm_set_mem_attributes`."""
        ret, start, end = _attributes.check_set_memory_attributes(self, address, size, attributes, flags)
        if ret[0] < 0:
            return ret
        return (yield from _attributes.kvm_vm_set_mem_attributes(self, start, end, attributes))

    def get_memory_attributes(self, gfn: int) -> int:
        """``kvm_get_memory_attributes``: the attribute word of ``gfn`` (0 = shared)."""
        return self.mem_attr.get(check_int("gfn", gfn, 0, 1 << 52))

    def is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private``: the PRIVATE attribute is set (only on VMs with private memory)."""
        return bool(self.has_private_mem and self.mem_attr.get(gfn) & _PRIVATE)
