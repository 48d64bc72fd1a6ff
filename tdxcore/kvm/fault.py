"""The TDP page-fault path of a TD and its EPT-violation handler.

SPEC §2, §4.1; tdx-facts §3.8, §7.8, §8.4, §9.2.

:func:`kvm_mmu_page_fault` is one attempt, as ``kvm_tdp_page_fault`` → ``kvm_faultin_pfn`` →
``kvm_tdp_mmu_map`` do for a TD (6.18):

1. memslot lookup (an INVALID slot — being deleted or moved — is RET_PF_RETRY);
2. the attribute check: the access's private/shared kind against ``kvm_mem_is_private``; a
   mismatch, or a private access to a slot without guest_memfd, prepares
   ``KVM_EXIT_MEMORY_FAULT`` and returns ``-EFAULT``; a shared access with no slot is MMIO
   (RET_PF_EMULATE: the vCPU gets the #VE that the guest turns into a TDVMCALL<MMIO>);
3. snapshot ``mmu_invalidate_seq``, then resolve the page (guest_memfd for private, the slot's
   userspace page for shared) — a preemption point, the race window of scenario A04 — and the
   lockless ``retry_gfn_unsafe`` pre-check;
4. ``mmu_lock`` for read, the locked ``retry_gfn`` (RET_PF_RETRY, ``nr_fault_retries``), then the
   map: the mirror (freeze, SEPT.ADD for missing levels, AUG; -EBUSY → RET_PF_RETRY) or the
   direct root.

:func:`tdx_handle_ept_violation` is ``tdx_handle_ept_violation`` (6.18): a private access to a
PENDING page with SEPT_VE_DISABLE kills the VM (-EIO); otherwise it retries a RET_PF_RETRY fault
*locally* under :attr:`Policy.local_retry`, yielding every try, until the result is not a retry,
an event or signal is pending, the VM is dead (-EIO), or the memslot is invalid (the 6.18 fix) —
bounded by ``MAX_LOCAL_RETRIES`` as a livelock guard (SPEC §4.1). Results are ``RET_PF_*`` (≥ 0)
or ``-errno``.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Generator, Optional

from tdxcore.constants import (
    MAX_LOCAL_RETRIES,
    MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    ExitReason,
    MemFlag,
)
from tdxcore.errors import HostError, InvariantViolation
from tdxcore.sched import PREEMPT, READ

if TYPE_CHECKING:
    from tdxcore.kvm.vcpu import Vcpu

__all__ = ["RET_PF_CONTINUE", "RET_PF_RETRY", "RET_PF_EMULATE", "RET_PF_INVALID", "RET_PF_FIXED",
           "RET_PF_SPURIOUS", "MMIO_SPTE", "kvm_mmu_page_fault", "tdx_handle_ept_violation",
           "prepare_memory_fault_exit"]

# enum ret_pf (arch/x86/kvm/mmu/mmu_internal.h)
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_WRITE_PROTECTED = 3
RET_PF_INVALID = 4
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6

#: Direct-root value of an MMIO SPTE (no frame: the guest gets a #VE and asks for MMIO).
MMIO_SPTE = -1

_GUEST_MEMFD = int(MemFlag.GUEST_MEMFD)     # an int: a flag enum's ``&`` runs Python code


def prepare_memory_fault_exit(vcpu: "Vcpu", gfn: int, private: bool) -> int:
    """``kvm_mmu_prepare_memory_fault_exit``: fill ``kvm_run.memory_fault``; return ``-EFAULT``.

    ``flags`` is PRIVATE iff the *access* was private; ``gpa`` is the gfn without the shared bit.
    """
    run = vcpu.kvm_run
    run.exit_reason = ExitReason.MEMORY_FAULT
    run.memory_fault.flags = MEMORY_EXIT_FLAG_PRIVATE if private else 0
    run.memory_fault.gpa = gfn << PAGE_SHIFT
    run.memory_fault.size = PAGE_SIZE
    run.ret = -_errno.EFAULT
    vcpu._count("nr_memory_fault_exits")
    vcpu.vm.kvm.host.events.emit("memory_fault_exit", vcpu.actor, gfn << PAGE_SHIFT,
                                 run.memory_fault.flags, PAGE_SIZE)
    return -_errno.EFAULT


def _faultin_private(vcpu: "Vcpu", slot: Any, gfn: int) -> Optional[int]:
    """``kvm_gmem_get_pfn``: the file page for ``gfn``, allocated on first use; None = no file."""
    f = slot.gmem
    if f is None or f.is_closed:
        return None
    index = slot.gmem_pgoff + gfn - slot.base_gfn
    pfn = f.pfn_of(index)
    if pfn is None:
        ret = f._allocate_locked(index, index + 1)
        if ret[0] < 0:
            return ret[0]           # -ENOMEM
        pfn = f.pfn_of(index)
    return pfn


def kvm_mmu_page_fault(vcpu: "Vcpu", gpa: int, private: bool) -> Generator[Any, Any, int]:
    """One fault attempt for ``gpa`` (see the module docstring); RET_PF_* or -errno."""
    vm = vcpu.vm
    host = vm.kvm.host
    gfn = (gpa & ~vm.gpa_shared_mask) >> PAGE_SHIFT
    vcpu._count("nr_faults")
    slot = vm.memslots.gfn_to_memslot(gfn)
    if slot is not None and slot.invalid:
        return RET_PF_RETRY
    if private != vm.is_private(gfn):
        return prepare_memory_fault_exit(vcpu, gfn, private)
    if private and (slot is None or not slot.flags & _GUEST_MEMFD):
        return prepare_memory_fault_exit(vcpu, gfn, private)
    inv = vm.mmu_invalidate
    seq = inv.seq
    mmu_lock = vm.mmu_lock
    if not private and slot is None:
        # kvm_handle_noslot_fault: an MMIO SPTE, so the guest takes a #VE and asks by TDVMCALL
        owner = yield mmu_lock.wait_read
        try:
            if inv.retry_gfn(seq, gfn):
                vcpu._count("nr_fault_retries")
                return RET_PF_RETRY
            vm.direct.install(gfn, MMIO_SPTE)
        finally:
            mmu_lock.release(owner, READ)
        return RET_PF_EMULATE
    yield PREEMPT                       # resolving the pfn: invalidations may run meanwhile
    if inv.retry_gfn_unsafe(seq, gfn):
        vcpu._count("nr_fault_retries")
        return RET_PF_RETRY
    if private:
        pfn = _faultin_private(vcpu, slot, gfn)
        if pfn is None:
            return prepare_memory_fault_exit(vcpu, gfn, private)
        if pfn < 0:
            prepare_memory_fault_exit(vcpu, gfn, private)
            return pfn
    else:
        assert slot is not None
        try:
            pfn = host.fault_in(slot.gfn_to_hva(gfn))
        except HostError as e:
            if e.errno == _errno.ENOMEM:
                return -_errno.ENOMEM
            return prepare_memory_fault_exit(vcpu, gfn, private)   # hva not mapped: -EFAULT
    owner = yield mmu_lock.wait_read
    try:
        if inv.retry_gfn(seq, gfn):
            vcpu._count("nr_fault_retries")
            result = RET_PF_RETRY
        elif private:
            r = yield from vm.mmu.map_private_locked(gfn, pfn, vcpu.actor)
            result = (RET_PF_FIXED if r == 0 else RET_PF_RETRY if r == -_errno.EBUSY else r)
            if r == -_errno.EEXIST:
                vm.bug(f"gfn {gfn:#x} is mapped to another page than its guest_memfd page {pfn:#x}")
                result = -_errno.EIO
        else:
            vm.direct.install(gfn, pfn)
            result = RET_PF_FIXED
    finally:
        mmu_lock.release(owner, READ)
    host.events.emit("fault", vcpu.actor, gpa, int(private), seq, result)
    return result


def tdx_handle_ept_violation(vcpu: "Vcpu", gpa: int, pending: bool) -> Generator[Any, Any, int]:
    """``tdx_handle_ept_violation`` (6.18) with the policy's local retry; RET_PF_* or -errno."""
    vm = vcpu.vm
    private = not gpa & vm.gpa_shared_mask
    if private and pending:
        # tdx_is_sept_violation_unexpected_pending: SEPT_VE_DISABLE and the page never accepted
        vm.mark_dead(f"Guest access before accepting {gpa:#x}")
        return -_errno.EIO
    gfn = (gpa & ~vm.gpa_shared_mask) >> PAGE_SHIFT
    retries = 0
    while True:
        r = yield from kvm_mmu_page_fault(vcpu, gpa, private)
        if r != RET_PF_RETRY or not private or not vm.policy.local_retry:
            return r
        if vcpu.has_pending_event or vcpu.has_pending_signal:
            return r
        if vm.is_dead:
            return -_errno.EIO
        slot = vm.memslots.gfn_to_memslot(gfn)
        if slot is not None and slot.invalid and vm.policy.local_retry_memslot_check:
            return r                   # 6.18: let the memslot update finish (drop SRCU)
        retries += 1
        vcpu._count("nr_local_retries")
        if retries > MAX_LOCAL_RETRIES:
            msg = (f"vCPU {vcpu.vcpu_id}: {retries} local retries of the fault on {gpa:#x} "
                   f"(MAX_LOCAL_RETRIES {MAX_LOCAL_RETRIES}): livelock")
            inv = "S6d"
            raise InvariantViolation(inv, msg, gfn=gfn, event_index=len(vm.kvm.host.events) - 1)
        yield PREEMPT                   # cond_resched()
