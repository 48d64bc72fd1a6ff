"""Memslots: ``KVM_SET_USER_MEMORY_REGION{,2}`` create / move / delete / flags, gmem binding.

One :class:`Memslots` per VM (address space 0 only: the model, like the 6.18 kernel it is checked
against, is built without SMM). :func:`kvm_set_memory_region` is the operation (a generator that
takes ``slots_lock``); it returns a :data:`~tdxcore.kvm.ioctl.Ret` and ``kvm/ioctl.py`` turns a
``-errno`` into ``KvmError``. The check order is upstream's, so when several rules fail the
first one in ``__kvm_set_memory_region()`` decides (the messages differ, the errno is the kernel's).

Mirrors ``kvm_vm_ioctl()`` (the v1 flag check), ``kvm_set_memory_region()``,
``check_memory_region_flags()``, ``__kvm_set_memory_region()``, ``kvm_set_memslot()`` in
``virt/kvm/kvm_main.c``, ``kvm_gmem_bind()``/``kvm_gmem_unbind()`` in ``virt/kvm/guest_memfd.c`` and
the CREATE/MOVE part of x86 ``kvm_arch_prepare_memory_region()`` (Linux 6.18); SPEC §3.2, §4.11.
"""

from __future__ import annotations

import bisect
import enum
import errno as _errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Generator, Iterator, List, Optional, Tuple

from tdxcore.constants import (
    KVM_MEM_SLOTS_NUM,
    KVM_MEM_V1_FLAGS,
    KVM_TASK_SIZE_MAX,
    KVM_USER_MEM_SLOTS,
    MODEL_MAXPHYADDR,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    MemFlag,
)
from tdxcore.kvm.gmem import GuestMemfd
from tdxcore.kvm.ioctl import OK, Ret, fail
from tdxcore.sched import PREEMPT, WRITE, Wait

if TYPE_CHECKING:
    from tdxcore.kvm.vm import Vm

__all__ = ["Memslot", "Memslots", "MrChange", "UserMemoryRegion", "kvm_set_memory_region", "kvm_mmu_max_gfn"]

_GM = int(MemFlag.GUEST_MEMFD)
_RO = int(MemFlag.READONLY)
_LOG = int(MemFlag.LOG_DIRTY_PAGES)


class MrChange(enum.Enum):
    """``enum kvm_mr_change``."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


@dataclass(frozen=True)
class UserMemoryRegion:
    """``struct kvm_userspace_memory_region2`` as the ioctl copied it (all fields raw u32/u64).

    ``guest_memfd`` is what the fd resolved to: the object in ``kvm.fds`` (or None for an
    unknown number) — resolution happens at copy time, the kind check in :func:`kvm_gmem_bind`.
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: Any = None


