"""Selftest-style helpers (``tdx.helpers``, SPEC §3.2): a RUNNABLE TD in one call.

The vocabulary of the KVM selftests' TDX library (``tools/testing/selftests/kvm/lib/x86/tdx``,
``tdx_util.c``): :func:`td_create` runs, through the public ioctl methods only, KVM_CREATE_VM
(TDX) → KVM_CAP_SPLIT_IRQCHIP → KVM_TDX_INIT_VM (:func:`td_initialize`) → guest_memfd + host mmap
+ KVM_SET_USER_MEMORY_REGION2 (:func:`vm_userspace_mem_region_add`) → KVM_CREATE_VCPU +
KVM_TDX_INIT_VCPU per vCPU → KVM_TDX_INIT_MEM_REGION for the initial pages + KVM_TDX_FINALIZE_VM
(:func:`td_finalize`). :func:`vcpu_run_until_hlt` is the selftests' run loop.

:func:`vm_set_memory_attributes` is the selftests' wrapper of KVM_SET_MEMORY_ATTRIBUTES;
:func:`handle_memory_conversion` does what QEMU does on a ``KVM_EXIT_MEMORY_FAULT`` or a MapGPA
``KVM_EXIT_HYPERCALL`` (``kvm_convert_memory``): set the attributes, discard the side the range
left (punch the guest_memfd pages, or ``MADV_DONTNEED`` the shared userspace pages) and, for
MapGPA, answer ``hypercall.ret``.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Tuple

from tdxcore.constants import (
    HC,
    MAP_GPA_RANGE_ENCRYPTED,
    MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    Cap,
    ExitReason,
    FallocFlag,
    MemAttr,
    MemFlag,
    VmType,
)
from tdxcore.errors import TdxError, TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.gmem import GuestMemfd
from tdxcore.kvm.run import KvmRun
from tdxcore.kvm.tdx_vm import TdxVm
from tdxcore.kvm.vcpu import Vcpu

__all__ = ["Td", "InitialRegion", "UnexpectedExit", "td_create", "td_initialize", "td_finalize",
           "vm_userspace_mem_region_add", "vcpu_run_until_hlt", "vm_set_memory_attributes",
           "handle_memory_conversion", "SPLIT_IRQCHIP_PINS"]

#: IOAPIC pins the selftests pass with KVM_CAP_SPLIT_IRQCHIP (``KVM_IRQCHIP_NUM_PINS``).
SPLIT_IRQCHIP_PINS = 24


class UnexpectedExit(TdxError):
    """:func:`vcpu_run_until_hlt` saw an exit other than HLT (``TEST_ASSERT_KVM_EXIT_REASON``)."""


class InitialRegion(NamedTuple):
    """One KVM_TDX_INIT_MEM_REGION call: ``source`` bytes (whole pages) added at ``gpa``."""

    gpa: int
    source: bytes
    measure: bool = True


class Td(NamedTuple):
    """What :func:`td_create` built: the VM, its vCPUs (id order) and its guest_memfd (or None)."""

    vm: TdxVm
    vcpus: Tuple[Vcpu, ...]
    gmem: Optional[GuestMemfd]

    def close(self) -> None:
        """Drop every reference the TD holds (vCPU fds, guest_memfd, VM fd): the VM is destroyed."""
        for v in self.vcpus:
            if not v.is_closed:
                v.close()
        if self.gmem is not None and not self.gmem.is_closed:
            self.gmem.close()
        if not self.vm.is_closed:
            self.vm.close()


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        msg = f"{name}={value!r} must be a bool"
        raise TdxTypeError(msg, name=name, value=value)
    return value


def td_initialize(vm: TdxVm, *, gpaw: int = 48, attributes: int = 0, **init_vm: Any) -> None:
    """Enable KVM_CAP_SPLIT_IRQCHIP (24 pins) and run KVM_TDX_INIT_VM.

    Parameters
    ----------
    vm : TdxVm
        A TD not yet initialized.
    gpaw, attributes, **init_vm
        Passed to :meth:`TdxVm.init_vm`.

    Raises
    ------
    KvmError
        As :meth:`TdxVm.enable_cap` and :meth:`TdxVm.init_vm`.

    Notes
    -----
    ``td_initialize`` of the selftests' ``tdx_util.c`` (split irqchip first: KVM_CREATE_VCPU of a
    TD needs it).
    """
    if not isinstance(vm, TdxVm):
        msg = f"vm must be a TdxVm, not {type(vm).__name__}"
        raise TdxTypeError(msg, name="vm", value=type(vm).__name__)
    if vm.split_irqchip_pins is None:
        vm.enable_cap(Cap.SPLIT_IRQCHIP, SPLIT_IRQCHIP_PINS)
    vm.init_vm(gpaw=gpaw, attributes=attributes, **init_vm)


def vm_userspace_mem_region_add(vm: TdxVm, slot: int, gpa: int, size: int, *,
                                private: bool = True) -> Optional[GuestMemfd]:
    """Add memslot ``slot`` of ``size`` bytes at ``gpa``, backed by a host mmap (+ a guest_memfd).

    Parameters
    ----------
    vm : TdxVm
        The VM.
    slot, gpa, size : int
        Slot id, first GPA and size (page aligned, ``size > 0``).
    private : bool
        Create a guest_memfd of ``size`` bytes, bind it (``KVM_MEM_GUEST_MEMFD``, offset 0) and set
        the range PRIVATE (what the TDX selftests' ``vm_mem_add`` + ``vm_mem_set_private`` do).

    Returns
    -------
    GuestMemfd or None
        The bound guest_memfd (the caller owns its reference), or None when ``private`` is False.

    Raises
    ------
    TdxValueError
        ``size`` is 0 or not page aligned (before any ioctl).
    KvmError
        As :meth:`Vm.create_guest_memfd` and :meth:`Vm.set_user_memory_region2`.
    """
    p = _bool("private", private)
    n = check_int("size", size, 1, 1 << 64)
    if n % PAGE_SIZE:
        msg = f"size={n:#x} is not 4 KiB aligned"
        raise TdxValueError(msg, name="size", value=n)
    gmem = vm.create_guest_memfd(n) if p else None
    try:
        uaddr = vm.kvm.host.mmap(n)
        vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD if p else 0, gpa, n, uaddr,
                                   guest_memfd_offset=0, guest_memfd=gmem if gmem is not None else 0)
        if p:
            vm.set_memory_attributes(gpa, n, MemAttr.PRIVATE)
    except BaseException:
        if gmem is not None:
            gmem.close()
        raise
    return gmem


def td_finalize(vm: TdxVm, initial: Iterable[InitialRegion] = ()) -> None:
    """KVM_TDX_INIT_MEM_REGION for each initial region (through vCPU 0), then KVM_TDX_FINALIZE_VM.

    Raises
    ------
    TdxValueError
        ``initial`` given but the VM has no vCPU, or a source that is not whole pages.
    KvmError
        As :meth:`Vcpu.init_mem_region` and :meth:`TdxVm.finalize_vm`.
    """
    regions = tuple(InitialRegion(*r) for r in initial)
    for r in regions:
        if len(r.source) == 0 or len(r.source) % PAGE_SIZE:
            msg = f"source of {len(r.source)} bytes for gpa {r.gpa:#x} is not a positive number of pages"
            raise TdxValueError(msg, name="initial", value=len(r.source))
    if regions and not vm.vcpus:
        msg = "KVM_TDX_INIT_MEM_REGION needs a vCPU: create one first"
        raise TdxValueError(msg, name="initial", value=len(regions))
    for r in regions:
        vm.vcpus[0].init_mem_region(r.source, r.gpa, len(r.source) // PAGE_SIZE, r.measure)
    vm.finalize_vm()


def td_create(kvm: Any, vcpus: int = 1, memory: int = 2 << 20, gpa: int = 4 << 30, private: bool = True,
              measure: bool = True, initial_pages: int = 1, source: Optional[bytes] = None,
              **init_vm: Any) -> Td:
    """Build a RUNNABLE TD in one call, as the selftests' ``td_create`` + ``td_initialize`` + ``td_finalize``.

    Parameters
    ----------
    kvm : Kvm
        The ``/dev/kvm`` of a host.
    vcpus : int
        Number of vCPUs (ids ``0..vcpus-1``), at least 1.
    memory : int
        Bytes of guest memory in slot 0 at ``gpa`` (page aligned).
    gpa : int
        First GPA of the memory (private half: below the shared bit).
    private : bool
        Back the slot with a guest_memfd (else a plain host mapping; then no initial pages).
    measure : bool
        Measure the initial pages (16 TDH.MR.EXTEND each).
    initial_pages : int
        Pages added with KVM_TDX_INIT_MEM_REGION at ``gpa`` (the guest image); 0 for none.
    source : bytes, optional
        The image, ``initial_pages`` whole pages; default a deterministic byte pattern.
    **init_vm
        Passed to :meth:`TdxVm.init_vm` (``gpaw``, ``attributes``, ``xfam``, ...).

    Returns
    -------
    Td
        ``(vm, vcpus, gmem)``; :meth:`Td.close` drops every reference (the VM is then destroyed).

    Raises
    ------
    TdxTypeError, TdxValueError
        Bad argument types or ranges (before any ioctl).
    KvmError
        From the first failing ioctl; the references taken so far are dropped first.
    """
    n = check_int("vcpus", vcpus, 1, 1 << 32)
    mem = check_int("memory", memory, 1, 1 << 64)
    g = check_int("gpa", gpa, 0, 1 << 64)
    p = _bool("private", private)
    m = _bool("measure", measure)
    pages = check_int("initial_pages", initial_pages, 0, (mem // PAGE_SIZE) + 1)
    if mem % PAGE_SIZE or g % PAGE_SIZE:
        msg = f"memory={mem:#x} and gpa={g:#x} must be 4 KiB aligned"
        bad = "memory" if mem % PAGE_SIZE else "gpa"
        raise TdxValueError(msg, name=bad, value=mem if mem % PAGE_SIZE else g)
    if pages and not p:
        msg = f"initial_pages={pages} needs private memory (private=False)"
        raise TdxValueError(msg, name="initial_pages", value=pages)
    if source is None:
        src = bytes(range(256)) * (16 * pages)
    elif not isinstance(source, (bytes, bytearray, memoryview)):
        msg = f"source must be bytes-like, not {type(source).__name__}"
        raise TdxTypeError(msg, name="source", value=type(source).__name__)
    else:
        src = bytes(source)
        if len(src) != pages * PAGE_SIZE:
            msg = f"source has {len(src)} bytes, not initial_pages * 4096 = {pages * PAGE_SIZE}"
            raise TdxValueError(msg, name="source", value=len(src))

    vm = kvm.create_vm(VmType.TDX)
    gmem: Optional[GuestMemfd] = None
    made: list[Vcpu] = []
    try:
        td_initialize(vm, **init_vm)
        gmem = vm_userspace_mem_region_add(vm, 0, g, mem, private=p)
        for i in range(n):
            made.append(vm.create_vcpu(i))
            made[-1].init_vcpu()
        td_finalize(vm, [InitialRegion(g, src, m)] if pages else ())
    except BaseException:
        Td(vm, tuple(made), gmem).close()
        raise
    return Td(vm, tuple(made), gmem)


def vcpu_run_until_hlt(vcpu: Vcpu, ops: Optional[Sequence[Any]] = None, max_runs: int = 16) -> KvmRun:
    """Run ``vcpu`` (queueing ``ops`` first) until it exits with HLT; re-run after -EINTR.

    Parameters
    ----------
    vcpu : Vcpu
        An initialized vCPU of a RUNNABLE TD.
    ops : sequence of guest ops, optional
        Appended to the guest queue by the first ``run()``.
    max_runs : int
        Bound on ``run()`` calls (each -EINTR costs one).

    Returns
    -------
    KvmRun
        The vCPU's ``kvm_run`` with ``exit_reason == ExitReason.HLT``.

    Raises
    ------
    UnexpectedExit
        Another exit reason, or still -EINTR after ``max_runs`` calls.
    KvmError
        As :meth:`Vcpu.run`.
    """
    k = check_int("max_runs", max_runs, 1, 1 << 32)
    run = vcpu.run(ops)
    for _ in range(k - 1):
        if not (run.exit_reason == ExitReason.INTR and run.ret == -_errno.EINTR):
            break
        run = vcpu.run()
    if run.exit_reason != ExitReason.HLT:
        msg = f"vCPU {vcpu.vcpu_id}: exit {run.exit_reason.name} (ret {run.ret}), expected HLT"
        raise UnexpectedExit(msg)
    return run


def vm_set_memory_attributes(vm: Any, gpa: int, size: int, private: bool) -> None:
    """Set ``[gpa, gpa + size)`` PRIVATE or shared (the selftests' ``vm_set_memory_attributes``).

    ``gpa`` may carry the shared bit (it is stripped: attributes are per gfn).
    """
    p = _bool("private", private)
    g = check_int("gpa", gpa, 0, 1 << 64) & ~vm.gpa_shared_mask
    vm.set_memory_attributes(g, size, MemAttr.PRIVATE if p else 0)


def _discard(vm: Any, gpa: int, size: int, to_private: bool) -> None:
    """Drop the backing the range left: userspace pages (to private) or guest_memfd pages (to shared)."""
    start, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
    host = vm.kvm.host
    for slot in list(vm.memslots):
        lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
        if lo >= hi:
            continue
        if to_private:
            host.madvise_dontneed(slot.gfn_to_hva(lo), (hi - lo) << PAGE_SHIFT)
        elif slot.gmem is not None:
            off = (slot.gmem_pgoff + lo - slot.base_gfn) << PAGE_SHIFT
            slot.gmem.fallocate(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE, off, (hi - lo) << PAGE_SHIFT)


def handle_memory_conversion(vm: Any, run: KvmRun, *, discard: bool = True) -> None:
    """Do what QEMU's ``kvm_convert_memory`` does for the exit in ``run``.

    Parameters
    ----------
    vm : Vm
        The VM whose vCPU exited.
    run : KvmRun
        ``KVM_EXIT_MEMORY_FAULT`` (convert ``memory_fault.gpa/size`` to the fault's kind) or a
        ``KVM_EXIT_HYPERCALL`` with nr ``KVM_HC_MAP_GPA_RANGE`` (convert ``args[1]`` pages at
        ``args[0]``, private iff ``args[2] & ENCRYPTED``; ``hypercall.ret`` = 0, or ``-EINVAL``
        (as a u64, what QEMU returns) when the ioctl fails).
    discard : bool
        Also drop the backing the range left (QEMU's default ``ram_block_discard``).

    Raises
    ------
    TdxValueError
        ``run`` holds another exit.
    KvmError
        For a MEMORY_FAULT whose conversion fails (QEMU stops the vCPU then).
    """
    if not isinstance(run, KvmRun):
        msg = f"run={run!r} must be a KvmRun"
        raise TdxTypeError(msg, name="run", value=run)
    if run.exit_reason == ExitReason.MEMORY_FAULT:
        gpa, size = run.memory_fault.gpa, run.memory_fault.size
        to_private = bool(run.memory_fault.flags & MEMORY_EXIT_FLAG_PRIVATE)
        vm.set_memory_attributes(gpa, size, MemAttr.PRIVATE if to_private else 0)
        if discard:
            _discard(vm, gpa, size, to_private)
        return
    if run.exit_reason == ExitReason.HYPERCALL and run.hypercall.nr == HC.MAP_GPA_RANGE:
        gpa, npages, attrs = run.hypercall.args[0], run.hypercall.args[1], run.hypercall.args[2]
        to_private = bool(attrs & MAP_GPA_RANGE_ENCRYPTED)
        try:
            vm.set_memory_attributes(gpa, npages << PAGE_SHIFT, MemAttr.PRIVATE if to_private else 0)
        except TdxError as e:
            if getattr(e, "errno", None) is None:
                raise
            run.hypercall.ret = (-_errno.EINVAL) & ((1 << 64) - 1)
            return
        if discard:
            _discard(vm, gpa, npages << PAGE_SHIFT, to_private)
        run.hypercall.ret = 0
        return
    msg = f"run holds exit {run.exit_reason!r}, not MEMORY_FAULT or a MapGPA HYPERCALL"
    raise TdxValueError(msg, name="run", value=int(run.exit_reason))
