"""``KVM_SET_MEMORY_ATTRIBUTES``: validation and the set algorithm (SPEC §4.6; tdx-facts §7).

:func:`check_set_memory_attributes` is the ioctl's validation in upstream order;
:func:`kvm_vm_set_mem_attributes` the change itself, a generator per SPEC §5:

1. ``slots_lock``;
2. the whole range already holds exactly the attributes → return 0 with no invalidation;
3. reserve storage for every gfn first (``xa_reserve``): a failure (ENOMEM) changes nothing —
   the seed's rollback bug (an unsigned index loop that misses ``start``) cannot exist because
   nothing is ever rolled back;
4. pre pass over the memslots the range intersects (none → no begin/end at all): under
   ``mmu_lock`` write, ``mmu_invalidate`` begin + range_add per slot, then unmap the old side
   (to PRIVATE: shared mappings; to shared: private mappings — for a TD the S-EPT zap);
5. store (cannot fail: reserved);
6. post pass: under ``mmu_lock`` write, ``mmu_invalidate`` end.

Mirrors ``kvm_vm_ioctl_set_mem_attributes`` / ``kvm_vm_set_mem_attributes`` /
``kvm_handle_gfn_range`` of ``virt/kvm/kvm_main.c`` and the x86 pre hook (6.18). The huge-page
MIXED tracking of the post hook has no effect in the model: private mappings are 4K only (§4.12).
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Generator, List, Tuple

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, MemAttr
from tdxcore.kvm.ioctl import OK, Ret, fail
from tdxcore.sched import PREEMPT, WRITE, Wait

if TYPE_CHECKING:
    from tdxcore.kvm.vm import Vm

__all__ = ["check_set_memory_attributes", "kvm_vm_set_mem_attributes", "supported_attributes",
           "slot_ranges"]

_U64 = (1 << 64) - 1
#: ``mask`` of the no-op check: every attribute bit (restricted to the supported ones upstream).
_ALL = _U64


def supported_attributes(vm: "Vm") -> int:
    """``kvm_supported_mem_attributes``: PRIVATE for a VM with private memory, else 0."""
    return int(MemAttr.PRIVATE) if vm.has_private_mem else 0


def check_set_memory_attributes(vm: "Vm", address: int, size: int, attributes: int,
                                flags: int) -> Tuple[Ret, int, int]:
    """Validate as ``kvm_vm_ioctl_set_mem_attributes`` does (all -EINVAL, in this order).

    flags ≠ 0; attributes outside the supported mask; size 0 or ``address + size`` wraps;
    address or size not 4 KiB aligned. Returns ``(ret, start_gfn, end_gfn)``.
    """
    if flags:
        return fail(_errno.EINVAL, f"flags {flags:#x} must be 0"), 0, 0
    sup = supported_attributes(vm)
    if attributes & ~sup:
        return fail(_errno.EINVAL, f"attributes {attributes:#x} outside the supported {sup:#x}"), 0, 0
    if size == 0 or address + size - 1 > _U64:
        return fail(_errno.EINVAL, f"address {address:#x} size {size:#x}: empty or wraps"), 0, 0
    if address & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        return fail(_errno.EINVAL, f"address {address:#x} / size {size:#x} not 4 KiB aligned"), 0, 0
    return OK, address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT


def slot_ranges(vm: "Vm", start: int, end: int) -> List[Tuple[Any, int, int]]:
    """``(slot, lo, hi)`` for each memslot intersecting ``[start, end)``, clipped, in slot order."""
    out = []
    for slot in vm.memslots:
        lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
        if lo < hi:
            out.append((slot, lo, hi))
    return out


def kvm_vm_set_mem_attributes(vm: "Vm", start: int, end: int, attributes: int) -> Generator[Any, Any, Ret]:
    """Set ``[start, end)`` to ``attributes`` (validated) — see the module docstring."""
    owner = yield Wait(vm.slots_lock, WRITE)
    try:
        if vm.mem_attr.has_range(start, end, _ALL, attributes):
            vm.count("nr_attribute_noops")
            return OK
        try:
            vm.mem_attr.reserve(start, end)
        except MemoryError as e:
            return fail(_errno.ENOMEM, f"reserving attribute storage: {e}")
        ranges = slot_ranges(vm, start, end)
        to_private = bool(attributes & MemAttr.PRIVATE)
        if ranges:
            mo = yield Wait(vm.mmu_lock, WRITE)
            try:
                vm.invalidate_begin_locked(ranges)
                for _, lo, hi in ranges:
                    # kvm_arch_pre_set_memory_attributes: unmap only the old side
                    if to_private:
                        vm.zap_shared_locked(lo, hi)
                    else:
                        yield from vm.zap_private_locked(lo, hi)
            finally:
                vm.mmu_lock.release(mo, WRITE)
        vm.run_hooks("pre_set_memory_attributes", start=start, end=end, attributes=attributes)
        yield PREEMPT                       # the invalidation window: faults here must retry
        vm.mem_attr.set_range(start, end, attributes)
        vm.run_hooks("post_set_memory_attributes", start=start, end=end, attributes=attributes)
        vm.count("nr_attribute_changes")
        vm.kvm.host.events.emit("set_memory_attributes", f"vm{vm.id}", start, end, attributes)
        if ranges:
            mo = yield Wait(vm.mmu_lock, WRITE)
            try:
                vm.invalidate_end_locked(ranges[0][1], ranges[0][2])
            finally:
                vm.mmu_lock.release(mo, WRITE)
        return OK
    finally:
        vm.slots_lock.release(owner, WRITE)
