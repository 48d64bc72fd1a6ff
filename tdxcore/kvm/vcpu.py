"""``Vcpu``: a KVM vCPU of a TD — its fd, its VM reference, and KVM_TDX_INIT_VCPU (SPEC §3.2).

A vCPU fd holds a VM reference (``kvm_vm_ioctl_create_vcpu`` takes ``kvm_get_kvm``; the fd's
release puts it), so the VM outlives a closed VM fd while any vCPU fd is open. The vCPU object
itself is freed only when the VM is destroyed (``kvm_destroy_vcpus``): its TDVPR/TDCX pages are
reclaimed there by :meth:`tdxcore.kvm.tdx_vm.TdxVm._vcpu_free`. ``KVM_RUN`` joins in the memory
slice.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import TYPE_CHECKING, Any, Generator, List, NamedTuple, Optional

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE
from tdxcore.errors import TdxTypeError, check_int
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl
from tdxcore.sched import WRITE, Wait

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Vcpu", "VcpuTdState", "MemRegion"]


class MemRegion(NamedTuple):
    """``struct kvm_tdx_init_mem_region`` as written back.

    ``source_offset`` (bytes into ``source``: the model's ``source_addr``), ``gpa`` and ``nr_pages``
    still to do.
    """

    source_offset: int
    gpa: int
    nr_pages: int


class VcpuTdState(enum.IntEnum):
    """``enum vcpu_tdx_state`` (6.18)."""

    UNINITIALIZED = 0
    INITIALIZED = 1


class Vcpu:
    """One TD vCPU (made by :meth:`TdxVm.create_vcpu`, never directly).

    Attributes
    ----------
    vm : TdxVm
        Its VM (referenced while the fd is open).
    vcpu_id : int
        The id userspace chose (also the x2APIC id passed to TDH.VP.INIT).
    fd : int
        Its number in ``kvm.fds`` (stays readable after close).
    state : VcpuTdState
        UNINITIALIZED until KVM_TDX_INIT_VCPU succeeds.
    tdvpr : int or None
        The TDVPR frame once VP.CREATE succeeded (None after it is reclaimed or freed).
    tdcx : list of int
        TDCX frames VP.ADDCX accepted (reclaimed at vCPU free).
    """

    def __init__(self, vm: "TdxVm", vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.state = VcpuTdState.UNINITIALIZED
        self.tdvpr: Optional[int] = None
        self.tdcx: List[int] = []
        self.mem_region: Optional[MemRegion] = None   # last KVM_TDX_INIT_MEM_REGION write-back
        self._fd_open = True
        self.fd = vm.kvm.fds.install(self)

    def __repr__(self) -> str:
        return (f"Vcpu(vm={self.vm.id}, id={self.vcpu_id}, fd={self.fd}, {self.state.name}, "
                f"tdvpr={self.tdvpr}, tdcx={len(self.tdcx)})")

    @property
    def is_closed(self) -> bool:
        """Whether the vCPU fd was closed."""
        return not self._fd_open

    def state_bytes(self) -> bytes:
        """``<QqBBqH`` vcpu_id, fd, state, fd_open, tdvpr (-1 none), TDCX count, then ``<Q`` each."""
        return struct.pack(f"<QqBBqH{len(self.tdcx)}Q", self.vcpu_id, self.fd, int(self.state),
                           self._fd_open, -1 if self.tdvpr is None else self.tdvpr, len(self.tdcx),
                           *self.tdcx)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """``close(vcpu_fd)``: drop the fd's VM reference (``kvm_vcpu_release``).

        Raises
        ------
        KvmError
            EBADF if the fd is already closed.
        """
        ret: Ret = OK
        if not self._fd_open:
            ret = ebadf("vCPU fd")
        else:
            self._fd_open = False
            self.vm.kvm.fds.remove(self.fd)
            self.vm.put()
        fd_call(self.vm.kvm.host, "close", self.vm.id, ret)

    # ------------------------------------------------------------------ ioctls
    def _guard(self, gen: Generator[Any, Any, Ret]) -> Generator[Any, Any, Ret]:
        if not self._fd_open:
            gen.close()
            return ebadf("vCPU fd")
        if self.vm.is_dead:
            # kvm_vcpu_ioctl: vm_dead → -EIO before anything else
            gen.close()
            return fail(_errno.EIO, f"VM {self.vm.id} is dead ({self.vm.bug_reason or 'killed'})")
        return (yield from gen)

    def init_vcpu(self, rcx: int = 0, *, flags: int = 0, hw_error: int = 0) -> None:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_VCPU)``: VP.CREATE, VP.ADDCX × n, VP.INIT.

        Parameters
        ----------
        rcx : int
            ``cmd.data``: the guest's initial RCX (u64).
        flags, hw_error : int
            ``cmd.flags`` (must be 0) and ``cmd.hw_error`` (userspace must leave it 0).

        Raises
        ------
        KvmError
            EIO: the VM is dead, or a SEAMCALL failed (KVM_BUG: the VM is dead from then on).
            EINVAL: no HKID / TD already RUNNABLE (checked first), ``hw_error`` set, flags, the
            vCPU already initialized. ENOMEM: no frame for the TDVPR/TDCX pages.

        Notes
        -----
        ``tdx_vcpu_ioctl`` → ``tdx_vcpu_init`` → ``tdx_td_vcpu_init`` (6.18). Pages are allocated
        first; on a VP.CREATE failure all are freed; on a VP.ADDCX failure the pages not yet added
        are freed and the added ones are reclaimed at vCPU free (tdx-facts §5.4).
        """
        r = check_int("rcx", rcx, 0, 1 << 64)
        f = check_int("flags", flags, 0, 1 << 32)
        hw = check_int("hw_error", hw_error, 0, 1 << 64)
        vm = self.vm

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            ret = vm._check_vcpu_ioctl(hw)
            if ret[0] < 0:
                return ret
            if f:
                return fail(_errno.EINVAL, f"flags {f:#x} must be 0")
            if self.state != VcpuTdState.UNINITIALIZED:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is already initialized")
            ret = vm._td_vcpu_init(self, r)
            if ret[0] < 0:
                return ret
            self.state = VcpuTdState.INITIALIZED
            return OK

        ioctl(vm.kvm.host, "KVM_TDX_INIT_VCPU", vm.id, self._guard(op()))

    def init_mem_region(self, source: bytes, gpa: int, nr_pages: int, measure: bool = True, *,
                        hw_error: int = 0) -> MemRegion:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_MEM_REGION)``: add initial private pages.

        Parameters
        ----------
        source : bytes
            The source pages (``source_addr``); page ``i`` is ``source[i*4096:(i+1)*4096]``.
            A short buffer is a fault on the missing page (EFAULT), as an unmapped source is.
        gpa, nr_pages : int
            u64 each: the first private GPA and the number of 4K pages.
        measure : bool
            ``KVM_TDX_MEASURE_MEMORY_REGION``: 16 TDH.MR.EXTEND per page.
        hw_error : int
            ``cmd.hw_error`` (must be 0).

        Returns
        -------
        MemRegion
            The region written back (all done: ``nr_pages == 0``); also ``self.mem_region``,
            which is written back with the progress made even when the ioctl fails.

        Raises
        ------
        KvmError
            EINVAL (in order): no HKID / TD RUNNABLE, ``hw_error``, vCPU not INITIALIZED, gpa not
            page aligned, ``nr_pages`` 0, ``gpa + nr_pages * 4096`` wraps, first or last GPA
            shared; per page: no memslot with GUEST_MEMFD (EINVAL), its guest_memfd closed
            (EFAULT), page already populated (EEXIST), short ``source`` (EFAULT), PAGE.ADD BUSY
            (EBUSY) or error (EIO), MR.EXTEND error (EIO), mirror map KVM_BUG (EIO).

        Notes
        -----
        ``tdx_vcpu_init_mem_region`` → ``kvm_gmem_populate`` → ``tdx_gmem_post_populate``
        (6.18); tdx-facts §5.5. The PRIVATE memory attribute is not checked yet (the attribute
        store arrives with the memory issue).
        """
        if not isinstance(source, (bytes, bytearray, memoryview)):
            msg = f"source must be bytes-like, not {type(source).__name__}"
            raise TdxTypeError(msg, name="source", value=type(source).__name__)
        if not isinstance(measure, bool):
            msg = f"measure={measure!r} must be a bool"
            raise TdxTypeError(msg, name="measure", value=measure)
        src = bytes(source)
        g = check_int("gpa", gpa, 0, 1 << 64)
        n = check_int("nr_pages", nr_pages, 0, 1 << 64)
        hw = check_int("hw_error", hw_error, 0, 1 << 64)
        vm = self.vm
        region = [MemRegion(0, g, n)]

        def op() -> Generator[Any, Any, Ret]:
            ret = vm._check_vcpu_ioctl(hw)
            if ret[0] < 0:
                return ret
            if self.state != VcpuTdState.INITIALIZED:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is not initialized")
            owner = yield Wait(vm.slots_lock, WRITE)
            try:
                from tdxcore.kvm.tdx_vm import TdState

                if vm.td_state == TdState.RUNNABLE:
                    return fail(_errno.EINVAL, "the TD is finalized")
                if g & (PAGE_SIZE - 1):
                    return fail(_errno.EINVAL, f"gpa {g:#x} is not page aligned")
                if n == 0:
                    return fail(_errno.EINVAL, "nr_pages is 0")
                end = (g + (n << PAGE_SHIFT)) & ((1 << 64) - 1)
                if end <= g:
                    return fail(_errno.EINVAL, f"gpa {g:#x} + {n} pages overflows")
                shared = 1 << (vm.gpaw - 1)
                if g & shared or (end - 1) & shared:
                    return fail(_errno.EINVAL, f"[{g:#x}, {end:#x}) is not all private")
                while region[0].nr_pages:
                    off, cur, left = region[0]
                    data = src[off:off + PAGE_SIZE]
                    if len(data) != PAGE_SIZE:
                        return fail(_errno.EFAULT, f"source has no page at offset {off:#x}")
                    ret = yield from vm._gmem_populate_one(cur >> PAGE_SHIFT, data, measure)
                    if ret[0] < 0:
                        return ret
                    region[0] = MemRegion(off + PAGE_SIZE, cur + PAGE_SIZE, left - 1)
                return OK
            finally:
                vm.slots_lock.release(owner, WRITE)

        try:
            ioctl(vm.kvm.host, "KVM_TDX_INIT_MEM_REGION", vm.id, self._guard(op()))
        finally:
            self.mem_region = region[0]     # copy_to_user of the progress, even on error
        return region[0]
