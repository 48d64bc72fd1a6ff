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
from typing import TYPE_CHECKING, Any, Generator, List, Optional

from tdxcore.errors import check_int
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Vcpu", "VcpuTdState"]


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