@dataclass(eq=False)
class Memslot:
    """One ``struct kvm_memory_slot``.

    ``gmem`` is the bound file (None without GUEST_MEMFD, or after the file was closed while
    bound); ``gmem_pgoff`` the first file page; ``invalid`` is ``KVM_MEMSLOT_INVALID`` (set while
    the slot is being deleted or moved, between the two halves of :func:`kvm_set_memslot`).
    """

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem: Optional[GuestMemfd] = None
    gmem_pgoff: int = 0
    invalid: bool = False

    @property
    def end_gfn(self) -> int:
        """One past the last gfn."""
        return self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """``__gfn_to_hva_memslot``: the userspace address of ``gfn`` (caller checked the range)."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)


class Memslots:
    """A VM's memslots (``kvm->memslots``), by ``(as_id, id)``; lookups skip nothing.

    :meth:`gfn_to_memslot` is O(log slots): a per-address-space index sorted by ``base_gfn``
    (slots of one address space never overlap: ``kvm_check_memslot_overlap``), rebuilt after
    :meth:`_install`, :meth:`_remove` and :meth:`_moved` (a MOVE rebases a slot in place), plus
    the last slot found (KVM's ``last_used_slot``), checked against its live range.
    """

    def __init__(self) -> None:
        self._slots: Dict[Tuple[int, int], Memslot] = {}
        self._index: Optional[Dict[int, Tuple[List[int], List[Memslot]]]] = None
        self._last: Optional[Memslot] = None

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Memslot]:
        """Slots in (as_id, id) order."""
        return iter([self._slots[k] for k in sorted(self._slots)])

    def id_to_memslot(self, as_id: int, id_: int) -> Optional[Memslot]:
        """Return the slot with this id, or None."""
        return self._slots.get((as_id, id_))

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Optional[Memslot]:
        """Return the slot whose range holds ``gfn``, or None (``__gfn_to_memslot``)."""
        s = self._last
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages and s.as_id == as_id:
            return s
        index = self._index
        if index is None:
            index = self._index = self._build_index()
        space = index.get(as_id)
        if space is None:
            return None
        i = bisect.bisect_right(space[0], gfn) - 1
        if i < 0:
            return None
        s = space[1][i]
        if gfn < s.base_gfn + s.npages:
            self._last = s
            return s
        return None

    def _build_index(self) -> Dict[int, Tuple[List[int], List[Memslot]]]:
        spaces: Dict[int, List[Memslot]] = {}
        for s in self._slots.values():
            spaces.setdefault(s.as_id, []).append(s)
        index = {}
        for as_id, slots in spaces.items():
            slots.sort(key=lambda m: m.base_gfn)
            index[as_id] = ([m.base_gfn for m in slots], slots)
        return index

    def _moved(self) -> None:
        """Drop the lookup index: a slot was added, removed or rebased in place (MOVE)."""
        self._index = None
        self._last = None

    def overlaps(self, as_id: int, id_: int, start: int, end: int) -> Optional[Memslot]:
        """Another slot of ``as_id`` intersecting ``[start, end)`` (``kvm_check_memslot_overlap``)."""
        for s in self._slots.values():
            if s.as_id == as_id and s.id != id_ and s.base_gfn < end and start < s.end_gfn:
                return s
        return None

    def _install(self, slot: Memslot) -> None:
        self._slots[(slot.as_id, slot.id)] = slot
        self._moved()

    def _remove(self, slot: Memslot) -> None:
        del self._slots[(slot.as_id, slot.id)]
        self._moved()


def kvm_mmu_max_gfn() -> int:
    """Largest gfn a memslot may reach: the model host's MAXPHYADDR (x86 ``kvm_mmu_max_gfn``)."""
    return (1 << (MODEL_MAXPHYADDR - PAGE_SHIFT)) - 1


def check_memory_region_flags(vm: "Vm", mem: UserMemoryRegion) -> Ret:
    """Flag rules (``check_memory_region_flags``, 6.18).

    LOG_DIRTY_PAGES always; GUEST_MEMFD for every VM type (``CONFIG_KVM_GUEST_MEMFD``: a DEFAULT
    VM binds guest_memfd too, checked against the real kernel) but then not LOG_DIRTY_PAGES;
    READONLY only without GUEST_MEMFD and only where the VM has read-only memory (not a TD).
    """
    valid = _LOG | _GM
    if mem.flags & _GM:
        valid &= ~_LOG
    if vm.has_readonly_mem and not mem.flags & _GM:
        valid |= _RO
    if mem.flags & ~valid:
        return fail(_errno.EINVAL, f"flags {mem.flags:#x} outside valid {valid:#x}")
    return OK


def kvm_set_memory_region(vm: "Vm", mem: UserMemoryRegion, v1: bool) -> Generator[Any, Any, Ret]:
    """Do one ``KVM_SET_USER_MEMORY_REGION`` (``v1``) or ``..._REGION2``; take ``slots_lock``.

    Notes
    -----
    The v1 ioctl rejects flags outside LOG_DIRTY_PAGES|READONLY before anything else
    (``kvm_vm_ioctl``); then the user slot id bound (``kvm_set_memory_region``), then the rest
    under ``slots_lock`` in :func:`_set_memory_region_locked`.
    """
    if v1 and mem.flags & ~KVM_MEM_V1_FLAGS:
        return fail(_errno.EINVAL, f"flags {mem.flags:#x} are not allowed in the v1 ioctl")
    if (mem.slot & 0xFFFF) >= KVM_USER_MEM_SLOTS:
        return fail(_errno.EINVAL,
                    f"slot id {mem.slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    owner = yield Wait(vm.slots_lock, WRITE)
    try:
        return (yield from _set_memory_region_locked(vm, mem))
    finally:
        vm.slots_lock.release(owner, WRITE)


def _set_memory_region_locked(vm: "Vm", mem: UserMemoryRegion) -> Generator[Any, Any, Ret]:
    """``__kvm_set_memory_region``: caller holds ``slots_lock``."""
    r = check_memory_region_flags(vm, mem)
    if r[0]:
        return r
    as_id, id_ = mem.slot >> 16, mem.slot & 0xFFFF
    size, gpa, uaddr = mem.memory_size, mem.guest_phys_addr, mem.userspace_addr
    if size & (PAGE_SIZE - 1):
        return fail(_errno.EINVAL, f"memory_size {size:#x} is not page aligned")
    if gpa & (PAGE_SIZE - 1):
        return fail(_errno.EINVAL, f"guest_phys_addr {gpa:#x} is not page aligned")
    if uaddr & (PAGE_SIZE - 1):
        return fail(_errno.EINVAL, f"userspace_addr {uaddr:#x} is not page aligned")
    if uaddr + size > KVM_TASK_SIZE_MAX:  # access_ok: no wrap, end within the user half
        return fail(_errno.EINVAL, f"userspace_addr {uaddr:#x} + memory_size {size:#x} is not a user range")
    if mem.flags & _GM and (mem.guest_memfd_offset & (PAGE_SIZE - 1)
                            or mem.guest_memfd_offset + size > U64_MAX):
        return fail(_errno.EINVAL, f"guest_memfd_offset {mem.guest_memfd_offset:#x} is unaligned or wraps")
    if as_id >= vm.nr_memslot_as_ids or id_ >= KVM_MEM_SLOTS_NUM:
        return fail(_errno.EINVAL, f"slot {mem.slot:#x}: address space {as_id} or id {id_} out of range")
    if gpa + size > U64_MAX:
        return fail(_errno.EINVAL, f"guest_phys_addr {gpa:#x} + memory_size {size:#x} wraps")

    old = vm.memslots.id_to_memslot(as_id, id_)
    if size == 0:
        if old is None or not old.npages:
            return fail(_errno.EINVAL, f"slot {id_} to delete does not exist")
        yield from kvm_set_memslot(vm, old, None, MrChange.DELETE)
        return OK

    base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    if old is None:
        change = MrChange.CREATE
    else:
        if mem.flags & _GM:
            return fail(_errno.EINVAL, f"slot {id_} exists: guest_memfd slots can only be deleted")
        if uaddr != old.userspace_addr or npages != old.npages or (mem.flags ^ old.flags) & (_RO | _GM):
            return fail(_errno.EINVAL, f"slot {id_} exists: userspace_addr, size, READONLY and GUEST_MEMFD "
                                       "cannot change")
        if base_gfn != old.base_gfn:
            change = MrChange.MOVE
        elif mem.flags != old.flags:
            change = MrChange.FLAGS_ONLY
        else:
            return OK
    if change in (MrChange.CREATE, MrChange.MOVE):
        other = vm.memslots.overlaps(as_id, id_, base_gfn, base_gfn + npages)
        if other is not None:
            return fail(_errno.EEXIST,
                        f"gfn range [{base_gfn:#x}, {base_gfn + npages:#x}) overlaps slot {other.id}")

    new = Memslot(as_id, id_, base_gfn, npages, mem.flags, uaddr)
    if mem.flags & _GM:
        f = mem.guest_memfd if isinstance(mem.guest_memfd, GuestMemfd) else None
        if f is not None:
            # kvm_gmem_bind takes the file's invalidate lock: no punch is between its
            # invalidate begin and end while the bindings change
            fo = yield Wait(f.invalidate_lock, WRITE)
            try:
                r = kvm_gmem_bind(vm, new, mem.guest_memfd, mem.guest_memfd_offset)
            finally:
                f.invalidate_lock.release(fo, WRITE)
        else:
            r = kvm_gmem_bind(vm, new, mem.guest_memfd, mem.guest_memfd_offset)
        if r[0]:
            return r
    r = kvm_arch_prepare_memory_region(vm, old, new, change)
    if r[0]:
        if new.gmem is not None:
            new.gmem._unbind(new)
        return r
    yield from kvm_set_memslot(vm, old, new, change)
    return OK


def kvm_gmem_bind(vm: "Vm", slot: Memslot, file: Any, offset: int) -> Ret:
    """Bind ``slot`` to ``file`` at byte ``offset`` (``kvm_gmem_bind``, 6.18).

    EBADF: no open file at that number. EINVAL: not a guest_memfd (a plain memfd, the VM or KVM
    fd), another VM's guest_memfd, an unaligned offset, a range past the file's end, or a range
    any page of which is already bound.
    """
    if file is None:
        return fail(_errno.EBADF, "guest_memfd is not an open fd")
    if not isinstance(file, GuestMemfd):
        return fail(_errno.EINVAL, f"guest_memfd is not a guest_memfd ({type(file).__name__})")
    if file.vm is not vm:
        return fail(_errno.EINVAL, f"guest_memfd belongs to VM {file.vm.id}, not VM {vm.id}")
    size = slot.npages << PAGE_SHIFT
    if offset >> 63 or offset & (PAGE_SIZE - 1) or offset + size > file.size:
        return fail(_errno.EINVAL, f"guest_memfd range [{offset:#x}, {offset + size:#x}) is unaligned or "
                                   f"past the file end {file.size:#x}")
    start = offset >> PAGE_SHIFT
    # filemap_invalidate_lock is held by the caller's slots_lock section in upstream; the model's
    # binding update is atomic between yields, so no separate wait is needed here.
    if not file._bind_locked(slot, start, start + slot.npages):
        return fail(_errno.EINVAL,
                    f"guest_memfd pages [{start:#x}, {start + slot.npages:#x}) are already bound")
    slot.gmem, slot.gmem_pgoff = file, start
    return OK


def kvm_arch_prepare_memory_region(vm: "Vm", old: Optional[Memslot], new: Memslot, change: MrChange) -> Ret:
    """x86 CREATE/MOVE check: the slot must end at or below :func:`kvm_mmu_max_gfn`."""
    if change in (MrChange.CREATE, MrChange.MOVE) and new.end_gfn - 1 > kvm_mmu_max_gfn():
        return fail(_errno.EINVAL, f"gfn {new.end_gfn - 1:#x} is past the max gfn {kvm_mmu_max_gfn():#x}")
    return OK


def kvm_set_memslot(vm: "Vm", old: Optional[Memslot], new: Optional[Memslot],
                    change: MrChange) -> Generator[Any, Any, None]:
    """Commit a change (caller holds ``slots_lock``; the checks have passed).

    DELETE and MOVE first mark the old slot invalid and yield (upstream installs an invalid
    copy and waits for SRCU readers: a fault that sees the slot then must not retry locally),
    then commit. This is the one place a memslot changes; the MMU layer adds its zap here.
    """
    if change in (MrChange.DELETE, MrChange.MOVE):
        assert old is not None
        old.invalid = True
        yield PREEMPT
        # synchronize_srcu: wait for every vCPU still handling an exit under the old slots
        yield from vm.srcu.synchronize()
        # kvm_arch_flush_shadow_memslot: no mapping of the old slot may survive it
        yield from vm.kvm_arch_flush_shadow_memslot(old)
    if change is MrChange.DELETE:
        assert old is not None
        if old.gmem is not None:
            f = old.gmem
            fo = yield Wait(f.invalidate_lock, WRITE)     # kvm_gmem_unbind
            try:
                f._unbind(old)
            finally:
                f.invalidate_lock.release(fo, WRITE)
            old.gmem = None
        vm.memslots._remove(old)
    elif change is MrChange.CREATE:
        assert new is not None
        vm.memslots._install(new)
    else:
        assert old is not None and new is not None
        old.base_gfn, old.flags, old.invalid = new.base_gfn, new.flags, False
        vm.memslots._moved()
